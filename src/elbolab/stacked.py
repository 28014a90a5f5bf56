"""Many runs as one model: runs of one shape trained side by side, each bit for bit as alone.

Runs whose configs agree on everything that shapes a training step (:func:`stack_key`: the
data, the model, the batch size, the draws per data point, whether log q is detached, the
precision, the device and threads) may differ in seed, objective, estimator, KL warm-up,
learning rate, optimizer, schedule, epochs and early stopping. They train as one model
(models.stacked): parameters stacked along a run axis, one forward and one backward pass
for all, each run's bound and loss built from its own share of the log weights, and each
run's optimizer stepped on its own slice. Every run keeps its own data order, random stream
(a generator seeded as the run alone seeds torch's), metrics, checkpoints and run folder:
each folder is an ordinary run folder that ``load_run`` reads and ``train --resume``
continues, alone or in a stack.

On a CPU each run ends with the bits of the same run trained alone (tests/test_stacked.py,
and tests/test_crash_resume.py after a SIGKILL); models/stacked.py says why that holds.
Runs found at different points (a stack put together from checkpoints written at
different steps) are brought level first: the runs furthest behind step together until
they reach the next ones.

Non-finite steps, per run: a run whose loss or gradient is not finite is handled by its
own ``train.nonfinite``: skipped (its optimizer does not step, the others' do) or stopped
(its folder says "failed" with the error, it leaves the stack, the others go on). No value
of one run enters another's arithmetic, so one run's NaN leaves the others' bits unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as adam_update
from tqdm.auto import tqdm

from .config import ConfigError, RunConfig
from .data import ImageDataset, load
from .distributions import noise_source
from .fastpaths import add_float32_outputs, precision_context, retain_freed_memory
from .files import fault_point
from .models import build_model
from .models.base import LogWeightTerms
from .models.stacked import RunwiseTails, run_noise, stack_models
from .objectives import BoundPlan, ObjectiveResult, detaches_posterior, estimate_from_terms, objective_plan
from .runs import INFO, read_json
from .schedules import kl_weight
from .sinks import MetricSink, open_sinks
from .training import (
    EpochMonitor,
    NonFiniteError,
    Trainer,
    all_finite,
    close_sinks,
    graceful_signals,
    take_step,
)

log = logging.getLogger("elbolab")

#: config keys that may differ between the runs of one stack (everything else must agree)
STACK_FREE_KEYS = frozenset({
    "data.binarization_seed", "data.data_dir",
    "objective.name", "objective.k", "objective.m", "objective.beta", "objective.estimator",
    "objective.warmup_epochs",
    "train.seed", "train.lr", "train.adam_eps", "train.adam_betas", "train.optimizer", "train.schedule",
    "train.epochs", "train.early_stopping_patience", "train.nonfinite", "train.max_nonfinite_skips",
    "train.eval_every", "train.tensorboard", "train.progress", "train.checkpoint_minutes",
    "train.checkpoint_steps",
})
#: whole sections that may differ (evaluation settings; they do not touch the training step)
STACK_FREE_SECTIONS = frozenset({"eval"})


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def stack_key(cfg: RunConfig) -> dict[str, Any]:
    """What runs must share to train in one stack: every config key but :data:`STACK_FREE_KEYS`,
    plus the draws per data point and whether log q is detached (STL and DReG detach it)."""
    plan, estimator = objective_plan(cfg.objective)
    key = {k: v for k, v in _flat(cfg.to_dict()).items()
           if k not in STACK_FREE_KEYS and k.split(".", 1)[0] not in STACK_FREE_SECTIONS}
    key["draws per data point"] = plan.n_samples
    key["log q detached (stl, dreg)"] = detaches_posterior(estimator)
    return key


@functools.lru_cache(maxsize=64)
def _parameter_outside_linear(model_json: str, dataset: str) -> str | None:
    """Why the model a config section builds cannot be stacked (a parameter outside an ``nn.Linear``
    layer: models.stacked stacks only those), or None. Built on the meta device: the structure
    without its memory or arithmetic."""
    model_cfg = RunConfig.from_dict({"model": json.loads(model_json), "data": {"name": dataset}}).model
    try:
        with torch.device("meta"):
            model = build_model(model_cfg, 784, dataset=dataset)
    except Exception as e:  # noqa: BLE001 - a model that cannot be built here is not stacked
        return f"its model could not be checked ({type(e).__name__})"
    inside = {f"{n}.{p}" for n, m in model.named_modules() if type(m) is torch.nn.Linear for p, _ in
              m.named_parameters(recurse=False)}
    outside = next((n for n, _ in model.named_parameters() if n not in inside), None)
    return None if outside is None else f"parameter {outside!r} is not in a Linear layer"


#: builds a run's epoch monitor from its config and data (None: not monitored); the caller
#: supplies it, as the monitor lives above training (diagnostics.monitor.CollapseMonitor.for_run)
MonitorFactory = Callable[[RunConfig, ImageDataset], EpochMonitor | None]


def _monitor(monitors: MonitorFactory | None, cfg: RunConfig, dataset: ImageDataset | None) -> EpochMonitor | None:
    if monitors is None or not cfg.train.monitor_every:
        return None
    d = cfg.data
    return monitors(cfg, dataset if dataset is not None else load(d.name, d.data_dir, validation=d.validation))


def stack_refusal(cfg: RunConfig) -> str | None:
    """Why ``cfg`` trains alone whatever it is packed with, or None."""
    if cfg.train.compile:
        return "train.compile=true (a compiled step is not stacked)"
    return _parameter_outside_linear(json.dumps(cfg.to_dict()["model"], sort_keys=True, default=str), cfg.data.name)


def pack(configs: Sequence[RunConfig]) -> list[list[int]]:
    """Indices of ``configs`` grouped into stacks (first appearance order): runs with equal
    :func:`stack_key` share one, a run :func:`stack_refusal` refuses is alone."""
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        key = f"alone-{i}" if stack_refusal(cfg) else json.dumps(stack_key(cfg), sort_keys=True, default=str)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def check_stackable(configs: Sequence[RunConfig]) -> None:
    """A :class:`ConfigError` naming the first key on which a run differs from the first one."""
    first = stack_key(configs[0])
    for i, cfg in enumerate(configs):
        reason = stack_refusal(cfg)
        if reason:
            raise ConfigError(f"run {i}: cannot be stacked: {reason}")
        other = stack_key(cfg)
        for k in first:
            if first[k] != other.get(k):
                raise ConfigError(f"run {i}: cannot be stacked with run 0: {k} is {other.get(k)!r}, not {first[k]!r}")


@dataclass
class RunOutcome:
    """How one run of a stack ended: ``finished`` (trained here or before), ``failed`` or ``interrupted``."""

    run_dir: Path
    status: str
    error: str | None = None


@dataclass
class StackRun:
    """What one run brings to a stacked step: its model and optimizer (the stack steps them),
    the objective it trains (the plain step's callable, and its bound plan and estimator),
    and its own random stream, which draws the run's samples as torch's global one would alone."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    objective: Any
    plan: BoundPlan
    estimator: str
    generator: torch.Generator
    precision: str = "fp32"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def of(cls, trainer: Trainer) -> StackRun:
        """A trainer's run, its stream taken from torch's global one as it stands now."""
        plan, estimator = objective_plan(trainer.cfg.objective)
        return cls(trainer.model, trainer.optimizer, trainer.objective, plan, estimator,
                   _take_generator(trainer.device), trainer.cfg.train.precision, trainer.device)


@dataclass
class _Member:
    trainer: Trainer
    run: StackRun
    #: the current epoch's batches (None between epochs), its learning rate and start time
    batches: tuple[Tensor, ...] | None = None
    lr: float = 0.0
    t0: float = 0.0
    sinks: list[MetricSink] = field(default_factory=list)
    status: str = "running"
    error: str | None = None

    @property
    def generator(self) -> torch.Generator:
        return self.run.generator

    @property
    def position(self) -> tuple[int, int]:
        return self.trainer.epoch, self.trainer.next_batch

    @property
    def live(self) -> bool:
        return self.status == "running"


def _global_rng(device: torch.device, state: Tensor | None = None) -> Tensor:
    """Torch's global stream for ``device``: read it, or set it to ``state`` first."""
    if device.type == "cuda":
        if state is not None:
            torch.cuda.set_rng_state(state, device)
        return torch.cuda.get_rng_state(device)
    if state is not None:
        torch.set_rng_state(state)
    return torch.get_rng_state()


def _take_generator(device: torch.device) -> torch.Generator:
    """A generator holding torch's global stream as it is now (as a run alone would draw on)."""
    g = torch.Generator(device=device)
    g.set_state(_global_rng(device))
    return g


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


class Stack:
    """Runs stepping together: their stacked model and one training step for all.

    The runs' models' parameters become views of the stack's (models.stacked.stack_models);
    a stack of one steps its run with the plain step (training.take_step).
    """

    def __init__(self, runs: Sequence[StackRun]) -> None:
        self.members = list(runs)
        self.runs = len(self.members)
        first = self.members[0]
        self.n_samples = first.plan.n_samples
        self.detach = detaches_posterior(first.estimator)
        self.precision, self.device = first.precision, first.device
        if self.runs == 1:
            self.model = first.model
            return
        self.model = stack_models([r.model for r in self.members])
        if self.precision != "fp32":
            add_float32_outputs(self.model)  # bf16 products, float32 results (fastpaths.with_precision)
        self.params = [p for _, p in self.model.named_parameters()]
        names = [n for n, _ in self.model.named_parameters()]
        self.member_params = [[dict(r.model.named_parameters())[n] for n in names] for r in self.members]
        self.noise = run_noise([r.generator for r in self.members])
        #: input shape -> whether elementwise tails need running run by run (models.stacked)
        self._tails: dict[tuple[int, ...], bool] = {}

    # --- one step ------------------------------------------------------------------
    def step(self, x: Tensor, betas: Sequence[float]) -> list[tuple[ObjectiveResult, float, bool]]:
        """One optimizer step of every run on its batch ``x[i]`` (``x``: [S, B, D]) at KL weight
        ``betas[i]``; per run: its result, its summed bound and whether its step was taken."""
        if self.runs == 1:
            r = self.members[0]
            with noise_source(lambda shape, dtype, device: torch.randn(shape, generator=r.generator, dtype=dtype,
                                                                       device=device)):
                return [take_step(r.model, r.optimizer, r.objective, x[0], betas[0])]
        results = self._losses(x, betas)
        for p in self.params:
            p.grad = None
        torch.autograd.backward([r.loss for r in results])
        for i, params in enumerate(self.member_params):  # each run's optimizer sees its own slice
            for mp, sp in zip(params, self.params, strict=True):
                mp.grad = None if sp.grad is None else sp.grad[i]
        bound_sums, probes = self._readout(results)
        taken = [math.isfinite(probes[i]) or all_finite(results[i].loss, self._grads(i)) for i in range(self.runs)]
        _step_optimizers([r.optimizer for r, t in zip(self.members, taken, strict=True) if t])
        return [(results[i], bound_sums[i], taken[i]) for i in range(self.runs)]

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
        """Each run's summed bound, and a number finite when its loss and gradients are, in one transfer
        (as training.step_readout does for one run)."""
        bounds = torch.stack([r.bound.detach().sum().float() for r in results])
        probe = torch.stack([r.loss.detach().float() for r in results])
        grads = [g for i in range(self.runs) for g in self._grads(i)]
        if grads:
            norms = torch.stack(torch._foreach_norm(grads)).float()
            probe = probe + norms.view(self.runs, -1).sum(1)
        values = torch.cat([bounds, probe]).tolist()
        return values[: self.runs], values[self.runs:]


def _step_optimizers(optimizers: list[torch.optim.Optimizer]) -> None:
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
        lists: tuple[list, ...] = ([], [], [], [], [], [])
        has_complex = opt._init_group(group, *lists)
        key = (group["lr"], *group["betas"], group["weight_decay"], group["eps"], group["amsgrad"],
               group["maximize"], group["decoupled_weight_decay"], has_complex)
        batch = batches.setdefault(key, [[], [], [], [], [], []])
        for acc, part in zip(batch, lists, strict=True):
            acc.extend(part)
    for (lr, beta1, beta2, wd, eps, amsgrad, maximize, decoupled, has_complex), lists in batches.items():
        adam_update(*lists, fused=True, has_complex=has_complex, decoupled_weight_decay=decoupled,
                              amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=wd, eps=eps,
                              maximize=maximize)


def _finished(run_dir: Path) -> bool:
    if not (run_dir / INFO).exists():
        return False
    with contextlib.suppress(Exception):
        return read_json(run_dir / INFO).get("status") == "finished"
    return False


class StackedTrainer:
    """Train several runs of one shape as one stacked model; see the module docstring.

    ``runs`` pairs each run's config with its run folder. A folder holding a finished run is
    left as it is; an unfinished one of the same config is continued from its checkpoint.
    """

    def __init__(self, runs: Sequence[tuple[RunConfig, str | Path]], dataset: ImageDataset | None = None,
                 monitors: MonitorFactory | None = None) -> None:
        if not runs:
            raise ConfigError("a stack needs at least one run")
        configs = [cfg for cfg, _ in runs]
        check_stackable(configs)
        d = configs[0].data
        self.dataset = dataset if dataset is not None else load(d.name, d.data_dir, validation=d.validation)
        self.runs = [(cfg, Path(p)) for cfg, p in runs]
        self.monitors = monitors
        self.members: list[_Member] = []
        self.outcomes: dict[Path, RunOutcome] = {}
        self._interrupt: str | None = None
        self._stack: Stack | None = None
        self._bar: Any = None
        self._bar_key: tuple = ()

    # --- setting up -------------------------------------------------------------------
    def _add_member(self, cfg: RunConfig, run_dir: Path, resume: bool | None) -> None:
        trainer = Trainer(cfg, run_dir, self.dataset, _monitor(self.monitors, cfg, self.dataset))
        trainer.line_prefix = f"{run_dir.name}: "
        for m in self.members:  # one copy of the training images per binarization, not per run
            if (m.trainer.batcher.binarization, m.trainer.cfg.data.binarization_seed) == (
                    trainer.batcher.binarization, cfg.data.binarization_seed):
                trainer.batcher.data = m.trainer.batcher.data
                trainer.valid = m.trainer.valid
                break
        trainer.prepare_run_dir(resume)  # a resumed run restores torch's stream from its checkpoint
        member = _Member(trainer, StackRun.of(trainer))
        self.members.append(member)  # from here its lock is released with the others'
        member.sinks = open_sinks(cfg, run_dir, trainer.epoch + 1)
        if trainer.epoch >= cfg.train.epochs or trainer.finished:
            self._finish(member)

    # --- persistence ------------------------------------------------------------------
    def _save(self, m: _Member) -> None:
        """A run's checkpoint, its random stream recorded where a run alone keeps it."""
        _global_rng(m.trainer.device, m.generator.get_state())
        m.trainer.save_checkpoint()

    def _finish(self, m: _Member) -> None:
        _global_rng(m.trainer.device, m.generator.get_state())
        m.trainer.finish()
        m.status = "finished"
        self.outcomes[m.trainer.run_dir] = RunOutcome(m.trainer.run_dir, "finished")

    def _fail(self, m: _Member, error: str, status: str = "failed") -> None:
        m.status, m.error = status, error
        m.trainer._write_info_quietly(status, error if status == "failed" else None)
        self.outcomes[m.trainer.run_dir] = RunOutcome(m.trainer.run_dir, status, error)

    # --- training ---------------------------------------------------------------------
    def fit(self, resume: bool | None = None) -> list[RunOutcome]:
        """Train every run to its end; returns how each ended, in the order given.

        ``resume`` as in ``Trainer.prepare_run_dir`` (None: continue an unfinished run of the
        same config in a folder, else start one). A run stopped by its non-finite policy is
        reported as failed and the others go on; Ctrl-C or SIGTERM checkpoints every run and
        raises KeyboardInterrupt.
        """
        try:
            for cfg, run_dir in self.runs:
                if _finished(run_dir):
                    self.outcomes[run_dir] = RunOutcome(run_dir, "finished")
                    continue
                self._add_member(cfg, run_dir, resume)
        except BaseException:  # a run refused (in use, damaged): the runs taken so far are let go untouched
            self._release()
            raise
        try:
            with self._graceful_signals():
                while True:
                    live = [m for m in self.members if m.live]
                    if not live:
                        break
                    low = min(m.position for m in live)
                    self._advance([m for m in live if m.position == low])
        except KeyboardInterrupt:
            for m in self.members:
                if m.live:
                    self._fail(m, self._interrupt or "interrupted", "interrupted")
            raise
        except Exception as e:  # never leave a run marked "running": say how the stack ended, then re-raise
            for m in self.members:
                if m.live:
                    self._fail(m, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
            self._release()
        return [self.outcomes[run_dir] for _, run_dir in self.runs]

    def _release(self) -> None:
        """Close each run's metric sinks and let go of its folder (the lock prepare_run_dir took)."""
        for m in self.members:
            close_sinks(m.sinks)
            m.sinks = []
            m.trainer.release()

    def _progress(self, active: list[_Member], i: int, n: int) -> None:
        """One bar per epoch of the runs stepping, as ``Trainer.train_epoch`` shows one run's."""
        t = active[0].trainer
        key = (t.epoch, tuple(id(m) for m in active))
        if self._bar is None or self._bar_key != key:
            if self._bar is not None:
                self._bar.close()
            self._bar_key = key
            self._bar = tqdm(total=n, initial=i, leave=False, unit="batch",
                             desc=f"epoch {t.epoch + 1}/{t.cfg.train.epochs}, {len(active)} runs stacked",
                             disable=None if any(m.trainer.cfg.train.progress for m in active) else True)
        self._bar.update(1)

    def _advance(self, active: list[_Member]) -> None:
        """One step of the runs at the lowest position, and the end of their epoch when it comes."""
        if self._stack is None or [id(r) for r in self._stack.members] != [id(m.run) for m in active]:
            self._stack = Stack([m.run for m in active])
        for m in active:
            if m.batches is None:
                m.batches, m.lr = m.trainer.begin_epoch()
                m.t0 = time.perf_counter()
        i = active[0].trainer.next_batch
        n = len(active[0].batches)
        self._progress(active, i, n)
        ids = [m.batches[i] for m in active]
        x = torch.stack([m.trainer.batcher.batch(idx) for m, idx in zip(active, ids, strict=True)])
        betas = [kl_weight(m.trainer.epoch + i / n, m.trainer.cfg.objective.warmup_epochs) for m in active]
        for m, idx, (res, bound_sum, taken) in zip(active, ids, self._stack.step(x, betas), strict=True):
            t = m.trainer
            t.step += 1
            if taken:
                t.epoch_bound_sum += bound_sum
                t.epoch_count += x.shape[1]
            else:
                try:
                    t.handle_fault(res, f"epoch {t.epoch + 1}, batch {i}", idx)
                except NonFiniteError as e:
                    log.error("run %s: %s", t.run_dir, e)
                    self._fail(m, str(e))
            t.next_batch = i + 1
        fault_point("step")
        stepped = [m for m in active if m.live]
        if self._interrupt or (i + 1 < n and any(m.trainer._checkpoint_due() for m in stepped)):
            for m in stepped:
                self._save(m)
            self._raise_if_interrupted()
        if i + 1 == n:
            for m in stepped:
                self._close_epoch(m, n)
            self._raise_if_interrupted()

    def _close_epoch(self, m: _Member, n: int) -> None:
        t = m.trainer
        row: dict[str, Any] = {"epoch": t.epoch + 1, **t.epoch_summary(n, m.lr)}
        _global_rng(t.device, m.generator.get_state())  # the checkpoint close_epoch writes
        m.sinks = t.close_epoch(row, m.t0, m.sinks)
        m.batches = None
        if t.epoch >= t.cfg.train.epochs or t.finished:
            self._finish(m)

    # --- signals ----------------------------------------------------------------------
    def _raise_if_interrupted(self) -> None:
        if self._interrupt:
            for m in self.members:
                if m.live:
                    self._save(m)
            log.warning("%s: every run's checkpoint written; stopping", self._interrupt)
            raise KeyboardInterrupt(self._interrupt)

    def _graceful_signals(self) -> contextlib.AbstractContextManager[None]:
        """Ctrl-C / SIGTERM: checkpoint every run after the current step and stop."""
        return graceful_signals(self)


def train_stacked(runs: Sequence[tuple[RunConfig, str | Path]], resume: bool | None = None,
                  dataset: ImageDataset | None = None, monitors: MonitorFactory | None = None) -> list[RunOutcome]:
    """Train ``runs`` (config, folder) in stacks of one shape (:func:`pack`), one stack after another;
    ``monitors`` builds each run's epoch monitor (training.EpochMonitor), as a run alone gets it."""
    retain_freed_memory()
    configs = [cfg for cfg, _ in runs]
    outcomes: dict[int, RunOutcome] = {}
    for group in pack(configs):
        if len(group) == 1:
            cfg, run_dir = runs[group[0]]
            outcomes[group[0]] = train_alone(cfg, Path(run_dir), resume, dataset, monitors)
            continue
        trainer = StackedTrainer([runs[i] for i in group], dataset, monitors)
        for i, outcome in zip(group, trainer.fit(resume), strict=True):
            outcomes[i] = outcome
    return [outcomes[i] for i in range(len(runs))]


def train_alone(cfg: RunConfig, run_dir: Path, resume: bool | None = None, dataset: ImageDataset | None = None,
                monitors: MonitorFactory | None = None) -> RunOutcome:
    """One run with the plain trainer, reported as a stack's run is (a finished folder is left as it is)."""
    if _finished(run_dir):
        return RunOutcome(run_dir, "finished")
    try:
        Trainer(cfg, run_dir, dataset, _monitor(monitors, cfg, dataset)).fit(resume=resume)
    except NonFiniteError as e:
        return RunOutcome(run_dir, "failed", str(e))
    return RunOutcome(run_dir, "finished")
