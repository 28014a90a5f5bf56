"""Live collapse monitoring: the numbers against closed forms and quadrature, and the trainer
logging them to metrics.jsonl, TensorBoard and W&B (offline) without changing what it trains."""

from __future__ import annotations

import copy
import json
import math
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from trainhelp import fit

from elbolab.cli import main
from elbolab.config import ModelConfig, RunConfig
from elbolab.data import ImageDataset
from elbolab.diagnostics.active_units import active_units
from elbolab.diagnostics.monitor import CollapseMonitor, collapse_metrics, per_unit_kl
from elbolab.diagnostics.surgery import elbo_surgery
from elbolab.models import build_model
from elbolab.priors import MixtureOfGaussians
from elbolab.training import RunState

ACTIVE, COLLAPSED = [0, 1], [2, 3]


def collapsed_model(seed: int = 0):
    """A one-layer model (4 latents) whose units 2 and 3 are forced to the prior, q = N(0, 1)
    for every x, and whose units 0 and 1 have means that vary with x and std exp(-1)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(latent_dim=4, hidden=(16,)), 20).double().eval()
    lin = model.encoder_head.linear  # rows: 4 means, then 4 log-variances
    with torch.no_grad():
        lin.weight[:4].mul_(3.0)
        lin.weight[2:4].zero_()  # units 2 and 3 (COLLAPSED); a slice, so zero_ writes the weights
        lin.bias[2:4].zero_()
        lin.weight[4:].zero_()
        lin.bias[4:] = torch.tensor([-2.0, -2.0, 0.0, 0.0], dtype=torch.float64)
    return model


def binary_data(n: int, dim: int = 20, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, dim), 0.5, dtype=torch.float64), generator=g)


def mi_by_quadrature(means: np.ndarray, std: float, half_width: float = 7.0, points: int = 281) -> float:
    """I[i; z] = (1/N) sum_i int q_i log(q_i / qbar) over a 2-D grid, float64: for N Gaussians
    of one shared isotropic std (the collapsed units cancel from the ratio)."""
    lo, hi = means.min(0) - half_width * std, means.max(0) + half_width * std
    axes = [np.linspace(lo[d], hi[d], points) for d in range(2)]
    cell = (axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0])
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)  # [G, 2]
    sq = ((grid[None] - means[:, None]) ** 2).sum(-1)  # [N, G]
    log_q = -sq / (2 * std**2) - np.log(2 * np.pi * std**2)
    q = np.exp(log_q)
    assert np.allclose(q.sum(1) * cell, 1.0, atol=1e-6)  # the grid holds every posterior's mass
    log_qbar = np.log(q.mean(0))
    return float((q * (log_q - log_qbar[None])).sum(1).mean() * cell)


def test_collapsed_units_have_zero_kl_are_not_active_and_mi_matches_quadrature():
    model, x = collapsed_model(), binary_data(300)
    m = collapse_metrics(model, x, threshold=0.01, seed=3)
    with torch.no_grad():
        q = model.posterior(x)
    # per-unit KL against the closed form KL(N(m, v) || N(0, 1)), computed here independently
    mean, var = q.mean.numpy(), np.exp(q.log_var.numpy())
    kl_truth = (0.5 * (mean**2 + var - 1 - np.log(var))).mean(0)
    kl = np.array(m["kl_per_unit"])
    assert kl[COLLAPSED].tolist() == [0.0, 0.0]
    assert np.allclose(kl, kl_truth, rtol=1e-5, atol=1e-6) and (kl[ACTIVE] > 0.1).all()
    # active units: the covariance over x of the exact means, counted against the threshold
    assert np.cov(mean[:, ACTIVE].T).diagonal().min() > 0.05
    assert m["active_units"] == 2 and m["active_units_per_layer"] == [2]
    # I[i; z] within 4 of its standard errors of the quadrature value (quadrature error < 1e-5)
    truth = mi_by_quadrature(mean[:, ACTIVE], std=math.exp(-1.0))
    assert 0.5 < truth < math.log(300) - 0.5  # neither collapsed nor saturated: a test that can fail
    assert abs(m["mutual_information"] - truth) < 4 * m["mutual_information_stderr"]
    # and within error of ELBO surgery's estimate on the same points
    s = elbo_surgery(model, x, samples=4, seed=5)
    assert abs(m["mutual_information"] - s.mutual_information) < 4 * math.hypot(
        m["mutual_information_stderr"], s.mutual_information_stderr)


def test_fully_collapsed_encoder_has_zero_mi():
    model, x = collapsed_model(), binary_data(50)
    with torch.no_grad():
        model.encoder_head.linear.weight.zero_()
    m = collapse_metrics(model, x)
    # every posterior is the same Gaussian: log q(z|x_i) = log q(z) exactly, term by term
    assert abs(m["mutual_information"]) < 1e-9 and m["active_units"] == 0


def test_per_unit_kl_under_a_mixture_prior_matches_quadrature():
    torch.manual_seed(0)
    prior = MixtureOfGaussians(3, components=4).double()
    q_mean = torch.tensor([[0.3, -1.0, 2.0], [1.5, 0.2, -0.4]], dtype=torch.float64)
    q_log_var = torch.tensor([[-1.0, 0.5, -2.0], [0.0, -0.5, -1.5]], dtype=torch.float64)
    samples = 4000
    torch.manual_seed(1)
    kl = per_unit_kl(prior, q_mean, q_log_var, samples=samples).numpy()
    comp, log_w = prior.components()
    cm, cv = comp.mean.detach().numpy(), np.exp(comp.log_var.detach().numpy())
    log_w = log_w.detach().numpy()
    for u in range(3):
        kls, variances = [], []
        for i in range(2):
            m, v = q_mean[i, u].item(), math.exp(q_log_var[i, u].item())
            z = np.linspace(m - 12 * math.sqrt(v), m + 12 * math.sqrt(v), 20001)  # q's mass, in log space
            log_q = -(z - m) ** 2 / (2 * v) - 0.5 * math.log(2 * math.pi * v)
            log_p = logsumexp(log_w[:, None] - (z - cm[:, u, None]) ** 2 / (2 * cv[:, u, None])
                              - 0.5 * np.log(2 * np.pi * cv[:, u, None]), axis=0)
            q, r, dz = np.exp(log_q), log_q - log_p, z[1] - z[0]
            assert abs(q.sum() * dz - 1) < 1e-9
            kls.append((q * r).sum() * dz)
            variances.append((q * r**2).sum() * dz - kls[-1] ** 2)
        stderr = math.sqrt(sum(variances) / samples) / 2  # of the mean over the 2 points
        assert abs(kl[u] - np.mean(kls)) < 4 * stderr, (u, kl[u], np.mean(kls), stderr)


def small_cfg(**over) -> RunConfig:
    base = {"model.hidden": [16], "model.latent_dim": 3, "train.epochs": 3, "train.batch_size": 50,
            "train.progress": False, "train.threads": 1, "train.monitor_every": 2, "train.monitor_points": 40,
            "data.name": "user"}
    return RunConfig().with_overrides({**base, **over})


def tiny_dataset() -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    splits = {s: torch.bernoulli(torch.full((n, 36), 0.3), generator=g).to(torch.uint8)
              for s, n in (("train", 200), ("valid", 60), ("test", 60))}
    return ImageDataset("user", splits, (6, 6), True)


def test_monitored_training_logs_every_n_epochs_and_the_last_and_trains_the_same(tmp_path):
    cfg, ds = small_cfg(), tiny_dataset()
    mon = CollapseMonitor.for_run(cfg, ds)
    assert mon.split == "valid" and mon.x.shape == (40, 36) and mon.every == 2
    with_mon = RunState(cfg, tmp_path / "a", ds, mon)
    fit(with_mon)
    without = RunState(cfg, tmp_path / "b", ds)
    fit(without)
    # the monitor draws from its own seeded stream: the two runs are bit-identical
    for (name, p), q in zip(with_mon.model.state_dict().items(), without.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert ["active_units" in r for r in rows] == [False, True, True]  # epochs 2 (every 2) and 3 (the last)
    assert all("active_units" not in json.loads(line)
               for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())
    # the last row is the monitor's numbers for the final weights
    again = collapse_metrics(with_mon.model, mon.x, mon.threshold, seed=mon.seed)
    logged = {k: v for k, v in rows[-1].items() if k in again}
    assert logged == again
    assert len(rows[-1]["kl_per_unit"]) == 3 and 0 <= rows[-1]["mutual_information"] <= math.log(40) + 1e-9


def test_each_logged_epoch_matches_the_offline_diagnostics_at_that_epochs_weights(tmp_path):
    """Every monitored row against what `elbolab diagnose` computes (active_units, ELBO surgery)
    afterwards, on the monitor's subsample, with a copy of the weights the trainer had at that epoch."""
    cfg, ds = small_cfg(**{"train.epochs": 4, "train.monitor_points": 60, "train.lr": 0.01}), tiny_dataset()
    mon = CollapseMonitor.for_run(cfg, ds)
    copies = []

    class Spy:
        every = mon.every

        def __call__(self, model):
            copies.append(copy.deepcopy(model))  # the weights this epoch's numbers describe
            return mon(model)

    fit(RunState(cfg, tmp_path / "r", ds, Spy()))
    rows = [r for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
            if "active_units" in r]
    assert [r["epoch"] for r in rows] == [2, 4] and len(copies) == 2
    kls = []
    for row, model in zip(rows, copies, strict=True):
        model.eval()
        au = active_units(model, mon.x, threshold=cfg.eval.active_unit_threshold, seed=cfg.eval.seed)
        assert (row["active_units"], row["active_units_per_layer"]) == (au.total, au.counts)
        s = elbo_surgery(model, mon.x, samples=64, seed=11)
        # ELBO surgery's average KL is closed form under the standard prior: the per-unit KLs sum to it
        assert sum(row["kl_per_unit"]) == pytest.approx(s.average_kl, abs=5e-6)
        # I(x; z): two Monte Carlo estimates of one quantity, within 4 of their joint standard errors
        assert abs(row["mutual_information"] - s.mutual_information) < 4 * math.hypot(
            row["mutual_information_stderr"], s.mutual_information_stderr)
        kls.append(s.average_kl)
    # the two epochs' weights differ enough that numbers logged from the wrong epoch would fail above
    assert abs(kls[0] - kls[1]) > 100 * 5e-6


