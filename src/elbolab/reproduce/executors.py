"""Where rows run: in this process, in parallel processes on this machine, or on Ray.

Every executor takes the row tasks and yields ``(task, result, error)`` as rows finish,
so the table can be written as soon as each row is done and one failed row does not
stop the others.

Worker processes never outlive the command: each asks the kernel for SIGTERM when its
parent dies (Linux ``PR_SET_PDEATHSIG``: a SIGKILLed parent included), and a parent that
stops (Ctrl-C, SIGTERM, an error) sends its workers SIGTERM and waits for them. A worker
in training checkpoints at its next step and exits (the rerun resumes the row); one
evaluating stops at once. Workers run in their own process group, so a Ctrl-C in the
terminal reaches the parent alone, which then stops them once, in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
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


#: exit code of a worker stopped by SIGTERM or Ctrl-C (as the CLI's)
EXIT_INTERRUPTED = 130
#: seconds a stopping worker gets to write its checkpoint before it is killed
STOP_GRACE_SECONDS = 60.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Worker initializer: SIGTERM to this worker when the parent dies (Linux), its own process
    group (a terminal's Ctrl-C goes to the parent, which stops the workers itself)."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(EXIT_INTERRUPTED)


def _run_in_worker(fn: Callable[[RowTask], dict[str, Any]], task: RowTask) -> dict[str, Any]:
    """``fn(task)``; a worker told to stop exits once its row has checkpointed, instead of
    reporting the interruption and taking the next row."""
    try:
        return fn(task)
    except KeyboardInterrupt:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


def _stop_workers(procs: list[multiprocessing.Process]) -> None:
    """SIGTERM every worker (each checkpoints and exits), wait for them, SIGKILL what is left."""
    for p in procs:
        with contextlib.suppress(OSError, ValueError):
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for p in procs:
        with contextlib.suppress(OSError, ValueError, AssertionError):
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)


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
        pool = ProcessPoolExecutor(max_workers=min(self.workers, len(tasks)), mp_context=ctx,
                                   initializer=_die_with_parent, initargs=(os.getpid(),))
        done = False
        try:
            futures = {pool.submit(_run_in_worker, fn, t): t for t in tasks}
            for fut in as_completed(futures):
                t = futures[fut]
                try:
                    yield t, fut.result(), None
                except Exception as e:  # noqa: BLE001
                    yield t, None, e
            done = True
        finally:
            if not done:  # interrupted, or the caller stopped: no worker trains on unseen
                procs = list((getattr(pool, "_processes", None) or {}).values())  # no public list of them
                pool.shutdown(wait=False, cancel_futures=True)
                _stop_workers(procs)
            pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor(Executor):
    """Rows as Ray tasks: on the cluster at $RAY_ADDRESS, else a local Ray instance.
    ``workers`` caps how many rows run at once (each asks Ray for one CPU, or a GPU
    when its config trains on cuda).

    Stopping: Ctrl-C or SIGTERM to the command shuts the local Ray instance down, which
    kills its tasks at once (no checkpoint at that step: the rerun resumes each row from
    its last one); a SIGKILLed driver is noticed by Ray itself, whose tasks die with it
    and whose helper processes exit by themselves minutes later (scripts/ray_stop_check.sh).
    On a cluster ($RAY_ADDRESS) the cluster outlives the driver."""

    def run(self, tasks: list[RowTask], fn: Callable[[RowTask], dict[str, Any]] = run_row) -> Iterator[Outcome]:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'elbolab[ray]'") from None
        started_here = not ray.is_initialized()
        if started_here:
            handler = signal.getsignal(signal.SIGTERM)
            address = os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address)
            else:
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False)
            # ray.init makes SIGTERM abort the driver (exit 134); keep the command's own handling
            # (a clean stop, exit 130): ray.shutdown below then ends the tasks
            if handler is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, handler)
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
