"""The VampPrior table's pseudo-inputs across datasets: ranked by use, shaped per dataset, drawn
by `reproduce vampprior-table` (and --table-only) from the rows that are finished."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from elbolab.config import RunConfig
from elbolab.data import DATASETS, DatasetSpec, ImageDataset
from elbolab.distributions import DiagonalGaussian
from elbolab.models import build_model
from elbolab.priors import VampPrior
from elbolab.reproduce import get_table, reproduce
from elbolab.reproduce.figures import most_used_pseudo_inputs, plot_pseudo_input_rows, pseudo_input_rows

FIGURE_ROWS = ["mnist-hierarchical-vampprior", "omniglot-hierarchical-vampprior",
               "caltech-hierarchical-vampprior", "frey-hierarchical-vampprior"]


class _Encoder(nn.Module):
    """A model whose top posterior is N(10 x[:2], e^-6): images with distinct first pixels have
    well-separated posteriors, so each image's responsibility goes to its own pseudo-input."""

    def __init__(self, pseudo: torch.Tensor) -> None:
        super().__init__()
        self.prior = VampPrior(2, pseudo.shape[1], pseudo.shape[0])
        self.prior.pre_activation.data.copy_(pseudo)
        self.prior.attach(self)

    def top_posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(10 * x[:, :2], torch.full_like(x[:, :2], -6.0))