@pytest.mark.parametrize("prior", ["standard", "vampprior"])
def test_tensorboard_gets_grouped_numbers_a_kl_histogram_and_the_figures(tmp_path, prior):
    """Tags in groups (bounds/, monitor/, train/, time/), the per-unit KL as one histogram rather
    than a scalar per unit, and at the monitor's epochs (2 and the last, 3) the figures diagnose
    draws; the run trains bit for bit as one without TensorBoard."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    over = {"model.prior.name": prior, "model.prior.components": 4}
    cfg, ds = small_cfg(**over, **{"train.tensorboard": True}), tiny_dataset()
    fit(RunState(cfg, tmp_path / "r", ds, CollapseMonitor.for_run(cfg, ds)))
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    series = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in tags["scalars"]}
    assert {t.split("/")[0] for t in series} == {"bounds", "monitor", "train", "time"}, sorted(series)
    assert not any("kl_per_unit" in t for t in series), "one histogram, not a scalar per unit"
    monitored = {r["epoch"]: r for r in rows if "active_units" in r}
    assert sorted(monitored) == [2, 3]
    assert series["monitor/active_units"] == {e: r["active_units"] for e, r in monitored.items()}
    for r in rows:
        assert series["bounds/train_bound"][r["epoch"]] == pytest.approx(r["train_bound"], rel=1e-6)
        assert series["train/lr"][r["epoch"]] == pytest.approx(r["lr"], rel=1e-6)
    for e, r in monitored.items():
        assert series["monitor/mutual_information"][e] == pytest.approx(r["mutual_information"], rel=1e-6)
    hist = {h.step: h.histogram_value for h in acc.Histograms("monitor/kl_per_unit")}
    assert sorted(hist) == [2, 3]
    for e, h in hist.items():
        kl = monitored[e]["kl_per_unit"]
        assert (h.num, h.min, h.max) == (3, pytest.approx(min(kl), rel=1e-6), pytest.approx(max(kl), rel=1e-6))
        assert h.sum == pytest.approx(sum(kl), rel=1e-6)
    figures = {"images/monitor", "images/samples", "images/reconstructions"}
    assert set(tags["images"]) == figures | ({"images/prior_components"} if prior == "vampprior" else set())
    for tag in tags["images"]:
        shown = acc.Images(tag)
        assert [i.step for i in shown] == [2, 3] and all(i.width > 50 and i.height > 20 for i in shown), tag
    plain = small_cfg(**over)
    fit(RunState(plain, tmp_path / "p", ds, CollapseMonitor.for_run(plain, ds)))
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == (tmp_path / "p" / "model.safetensors").read_bytes()


def wandb_history(run_file: Path) -> dict[int, dict]:
    """The history rows of an offline W&B run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                out[record.history.step.num] = items
    return out


