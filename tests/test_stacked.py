"""Stacked runs: S runs trained as one model end with the bits of each run trained alone.

The truth each stacked run is checked against is the same config trained alone (a loop of one
run: the plain step on torch's global stream) in its own folder: final and best weights (file
bytes), metrics (less wall-clock seconds) and the whole last checkpoint (model, optimizer state,
position, every RNG stream).
Tiny models on the embedded data, one thread, two short epochs with mid-epoch checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainhelp import fit

from elbolab.config import ConfigError, RunConfig
from elbolab.data import load
from elbolab.models import build_model
from elbolab.models.stacked import TAIL_SENSITIVE, _plain, batched_agrees, stack_models
from elbolab.runs import load_checkpoint
from elbolab.sweep import expand, load_config_with_sweep, parse_sweep
from elbolab.training import Loop, RunState, check_stackable, pack, stack_refusal

pytestmark = pytest.mark.usefixtures("restore_threads")

#: 2 epochs x 10 batches; checkpoints at steps 7, 10 (epoch end), 14, 20; validation every epoch
BASE = {"model.hidden": [40], "model.latent_dim": 8, "objective.k": 2, "train.epochs": 2, "train.batch_size": 1000,
        "train.progress": False, "train.checkpoint_minutes": 0, "train.checkpoint_steps": 7, "train.threads": 1}

#: one stack: seeds, objectives (PIWAE takes the routed-gradient path), KL warm-up, learning rates,
#: and a run that ends an epoch early (the stack goes on without it)
VARIANTS = [
    {"train.seed": 0},
    {"train.seed": 1, "objective.name": "vae", "train.lr": 3e-4, "objective.warmup_epochs": 1},
    {"train.seed": 2, "objective.name": "piwae", "objective.k": 1, "objective.m": 2, "train.epochs": 1},
]


def config(**overrides) -> RunConfig:
    return RunConfig().with_overrides({**BASE, **overrides})


def outcome(run: Path) -> tuple[bytes, bytes, list[dict]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
        r.pop("monitor_seconds", None)
    return (run / "model.safetensors").read_bytes(), (run / "best.safetensors").read_bytes(), rows


def same(a, b) -> bool:
    """Equal to the bit: tensors by dtype, shape and value; containers recursively."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture(scope="module")
def data():
    return load("binarized-mnist-embedded")


@pytest.fixture(scope="module")
def singles(tmp_path_factory, data) -> list[Path]:
    """Each variant trained alone (a loop of one run, the plain step)."""
    root = tmp_path_factory.mktemp("singles")
    out = []
    for i, v in enumerate(VARIANTS):
        fit(RunState(config(**v), root / f"run{i}", data))
        out.append(root / f"run{i}")
    return out


def assert_same_run(stacked: Path, single: Path) -> None:
    assert outcome(stacked) == outcome(single), f"{stacked.name}: weights or metrics differ from the run alone"
    assert same(load_checkpoint(stacked / "checkpoint.pt"), load_checkpoint(single / "checkpoint.pt")), \
        f"{stacked.name}: checkpoint (optimizer state, RNG streams, position) differs"


def test_stacked_runs_equal_runs_alone_bit_for_bit(tmp_path, data, singles):
    runs = [(config(**v), tmp_path / f"run{i}") for i, v in enumerate(VARIANTS)]
    outcomes = Loop(runs, data).fit()
    assert [o.status for o in outcomes] == ["finished"] * len(VARIANTS)
    for (_, run), single in zip(runs, singles, strict=True):
        assert_same_run(run, single)


def test_monitored_stacked_runs_log_what_each_run_alone_logs(tmp_path, data):
    """The collapse monitor reads each run's own weights inside a stack: its per-unit KL, active
    units and I(x;z) rows (and the weights) equal those of the run trained alone with it."""
    from elbolab.diagnostics.monitor import run_monitor

    cfgs = [config(**{**v, "train.monitor_every": 1, "train.monitor_points": 64}) for v in VARIANTS[:2]]
    for i, c in enumerate(cfgs):
        fit(RunState(c, tmp_path / f"alone{i}", data, run_monitor(c, data)))
    Loop([(c, tmp_path / f"stack{i}") for i, c in enumerate(cfgs)], data, run_monitor).fit()
    for i in range(2):
        rows = outcome(tmp_path / f"stack{i}")[2]
        assert all("active_units" in r for r in rows), rows
        assert_same_run(tmp_path / f"stack{i}", tmp_path / f"alone{i}")
    assert outcome(tmp_path / "stack0")[2] != outcome(tmp_path / "stack1")[2]


