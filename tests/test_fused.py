"""The fused batch step (elbolab.fused) is the plain step's training: same gradients, noise, optimizer state."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from elbolab.config import (
    ConfigError,
    ModelConfig,
    ObjectiveConfig,
    PosteriorConfig,
    RunConfig,
    TrainConfig,
    preset,
)
from elbolab.distributions import noise_source
from elbolab.fused import FusedStep, fused_step_for, supports
from elbolab.models import build_model
from elbolab.objectives import make_objective
from elbolab.optimizers import make_optimizer
from elbolab.training import take_step

D = 12
pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {
    "one-layer": ModelConfig(name="one-layer", latent_dim=3, hidden=(7, 5)),
    "two-layer": RunConfig().with_overrides({
        "model.name": "two-layer", "model.two_layer": dict(latent_dims=[4, 3], hidden1=[7, 6], hidden2=[5, 4]),
    }).model,
}


def _model(name: str, dtype: torch.dtype = torch.float64, seed: int = 1):
    torch.manual_seed(seed)
    model = build_model(MODELS[name], D).to(dtype)
    with torch.no_grad():
        for p in model.parameters():  # away from init, so every term matters
            p.normal_(0.0, 0.5)
    return model


def _batch(dtype: torch.dtype = torch.float64, b: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(b, D, generator=g) < 0.5).to(dtype)


def _autograd(model, x, obj, k, est, beta):
    res = make_objective(ObjectiveConfig(name=obj, k=k, estimator=est))(model, x, beta)
    model.zero_grad(set_to_none=True)
    res.loss.backward()
    return res, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_equal_autograd_in_float64(name: str) -> None:
    """Every (objective, estimator, k, KL weight): the fused gradients are autograd's to 1e-12
    (float64, so a wrong term of any size shows)."""
    x = _batch()
    for obj, est, k, beta in itertools.product(("vae", "iwae"), ("standard", "stl", "dreg"), (1, 4), (1.0, 0.3)):
        model = _model(name)
        torch.manual_seed(5)
        ref_res, ref = _autograd(model, x, obj, k, est, beta)
        step = FusedStep(model, torch.optim.SGD(model.parameters(), lr=0.0), obj, k, est)
        torch.manual_seed(5)
        res, loss = step.gradients(x, beta)
        where = f"{name} {obj} {est} k={k} beta={beta}"
        for (pname, _), g, r in zip(model.named_parameters(), step.grads, ref, strict=True):
            assert torch.allclose(g, r, rtol=1e-10, atol=1e-12 * float(r.abs().max())), f"{where}: {pname}"
        assert torch.allclose(res.bound, ref_res.bound, rtol=0, atol=1e-12), where
        assert abs(float(loss) - float(ref_res.loss.detach())) < 1e-12, where
        assert torch.allclose(res.log_w, ref_res.log_w, atol=1e-12), where


def _float32_noise():
    """Noise drawn in float32 from a fixed seed and handed out in the dtype asked for, so a
    float64 reference sees the very samples of a float32 step."""
    g = torch.Generator().manual_seed(5)
    return noise_source(lambda shape, dtype, device: torch.randn(shape, generator=g).to(dtype))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("est", ["standard", "dreg"])
def test_float32_gradients_as_close_to_float64_as_autograd(name: str, est: str) -> None:
    """In float32 the fused gradients are float64's truth to float32 rounding, as autograd's own
    float32 gradients are (on the same samples)."""
    x64 = _batch()
    model64 = _model(name)
    model32 = copy.deepcopy(model64).float()
    with _float32_noise():
        _, truth = _autograd(model64, x64, "iwae", 5, est, 1.0)
    with _float32_noise():
        _, plain32 = _autograd(model32, x64.float(), "iwae", 5, est, 1.0)
    step = FusedStep(model32, torch.optim.SGD(model32.parameters(), lr=0.0), "iwae", 5, est)
    with _float32_noise():
        step.gradients(x64.float())
    for g, p, t in zip(step.grads, plain32, truth, strict=True):
        scale = float(t.abs().max())
        err_fused = float((g.double() - t).abs().max()) / scale
        err_plain = float((p.double() - t).abs().max()) / scale
        # the same samples: float32 rounding only (a few dozen ulps of the largest gradient
        # entry; the two paths round the cancelling log-variance terms differently)
        assert err_plain < 5e-6
        assert err_fused < 5e-6, (err_fused, err_plain)


def _pair(name: str, optimizer: str, obj: str = "iwae", k: int = 3, est: str = "standard"):
    """The same float32 model twice, each with its optimizer: one for the plain step, one fused."""
    cfg = TrainConfig(optimizer=optimizer, lr=1e-2)
    plain = _model(name, torch.float32)
    fused = copy.deepcopy(plain)
    opt_p, opt_f = make_optimizer(plain, cfg, "cpu"), make_optimizer(fused, cfg, "cpu")
    objective = make_objective(ObjectiveConfig(name=obj, k=k, estimator=est))
    return plain, opt_p, objective, fused, opt_f, FusedStep(fused, opt_f, obj, k, est)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("optimizer", ["adam", "adamnormgrad"])
def test_steps_draw_the_same_noise_and_keep_the_optimizer_state(name: str, optimizer: str) -> None:
    """From one seed, steps of both paths draw the same samples (the global stream ends in the
    same state), land on the same parameters and leave the same optimizer state_dict."""
    plain, opt_p, objective, fused, opt_f, step = _pair(name, optimizer, est="dreg")
    x = _batch(torch.float32)
    torch.manual_seed(11)
    for _ in range(3):
        _, bound_p, taken_p = take_step(plain, opt_p, objective, x, 0.5)
    state_p = torch.get_rng_state()
    torch.manual_seed(11)
    for _ in range(3):
        _, bound_f, taken_f = step.step(x, 0.5)
    assert torch.equal(torch.get_rng_state(), state_p)
    assert taken_p and taken_f
    assert bound_f == pytest.approx(bound_p, rel=1e-5, abs=1e-4)
    for a, b in zip(plain.parameters(), fused.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    sp, sf = opt_p.state_dict(), opt_f.state_dict()
    assert sp["param_groups"] == sf["param_groups"]
    assert sp["state"].keys() == sf["state"].keys()
    for i in sp["state"]:
        assert sp["state"][i].keys() == sf["state"][i].keys()
        for key, v in sp["state"][i].items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == sf["state"][i][key].dtype and v.shape == sf["state"][i][key].shape
                assert torch.allclose(v, sf["state"][i][key], rtol=1e-3, atol=1e-6), key
            else:
                assert v == sf["state"][i][key]


def test_resume_from_a_state_dict_is_bit_exact() -> None:
    """Checkpoint (model, optimizer state_dict, RNG) after 3 fused steps, take 2 more; a fresh
    model, optimizer and fused step loaded from the checkpoint take the same 2 bit for bit."""
    _, _, _, model, opt, step = _pair("two-layer", "adam")
    x = _batch(torch.float32)
    torch.manual_seed(3)
    for _ in range(3):
        step.step(x)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()})
    for _ in range(2):
        step.step(x)
    model2 = _model("two-layer", torch.float32, seed=99)
    opt2 = make_optimizer(model2, TrainConfig(lr=1e-2), "cpu")
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])
    step2 = FusedStep(model2, opt2, "iwae", 3)
    for _ in range(2):
        step2.step(x)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_short_run_trains_as_the_plain_path() -> None:
    """40 steps on rotating batches from one seed: the running bound agrees with the plain trainer's."""
    plain, opt_p, objective, fused, opt_f, step = _pair("one-layer", "adam", k=5)
    g = torch.Generator().manual_seed(1)
    data = (torch.rand(80, D, generator=g) < 0.5).float()
    sums = []
    for run in (lambda x: take_step(plain, opt_p, objective, x)[1], lambda x: step.step(x)[1]):
        torch.manual_seed(4)
        sums.append([run(data[i % 4 * 20: i % 4 * 20 + 20]) for i in range(40)])
    first_p, first_f = sums
    assert first_f[0] == pytest.approx(first_p[0], rel=1e-6)
    assert sum(first_f[-10:]) == pytest.approx(sum(first_p[-10:]), rel=1e-3)
    assert sum(first_f[-10:]) > sum(first_f[:10])  # it did train


