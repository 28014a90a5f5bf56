"""One training step: objective, backward, the one read-back, the optimizers; for S >= 1 runs.

:class:`Step` is the seam the loop steps through: ``step(x, betas)`` takes one batch per run
(``x``: [S, B, D]) and returns, per run, its result, its summed bound and whether its
optimizer stepped. :func:`make_step` picks the implementation for a stack of runs: the
plain autograd step for one run (:class:`PlainStep`, :func:`take_step`), or its fused step
(:class:`FusedRunStep`, elbolab.fused, chosen by ``train.fused``); for several, one fused step
(:class:`FusedStackStep`) where every run has one of one shape, else the stacked model
(:class:`StackedStep`); the paired adversary / VAE steps of a model trained with an adversary
(:class:`AdversarialStep`, models.avb). Another implementation plugs in there and nowhere else.

No silent NaN: each step checks its loss and gradients in the same host transfer that reads
the logged bound (one sync per step on a GPU). A step that is not finite is not taken; the
run's fault policy (state.RunState.record_step) decides what follows.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor
from torch.optim.adam import adam as adam_update

from ..distributions import noise_source
from ..fastpaths import add_float32_outputs, precision_context
from ..fused import StackedFusedStep
from ..models.base import LogWeightTerms
from ..models.stacked import RunwiseTails, run_noise, stack_models
from ..objectives import BoundPlan, ObjectiveResult, detaches_posterior, estimate_from_terms, objective_plan


class NonFiniteError(FloatingPointError):
    """A loss or gradient became inf/NaN; the message names the step, batch and terms."""


def _term_labels(terms: LogWeightTerms) -> dict[str, Tensor]:
    """Every log-weight term by what it is: reconstruction, prior/KL or posterior, per layer."""
    out = {"reconstruction log p(x|z)": terms.log_likelihood}
    out.update({f"prior log p({n}) (KL, layer {n})": t for n, t in terms.log_prior.items()})
    out.update({f"posterior log q({n}|.) (KL, layer {n})": t for n, t in terms.log_posterior.items()})
    return out


def describe_fault(loss: Tensor, terms: LogWeightTerms, model: torch.nn.Module, where: str,
                   image_ids: Tensor) -> str:
    """One line: where it happened, which terms (how many images) and which layers' gradients."""
    parts = []
    if not torch.isfinite(loss):
        parts.append(f"loss={float(loss.detach())}")
    bad_images: set[int] = set()
    for name, t in _term_labels(terms).items():
        bad = ~torch.isfinite(t.detach())
        if bad.any():
            cols = bad.reshape(-1, bad.shape[-1]).any(0).nonzero().flatten().tolist()
            bad_images.update(cols)
            parts.append(f"{name} non-finite for {len(cols)} of {bad.shape[-1]} images")
    grads = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if grads:
        shown = ", ".join(grads[:4]) + (f" and {len(grads) - 4} more" if len(grads) > 4 else "")
        parts.append(f"gradient non-finite in {shown}")
    ids = image_ids.cpu()
    picked = [int(ids[i]) for i in sorted(bad_images)[:5]] if bad_images else [int(i) for i in ids[:5]]
    what = "; ".join(parts) or "the bound overflowed with finite terms"
    return f"non-finite value at {where} (training images {picked}{'...' if len(ids) > 5 else ''}): {what}"


def step_readout(bound: Tensor, loss: Tensor, grads: list[Tensor]) -> tuple[float, float]:
    """The batch's summed bound, and a number that is finite when the loss and every
    gradient are, read back in one host transfer (one sync per step on a GPU).

    The number is loss + the gradients' total norm (one multi-tensor kernel, not a
    reduction per parameter): non-finite when any element is, or, rarely, when the norm
    overflows, which the caller re-checks element by element.
    """
    probe = loss.detach().float()
    if grads:
        probe = probe + torch.nn.utils.get_total_norm(grads, foreach=True).float()
    bound_sum, probe_value = torch.stack([bound.detach().sum().float(), probe]).tolist()
    return bound_sum, probe_value