def test_wandb_offline_gets_the_monitor_numbers(tmp_path, monkeypatch, caplog):
    pytest.importorskip("wandb")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg, ds = small_cfg(**{"train.wandb": True}), tiny_dataset()
    assert cfg.train.wandb_mode == "offline"
    fit(RunState(cfg, tmp_path / "r", ds, CollapseMonitor.for_run(cfg, ds)))
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert not [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]  # the sink never dropped
    (run_file,) = (tmp_path / "r" / "wandb").glob("offline-run-*/run-*.wandb")
    # W&B's service process writes the file; on a loaded machine its last records may land just
    # after finish() returns, so wait (bounded) for them rather than read a file still being written
    for _ in range(120):
        history = wandb_history(run_file)
        if len(history) == len(rows):
            break
        time.sleep(0.5)
    assert sorted(history) == [r["epoch"] for r in rows]
    for r in rows:
        h = history[r["epoch"]]
        assert h["train_bound"] == pytest.approx(r["train_bound"], rel=1e-12)
        if "kl_per_unit" in r:
            assert [h[f"kl_per_unit/{i}"] for i in range(3)] == pytest.approx(r["kl_per_unit"], rel=1e-12)
            assert h["active_units"] == r["active_units"]
            assert h["mutual_information"] == pytest.approx(r["mutual_information"], rel=1e-12)


