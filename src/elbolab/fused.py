"""The fused training step: the IWAE paper's dense models at small batches, without autograd.

Why it exists: at batch 20 a plain step (training.take_step: objectives.estimate, autograd,
the optimizer) spends most of its time dispatching a few hundred small operations and
building the autograd graph, not multiplying matrices. This step computes the same loss
and the same gradients with a hand-written backward on preallocated buffers (``out=``
products, in-place elementwise work, no graph), then runs the run's own optimizer on them.

It is the same training as the plain step, which stays the reference
(tests/test_fused.py checks every supported combination against it):

- the same noise: ``distributions.standard_normal`` with the plain path's shapes, in its
  order (q(z1|x)'s draws, then q(z2|z1)'s), so a seed gives the same samples;
- the same gradients to float32 rounding, for the objectives vae and iwae with the
  estimators standard, stl and dreg (objectives.py derives their weights; the
  reparameterized log q terms are differentiated in closed form here);
- the same optimizer: the trainer's ``torch.optim.Adam`` or ``AdamNormGrad`` object steps
  on gradients that are views of one flat buffer, so its state, ``state_dict`` and
  checkpoints are those of the plain path.

S runs of one shape train as one :class:`StackedFusedStep`: the same code with a run axis in
front (:class:`FusedStep` is S = 1), each layer one batched product over the runs, each run's
noise from its own generator, one Adam kernel call for all; each run gets the bits it gets
alone wherever :meth:`StackedFusedStep.exact_at` holds (tests/test_fused_stack.py).

Supported (:func:`supports` names what does not fit): the ``one-layer`` and ``two-layer`` models
with tanh MLPs, Gaussian heads without a log-variance clamp, no flow, a standard normal
prior and Bernoulli pixels on logits; float32 on a CPU; optimizer adam or adamnormgrad.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import fused_cpp
from .config import ConfigError, RunConfig
from .distributions import standard_normal
from .fastpaths import Tanh
from .models.base import LatentVariableModel, LogWeightTerms
from .models.one_layer import OneLayerVAE
from .models.two_layer import TwoLayerVAE
from .objectives import ObjectiveResult
from .priors import StandardNormal

#: the objectives and estimators the fused step computes
OBJECTIVES = ("vae", "iwae")
ESTIMATORS = ("standard", "stl", "dreg")
#: the optimizers it steps
OPTIMIZERS = ("adam", "adamnormgrad")


def _mlp_linears(seq: nn.Sequential) -> list[nn.Linear] | None:
    """The Linear layers of a Linear-tanh stack, or None when it is anything else."""
    mods = list(seq)
    if len(mods) % 2:
        return None
    lins = mods[0::2]
    acts = mods[1::2]
    if not all(type(m) is nn.Linear for m in lins) or not all(isinstance(a, nn.Tanh | Tanh) for a in acts):
        return None
    return lins


def _head_linear(head: nn.Module) -> nn.Linear | None:
    if getattr(head, "log_var_range", None) is not None:
        return None
    lin = getattr(head, "linear", None)
    return lin if type(lin) is nn.Linear else None


def _chains(model: nn.Module) -> dict[str, list[nn.Linear]] | str:
    """The model's Linear chains by role, or a reason it does not fit."""
    if type(model) is OneLayerVAE:
        if model.encoder_flow is not None:
            return "model.posterior.flow: a flow posterior (fused: none)"
        parts = {"q1": (_mlp_linears(model.encoder), _head_linear(model.encoder_head)),
                 "px": (_mlp_linears(model.decoder), None)}
    elif type(model) is TwoLayerVAE:
        if model.q_flow1 is not None or model.q_flow2 is not None:
            return "model.posterior.flow: a flow posterior (fused: none)"
        parts = {"q1": (_mlp_linears(model.q_z1.body), _head_linear(model.q_z1.head)),
                 "q2": (_mlp_linears(model.q_z2.body), _head_linear(model.q_z2.head)),
                 "p1": (_mlp_linears(model.p_z1.body), _head_linear(model.p_z1.head)),
                 "px": (_mlp_linears(model.p_x), None)}
    else:
        return f"model {type(model).__name__} (fused: one-layer and two-layer)"
    if type(model.prior) is not StandardNormal:
        return f"prior {type(model.prior).__name__} (fused: standard)"
    lik = model.likelihood
    if type(lik).__name__ != "BernoulliLikelihood" or type(getattr(lik, "head", None)) is not nn.Linear:
        return f"likelihood {type(lik).__name__} (fused: Bernoulli)"
    out: dict[str, list[nn.Linear]] = {}
    for role, (body, head) in parts.items():
        if body is None:
            return "model.activation other than tanh (fused: tanh)"
        if role == "px":
            head = lik.head
        if head is None:
            return "a clamped log-variance head (fused: unclamped)"
        out[role] = [*body, head]
    return out


