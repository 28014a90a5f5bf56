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

Supported (:func:`supports` names what does not fit): the ``one-layer`` and ``two-layer`` models
with tanh MLPs, Gaussian heads without a log-variance clamp, no flow, a standard normal
prior and Bernoulli pixels on logits; float32 on a CPU; optimizer adam or adamnormgrad.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

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
    if t.optimizer not in ("adam", "adamnormgrad"):
        return f"train.optimizer={t.optimizer!r} (fused: adam, adamnormgrad)"
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
    return FusedStep(model, optimizer, cfg.objective.name, cfg.objective.k, cfg.objective.estimator)


@dataclass
class _Buffers:
    acts: list[Tensor]   # tanh outputs of the hidden layers, [rows, width]
    deltas: list[Tensor]  # gradients at the hidden layers' pre-activations
    squares: list[Tensor]  # scratch for 1 - tanh^2
    out: Tensor  # the head's output [rows, out]
    grad_in: Tensor  # gradient at the chain's input [rows, in]


class _Chain:
    """input -> (Linear, tanh)* -> Linear, with its forward activations kept for the backward."""

    def __init__(self, layers: list[nn.Linear], grads: dict[int, Tensor]) -> None:
        self.w = [lin.weight for lin in layers]
        self.b = [lin.bias for lin in layers]
        self.gw = [grads[id(lin.weight)] for lin in layers]
        self.gb = [grads[id(lin.bias)] for lin in layers]
        self.widths = [lin.out_features for lin in layers]
        self.in_dim = layers[0].in_features

    def buffers(self, rows: int) -> _Buffers:
        def new(width: int) -> Tensor:
            return self.w[0].new_empty(rows, width)

        hidden = self.widths[:-1]
        return _Buffers([new(w) for w in hidden], [new(w) for w in hidden], [new(w) for w in hidden],
                        new(self.widths[-1]), new(self.in_dim))

    def forward(self, x: Tensor, buf: _Buffers) -> Tensor:
        h = x
        for w, b, a in zip(self.w, self.b, buf.acts, strict=False):
            torch.addmm(b, h, w.t(), out=a)
            torch.tanh(a, out=a)
            h = a
        return torch.addmm(self.b[-1], h, self.w[-1].t(), out=buf.out)

    def backward(self, x: Tensor, grad_out: Tensor, buf: _Buffers, params: bool = True,
                 input_grad: bool = False) -> Tensor | None:
        """Gradients of the chain's parameters (written over theirs) and, if asked, at its input."""
        d = grad_out
        n = len(self.w)
        for i in range(n - 1, -1, -1):
            inp = buf.acts[i - 1] if i > 0 else x
            if params:
                torch.mm(d.t(), inp, out=self.gw[i])
                torch.sum(d, 0, out=self.gb[i])
            if i == 0:
                if not input_grad:
                    return None
                return torch.mm(d, self.w[0], out=buf.grad_in)
            nxt = torch.mm(d, self.w[i], out=buf.deltas[i - 1])
            sq = torch.mul(inp, inp, out=buf.squares[i - 1])
            nxt.addcmul_(nxt, sq, value=-1.0)  # times tanh' = 1 - tanh^2
            d = nxt
        return None


