"""Speed tricks, each beside the plain form it replaces; nothing else in elbolab is clever.

Each trick is exact in law and equal to its twin up to float rounding (tests/test_fastpaths.py
checks every pair against float64), and each steps aside where it measured no faster
(docs/bench.md has the measurements and the commands):

- :class:`Tanh`: ``2 sigmoid(2a) - 1`` without gradients (twin: ``torch.tanh``);
- :func:`sum_softplus_`: the softplus sum through products of sigmoids (twin: ``softplus(l).sum(-1)``);
- :func:`bernoulli_log_prob`: the Bernoulli log-density through the decoder's last Linear
  layer without ``[K, B, D]`` temporaries (twin: ``log_bernoulli_logits(x, layer(h))``);
- :func:`compile_objective`: the training objective under ``torch.compile`` (twin: eager);
- :func:`with_precision`: the training step's matrix products in bfloat16, everything else in
  float32 (``train.precision``; twin: float32 throughout);
- :func:`retain_freed_memory`: a process-wide allocator setting, made once by an entry point.

A captured training step (a whole step, optimizer included, as one CUDA graph) would go here
too, beside the plain step it replaces (training.take_step).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributions import log_bernoulli_logits
from .registry import Registry

log = logging.getLogger(__name__)

# --- tanh -------------------------------------------------------------------------------

#: below this many elements torch.tanh's one pass beats the four of the sigmoid form
TANH_SIGMOID_MIN_NUMEL = 1 << 15


def _tanh_from_sigmoid(a: Tensor) -> Tensor:
    y = torch.sigmoid(a * 2.0)
    return y.mul_(2.0).sub_(1.0)


class Tanh(nn.Tanh):
    """tanh, as ``2 sigmoid(2a) - 1`` when no gradient is needed and the input is large.

    torch's CPU tanh is several times slower than its sigmoid, and the decoder's tanh
    layers are a large part of an importance-sampling pass. The identity is exact; in
    float32 the result is within 2e-7 of tanh (absolute), which the next layer's matrix
    product cannot tell from its own rounding. With gradients (training) and on small
    inputs it is torch.tanh: there the rewrite measured no faster.
    """

    def forward(self, a: Tensor) -> Tensor:
        if (torch.is_grad_enabled() and a.requires_grad) or a.numel() < TANH_SIGMOID_MIN_NUMEL:
            return torch.tanh(a)
        return _tanh_from_sigmoid(a)


# --- the softplus sum ---------------------------------------------------------------------

#: halvings in :func:`sum_softplus_`: each slot then holds a product of at most 2^5 = 32
#: factors in [1/2, 1], so at least 2^-32, far from float32's smallest normal (2^-126)
_HALVINGS = 5


def sum_softplus_(logits: Tensor) -> Tensor:
    """``softplus(logits).sum(-1)``, overwriting ``logits`` (scratch).

    ``softplus(l) = relu(l) - log sigmoid(|l|)``, and ``sigmoid(|l|)`` lies in [1/2, 1],
    so the logs of D factors can be taken as the log of a few products of 32 (made by
    halving the last axis in place): one sigmoid pass and a few multiplies replace
    ``log1p(exp(l))`` on every pixel (both transcendental, and torch's CPU ``log1p`` is
    slow). Each factor is rounded once and each product picks up at most 32 roundings.
    ``sum relu(l) = (sum l + sum |l|) / 2`` is rounded at the size of ``sum |l|`` rather
    than of the softplus sum: for a trained-looking decoder, log p(x, z) lands about one
    float32 ulp from float64 on average (a float64 sum or a relu temporary would cost the
    speed back).
    """
    total = logits.sum(-1)
    logits.abs_()
    relu = (total + logits.sum(-1)) * 0.5
    return relu - _log_prod_(torch.sigmoid(logits, out=logits))


def _log_prod_(p: Tensor) -> Tensor:
    """``log(p).sum(-1)`` for p in [1/2, 1] as the log of products of 32, made in place."""
    n = p.shape[-1]
    for _ in range(_HALVINGS):
        h = n // 2
        if h == 0:
            break
        p[..., :h].mul_(p[..., h : 2 * h])
        if n % 2:  # the odd factor out moves next to the products and rides along
            p[..., h].copy_(p[..., 2 * h])
        n = h + n % 2
    return p[..., :n].log().sum(-1)


# --- the Bernoulli log-density through the last layer ---------------------------------------


def log_bernoulli_linear_(x: Tensor, features: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``log_bernoulli_logits(x, features @ weight.T + bias)`` without gradients.

    ``x`` [B, D], ``features`` [..., B, H], ``weight`` [D, H]: ``[..., B]``. The general
    form's two ``[K, B, D]`` temporaries (``x * logits`` and the softplus) cost more in
    fresh memory pages than their arithmetic; here ``sum_d x_d logits_d =
    features . (x @ weight) + x . bias`` is an ``[..., B, H]`` product (H = 200 against
    D = 784 pixels for MNIST) and the softplus sum overwrites the logits it owns.
    Refuses inputs that need a gradient.
    """
    if torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad):
        raise ValueError("log_bernoulli_linear_ has no gradient; use log_bernoulli_logits on F.linear(...)")
    logits = F.linear(features, weight, bias)
    x_dot_logits = (features * (x @ weight)).sum(-1)
    if bias is not None:
        x_dot_logits = x_dot_logits + x @ bias
    return x_dot_logits - sum_softplus_(logits)