def all_finite(loss: Tensor, grads: list[Tensor]) -> bool:
    """Element by element: the check behind a non-finite probe (rarely, an overflowing norm)."""
    return bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)


def take_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, objective: Callable[..., ObjectiveResult],
              x: Tensor, beta: float = 1.0) -> tuple[ObjectiveResult, float, bool]:
    """One training step: objective, backward, one read-back, and the optimizer's step when
    the loss and every gradient are finite. Returns the result, the batch's summed bound and
    whether the step was taken."""
    res = objective(model, x, beta)
    optimizer.zero_grad(set_to_none=True)
    res.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bound_sum, probe_value = step_readout(res.bound, res.loss, grads)
    if math.isfinite(probe_value) or all_finite(res.loss, grads):
        optimizer.step()
        return res, bound_sum, True
    return res, bound_sum, False


class StepOutcome(NamedTuple):
    """One run's share of a step: its objective's result, its summed bound, whether it stepped."""

    result: ObjectiveResult
    bound_sum: float
    taken: bool


@dataclass
class StepRun:
    """What one run brings to a step: its model and optimizer (the step updates them), the
    objective it trains (the plain step's callable, and its bound plan and estimator), and the
    random stream its samples come from (None: torch's global one, as a run alone draws)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    objective: Any
    plan: BoundPlan
    estimator: str
    generator: torch.Generator | None = None
    precision: str = "fp32"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: the run's fused step (elbolab.fused.FusedStep) under train.fused, else None
    fused: Any = None
    #: the adversary's own optimizer, for a model trained against an adversary (models.avb), else None
    adversary_optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def plain(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer, objective: Any,
              objective_cfg: Any) -> StepRun:
        """A run drawing from torch's global stream (tests)."""
        plan, estimator = objective_plan(objective_cfg)
        return cls(model, optimizer, objective, plan, estimator, None, "fp32",
                   next(iter(model.parameters())).device)


class Step(Protocol):
    """One optimizer step of every run of a stack; built once per stack by :func:`make_step`.

    ``members``: the runs, in the order of ``x`` and the outcomes; ``model``: the module the
    forward pass goes through (a run's own for one run, the stacked one for several).
    """

    members: list[StepRun]
    model: torch.nn.Module

    def step(self, x: Tensor, betas: Sequence[float]) -> list[StepOutcome]:
        """Run ``i`` steps on ``x[i]`` (``x``: [S, B, D]) at KL weight ``betas[i]``."""
        ...


class PlainStep:
    """One run, autograd: :func:`take_step` on its own model, optimizer and objective."""

    def __init__(self, run: StepRun) -> None:
        self.members = [run]
        self.model = run.model

    def step(self, x: Tensor, betas: Sequence[float]) -> list[StepOutcome]:
        r = self.members[0]
        if r.generator is None:
            return [StepOutcome(*take_step(r.model, r.optimizer, r.objective, x[0], betas[0]))]
        g = r.generator
        with noise_source(lambda shape, dtype, device: torch.randn(shape, generator=g, dtype=dtype, device=device)):
            return [StepOutcome(*take_step(r.model, r.optimizer, r.objective, x[0], betas[0]))]


class FusedRunStep:
    """One run through its fused step (elbolab.fused): the plain step's gradients, noise and
    optimizer state, with a hand-written backward on preallocated buffers instead of autograd."""

    def __init__(self, run: StepRun) -> None:
        self.members = [run]
        self.model = run.model
        self.fused = run.fused

    def step(self, x: Tensor, betas: Sequence[float]) -> list[StepOutcome]:
        g = self.members[0].generator
        if g is None:
            return [StepOutcome(*self.fused.step(x[0], betas[0]))]
        with noise_source(lambda shape, dtype, device: torch.randn(shape, generator=g, dtype=dtype, device=device)):
            return [StepOutcome(*self.fused.step(x[0], betas[0]))]


