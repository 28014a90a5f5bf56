"""An equal-budget peer for the VampPrior table's row mnist-hierarchical-vampprior: the same
model and schedule, trained by a short plain-PyTorch loop that shares no code with elbolab's
models, priors, objectives, optimizers or trainer.

    python benchmarks/peer/vampprior_peer.py --budget quick --data-dir /work/shared/data

The model is Tomczak & Welling's two-level hierarchical VAE (their models/HVAE_2level.py):
q(z2 | x) q(z1 | x, z2), p(z2) p(z1 | z2) p(x | z1, z2), 40 + 40 latents, every deterministic
layer a gated dense layer of 300 units (h(x) * sigmoid(g(x))), the two-input branches one
gated layer per input and one on their concatenation, Gaussian log-variances through
hardtanh(-6, 2), He-normal weights. The prior on z2 is a VampPrior of 500 learned
pseudo-inputs hardtanh_[0,1](u_c), u_c started at N(0.05, 0.01) as their code does for MNIST.
The protocol is elbolab's vampprior-paper preset at the table's budget: static MNIST
(binarized-mnist, the 50,000 training images), single-sample ELBO with a KL warm-up whose
weight rises linearly from 0 at the first step to 1 after ``warmup`` epochs (updated every
step), AdamNormGrad (their utils/optimizer.py: Adam on gradients divided by their L2 norm)
lr 5e-4, batch 100, the decoder's output bias started at the logits of the mean training
image, and the test log-likelihood from elbolab's IS estimator (K = 5000) on the same test
images. Only the data loading and the IS estimator are elbolab's. The result goes into
``<results>/vampprior-table/<budget>/peer.json``, which ``elbolab reproduce`` prints as the
table's peer column.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elbolab.data import evaluation_images, load
from elbolab.evaluation import log_likelihood, random_subset

ROW = "mnist-hierarchical-vampprior"
TABLE = "vampprior-table"
#: budget -> (epochs, warm-up epochs); the quick budget runs without early stopping
BUDGETS = {"quick": (10, 5)}
LOG_2PI = math.log(2 * math.pi)


class Gated(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.h = nn.Linear(n_in, n_out)
        self.g = nn.Linear(n_in, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


def log_normal(z: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(z; mean, exp(log_var)) summed over the last axis."""
    return -0.5 * (LOG_2PI + log_var + (z - mean) ** 2 * torch.exp(-log_var)).sum(-1)