class FusedStep:
    """One training step of ``model`` under ``optimizer`` for an objective config, fused.

    ``step(x, beta)`` returns what :func:`elbolab.training.take_step` returns: the result
    (loss, bound, log weights and terms, valid until the next step), the batch's summed bound
    and whether the optimizer stepped (not when the loss or a gradient is non-finite).
    Gradients live in one flat buffer; each parameter's ``.grad`` is a view of it.
    """

    def __init__(self, model: LatentVariableModel, optimizer: torch.optim.Optimizer, objective: str, k: int,
                 estimator: str = "standard") -> None:
        chains = _chains(model)
        if isinstance(chains, str):
            raise ValueError(f"fused step: {chains}")
        if objective not in OBJECTIVES or estimator not in ESTIMATORS:
            raise ValueError(f"fused step: objective {objective!r} / estimator {estimator!r} not supported")
        self.model, self.optimizer = model, optimizer
        self.iwae = objective == "iwae" and k > 1
        self.k = k
        self.estimator = estimator
        #: log q at fixed variational parameters (stl, dreg) and DReG's path weights
        self.stl = estimator != "standard"
        self.dreg = estimator == "dreg" and self.iwae
        self.params = list(model.parameters())
        self.flat = self.params[0].new_zeros(sum(p.numel() for p in self.params))
        self.grads = list(self.flat.split([p.numel() for p in self.params]))
        self.grads = [g.view_as(p) for g, p in zip(self.grads, self.params, strict=True)]
        by_id = {id(p): g for p, g in zip(self.params, self.grads, strict=True)}
        self.chains = {role: _Chain(lins, by_id) for role, lins in chains.items()}
        self.two_layer = "q2" in self.chains
        self.d1 = self.chains["q1"].widths[-1] // 2
        self.d2 = self.chains["q2"].widths[-1] // 2 if self.two_layer else 0
        self._bufs: dict[int, dict[str, _Buffers]] = {}
        self._attach_grads()

    def _attach_grads(self) -> None:
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g

    def _buffers(self, b: int) -> dict[str, _Buffers]:
        if b not in self._bufs:
            rows = {"q1": b, "q2": self.k * b, "p1": self.k * b, "px": self.k * b}
            self._bufs[b] = {role: c.buffers(rows[role]) for role, c in self.chains.items()}
        return self._bufs[b]

    @torch.no_grad()
    def step(self, x: Tensor, beta: float = 1.0) -> tuple[ObjectiveResult, float, bool]:
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

    def _adam_direct(self) -> bool:
        """torch's fused Adam kernel called as ``Adam.step`` calls it, without its per-step Python
        work; False (nothing done) unless the optimizer is a plain fused ``torch.optim.Adam`` over
        exactly these parameters whose state exists (its first step made it)."""
        opt = self.optimizer
        if (type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1 or opt._optimizer_step_pre_hooks
                or opt._optimizer_step_post_hooks):
            return False
        group = opt.param_groups[0]
        if (not group.get("fused") or group["amsgrad"] or group["weight_decay"] or group["maximize"]
                or group.get("capturable") or group.get("differentiable")
                or group.get("decoupled_weight_decay") or len(group["params"]) != len(self.params)
                or any(a is not b for a, b in zip(group["params"], self.params, strict=True))):
            return False
        states = [opt.state.get(p) for p in self.params]
        if not all(states):
            return False
        steps = [st["step"] for st in states]
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(self.params, self.grads, [st["exp_avg"] for st in states],
                           [st["exp_avg_sq"] for st in states], [], steps, amsgrad=False, lr=group["lr"],
                           beta1=beta1, beta2=beta2, weight_decay=0.0, eps=group["eps"], maximize=False,
                           grad_scale=None, found_inf=None)
        return True

    @torch.no_grad()
    def gradients(self, x: Tensor, beta: float = 1.0) -> tuple[ObjectiveResult, Tensor]:
        """Forward and backward on ``x`` ([B, D]): the result, and the loss; gradients land in
        ``self.flat`` (and the parameters' ``.grad`` views of it)."""
        if self.params[0].grad is not self.grads[0]:
            self._attach_grads()
        if self.two_layer:
            return self._two_layer(x, beta)
        return self._one_layer(x, beta)

    # --- shared pieces ------------------------------------------------------------
    def _weights(self, log_px: Tensor, log_ratio: Tensor, beta: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """From log p(x|z) and log p(z) - log q ([K, B]): the reported bound [B], log w, the
        loss, dLoss/dlog w_train (G, [K, B]) and the encoder's weights A = r G."""
        k, b = log_px.shape
        log_w = log_px + log_ratio
        log_w_train = log_w if beta == 1.0 else log_px + beta * log_ratio
        if self.iwae:
            lse = torch.logsumexp(log_w_train, 0)
            c = torch.exp(log_w_train - lse)
            train_bound = lse - math.log(k)
            bound = train_bound if beta == 1.0 else torch.logsumexp(log_w, 0) - math.log(k)
        else:
            c = torch.full_like(log_w, 1.0 / k)
            train_bound = log_w_train.mean(0)
            bound = train_bound if beta == 1.0 else log_w.mean(0)
        loss = -train_bound.mean()
        g = c * (-1.0 / b)
        # DReG's path weight a_k = c_k - beta (c_k - c_k^2) = r_k c_k (objectives._dreg_path_weights)
        a = g * (1.0 - beta + beta * c) if self.dreg else g
        return bound, log_w, loss, g, a

    def _likelihood_backward(self, x: Tensor, logits: Tensor, g: Tensor, k: int) -> Tensor:
        """dLoss/dlogits = G (x - sigmoid(logits)), written over the logits."""
        s = torch.sigmoid(logits, out=logits).view(k, x.shape[0], -1)
        s.sub_(x).mul_(g.neg().unsqueeze(-1))
        return logits

    @staticmethod
    def _log_bernoulli(x: Tensor, logits: Tensor, k: int) -> Tensor:
        lv = logits.view(k, x.shape[0], -1)
        return torch.linalg.vecdot(lv, x) - torch.nn.functional.softplus(lv).sum(-1)

    # --- the models -------------------------------------------------------------
    def _one_layer(self, x: Tensor, beta: float) -> tuple[ObjectiveResult, Tensor]:
        k, b, d = self.k, x.shape[0], self.d1
        bufs = self._buffers(b)
        enc, dec = self.chains["q1"], self.chains["px"]
        out = enc.forward(x, bufs["q1"])
        mean, log_var = out[:, :d], out[:, d:]
        std = torch.exp(log_var * 0.5)
        eps = standard_normal((k, b, d), mean)
        z = torch.addcmul(mean, std, eps)  # [K, B, D]
        logits = dec.forward(z.view(k * b, d), bufs["px"])
        log_px = self._log_bernoulli(x, logits, k)
        half_log2pi = 0.5 * d * math.log(2 * math.pi)
        log_pz = -0.5 * torch.linalg.vecdot(z, z) - half_log2pi
        log_q = -0.5 * (log_var.sum(-1) + torch.linalg.vecdot(eps, eps)) - half_log2pi
        bound, log_w, loss, g, a = self._weights(log_px, log_pz - log_q, beta)
        terms = LogWeightTerms(log_px, {"z": log_pz}, {"z": log_q}, {"z": z})

        dlogits = self._likelihood_backward(x, logits, g, k)
        gz = dec.backward(z.view(k * b, d), dlogits, bufs["px"], input_grad=True).view(k, b, d)
        if self.dreg:
            gz.mul_((1.0 - beta + beta * (g * -b)).unsqueeze(-1))
        ab = (a * beta).unsqueeze(-1)
        gz.addcmul_(ab, z, value=-1.0)  # the prior's beta log p(z)
        if self.stl:  # - beta log q at fixed parameters: + beta eps / std through z
            gz.addcmul_(ab, eps / std)
        g_out = bufs["q1"].out  # the head's output is no longer needed: its gradient goes there
        g_mean, g_lv = g_out[:, :d], g_out[:, d:]
        torch.sum(gz, 0, out=g_mean)
        torch.sum(gz * eps, 0, out=g_lv)
        g_lv.mul_(std * 0.5)
        if not self.stl:  # d(-beta log q)/d log_var at the reparameterized sample: beta / 2
            g_lv.add_((a.sum(0) * (0.5 * beta)).unsqueeze(-1))
        enc.backward(x, g_out, bufs["q1"])
        res = ObjectiveResult(loss=loss, bound=bound, log_w=log_w, terms=terms)
        return res, loss

    def _two_layer(self, x: Tensor, beta: float) -> tuple[ObjectiveResult, Tensor]:
        k, b, d1, d2 = self.k, x.shape[0], self.d1, self.d2
        kb = k * b
        bufs = self._buffers(b)
        q1, q2, p1, px = (self.chains[r] for r in ("q1", "q2", "p1", "px"))
        half_log2pi1 = 0.5 * d1 * math.log(2 * math.pi)
        half_log2pi2 = 0.5 * d2 * math.log(2 * math.pi)
        # q(z1 | x)
        out1 = q1.forward(x, bufs["q1"])
        m1, lv1 = out1[:, :d1], out1[:, d1:]
        std1 = torch.exp(lv1 * 0.5)
        eps1 = standard_normal((k, b, d1), m1)
        z1 = torch.addcmul(m1, std1, eps1)  # [K, B, D1]
        z1f = z1.view(kb, d1)
        # q(z2 | z1)
        out2 = q2.forward(z1f, bufs["q2"])
        m2, lv2 = out2[:, :d2], out2[:, d2:]
        std2 = torch.exp(lv2 * 0.5)
        eps2 = standard_normal((k, b, d2), m2).view(kb, d2)
        z2 = torch.addcmul(m2, std2, eps2)  # [KB, D2]
        # p(z1 | z2) and p(x | z1)
        outp = p1.forward(z2, bufs["p1"])
        pm1, plv1 = outp[:, :d1], outp[:, d1:]
        logits = px.forward(z1f, bufs["px"])
        log_px = self._log_bernoulli(x, logits, k)
        log_p2 = (-0.5 * torch.linalg.vecdot(z2, z2) - half_log2pi2).view(k, b)
        u = z1f - pm1
        ip = torch.exp(-plv1)
        uip = u * ip
        log_p1 = (-0.5 * (plv1.sum(-1) + torch.linalg.vecdot(u, uip)) - half_log2pi1).view(k, b)
        log_q1 = -0.5 * (lv1.sum(-1) + torch.linalg.vecdot(eps1, eps1)) - half_log2pi1
        log_q2 = (-0.5 * (lv2.sum(-1) + torch.linalg.vecdot(eps2, eps2)) - half_log2pi2).view(k, b)
        bound, log_w, loss, g, a = self._weights(log_px, log_p2 + log_p1 - log_q1 - log_q2, beta)
        terms = LogWeightTerms(log_px, {"z1": log_p1, "z2": log_p2}, {"z1": log_q1, "z2": log_q2},
                               {"z1": z1, "z2": z2.view(k, b, d2)})

        # decoder side: weights G
        gb = (g * beta).view(kb, 1)
        dlogits = self._likelihood_backward(x, logits, g, k)
        gz1 = px.backward(z1f, dlogits, bufs["px"], input_grad=True)  # [KB, D1]
        g_p = bufs["p1"].out
        g_pm1, g_plv1 = g_p[:, :d1], g_p[:, d1:]
        torch.mul(uip, gb, out=g_pm1)  # d log p1 / d mean = (z1 - m) / var
        torch.mul(u, uip, out=g_plv1)  # d log p1 / d log_var = -(1 - u^2 / var) / 2
        g_plv1.sub_(1.0).mul_(gb * 0.5)
        gz1.sub_(g_pm1)  # d log p1 / d z1 = -(z1 - m) / var
        gz2 = p1.backward(z2, g_p, bufs["p1"], input_grad=True)  # [KB, D2]
        # encoder side: weights A = r G
        ab = (a * beta).view(kb, 1)
        if self.dreg:
            r = (1.0 - beta + beta * (g * -b)).view(kb, 1)
            gz1.mul_(r)
            gz2.mul_(r)
        gz2.addcmul_(ab, z2, value=-1.0)  # the prior's beta log p(z2)
        h2 = std2 * eps2 * 0.5  # d z2 / d log_var2
        g_q2 = bufs["q2"].out
        g_m2, g_lv2 = g_q2[:, :d2], g_q2[:, d2:]
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
            gz1.addcmul_(ab, (eps1 / std1).view(kb, d1))  # log q1 at fixed parameters
        gz1 = gz1.view(k, b, d1)
        g_q1 = bufs["q1"].out
        g_m1, g_lv1 = g_q1[:, :d1], g_q1[:, d1:]
        torch.sum(gz1, 0, out=g_m1)
        torch.sum(gz1 * eps1, 0, out=g_lv1)
        g_lv1.mul_(std1 * 0.5)
        if not self.stl:
            g_lv1.add_((a.sum(0) * (0.5 * beta)).unsqueeze(-1))
        q1.backward(x, g_q1, bufs["q1"])
        res = ObjectiveResult(loss=loss, bound=bound, log_w=log_w, terms=terms)
        return res, loss
