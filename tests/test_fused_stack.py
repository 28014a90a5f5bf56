"""S runs of one shape in one fused step (elbolab.fused.StackedFusedStep): each run is the run alone."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
from test_fused import MODELS, _autograd, _batch, _model
from trainhelp import fit

from elbolab.config import ObjectiveConfig, RunConfig, TrainConfig
from elbolab.data import load
from elbolab.distributions import noise_source
from elbolab.fused import FusedStep, StackedFusedStep
from elbolab.objectives import make_objective, objective_plan
from elbolab.optimizers import make_optimizer
from elbolab.runs import load_checkpoint
from elbolab.training import Loop, RunState, StepRun, make_step, pack
from elbolab.training.step import FusedStackStep, StackedStep

pytestmark = pytest.mark.usefixtures("one_thread")


def _own_noise(seed: int):
    g = torch.Generator().manual_seed(seed)
    return noise_source(lambda shape, dtype, device: torch.randn(shape, generator=g, dtype=dtype, device=device))


@pytest.mark.parametrize("name", list(MODELS))
def test_stacked_gradients_equal_autograd_run_by_run_in_float64(name: str) -> None:
    """Two runs (different weights, batches, noise streams and KL weights) in one fused step:
    each run's gradients are autograd's on that run alone, to 1e-12 (float64)."""
    betas = [1.0, 0.3]
    for obj, est, k in itertools.product(("vae", "iwae"), ("standard", "stl", "dreg"), (1, 4)):
        models = [_model(name, seed=s) for s in (1, 2)]
        xs = torch.stack([_batch(), 1.0 - _batch()])
        refs = []
        for i, m in enumerate(models):
            with _own_noise(10 + i):
                refs.append(_autograd(copy.deepcopy(m), xs[i], obj, k, est, betas[i]))
        steps = [FusedStep(m, torch.optim.SGD(m.parameters(), lr=0.0), obj, k, est) for m in models]
        stack = StackedFusedStep(steps, [torch.Generator().manual_seed(10 + i) for i in range(2)])
        results, losses = stack.gradients(xs, betas)
        for i, (ref_res, ref) in enumerate(refs):
            where = f"{name} {obj} {est} k={k} run {i}"
            for (pname, p), r in zip(models[i].named_parameters(), ref, strict=True):
                assert torch.allclose(p.grad, r, rtol=1e-10, atol=1e-12 * float(r.abs().max())), f"{where}: {pname}"
            assert torch.allclose(results[i].bound, ref_res.bound, rtol=0, atol=1e-12), where
            assert abs(float(losses[i]) - float(ref_res.loss.detach())) < 1e-12, where


def test_two_latents_of_one_size_keep_their_own_noise() -> None:
    """A two-layer model whose z1 and z2 have one size: the stack's z1 noise is not overwritten by
    z2's draw before the backward needs it (gradients as autograd's, float64)."""
    cfg = RunConfig().with_overrides({"model.name": "two-layer", "model.two_layer": dict(
        latent_dims=[3, 3], hidden1=[7, 6], hidden2=[5, 4])})
    from elbolab.models import build_model

    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(build_model(cfg.model, 12).double())
    xs = torch.stack([_batch(), 1.0 - _batch()])
    refs = []
    for i, m in enumerate(models):
        with _own_noise(10 + i):
            refs.append(_autograd(copy.deepcopy(m), xs[i], "iwae", 4, "stl", 1.0)[1])
    steps = [FusedStep(m, torch.optim.SGD(m.parameters(), lr=0.0), "iwae", 4, "stl") for m in models]
    StackedFusedStep(steps, [torch.Generator().manual_seed(10 + i) for i in range(2)]).gradients(xs, [1.0, 1.0])
    for m, ref in zip(models, refs, strict=True):
        for p, r in zip(m.parameters(), ref, strict=True):
            assert torch.allclose(p.grad, r, rtol=1e-10, atol=1e-12 * float(r.abs().max()))


def _fused_runs(name: str, obj: str, k: int, est: str, lrs: list[float], optimizer: str = "adam",
                backend: str = "torch"):
    """Float32 runs of one shape with Adam, each its own model and generator."""
    cfg = RunConfig().with_overrides(["model.name=two-layer"] if name == "two-layer" else [])
    from elbolab.models import build_model

    runs = []
    for i, lr in enumerate(lrs):
        torch.manual_seed(i)
        m = build_model(cfg.model, 784)
        opt = make_optimizer(m, TrainConfig(lr=lr, optimizer=optimizer), "cpu")
        ocfg = ObjectiveConfig(name=obj, k=k, estimator=est)
        plan, estimator = objective_plan(ocfg)
        runs.append(StepRun(m, opt, make_objective(ocfg), plan, estimator, torch.Generator().manual_seed(10 + i),
                            fused=FusedStep(m, opt, obj, k, est, backend=backend)))
    return runs


@pytest.mark.parametrize(("name", "obj", "k", "est", "optimizer"), [("one-layer", "iwae", 5, "dreg", "adam"),
                                                                     ("two-layer", "iwae", 1, "standard", "adam"),
                                                                     ("two-layer", "vae", 5, "stl", "adamnormgrad")])
def test_a_fused_stack_steps_each_run_as_its_fused_step_alone_bit_for_bit(name, obj, k, est, optimizer) -> None:
    """The paper's models at batch 20, three runs with their own learning rates and KL weights:
    4 steps of the stack (make_step's choice) leave each run's parameters and optimizer state (Adam,
    AdamNormGrad) as 4 steps of its own fused step do, bit for bit."""
    lrs, betas = [1e-3, 3e-3, 1e-4], [1.0, 0.5, 0.2]
    xs = (torch.rand(3, 20, 784, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    alone, stacked = _fused_runs(name, obj, k, est, lrs, optimizer), _fused_runs(name, obj, k, est, lrs, optimizer)
    for i, r in enumerate(alone):
        with noise_source(lambda shape, dtype, device, g=r.generator: torch.randn(shape, generator=g)):
            outs = [r.fused.step(xs[i], betas[i]) for _ in range(4)]
        r.bound = outs[-1][1]
    step = make_step(stacked)
    assert isinstance(step, FusedStackStep)
    for _ in range(4):
        outs = step.step(xs, betas)
    assert_stack_equals_alone(alone, stacked, outs)


def test_batched_path_within_float32_rounding_on_odd_shapes() -> None:
    """Tiny odd shapes, where batched kernels may round otherwise (so make_step's stack steps the
    runs one by one): the batched path itself stays within float32 rounding of each run alone."""
    lrs, betas = [1e-2, 3e-3], [1.0, 0.4]
    xs = torch.stack([_batch(torch.float32), 1.0 - _batch(torch.float32)])

    def runs():
        out = []
        for i, lr in enumerate(lrs):
            m = _model("two-layer", torch.float32, seed=i)
            opt = make_optimizer(m, TrainConfig(lr=lr), "cpu")
            out.append((m, opt, FusedStep(m, opt, "iwae", 3, "dreg")))
        return out

    alone, stacked = runs(), runs()
    for i, (_, _, st) in enumerate(alone):
        with _own_noise(10 + i):
            for _ in range(3):
                st.step(xs[i], betas[i])
    stack = StackedFusedStep([st for _, _, st in stacked], [torch.Generator().manual_seed(10 + i) for i in range(2)])
    for _ in range(3):
        stack.step(xs, betas)
    for (ma, _, _), (ms, _, _) in zip(alone, stacked, strict=True):
        for p, q in zip(ma.parameters(), ms.parameters(), strict=True):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    torch.set_num_threads(2)
    assert not stack.exact_at(xs)  # more threads split kernels by the whole tensor: one by one


def test_where_the_batched_kernels_would_round_otherwise_the_stack_steps_runs_one_by_one() -> None:
    """Odd tiny shapes (a 12-pixel batch of 6, k = 3: the logits' sigmoid leaves a scalar tail per
    run): make_step's fused stack still gives each run its bits alone, stepping them one by one."""
    lrs, betas = [1e-2, 3e-3], [1.0, 0.4]
    xs = torch.stack([_batch(torch.float32), 1.0 - _batch(torch.float32)])

    def runs() -> list[StepRun]:
        out = []
        for i, lr in enumerate(lrs):
            m = _model("one-layer", torch.float32, seed=i)
            opt = make_optimizer(m, TrainConfig(lr=lr), "cpu")
            ocfg = ObjectiveConfig(name="iwae", k=3, estimator="dreg")
            plan, estimator = objective_plan(ocfg)
            out.append(StepRun(m, opt, make_objective(ocfg), plan, estimator, torch.Generator().manual_seed(10 + i),
                               fused=FusedStep(m, opt, "iwae", 3, "dreg")))
        return out

    alone, stacked = runs(), runs()
    for i, r in enumerate(alone):
        step = make_step([r])
        for _ in range(3):
            step.step(xs[i:i + 1], betas[i:i + 1])
    step = make_step(stacked)
    assert isinstance(step, FusedStackStep) and not step.fused.exact_at(xs)
    for _ in range(3):
        step.step(xs, betas)
    for a, s in zip(alone, stacked, strict=True):
        for p, q in zip(a.model.parameters(), s.model.parameters(), strict=True):
            assert torch.equal(p, q)


def test_a_non_finite_run_of_a_fused_stack_is_not_taken_and_the_others_are() -> None:
    runs = _fused_runs("one-layer", "iwae", 2, "standard", [1e-3, 1e-3])
    with torch.no_grad():
        runs[1].model.encoder[0].weight[0, 0] = float("nan")
    before = [[p.clone() for p in r.model.parameters()] for r in runs]
    xs = (torch.rand(2, 20, 784, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    outs = make_step(runs).step(xs, [1.0, 1.0])
    assert [o.taken for o in outs] == [True, False]
    assert not torch.equal(before[0][0], next(runs[0].model.parameters()))
    for a, b in zip(before[1], runs[1].model.parameters(), strict=True):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


# --- the loop: fused runs of one shape pack into one stack ----------------------------------------

BASE = {"model.hidden": [40], "model.latent_dim": 8, "objective.k": 2, "train.epochs": 1, "train.batch_size": 100,
        "train.progress": False, "train.checkpoint_minutes": 0, "train.checkpoint_steps": 70, "train.threads": 1,
        "train.fused": "auto", "train.monitor_every": 0}
VARIANTS = [{"train.seed": 0}, {"train.seed": 1, "train.lr": 3e-4, "objective.warmup_epochs": 1}]


def _outcome(run: Path):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
        r.pop("monitor_seconds", None)
    return (run / "model.safetensors").read_bytes(), rows


def test_pack_groups_fused_runs_by_objective_k_and_estimator() -> None:
    cfgs = [RunConfig().with_overrides({**BASE, **v}) for v in
            ({"train.seed": 0}, {"train.seed": 1}, {"objective.estimator": "dreg"}, {"train.fused": "off"})]
    assert pack(cfgs) == [[0, 1], [2], [3]]


def test_fused_runs_stacked_by_the_loop_end_as_each_run_alone(tmp_path) -> None:
    """Two fused runs (seeds, learning rates, KL warm-up differ) trained as one stack by the loop
    end with the weights and metrics of each trained alone, to the bit."""
    data = load("binarized-mnist-embedded")
    runs = [(RunConfig().with_overrides({**BASE, **v}), tmp_path / f"stack{i}") for i, v in enumerate(VARIANTS)]
    loop = Loop(runs, data)
    outcomes = loop.fit()
    assert [o.status for o in outcomes] == ["finished"] * 2
    for i, v in enumerate(VARIANTS):
        fit(RunState(RunConfig().with_overrides({**BASE, **v}), tmp_path / f"alone{i}", data))
        assert _outcome(tmp_path / f"stack{i}") == _outcome(tmp_path / f"alone{i}"), f"run {i}"
        a, b = load_checkpoint(tmp_path / f"stack{i}" / "checkpoint.pt"), load_checkpoint(tmp_path / f"alone{i}" /
                                                                                            "checkpoint.pt")
        assert a["step"] == b["step"]
        for key, t in a["model"].items():
            assert torch.equal(t, b["model"][key]), key


def test_make_step_falls_back_to_the_stacked_model_where_runs_differ() -> None:
    a = _fused_runs("one-layer", "iwae", 2, "standard", [1e-3])
    b = _fused_runs("one-layer", "iwae", 2, "dreg", [1e-3])
    assert isinstance(make_step(a + b), StackedStep)


def test_a_fused_stack_killed_mid_epoch_resumes_to_the_bits_of_each_run_alone(tmp_path, monkeypatch) -> None:
    """The loop's fused stack, interrupted after its step-70 checkpoint and resumed from it: each run
    ends with the weights and metrics of the same run trained alone and uninterrupted."""
    import elbolab.training.loop as train_loop

    data = load("binarized-mnist-embedded")
    calls = {"n": 0}

    def crash_at_step_80(name: str) -> None:
        calls["n"] += name == "step"
        if calls["n"] == 80:
            raise KeyboardInterrupt("test")

    runs = [(RunConfig().with_overrides({**BASE, **v}), tmp_path / f"stack{i}") for i, v in enumerate(VARIANTS)]
    monkeypatch.setattr(train_loop, "fault_point", crash_at_step_80)
    with pytest.raises(KeyboardInterrupt):
        Loop(runs, data).fit()
    assert load_checkpoint(tmp_path / "stack0" / "checkpoint.pt")["step"] == 70
    monkeypatch.setattr(train_loop, "fault_point", lambda name: None)
    assert [o.status for o in Loop(runs, data).fit(resume=True)] == ["finished"] * 2
    for i, v in enumerate(VARIANTS):
        fit(RunState(RunConfig().with_overrides({**BASE, **v}), tmp_path / f"alone{i}", data))
        assert _outcome(tmp_path / f"stack{i}") == _outcome(tmp_path / f"alone{i}"), f"run {i}"


def assert_stack_equals_alone(alone, stacked, outs) -> None:
    """Each stacked run's last step was taken with the bound, parameters and Adam state of the run alone."""
    for a, s, o in zip(alone, stacked, outs, strict=True):
        assert o.taken and o.bound_sum == a.bound
        for p, q in zip(a.model.parameters(), s.model.parameters(), strict=True):
            assert torch.equal(p, q)
        for sa, ss in zip(a.optimizer.state.values(), s.optimizer.state.values(), strict=True):
            assert sa.keys() == ss.keys()
            assert all(torch.equal(v, ss[key]) for key, v in sa.items() if isinstance(v, torch.Tensor))
