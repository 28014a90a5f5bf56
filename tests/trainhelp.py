"""For tests that train: one run trained as every entry point trains it (train.train_runs), and a
tiny head of the embedded data registered as a dataset."""

from __future__ import annotations

from elbolab.training import RunOutcome, RunState, train_runs


def fit(state: RunState, resume: bool | None = None, keep_lock: bool = False) -> RunOutcome:
    """Train ``state`` to its end (a folder holding a finished run is refused, as ``elbolab train`` does)."""
    return train_runs([state], resume=resume, keep_lock=keep_lock, skip_finished=False)[0]


def register_tiny_embedded(monkeypatch, train: int, valid: int = 50, test: int = 100):
    """A ``train``/``valid``/``test`` head of the embedded data, registered as dataset 'tiny-embedded'
    for the test's duration (rows and runs then name it in ``data.name``)."""
    import elbolab.data.registry as registry
    from elbolab.data import load
    from elbolab.data.dataset import ImageDataset

    full = load("binarized-mnist-embedded")
    small = ImageDataset(name="tiny-embedded", image_shape=full.image_shape, binary=True, source="test subset",
                         splits={"train": full.splits["train"][:train], "valid": full.splits["valid"][:valid],
                                 "test": full.splits["test"][:test]})
    monkeypatch.setitem(registry.DATASETS, "tiny-embedded",
                        registry.DatasetSpec("tiny-embedded", "test", lambda _d: small, embedded=True))
    return small
