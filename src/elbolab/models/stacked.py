"""Several models of one architecture as one: every Linear layer stacked along a run axis.

:func:`stack_models` turns S models that share an architecture into one module whose
Linear layers hold ``[S, out, in]`` weights, and points each model's own parameters at
its slice of that storage, so that an optimizer stepping a model's parameters steps the
stack. The models' own code runs unchanged on the stack: an input is ``[S, B, D]`` and a
sample ``[K, S, B, D]`` (the sample axis stays first, as the models write it), so the
run axis is always dim -3 of anything a layer sees. Activations are stored run-major,
each run's share one contiguous block laid out as the run alone lays it out.

Why each run's numbers are the bits it gets alone (on a CPU; tests/test_stacked.py checks
whole training runs):

- a batched product over S slices computes each slice as the plain product does on it
  alone at these models' sizes (MKL runs one GEMM per slice), ``baddbmm`` as ``addmm`` and
  ``bmm`` as ``mm``; :class:`StackedLinear`'s backward uses the orientations ``nn.Linear``'s
  autograd uses. Where a shape's batched kernel differs (tiny or one-row matrices), the
  first call finds out (:func:`batched_agrees`) and that product goes slice by slice;
- elementwise kernels give the same bits wherever an element sits, except those whose
  vectorized loop finishes with a scalar tail (:data:`TAIL_SENSITIVE`: the tail's scalar
  formula rounds differently). :class:`RunwiseTails` runs those run by run;
- noise is drawn per run from the run's own generator (:func:`run_noise`).

Only models whose every parameter sits in an ``nn.Linear`` can be stacked (a learned prior
or a per-pixel variance would need its own stacked form); :func:`stack_models` names the
first parameter that is not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..distributions import NoiseSource

# --- batched products that reproduce the plain ones ---------------------------------------------

#: (product, slices, rows, in, out, dtype, device type, threads) -> whether the batched kernel
#: reproduces the plain one on every slice (measured once per shape: :func:`batched_agrees`)
_AGREES: dict[tuple, bool] = {}


def _plain(kind: str, a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
    """Slice by slice, each operand copied to its own allocation as a run alone holds it (MKL's
    small-matrix kernels round by alignment): ``fwd`` ``addmm(c, a, b.t())``, ``grad_in``
    ``a @ b``, ``grad_w`` ``a.t() @ b``; ``a`` [S, N, *], ``b`` [S, *, *], ``c`` [S, out]."""
    out = []
    for i in range(a.shape[0]):
        ai, bi = a[i].clone(), b[i].clone()
        if kind == "fwd":
            out.append(torch.addmm(c[i].clone(), ai, bi.t()))
        elif kind == "grad_in":
            out.append(ai.mm(bi))
        else:
            out.append(ai.t().mm(bi))
    return torch.stack(out)


def _batched(kind: str, a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
    """:func:`_plain` as one batched product."""
    if kind == "fwd":
        return torch.baddbmm(c.unsqueeze(1), a, b.transpose(1, 2))
    if kind == "grad_in":
        return torch.bmm(a, b)
    return torch.bmm(a.transpose(1, 2), b)


def _product(kind: str, a: Tensor, b: Tensor, c: Tensor | None, d_in: int, d_out: int) -> Tensor:
    """:func:`_batched` where it reproduces :func:`_plain` at this shape, else :func:`_plain`."""
    if batched_agrees(kind, a.shape[0], a.shape[1], d_in, d_out, a.dtype, a.device):
        return _batched(kind, a, b, c)
    return _plain(kind, a, b, c)


def batched_agrees(kind: str, runs: int, n: int, d_in: int, d_out: int, dtype: torch.dtype,
                   device: torch.device) -> bool:
    """Whether torch's batched product gives, slice by slice, the plain product's bits at this shape.

    It does at the sizes of these models, where MKL runs one GEMM per slice, but not for every
    shape (tiny or single-row matrices take other kernels; tests/test_stacked.py lists some), so
    each shape is tried once on random data from a private generator: two kernels that sum in a
    different order disagree on random data.
    """
    key = (kind, runs, n, d_in, d_out, dtype, device.type, torch.get_num_threads())
    if key not in _AGREES:
        g = torch.Generator(device=device).manual_seed(0)

        def rand(*shape: int) -> Tensor:
            return torch.randn(shape, generator=g, device=device).to(dtype)

        if kind == "fwd":
            args = rand(runs, n, d_in), rand(runs, d_out, d_in), rand(runs, d_out)
        elif kind == "grad_in":
            args = rand(runs, n, d_out), rand(runs, d_out, d_in)
        else:
            args = rand(runs, n, d_out), rand(runs, n, d_in)
        with torch.no_grad():
            _AGREES[key] = torch.equal(_plain(kind, *args), _batched(kind, *args))
    return _AGREES[key]


class _StackedLinearFn(torch.autograd.Function):
    """``[S, N, in] x [S, out, in] (+ [S, out]) -> [S, N, out]`` with the GEMMs ``nn.Linear`` uses per slice.

    Forward as ``addmm(b, x, W.t())``; backward: the input's gradient as ``g @ W``, the
    weight's as ``g.t() @ x`` (autograd's orientations for ``nn.Linear``), the bias's as the
    sum over rows. Each runs batched where :func:`batched_agrees`, else slice by slice.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # as autocast runs addmm: every operand cast to its dtype
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        ctx.save_for_backward(x, weight)
        with torch.autocast(device, enabled=False):
            return _product("fwd", x, weight, bias, x.shape[2], weight.shape[1])

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        d_in, d_out = x.shape[2], weight.shape[1]
        g = g.to(x.dtype)
        grad_x = _product("grad_in", g, weight, None, d_in, d_out) if ctx.needs_input_grad[0] else None
        grad_w = _product("grad_w", g, x, None, d_in, d_out) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(1) if ctx.needs_input_grad[2] else None
        return tuple(None if t is None else t.to(d) for t, d in zip((grad_x, grad_w, grad_b), ctx.dtypes, strict=True))


