"""Readers, checks and transforms on small synthetic files (no real data needed)."""

from __future__ import annotations

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from elbolab.config import ConfigError, DataConfig, RunConfig, split_binarization_suffix
from elbolab.data import DataError, load, resolve_data_dir, sources
from elbolab.data import cache as cache_mod
from elbolab.data import download as download_mod
from elbolab.data.dataset import ImageDataset
from elbolab.data.formats import mat_variable, parse_idx, parse_mat, parse_numpy_pickle, read_bytes
from elbolab.data.omniglot import area_to_grey, area_weights, downsample_ink_area
from elbolab.data.registry import DatasetSpec


def idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + payload


# --- IDX -------------------------------------------------------------------------------


def test_idx_round_trip_and_errors(tmp_path: Path) -> None:
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    good = idx_bytes(2051, (3, 4, 5), images.tobytes())
    np.testing.assert_array_equal(parse_idx(good, tmp_path / "x", 2051, 3, (4, 5)), images)
    with pytest.raises(DataError, match=r"magic number is 2049 \(labels\), expected 2051 \(images\)"):
        parse_idx(idx_bytes(2049, (3, 4, 5), images.tobytes()), tmp_path / "x", 2051, 3, (4, 5))
    with pytest.raises(DataError, match=r"dimensions are \(3, 4, 5\), expected \(60000, 4, 5\)"):
        parse_idx(good, tmp_path / "x", 2051, 60000, (4, 5))
    with pytest.raises(DataError, match="truncated"):
        parse_idx(good[:-1], tmp_path / "x", 2051, 3, (4, 5))


def test_truncated_gzip_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(bytes(range(256)) * 100)[:-20])
    with pytest.raises(DataError) as e:
        read_bytes(path)
    assert str(path) in str(e.value) and "truncated" in str(e.value) and "\n" not in str(e.value)


# --- .mat ------------------------------------------------------------------------------


def test_mat_variable_checks_shape_and_dtype(tmp_path: Path) -> None:
    path = tmp_path / "m.mat"
    scipy.io.savemat(path, {"train_data": np.zeros((5, 784), np.uint8), "other": np.zeros((2, 2))})
    mat = parse_mat(path.read_bytes(), path)
    assert mat_variable(mat, path, "train_data", (5, 784), "u").shape == (5, 784)
    with pytest.raises(DataError, match=r"'train_data' is uint8 5x784, expected 4100x784"):
        mat_variable(mat, path, "train_data", (4100, 784), "u")
    with pytest.raises(DataError, match=r"'other' is float64 2x2, expected 2x2 of dtype kind 'u'"):
        mat_variable(mat, path, "other", (2, 2), "u")
    with pytest.raises(DataError, match=r"no variable 'val_data'"):
        mat_variable(mat, path, "val_data", (5, 784), "u")
    with pytest.raises(DataError, match="not a readable MATLAB"):
        parse_mat(b"garbage" * 40, path)


def test_chardata_loader_on_a_synthetic_file(tmp_path: Path) -> None:
    """chardata.mat stores images as columns in MATLAB (column-major) order; we must read them upright."""
    upright = np.zeros((3, 28, 28))
    upright[:, 2, :] = 1.0  # a horizontal bar in row 2: transposing would make it a column
    upright[1, 5, 7] = 0.5
    to_matlab = upright.transpose(0, 2, 1).reshape(3, 784).T  # [784, N], column-major images
    target = np.eye(50)[:, [4, 0, 49]]
    (tmp_path / "omniglot").mkdir()
    scipy.io.savemat(tmp_path / "omniglot" / "chardata.mat",
                     {"data": to_matlab, "testdata": to_matlab[:, :2], "target": target})
    d = load("omniglot-chardata", tmp_path)
    assert d.counts() == {"train": 3, "test": 2} and not d.binary
    x = d.split("train").reshape(3, 28, 28)
    np.testing.assert_array_equal(x[:, 2, :].numpy(), 255)
    assert int(x[1, 5, 7]) == 128 and int(x.sum()) == 3 * 28 * 255 + 128  # round(127.5) -> 128
    assert d.labels["train"].tolist() == [4, 0, 49] and "test" not in d.labels
    scipy.io.savemat(tmp_path / "omniglot" / "chardata.mat", {"data": to_matlab[:700], "testdata": to_matlab})
    with pytest.raises(DataError, match=r"'data' is float64 700x3, expected 784xN"):
        load("omniglot-chardata", tmp_path)


