"""The equal-budget peer (benchmarks/peer/iwae_peer.py): independent of elbolab's models,
objectives and trainer, and computing the same bound as elbolab on the same weights and noise."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from scripthelp import load_script

from elbolab.bounds import elbo, iwae
from elbolab.config import RunConfig
from elbolab.models import build_model

PEER = Path(__file__).resolve().parents[1] / "benchmarks" / "peer" / "iwae_peer.py"


def _peer():
    return load_script("benchmarks/peer/iwae_peer.py")


def test_the_peer_imports_only_elbolabs_data_loading_and_estimator() -> None:
    tree = ast.parse(PEER.read_text())
    used = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in used if m.startswith("elbolab")} == {"elbolab.data", "elbolab.evaluation"}


def _twins(latent: int):
    """elbolab's one-layer model and the peer's, with the same float64 weights."""
    peer = _peer()
    torch.manual_seed(0)
    ours = build_model(RunConfig().with_overrides({"model.hidden": [200, 200], "model.latent_dim": latent}).model, 784)
    model = peer.PeerVAE(784, latent=latent).double()
    ours.double()
    with torch.no_grad():  # copy our weights into the peer, layer by layer
        for mine, theirs in ((model.enc[0], ours.encoder[0]), (model.enc[2], ours.encoder[2]),
                             (model.dec[0], ours.decoder[0]), (model.dec[2], ours.decoder[2]),
                             (model.dec[4], ours.likelihood.head)):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
        w, b = ours.encoder_head.linear.weight, ours.encoder_head.linear.bias
        model.enc_mean.weight.copy_(w[:latent]), model.enc_mean.bias.copy_(b[:latent])
        model.enc_log_var.weight.copy_(w[latent:]), model.enc_log_var.bias.copy_(b[latent:])
    return peer, ours, model


@pytest.mark.parametrize("objective", ["vae", "iwae"])
def test_the_peer_bound_equals_elbolabs_on_the_same_weights_and_noise(objective: str) -> None:
    peer, ours, model = _twins(50)
    with torch.no_grad():
        x = torch.bernoulli(torch.full((4, 784), 0.3, dtype=torch.float64))
        eps = torch.randn(5, 4, 50, dtype=torch.float64)
        theirs = model.log_weights_from_noise(x, eps)
        q = ours.posterior(x)
        z = q.mean + torch.exp(0.5 * q.log_var) * eps
        log_w = ours.log_p_x_given_z(x, z) + ours.log_p_z(z) - q.log_prob(z)
    assert torch.allclose(theirs, log_w, atol=1e-9)
    expected = iwae(log_w) if objective == "iwae" else elbo(log_w)
    assert torch.allclose(peer.bound(theirs, objective), expected, atol=1e-9)
    if objective == "iwae":  # and it is the log mean exp, not the mean
        assert torch.allclose(peer.bound(theirs, "iwae"), torch.logsumexp(log_w, 0) - math.log(5), atol=1e-12)


def test_the_peer_schedule_is_the_papers(monkeypatch) -> None:
    peer = _peer()
    model = peer.PeerVAE(6, hidden=4, latent=2)
    lrs = []
    real = torch.optim.Adam.step

    def spy(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    curve = peer.train(model, torch.rand(40, 6), "iwae", 2, passes=3, seed=0, batch=20, log=lambda m: None)
    assert [c[0] for c in curve] == list(range(1, 14))  # 1 + 3 + 9 epochs
    assert lrs[:2] == [1e-3] * 2 and lrs[2:8] == [pytest.approx(1e-3 * 10 ** (-1 / 7))] * 6
    assert lrs[8:] == [pytest.approx(1e-3 * 10 ** (-2 / 7))] * 18


def test_a_killed_peer_continues_from_its_last_epoch_as_if_never_stopped(tmp_path) -> None:
    peer = _peer()
    x = torch.rand(40, 6)

    def fresh():
        torch.manual_seed(3)
        return peer.PeerVAE(6, hidden=4, latent=2)

    whole = fresh()
    curve = peer.train(whole, x, "iwae", 2, passes=2, seed=0, log=lambda m: None)
    part = fresh()
    ckpt = tmp_path / "c.pt"
    peer.train(part, x, "iwae", 2, passes=1, seed=0, log=lambda m: None, checkpoint=ckpt)  # epoch 1, then "killed"
    resumed = fresh()
    again = peer.train(resumed, x, "iwae", 2, passes=2, seed=0, log=lambda m: None, checkpoint=ckpt)
    assert again == curve
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_peer_surgery_elbo_is_elbolabs() -> None:
    """The same terms on the same noise, and the same estimate within Monte Carlo error (4 standard errors)."""
    from elbolab.diagnostics.surgery import analytic_kl, elbo_surgery

    peer, ours, model = _twins(10)
    torch.manual_seed(1)
    x = torch.bernoulli(torch.full((300, 784), 0.2, dtype=torch.float64))
    eps = torch.randn(1, 300, 10, dtype=torch.float64)
    with torch.no_grad():
        log_px, kl = model.elbo_terms(x, eps)
        q = ours.posterior(x)
        z = q.mean + torch.exp(0.5 * q.log_var) * eps
        assert torch.allclose(log_px, ours.log_p_x_given_z(x, z), atol=1e-9)
        assert torch.allclose(kl, analytic_kl(ours.prior, q).double(), atol=1e-9)
    value, stderr = peer.surgery_elbo(model, x, seed=5)
    theirs = elbo_surgery(ours, x, seed=2).elbo
    assert abs(value - theirs) < 4 * math.sqrt(2) * stderr and 0 < stderr < 5


def test_the_peer_starts_its_decoder_at_the_mean_image_as_elbolab_does() -> None:
    peer = _peer()
    x = torch.rand(50, 784) ** 3
    torch.manual_seed(0)
    ours = build_model(RunConfig().model, 784, train_data=x)
    model = peer.PeerVAE(784)
    model.start_at_mean_image(x)
    assert torch.allclose(model.dec[-1].bias, ours.likelihood.head.bias, atol=1e-5)