def test_runs_at_different_points_are_brought_level(tmp_path, data, singles):
    """A stack put together from a run stopped after 3 steps and two fresh ones ends as each alone."""
    runs = [(config(**v), tmp_path / f"run{i}") for i, v in enumerate(VARIANTS)]
    early = Loop([runs[0]], data)
    early.request_stop("test")  # checkpoint after the first step and stop, as Ctrl-C does
    with pytest.raises(KeyboardInterrupt):
        early.fit()
    assert load_checkpoint(runs[0][1] / "checkpoint.pt")["step"] == 1
    outcomes = Loop(runs, data).fit()
    assert [o.status for o in outcomes] == ["finished"] * len(VARIANTS)
    for (_, run), single in zip(runs, singles, strict=True):
        assert_same_run(run, single)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_diverging_run_is_reported_and_leaves_the_others_exact(tmp_path, data, singles, policy):
    """Policy: the diverging run is handled by its own train.nonfinite (stopped at once, or after
    max_nonfinite_skips skipped steps); its folder says failed with the error; the other runs
    continue and end bit-identical to their runs alone."""
    bad = config(**{"train.seed": 5, "train.lr": 1e30, "train.nonfinite": policy, "train.max_nonfinite_skips": 2})
    alone = tmp_path / "bad-alone"
    with pytest.raises(FloatingPointError) as err:
        fit(RunState(bad, alone, data))
    runs = [(config(**VARIANTS[0]), tmp_path / "run0"), (bad, tmp_path / "bad"),
            (config(**VARIANTS[1]), tmp_path / "run1")]
    outcomes = Loop(runs, data).fit()
    assert [o.status for o in outcomes] == ["finished", "failed", "finished"]
    assert outcomes[1].error == str(err.value), "the stacked run stops where and as the run alone does"
    info = json.loads((tmp_path / "bad" / "run.json").read_text())
    assert info["status"] == "failed" and "non-finite" in info["error"]
    assert_same_run(tmp_path / "run0", singles[0])
    assert_same_run(tmp_path / "run1", singles[1])


def test_detached_estimators_stack_on_the_two_layer_model(tmp_path, data):
    """STL and DReG (the routed multi-layer form) share a stack; each run matches its run alone."""
    cfgs = [config(**{"model.name": "two-layer", "model.two_layer.latent_dims": [8, 4], "model.two_layer.hidden1": [40],
                      "model.two_layer.hidden2": [20], "train.epochs": 1, "train.seed": s, "objective.estimator": e})
            for s, e in ((0, "stl"), (1, "dreg"))]
    for i, c in enumerate(cfgs):
        fit(RunState(c, tmp_path / f"alone{i}", data))
    Loop([(c, tmp_path / f"stack{i}") for i, c in enumerate(cfgs)], data).fit()
    for i in range(2):
        assert_same_run(tmp_path / f"stack{i}", tmp_path / f"alone{i}")


def test_stacked_products_and_runwise_tails_on_odd_shapes(one_thread):
    """Odd sizes: batched GEMMs that round unlike the plain ones fall back slice by slice, and
    softplus / elu (scalar loop tails) run run by run: gradients of one step equal the runs alone."""
    from elbolab.distributions import noise_source
    from elbolab.models.stacked import RunwiseTails, run_noise
    from elbolab.objectives import estimate, estimate_from_terms, objective_plan
    from elbolab.training.step import _split_runs

    x_all = load("binarized-mnist-embedded").as_float("train")
    for act in ("softplus", "elu"):
        cfg = RunConfig().with_overrides({"model.hidden": [30], "model.latent_dim": 5, "model.activation": act})
        plan, est = objective_plan(cfg.objective)
        xs = [x_all[7 * s: 7 * s + 7] for s in range(3)]
        alone, members, gens = [], [], []
        for s in range(3):
            torch.manual_seed(s)
            m = build_model(cfg.model, 784, x_all)
            res = estimate(m, xs[s], plan, est)
            res.loss.backward()
            alone.append((res, {n: p.grad for n, p in m.named_parameters()}))
            torch.manual_seed(s)
            members.append(build_model(cfg.model, 784, x_all))
            gens.append(torch.Generator().manual_seed(0))
            gens[-1].set_state(torch.get_rng_state())
        stacked = stack_models(members)
        with noise_source(run_noise(gens)), RunwiseTails(3):
            terms = stacked.log_weight_terms(torch.stack(xs), plan.n_samples)
        results = [estimate_from_terms(stacked, t, plan, est) for t in _split_runs(terms, 3)]
        torch.autograd.backward([r.loss for r in results])
        for s, (res, grads) in enumerate(alone):
            assert torch.equal(results[s].bound, res.bound)
            for n, p in stacked.named_parameters():
                assert torch.equal(p.grad[s], grads[n]), f"{act}: gradient of {n}, run {s}"


def test_fallback_products_are_the_plain_ones():
    """Where batched and plain products disagree (here a 7-row, 5-wide one), the fallback is exact."""
    a, b, c = torch.randn(3, 7, 30), torch.randn(3, 5, 30), torch.randn(3, 5)
    plain = _plain("fwd", a, b, c)
    for i in range(3):
        assert torch.equal(plain[i], torch.addmm(c[i].clone(), a[i].clone(), b[i].clone().t()))
    assert isinstance(batched_agrees("fwd", 3, 7, 30, 5, torch.float32, torch.device("cpu")), bool)
    assert torch.sigmoid in TAIL_SENSITIVE