# --- the Frey pickle -------------------------------------------------------------------


def test_restricted_unpickler_reads_arrays_and_refuses_code(tmp_path: Path) -> None:
    faces = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = parse_numpy_pickle(pickle.dumps([faces], protocol=3), tmp_path / "ok.pkl")
    np.testing.assert_array_equal(out[0], faces)
    marker = tmp_path / "pwned"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with pytest.raises(DataError, match=r"global os.system is not allowed"):
        parse_numpy_pickle(evil, tmp_path / "evil.pkl")
    assert not marker.exists()
    evil_builtin = b"c__builtin__\neval\n(S'1+1'\ntR."
    with pytest.raises(DataError, match="is not allowed"):
        parse_numpy_pickle(evil_builtin, tmp_path / "evil2.pkl")


class _HugeArray:
    """Pickles as numpy's _reconstruct asked for 9 TiB before any data is read."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (9 * 2**40,), b"b")


def test_a_crafted_freyfaces_pickle_is_checked_before_unpickling_and_allocates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 9 TiB request used to be unpickled before the checksum was looked at (MemoryError)."""
    path = tmp_path / "freyfaces" / "freyfaces.pkl"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps([_HugeArray()], protocol=3))
    import elbolab.data.standard as standard

    def no_unpickling(content, where):
        raise AssertionError("unpickled before the checksum was checked")

    monkeypatch.setattr(standard, "parse_numpy_pickle", no_unpickling)
    with pytest.raises(DataError, match="checksum mismatch"):
        load("freyfaces", tmp_path)
    monkeypatch.undo()
    # with verification off the restricted unpickler still refuses to allocate what the file asks
    monkeypatch.setenv(sources.VERIFY_ENV_VAR, "0")
    with pytest.raises(DataError, match=r"refused to unpickle .*shape \(9895604649984,\)"):
        load("freyfaces", tmp_path)
    faces = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (3, 4):  # real arrays still load (the file is a Python 2 pickle)
        np.testing.assert_array_equal(parse_numpy_pickle(pickle.dumps([faces], protocol=protocol), path)[0], faces)


# --- OMNIGLOT downsampling ---------------------------------------------------------------


def test_area_weights_partition_every_pixel() -> None:
    w = area_weights()  # [28, 105] in quarter pixels
    assert (w.sum(axis=1) == 15).all()  # each output cell is 3.75 input pixels wide
    assert (w.sum(axis=0) == 4).all()  # each input pixel is shared out entirely
    assert w[0, :5].tolist() == [4, 4, 4, 3, 0] and w[1, 3:8].tolist() == [1, 4, 4, 4, 2]


def test_downsample_is_exact_area_average() -> None:
    rng = np.random.default_rng(0)
    ink = rng.random((40, 105, 105)) < rng.random((40, 1, 1))
    area = downsample_ink_area(ink, chunk=16)
    w = area_weights().astype(np.float64)
    np.testing.assert_array_equal(area, np.einsum("ij,bjk,lk->bil", w, ink.astype(np.float64), w))
    np.testing.assert_array_equal(area.sum(axis=(1, 2)), 16 * ink.sum(axis=(1, 2)))  # ink is conserved
    full = downsample_ink_area(np.ones((1, 105, 105), bool))
    assert (full == 225).all()


def test_area_to_grey_rounds_half_up() -> None:
    area = np.array([0, 1, 112, 113, 224, 225])
    np.testing.assert_array_equal(area_to_grey(area), np.floor(area * 255 / 225 + 0.5).astype(np.uint8))
    assert area_to_grey(np.array([225]))[0] == 255


# --- names, config, validation split ---------------------------------------------------------


