"""Every dataset read from the real files in ../shared/data: counts, labels, ranges, checksums, errors.

Each dataset is decoded once per session (``loaded``); corrupted copies are made in tmp_path.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from elbolab.cli import main
from elbolab.data import DATASETS, Batcher, DataError, ImageDataset, load
from elbolab.data.download import download, file_state

EXPECTED = {  # name -> {split: (count, labelled)}, image shape, binary
    "mnist": ({"train": 60_000, "test": 10_000}, (28, 28), False),
    "fashion-mnist": ({"train": 60_000, "test": 10_000}, (28, 28), False),
    "binarized-mnist": ({"train": 50_000, "valid": 10_000, "test": 10_000}, (28, 28), True),
    "caltech101-silhouettes": ({"train": 4_100, "valid": 2_264, "test": 2_307}, (28, 28), True),
    "freyfaces": ({"train": 1_565, "valid": 200, "test": 200}, (28, 20), False),
    "omniglot-28-elbolab": ({"train": 24_345, "test": 8_115}, (28, 28), False),
}
#: pixel sums of images 0, 1 and the last of each split (MNIST train[0] is the well-known "5")
IMAGE_SUMS = {
    "mnist": {"train": [27525, 31095, 20920], "test": [18454, 28850, 41833]},
    "fashion-mnist": {"train": [76247, 84598, 16684], "test": [33456, 100994, 24390]},
    "binarized-mnist": {"train": [123, 80, 119], "valid": [90, 74, 137], "test": [147, 116, 116]},
    "caltech101-silhouettes": {"train": [422, 403, 247], "valid": [272, 436, 467], "test": [373, 258, 238]},
    "freyfaces": {"train": [87741, 78093, 86135], "valid": [90012, 89622, 84981], "test": [90786, 87552, 88488]},
    "omniglot-28-elbolab": {"train": [16626, 10701, 8340], "test": [14508, 10956, 8249]},
}
FIRST_LABELS = {"mnist": {"train": [5, 0, 8], "test": [7, 2, 6]}, "fashion-mnist": {"train": [9, 0, 5],
                "test": [9, 2, 5]}, "caltech101-silhouettes": {"train": [56, 25, 63], "valid": [44, 4, 24],
                "test": [2, 20, 82]}, "omniglot-28-elbolab": {"train": [0, 1, 1622], "test": [0, 1, 1622]}}


@pytest.fixture(scope="session")
def derived_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep the OMNIGLOT build cache out of the user's home during tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ELBOLAB_CACHE", str(tmp_path_factory.mktemp("elbolab-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def loaded(shared_data: Path, derived_cache) -> Callable[[str], ImageDataset]:
    memo: dict[str, ImageDataset] = {}

    def get(name: str) -> ImageDataset:
        if name not in memo:
            memo[name] = load(name, shared_data)
        return memo[name]

    return get


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_shapes_ranges_and_sums(name: str, loaded) -> None:
    d = loaded(name)
    counts, shape, binary = EXPECTED[name]
    assert d.counts() == counts and d.image_shape == shape and d.binary is binary
    assert "verified" in d.source and "not pinned" not in d.source
    for split, x in d.splits.items():
        assert x.dtype == torch.uint8 and x.shape == (counts[split], shape[0] * shape[1]) and x.is_contiguous()
        assert int(x.max()) == (1 if binary else 255) or name == "freyfaces"
        sums = [int(x[i].sum()) for i in (0, 1, -1)]
        assert sums == IMAGE_SUMS[name][split], split
        if name in FIRST_LABELS:
            y = d.labels[split]
            assert y.dtype == torch.int64 and y.shape == (counts[split],)
            assert [int(y[i]) for i in (0, 1, -1)] == FIRST_LABELS[name][split]
    assert set(d.labels) == (set(counts) if name in FIRST_LABELS else set())
    assert DATASETS[name].split_sizes == tuple(counts.items())


def test_every_source_file_is_verified(shared_data: Path) -> None:
    for spec in DATASETS.values():
        if spec.embedded or spec.name == "omniglot-chardata":
            continue
        states = [file_state(shared_data, f).state for f in spec.files]
        assert states == ["verified"] * len(spec.files), spec.name


def test_mnist_labels_and_moments_match_the_published_ones(loaded) -> None:
    d = loaded("mnist")
    assert torch.bincount(d.labels["train"]).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(d.labels["test"]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    x = d.split("train").double() / 255
    assert round(x.mean().item(), 4) == 0.1307 and round(x.std().item(), 4) == 0.3081
    f = loaded("fashion-mnist")
    assert torch.bincount(f.labels["train"]).tolist() == [6000] * 10
    assert round((f.split("train").double() / 255).mean().item(), 4) == 0.2860


def test_mnist_validation_split_and_name_suffix(shared_data: Path, loaded) -> None:
    full = loaded("mnist")
    d = load("mnist-dynamic", shared_data, validation=10_000)
    assert d.default_binarization == "dynamic" and d.counts() == {"train": 50_000, "valid": 10_000, "test": 10_000}
    assert torch.equal(d.split("valid"), full.split("train")[50_000:])
    assert torch.equal(d.labels["valid"], full.labels["train"][50_000:])


def test_binarized_mnist_test_set_is_mnist_test_binarized(loaded) -> None:
    """Larochelle's test file is the MNIST test set sorted by class: ink where grey 255, none where 0."""
    grey, binary = loaded("mnist"), loaded("binarized-mnist")
    order = torch.sort(grey.labels["test"], stable=True).indices
    g, b = grey.split("test")[order], binary.split("test")
    assert (b[g == 0] == 0).all() and (b[g == 255] == 1).all()