class StackedLinear(nn.Linear):
    """S ``nn.Linear`` layers of one shape side by side: weight ``[S, out, in]``, bias ``[S, out]``.

    A Linear to the code around it (a likelihood that owns its output layer still finds
    one), but its input carries the run axis at dim -3: ``[..., S, B, in] -> [..., S, B, out]``.
    """

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        nn.Module.__init__(self)
        first = layers[0]
        self.in_features, self.out_features = first.in_features, first.out_features
        self.weight = nn.Parameter(torch.stack([la.weight.detach() for la in layers]))
        self.bias = nn.Parameter(torch.stack([la.bias.detach() for la in layers]))
        self.runs = len(layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3 or x.shape[-3] != self.runs:
            raise ValueError(f"a stacked layer of {self.runs} runs needs [..., {self.runs}, B, "
                             f"{self.in_features}] inputs (run axis -3), got {tuple(x.shape)}")
        xr = x.movedim(-3, 0)
        lead = xr.shape[1:-1]
        out = _StackedLinearFn.apply(xr.reshape(self.runs, -1, self.in_features), self.weight, self.bias)
        return out.view(self.runs, *lead, self.out_features).movedim(0, -3)

    def extra_repr(self) -> str:
        return f"runs={self.runs}, in_features={self.in_features}, out_features={self.out_features}"


def stack_models(models: Sequence[nn.Module]) -> nn.Module:
    """One module running ``models`` (same architecture) side by side; see the module docstring.

    Each model's Linear parameters become views of the stack's ``[S, ...]`` parameters
    (their values unchanged). Raises ValueError naming a parameter outside a Linear layer,
    or a layer whose shapes differ between the models.
    """
    if not models:
        raise ValueError("no models to stack")
    stacked = copy.deepcopy(models[0])
    names = [n for n, m in stacked.named_modules() if type(m) is nn.Linear]
    for name in names:
        layers = [m.get_submodule(name) for m in models]
        shapes = {(tuple(la.weight.shape), la.bias is None) for la in layers}
        if len(shapes) > 1:
            raise ValueError(f"layer {name!r} differs between the models: {sorted(map(str, shapes))}")
        if layers[0].bias is None:
            raise ValueError(f"layer {name!r} has no bias; only Linear layers with one can be stacked")
        layer = StackedLinear(layers)
        for i, la in enumerate(layers):
            la.weight.data = layer.weight.data[i]
            la.bias.data = layer.bias.data[i]
        stacked.set_submodule(name, layer)
    inside = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    for name, _ in stacked.named_parameters():
        if name not in inside:
            raise ValueError(f"parameter {name!r} is not in a Linear layer; this model cannot be stacked")
    return stacked


def run_noise(generators: Sequence[torch.Generator]) -> NoiseSource:
    """A noise source for a stack: a ``[..., S, B, D]`` draw is each run's ``[..., B, D]`` draw
    from its own generator, exactly what ``torch.randn`` gives that run alone on its stream."""

    def draw(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        axis = len(shape) - 3
        if axis < 0 or shape[axis] != len(generators):
            raise ValueError(f"a draw of shape {shape} has no run axis of {len(generators)} at dim -3")
        one = shape[:axis] + shape[axis + 1:]
        parts = [torch.randn(one, generator=g, dtype=dtype, device=device) for g in generators]
        return torch.stack(parts).movedim(0, axis)

    return draw


# --- elementwise ops whose rounding depends on where an element sits ----------------------------


def _split(x: Tensor) -> list[Tensor]:
    """Each run's block of a run-axis-(-3) tensor, contiguous as that run alone would hold it."""
    return [t.contiguous() for t in x.unbind(-3)]


def _join(parts: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(parts)).movedim(0, parts[0].dim() - 2)


class _Runwise(torch.autograd.Function):
    """``forward(x)`` and its backward applied run by run (``rule`` holds both)."""

    @staticmethod
    def forward(ctx, x: Tensor, rule: _Rule) -> Tensor:
        xs = _split(x)
        ys = [rule.forward(t) for t in xs]
        ctx.rule = rule
        ctx.save_for_backward(*(ys if rule.backward_reads_output else xs))
        return _join(ys)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        saved = ctx.saved_tensors
        # each run's gradient as it arrives (strides included): the single run's kernel sees the same layout
        return _join([ctx.rule.backward(gs, t) for gs, t in zip(g.unbind(-3), saved, strict=True)]), None


class _Rule:
    def __init__(self, forward: Callable[[Tensor], Tensor], backward: Callable[[Tensor, Tensor], Tensor],
                 backward_reads_output: bool = False) -> None:
        self.forward = forward
        self.backward = backward
        self.backward_reads_output = backward_reads_output


def _softplus(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> _Rule:
    return _Rule(lambda t: F.softplus(t, beta, threshold),
                 lambda g, t: torch.ops.aten.softplus_backward(g, t, beta, threshold))


def _sigmoid(x: Tensor) -> _Rule:
    return _Rule(torch.sigmoid, lambda g, y: torch.ops.aten.sigmoid_backward(g, y), backward_reads_output=True)


def _elu(x: Tensor, alpha: float = 1.0, inplace: bool = False) -> _Rule:
    return _Rule(lambda t: F.elu(t, alpha),
                 lambda g, t: torch.ops.aten.elu_backward(g, alpha, 1.0, 1.0, False, t))


#: functions whose CPU kernels round the last (size mod 2 vectors) elements with a scalar
#: formula, so their bits depend on an element's position in the tensor (tests/test_stacked.py
#: finds them): each -> the rule that applies it run by run
TAIL_SENSITIVE: dict[Callable, Callable[..., _Rule]] = {
    F.softplus: _softplus,
    torch.sigmoid: _sigmoid,
    Tensor.sigmoid: _sigmoid,
    F.elu: _elu,
}


#: a run's block holding a multiple of this many bytes leaves no scalar tail in any kernel
#: (two 64-byte vectors: AVX-512's width, twice AVX2's)
TAIL_FREE_BYTES = 128


class RunwiseTails(TorchFunctionMode):
    """Inside the block, :data:`TAIL_SENSITIVE` functions of ``[..., runs, B, D]`` tensors run run by run.

    With ``record`` (a list), each such call also appends whether it needed to: whether a
    run's block leaves a scalar tail (not a multiple of :data:`TAIL_FREE_BYTES`). A stack
    whose calls never do can skip this mode and its per-call Python cost when one thread runs
    every kernel (more threads split a kernel at points that depend on the whole tensor).
    """

    def __init__(self, runs: int, record: list[bool] | None = None) -> None:
        super().__init__()
        self.runs = runs
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        make = TAIL_SENSITIVE.get(func)
        if make is not None and self.runs > 1:
            x = args[0]
            if isinstance(x, Tensor) and x.dim() >= 3 and x.shape[-3] == self.runs:
                if self.record is not None:
                    self.record.append(x.numel() // self.runs * x.element_size() % TAIL_FREE_BYTES != 0)
                return _Runwise.apply(x, make(*args, **kwargs))
        return func(*args, **kwargs)
