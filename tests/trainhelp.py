"""Train one run as every entry point does (train.train_runs), for tests that hold its RunState."""

from __future__ import annotations

from elbolab.training import RunOutcome, RunState, train_runs


def fit(state: RunState, resume: bool | None = None, keep_lock: bool = False) -> RunOutcome:
    """Train ``state`` to its end (a folder holding a finished run is refused, as ``elbolab train`` does)."""
    return train_runs([state], resume=resume, keep_lock=keep_lock, skip_finished=False)[0]