def bernoulli_log_prob(x: Tensor, features: Tensor, layer: nn.Linear) -> Tensor:
    """``log_bernoulli_logits(x, layer(features))``: the fast form when no gradient is needed."""
    if torch.is_grad_enabled() and (features.requires_grad or layer.weight.requires_grad):
        return log_bernoulli_logits(x, layer(features))
    return log_bernoulli_linear_(x, features, layer.weight, layer.bias)


# --- the compiled training objective ------------------------------------------------------

Objective = Callable[..., Any]


def _compiler_settings() -> None:
    """Settings compile_objective needs, process-wide (idempotent)."""
    import torch._inductor.config as inductor_config

    # compiled randn calls become torch's own: a compiled step draws the eager step's
    # samples, so a checkpoint's RNG state resumes it exactly
    inductor_config.fallback_random = True
    # every model, k and batch shape is its own graph of the one objective function: let a
    # process (a test session, a notebook) hold more of them than dynamo's default 8
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))


def compile_objective(objective: Objective, device: torch.device | str | None = None, mode: str | None = None
                      ) -> Objective:
    """``torch.compile`` of a training objective ``(model, x, kl_weight) -> ObjectiveResult``.

    Inductor fuses the step's elementwise work and drops most per-op dispatch, which is
    what bounds small batches on a CPU. Its values equal eager's to float rounding, on the
    same random draws (tests/test_compile.py). The first step pays the compilation; a new
    batch shape (the last, shorter batch of an epoch) compiles once more. ``mode`` is
    torch.compile's; given a CUDA ``device`` it defaults to ``"reduce-overhead"`` (CUDA
    graphs: a GPU step of these small models is bound by kernel launches).
    """
    if mode is None and device is not None and torch.device(device).type == "cuda":
        mode = "reduce-overhead"
    _compiler_settings()
    # static shapes: sample counts stay concrete for randn; a KL weight below 1 goes in
    # as a 0-dim tensor, so warm-up (a new weight every step) reuses one graph
    compiled = torch.compile(objective, dynamic=False, mode=mode)

    def run(model: nn.Module, x: Tensor, kl_weight: float = 1.0) -> Any:
        if kl_weight == 1.0:
            return compiled(model, x, 1.0)
        return compiled(model, x, torch.tensor(kl_weight, dtype=x.dtype, device=x.device))

    return run