def mixture_components(z: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(z; mean_c, exp(log_var_c)) for every component c, ``z`` [..., D], ``mean`` and
    ``log_var`` [C, D] -> [..., C]. The square is expanded into two matrix products so no
    [..., C, D] tensor is built (at K = 5000 that tensor made the test log-likelihood 5x
    slower); they run in float64 because the expanded terms cancel."""
    zd, m, lv = z.double(), mean.double(), log_var.double()
    prec = torch.exp(-lv)  # [C, D]
    quad = (zd * zd) @ prec.T - 2.0 * zd @ (m * prec).T + (m * m * prec).sum(-1)
    return (-0.5 * (quad + lv.sum(-1) + z.shape[-1] * LOG_2PI)).to(z.dtype)


class PeerHVAE(nn.Module):
    def __init__(self, data_dim: int = 784, width: int = 300, z1: int = 40, z2: int = 40,
                 components: int = 500, pseudo_mean: float = 0.05, pseudo_std: float = 0.01) -> None:
        super().__init__()
        self.data_dim, self.z1, self.z2 = data_dim, z1, z2
        # q(z2 | x)
        self.q_z2_layers = nn.Sequential(Gated(data_dim, width), Gated(width, width))
        self.q_z2_mean = nn.Linear(width, z2)
        self.q_z2_logvar = nn.Linear(width, z2)
        # q(z1 | x, z2)
        self.q_z1_x = Gated(data_dim, width)
        self.q_z1_z2 = Gated(z2, width)
        self.q_z1_joint = Gated(2 * width, width)
        self.q_z1_mean = nn.Linear(width, z1)
        self.q_z1_logvar = nn.Linear(width, z1)
        # p(z1 | z2)
        self.p_z1_layers = nn.Sequential(Gated(z2, width), Gated(width, width))
        self.p_z1_mean = nn.Linear(width, z1)
        self.p_z1_logvar = nn.Linear(width, z1)
        # p(x | z1, z2): Bernoulli logits
        self.p_x_z1 = Gated(z1, width)
        self.p_x_z2 = Gated(z2, width)
        self.p_x_joint = Gated(2 * width, width)
        self.p_x_logits = nn.Linear(width, data_dim)
        for m in self.modules():  # He-normal weights, PyTorch's default biases
            if isinstance(m, nn.Linear):
                with torch.no_grad():
                    m.weight.normal_(0.0, math.sqrt(2.0 / m.in_features))
        # VampPrior: pseudo-input c is hardtanh_[0,1](pseudo[c])
        self.pseudo = nn.Parameter(torch.randn(components, data_dim) * pseudo_std + pseudo_mean)

    @staticmethod
    def _clamp(log_var: Tensor) -> Tensor:
        return F.hardtanh(log_var, -6.0, 2.0)

    def q_z2(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.q_z2_layers(x)
        return self.q_z2_mean(h), self._clamp(self.q_z2_logvar(h))

    def q_z1(self, x: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
        hx = self.q_z1_x(x).expand(*z2.shape[:-1], -1)
        h = self.q_z1_joint(torch.cat([hx, self.q_z1_z2(z2)], -1))
        return self.q_z1_mean(h), self._clamp(self.q_z1_logvar(h))

    def p_z1(self, z2: Tensor) -> tuple[Tensor, Tensor]:
        h = self.p_z1_layers(z2)
        return self.p_z1_mean(h), self._clamp(self.p_z1_logvar(h))

    def p_x(self, z1: Tensor, z2: Tensor) -> Tensor:
        return self.p_x_logits(self.p_x_joint(torch.cat([self.p_x_z1(z1), self.p_x_z2(z2)], -1)))

    def log_p_z2(self, z2: Tensor) -> Tensor:
        """VampPrior: log (1/C) sum_c q(z2 | u_c), ``z2`` [..., z2] -> [...]."""
        mean, log_var = self.q_z2(F.hardtanh(self.pseudo, 0.0, 1.0))  # [C, z2]
        return torch.logsumexp(mixture_components(z2, mean, log_var), -1) - math.log(mean.shape[0])

    def terms_from_noise(self, x: Tensor, eps1: Tensor, eps2: Tensor) -> tuple[Tensor, Tensor]:
        """(log p(x | z1, z2), log p(z1, z2) - log q(z1, z2 | x)), each [K, B], at
        z2 = m2 + s2 eps2 and z1 = m1(x, z2) + s1 eps1; ``eps1``, ``eps2`` [K, B, 40]."""
        m2, lv2 = self.q_z2(x)
        z2 = m2 + torch.exp(0.5 * lv2) * eps2
        m1, lv1 = self.q_z1(x, z2)
        z1 = m1 + torch.exp(0.5 * lv1) * eps1
        logits = self.p_x(z1, z2)
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        pm, plv = self.p_z1(z2)
        log_ratio = log_normal(z1, pm, plv) + self.log_p_z2(z2) - log_normal(z1, m1, lv1) - log_normal(z2, m2, lv2)
        return log_px, log_ratio

    def log_weights_from_noise(self, x: Tensor, eps1: Tensor, eps2: Tensor, beta: float = 1.0) -> Tensor:
        """log p(x|z) + beta (log p(z) - log q(z|x)), [K, B]; beta < 1 is the warm-up."""
        log_px, log_ratio = self.terms_from_noise(x, eps1, eps2)
        return log_px + beta * log_ratio

    def log_weights(self, x: Tensor, k: int) -> Tensor:
        """What elbolab's IS estimator calls: K fresh draws per point (z2's noise first)."""
        shape = (k, x.shape[0])
        eps2 = torch.randn(*shape, self.z2, dtype=x.dtype, device=x.device)
        eps1 = torch.randn(*shape, self.z1, dtype=x.dtype, device=x.device)
        return self.log_weights_from_noise(x, eps1, eps2)

    def start_at_mean_image(self, x_train: Tensor) -> None:
        p = x_train.mean(0).clamp(1e-3, 1 - 1e-3)
        with torch.no_grad():
            self.p_x_logits.bias.copy_(torch.log(p) - torch.log1p(-p))


class NormGradAdam(torch.optim.Optimizer):
    """Tomczak & Welling's AdamNormGrad: each gradient divided by its L2 norm + 1e-7, then Adam
    with eps added to sqrt(v) and both bias corrections in the step size."""

    def __init__(self, params, lr: float = 5e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad / (torch.linalg.vector_norm(p.grad) + 1e-7)
                st = self.state[p]
                if not st:
                    st["t"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["t"] += 1
                st["m"].mul_(b1).add_(g, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                size = group["lr"] * math.sqrt(1 - b2 ** st["t"]) / (1 - b1 ** st["t"])
                p.addcdiv_(st["m"], st["v"].sqrt().add_(group["eps"]), value=-size)
        return None


def warmup(epoch: int, step: int, steps_per_epoch: int, warmup_epochs: int) -> float:
    """The KL weight at ``step`` (0-based) of 0-based ``epoch``: linear from 0 to 1 over
    ``warmup_epochs`` epochs, then 1."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + step / steps_per_epoch) / warmup_epochs)


