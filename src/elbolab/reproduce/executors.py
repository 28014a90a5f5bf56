"""Where rows run: in this process, in parallel processes on this machine, or on Ray.

Every executor takes the row tasks and yields ``(task, result, error)`` as rows finish,
so the table can be written as soon as each row is done and one failed row does not
stop the others.
"""

from __future__ import annotations

import multiprocessing
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from ..config import ConfigError
from ..registry import Registry
from .rows import RowTask, run_row

Outcome = tuple[RowTask, dict[str, Any] | None, BaseException | None]


class Executor(ABC):
    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ConfigError(f"--workers: must be >= 1, got {workers}")
        self.workers = workers

    @abstractmethod
    def run(self, tasks: list[RowTask], fn: Callable[[RowTask], dict[str, Any]] = run_row) -> Iterator[Outcome]: ...


class LocalExecutor(Executor):
    """Rows in parallel worker processes (spawned, so each starts with a clean torch);
    one worker runs them in this process, one after another."""

    def run(self, tasks: list[RowTask], fn: Callable[[RowTask], dict[str, Any]] = run_row) -> Iterator[Outcome]:
        if self.workers == 1 or len(tasks) <= 1:
            for t in tasks:
                try:
                    yield t, fn(t), None
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - reported in the table, the other rows go on
                    yield t, None, e
            return
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(self.workers, len(tasks)), mp_context=ctx) as pool:
            futures = {pool.submit(fn, t): t for t in tasks}
            for fut in as_completed(futures):
                t = futures[fut]
                try:
                    yield t, fut.result(), None
                except Exception as e:  # noqa: BLE001
                    yield t, None, e


class RayExecutor(Executor):
    """Rows as Ray tasks: on the cluster at $RAY_ADDRESS, else a local Ray instance.
    ``workers`` caps how many rows run at once (each asks Ray for one CPU, or a GPU
    when its config trains on cuda)."""

    def run(self, tasks: list[RowTask], fn: Callable[[RowTask], dict[str, Any]] = run_row) -> Iterator[Outcome]:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'elbolab[ray]'") from None
        started_here = not ray.is_initialized()
        if started_here:
            address = os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address)
            else:
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False)
        try:
            pending: dict[Any, RowTask] = {}
            queue = list(tasks)
            while queue or pending:
                while queue and len(pending) < self.workers:
                    t = queue.pop(0)
                    gpus = 1 if str(t.config.get("train", {}).get("device", "cpu")).startswith("cuda") else 0
                    ref = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(fn).remote(t)
                    pending[ref] = t
                done, _ = ray.wait(list(pending), num_returns=1)
                ref = done[0]
                t = pending.pop(ref)
                try:
                    yield t, ray.get(ref), None
                except Exception as e:  # noqa: BLE001
                    yield t, None, getattr(e, "cause", None) or e
        finally:
            if started_here:
                ray.shutdown()


#: ``--executor`` -> class
EXECUTORS: Registry[type[Executor]] = Registry("executor", {"local": LocalExecutor, "ray": RayExecutor})


def make_executor(name: str, workers: int) -> Executor:
    return EXECUTORS.get_checked(name, "--executor")(workers)