def test_a_non_finite_step_is_not_taken() -> None:
    _, _, _, model, opt, step = _pair("one-layer", "adam")
    with torch.no_grad():
        model.encoder[0].weight[0, 0] = float("nan")
    before = [p.clone() for p in model.parameters()]
    _, _, taken = step.step(_batch(torch.float32))
    assert not taken
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all()


def test_supports_the_paper_presets_and_names_what_does_not_fit() -> None:
    for preset_name in ("iwae-paper", "iwae-paper-two-layer"):
        cfg = preset(preset_name)
        model = build_model(cfg.model, 784)
        assert supports(model, cfg) is None, preset_name
    base = RunConfig()
    model = build_model(base.model, 784)
    assert supports(model, base) is None
    cases = {
        "objective.name='miwae'": (base.with_overrides(["objective.name=miwae"]), model),
        "train.precision='bf16'": (base.with_overrides(["train.precision=bf16"]), model),
        "flow": (base, build_model(ModelConfig(posterior=PosteriorConfig(flow="planar")), 784)),
        "tanh": (base, build_model(ModelConfig(activation="relu"), 784)),
        "VampPrior": (base, build_model(base.with_overrides(["model.prior.name=vampprior"]).model, 784)),
        "Bernoulli": (base, build_model(ModelConfig(likelihood="gaussian"), 784)),
        "HierarchicalVAE": (base, build_model(ModelConfig(name="hierarchical"), 784)),
    }
    for what, (cfg, m) in cases.items():
        reason = supports(m, cfg)
        assert reason is not None and what in reason and "\n" not in reason, (what, reason)