def train(model: PeerHVAE, x_train: Tensor, epochs: int, warmup_epochs: int, seed: int, lr: float = 5e-4,
          batch: int = 100, log=print, checkpoint: Path | None = None, max_steps: int | None = None,
          timing: dict[str, float | None] | None = None) -> list[list[float]]:
    """Returns [epoch, mean training ELBO (at KL weight 1, as elbolab reports it)] per epoch. With
    ``checkpoint`` the state is saved after every epoch and a rerun continues from it;
    ``max_steps`` cuts every epoch short (timing only). ``timing["seconds"]``: the training time of
    every epoch, earlier sittings' included (None after a checkpoint that did not keep it). The
    random streams stay on the CPU whatever the model's device, so a run draws the same batches and
    noise anywhere."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    opt = NormGradAdam(model.parameters(), lr=lr)
    curve: list[list[float]] = []
    spent: float | None = 0.0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"].cpu())
        curve = state["curve"]
        spent = state.get("seconds")
        log(f"resumed after epoch {len(curve)} from {checkpoint}")
    n = x_train.shape[0]
    steps = math.ceil(n / batch)
    for epoch in range(len(curve), epochs):
        t0, total, seen = time.perf_counter(), 0.0, 0
        order = torch.randperm(n, generator=g)
        for i in range(steps if max_steps is None else min(steps, max_steps)):
            x = x_train[order[i * batch:(i + 1) * batch]].to(device)
            eps2 = torch.randn(1, x.shape[0], model.z2, generator=g).to(device)
            eps1 = torch.randn(1, x.shape[0], model.z1, generator=g).to(device)
            log_px, log_ratio = model.terms_from_noise(x, eps1, eps2)
            tempered = (log_px + warmup(epoch, i, steps, warmup_epochs) * log_ratio).mean(0)
            opt.zero_grad()
            (-tempered.mean()).backward()
            opt.step()
            total, seen = total + float((log_px + log_ratio).detach().sum()), seen + x.shape[0]
        curve.append([epoch + 1, total / seen])
        spent = None if spent is None else spent + time.perf_counter() - t0
        log(f"epoch {epoch + 1}: train bound {curve[-1][1]:.2f}, {time.perf_counter() - t0:.0f} s")
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "generator": g.get_state(),
                        "curve": curve, "seconds": spent}, tmp)
            tmp.replace(checkpoint)
    if timing is not None:
        timing["seconds"] = spent
    return curve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="quick", choices=sorted(BUDGETS))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--results", default="results")
    p.add_argument("--k-eval", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--test-images", type=int, default=0,
                   help="score this many test images chosen as elbolab's eval.test_images chooses them (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-steps", type=int, default=0,
                   help="only time this many training steps (no results written)")
    p.add_argument("--time-eval", type=int, default=0,
                   help="only time the IS evaluation on this many test images (no training, no results)")
    p.add_argument("--again", action="store_true", help="rerun the row though peer.json already holds it")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.results) / TABLE / args.budget
    path = out / "peer.json"
    if not args.time_steps and not args.again and path.exists() and ROW in json.loads(path.read_text()).get("rows", {}):
        print(f"{ROW}: already in {path} (--again to rerun it)")
        return 0
    data = load("binarized-mnist", args.data_dir)
    x_train = data.as_float("train")
    model = PeerHVAE(data.data_dim)
    model.start_at_mean_image(x_train)
    model.to(args.device)
    epochs, warm = BUDGETS[args.budget]
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.time_steps:
        t0 = time.perf_counter()
        train(model, x_train, 1, warm, args.seed, log=log, max_steps=args.time_steps)
        per_step = (time.perf_counter() - t0) / args.time_steps
        print(f"{per_step * 1e3:.0f} ms per step of 100, {per_step * math.ceil(x_train.shape[0] / 100) / 60:.1f} min "
              f"per epoch ({args.threads} thread(s))")
        return 0
    if args.time_eval:
        x_test = random_subset(evaluation_images(data, "test", "static", 0), args.time_eval)
        t0 = time.process_time()
        log_likelihood(model, x_test, k=args.k_eval, seed=1, device=args.device)
        per_image = (time.process_time() - t0) / x_test.shape[0]
        print(f"{per_image:.3f} CPU-s per test image at K = {args.k_eval}, {per_image * 10_000 / 60:.0f} CPU-min "
              f"for 10,000 ({args.threads} thread(s); the untrained model: the cost does not depend on the weights)")
        return 0
    # beside the row folders (not committed): a killed run continues from its last epoch
    ckpt = out / "rows" / f"peer-{ROW}-seed{args.seed}" / "checkpoint.pt"
    timing: dict[str, float | None] = {}
    curve = train(model, x_train, epochs, warm, args.seed, log=log, checkpoint=ckpt, timing=timing)
    t1 = time.perf_counter()
    x_test = random_subset(evaluation_images(data, "test", "static", 0), args.test_images)
    # a killed scoring continues from the points it kept there
    ll = log_likelihood(model, x_test, k=args.k_eval, seed=1, device=args.device,
                        progress=f"peer test log p(x), IS K={args.k_eval}",
                        partial_file=ckpt.parent / "scores.partial.pt")
    doc = json.loads(path.read_text()) if path.exists() else {"implementation": "benchmarks/peer/vampprior_peer.py",
                                                              "rows": {}}
    doc["rows"][ROW] = {
        "value": round(ll.mean, 4), "stderr": round(ll.stderr, 4), "metric": "log_likelihood",
        "k_importance": args.k_eval, "n_images": int(x_test.shape[0]), "epochs": len(curve),
        "warmup_epochs": warm, "train_seconds": None if timing["seconds"] is None else round(timing["seconds"], 1),
        "eval_seconds": round(time.perf_counter() - t1 + ll.earlier_seconds, 1),  # with earlier sittings
        "curve": curve,
        "command": "python benchmarks/peer/vampprior_peer.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{ROW}: peer test LL {ll.mean:.2f} ± {ll.stderr:.2f} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