def test_the_chosen_pseudo_inputs_are_the_most_used():
    pseudo = torch.tensor([[0.1, 0.9, 0.5], [0.9, 0.1, 0.5], [0.5, 0.5, 0.0], [0.9, 0.9, 1.0]])
    counts = [1, 0, 3, 2]  # images equal to each pseudo-input: usage by hand = counts / 6
    data = torch.cat([pseudo[c].repeat(n, 1) for c, n in enumerate(counts)])
    index, usage, images = most_used_pseudo_inputs(_Encoder(pseudo), data, 3)
    assert index == [2, 3, 0]
    torch.testing.assert_close(torch.tensor(usage, dtype=torch.float64),
                               torch.tensor([3 / 6, 2 / 6, 1 / 6], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(images, pseudo[[2, 3, 0]])
    # the least used never shows when fewer are asked for; all are ranked when more are
    assert most_used_pseudo_inputs(_Encoder(pseudo), data, 10)[0] == [2, 3, 0, 1]


def _tiny(name: str, shape: tuple[int, int], binary: bool, n: int = 120, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    d = shape[0] * shape[1]
    if binary:
        x = (torch.rand(n, d, generator=g) < torch.linspace(0.1, 0.9, d)).to(torch.uint8)
    else:
        x = (torch.rand(n, d, generator=g) * 255).to(torch.uint8)
    return ImageDataset(name=name, image_shape=shape, binary=binary, source="test",
                        splits={"train": x[:80], "valid": x[80:100], "test": x[100:]})


TINY_MODEL = {"model.name": "hierarchical", "model.prior.name": "vampprior", "model.prior.components": 7,
              "model.hierarchical.width": 8, "model.hierarchical.latent_dims": [3, 2]}


def test_each_dataset_line_has_its_own_image_shape_and_a_missing_row_says_so(tmp_path):
    rows = {}
    for row, (name, shape, lik) in {"mnist-row": ("binarized-mnist", (28, 28), "bernoulli"),
                                    "frey-row": ("freyfaces", (28, 20), "discretized-logistic")}.items():
        ds = _tiny(name, shape, binary=name != "freyfaces")
        grey = {"data.binarization": "none"} if name == "freyfaces" else {}  # as the frey row sets it
        cfg = RunConfig().with_overrides({**TINY_MODEL, **grey, "data.name": name, "model.likelihood": lik})
        torch.manual_seed(0)
        model = build_model(cfg.model, shape[0] * shape[1], ds.splits["train"].float()).eval()
        rows[row] = (model, ds, cfg)
    rows["omniglot-row"] = "not run yet"
    lines = pseudo_input_rows(rows, n=4)
    assert [r.row for r in lines] == ["mnist-row", "frey-row", "omniglot-row"]
    mnist, frey, missing = lines
    assert mnist.images.shape == (4, 28, 28) and frey.images.shape == (4, 28, 20)
    assert frey.image_shape == (28, 20) and frey.dataset == "freyfaces"
    model, ds, cfg = rows["frey-row"]
    test = ds.splits["test"].float() / 255  # grey levels, as the row scores them
    index, _, _ = most_used_pseudo_inputs(model, test, 4)
    assert frey.components == index
    torch.testing.assert_close(frey.images, model.prior.pseudo_inputs()[index].detach().reshape(4, 28, 20))
    assert missing.images is None and missing.missing == "not run yet"
    assert plot_pseudo_input_rows(lines, tmp_path / "p.png").stat().st_size > 2000


def test_the_table_names_the_four_vampprior_rows():
    assert get_table("vampprior-table").figures == {"pseudo-inputs": tuple(FIGURE_ROWS)}


@pytest.fixture
def tiny_vampprior_data(monkeypatch):
    """binarized-mnist and Frey Faces replaced by tiny synthetic sets of their image shapes."""
    data = {"binarized-mnist": _tiny("binarized-mnist", (28, 28), True),
            "freyfaces": _tiny("freyfaces", (28, 20), False, seed=1)}
    for name, ds in data.items():
        monkeypatch.setitem(DATASETS, name, DatasetSpec(name, "test", lambda _d, ds=ds: ds, embedded=True))
    return data


TINY_ROWS = {"train.epochs": 1, "objective.warmup_epochs": 0, "train.batch_size": 40, "eval.k_importance": 4,
             "model.prior.components": 7, "model.hierarchical.width": 8, "model.hierarchical.latent_dims": [3, 2]}


@pytest.mark.slow
def test_reproduce_draws_the_figure_from_the_finished_rows_and_table_only_redraws_it(tiny_vampprior_data, tmp_path):
    out = tmp_path / "vampprior-table" / "quick"
    rep = reproduce("vampprior-table", only=[FIGURE_ROWS[0], FIGURE_ROWS[3]], results=tmp_path, overrides=TINY_ROWS)
    assert sorted(rep.trained) == sorted([FIGURE_ROWS[0], FIGURE_ROWS[3]]) and not rep.failed
    png = out / "pseudo-inputs.png"
    assert rep.outputs["pseudo-inputs"] == png and png.stat().st_size > 2000
    md = (out / "table.md").read_text()
    assert "![pseudo-inputs](pseudo-inputs.png)" in md

    # --table-only redraws it from the finished rows (and trains nothing)
    png.unlink()
    again = reproduce("vampprior-table", only=[FIGURE_ROWS[0]], results=tmp_path, overrides=TINY_ROWS, train=False)
    assert not again.trained and png.exists() and (out / "table.md").read_text() == md

    # a fresh clone (table.json and the figure, no row folders): the committed figure is kept
    clone = tmp_path / "clone" / "vampprior-table" / "quick"
    clone.mkdir(parents=True)
    for f in ("table.json", "table.md", "pseudo-inputs.png"):
        shutil.copy(out / f, clone / f)
    doc = json.loads((clone / "table.json").read_text())
    for r in doc["rows"]:
        r["row_dir"] = str(tmp_path / "gone" / r["row"])
    (clone / "table.json").write_text(json.dumps(doc, indent=2) + "\n")
    before = (clone / "pseudo-inputs.png").read_bytes()
    reproduce("vampprior-table", results=tmp_path / "clone", overrides=TINY_ROWS, train=False)
    assert (clone / "pseudo-inputs.png").read_bytes() == before
    assert "![pseudo-inputs](pseudo-inputs.png)" in (clone / "table.md").read_text()

    # no row finished anywhere and no figure yet: none drawn, no crash, no link
    empty = reproduce("vampprior-table", only=[FIGURE_ROWS[1]], results=tmp_path / "empty", overrides=TINY_ROWS,
                      train=False)
    assert "pseudo-inputs" not in empty.outputs
    assert "pseudo-inputs.png" not in (tmp_path / "empty" / "vampprior-table" / "quick" / "table.md").read_text()
