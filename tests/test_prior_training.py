"""Every model x prior x objective trains on real data: a few Adam steps, no NaN, and a
bound on held-out images that improves by a stated margin. Tiny widths: this is wiring."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from trainhelp import fit

from elbolab.config import RunConfig
from elbolab.data.formats import read_amat
from elbolab.diagnostics import evaluate_bounds
from elbolab.models import build_model
from elbolab.objectives import make_objective

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = {
    "model.latent_dim": 8,
    "model.hidden": [32],
    "model.two_layer.latent_dims": [8, 4],
    "model.two_layer.hidden1": [32],
    "model.two_layer.hidden2": [16],
    "model.hierarchical.latent_dims": [8, 8],
    "model.hierarchical.width": 32,
    "model.prior.components": 10,
    "objective.k": 3,
}


@pytest.fixture(scope="module")
def mnist(shared_data: Path) -> torch.Tensor:
    """800 images of Larochelle's binarized MNIST (validation split), as floats."""
    x = read_amat(shared_data / "binarized_mnist" / "binarized_mnist_valid.amat.gz")
    return torch.from_numpy(x[:800]).float()


class _NumpyOnly(pickle.Unpickler):
    """The Frey Faces pickle holds one numpy array; refuse any other global."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        if module == "numpy":
            return getattr(np, name)
        # numpy's own _reconstruct, reached through the public pickling protocol
        # (importing numpy.core warns on numpy 2)
        return np.zeros(0).__reduce__()[0]


@pytest.fixture(scope="module")
def frey(shared_data: Path) -> torch.Tensor:
    """Frey Faces (28 x 20 grey levels) as floats i / 255 in [0, 1]."""
    with open(shared_data / "freyfaces" / "freyfaces.pkl", "rb") as f:
        arr = _NumpyOnly(f, encoding="latin1").load()[0]
    return torch.from_numpy(np.asarray(arr, dtype=np.uint8)).float() / 255


def train_steps(cfg: RunConfig, data: torch.Tensor, steps: int, lr: float = 3e-3, warmup: bool = False):
    """Bound on 200 held-out images before and after ``steps`` Adam steps on the rest."""
    torch.manual_seed(0)
    held_out, train = data[:200], data[200:]
    model = build_model(cfg.model, data.shape[1], train)
    objective = make_objective(cfg.objective)
    key = f"iwae_{cfg.objective.k}" if cfg.objective.name == "iwae" else "elbo"
    before = evaluate_bounds(model, held_out, k=cfg.objective.k, seed=1)[key]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, train.shape[0], (50,), generator=g)
        beta = min(1.0, (step + 1) / steps) if warmup else 1.0
        res = objective(model, train[idx], beta)
        assert torch.isfinite(res.loss), f"non-finite loss at step {step}"
        opt.zero_grad()
        res.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
    after = evaluate_bounds(model, held_out, k=cfg.objective.k, seed=1)[key]
    return before, after, model


@pytest.mark.parametrize("objective", ["vae", "iwae"])
@pytest.mark.parametrize("prior", ["standard", "mog", "vampprior", "vampprior-data"])
@pytest.mark.parametrize("model", ["one-layer", "two-layer", "hierarchical"])
def test_every_combination_trains_on_binarized_mnist(mnist, model, prior, objective):
    cfg = RunConfig().with_overrides({**TINY, "model.name": model, "model.prior.name": prior,
                                      "objective.name": objective})
    before, after, _ = train_steps(cfg, mnist, steps=30)
    assert math.isfinite(after)
    # starting from the mean image (~ -206 nats), 30 steps gain well over 5 nats
    assert after > before + 5.0, (before, after)


@pytest.mark.parametrize("likelihood", ["discretized-logistic", "gaussian", "gaussian-pixel-var"])
@pytest.mark.parametrize("model", ["one-layer", "hierarchical"])
def test_grey_level_likelihoods_train_on_frey_faces_with_warmup(frey, model, likelihood):
    cfg = RunConfig().with_overrides({**TINY, "model.name": model, "model.likelihood": likelihood,
                                      "model.prior.name": "vampprior", "objective.name": "vae",
                                      "data.binarization": "none"})
    before, after, _ = train_steps(cfg, frey, steps=30, warmup=True)
    assert math.isfinite(after)
    assert after > before + 5.0, (before, after)


def test_learned_pseudo_inputs_move_and_data_ones_do_not(mnist):
    cfg = RunConfig().with_overrides({**TINY, "model.name": "hierarchical", "model.prior.name": "vampprior"})
    torch.manual_seed(0)
    start = build_model(cfg.model, 784, mnist[200:]).prior.pseudo_inputs().detach().clone()
    _, _, model = train_steps(cfg, mnist, steps=10)
    assert (model.prior.pseudo_inputs().detach() - start).abs().max() > 1e-3
    cfg = cfg.with_overrides({"model.prior.name": "vampprior-data"})
    torch.manual_seed(0)
    start = build_model(cfg.model, 784, mnist[200:]).prior.images.clone()
    _, _, model = train_steps(cfg, mnist, steps=10)
    assert torch.equal(model.prior.images, start)
    assert set(start.unique().tolist()) <= {0.0, 1.0}  # real training images, not noise


@pytest.mark.parametrize("prior", ["vampprior", "vampprior-data", "mog"])
def test_run_with_mixture_prior_reloads_and_draws_its_components(mnist, tmp_path, prior):
    from trainhelp import fit

    from elbolab.data.dataset import ImageDataset
    from elbolab.diagnostics.prior_figures import component_grid, plot_components
    from elbolab.runs import load_run
    from elbolab.training import RunState

    data = ImageDataset("mnist-subset", {"train": mnist[:600].to(torch.uint8), "valid": mnist[600:].to(torch.uint8)},
                        (28, 28), binary=True)
    cfg = RunConfig().with_overrides({**TINY, "model.name": "hierarchical", "model.prior.name": prior,
                                      "objective.warmup_epochs": 1, "train.epochs": 2, "train.progress": False})
    trainer = RunState(cfg, tmp_path / "run", data)
    fit(trainer)
    run = load_run(tmp_path / "run")
    x = mnist[600:650]
    torch.manual_seed(3)
    want = trainer.model.eval().log_weights(x, 4)
    torch.manual_seed(3)
    torch.testing.assert_close(run.model.log_weights(x, 4), want)

    grid = component_grid(run.model, n_components=4, samples_per=3)
    if prior == "mog":
        assert grid.shape == (4, 3, 784)
    else:
        assert grid.shape == (4, 4, 784)
        torch.testing.assert_close(grid[:, 0], run.model.prior.pseudo_inputs()[:4].detach().clamp(0, 1))
        if prior == "vampprior-data":
            assert torch.equal(run.model.prior.images, trainer.model.prior.images)
    png = plot_components(run.model, (28, 28), tmp_path / "components.png", n_components=4, samples_per=3)
    assert png.stat().st_size > 1000


def test_vampprior_components_figure_on_the_embedded_data(tmp_path):
    """The fast twin of the real-data test above (and of `diagnose`'s pseudo-input figure, slow tier):
    a VampPrior run on the packaged subset reloads exactly, and each row of its component grid
    starts with that component's pseudo-input."""
    from elbolab.data import load
    from elbolab.data.dataset import ImageDataset
    from elbolab.diagnostics.prior_figures import component_grid, plot_components
    from elbolab.runs import load_run
    from elbolab.training import RunState

    train = load("binarized-mnist-embedded").split("train")
    data = ImageDataset("embedded-subset", {"train": train[:600], "valid": train[600:700]}, (28, 28), binary=True)
    cfg = RunConfig().with_overrides({**TINY, "model.name": "hierarchical", "model.prior.name": "vampprior",
                                      "train.epochs": 1, "train.progress": False})
    trainer = RunState(cfg, tmp_path / "run", data)
    fit(trainer)
    run = load_run(tmp_path / "run")
    x = train[700:720].float()
    torch.manual_seed(3)
    want = trainer.model.eval().log_weights(x, 4)
    torch.manual_seed(3)
    torch.testing.assert_close(run.model.log_weights(x, 4), want)
    grid = component_grid(run.model, n_components=4, samples_per=3)
    assert grid.shape == (4, 4, 784)
    torch.testing.assert_close(grid[:, 0], run.model.prior.pseudo_inputs()[:4].detach().clamp(0, 1))
    png = plot_components(run.model, (28, 28), tmp_path / "components.png", n_components=4, samples_per=3)
    assert png.stat().st_size > 1000
