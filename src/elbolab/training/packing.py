"""Which runs can share a step: runs that agree on everything that shapes it.

Runs whose configs agree on everything but :data:`STACK_FREE_KEYS` (the data, the model, the
batch size, the draws per data point, whether log q is detached, the precision, the device
and threads) may differ in seed, objective, estimator, KL warm-up, learning rate, optimizer,
schedule, epochs and early stopping, and train as one stacked model (step.StackedStep); under
``train.fused`` runs of one objective, k and estimator share one fused step (step.FusedStackStep).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import torch

from ..config import ConfigError, RunConfig
from ..models import build_model
from ..objectives import detaches_posterior, objective_plan

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
    plus the draws per data point and whether log q is detached (STL and DReG detach it), and under
    ``train.fused`` the objective, k and estimator (a fused stack computes one for all its runs)."""
    plan, estimator = objective_plan(cfg.objective)
    key = {k: v for k, v in _flat(cfg.to_dict()).items()
           if k not in STACK_FREE_KEYS and k.split(".", 1)[0] not in STACK_FREE_SECTIONS}
    key["draws per data point"] = plan.n_samples
    key["log q detached (stl, dreg)"] = detaches_posterior(estimator)
    if cfg.train.fused != "off":  # one fused step computes one objective, k and estimator for all its runs
        key["fused step"] = (cfg.objective.name, cfg.objective.k, cfg.objective.estimator)
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
    """A :class:`ConfigError` naming the first key on which a run differs from the first one
    (a single run is always its own stack)."""
    if len(configs) == 1:
        return
    first = stack_key(configs[0])
    for i, cfg in enumerate(configs):
        reason = stack_refusal(cfg)
        if reason:
            raise ConfigError(f"run {i}: cannot be stacked: {reason}")
        other = stack_key(cfg)
        for k in first:
            if first[k] != other.get(k):
                raise ConfigError(f"run {i}: cannot be stacked with run 0: {k} is {other.get(k)!r}, not {first[k]!r}")