@pytest.mark.parametrize("key,module", [("train.tensorboard", "tensorboard"), ("train.wandb", "wandb")])
def test_a_missing_optional_package_is_one_line_before_anything_is_created(tmp_path, capsys, monkeypatch, key,
                                                                           module):
    import elbolab.preflight as preflight

    real = preflight.find_spec
    monkeypatch.setattr(preflight, "find_spec", lambda name: None if name == module else real(name))
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", f"{key}=true", "--set", "train.epochs=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pip install 'elbolab[{module}]'" in err[0] and key in err[0]
    assert not out.exists()


def test_diagnose_plots_the_monitored_epochs(tmp_path):
    cfg, ds = small_cfg(**{"train.monitor_every": 1}), tiny_dataset()
    run_dir = tmp_path / "r"
    fit(RunState(cfg, run_dir, ds, CollapseMonitor.for_run(cfg, ds)))
    import elbolab

    report = elbolab.diagnose(run_dir, ds, k=10, quiet=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert report["monitor"]["epochs"] == [1, 2, 3]
    assert report["monitor"]["active_units"] == [r["active_units"] for r in rows]
    assert (run_dir / report["figures"]["monitor"]).stat().st_size > 5000
    assert "## Collapse during training" in (run_dir / "diagnostics.md").read_text()


def test_monitor_off_and_bad_values():
    from elbolab.config import ConfigError

    assert CollapseMonitor.for_run(small_cfg(**{"train.monitor_every": 0}), tiny_dataset()) is None
    with pytest.raises(ConfigError, match="train.monitor_points"):
        small_cfg(**{"train.monitor_points": 1})
    with pytest.raises(ConfigError, match="train.wandb_mode"):
        small_cfg(**{"train.wandb_mode": "cloud"})
    # a prior with no per-unit marginal gets no per-unit KL, not a wrong one
    assert per_unit_kl(object(), torch.zeros(2, 3), torch.zeros(2, 3)) is None