def test_caltech_object_is_one_and_every_class_present(loaded) -> None:
    d = loaded("caltech101-silhouettes")
    for split, y in d.labels.items():
        assert torch.unique(y).tolist() == list(range(101)), split
    x = d.split("train").reshape(-1, 28, 28).float()
    border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], dim=1).mean()
    assert border < 0.2 < 0.7 < x[:, 10:18, 10:18].mean()  # silhouettes (1) in the middle, background (0) around


def test_caltech_follows_the_vampprior_convention(shared_data: Path, loaded) -> None:
    mat = scipy.io.loadmat(shared_data / "caltech101_silhouettes" / "caltech101_silhouettes_28_split1.mat")
    vamp = 1 - mat["test_data"].reshape(-1, 28, 28).reshape(-1, 784, order="F")  # as in their load_data.py
    np.testing.assert_array_equal(loaded("caltech101-silhouettes").split("test").numpy(), vamp)


def test_freyfaces_splits_partition_the_file(loaded) -> None:
    d = loaded("freyfaces")
    rows = torch.cat([d.split(s) for s in ("train", "valid", "test")])
    assert int(rows.min()) == 8 and int(rows.max()) == 238
    assert torch.unique(rows, dim=0).shape[0] == torch.unique(rows[: d.counts()["train"]], dim=0).shape[0] + 400


def test_omniglot_covers_every_character_in_both_splits(shared_data: Path, loaded) -> None:
    d = loaded("omniglot-28-elbolab")
    assert torch.bincount(d.labels["train"]).tolist() == [15] * 1623
    assert torch.bincount(d.labels["test"]).tolist() == [5] * 1623
    assert d.labels["train"][:1623].tolist() == list(range(1623))  # slot-major order
    ink = d.split("train").double().mean().item() / 255
    assert 0.075 < ink < 0.085  # the raw files have 7.8% / 8.4% ink; area averaging keeps it
    again = load("omniglot", shared_data)  # the alias; read from the verified cache
    assert again.name == "omniglot-28-elbolab" and torch.equal(again.split("test"), d.split("test"))


def test_dynamic_binarization_draws_fresh_bits_with_the_grey_mean(loaded) -> None:
    grey = loaded("mnist").split("train")[:32]
    batcher = Batcher(grey, binary=False, binarization="dynamic", seed=3, device=torch.device("cpu"))
    index = torch.arange(32)
    n_draws = 300
    first, second = batcher.batch(index), batcher.batch(index)
    assert not torch.equal(first, second)
    total = first.double() + second.double()
    for _ in range(n_draws - 2):
        total += batcher.batch(index).double()
    mean, p = total / n_draws, grey.double() / 255
    assert (mean[p == 0] == 0).all() and (mean[p == 1] == 1).all()
    inner = (p > 0) & (p < 1)
    z = (mean - p)[inner] / (p * (1 - p) / n_draws).sqrt()[inner]
    assert z.abs().max() < 5.5  # ~3,500 pixels: P(any |z| > 5.5) ~ 1e-4
    assert abs(z.mean().item()) < 4 / inner.sum().item() ** 0.5  # independent pixels: within 4 SE


def test_static_binarization_is_identical_across_epochs(loaded) -> None:
    grey = loaded("mnist").split("test")[:200]
    batcher = Batcher(grey, binary=False, binarization="static", seed=5, device=torch.device("cpu"))
    index = torch.arange(200)
    first = batcher.batch(index).clone()
    assert torch.equal(first, batcher.batch(index)) and set(first.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(loaded("mnist").as_float("test", "static", 5), loaded("mnist").as_float("test", "static", 5))


# --- damaged copies -----------------------------------------------------------------------


def copy_dataset(shared_data: Path, tmp_path: Path, folder: str) -> Path:
    shutil.copytree(shared_data / folder, tmp_path / folder)
    return tmp_path / folder


def test_missing_truncated_and_swapped_idx_files(shared_data: Path, tmp_path: Path) -> None:
    folder = copy_dataset(shared_data, tmp_path, "mnist")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: file not found .*elbolab data download mnist"):
        load("mnist", tmp_path)
    train = folder / "train-images-idx3-ubyte.gz"
    train.write_bytes(train.read_bytes()[: 1_000_000])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: cannot decompress .*truncated"):
        load("mnist", tmp_path)
    shutil.copy(shared_data / "mnist" / "train-labels-idx1-ubyte.gz", train)  # labels where images belong
    with pytest.raises(DataError, match=r"magic number is 2049 \(labels\), expected 2051 \(images\)") as e:
        load("mnist", tmp_path)
    assert "\n" not in str(e.value)


def test_changed_pixel_is_a_checksum_mismatch(shared_data: Path, tmp_path: Path, monkeypatch) -> None:
    folder = copy_dataset(shared_data, tmp_path, "mnist")
    path = folder / "t10k-images-idx3-ubyte.gz"
    content = bytearray(gzip.decompress(path.read_bytes()))
    content[16 + 14 * 28 + 14] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: checksum mismatch: md5 .* expected "
                                        r"2646ac647ad5339dbf082846283269ea.*data download"):
        load("mnist", tmp_path)
    assert file_state(tmp_path, "mnist/t10k-images-idx3-ubyte.gz").state == "MISMATCH"
    monkeypatch.setenv("ELBOLAB_DATA_VERIFY", "0")
    assert "MISMATCH (not enforced)" in load("mnist", tmp_path).source


