"""The compiled fused step (elbolab.fused_cpp, fused_step.cpp) is the torch-op fused step's training.

Tests that build the extension are in the slow tier (the build takes about a minute once, then
it is cached); the fallback and the setting are checked in the fast tier without a build.
"""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from test_fused import MODELS, _autograd, _batch, _float32_noise, _model

from elbolab import fused_cpp
from elbolab.config import ConfigError, RunConfig
from elbolab.fused import FusedStep, fused_step_for
from elbolab.optimizers import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def compiled():
    mod = fused_cpp.load()
    if mod is None:
        pytest.fail("the compiled fused step did not build here (see the line on stderr)")
    return mod


def _terms(res):
    t = res.terms
    return {"log_px": t.log_likelihood, **{f"prior {n}": v for n, v in t.log_prior.items()},
            **{f"post {n}": v for n, v in t.log_posterior.items()}, **{f"z {n}": v for n, v in t.z.items()}}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_gradients_equal_autograd_and_the_torch_step_in_float64(compiled, name: str) -> None:
    """Every (objective, estimator, k, KL weight) in float64: the compiled step's gradients, bound,
    loss, log weights and terms are autograd's to 1e-12 (a wrong term of any size shows), and the
    torch-op fused step's on the same noise."""
    x = _batch()
    for obj, est, k, beta in itertools.product(("vae", "iwae"), ("standard", "stl", "dreg"), (1, 4), (1.0, 0.3)):
        where = f"{name} {obj} {est} k={k} beta={beta}"
        model = _model(name)
        torch.manual_seed(5)
        ref_res, ref = _autograd(model, x, obj, k, est, beta)
        ref_terms = {key: v.detach().clone() for key, v in _terms(ref_res).items()}
        torch_step = FusedStep(copy.deepcopy(model), torch.optim.SGD(model.parameters(), lr=0.0), obj, k, est)
        torch.manual_seed(5)
        t_res, _ = torch_step.gradients(x, beta)
        step = FusedStep(model, torch.optim.SGD(model.parameters(), lr=0.0), obj, k, est, backend="cpp")
        assert step._cpp is not None
        torch.manual_seed(5)
        res, loss = step.gradients(x, beta)
        for g, r, t in zip(step.grads, ref, torch_step.grads, strict=True):
            tol = 1e-12 * float(r.abs().max())
            assert torch.allclose(g, r, rtol=1e-10, atol=tol), where
            assert torch.allclose(g, t, rtol=1e-10, atol=tol), where
        assert abs(float(loss) - float(ref_res.loss.detach())) < 1e-12, where
        assert res.bound.shape == ref_res.bound.shape and torch.allclose(res.bound, ref_res.bound, atol=1e-12), where
        assert res.log_w.shape == ref_res.log_w.shape and torch.allclose(res.log_w, ref_res.log_w, atol=1e-12), where
        got, want = _terms(res), ref_terms
        assert got.keys() == want.keys(), where
        for key in want:
            assert got[key].shape == want[key].shape, (where, key)
            assert torch.allclose(got[key], want[key], atol=1e-12), (where, key)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("est", ["standard", "dreg"])