def supports(model: nn.Module, cfg: RunConfig) -> str | None:
    """None if the fused step can train ``model`` under ``cfg``, else one line naming what does not fit."""
    o, t = cfg.objective, cfg.train
    if o.name not in OBJECTIVES:
        return f"objective.name={o.name!r} (fused: {', '.join(OBJECTIVES)})"
    if o.estimator not in ESTIMATORS:
        return f"objective.estimator={o.estimator!r} (fused: {', '.join(ESTIMATORS)})"
    if t.optimizer not in OPTIMIZERS:
        return f"train.optimizer={t.optimizer!r} (fused: {', '.join(OPTIMIZERS)})"
    if t.precision != "fp32":
        return f"train.precision={t.precision!r} (fused: fp32)"
    chains = _chains(model)
    if isinstance(chains, str):
        return chains
    params = list(model.parameters())
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
        return "parameters not float32 on a CPU (fused: CPU float32)"
    covered = {id(p) for lins in chains.values() for lin in lins for p in lin.parameters()}
    if covered != {id(p) for p in params} or any(lin.bias is None for lins in chains.values() for lin in lins):
        return "model has parameters outside its Linear layers or Linear layers without bias"
    return None


def fused_step_for(model: LatentVariableModel, optimizer: torch.optim.Optimizer, cfg: RunConfig) -> FusedStep | None:
    """The trainer's choice under ``train.fused``: a :class:`FusedStep` where the run fits
    (``auto``, ``on``), None for the plain step (``off``; ``auto`` outside the family, or with
    ``train.compile=true``, which asks for the compiled plain step). ``on`` refuses a run
    that does not fit with a :class:`ConfigError` naming what does not fit."""
    mode = cfg.train.fused
    if mode == "off":
        return None
    reason = supports(model, cfg)
    if reason is None and cfg.train.compile:
        reason = "train.compile=true (the compiled plain step; set one of them)"
    if reason is not None:
        if mode == "on":
            raise ConfigError(f"train.fused=on: the fused step cannot run this config: {reason}")
        return None
    return FusedStep(model, optimizer, cfg.objective.name, cfg.objective.k, cfg.objective.estimator,
                     backend=cfg.train.fused_backend)


@dataclass
class _Buffers:
    acts: list[Tensor]   # tanh outputs of the hidden layers, [runs, rows, width]
    deltas: list[Tensor]  # gradients at the hidden layers' pre-activations
    out: Tensor  # the head's output [runs, rows, out] (its gradient in the backward)
    grad_in: Tensor  # gradient at the chain's input [runs, rows, in]

    def __post_init__(self) -> None:
        # the transposed views the weight gradients' products take, made once
        self.deltas_t = [d.transpose(1, 2) for d in self.deltas]
        self.out_t = self.out.transpose(1, 2)


class _Chain:
    """input -> (Linear, tanh)* -> Linear for S runs side by side, with its forward activations
    kept for the backward. Weights ``[S, out, in]``; ``baddbmm``/``bmm`` compute each run's
    slice as ``addmm``/``mm`` do on it alone (models/stacked.py, batched_agrees)."""

    def __init__(self, weights: list[Tensor], biases: list[Tensor], grad_w: list[Tensor],
                 grad_b: list[Tensor]) -> None:
        self.w = weights
        self.wt = [w.transpose(1, 2) for w in weights]
        self.b = [b.unsqueeze(1) for b in biases]
        self.gw, self.gb = grad_w, grad_b
        self.widths = [w.shape[1] for w in weights]
        self.in_dim = weights[0].shape[2]

    def buffers(self, rows: int) -> _Buffers:
        runs = self.w[0].shape[0]

        def new(width: int) -> Tensor:
            return self.w[0].new_empty(runs, rows, width)

        hidden = self.widths[:-1]
        return _Buffers([new(w) for w in hidden], [new(w) for w in hidden], new(self.widths[-1]), new(self.in_dim))

    def forward(self, x: Tensor, buf: _Buffers) -> Tensor:
        h = x
        for wt, b, a in zip(self.wt, self.b, buf.acts, strict=False):
            torch.baddbmm(b, h, wt, out=a)
            torch.tanh(a, out=a)
            h = a
        return torch.baddbmm(self.b[-1], h, self.wt[-1], out=buf.out)

    def backward(self, x: Tensor, grad_out: Tensor, buf: _Buffers, params: bool = True,
                 input_grad: bool = False) -> Tensor | None:
        """Gradients of the chain's parameters (written over theirs) and, if asked, at its input."""
        d = grad_out
        d_t = buf.out_t if grad_out is buf.out else grad_out.transpose(1, 2)
        n = len(self.w)
        for i in range(n - 1, -1, -1):
            inp = buf.acts[i - 1] if i > 0 else x
            if params:
                torch.bmm(d_t, inp, out=self.gw[i])
                torch.sum(d, 1, out=self.gb[i])
            if i == 0:
                if not input_grad:
                    return None
                return torch.bmm(d, self.w[0], out=buf.grad_in)
            nxt = torch.bmm(d, self.w[i], out=buf.deltas[i - 1])
            # times tanh' = 1 - tanh^2, in place: autograd's own kernel for it
            torch.ops.aten.tanh_backward.grad_input(nxt, inp, grad_input=nxt)
            d, d_t = nxt, buf.deltas_t[i - 1]
        return None


