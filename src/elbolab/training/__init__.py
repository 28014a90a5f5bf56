"""Training: one loop for every run, a run alone being a stack of one.

    step.py      one optimizer step of S >= 1 runs (the Step seam, take_step, the readout,
                 finiteness, the stacked optimizers)
    state.py     one run's state: build, counters, checkpoint state and load, epoch close,
                 best weights, fault policy, its run folder (through runs.py)
    loop.py      the loop: advances the runs furthest behind, epochs, checkpoint timing,
                 signals, progress; :func:`train_runs`, the entry point every command calls
    packing.py   which runs can share a step (stack_key, pack)

The step is the one place another implementation plugs in. ``step.make_step(runs)`` is
called once per stack of runs (and again when the runs stepping together change) with each
run's :class:`~elbolab.training.step.StepRun` (model, optimizer, objective, bound plan,
estimator, random stream); it returns an object with ``members``, ``model`` and
``step(x, betas) -> [StepOutcome per run]`` (the :class:`~elbolab.training.step.Step`
protocol). The plain autograd step (:class:`~elbolab.training.step.PlainStep`) serves one run,
:class:`~elbolab.training.step.StackedStep` several. A new step (say a fused forward/backward
with Adam on preallocated buffers, chosen by a config switch) is one more class returned
by ``make_step``: it must take a step only when the loss and every gradient are finite,
report each run's summed bound, and leave optimizer state that ``optimizer.state_dict()``
saves, so checkpoints, resume and the fault policy work unchanged.
"""

from __future__ import annotations

from .loop import Loop, RunOutcome, graceful_signals, train_runs
from .packing import STACK_FREE_KEYS, check_stackable, pack, stack_key, stack_refusal
from .state import EpochMonitor, MonitorFactory, RunState, epoch_line
from .step import NonFiniteError, PlainStep, StackedStep, Step, StepOutcome, StepRun, make_step, take_step

__all__ = [
    "STACK_FREE_KEYS", "EpochMonitor", "Loop", "MonitorFactory", "NonFiniteError", "PlainStep", "RunOutcome",
    "RunState", "StackedStep", "Step", "StepOutcome", "StepRun", "check_stackable", "epoch_line",
    "graceful_signals", "make_step", "pack", "stack_key", "stack_refusal", "take_step", "train_runs",
]