class AdversarialStep:
    """One run of a model with an adversary (models.avb): the adversary's step on its own loss
    (``model.adversary_loss``), then the VAE's step (:func:`take_step`) against the updated
    adversary. Each optimizer steps only its own parameters; both steps are taken only when
    both losses and their gradients are finite."""

    def __init__(self, run: StepRun) -> None:
        self.members = [run]
        self.model = run.model
        if run.adversary_optimizer is None:
            raise ValueError("an adversarial step needs the adversary's optimizer")

    def step(self, x: Tensor, betas: Sequence[float]) -> list[StepOutcome]:
        g = self.members[0].generator
        if g is None:
            return [self._step(x[0], betas[0])]
        with noise_source(lambda shape, dtype, device: torch.randn(shape, generator=g, dtype=dtype, device=device)):
            return [self._step(x[0], betas[0])]

    def _step(self, x: Tensor, beta: float) -> StepOutcome:
        r = self.members[0]
        adversary = r.model.adversary_parameters()
        opt = r.adversary_optimizer
        opt.zero_grad(set_to_none=True)
        loss = r.model.adversary_loss(x)
        loss.backward()
        grads = [p.grad for p in adversary if p.grad is not None]
        _, probe = step_readout(loss.detach().reshape(1), loss, grads)
        if not (math.isfinite(probe) or all_finite(loss, grads)):
            res = r.objective(r.model, x, beta)  # the VAE's terms, for the fault report
            return StepOutcome(res, float(res.bound.detach().sum()), False)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # the VAE's loss flows through T into z; the adversary's weights take no gradient from it
        for p in adversary:
            p.requires_grad_(False)
        try:
            res, bound_sum, taken = take_step(r.model, r.optimizer, r.objective, x, beta)
        finally:
            for p in adversary:
                p.requires_grad_(True)
        return StepOutcome(res, bound_sum, taken)


def _split_runs(terms: LogWeightTerms, runs: int) -> list[LogWeightTerms]:
    """Each run's terms from a stack's: ``[K, S, B]`` log-densities and ``[K, S, B, D]`` samples.

    The run axis is moved first before splitting, so the gradients coming back are laid out
    run by run, the layout whose reductions round as each run's alone (models/stacked.py).
    """
    def by_run(t: Tensor, axis: int) -> tuple[Tensor, ...]:
        return t.movedim(axis, 0).unbind(0)

    lik = by_run(terms.log_likelihood, -2)
    prior = {k: by_run(v, -2) for k, v in terms.log_prior.items()}
    post = {k: by_run(v, -2) for k, v in terms.log_posterior.items()}
    z = {k: by_run(v, -3) for k, v in terms.z.items()}
    return [LogWeightTerms(lik[i], {k: v[i] for k, v in prior.items()}, {k: v[i] for k, v in post.items()},
                           {k: v[i] for k, v in z.items()}) for i in range(runs)]