def test_pack_and_refusals():
    cfgs = [config(**{"train.seed": s, "objective.k": k}) for k in (2, 5) for s in (0, 1)]
    cfgs.append(config(**{"train.compile": True}))
    assert pack(cfgs) == [[0, 1], [2, 3], [4]]
    # miwae(m=2, k=1) draws 2 per point, as iwae k=2: one stack
    assert pack([config(), config(**{"objective.name": "miwae", "objective.k": 1, "objective.m": 2})]) == [[0, 1]]
    # the standard estimator and STL detach log q differently: not one stack
    assert pack([config(), config(**{"objective.estimator": "stl"})]) == [[0], [1]]
    with pytest.raises(ConfigError, match="model.latent_dim"):
        check_stackable([config(), config(**{"model.latent_dim": 9})])
    # a prior with its own parameters (VampPrior's pseudo-inputs) trains alone, not in a failing stack
    vamp = [config(**{"model.prior.name": "vampprior", "train.seed": s}) for s in (0, 1)]
    assert pack(vamp) == [[0], [1]] and "prior." in (stack_refusal(vamp[0]) or "")
    assert stack_refusal(config()) is None
    with pytest.raises(ValueError, match="not in a Linear layer"):
        stack_models([build_model(RunConfig().with_overrides({"model.prior.name": "mog"}).model, 784)] * 2)


def test_sweep_grid_names_and_config_section(tmp_path):
    sweep = parse_sweep(["train.seed=0,1", "model.hidden=[200,200],[50]"])
    assert sweep == {"train.seed": [0, 1], "model.hidden": [[200, 200], [50]]}
    runs = expand(RunConfig(), sweep)
    assert [n for n, _ in runs] == ["seed=0,hidden=[200,200]", "seed=0,hidden=[50]", "seed=1,hidden=[200,200]",
                                    "seed=1,hidden=[50]"]
    assert runs[3][1].model.hidden == (50,) and runs[3][1].train.seed == 1
    f = tmp_path / "c.yaml"
    f.write_text("objective:\n  k: 3\nsweep:\n  train.seed: [4, 5]\n")
    cfg, sw = load_config_with_sweep(f)
    assert cfg.objective.k == 3 and sw == {"train.seed": [4, 5]}
    with pytest.raises(ConfigError, match="--sweep"):
        parse_sweep(["train.seed"])
    f.write_text("sweep:\n  train.seed: 4\n")
    with pytest.raises(ConfigError, match="non-empty list"):
        load_config_with_sweep(f)


def test_a_sweep_names_its_diverging_run_and_exits_3(tmp_path, capsys):
    """`train --sweep`: the run whose learning rate diverges is named on stderr and the command exits
    3 (numerical fault); the other run finishes with the bits of the same config trained alone."""
    from elbolab.cli import main

    args = [a for k, v in {**BASE, "train.epochs": 1}.items()
            for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, list) else v}")]
    assert main(["train", "--no-eval", "--out", str(tmp_path / "sweep"), *args,
                 "--sweep", "train.lr=0.001,1e30", "--set", "train.nonfinite=stop"]) == 3
    names = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"]
    good, bad = names
    err = capsys.readouterr().err
    assert "numerical fault" in err and f"{bad}:" in err and f"{good}:" not in err, err
    assert json.loads((tmp_path / "sweep" / bad / "run.json").read_text())["status"] == "failed"
    assert main(["train", "--no-eval", "--out", str(tmp_path / "alone"), *args, "--set", "train.lr=0.001"]) == 0
    assert_same_run(tmp_path / "sweep" / good, tmp_path / "alone")


def test_a_sweep_resumes_with_only_result_free_changes(tmp_path, capsys):
    """`train --resume SWEEP` takes the --set keys a run's resume takes (progress, threads, eval ...)
    and refuses, naming the key, one that would change what a run trains."""
    from elbolab.cli import main

    args = [a for k, v in {**BASE, "train.epochs": 1}.items()
            for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, list) else v}")]
    sweep = tmp_path / "sweep"
    assert main(["train", "--no-eval", "--out", str(sweep), *args, "--sweep", "train.seed=0,1"]) == 0
    weights = [(sweep / n / "model.safetensors").read_bytes() for n in ("seed=0", "seed=1")]
    assert main(["train", "--no-eval", "--resume", str(sweep), "--set", "train.lr=0.5"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main(["train", "--no-eval", "--resume", str(sweep), "--set", "train.progress=false",
                 "--set", "eval.k_importance=7"]) == 0
    assert [(sweep / n / "model.safetensors").read_bytes() for n in ("seed=0", "seed=1")] == weights