def test_train_fused_key_is_validated() -> None:
    assert RunConfig().train.fused == "off"
    assert preset("iwae-paper").train.fused == preset("iwae-paper-two-layer").train.fused == "auto"
    assert RunConfig().with_overrides(["train.fused=auto"]).train.fused == "auto"
    with pytest.raises(ConfigError, match=r"train\.fused: must be auto, on or off"):
        RunConfig().with_overrides(["train.fused=maybe"])


def test_the_direct_adam_call_is_torch_adam_bit_for_bit() -> None:
    """The fused step's own call of torch's fused Adam kernel lands on the parameters and state
    ``optimizer.step()`` gives, bit for bit, learning-rate changes included."""
    _, _, _, model, opt, step = _pair("one-layer", "adam")
    x = _batch(torch.float32)
    step.step(x)  # the first step goes through optimizer.step(), which makes the state
    twin = copy.deepcopy(model)
    twin_opt = make_optimizer(twin, TrainConfig(lr=1e-2), "cpu")
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for lr in (1e-2, 3e-3):
        opt.param_groups[0]["lr"] = twin_opt.param_groups[0]["lr"] = lr
        step.gradients(x)
        for p, q in zip(twin.parameters(), model.parameters(), strict=True):
            p.grad = q.grad.clone()
        assert step._adam_direct()
        twin_opt.step()
    for p, q in zip(twin.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    for a, b in zip(twin_opt.state.values(), opt.state.values(), strict=True):
        assert all(torch.equal(a[key], b[key]) for key in ("step", "exp_avg", "exp_avg_sq"))


def test_train_fused_picks_the_step() -> None:
    """auto: fused where the run fits, plain elsewhere; on: refuses a misfit in one line; off: plain."""
    def pick(*overrides: str):
        cfg = RunConfig().with_overrides(["train.fused=auto", *overrides])
        model = build_model(cfg.model, 784)
        return fused_step_for(model, make_optimizer(model, cfg.train, "cpu"), cfg)

    assert isinstance(pick(), FusedStep)
    assert isinstance(pick("train.fused=on", "objective.estimator=dreg"), FusedStep)
    assert pick("train.fused=off") is None
    assert pick("objective.name=miwae") is None
    assert pick("train.compile=true") is None
    with pytest.raises(ConfigError, match=r"train\.fused=on: .*objective\.name='miwae'") as err:
        pick("train.fused=on", "objective.name=miwae")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"train\.compile"):
        pick("train.fused=on", "train.compile=true")