class StackedStep:
    """Several runs as one model (models.stacked.stack_models): one forward and one backward
    pass for all, each run's bound and loss from its own share of the log weights, each run's
    optimizer stepped on its own slice. The runs' parameters become views of the stack's;
    each run draws its samples from its own generator."""

    def __init__(self, runs: Sequence[StepRun]) -> None:
        self.members = list(runs)
        self.runs = len(self.members)
        first = self.members[0]
        self.n_samples = first.plan.n_samples
        self.detach = detaches_posterior(first.estimator)
        self.precision, self.device = first.precision, first.device
        self.model = stack_models([r.model for r in self.members])
        if self.precision != "fp32":
            add_float32_outputs(self.model)  # bf16 products, float32 results (fastpaths.with_precision)
        self.params = [p for _, p in self.model.named_parameters()]
        names = [n for n, _ in self.model.named_parameters()]
        self.member_params = [[dict(r.model.named_parameters())[n] for n in names] for r in self.members]
        generators = [r.generator for r in self.members]
        if any(g is None for g in generators):
            raise ValueError("each run of a stack needs its own generator")
        self.noise = run_noise(generators)  # type: ignore[arg-type]
        #: input shape -> whether elementwise tails need running run by run (models.stacked)
        self._tails: dict[tuple[int, ...], bool] = {}

    def step(self, x: Tensor, betas: Sequence[float]) -> list[StepOutcome]:
        results = self._losses(x, betas)
        for p in self.params:
            p.grad = None
        torch.autograd.backward([r.loss for r in results])
        for i, params in enumerate(self.member_params):  # each run's optimizer sees its own slice
            for mp, sp in zip(params, self.params, strict=True):
                mp.grad = None if sp.grad is None else sp.grad[i]
        bound_sums, probes = self._readout(results)
        taken = [math.isfinite(probes[i]) or all_finite(results[i].loss, self._grads(i)) for i in range(self.runs)]
        step_optimizers([r.optimizer for r, t in zip(self.members, taken, strict=True) if t])
        return [StepOutcome(results[i], bound_sums[i], taken[i]) for i in range(self.runs)]

    def _grads(self, i: int) -> list[Tensor]:
        return [p.grad for p in self.member_params[i] if p.grad is not None]

    def _losses(self, x: Tensor, betas: Sequence[float]) -> list[ObjectiveResult]:
        """The stacked forward pass and each run's objective on its share of the terms."""
        tails = self._tails.get(tuple(x.shape))
        record: list[bool] | None = [] if tails is None else None
        mode = RunwiseTails(self.runs, record) if tails in (None, True) else contextlib.nullcontext()
        with precision_context(self.precision, self.device), noise_source(self.noise), mode:
            terms = self.model.log_weight_terms(x, self.n_samples, stop_posterior_grad=self.detach)
        if record is not None:
            self._tails[tuple(x.shape)] = torch.get_num_threads() > 1 or any(record)
        scales: list[Tensor | None] = [None] * self.runs
        results = []
        for i, (m, t) in enumerate(zip(self.members, _split_runs(terms, self.runs), strict=True)):
            def collect(_: LogWeightTerms, scale: Tensor, i: int = i) -> None:
                scales[i] = scale

            with precision_context(self.precision, self.device):
                results.append(estimate_from_terms(self.model, t, m.plan, m.estimator, betas[i],
                                                   scale_samples=collect, keep_graph=True))
        if any(s is not None for s in scales):
            (z,) = terms.z.values()
            if z.requires_grad:
                ones = torch.ones_like(next(s for s in scales if s is not None))
                scale = torch.stack([ones if s is None else s for s in scales]).movedim(0, 1)  # [n, S, B]
                z.register_hook(lambda g: g * scale.reshape(scale.shape + (1,) * (g.dim() - 3)))
        return results

    def _readout(self, results: list[ObjectiveResult]) -> tuple[list[float], list[float]]:
        """Each run's summed bound, and a number finite when its loss and gradients are, in one
        transfer (as :func:`step_readout` does for one run)."""
        bounds = torch.stack([r.bound.detach().sum().float() for r in results])
        probe = torch.stack([r.loss.detach().float() for r in results])
        norms = [torch.nn.utils.get_total_norm(g, foreach=True).float() if g else torch.zeros((), device=probe.device)
                 for g in (self._grads(i) for i in range(self.runs))]
        probe = probe + torch.stack(norms)
        values = torch.cat([bounds, probe]).tolist()
        return values[: self.runs], values[self.runs:]


