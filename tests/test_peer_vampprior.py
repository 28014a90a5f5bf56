"""The VampPrior table's equal-budget peer (benchmarks/peer/vampprior_peer.py): independent of
elbolab's models, priors, objectives, optimizers and trainer, and computing the same log weights,
optimizer update and warm-up as elbolab on the same weights, gradients and noise."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from scripthelp import load_script

from elbolab.config.presets import preset
from elbolab.evaluation import log_likelihood
from elbolab.models import build_model
from elbolab.optimizers import AdamNormGrad
from elbolab.schedules import kl_weight

PEER = Path(__file__).resolve().parents[1] / "benchmarks" / "peer" / "vampprior_peer.py"


def _peer():
    return load_script("benchmarks/peer/vampprior_peer.py")


#: elbolab's parameter prefix -> the peer's (gated layers: .h / .g alike)
NAME_MAP = {
    "q_z2.body.0.": "q_z2_layers.0.", "q_z2.body.1.": "q_z2_layers.1.",
    "q_z1.body.a.": "q_z1_x.", "q_z1.body.b.": "q_z1_z2.", "q_z1.body.joint.": "q_z1_joint.",
    "p_z1.body.0.": "p_z1_layers.0.", "p_z1.body.1.": "p_z1_layers.1.",
    "p_x_features.a.": "p_x_z1.", "p_x_features.b.": "p_x_z2.", "p_x_features.joint.": "p_x_joint.",
    "likelihood.head.": "p_x_logits.",
}
#: elbolab's one (mean ++ log-variance) head -> the peer's two
HEADS = {"q_z2": "q_z2", "q_z1": "q_z1", "p_z1": "p_z1"}


def _copy_into(peer_model, ours) -> None:
    """Every parameter of elbolab's model into the peer, by name; checks none is left out."""
    theirs = dict(peer_model.named_parameters())
    done = set()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name == "prior.pre_activation":
                target = {"pseudo": p}
            elif name.split(".head.linear.")[0] in HEADS and ".head.linear." in name:
                net, kind = name.split(".head.linear.")
                half = p.shape[0] // 2
                target = {f"{net}_mean.{kind}": p[:half], f"{net}_logvar.{kind}": p[half:]}
            else:
                prefix = next(k for k in NAME_MAP if name.startswith(k))
                target = {NAME_MAP[prefix] + name[len(prefix):]: p}
            for key, value in target.items():
                theirs[key].copy_(value)
                done.add(key)
    assert done == set(theirs)


def _twins(dtype: torch.dtype):
    """elbolab's vampprior-paper model with perturbed random weights, and the peer with the same ones."""
    peer = _peer()
    torch.manual_seed(0)
    ours = build_model(preset("vampprior-paper").model, 784, dataset="binarized-mnist").to(dtype)
    with torch.no_grad():  # pseudo-inputs over both hardtanh edges; log-variances over both clamps
        ours.prior.pre_activation.uniform_(-0.5, 1.5)
        for net in (ours.q_z2, ours.q_z1, ours.p_z1):
            net.head.linear.weight.mul_(3.0)
            net.head.linear.bias.uniform_(-9.0, 5.0)
    model = peer.PeerHVAE(784).to(dtype)
    _copy_into(model, ours)
    return peer, ours, model


