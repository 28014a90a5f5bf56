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


def _twins(latent: int, data_dim: int = 784, hidden: int = 200):
    """elbolab's one-layer model and the peer's, with the same float64 weights."""
    peer = _peer()
    torch.manual_seed(0)
    ours = build_model(RunConfig().with_overrides({"model.hidden": [hidden, hidden], "model.latent_dim": latent}).model,
                       data_dim)
    model = peer.PeerVAE(data_dim, hidden=hidden, latent=latent).double()
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


def test_elbolabs_step_and_the_peers_train_alike_on_the_same_weights_batches_and_noise(one_thread) -> None:
    """The surgery row's training, step by step: elbolab's objective, autograd and (fused) Adam
    against the peer's loop with torch's plain Adam, fed the same weights, images and noise. Equal
    parameters after 30 steps leave only the random draws to tell the two trainings apart."""
    from elbolab.distributions import noise_source
    from elbolab.objectives import make_objective
    from elbolab.optimizers import make_optimizer
    from elbolab.reproduce.tables import get_table, row_config
    from elbolab.training.step import take_step

    peer, ours, model = _twins(10, data_dim=64, hidden=32)  # float64: equal sums round alike
    table = get_table("surgery-table")
    cfg = row_config(table, table.row("mnist-vae-10latents"), "quick").config
    opt_ours = make_optimizer(ours, cfg.train, torch.device("cpu"))
    objective = make_objective(cfg.objective)
    opt_peer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    assert (cfg.train.lr, cfg.train.adam_betas, cfg.train.adam_eps, cfg.train.batch_size) == (1e-3, (0.9, 0.999),
                                                                                              1e-8, 100)
    g = torch.Generator().manual_seed(0)
    grey = torch.rand(50, 64, generator=g, dtype=torch.float64) ** 3
    for _ in range(30):
        x = torch.bernoulli(grey[torch.randint(0, 50, (20,), generator=g)], generator=g)
        eps = torch.randn(1, 20, 10, generator=g, dtype=torch.float64)
        with noise_source(lambda shape, dtype, device, eps=eps: eps.reshape(shape).to(dtype)):
            _, bound_sum, taken = take_step(ours, opt_ours, objective, x)
        b = peer.bound(model.log_weights_from_noise(x, eps), "vae")
        opt_peer.zero_grad()
        (-b.mean()).backward()
        opt_peer.step()
        assert taken and bound_sum == pytest.approx(float(b.detach().sum()), rel=1e-7)  # read back in float32
    w = ours.encoder_head.linear.weight
    for mine, theirs in ((ours.encoder[0].weight, model.enc[0].weight), (ours.decoder[2].weight, model.dec[2].weight),
                         (ours.likelihood.head.bias, model.dec[4].bias), (w[:10], model.enc_mean.weight),
                         (w[10:], model.enc_log_var.weight)):
        assert torch.allclose(mine, theirs, rtol=0, atol=1e-9), float((mine - theirs).abs().max())


def test_the_peer_parses_seed_lists() -> None:
    peer = _peer()
    assert peer.parse_seeds("0-3") == [0, 1, 2, 3]
    assert peer.parse_seeds("5,1-2,5") == [5, 1, 2]
    for bad in ("a", "1-x", ""):
        with pytest.raises(Exception, match="--seeds"):
            peer.parse_seeds(bad)


def test_the_peer_over_seeds_records_their_mean_and_spread(tmp_path, monkeypatch) -> None:
    import json
    import statistics

    peer = _peer()
    values = {3: -107.0, 4: -106.5, 5: -107.3}

    class Data:
        data_dim = 784

        def as_float(self, split):
            return torch.zeros(2, 784)

    def run_seed(row, budget, data, x_train, seed, out, k_eval):
        return {"value": values[seed], "stderr": 0.1 + seed / 100, "curve": [[1, float(seed)]], "n_images": 60000,
                "train_seconds": 1.0, "eval_seconds": 2.0}

    monkeypatch.setattr(peer, "load", lambda name, data_dir: Data())
    monkeypatch.setattr(peer, "run_seed", run_seed)
    assert peer.main(["mnist-vae-10latents", "--seeds", "3-5", "--results", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "surgery-table" / "quick" / "peer.json").read_text())["rows"]["mnist-vae-10latents"]
    assert row["value"] == pytest.approx(statistics.fmean(values.values()), abs=1e-4)
    assert row["seed_sd"] == pytest.approx(statistics.stdev(values.values()), abs=1e-4)
    assert row["seeds"] == {"3": -107.0, "4": -106.5, "5": -107.3} and row["stderr"] == pytest.approx(0.14)
    assert row["curve"] == [[1, 3.0]] and row["train_seconds"] == 3.0 and "--seeds 3-5" in row["command"]
    assert peer.main(["mnist-vae-10latents", "--seed", "4", "--results", str(tmp_path), "--again"]) == 0
    row = json.loads((tmp_path / "surgery-table" / "quick" / "peer.json").read_text())["rows"]["mnist-vae-10latents"]
    assert row["value"] == -106.5 and "seed_sd" not in row and "seeds" not in row


def test_the_peer_gap_counts_the_spread_of_training_when_the_peer_ran_several_seeds() -> None:
    """One training run of ours against the peer's: on the same images their difference spreads as
    training does from seed to seed, not only by the images' Monte Carlo error (the surgery row's
    0.5-nat "gap" at the quick budget was two seeds a side, 0.25 nats apart run to run)."""
    from elbolab.reproduce.output import Cell, _peer_cell, _peer_gap, peer_gap_stderr

    ours = Cell(paper=-88.95, paper_verified=True, ours=-107.49, ours_stderr=None, difference=-18.54)
    one_seed = {"value": -106.94, "stderr": 0.13}
    assert peer_gap_stderr(ours, one_seed) == pytest.approx(0.13) and _peer_gap(ours, one_seed)
    values = [-106.94, -106.88, -107.19, -106.94, -107.14, -107.59, -106.86, -107.02]
    mean, sd = sum(values) / 8, float(torch.tensor(values).std())
    seeds = {"value": mean, "stderr": 0.13, "seeds": {str(i): v for i, v in enumerate(values)}, "seed_sd": sd}
    assert peer_gap_stderr(ours, seeds) == pytest.approx(math.sqrt(0.13**2 + sd**2 * (1 + 1 / 8)))
    assert not _peer_gap(ours, seeds)  # 0.30 nats apart, 3 standard errors are 0.8
    assert _peer_gap(ours, {**seeds, "value": mean + 1.5})  # a real defect is still flagged
    assert _peer_cell(seeds) == f"{mean:.2f} ± 0.13 (8 seeds, sd {sd:.2f})"
    assert _peer_cell(one_seed) == "-106.94 ± 0.13"