def test_name_suffix_selects_binarization() -> None:
    assert split_binarization_suffix("mnist-dynamic") == ("mnist", "dynamic")
    assert split_binarization_suffix("omniglot-grey") == ("omniglot", "none")
    assert split_binarization_suffix("binarized-mnist-embedded") == ("binarized-mnist-embedded", None)
    cfg = RunConfig().with_overrides({"data.name": "mnist-dynamic"})
    assert (cfg.data.name, cfg.data.binarization) == ("mnist", "dynamic")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert DataConfig(name="fashion-mnist-static", binarization="none").binarization == "static"


def test_validation_option() -> None:
    with pytest.raises(ConfigError, match=r"data.validation: must be >= 0"):
        RunConfig().with_overrides({"data.validation": -1})
    ds = ImageDataset("toy", {"train": torch.arange(10, dtype=torch.uint8)[:, None]}, (1,), False,
                      labels={"train": torch.arange(10)})
    held = ds.with_validation(3)
    assert held.split("train").flatten().tolist() == list(range(7))
    assert held.split("valid").flatten().tolist() == [7, 8, 9] and held.labels["valid"].tolist() == [7, 8, 9]
    with pytest.raises(DataError, match="between 1 and 9"):
        ds.with_validation(10)
    with pytest.raises(DataError, match="has its own validation split"):
        held.with_validation(1)
    with pytest.raises(DataError, match="has its own validation split"):
        load("binarized-mnist-embedded", validation=100)


def test_unknown_name_and_data_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"did you mean 'mnist'"):
        load("mnsit")
    monkeypatch.setenv("ELBOLAB_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    missing = r"mnist/train-images-idx3-ubyte.gz: file not found.*elbolab data download mnist"
    with pytest.raises(DataError, match=missing):
        load("mnist-dynamic")


# --- checksums, cache and downloads ----------------------------------------------------------


@pytest.fixture
def toy_pin(monkeypatch: pytest.MonkeyPatch) -> DatasetSpec:
    content = b"elbolab toy data\n" * 10
    monkeypatch.setitem(sources.PINS, "toy/a.bin.gz", sources.SourceFile(
        "http://example.invalid/a.bin.gz", "0" * 64, "sha256:" + hashlib.sha256(content).hexdigest()))
    return DatasetSpec("toy", "toy", loader=lambda _: None, files=("toy/a.bin.gz",))


def test_check_accepts_same_content_recompressed(tmp_path: Path, toy_pin: DatasetSpec) -> None:
    content = b"elbolab toy data\n" * 10
    path = tmp_path / "a.bin.gz"
    assert sources.check("toy/a.bin.gz", path, gzip.compress(content, mtime=0)) == "verified"
    with pytest.raises(DataError, match=r"checksum mismatch: sha256 of the uncompressed content is .*expected"):
        sources.check("toy/a.bin.gz", path, gzip.compress(content + b"x"))


def test_download_verifies_before_writing(tmp_path: Path, toy_pin: DatasetSpec) -> None:
    good = gzip.compress(b"elbolab toy data\n" * 10)
    with pytest.raises(DataError, match="checksum mismatch"):
        download_mod.download(toy_pin, tmp_path, fetch=lambda url: gzip.compress(b"bad"), log=lambda s: None)
    assert not (tmp_path / "toy").exists() or not any((tmp_path / "toy").iterdir())

    def offline(url: str) -> bytes:
        raise OSError("Name or service not known")

    with pytest.raises(DataError, match=r"cannot download http://example.invalid/a.bin.gz .*put these files in"):
        download_mod.download(toy_pin, tmp_path, fetch=offline, log=lambda s: None)
    states = download_mod.download(toy_pin, tmp_path, fetch=lambda url: good, log=lambda s: None)
    assert [s.state for s in states] == ["verified"] and (tmp_path / "toy" / "a.bin.gz").read_bytes() == good
    assert [p.name for p in (tmp_path / "toy").iterdir()] == ["a.bin.gz"]  # no temp files left
    assert download_mod.file_state(tmp_path, "toy/a.bin.gz").state == "verified"


def test_cache_rebuilds_when_damaged_or_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache_mod.CACHE_ENV_VAR, str(tmp_path))
    calls = []

    def build() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"x": np.arange(5, dtype=np.uint8)}

    for _ in range(2):
        np.testing.assert_array_equal(cache_mod.cached_arrays("e", "k1", build)["x"], np.arange(5))
    assert len(calls) == 1
    npz = tmp_path / "e.npz"
    npz.write_bytes(npz.read_bytes()[:-3])  # damaged: the recorded SHA-256 no longer matches
    cache_mod.cached_arrays("e", "k1", build)
    cache_mod.cached_arrays("e", "k2", build)  # stale: built from other sources
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "e.npz"]