# --- mixed precision -------------------------------------------------------------------------

#: ``train.precision`` -> the dtype of the training step's matrix products (float32: no autocast)
PRECISIONS: Registry[torch.dtype] = Registry("precision", {"fp32": torch.float32, "bf16": torch.bfloat16})


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware (on a CPU: AVX512-BF16 or AMX,
    as oneDNN sees it); elsewhere torch emulates them, many times slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _to_float32(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
    return output.float()


def with_precision(objective: Objective, model: nn.Module, precision: str, device: torch.device | str
                   ) -> Objective:
    """The training objective with its matrix products in ``precision`` (a :data:`PRECISIONS` name).

    ``fp32`` returns ``objective`` itself. ``bf16`` runs it under ``torch.autocast``, which
    multiplies in bfloat16 (the backward's products too), and makes every ``nn.Linear`` of
    ``model`` hand its output back in float32, so activations, log-densities, log weights,
    bounds, the parameters and the optimizer's state stay float32: only the products round
    to bfloat16. The hooks stay on the model and do nothing outside autocast, so evaluation
    is float32 (tests/test_precision.py bounds the step's error against float32).
    """
    dtype = PRECISIONS.get_checked(precision, "train.precision")
    if dtype == torch.float32:
        return objective
    device = torch.device(device)
    if not native_bf16(device):
        log.warning("train.precision=%s: this %s has no native bfloat16 matrix products; torch emulates them, "
                    "several times slower than float32", precision, device.type.upper())
    add_float32_outputs(model)

    def run(m: nn.Module, x: Tensor, kl_weight: float = 1.0) -> Any:
        with precision_context(precision, device):
            return objective(m, x, kl_weight)

    return run


def add_float32_outputs(model: nn.Module) -> None:
    """Every ``nn.Linear`` of ``model`` returns float32 (once per layer; see :func:`with_precision`)."""
    for layer in model.modules():
        if isinstance(layer, nn.Linear) and not getattr(layer, "_elbolab_float32_out", False):
            layer.register_forward_hook(_to_float32)
            layer._elbolab_float32_out = True


def precision_context(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context a training forward pass runs in for ``precision``: autocast, or nothing for fp32."""
    dtype = PRECISIONS.get_checked(precision, "train.precision")
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


# --- the allocator --------------------------------------------------------------------------

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: blocks below this come from the heap and are reused; above it, mmap as glibc does. Not
#: higher: with 1 GiB, ELBO surgery's 134 MB table chunks, freed between small results that
#: stay alive, could not be coalesced and the heap grew by a chunk per chunk
#: (tests/test_fastpaths.py replays the pattern)
MMAP_THRESHOLD = 64 << 20
#: free memory at the heap top is returned to the OS only beyond this (mallopt takes a C int)
TRIM_THRESHOLD = (1 << 31) - 1
#: set to 0 to leave the allocator alone
RETAIN_ENV_VAR = "ELBOLAB_RETAIN_FREED_MEMORY"

_retained = False


def retain_freed_memory() -> bool:
    """Keep freed CPU memory in the process, so that big temporaries stop page-faulting.

    glibc hands every freed block above its (adaptive) mmap threshold straight back to the
    OS and trims the heap top, so each ``[K, B, 784]`` temporary of a training step is a
    fresh mapping whose pages fault on first touch. Raising both thresholds lets the next
    step reuse the same pages, as torch's CUDA caching allocator does on a GPU; the
    process keeps its peak footprint instead of shrinking after it. Called once by an
    entry point (the CLI, the Python API's train); True if the thresholds are raised, False
    off glibc or when ``$ELBOLAB_RETAIN_FREED_MEMORY=0``.
    """
    global _retained
    if _retained:
        return True
    if os.environ.get(RETAIN_ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the thresholds; the allocator is unchanged")
        return False
    _retained = True
    return True