def test_compiled_float32_gradients_as_close_to_float64_as_the_torch_step(compiled, name: str, est: str) -> None:
    """In float32 the compiled step's gradients are float64's truth to float32 rounding, as the
    torch-op fused step's are (the same samples)."""
    x64 = _batch()
    model64 = _model(name)
    model32 = copy.deepcopy(model64).float()
    with _float32_noise():
        _, truth = _autograd(model64, x64, "iwae", 5, est, 1.0)
    torch_step = FusedStep(copy.deepcopy(model32), torch.optim.SGD(model32.parameters(), lr=0.0), "iwae", 5, est)
    step = FusedStep(model32, torch.optim.SGD(model32.parameters(), lr=0.0), "iwae", 5, est, backend="cpp")
    with _float32_noise():
        torch_step.gradients(x64.float())
    with _float32_noise():
        step.gradients(x64.float())
    for g, t, r in zip(step.grads, torch_step.grads, truth, strict=True):
        scale = float(r.abs().max())
        assert float((t.double() - r).abs().max()) / scale < 5e-6
        assert float((g.double() - r).abs().max()) / scale < 5e-6


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_steps_at_paper_size_train_as_the_torch_step(compiled, name: str) -> None:
    """The paper's layer sizes at batch 20, IWAE k = 5, Adam: 3 steps from one seed draw the same
    noise (the global stream ends in the same state), give the same bounds and land on the same
    parameters as the torch-op fused step. Adam steps about lr whatever a gradient's size, so an
    entry whose gradient is rounding noise around 0 may move either way: a handful of entries
    (< 0.1%) may differ by up to the three steps' 2 x 3 lr, the rest agree to 1e-5."""
    from elbolab.models import build_model

    over = {"one-layer": [], "two-layer": ["model.name=two-layer"]}[name]
    cfg = RunConfig().with_overrides([*over, "objective.name=iwae", "objective.k=5", "train.lr=1e-3"])
    torch.manual_seed(0)
    model_t = build_model(cfg.model, 784)
    model_c = copy.deepcopy(model_t)
    opt_t, opt_c = make_optimizer(model_t, cfg.train, "cpu"), make_optimizer(model_c, cfg.train, "cpu")
    steps = {"torch": FusedStep(model_t, opt_t, "iwae", 5), "cpp": FusedStep(model_c, opt_c, "iwae", 5, backend="cpp")}
    x = (torch.rand(20, 784, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    bounds, rng = {}, {}
    for name_, step in steps.items():
        torch.manual_seed(11)
        bounds[name_] = [step.step(x)[1] for _ in range(3)]
        rng[name_] = torch.get_rng_state()
    assert torch.equal(rng["torch"], rng["cpp"])
    assert bounds["cpp"] == pytest.approx(bounds["torch"], rel=1e-5)
    with torch.no_grad():
        for a, b in zip(model_t.parameters(), model_c.parameters(), strict=True):
            diff = (a - b).abs()
            assert float(diff.max()) <= 6 * 1e-3 * (1 + 1e-3)
            assert int((diff > 1e-5).sum()) <= max(1, diff.numel() // 1000)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_float32_gradients_at_paper_size_as_accurate_as_the_torch_step(compiled, name: str) -> None:
    """784-200-200-50 (two-layer: -100-100-50), batch 20, IWAE k = 5, the same float32 noise: the
    compiled step's float32 gradients are the float64 truth's to float32 rounding over sums of 784
    pixels (its sums accumulate in float64), no worse than the torch-op step's."""
    from elbolab.models import build_model

    over = {"one-layer": [], "two-layer": ["model.name=two-layer"]}[name]
    cfg = RunConfig().with_overrides([*over, "objective.name=iwae", "objective.k=5"])
    torch.manual_seed(0)
    model32 = build_model(cfg.model, 784)
    model64 = copy.deepcopy(model32).double()
    x = (torch.rand(20, 784, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    steps = {"truth": FusedStep(model64, torch.optim.SGD(model64.parameters(), lr=0.0), "iwae", 5),
             "torch": FusedStep(copy.deepcopy(model32), torch.optim.SGD(model32.parameters(), lr=0.0), "iwae", 5),
             "cpp": FusedStep(model32, torch.optim.SGD(model32.parameters(), lr=0.0), "iwae", 5, backend="cpp")}
    for key, step in steps.items():
        with _float32_noise():
            step.gradients(x.double() if key == "truth" else x)
    err = {key: max(float((g.double() - t).abs().max() / t.abs().max())
                    for g, t in zip(steps[key].grads, steps["truth"].grads, strict=True)) for key in ("torch", "cpp")}
    assert err["torch"] < 1e-4
    assert err["cpp"] < max(err["torch"], 3e-5), err


def _adam_runs(name: str, dtype: torch.dtype, lr: float = 1e-2, model=None, reference: str = "torch"):
    """The same model and fused Adam twice: the reference step (``torch``: the torch-op step;
    ``cpp``: the compiled step's gradients) followed by torch's fused Adam, and the compiled step
    taking Adam's step inside its call."""
    model_t = _model(name, dtype) if model is None else model
    model_c = copy.deepcopy(model_t)
    opts = [torch.optim.Adam(m.parameters(), lr=lr, fused=True) for m in (model_t, model_c)]
    steps = [FusedStep(model_t, opts[0], "iwae", 3, "dreg", backend=reference),
             FusedStep(model_c, opts[1], "iwae", 3, "dreg", backend="cpp")]
    if reference == "cpp":  # its gradients, torch's Adam kernel after the call
        steps[0]._compiled_adam = lambda: FusedStep._NO_ADAM
    return [model_t, model_c], opts, steps


def _close_state(opt_a, opt_b, tol: float) -> None:
    a, b = opt_a.state_dict(), opt_b.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i, st in a["state"].items():
        assert st.keys() == b["state"][i].keys()
        for key, v in st.items():
            assert v.dtype == b["state"][i][key].dtype
            assert torch.allclose(v, b["state"][i][key], rtol=tol, atol=tol), (i, key)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("size", ["tiny", "paper"])
def test_compiled_adam_in_the_call_is_torchs_adam_in_float64(compiled, name: str, size: str) -> None:
    """Six steps at two KL weights and a learning rate changed halfway (as a schedule changes it):
    the compiled step's own Adam update (it takes every step after Adam's first) lands on the
    parameters and Adam state (exp_avg, exp_avg_sq, step) of the same gradients followed by torch's
    fused Adam, to 1e-12 in float64; the first step is torch's, the rest the call's. Tiny models
    (against the torch-op step) check every gradient entry; at the paper's sizes and batch 20
    (against the compiled step's gradients: an entry whose gradient is rounding noise around 0
    moves by lr either way under Adam) the gradients are proven finite from their operands."""
    if size == "tiny":
        models, opts, steps = _adam_runs(name, torch.float64)
        x = _batch()
    else:
        from elbolab.models import build_model

        over = {"one-layer": [], "two-layer": ["model.name=two-layer"]}[name]
        torch.manual_seed(0)
        model = build_model(RunConfig().with_overrides(over).model, 784).double()
        models, opts, steps = _adam_runs(name, torch.float64, model=model, reference="cpp")
        x = (torch.rand(20, 784, generator=torch.Generator().manual_seed(1)) < 0.3).double()
    taken = []
    for i, beta in enumerate([1.0, 0.3, 1.0, 1.0, 0.3, 1.0]):
        if i == 3:
            for opt in opts:
                opt.param_groups[0]["lr"] = 3e-3
        for step in steps:
            torch.manual_seed(20 + i)
            assert step.step(x, beta)[2]
        taken.append(steps[1]._compiled_probe[2])
        assert steps[1]._cpp.proved() == (size == "paper")
    assert taken == [False] + [True] * 5
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    _close_state(opts[0], opts[1], 1e-12)
    assert float(opts[1].state_dict()["state"][0]["step"]) == 6.0


@pytest.mark.slow
def test_compiled_step_leaves_adamnormgrad_to_its_optimizer(compiled) -> None:
    """AdamNormGrad (the VampPrior preset's optimizer) is not stepped inside the call: it steps after
    it, on the compiled gradients, landing where it lands after the torch-op step, to 1e-12 in float64."""
    from elbolab.config import TrainConfig

    model_t = _model("two-layer", torch.float64)
    model_c = copy.deepcopy(model_t)
    train = TrainConfig(optimizer="adamnormgrad", lr=1e-2)
    steps = [FusedStep(m, make_optimizer(m, train, "cpu"), "iwae", 3, "stl", backend=b)
             for m, b in ((model_t, "torch"), (model_c, "cpp"))]
    x = _batch()
    for i in range(3):
        for step in steps:
            torch.manual_seed(i)
            assert step.step(x)[2]
        assert not steps[1]._compiled_probe[2]
    for a, b in zip(model_t.parameters(), model_c.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert steps[1].optimizer.state[next(model_c.parameters())]["step"] == 3


@pytest.mark.slow
def test_compiled_adam_follows_a_loaded_state_and_resumes_bit_exact(compiled) -> None:
    """Adam's state replaced by load_state_dict (a resume) is the state the call updates next:
    a run saved after 3 steps and loaded into a fresh model and optimizer (state written by the
    torch-op step's Adam, or by the compiled call) continues exactly as the run that went on, bit
    for bit within the compiled step; resumed from the torch-op run's state it agrees with it to
    float32 rounding."""
    x = _batch(torch.float32)

    def steps_from(state, n: int, seed: int):
        models, opts, steps = _adam_runs("two-layer", torch.float32)
        if state is not None:
            models[1].load_state_dict(state[0])
            opts[1].load_state_dict(state[1])
        for i in range(n):
            torch.manual_seed(seed + i)
            steps[1].step(x)
        return models[1], opts[1], steps[1]

    model, opt, step = steps_from(None, 3, 0)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    for i in range(2):
        torch.manual_seed(3 + i)
        step.step(x)
    resumed, opt_r, step_r = steps_from(saved, 2, 3)
    assert step_r._compiled_probe[2]  # the call took the steps after the resume
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    _close_state(opt, opt_r, 0.0)
    # a checkpoint of the torch-op step's Adam resumes in the compiled step, and the other way round
    models, opts, steps = _adam_runs("two-layer", torch.float32)
    for i in range(3):
        for st in steps:
            torch.manual_seed(i)
            st.step(x)
    for src, dst in ((0, 1), (1, 0)):
        models[dst].load_state_dict(models[src].state_dict())
        opts[dst].load_state_dict(copy.deepcopy(opts[src].state_dict()))  # as from a file: its own tensors
        for st in steps:
            torch.manual_seed(9 + src)
            st.step(x)
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        _close_state(opts[0], opts[1], 1e-5)


@pytest.mark.slow
def test_compiled_runs_of_a_stack_step_each_as_alone_bit_for_bit(compiled) -> None:
    """Runs whose fused steps are compiled, stacked by make_step, step one after another through
    their own compiled steps: each run's parameters and Adam state after 3 steps are the run's
    alone, bit for bit."""
    from test_fused_stack import _fused_runs, assert_stack_equals_alone

    from elbolab.distributions import noise_source
    from elbolab.training import make_step
    from elbolab.training.step import FusedStackStep

    lrs, betas = [1e-3, 3e-3], [1.0, 0.5]
    xs = (torch.rand(2, 20, 784, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    alone = _fused_runs("two-layer", "iwae", 3, "dreg", lrs, backend="cpp")
    stacked = _fused_runs("two-layer", "iwae", 3, "dreg", lrs, backend="cpp")
    for i, r in enumerate(alone):
        with noise_source(lambda shape, dtype, device, g=r.generator: torch.randn(shape, generator=g)):
            outs = [r.fused.step(xs[i], betas[i]) for _ in range(3)]
        r.bound = outs[-1][1]
    step = make_step(stacked)
    assert isinstance(step, FusedStackStep) and step.compiled
    for _ in range(3):
        outs = step.step(xs, betas)
    assert_stack_equals_alone(alone, stacked, outs)


@pytest.mark.slow
def test_a_compiled_step_takes_finite_steps_only(compiled) -> None:
    """A NaN weight: the step is not taken and the parameters stay. Gradients so large that their
    float32 sum of squares overflows, all finite: the step is taken (as the torch-op step takes it)."""
    model = _model("one-layer", torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = FusedStep(model, opt, "iwae", 3, backend="cpp")
    x = _batch(torch.float32)
    with torch.no_grad():
        model.encoder[0].weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    _, _, taken = step.step(x)
    assert not taken
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a.nan_to_num(), b.detach().nan_to_num())
    # once Adam has state the call takes its steps; a NaN step leaves parameters and state as they are
    model = _model("one-layer", torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    step = FusedStep(model, opt, "iwae", 3, backend="cpp")
    for _ in range(2):
        assert step.step(x)[2]
    assert step._compiled_probe[2]
    with torch.no_grad():
        model.encoder[0].weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    assert not step.step(x)[2] and not step._compiled_probe[2]
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a.nan_to_num(), b.detach().nan_to_num())
    for i, st in state["state"].items():
        for key, v in st.items():
            assert torch.equal(v, opt.state_dict()["state"][i][key]), (i, key)
    for backend in ("torch", "cpp"):
        model = _model("one-layer", torch.float32)
        with torch.no_grad():
            model.likelihood.head.weight.mul_(1e21)  # gradients past 1e19: their squares overflow
        step = FusedStep(model, torch.optim.SGD(model.parameters(), lr=0.0), "iwae", 3, backend=backend)
        _, bound_sum, taken = step.step(x)
        assert torch.isfinite(step.flat).all() and float(step.flat.square().sum()) == float("inf")
        assert taken, backend
    # the compiled step proves gradients finite from their products' operands where it can, else
    # checks every entry (the NaN weight above fails the proof and then the check): pixels of
    # 1e36-1e37, finite gradients near 1e37, fail the proof and pass the check, as the torch-op step takes them
    for scale in (1e36, 1e37):
        xb = x.clone()
        xb[:, 0] = scale
        for backend in ("torch", "cpp"):
            model = _model("one-layer", torch.float32)
            step = FusedStep(model, torch.optim.SGD(model.parameters(), lr=0.0), "iwae", 3, backend=backend)
            torch.manual_seed(0)
            assert step.step(xb)[2] and bool(torch.isfinite(step.flat).all()), (scale, backend)
            assert float(step.flat.abs().max()) > scale / 2


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["source", "compiler"])
def test_a_compile_error_falls_back_with_one_line(monkeypatch, tmp_path, capfd, broken: str) -> None:
    """A source that does not compile, or no compiler: one line on stderr (torch's own warnings about
    the compiler silenced) naming why, and the torch-op fused step trains."""
    if broken == "source":
        bad = tmp_path / "fused_step.cpp"
        bad.write_text("#include <torch/extension.h>\nthis does not compile;\n")
        monkeypatch.setattr(fused_cpp, "SOURCE", bad)
    else:
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(fused_cpp, "_loaded", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    model = _model("one-layer", torch.float32)
    step = FusedStep(model, torch.optim.SGD(model.parameters(), lr=0.0), "iwae", 2, backend="cpp")
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    # where a compiler exists the first build announces itself first
    assert lines[:-1] == ([fused_cpp.BUILDING] if broken == "source" else [])
    lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("elbolab: compiled fused step unavailable (RuntimeError: ")
    assert lines[0].endswith("; using the torch-op fused step")
    assert ("error:" if broken == "source" else "not found") in lines[0]
    assert step._cpp is None and torch.isfinite(step.gradients(_batch(torch.float32))[1])


def test_a_failed_build_falls_back_with_one_line_and_the_torch_step(monkeypatch, capsys) -> None:
    """No compiler (the build raises): one line on stderr, once per process; the step is the
    torch-op fused step, its gradients those of backend=torch."""
    import torch.utils.cpp_extension as cpp_extension

    calls = []

    def no_compiler(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("Error building extension: c++: command not found\nmore lines")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(fused_cpp, "_loaded", {})
    x = _batch()
    grads = {}
    for backend in ("cpp", "cpp", "torch"):
        model = _model("two-layer")
        step = FusedStep(model, torch.optim.SGD(model.parameters(), lr=0.0), "iwae", 3, backend=backend)
        assert step._cpp is None
        torch.manual_seed(2)
        step.gradients(x)
        grads[backend] = torch.cat([g.flatten() for g in step.grads])
    assert len(calls) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["elbolab: compiled fused step unavailable (RuntimeError: Error building extension: c++: command "
                   "not found); using the torch-op fused step"]
    assert torch.equal(grads["cpp"], grads["torch"])


def test_the_backend_setting(monkeypatch) -> None:
    """train.fused_backend: a bad value is refused naming the key; auto builds only where the
    environment allows it (the test suite sets ELBOLAB_FUSED_CPP=0), torch never, cpp always."""
    with pytest.raises(ConfigError, match=r"train\.fused_backend.*auto, torch or cpp.*'gpu'"):
        RunConfig().with_overrides(["train.fused_backend=gpu"])
    assert not fused_cpp.wanted("auto") and not fused_cpp.wanted("torch") and fused_cpp.wanted("cpp")
    monkeypatch.setenv(fused_cpp.ENV, "1")
    assert fused_cpp.wanted("auto")
    # the trainer's choice passes the setting on: torch builds nothing
    monkeypatch.setattr(fused_cpp, "load", lambda: pytest.fail("train.fused_backend=torch built the extension"))
    cfg = RunConfig().with_overrides(["objective.name=iwae", "objective.k=2", "train.fused=on",
                                      "train.fused_backend=torch", "model.hidden=[5,4]", "model.latent_dim=3"])
    from elbolab.models import build_model

    model = build_model(cfg.model, 12)
    step = fused_step_for(model, make_optimizer(model, cfg.train, "cpu"), cfg)
    assert step is not None and step.compiled is None
    # a run may resume under another backend (float rounding only), not under another fused choice
    from elbolab.runs import resume_free

    assert resume_free("train.fused_backend") and not resume_free("train.fused")


@pytest.mark.parametrize("preset_name", ["iwae-paper", "iwae-paper-two-layer"])
def test_the_paper_presets_train_through_the_compiled_step_and_its_adam(monkeypatch, tmp_path,
                                                                          preset_name: str) -> None:
    """`elbolab train --preset iwae-paper` (and -two-layer) as configured, where the environment allows
    the build: the trainer's run (RunState) takes the fused step through the compiled module
    (train.fused=auto, train.fused_backend=auto), and its optimizer (Adam, eps 1e-4) is one whose
    step the compiled call takes itself. No build here: the module is a stand-in."""
    from elbolab.config import preset
    from elbolab.data import load
    from elbolab.fused import _adam_plain
    from elbolab.training import RunState

    made = []

    class Module:
        class Step:
            def __init__(self, *args) -> None:
                made.append(args)

    monkeypatch.setenv(fused_cpp.ENV, "1")
    monkeypatch.setattr(fused_cpp, "load", lambda: Module)
    cfg = preset(preset_name)
    assert (cfg.train.fused, cfg.train.fused_backend, cfg.train.optimizer) == ("auto", "auto", "adam")
    data = load("binarized-mnist-embedded")
    run = RunState(cfg.with_overrides(["data.name=binarized-mnist-embedded"]), tmp_path / "run", data)
    step = run.fused_step()
    assert step is not None and step.compiled is Module and len(made) == 1
    assert _adam_plain(run.optimizer) and run.optimizer.param_groups[0]["eps"] == 1e-4


@pytest.mark.slow
def test_a_training_run_takes_the_compiled_step_under_auto(compiled, monkeypatch, tmp_path) -> None:
    """train.fused_backend=auto, where the environment allows the build, trains through the compiled
    step (torch never does); the run's metrics are the torch-op run's to float32 rounding."""
    from test_fused_stack import BASE
    from trainhelp import fit

    from elbolab.data import load
    from elbolab.training import RunState

    seen = []
    real = FusedStep._compiled_gradients

    def spy(self, x, beta, *adam):
        seen.append(beta)
        return real(self, x, beta, *adam)

    monkeypatch.setattr(FusedStep, "_compiled_gradients", spy)
    monkeypatch.setenv(fused_cpp.ENV, "1")
    data = load("binarized-mnist-embedded")
    rows = {}
    for backend in ("torch", "auto"):
        seen.clear()
        cfg = RunConfig().with_overrides({**BASE, "train.seed": 0, "train.fused_backend": backend})
        fit(RunState(cfg, tmp_path / backend, data))
        rows[backend] = [json.loads(line) for line in (tmp_path / backend / "metrics.jsonl").read_text().splitlines()]
        assert bool(seen) == (backend == "auto"), backend
    assert len(rows["auto"]) == len(rows["torch"]) > 0
    compared = 0
    for a, t in zip(rows["auto"], rows["torch"], strict=True):
        assert a.keys() == t.keys()
        for key, v in t.items():
            if isinstance(v, float) and "seconds" not in key:
                assert a[key] == pytest.approx(v, rel=1e-4, abs=1e-4), key
                compared += 1
    assert compared >= 2  # the epoch's train and validation bounds at least