# --- files that are not what they claim: one line naming the file, never a traceback -----------


def test_empty_mat_and_a_zip_named_mat_are_data_errors(tmp_path: Path) -> None:
    import io
    import zipfile

    with pytest.raises(DataError, match=r"x\.mat: empty file"):
        parse_mat(b"", tmp_path / "x.mat")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("data", "not a matrix")
    with pytest.raises(DataError, match=r"x\.mat: not a readable MATLAB v5 \.mat file"):
        parse_mat(buf.getvalue(), tmp_path / "x.mat")


def test_huge_sparse_idx_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A 100 GB (sparse) file where MNIST's training images belong: its IDX header fixes the size,
    so it is refused from its length alone instead of being read into memory."""
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.parent.mkdir()
    with path.open("wb") as f:
        f.write(idx_bytes(2051, (60_000, 28, 28), b""))
        f.truncate(100 * 10**9)
    with pytest.raises(DataError, match=r"100,000,000,000 bytes, its format allows at most 47,040,016"):
        load("mnist", tmp_path)


def test_gzip_decompressing_past_the_format_size_is_refused(tmp_path: Path) -> None:
    content = idx_bytes(2051, (60_000, 28, 28), bytes(60_000 * 784 + 10_000))
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(content))
    with pytest.raises(DataError, match="decompresses to more than the 47,040,016 bytes"):
        load("mnist", tmp_path)
    assert sources.decompress(path, gzip.compress(b"ab") + gzip.compress(b"c"), limit=3) == b"abc"  # two members


@pytest.mark.parametrize("kind", ["folder", "symlink loop"])
def test_a_data_path_that_is_not_a_file_says_what_it_is(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "freyfaces" / "freyfaces.pkl"
    path.parent.mkdir()
    if kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(path)
    want = "is a folder, not a file" if kind == "folder" else "a symlink loop"
    with pytest.raises(DataError, match=want) as err:
        load("freyfaces", tmp_path)
    assert "file not found" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(DataError, match=want):
        read_bytes(path)


@pytest.mark.parametrize("manifest", [b"[]", b"\xff\xfe\x00garbage", None])
def test_a_damaged_cache_manifest_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, manifest) -> None:
    monkeypatch.setenv(cache_mod.CACHE_ENV_VAR, str(tmp_path))
    calls = []

    def build() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"x": np.arange(5, dtype=np.uint8)}

    cache_mod.cached_arrays("e", "k1", build)
    if manifest is None:  # a folder where the manifest belongs: rebuilt, and the cache left unwritten
        (tmp_path / "e.json").unlink()
        (tmp_path / "e.json").mkdir()
    else:
        (tmp_path / "e.json").write_bytes(manifest)
    np.testing.assert_array_equal(cache_mod.cached_arrays("e", "k1", build)["x"], np.arange(5))
    assert len(calls) == 2


def test_a_static_models_training_split_is_scored_on_the_draw_it_trained_on() -> None:
    """Under static binarization the training set is one draw: what the trainer's batches hold is
    what evaluation (ELBO surgery over the training split) scores; another split keeps its own
    fixed draw, and a dynamic model's training split is scored on a fixed draw of its own."""
    from elbolab.data import evaluation_images
    from elbolab.data.dataset import Batcher

    grey = torch.randint(0, 256, (50, 12), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    data = ImageDataset("grey", {"train": grey, "test": grey.clone()}, (12,), binary=False)
    batcher = Batcher(grey, False, "static", 5, torch.device("cpu"))
    trained_on = batcher.batch(torch.arange(50))
    assert torch.equal(evaluation_images(data, "train", "static", 5), trained_on)
    assert not torch.equal(evaluation_images(data, "test", "static", 5), trained_on)
    assert not torch.equal(evaluation_images(data, "train", "dynamic", 5), trained_on)