# float32: log weights reach -3e6 here (pseudo-inputs far from the data), where one ulp is 0.25
@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float64, 1e-12, 1e-8), (torch.float32, 1e-6, 1e-3)])
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_the_peer_log_weights_equal_elbolabs_on_the_same_weights_and_noise(dtype, rtol, atol, beta) -> None:
    _, ours, model = _twins(dtype)
    x = torch.bernoulli(torch.full((6, 784), 0.3, dtype=dtype), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.manual_seed(7)  # elbolab draws z2's noise, then z1's, from the global stream
        log_w = ours.log_weight_terms(x, 5).log_weights(beta)
        torch.manual_seed(7)
        eps2 = torch.randn(5, 6, 40, dtype=dtype)
        eps1 = torch.randn(5, 6, 40, dtype=dtype)
        theirs = model.log_weights_from_noise(x, eps1, eps2, beta)
        # the clamps and the pseudo-inputs' hardtanh are in play
        lv = ours.q_z2(x)[1]
        assert (lv == 2.0).any() and (lv == -6.0).any()
    assert log_w.shape == theirs.shape == (5, 6)
    assert torch.allclose(theirs, log_w, rtol=rtol, atol=atol), (theirs - log_w).abs().max()


@pytest.mark.slow  # about 10 s: the paper-size model
def test_the_peer_is_scored_by_the_same_estimator_with_the_same_noise() -> None:
    """Equal weights give the same IS log-likelihood: the peer draws its noise as elbolab does."""
    _, ours, model = _twins(torch.float64)
    x = torch.bernoulli(torch.full((4, 784), 0.2, dtype=torch.float64), generator=torch.Generator().manual_seed(2))
    a = log_likelihood(ours, x, k=12, batch_size=4, chunk_size=5, seed=3)
    b = log_likelihood(model, x, k=12, batch_size=4, chunk_size=5, seed=3)
    assert torch.allclose(a.per_point, b.per_point, rtol=0, atol=1e-8)


def test_the_peer_starts_as_elbolab_does() -> None:
    """He-normal weights, pseudo-inputs from N(0.05, 0.01), the output bias at the mean image's logits."""
    peer = _peer()
    x = torch.rand(50, 784) ** 3
    torch.manual_seed(0)
    ours = build_model(preset("vampprior-paper").model, 784, train_data=x, dataset="binarized-mnist")
    model = peer.PeerHVAE(784)
    model.start_at_mean_image(x)
    assert torch.allclose(model.p_x_logits.bias, ours.likelihood.head.bias, atol=1e-5)
    for w in (model.q_z2_layers[0].h.weight, model.q_z1_joint.g.weight, model.p_x_logits.weight):
        assert abs(float(w.detach().std()) / (2.0 / w.shape[1]) ** 0.5 - 1) < 0.05  # n >= 24,000: 5% is > 5 SE
    pseudo = model.pseudo.detach()
    assert abs(float(pseudo.mean()) - 0.05) < 1e-3 and abs(float(pseudo.std()) - 0.01) < 1e-3


@pytest.mark.slow  # about 10 s: the paper-size model
def test_the_peer_adamnormgrad_step_equals_elbolabs() -> None:
    peer = _peer()
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2)]
    mine = [p.clone().requires_grad_() for p in start]
    ref = [p.clone().requires_grad_() for p in start]
    opt_peer = peer.NormGradAdam(mine, lr=5e-4, eps=1e-8)
    opt_ref = AdamNormGrad(ref, lr=5e-4, betas=(0.9, 0.999), eps=1e-8)
    for step in range(3):
        grads = [torch.randn_like(p) * 10 ** (step - 1) for p in start]
        for ps, opt in ((mine, opt_peer), (ref, opt_ref)):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            opt.step()
        for a, b in zip(mine, ref, strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-7)
    # the first step moves each entry by lr * sign-ish (m / sqrt(v) = g / |g| at t = 1): a real step
    assert not torch.equal(mine[0].detach(), start[0])


def test_the_peer_warmup_is_elbolabs() -> None:
    peer = _peer()
    for warm in (0, 1, 5, 100):
        for epoch in range(7):
            for step in (0, 1, 250, 499):
                assert peer.warmup(epoch, step, 500, warm) == kl_weight(epoch + step / 500, warm)


def test_the_peer_trains_with_that_warmup_and_continues_after_a_kill(tmp_path, monkeypatch) -> None:
    peer = _peer()
    x = torch.bernoulli(torch.full((12, 6), 0.4), generator=torch.Generator().manual_seed(0))

    def fresh():
        torch.manual_seed(3)
        return peer.PeerHVAE(6, width=4, z1=2, z2=3, components=3)

    betas = []
    real = peer.warmup

    def spy(*args):
        betas.append(real(*args))
        return betas[-1]

    monkeypatch.setattr(peer, "warmup", spy)
    whole = fresh()
    curve = peer.train(whole, x, 3, 2, seed=0, batch=4, log=lambda m: None)
    assert betas == [kl_weight(e + i / 3, 2) for e in range(3) for i in range(3)]
    assert [c[0] for c in curve] == [1, 2, 3]
    ckpt = tmp_path / "c.pt"
    first, total = {}, {}
    peer.train(fresh(), x, 1, 2, seed=0, batch=4, log=lambda m: None, checkpoint=ckpt, timing=first)  # then "killed"
    resumed = fresh()
    assert peer.train(resumed, x, 3, 2, seed=0, batch=4, log=lambda m: None, checkpoint=ckpt, timing=total) == curve
    assert 0 < first["seconds"] < total["seconds"]  # the earlier sitting's epoch counts too
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_peer_imports_only_elbolabs_data_loading_and_estimator() -> None:
    tree = ast.parse(PEER.read_text())
    used = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in used if m.startswith("elbolab")} == {"elbolab.data", "elbolab.evaluation"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_peers_mixture_density_equals_the_per_component_gaussian(dtype) -> None:
    """The expanded-square mixture density (two products, no [..., C, D] tensor) against the
    direct per-component form in float64, with log-variances over the whole hardtanh range."""
    peer = _peer()
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(7, 5, 40, generator=g, dtype=torch.float64)
    mean = 2 * torch.randn(30, 40, generator=g, dtype=torch.float64)
    log_var = torch.empty(30, 40, dtype=torch.float64).uniform_(-6.0, 2.0, generator=g)
    direct = peer.log_normal(z.unsqueeze(-2), mean, log_var)
    fast = peer.mixture_components(z.to(dtype), mean.to(dtype), log_var.to(dtype))
    assert fast.shape == (7, 5, 30) and fast.dtype == dtype
    # float32: the inputs' own rounding, relative to the largest density
    tol = 1e-9 if dtype == torch.float64 else 1e-6 * direct.abs().max().item()
    assert torch.allclose(fast.double(), direct, rtol=0, atol=tol), (fast.double() - direct).abs().max()
