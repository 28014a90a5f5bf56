"""The loop: runs of one shape stepping together, a run alone being a stack of one.

:class:`Loop` trains the runs of one stack (packing.pack says which runs can share one):
it takes up each run folder (a finished run is left as it is, an unfinished one of the same
config continued from its checkpoint), then steps the runs furthest behind together, one
step (step.make_step) for all, until every run has trained its epochs. Runs found at
different points (a stack put together from checkpoints written at different steps) are
thus brought level first. Every run keeps its own data order, random stream, metrics,
checkpoints and run folder; on a CPU each run ends with the bits of the same run trained
alone (tests/test_stacked.py, tests/test_crash_resume.py).

Checkpoints: at every epoch end, mid-epoch when a run's ``train.checkpoint_steps`` or
``train.checkpoint_minutes`` says so (then every run of the step writes one), and on Ctrl-C
or SIGTERM (every run, after the current step; a second signal stops at once).

Non-finite steps, per run: a run whose loss or gradient is not finite is handled by its
own ``train.nonfinite``: skipped (its optimizer does not step, the others' do) or stopped
(its folder says "failed" with the error, it leaves the stack, the others go on). No value
of one run enters another's arithmetic, so one run's NaN leaves the others' bits unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import ConfigError, RunConfig
from ..data import ImageDataset, load
from ..fastpaths import retain_freed_memory
from ..files import OutputError, fault_point
from ..runs import run_status
from ..sinks import MetricSink, open_sinks
from .packing import check_stackable, pack
from .state import MonitorFactory, RunState, close_sinks
from .step import NonFiniteError, Step, make_step

log = logging.getLogger("elbolab")

#: a run to train: its config and folder, or a RunState built already (refusals come first)
RunSpec = tuple[RunConfig, str | Path] | RunState


@dataclass
class RunOutcome:
    """How one run ended: ``finished`` (trained here or before), ``failed`` or ``interrupted``."""

    run_dir: Path
    status: str
    error: str | None = None

    def raise_if_failed(self) -> None:
        """A run stopped by its non-finite policy, as the :class:`NonFiniteError` that stopped it."""
        if self.status == "failed":
            raise NonFiniteError(self.error or f"{self.run_dir}: failed")


@dataclass
class _Member:
    run: RunState
    #: the current epoch's batches (None between epochs), its learning rate and start time
    batches: tuple[torch.Tensor, ...] | None = None
    lr: float = 0.0
    t0: float = 0.0
    sinks: list[MetricSink] = field(default_factory=list)
    status: str = "running"

    @property
    def position(self) -> tuple[int, int]:
        return self.run.epoch, self.run.next_batch

    @property
    def live(self) -> bool:
        return self.status == "running"


def _monitor(monitors: MonitorFactory | None, cfg: RunConfig, dataset: ImageDataset | None) -> Any:
    if monitors is None or not cfg.train.monitor_every:
        return None
    d = cfg.data
    return monitors(cfg, dataset if dataset is not None else load(d.name, d.data_dir, validation=d.validation))


def _describe(e: BaseException) -> str:
    if isinstance(e, NonFiniteError | OutputError):
        return str(e)
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


@contextlib.contextmanager
def graceful_signals(loop: Loop) -> Iterator[None]:
    """Ctrl-C / SIGTERM ask ``loop`` to checkpoint after the current step and stop (:meth:`Loop.request_stop`);
    a second one stops at once. Signals reach the main thread only, so elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask(signum: int, frame: object) -> None:
        if loop.stop_reason:
            raise KeyboardInterrupt
        loop.request_stop(signal.Signals(signum).name)

    old = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Loop:
    """Train the runs of one stack to their end; see the module docstring.

    ``runs``: each run's (config, folder), or its RunState built already. ``monitors`` builds
    each run's epoch monitor from its config and data (a RunState given brings its own).
    """

    def __init__(self, runs: Sequence[RunSpec], dataset: ImageDataset | None = None,
                 monitors: MonitorFactory | None = None, name_lines: bool = False) -> None:
        if not runs:
            raise ConfigError("a stack needs at least one run")
        self.specs = list(runs)
        check_stackable([s.cfg if isinstance(s, RunState) else s[0] for s in self.specs])
        self.dataset = dataset
        self.monitors = monitors
        #: put each run's folder name before its epoch lines (several runs asked for: a sweep)
        self.name_lines = name_lines
        self.members: list[_Member] = []
        self.outcomes: dict[Path, RunOutcome] = {}
        #: why the loop is to stop after the current step (a signal's name), or None
        self.stop_reason: str | None = None
        self._images: dict[tuple[str, int], Any] = {}
        self._step: Step | None = None
        self._bar: Any = None
        self._bar_key: tuple = ()

    def request_stop(self, reason: str) -> None:
        """Checkpoint every run after the current step and raise KeyboardInterrupt(reason)."""
        self.stop_reason = reason

    # --- setting up -------------------------------------------------------------------
    def _dataset(self, cfg: RunConfig) -> ImageDataset:
        if self.dataset is None:
            d = cfg.data
            self.dataset = load(d.name, d.data_dir, validation=d.validation)
        return self.dataset

    def _add_member(self, spec: RunSpec, resume: bool | None, stacked: bool) -> None:
        if isinstance(spec, RunState):
            run = spec
        else:
            cfg, run_dir = spec
            dataset = self._dataset(cfg)
            run = RunState(cfg, run_dir, dataset, _monitor(self.monitors, cfg, dataset), self._images)
        if self.name_lines:
            run.line_prefix = f"{run.run_dir.name}: "
        run.prepare_run_dir(resume)  # a resumed run restores torch's stream from its checkpoint
        if stacked:
            run.own_stream()
        member = _Member(run)
        self.members.append(member)  # from here its lock is released with the others'
        member.sinks = open_sinks(run.cfg, run.run_dir, run.epoch + 1)
        member.run.last_checkpoint = time.monotonic()
        if run.done:
            self._finish(member)

    # --- how runs end -----------------------------------------------------------------
    def _finish(self, m: _Member) -> None:
        m.run.finish()
        m.status = "finished"
        self.outcomes[m.run.run_dir] = RunOutcome(m.run.run_dir, "finished")

    def _end(self, m: _Member, status: str, error: str | None = None) -> None:
        m.status = status
        m.run.write_info_quietly(status, error if status == "failed" else None)
        self.outcomes[m.run.run_dir] = RunOutcome(m.run.run_dir, status, error)

    # --- training ---------------------------------------------------------------------
    def fit(self, resume: bool | None = None, keep_lock: bool = False, skip_finished: bool = True
            ) -> list[RunOutcome]:
        """Train every run to its end; returns how each ended, in the order given.

        ``resume`` as in ``RunState.prepare_run_dir`` (None: continue an unfinished run of the
        same config in a folder, else start one). A run stopped by its non-finite policy is
        reported as failed and the others go on; Ctrl-C or SIGTERM checkpoints every run and
        raises KeyboardInterrupt. ``keep_lock``: the run folders stay locked after a normal end
        until each RunState's ``release`` (the CLI evaluates its run first). ``skip_finished``:
        a finished run is reported as such (False: it is refused, as a folder to train into).
        """
        ok = False
        try:
            todo = []
            for spec in self.specs:
                run_dir = Path(spec.run_dir if isinstance(spec, RunState) else spec[1])
                if skip_finished and run_status(run_dir) == "finished":
                    self.outcomes[run_dir] = RunOutcome(run_dir, "finished")
                else:
                    todo.append(spec)
            for spec in todo:
                self._add_member(spec, resume, stacked=len(todo) > 1)
        except BaseException:  # a run refused (in use, damaged): the runs taken so far are let go untouched
            self._release()
            raise
        try:
            with graceful_signals(self):
                while True:
                    live = [m for m in self.members if m.live]
                    if not live:
                        break
                    low = min(m.position for m in live)
                    self._advance([m for m in live if m.position == low])
            ok = True
        except KeyboardInterrupt:
            for m in self.members:
                if m.live:
                    self._end(m, "interrupted", self.stop_reason or "interrupted")
            raise
        except Exception as e:  # never leave a run marked "running": say how the stack ended, then re-raise
            for m in self.members:
                if m.live:
                    self._end(m, "failed", _describe(e))
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
            self._release(keep_lock=ok and keep_lock)
        return [self.outcomes[Path(s.run_dir if isinstance(s, RunState) else s[1])] for s in self.specs]

    def _release(self, keep_lock: bool = False) -> None:
        """Close each run's metric sinks and let go of its folder (the lock prepare_run_dir took)."""
        for m in self.members:
            close_sinks(m.sinks)
            m.sinks = []
            if not keep_lock:
                m.run.release()

    def _progress(self, active: list[_Member], i: int, n: int) -> None:
        """One bar per epoch of the runs stepping."""
        r = active[0].run
        key = (r.epoch, tuple(id(m) for m in active))
        if self._bar is None or self._bar_key != key:
            if self._bar is not None:
                self._bar.close()
            self._bar_key = key
            stacked = f", {len(active)} runs stacked" if len(active) > 1 else ""
            # None: shown on a terminal only (a log file gets the epoch lines)
            self._bar = tqdm(total=n, initial=i, leave=False, unit="batch",
                             desc=f"epoch {r.epoch + 1}/{r.cfg.train.epochs}{stacked}",
                             disable=None if any(m.run.cfg.train.progress for m in active) else True)
        self._bar.update(1)
        if len(active) == 1 and i % 10 == 0 and r.epoch_count:
            self._bar.set_postfix(bound=f"{r.epoch_bound_sum / r.epoch_count:.2f}")

    def _step_for(self, active: list[_Member]) -> Step:
        """The step of the runs ``active`` (built anew when the runs stepping together change)."""
        if self._step is None or [id(r.model) for r in self._step.members] != [id(m.run.model) for m in active]:
            self._step = make_step([m.run.step_run() for m in active])
        return self._step

    def _advance(self, active: list[_Member]) -> None:
        """One step of the runs at the lowest position, and the end of their epoch when it comes."""
        step = self._step_for(active)
        for m in active:
            if m.batches is None:
                m.batches, m.lr = m.run.begin_epoch()
                m.t0 = time.perf_counter()
        i = active[0].run.next_batch
        n = len(active[0].batches)
        self._progress(active, i, n)
        ids = [m.batches[i] for m in active]
        x = torch.stack([m.run.batcher.batch(idx) for m, idx in zip(active, ids, strict=True)])
        betas = [m.run.kl_weight(i, n) for m in active]
        first = active[0].run
        compiling = first.cfg.train.compile and x.shape[1] not in first.compiled_batches
        if compiling:
            log.info("compiling the training step for batches of %d (torch.compile: once per batch size, "
                     "seconds on a GPU, tens of seconds on a CPU)", x.shape[1])
            t_compile = time.perf_counter()
        outcomes = step.step(x, betas)
        if compiling:
            first.compiled_batches.add(x.shape[1])
            log.info("compiled in %.1f s", time.perf_counter() - t_compile)
        for m, idx, outcome in zip(active, ids, outcomes, strict=True):
            try:
                m.run.record_step(outcome, i, idx)
            except NonFiniteError as e:
                if len(self.specs) == 1:
                    raise
                log.error("run %s: %s", m.run.run_dir, e)
                self._end(m, "failed", str(e))
        fault_point("step")
        stepped = [m for m in active if m.live]
        if self.stop_reason or (i + 1 < n and any(m.run.checkpoint_due() for m in stepped)):
            for m in stepped:
                m.run.save_checkpoint()
            self._stop_if_asked(stepped)
        if i + 1 == n:
            for m in stepped:
                self._close_epoch(m, n)
            self._stop_if_asked(stepped)

    def _close_epoch(self, m: _Member, n: int) -> None:
        r = m.run
        row: dict[str, Any] = {"epoch": r.epoch + 1, **r.epoch_summary(n, m.lr)}
        m.sinks = r.close_epoch(row, m.t0, m.sinks)
        m.batches = None
        if r.done:
            self._finish(m)

    def _stop_if_asked(self, saved: list[_Member]) -> None:
        """Stop when asked: every live run's checkpoint written (``saved`` were just now)."""
        if not self.stop_reason:
            return
        for m in self.members:
            if m.live and m not in saved:
                m.run.save_checkpoint()
        live = [m for m in self.members if m.live]
        if len(live) == 1:
            log.warning("%s: checkpoint written at step %d; stopping", self.stop_reason, live[0].run.step)
        else:
            log.warning("%s: every run's checkpoint written; stopping", self.stop_reason)
        raise KeyboardInterrupt(self.stop_reason)