# --- the loop's choice: train.fused in a run ------------------------------------------------

def _binary_dataset():
    from elbolab.data.dataset import ImageDataset

    g = torch.Generator().manual_seed(0)
    splits = {s: torch.bernoulli(torch.full((n, 36), 0.3), generator=g).to(torch.uint8)
              for s, n in (("train", 120), ("valid", 40), ("test", 40))}
    return ImageDataset("user", splits, (6, 6), True)


def _run_cfg(fused: str, **over):
    return RunConfig().with_overrides({
        "data.name": "user", "model.hidden": [8, 8], "model.latent_dim": 3, "objective.name": "iwae",
        "objective.k": 3, "train.epochs": 3, "train.batch_size": 20, "train.progress": False,
        "train.checkpoint_minutes": 0, "train.threads": 1, "train.monitor_every": 0, "train.fused": fused, **over})


def test_the_loop_steps_a_fitting_run_through_its_fused_step_and_a_stack_through_a_fused_stack(tmp_path):
    from elbolab.training import RunState, make_step, pack
    from elbolab.training.step import FusedRunStep, FusedStackStep, PlainStep, StackedStep

    ds = _binary_dataset()
    auto = RunState(_run_cfg("auto"), tmp_path / "a", ds)
    assert isinstance(make_step([auto.step_run()]), FusedRunStep)
    assert isinstance(make_step([RunState(_run_cfg("off"), tmp_path / "b", ds).step_run()]), PlainStep)
    # fused runs of one objective, k and estimator pack into one fused stack (tests/test_fused_stack.py)
    assert pack([_run_cfg("auto", **{"train.seed": s}) for s in (0, 1)]) == [[0, 1]]
    assert pack([_run_cfg("off", **{"train.seed": s}) for s in (0, 1)]) == [[0, 1]]
    runs = [RunState(_run_cfg(f, **{"train.seed": s}), tmp_path / f"s{f}{s}", ds) for f in ("auto", "off")
            for s in (0, 1)]
    for r in runs:
        r.own_stream()
    assert isinstance(make_step([r.step_run() for r in runs[:2]]), FusedStackStep)
    assert isinstance(make_step([r.step_run() for r in runs[2:]]), StackedStep)
    with pytest.raises(ConfigError, match="train.fused=on"):
        RunState(_run_cfg("on", **{"model.likelihood": "gaussian"}), tmp_path / "c", ds)


def test_a_fused_run_trains_as_the_plain_run_and_resumes_bit_exact(tmp_path, monkeypatch):
    """3 epochs through the loop: the fused run's final bounds match the plain run's within float32
    drift, and a run killed mid-epoch and resumed ends bit-identical to the uninterrupted fused run."""
    from trainhelp import fit

    import elbolab.training.loop as train_loop
    from elbolab.runs import load_checkpoint, read_metrics
    from elbolab.training import RunState

    ds = _binary_dataset()
    plain = RunState(_run_cfg("off"), tmp_path / "plain", ds)
    fit(plain)
    ref = RunState(_run_cfg("auto", **{"train.checkpoint_steps": 4}), tmp_path / "ref", ds)
    fit(ref)
    a = [r["train_bound"] for r in read_metrics(tmp_path / "plain" / "metrics.jsonl")]
    b = [r["train_bound"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")]
    assert b == pytest.approx(a, abs=1e-3)

    calls = {"n": 0}

    def crash_at_step_11(name: str) -> None:
        calls["n"] += name == "step"
        if calls["n"] == 11:
            raise KeyboardInterrupt("test")

    monkeypatch.setattr(train_loop, "fault_point", crash_at_step_11)
    with pytest.raises(KeyboardInterrupt):
        fit(RunState(_run_cfg("auto", **{"train.checkpoint_steps": 4}), tmp_path / "run", ds))
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 8
    monkeypatch.setattr(train_loop, "fault_point", lambda name: None)
    resumed = RunState(_run_cfg("auto", **{"train.checkpoint_steps": 4}), tmp_path / "run", ds)
    fit(resumed)
    for (name, x), y in zip(ref.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