class FusedStackStep:
    """Several runs of one shape through one fused step (elbolab.fused.StackedFusedStep): batched
    products over the runs, each run's noise from its own generator, one Adam kernel call. Each
    run's numbers are those of its fused step alone: where the batched kernels would not give
    them at a batch's shape (StackedFusedStep.exact_at), or where the runs' fused steps are
    compiled (elbolab.fused_cpp: one call per run, the stack's torch ops would not give its
    bits), the runs step one after another through their own fused steps."""

    def __init__(self, runs: Sequence[StepRun]) -> None:
        self.members = list(runs)
        self.compiled = any(r.fused.compiled is not None for r in self.members)
        #: the batched step, not built for compiled runs (it would restack their parameters unused)
        self.fused = None if self.compiled else StackedFusedStep([r.fused for r in self.members],
                                                                 [r.generator for r in self.members])
        self.model = self.members[0].model
        self.alone = [FusedRunStep(r) for r in self.members]

    def step(self, x: Tensor, betas: Sequence[float]) -> list[StepOutcome]:
        if self.fused is not None and self.fused.exact_at(x):
            return [StepOutcome(*out) for out in self.fused.step(x, list(betas))]
        return [out for i, one in enumerate(self.alone) for out in one.step(x[i:i + 1], betas[i:i + 1])]


def fused_stackable(runs: Sequence[StepRun]) -> bool:
    """Whether ``runs`` can share one fused step: each has one, of one shape, and its own generator."""
    steps = [r.fused for r in runs]
    if any(s is None for s in steps) or any(r.generator is None for r in runs):
        return False
    return all(s.shape() == steps[0].shape() for s in steps)


def make_step(runs: Sequence[StepRun]) -> Step:
    """The step for a stack of ``runs``: for one, its adversarial step where it has an adversary,
    its fused step where it has one, else the plain autograd step; for several, one fused step
    where every run has one of one shape, else the stacked model."""
    if not runs:
        raise ValueError("a step needs at least one run")
    if any(r.adversary_optimizer is not None for r in runs):
        if len(runs) > 1:
            raise ValueError("a model trained with an adversary trains alone, not in a stack")
        return AdversarialStep(runs[0])
    if len(runs) > 1:
        return FusedStackStep(runs) if fused_stackable(runs) else StackedStep(runs)
    return FusedRunStep(runs[0]) if runs[0].fused is not None else PlainStep(runs[0])


def _fused_adam_lists(opt: torch.optim.Adam, group: dict[str, Any]) -> tuple[tuple[list, ...], bool]:
    """The six tensor lists (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    ``Adam.step`` hands its kernel, and whether any is complex.

    Why a private method: ``Adam._init_group`` is the one place that lazily creates Adam's state
    exactly as ``step`` does; tests/test_train_step.py fails when its signature or lists change.
    """
    lists: tuple[list, ...] = ([], [], [], [], [], [])
    has_complex = opt._init_group(group, *lists)
    return lists, bool(has_complex)


def step_optimizers(optimizers: list[torch.optim.Optimizer]) -> None:
    """``opt.step()`` for each; fused Adams sharing their settings step in one kernel call.

    The call is the one ``torch.optim.Adam.step`` makes, given every run's tensors at once
    (the kernel treats each tensor on its own), so each run's parameters and state come out
    as its own step would leave them, less the Python around S separate steps.
    """
    batches: dict[tuple, list] = {}
    for opt in optimizers:
        plain = type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1
        group = opt.param_groups[0]
        if plain or not group.get("fused") or group.get("capturable") or group.get("differentiable"):
            opt.step()
            continue
        lists, has_complex = _fused_adam_lists(opt, group)
        key = (group["lr"], *group["betas"], group["weight_decay"], group["eps"], group["amsgrad"],
               group["maximize"], group["decoupled_weight_decay"], has_complex)
        batch = batches.setdefault(key, [[], [], [], [], [], []])
        for acc, part in zip(batch, lists, strict=True):
            acc.extend(part)
    for (lr, beta1, beta2, wd, eps, amsgrad, maximize, decoupled, has_complex), lists in batches.items():
        adam_update(*lists, fused=True, has_complex=has_complex, decoupled_weight_decay=decoupled,
                    amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=wd, eps=eps,
                    maximize=maximize)