def train_runs(runs: Sequence[RunSpec], resume: bool | None = None, dataset: ImageDataset | None = None,
               monitors: MonitorFactory | None = None, keep_lock: bool = False,
               skip_finished: bool = True) -> list[RunOutcome]:
    """Train ``runs`` in stacks of one shape (:func:`packing.pack`), one stack after another; the one
    entry point of every command that trains (CLI train and sweep, elbolab.train, reproduce).

    A folder holding a finished run is left as it is (``skip_finished=False``: refused); ``resume`` as
    in ``RunState.prepare_run_dir``; ``keep_lock`` as in :meth:`Loop.fit`.
    ``monitors`` builds each run's epoch monitor (state.EpochMonitor). A run stopped by its
    non-finite policy is reported failed (:meth:`RunOutcome.raise_if_failed`); a run that is alone
    raises its NonFiniteError instead when it is the only run asked for.
    """
    retain_freed_memory()  # an entry point: keep freed memory for the step's big temporaries
    configs = [s.cfg if isinstance(s, RunState) else s[0] for s in runs]
    outcomes: dict[int, RunOutcome] = {}
    for group in pack(configs):
        loop = Loop([runs[i] for i in group], dataset, monitors, name_lines=len(runs) > 1)
        try:
            done = loop.fit(resume, keep_lock, skip_finished)
        except NonFiniteError as e:
            if len(runs) == 1:
                raise
            (i,) = group
            outcomes[i] = RunOutcome(_folder(runs[i]), "failed", str(e))
            continue
        for i, outcome in zip(group, done, strict=True):
            outcomes[i] = outcome
    return [outcomes[i] for i in range(len(runs))]


def _folder(spec: RunSpec) -> Path:
    return Path(spec.run_dir if isinstance(spec, RunState) else spec[1])