def test_wrong_shape_inside_the_mat_file(shared_data: Path, tmp_path: Path) -> None:
    folder = copy_dataset(shared_data, tmp_path, "caltech101_silhouettes")
    path = folder / "caltech101_silhouettes_28_split1.mat"
    mat = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    mat["val_data"] = mat["val_data"][:, :783]
    scipy.io.savemat(path, mat)
    with pytest.raises(DataError, match=r"'val_data' is uint8 2264x783, expected 2264x784"):
        load("caltech101-silhouettes", tmp_path)
    mat["val_data"] = np.zeros((2264, 784))
    scipy.io.savemat(path, mat)
    with pytest.raises(DataError, match=r"'val_data' is float64 2264x784, expected 2264x784 of dtype kind 'u'"):
        load("caltech101-silhouettes", tmp_path)


def test_download_writes_only_verified_files(shared_data: Path, tmp_path: Path) -> None:
    real = (shared_data / "freyfaces" / "freyfaces.pkl").read_bytes()
    spec = DATASETS["freyfaces"]
    with pytest.raises(DataError, match="checksum mismatch"):
        download(spec, tmp_path, fetch=lambda url: real[:100] + b"?" + real[101:], log=lambda s: None)
    assert not (tmp_path / "freyfaces" / "freyfaces.pkl").exists()
    states = download(spec, tmp_path, fetch=lambda url: real, log=lambda s: None)
    assert [s.state for s in states] == ["verified"]
    assert load("freyfaces", tmp_path).counts() == {"train": 1565, "valid": 200, "test": 200}


def test_cli_data_list(shared_data: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "list", "--data-dir", str(shared_data)]) == 0
    out = capsys.readouterr().out
    assert "omniglot-28-elbolab: found" in out and "omniglot-chardata: missing" in out
    assert out.count("verified ") == 4 + 4 + 3 + 2 + 1 + 1
    assert main(["data", "--data-dir", str(shared_data), "download", "nope"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err


def _documented_aliases() -> dict[str, str]:
    """alias -> name, as docs/data.md's dataset table writes them: `name` (alias `short`)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    return {alias: name for name, alias in re.findall(r"\| `([\w-]+)` \(alias `([\w-]+)`\)", text)}


def test_every_documented_alias_passes_preflight_loads_and_trains(shared_data: Path, loaded, tmp_path) -> None:
    """`data.name=omniglot` (frey, caltech): config validation, preflight, the trainer's own load and
    one epoch of a tiny model, under the name the docs give."""
    from trainhelp import fit

    from elbolab.config import RunConfig
    from elbolab.preflight import preflight
    from elbolab.training import RunState

    aliases = _documented_aliases()
    assert aliases == {"omniglot": "omniglot-28-elbolab", "caltech": "caltech101-silhouettes", "frey": "freyfaces"}
    assert aliases == DATASETS.aliases
    for alias, name in aliases.items():
        loaded(name)  # decoded (and OMNIGLOT built into the test cache) once per session
        cfg = RunConfig().with_overrides({"data.name": alias, "data.data_dir": str(shared_data), "model.hidden": [8],
                                          "model.latent_dim": 2, "train.epochs": 1, "train.batch_size": 1000,
                                          "train.progress": False, "train.threads": 1, "eval.k_importance": 2})
        assert cfg.data.name == alias
        preflight(cfg)
        trainer = RunState(cfg, tmp_path / alias)
        assert trainer.dataset.name == name
        fit(trainer)
        assert len((tmp_path / alias / "metrics.jsonl").read_text().splitlines()) == 1


def test_omniglot_never_points_to_the_chardata_file(tmp_path: Path) -> None:
    from elbolab.config import ConfigError, RunConfig

    with pytest.raises(DataError) as err:
        load("omniglot", tmp_path)
    assert "omniglot-28-elbolab" in str(err.value) and "chardata" not in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'omniglot'"):
        RunConfig().with_overrides({"data.name": "omniglott"})