def _adam_plain(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` is a plain fused ``torch.optim.Adam`` with one parameter group (no hooks,
    no weight decay, amsgrad, maximize or capturable variants): the update the direct kernel call
    (:func:`_fused_adam`) and the compiled step's own make."""
    if (type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1 or opt._optimizer_step_pre_hooks
            or opt._optimizer_step_post_hooks):
        return False
    group = opt.param_groups[0]
    return bool(group.get("fused")) and not (
        group["amsgrad"] or group["weight_decay"] or group["maximize"] or group.get("capturable")
        or group.get("differentiable") or group.get("decoupled_weight_decay"))


def _adam_lists(opt: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor]
                ) -> tuple[tuple[float, ...], list[list[Tensor]]] | None:
    """What torch's fused Adam kernel needs to step ``params`` as ``opt.step()`` would: the
    settings (lr, beta1, beta2, eps) and the tensor lists; None unless ``opt`` is a plain fused
    ``torch.optim.Adam`` (:func:`_adam_plain`) over exactly ``params`` whose state exists (its first step made it)."""
    if not _adam_plain(opt):
        return None
    group = opt.param_groups[0]
    if len(group["params"]) != len(params) or any(a is not b for a, b in zip(group["params"], params, strict=True)):
        return None
    states = [opt.state.get(p) for p in params]
    if not all(states):
        return None
    beta1, beta2 = group["betas"]
    lists = [list(params), list(grads), [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
             [st["step"] for st in states]]
    return (float(group["lr"]), beta1, beta2, group["eps"]), lists


def _fused_adam(settings: tuple[float, ...], lists: list[list[Tensor]]) -> None:
    """torch's fused Adam kernel called as ``Adam.step`` calls it, without its per-step Python work
    (the kernel treats each tensor on its own, so several runs' tensors can go in one call)."""
    lr, beta1, beta2, eps = settings
    params, grads, avgs, sqs, steps = lists
    torch._foreach_add_(steps, 1)
    torch._fused_adam_(params, grads, avgs, sqs, [], steps, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                       weight_decay=0.0, eps=eps, maximize=False, grad_scale=None, found_inf=None)


class _FusedCore:
    """The forward and hand-written backward of S runs of one shape side by side: every tensor
    carries the run axis first (an input is ``[S, B, D]``, a sample ``[S, K, B, D]``), each run's
    share laid out as the run alone lays it out. :class:`FusedStep` is S = 1."""

    runs: int
    k: int
    iwae: bool
    stl: bool
    dreg: bool
    chains: dict[str, _Chain]
    two_layer: bool
    d1: int
    d2: int
    #: each run's own generator (a stack), or None: draws from distributions.standard_normal
    generators: list[torch.Generator] | None

    def _configure(self, model: LatentVariableModel, objective: str, k: int, estimator: str
                   ) -> dict[str, list[nn.Linear]]:
        chains = _chains(model)
        if isinstance(chains, str):
            raise ValueError(f"fused step: {chains}")
        if objective not in OBJECTIVES or estimator not in ESTIMATORS:
            raise ValueError(f"fused step: objective {objective!r} / estimator {estimator!r} not supported")
        self.objective = objective
        self.iwae = objective == "iwae" and k > 1
        self.k = k
        self.estimator = estimator
        #: log q at fixed variational parameters (stl, dreg) and DReG's path weights
        self.stl = estimator != "standard"
        self.dreg = estimator == "dreg" and self.iwae
        self.two_layer = "q2" in chains
        self.d1 = chains["q1"][-1].out_features // 2
        self.d2 = chains["q2"][-1].out_features // 2 if self.two_layer else 0
        self._bufs: dict[int, dict[str, _Buffers]] = {}
        self._noise: dict[tuple, Tensor] = {}
        return chains

    def _buffers(self, b: int) -> dict[str, _Buffers]:
        if b not in self._bufs:
            rows = {"q1": b, "q2": self.k * b, "p1": self.k * b, "px": self.k * b}
            self._bufs[b] = {role: c.buffers(rows[role]) for role, c in self.chains.items()}
        return self._bufs[b]

    def _draw(self, site: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """``[S, *shape]`` standard normal noise for the latent ``site``: each run's share what it
        draws alone (a stack draws into one buffer per site, kept until that site's next draw)."""
        if self.generators is None:
            return standard_normal(shape, like).unsqueeze(0)
        key = (site, len(self.generators), *shape)
        out = self._noise.get(key)
        if out is None:
            out = self._noise[key] = like.new_empty(key[1:])
        for i, g in enumerate(self.generators):
            torch.randn(shape, generator=g, out=out[i])
        return out

    def _forward_backward(self, x: Tensor, beta: float | Tensor) -> tuple[Tensor, Tensor, Tensor, LogWeightTerms]:
        """Forward and backward on ``x`` ([S, B, D]) at KL weight ``beta`` (a float, or ``[S, 1, 1]``):
        the bounds [S, B], log weights [S, K, B], losses [S] and terms; gradients land in the chains'."""
        if self.two_layer:
            return self._two_layer(x, beta)
        return self._one_layer(x, beta)

    # --- shared pieces ------------------------------------------------------------
    def _weights(self, log_px: Tensor, log_ratio: Tensor, beta: float | Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """From log p(x|z) and log p(z) - log q ([S, K, B]): the reported bound [S, B], log w,
        the losses [S], dLoss/dlog w_train (G, [S, K, B]) and the encoder's weights A = r G."""
        _, k, b = log_px.shape
        unit = isinstance(beta, float) and beta == 1.0
        log_w = log_px + log_ratio
        log_w_train = log_w if unit else log_px + beta * log_ratio
        if self.iwae:
            lse = torch.logsumexp(log_w_train, 1)
            c = torch.exp(log_w_train - lse.unsqueeze(1))
            train_bound = lse - math.log(k)
            bound = train_bound if unit else torch.logsumexp(log_w, 1) - math.log(k)
        else:
            c = torch.full_like(log_w, 1.0 / k)
            train_bound = log_w_train.mean(1)
            bound = train_bound if unit else log_w.mean(1)
        loss = -train_bound.mean(-1)
        g = c * (-1.0 / b)
        # DReG's path weight a_k = c_k - beta (c_k - c_k^2) = r_k c_k (objectives._dreg_path_weights)
        a = g * (1.0 - beta + beta * c) if self.dreg else g
        return bound, log_w, loss, g, a

    @staticmethod
    def _per_row(beta: float | Tensor) -> float | Tensor:
        """``beta`` for [S, B] tensors."""
        return beta if isinstance(beta, float) else beta.view(-1, 1)

    def _likelihood_backward(self, x1: Tensor, logits: Tensor, g: Tensor) -> Tensor:
        """dLoss/dlogits = G (x - sigmoid(logits)), written over the logits (``x1``: [S, 1, B, D])."""
        s = torch.sigmoid(logits, out=logits).view(g.shape + (-1,))
        torch.sub(x1, s, out=s).mul_(g.unsqueeze(-1))
        return logits

    @staticmethod
    def _log_bernoulli(x1: Tensor, logits: Tensor, k: int) -> Tensor:
        lv = logits.view(x1.shape[0], k, x1.shape[2], -1)
        return torch.linalg.vecdot(lv, x1) - torch.nn.functional.softplus(lv).sum(-1)

    # --- the models -------------------------------------------------------------
    def _one_layer(self, x: Tensor, beta: float | Tensor) -> tuple[Tensor, Tensor, Tensor, LogWeightTerms]:
        s, k, b, d = x.shape[0], self.k, x.shape[1], self.d1
        bufs = self._buffers(b)
        enc, dec = self.chains["q1"], self.chains["px"]
        out = enc.forward(x, bufs["q1"])
        mean, log_var = out[..., :d], out[..., d:]
        std = torch.exp(log_var * 0.5)
        eps = self._draw("z", (k, b, d), mean)
        z = torch.addcmul(mean.unsqueeze(1), std.unsqueeze(1), eps)  # [S, K, B, D]
        zf = z.view(s, k * b, d)
        logits = dec.forward(zf, bufs["px"])
        x1 = x.unsqueeze(1)
        log_px = self._log_bernoulli(x1, logits, k)
        half_log2pi = 0.5 * d * math.log(2 * math.pi)
        log_pz = -0.5 * torch.linalg.vecdot(z, z) - half_log2pi
        log_q = -0.5 * (log_var.sum(-1).unsqueeze(1) + torch.linalg.vecdot(eps, eps)) - half_log2pi
        bound, log_w, loss, g, a = self._weights(log_px, log_pz - log_q, beta)
        terms = LogWeightTerms(log_px, {"z": log_pz}, {"z": log_q}, {"z": z})

        dlogits = self._likelihood_backward(x1, logits, g)
        gz = dec.backward(zf, dlogits, bufs["px"], input_grad=True).view(s, k, b, d)
        if self.dreg:
            gz.mul_((1.0 - beta + beta * (g * -b)).unsqueeze(-1))
        ab = (a * beta).unsqueeze(-1)
        gz.addcmul_(ab, z, value=-1.0)  # the prior's beta log p(z)
        if self.stl:  # - beta log q at fixed parameters: + beta eps / std through z
            gz.addcmul_(ab, eps / std.unsqueeze(1))
        g_out = bufs["q1"].out  # the head's output is no longer needed: its gradient goes there
        g_mean, g_lv = g_out[..., :d], g_out[..., d:]
        torch.sum(gz, 1, out=g_mean)
        torch.sum(gz * eps, 1, out=g_lv)
        g_lv.mul_(std * 0.5)
        if not self.stl:  # d(-beta log q)/d log_var at the reparameterized sample: beta / 2
            g_lv.add_((a.sum(1) * (0.5 * self._per_row(beta))).unsqueeze(-1))
        enc.backward(x, g_out, bufs["q1"])
        return bound, log_w, loss, terms

    def _two_layer(self, x: Tensor, beta: float | Tensor) -> tuple[Tensor, Tensor, Tensor, LogWeightTerms]:
        s, k, b, d1, d2 = x.shape[0], self.k, x.shape[1], self.d1, self.d2
        kb = k * b
        bufs = self._buffers(b)
        q1, q2, p1, px = (self.chains[r] for r in ("q1", "q2", "p1", "px"))
        half_log2pi1 = 0.5 * d1 * math.log(2 * math.pi)
        half_log2pi2 = 0.5 * d2 * math.log(2 * math.pi)
        # q(z1 | x)
        out1 = q1.forward(x, bufs["q1"])
        m1, lv1 = out1[..., :d1], out1[..., d1:]
        std1 = torch.exp(lv1 * 0.5)
        eps1 = self._draw("z1", (k, b, d1), m1)
        z1 = torch.addcmul(m1.unsqueeze(1), std1.unsqueeze(1), eps1)  # [S, K, B, D1]
        z1f = z1.view(s, kb, d1)
        # q(z2 | z1)
        out2 = q2.forward(z1f, bufs["q2"])
        m2, lv2 = out2[..., :d2], out2[..., d2:]
        std2 = torch.exp(lv2 * 0.5)
        eps2 = self._draw("z2", (k, b, d2), m2).view(s, kb, d2)
        z2 = torch.addcmul(m2, std2, eps2)  # [S, KB, D2]
        # p(z1 | z2) and p(x | z1)
        outp = p1.forward(z2, bufs["p1"])
        pm1, plv1 = outp[..., :d1], outp[..., d1:]
        logits = px.forward(z1f, bufs["px"])
        x1 = x.unsqueeze(1)
        log_px = self._log_bernoulli(x1, logits, k)
        log_p2 = (-0.5 * torch.linalg.vecdot(z2, z2) - half_log2pi2).view(s, k, b)
        u = z1f - pm1
        ip = torch.exp(-plv1)
        uip = u * ip
        log_p1 = (-0.5 * (plv1.sum(-1) + torch.linalg.vecdot(u, uip)) - half_log2pi1).view(s, k, b)
        log_q1 = -0.5 * (lv1.sum(-1).unsqueeze(1) + torch.linalg.vecdot(eps1, eps1)) - half_log2pi1
        log_q2 = (-0.5 * (lv2.sum(-1) + torch.linalg.vecdot(eps2, eps2)) - half_log2pi2).view(s, k, b)
        bound, log_w, loss, g, a = self._weights(log_px, log_p2 + log_p1 - log_q1 - log_q2, beta)
        terms = LogWeightTerms(log_px, {"z1": log_p1, "z2": log_p2}, {"z1": log_q1, "z2": log_q2},
                               {"z1": z1, "z2": z2.view(s, k, b, d2)})

        # decoder side: weights G
        gb = (g * beta).view(s, kb, 1)
        dlogits = self._likelihood_backward(x1, logits, g)
        gz1 = px.backward(z1f, dlogits, bufs["px"], input_grad=True)  # [S, KB, D1]
        g_p = bufs["p1"].out
        g_pm1, g_plv1 = g_p[..., :d1], g_p[..., d1:]
        torch.mul(uip, gb, out=g_pm1)  # d log p1 / d mean = (z1 - m) / var
        torch.mul(u, uip, out=g_plv1)  # d log p1 / d log_var = -(1 - u^2 / var) / 2
        g_plv1.sub_(1.0).mul_(gb * 0.5)
        gz1.sub_(g_pm1)  # d log p1 / d z1 = -(z1 - m) / var
        gz2 = p1.backward(z2, g_p, bufs["p1"], input_grad=True)  # [S, KB, D2]
        # encoder side: weights A = r G
        ab = (a * beta).view(s, kb, 1)
        if self.dreg:
            r = (1.0 - beta + beta * (g * -b)).view(s, kb, 1)
            gz1.mul_(r)
            gz2.mul_(r)
        gz2.addcmul_(ab, z2, value=-1.0)  # the prior's beta log p(z2)
        h2 = std2 * eps2 * 0.5  # d z2 / d log_var2
        g_q2 = bufs["q2"].out
        g_m2, g_lv2 = g_q2[..., :d2], g_q2[..., d2:]
        # through z1, q(z2|z1)'s total derivative: d(-beta log q2)/d log_var2 = beta / 2
        g_m2.copy_(gz2)
        torch.mul(gz2, h2, out=g_lv2)
        g_lv2.add_(ab * 0.5)
        if not self.stl:
            gz1.add_(q2.backward(z1f, g_q2, bufs["q2"], input_grad=True))
        else:
            gz1.add_(q2.backward(z1f, g_q2, bufs["q2"], params=False, input_grad=True))
            # q(z2|z1)'s own parameters: log q2 at fixed parameters, + beta eps2 / std2 through z2
            e_s = eps2 / std2
            g_m2.addcmul_(ab, e_s)
            torch.mul(g_m2, h2, out=g_lv2)
            q2.backward(z1f, g_q2, bufs["q2"])
            gz1.addcmul_(ab, (eps1 / std1.unsqueeze(1)).view(s, kb, d1))  # log q1 at fixed parameters
        gz1 = gz1.view(s, k, b, d1)
        g_q1 = bufs["q1"].out
        g_m1, g_lv1 = g_q1[..., :d1], g_q1[..., d1:]
        torch.sum(gz1, 1, out=g_m1)
        torch.sum(gz1 * eps1, 1, out=g_lv1)
        g_lv1.mul_(std1 * 0.5)
        if not self.stl:
            g_lv1.add_((a.sum(1) * (0.5 * self._per_row(beta))).unsqueeze(-1))
        q1.backward(x, g_q1, bufs["q1"])
        return bound, log_w, loss, terms


#: (product, runs, rows, in, out, threads) -> whether the batched product over the runs gives
#: each run the bits of the same product on that run alone (:func:`_batched_agrees`)
_AGREES: dict[tuple[str, int, int, int, int, int], bool] = {}
#: a run's block of a multiple of this many bytes leaves no scalar tail in an elementwise kernel
#: (models.stacked.TAIL_FREE_BYTES: the sigmoid and softplus kernels round their tail otherwise)
TAIL_FREE_BYTES = 128


def _product(kind: str, a: Tensor, w: Tensor, c: Tensor | None) -> Tensor:
    if kind == "fwd":
        return torch.baddbmm(c.unsqueeze(1), a, w.transpose(1, 2))
    if kind == "grad_in":
        return torch.bmm(a, w)
    return torch.bmm(a.transpose(1, 2), w)


def _batched_agrees(kind: str, runs: int, rows: int, d_in: int, d_out: int) -> bool:
    """Whether :class:`_Chain`'s product ``kind`` over ``runs`` slices gives each slice what it
    gives that slice alone (a :class:`FusedStep`): tried once per shape on random data (two
    kernels that sum in another order disagree there)."""
    key = (kind, runs, rows, d_in, d_out, torch.get_num_threads())
    if key not in _AGREES:
        g = torch.Generator().manual_seed(0)

        def rand(*shape: int) -> Tensor:
            return torch.randn(shape, generator=g)

        a = rand(runs, rows, d_out if kind != "fwd" else d_in)
        w = rand(runs, d_out, d_in) if kind != "grad_w" else rand(runs, rows, d_in)
        c = rand(runs, d_out)
        together = _product(kind, a, w, c)
        _AGREES[key] = all(torch.equal(together[i:i + 1], _product(kind, a[i:i + 1].clone(), w[i:i + 1].clone(),
                                                                     c[i:i + 1].clone())) for i in range(runs))
    return _AGREES[key]


def _run_terms(terms: LogWeightTerms, i: int) -> LogWeightTerms:
    return LogWeightTerms(terms.log_likelihood[i], {n: t[i] for n, t in terms.log_prior.items()},
                          {n: t[i] for n, t in terms.log_posterior.items()}, {n: t[i] for n, t in terms.z.items()})


class FusedStep(_FusedCore):
    """One training step of ``model`` under ``optimizer`` for an objective config, fused.

    ``step(x, beta)`` returns what :func:`elbolab.training.take_step` returns: the result
    (loss, bound, log weights and terms, valid until the next step), the batch's summed bound
    and whether the optimizer stepped (not when the loss or a gradient is non-finite).
    Gradients live in one flat buffer; each parameter's ``.grad`` is a view of it.
    ``backend`` (``train.fused_backend``): ``torch`` runs the forward and backward as torch ops;
    ``cpp`` and ``auto`` (:func:`elbolab.fused_cpp.wanted`) as the compiled step where it builds.
    """

    def __init__(self, model: LatentVariableModel, optimizer: torch.optim.Optimizer, objective: str, k: int,
                 estimator: str = "standard", backend: str = "torch") -> None:
        self.lins = self._configure(model, objective, k, estimator)
        self.runs, self.generators = 1, None
        #: the compiled module (elbolab.fused_cpp), or None: the torch-op step
        self.compiled = fused_cpp.load() if fused_cpp.wanted(backend) else None
        self._cpp = None
        #: what the compiled step's Adam state was taken from (:meth:`_compiled_adam`)
        self._adam_for: tuple | None = None
        self.model, self.optimizer = model, optimizer
        self.params = list(model.parameters())
        self.flat = self.params[0].new_zeros(sum(p.numel() for p in self.params))
        self.grads = list(self.flat.split([p.numel() for p in self.params]))
        self.grads = [g.view_as(p) for g, p in zip(self.grads, self.params, strict=True)]
        self._bind()
        self._attach_grads()

    def shape(self) -> tuple:
        """What runs must share to step as one :class:`StackedFusedStep`."""
        return type(self.model), self.objective, self.k, self.estimator, tuple(tuple(p.shape) for p in self.params)

    def _bind(self) -> None:
        """Chains over the parameters' current storage (a stack re-points it: models.stacked)."""
        by_id = {id(p): g for p, g in zip(self.params, self.grads, strict=True)}
        self.chains = {role: _Chain([lin.weight.detach().unsqueeze(0) for lin in lins],
                                    [lin.bias.detach().unsqueeze(0) for lin in lins],
                                    [by_id[id(lin.weight)].unsqueeze(0) for lin in lins],
                                    [by_id[id(lin.bias)].unsqueeze(0) for lin in lins])
                       for role, lins in self.lins.items()}
        self._bound_to = self.params[0].data_ptr()
        if self.compiled is not None:
            self._cpp = self.compiled.Step(
                [[[lin.weight.detach() for lin in lins], [lin.bias.detach() for lin in lins],
                  [by_id[id(lin.weight)] for lin in lins], [by_id[id(lin.bias)] for lin in lins]]
                 for lins in self.lins.values()], self.flat, self.k, self.iwae, self.stl, self.dreg)
            self._adam_for = None
            # Adam updates the tensors whose gradients the backward wrote last first (still in cache)
            first = {id(p): i for i, p in enumerate(self.params)}
            self._update_order = [first[id(p)] for lins in reversed(list(self.lins.values())) for lin in lins
                                  for p in (lin.weight, lin.bias)]

    def _attach_grads(self) -> None:
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g

    @torch.no_grad()
    def step(self, x: Tensor, beta: float = 1.0) -> tuple[ObjectiveResult, float, bool]:
        if self._cpp is not None:
            self._ready()
            # the compiled call sums the bound, checks the loss and gradients and, once Adam has
            # state, takes its step too; else (Adam's first step, another optimizer) it runs here
            res, _ = self._compiled_gradients(x, float(beta), self._compiled_adam())
            bound_sum, finite, updated = self._compiled_probe
            if finite and not updated and not self._adam_direct():
                self.optimizer.step()
            return res, bound_sum, finite
        res, loss = self.gradients(x, beta)
        bound_sum, probe = torch.stack([res.bound.sum(), loss + self.flat.norm()]).tolist()
        if not math.isfinite(probe) and (bool(torch.isfinite(loss)) and bool(torch.isfinite(self.flat).all())):
            probe = 0.0  # only the norm overflowed
        if math.isfinite(probe):
            if self.params[0].grad is not self.grads[0]:
                self._attach_grads()
            if not self._adam_direct():
                self.optimizer.step()
            return res, bound_sum, True
        return res, bound_sum, False

    #: Adam settings that tell the compiled call to leave the update to Python
    _NO_ADAM = (-1.0, 0.0, 0.0, 0.0)

    def _compiled_adam(self) -> tuple[float, float, float, float]:
        """(lr, beta1, beta2, eps) for the compiled call's own Adam step, after handing it the
        optimizer's state tensors (again whenever the state was replaced, as ``load_state_dict``
        replaces it): torch's Adam keeps the state and the compiled call updates it in place,
        so ``state_dict`` and checkpoints are the torch-op step's. :attr:`_NO_ADAM` where the
        optimizer is not a plain fused Adam with state (:func:`_adam_lists`)."""
        opt = self.optimizer
        if not _adam_plain(opt):
            return self._NO_ADAM
        group = opt.param_groups[0]
        got = self._adam_for
        if got is None or got[0] is not opt.state or got[1] is not group or got[2] != len(opt.state):
            found = _adam_lists(opt, self.params, self.grads)
            ok = found is not None and all(t.dtype == torch.float32 and t.numel() == 1 for t in found[1][4])
            lists = [[lst[i] for i in self._update_order] for lst in found[1]] if ok else [[]] * 5
            self._cpp.set_adam(*lists)
            self._adam_for = got = (opt.state, group, len(opt.state), ok)
        if not got[3]:
            return self._NO_ADAM
        beta1, beta2 = group["betas"]
        return float(group["lr"]), float(beta1), float(beta2), float(group["eps"])

    def _adam_direct(self) -> bool:
        """torch's fused Adam kernel on this run's tensors (:func:`_fused_adam`); False (nothing
        done) where :func:`_adam_lists` finds the optimizer is not one it can step."""
        found = _adam_lists(self.optimizer, self.params, self.grads)
        if found is None:
            return False
        _fused_adam(*found)
        return True

    def _ready(self) -> None:
        """The gradients attached and the chains on the parameters' current storage."""
        if self.params[0].grad is not self.grads[0]:
            self._attach_grads()
        if self.params[0].data_ptr() != self._bound_to:
            self._bind()

    @torch.no_grad()
    def gradients(self, x: Tensor, beta: float = 1.0) -> tuple[ObjectiveResult, Tensor]:
        """Forward and backward on ``x`` ([B, D]): the result, and the loss; gradients land in
        ``self.flat`` (and the parameters' ``.grad`` views of it)."""
        self._ready()
        if self._cpp is not None:
            return self._compiled_gradients(x, float(beta))
        bound, log_w, loss, terms = self._forward_backward(x.unsqueeze(0), float(beta))
        res = ObjectiveResult(loss=loss[0], bound=bound[0], log_w=log_w[0], terms=_run_terms(terms, 0))
        return res, loss[0]

    def _compiled_gradients(self, x: Tensor, beta: float, adam: tuple[float, float, float, float] = _NO_ADAM
                            ) -> tuple[ObjectiveResult, Tensor]:
        """:meth:`gradients` through the compiled step, on noise drawn here as the torch-op step draws
        it; with ``adam`` (:meth:`_compiled_adam`) it also takes Adam's step where the gradients are finite."""
        k, b = self.k, x.shape[0]
        eps1 = standard_normal((k, b, self.d1), x)
        eps2 = standard_normal((k, b, self.d2), x) if self.two_layer else eps1
        out, bound_sum, finite, updated = self._cpp.run(x.contiguous(), eps1, eps2, beta, *adam)
        bound, log_w, loss, log_px, lp1, lp2, lq1, lq2, z1, z2 = out
        #: for :meth:`step`: the batch's summed bound, whether the loss and gradients are finite,
        #: and whether the call took Adam's step
        self._compiled_probe = (bound_sum, finite, updated)
        if self.two_layer:
            terms = LogWeightTerms(log_px, {"z1": lp1, "z2": lp2}, {"z1": lq1, "z2": lq2}, {"z1": z1, "z2": z2})
        else:
            terms = LogWeightTerms(log_px, {"z": lp1}, {"z": lq1}, {"z": z1})
        return ObjectiveResult(loss=loss, bound=bound, log_w=log_w, terms=terms), loss


class StackedFusedStep(_FusedCore):
    """S runs' fused steps as one: the models' parameters become views of ``[S, ...]`` stacks
    (as models.stacked.stack_models makes them), one batched product per layer for all runs,
    each run drawing its noise from its own generator, and one Adam kernel call for every run
    whose optimizer is a plain fused Adam. Each run's numbers are those of its
    :class:`FusedStep` alone to float32 rounding (tests/test_fused_stack.py).
    """

    def __init__(self, steps: list[FusedStep], generators: list[torch.Generator]) -> None:
        first = steps[0]
        if any(st.shape() != first.shape() for st in steps):
            raise ValueError("fused stack: the runs differ in model shape, objective, k or estimator")
        if len(generators) != len(steps) or any(g is None for g in generators):
            raise ValueError("each run of a fused stack needs its own generator")
        self.members = steps
        self.runs, self.generators = len(steps), list(generators)
        self.lins = self._configure(first.model, first.objective, first.k, first.estimator)
        s = self.runs
        n_params = len(first.params)
        sizes = [p.numel() for p in first.params]
        stacked = [torch.stack([st.params[j].detach() for st in steps]) for j in range(n_params)]
        self.flat = first.params[0].new_zeros(s * sum(sizes))
        self.stacked_grads = [g.view(s, *p.shape) for g, p in
                              zip(self.flat.split([s * n for n in sizes]), first.params, strict=True)]
        for j in range(n_params):
            for i, st in enumerate(steps):
                st.params[j].data = stacked[j][i]
        #: each run's gradients, views of the stacked ones
        self.run_grads = [[self.stacked_grads[j][i] for j in range(n_params)] for i in range(s)]
        #: every run's gradients, parameter by parameter: the per-run norm is one multi-tensor call
        self._norm_list = [g for j in range(n_params) for g in (self.stacked_grads[j][i] for i in range(s))]
        index = {id(p): j for j, p in enumerate(first.params)}
        self.chains = {role: _Chain([stacked[index[id(lin.weight)]] for lin in lins],
                                    [stacked[index[id(lin.bias)]] for lin in lins],
                                    [self.stacked_grads[index[id(lin.weight)]] for lin in lins],
                                    [self.stacked_grads[index[id(lin.bias)]] for lin in lins])
                       for role, lins in self.lins.items()}
        self._exact: dict[tuple[int, int], bool] = {}
        self._attach_grads()

    def exact_at(self, x: Tensor) -> bool:
        """Whether this step gives each run of batch ``x`` ([S, B, D]) the bits of its
        :class:`FusedStep` alone: on one thread (more split kernels at points that depend on the
        whole tensor), with every batched product reproducing the run's own (:func:`_batched_agrees`)
        and no scalar tail inside the sigmoid and softplus of the logits."""
        b = x.shape[1]
        key = (b, torch.get_num_threads())
        if key not in self._exact:
            rows = {"q1": b, "q2": self.k * b, "p1": self.k * b, "px": self.k * b}
            ok = torch.get_num_threads() == 1 and x.dtype == torch.float32
            ok = ok and self.k * b * x.shape[2] * x.element_size() % TAIL_FREE_BYTES == 0
            for role, chain in self.chains.items():
                for w in chain.w:
                    d_out, d_in = w.shape[1], w.shape[2]
                    ok = ok and all(_batched_agrees(kind, self.runs, rows[role], d_in, d_out)
                                    for kind in ("fwd", "grad_in", "grad_w"))
            self._exact[key] = ok
        return self._exact[key]

    def _attach_grads(self) -> None:
        for st, grads in zip(self.members, self.run_grads, strict=True):
            for p, g in zip(st.params, grads, strict=True):
                p.grad = g

    @torch.no_grad()
    def gradients(self, x: Tensor, betas: list[float]) -> tuple[list[ObjectiveResult], Tensor]:
        """Forward and backward on ``x`` ([S, B, D]), run ``i`` at KL weight ``betas[i]``: each
        run's result, and the losses [S]; gradients land in the runs' ``.grad`` views."""
        if self.members[0].params[0].grad is not self.run_grads[0][0]:
            self._attach_grads()
        beta: float | Tensor = float(betas[0])
        if any(b != betas[0] for b in betas):
            beta = torch.tensor(betas, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        bound, log_w, loss, terms = self._forward_backward(x, beta)
        results = [ObjectiveResult(loss=loss[i], bound=bound[i], log_w=log_w[i], terms=_run_terms(terms, i))
                   for i in range(self.runs)]
        return results, loss

    @torch.no_grad()
    def step(self, x: Tensor, betas: list[float]) -> list[tuple[ObjectiveResult, float, bool]]:
        """Each run's :meth:`FusedStep.step` on its batch ``x[i]``, in one pass."""
        s = self.runs
        results, loss = self.gradients(x, betas)
        norms = torch.stack(torch._foreach_norm(self._norm_list)).view(-1, s).sum(0)
        values = torch.cat([torch.stack([r.bound.sum() for r in results]), loss + norms]).tolist()
        taken = []
        for i in range(s):
            ok = math.isfinite(values[s + i]) or (bool(torch.isfinite(loss[i]))
                                                  and all(bool(torch.isfinite(g).all()) for g in self.run_grads[i]))
            taken.append(ok)
        batches: dict[tuple[float, ...], list[list[Tensor]]] = {}
        for st, grads, ok in zip(self.members, self.run_grads, taken, strict=True):
            if not ok:
                continue
            found = _adam_lists(st.optimizer, st.params, grads)
            if found is None:
                st.optimizer.step()
                continue
            acc = batches.setdefault(found[0], [[], [], [], [], []])
            for a, part in zip(acc, found[1], strict=True):
                a.extend(part)
        for settings, lists in batches.items():
            _fused_adam(settings, lists)
        return [(results[i], values[i], taken[i]) for i in range(s)]
