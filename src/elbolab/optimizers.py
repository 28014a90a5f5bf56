"""Optimizers by the name a config uses (``train.optimizer``): ``adam`` and ``adamnormgrad``.

``adamnormgrad`` is the optimizer of Tomczak & Welling's VampPrior code (utils/optimizer.py):
before an Adam update, each parameter's gradient is divided by its own L2 norm (over
the whole tensor) plus 1e-7. The update that follows is their Adam, which adds eps to
the square root of the raw second moment and folds both bias corrections into the step:

    g~ = g / (||g||_2 + 1e-7)
    m = beta1 m + (1 - beta1) g~,    v = beta2 v + (1 - beta2) g~^2
    p = p - lr sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .config import TrainConfig
from .registry import Registry

#: added to each gradient's norm before dividing (a constant in their code, not eps)
NORM_EPS = 1e-7


class AdamNormGrad(torch.optim.Optimizer):
    """Adam on per-parameter normalized gradients (see the module docstring).

    State per parameter: ``step`` (a Python int), ``exp_avg`` and ``exp_avg_sq``; it
    round-trips through ``state_dict`` like torch's Adam. The arithmetic runs as a few
    multi-tensor (``torch._foreach_*``) kernels per step, with no host synchronization.
    Why private ops: ``torch._foreach_*`` are what torch's own optimizers step with and have no
    public twin; test_adamnormgrad_matches_the_hand_computed_update fails if they change.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            grads = [p.grad for p in params]
            norms = torch._foreach_norm(grads)
            torch._foreach_add_(norms, NORM_EPS)
            grads = torch._foreach_div(grads, norms)
            exp_avg = [self.state[p]["exp_avg"] for p in params]
            exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_mul_(exp_avg, beta1)
            torch._foreach_add_(exp_avg, grads, alpha=1 - beta1)
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sq)
            torch._foreach_add_(denom, group["eps"])
            # per parameter: one that had no gradient at some step has taken fewer steps
            steps = [self.state[p]["step"] for p in params]
            sizes = [-group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t) for t in steps]
            torch._foreach_addcdiv_(params, exp_avg, denom, sizes)
        return loss


def _adam(params: Iterable[Tensor], lr: float, betas: tuple[float, float], eps: float,
          device: torch.device) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters where torch has it (docs/bench.md measures it)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=device.type in ("cpu", "cuda"))


def _adamnormgrad(params: Iterable[Tensor], lr: float, betas: tuple[float, float], eps: float,
                  device: torch.device) -> torch.optim.Optimizer:
    return AdamNormGrad(params, lr=lr, betas=betas, eps=eps)


#: ``train.optimizer`` -> builder(params, lr, betas, eps, device); ``train.adam_betas`` /
#: ``adam_eps`` apply to both
OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer", {
    "adam": _adam,
    "adamnormgrad": _adamnormgrad,
})


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device | str,
                   params: Iterable[torch.nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, over ``params`` (default: every parameter of ``model``)."""
    build = OPTIMIZERS.get_checked(cfg.optimizer, "train.optimizer")
    return build(model.parameters() if params is None else params, cfg.lr, cfg.adam_betas, cfg.adam_eps,
                 torch.device(device))
