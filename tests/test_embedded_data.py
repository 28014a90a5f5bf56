"""The packaged dataset: real, random (not head-of-file) and rebuildable byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from elbolab.data import DataError, load
from elbolab.data.embedded import EMBEDDED_DIR

REPO = Path(__file__).resolve().parents[1]


def test_counts_shapes_and_values() -> None:
    ds = load("binarized-mnist-embedded")
    assert {k: tuple(v.shape) for k, v in ds.splits.items()} == {
        "train": (10_000, 784), "valid": (1_000, 784), "test": (2_000, 784)}
    for v in ds.splits.values():
        assert set(v.unique().tolist()) == {0, 1}
    # MNIST digits cover ~13% of the pixels
    assert 0.10 < ds.splits["train"].float().mean() < 0.16


def test_subsets_are_random_not_the_head_of_each_file() -> None:
    for split, n_source in (("train", 50_000), ("valid", 10_000), ("test", 10_000)):
        idx = np.load(EMBEDDED_DIR / f"{split}_indices.npy")
        assert len(np.unique(idx)) == len(idx)
        assert idx.max() > 0.9 * n_source and idx.min() < 0.1 * n_source
        # spread over the whole file: each tenth of the file gets about a tenth of the subset
        counts = np.histogram(idx, bins=10, range=(0, n_source))[0]
        assert counts.min() > 0.7 * len(idx) / 10


def test_tampered_file_is_detected(tmp_path, monkeypatch) -> None:
    import shutil

    import elbolab.data.embedded as emb

    copy = tmp_path / "embedded"
    shutil.copytree(EMBEDDED_DIR, copy)
    raw = bytearray((copy / "test.npy").read_bytes())
    raw[-1] ^= 0xFF
    (copy / "test.npy").write_bytes(bytes(raw))
    monkeypatch.setattr(emb, "EMBEDDED_DIR", copy)
    with pytest.raises(DataError, match=r"test\.npy: SHA-256 .* does not match"):
        emb.load_embedded()


def test_rebuilds_byte_for_byte_from_the_shared_files(shared_data) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts/build_embedded_data.py"), "--check",
         "--source", str(shared_data / "binarized_mnist")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "identical"
