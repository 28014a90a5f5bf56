"""An equal-budget peer for the IWAE and ELBO-surgery tables: the same model and schedule,
trained by a short plain-PyTorch loop that shares no code with elbolab's models, objectives or
trainer.

    python benchmarks/peer/iwae_peer.py mnist-1layer-vae-k1 --budget quick --data-dir /work/shared/data
    python benchmarks/peer/iwae_peer.py mnist-vae-10latents --budget quick --seeds 0-7 --data-dir /work/shared/data

IWAE table rows: Burda et al.'s one-layer MNIST model (784-200-200 tanh -> 50 Gaussian latents
-> 200-200 tanh -> Bernoulli logits), the IWAE (or k-sample VAE) bound, Adam (0.9, 0.999, eps
1e-4), batch 20, dynamic binarization, the decoder's output bias started at the logits of the
mean training image, lr 1e-3 * 10^(-i/7) for 3^i epochs in pass i (quick: 13 epochs), scored
by elbolab's IS estimator (K = 5000) on the same fixed binarization of the same test images.
Surgery rows: the same MLP with 2, 10 or 20 latents and the same output bias, single-sample
ELBO, Adam lr 1e-3 (eps 1e-8), batch 100, 10 / 100 / 1000 epochs, scored by the ELBO over the
60,000 training images as the surgery table computes it (one z per image, the KL in closed
form). Only the data loading and the IS estimator are elbolab's. The result goes into
``<results>/<table>/<budget>/peer.json``, which ``elbolab reproduce`` prints as the table's
peer column. With ``--seeds`` one run is trained per seed: the row holds their mean, each seed's
value and their standard deviation (``seed_sd``), the spread one training run has, without which
a gap between ours (one run) and the peer cannot be told from chance.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal

from elbolab.data import evaluation_images, load
from elbolab.evaluation import log_likelihood

#: IWAE table: row id -> (objective, k); all are the one-layer MNIST model with 50 latents
ROWS = {f"mnist-1layer-{o}-k{k}": (o, k) for o in ("vae", "iwae") for k in (1, 5, 50)}
BUDGET_PASSES = {"quick": 3, "medium": 5, "paper": 8}
#: surgery table: row id -> latents; budget -> epochs
SURGERY_ROWS = {f"mnist-vae-{d}latents": d for d in (2, 10, 20)}
SURGERY_EPOCHS = {"quick": 10, "medium": 100, "paper": 1000}


class PeerVAE(nn.Module):
    def __init__(self, data_dim: int = 784, hidden: int = 200, latent: int = 50) -> None:
        super().__init__()
        self.latent = latent
        self.enc = nn.Sequential(nn.Linear(data_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.enc_mean = nn.Linear(hidden, latent)
        self.enc_log_var = nn.Linear(hidden, latent)
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, data_dim))

    def log_weights_from_noise(self, x: Tensor, eps: Tensor) -> Tensor:
        """log p(x, z) - log q(z|x) at z = mean + std * eps; ``eps`` [K, B, latent] -> [K, B]."""
        h = self.enc(x)
        q = Normal(self.enc_mean(h), torch.exp(0.5 * self.enc_log_var(h)))
        z = q.loc + q.scale * eps
        log_q = q.log_prob(z).sum(-1)
        log_prior = Normal(torch.zeros_like(z), torch.ones_like(z)).log_prob(z).sum(-1)
        logits = self.dec(z)
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        return log_px + log_prior - log_q

    def start_at_mean_image(self, x_train: Tensor) -> None:
        """The decoder's output bias at the logits of the mean training image (the IWAE paper's
        init; PyTorch's default init elsewhere)."""
        p = x_train.mean(0).clamp(1e-3, 1 - 1e-3)
        with torch.no_grad():
            self.dec[-1].bias.copy_(torch.log(p) - torch.log1p(-p))

    def elbo_terms(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """(log p(x|z) at z = mean + std * eps, [K, B]; KL(q(z|x) || N(0, I)) in closed form, [B])."""
        h = self.enc(x)
        mean, log_var = self.enc_mean(h), self.enc_log_var(h)
        z = mean + torch.exp(0.5 * log_var) * eps
        logits = self.dec(z)
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        kl = 0.5 * (mean**2 + log_var.exp() - 1.0 - log_var).sum(-1)
        return log_px, kl

    def log_weights(self, x: Tensor, k: int) -> Tensor:
        """What elbolab's IS estimator calls: K fresh draws per point."""
        eps = torch.randn(k, x.shape[0], self.latent, dtype=x.dtype, device=x.device)
        return self.log_weights_from_noise(x, eps)


def bound(log_w: Tensor, objective: str) -> Tensor:
    """Per-point bound from [K, B] log weights: IWAE's log mean exp, or the VAE's mean."""
    if objective == "iwae":
        return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
    return log_w.mean(0)


def train(model: PeerVAE, x_train: Tensor, objective: str, k: int, passes: int, seed: int,
          batch: int = 20, log=print, checkpoint: Path | None = None, schedule: list[float] | None = None,
          adam_eps: float = 1e-4) -> list[list[float]]:
    """The IWAE paper's schedule (``passes``), or one learning rate per epoch (``schedule``);
    returns [epoch, mean training bound] per epoch. With ``checkpoint``, the state is saved
    after every epoch and a rerun continues from it."""
    if schedule is None:
        schedule = [1e-3 * 10 ** (-i / 7) for i in range(passes) for _ in range(3**i)]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=schedule[0], betas=(0.9, 0.999), eps=adam_eps)
    curve: list[list[float]] = []
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        curve = state["curve"]
        log(f"resumed after epoch {len(curve)} from {checkpoint}")
    for epoch, lr in enumerate(schedule, start=1):
        if epoch <= len(curve):
            continue
        for group in opt.param_groups:
            group["lr"] = lr
        t0, total = time.perf_counter(), 0.0
        order = torch.randperm(x_train.shape[0], generator=g)
        for start in range(0, x_train.shape[0], batch):
            x = torch.bernoulli(x_train[order[start:start + batch]], generator=g)
            eps = torch.randn(k, x.shape[0], model.latent, generator=g)
            b = bound(model.log_weights_from_noise(x, eps), objective)
            opt.zero_grad()
            (-b.mean()).backward()
            opt.step()
            total += float(b.detach().sum())
        curve.append([epoch, total / x_train.shape[0]])
        log(f"epoch {epoch}: train bound {curve[-1][1]:.2f}, {time.perf_counter() - t0:.0f} s")
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "generator": g.get_state(),
                        "curve": curve}, tmp)
            tmp.replace(checkpoint)
    return curve


def surgery_elbo(model: PeerVAE, x: Tensor, seed: int = 1, batch: int = 100) -> tuple[float, float]:
    """Mean ELBO over ``x`` as the surgery table computes it (one z per image, closed-form KL),
    ± the standard error of its reconstruction term."""
    g = torch.Generator().manual_seed(seed)
    per_point = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            xb = x[start:start + batch]
            log_px, kl = model.elbo_terms(xb, torch.randn(1, xb.shape[0], model.latent, generator=g))
            per_point.append((log_px[0] - kl).double())
    v = torch.cat(per_point)
    return float(v.mean()), float(v.std() / math.sqrt(v.numel()))


def parse_seeds(text: str) -> list[int]:
    """``"0-7"`` or ``"0,1,5"`` -> the seeds, in order, each once."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            seeds += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: {text!r} is not a list such as 0-7 or 0,1,5") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds: no seed given")
    return list(dict.fromkeys(seeds))


def run_seed(row: str, budget: str, data, x_train: Tensor, seed: int, out: Path, k_eval: int) -> dict:
    """Train the row from ``seed`` and score it: value, stderr (over the images), curve, seconds."""
    torch.manual_seed(seed)
    # beside the row folders (not committed): a killed run continues from its last epoch
    ckpt = out / "rows" / f"peer-{row}-seed{seed}" / "checkpoint.pt"
    log = lambda m: print(f"seed {seed}: {m}", flush=True)  # noqa: E731
    t0 = time.perf_counter()
    if row in SURGERY_ROWS:
        model = PeerVAE(data.data_dim, latent=SURGERY_ROWS[row])
        model.start_at_mean_image(x_train)
        curve = train(model, x_train, "vae", 1, 0, seed, batch=100, log=log, checkpoint=ckpt,
                      schedule=[1e-3] * SURGERY_EPOCHS[budget], adam_eps=1e-8)
    else:
        objective, k = ROWS[row]
        model = PeerVAE(data.data_dim)
        model.start_at_mean_image(x_train)
        curve = train(model, x_train, objective, k, BUDGET_PASSES[budget], seed, log=log, checkpoint=ckpt)
    t1 = time.perf_counter()
    if row in SURGERY_ROWS:  # the fixed draw of the training images the surgery table scores
        x_eval = evaluation_images(data, "train", "dynamic", 0)
        value, stderr = surgery_elbo(model, x_eval)
    else:  # the fixed draw of the test images every elbolab row is scored on
        x_eval = evaluation_images(data, "test", "dynamic", 0)
        ll = log_likelihood(model, x_eval, k=k_eval, seed=1)
        value, stderr = -ll.mean, ll.stderr
    log(f"{value:.3f} ± {stderr:.3f}")
    return {"value": value, "stderr": stderr, "curve": curve, "n_images": int(x_eval.shape[0]),
            "train_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("row", choices=sorted(ROWS) + sorted(SURGERY_ROWS))
    p.add_argument("--budget", default="quick", choices=sorted(BUDGET_PASSES))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--results", default="results")
    p.add_argument("--k-eval", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0)
    seeds.add_argument("--seeds", type=parse_seeds, default=None,
                       help="train one run per seed (0-7 or 0,1,5): the value is their mean and the row "
                            "records their spread, which the table's gap test needs")
    p.add_argument("--again", action="store_true", help="run a row that peer.json already holds")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    surgery = args.row in SURGERY_ROWS
    table = "surgery-table" if surgery else "iwae-table"
    out = Path(args.results) / table / args.budget
    path = out / "peer.json"
    if not args.again and path.exists() and args.row in json.loads(path.read_text()).get("rows", {}):
        print(f"{args.row}: already in {path} (--again to rerun it)")
        return 0
    data = load("mnist", args.data_dir)
    x_train = data.as_float("train")
    seed_list = args.seeds or [args.seed]
    runs = {s: run_seed(args.row, args.budget, data, x_train, s, out, args.k_eval) for s in seed_list}
    values = [r["value"] for r in runs.values()]
    first = runs[seed_list[0]]
    scored = ({"metric": "elbo over the training images"} if surgery
              else {"metric": "nll", "k_importance": args.k_eval})
    spread = {}
    if len(values) > 1:  # one run per seed: their mean, and the spread one run has
        spread = {"seeds": {str(s): round(r["value"], 4) for s, r in runs.items()},
                  "seed_sd": round(statistics.stdev(values), 4)}
    doc = json.loads(path.read_text()) if path.exists() else {"implementation": "benchmarks/peer/iwae_peer.py",
                                                              "rows": {}}
    doc["rows"][args.row] = {
        "value": round(statistics.fmean(values), 4),
        "stderr": round(statistics.fmean(r["stderr"] for r in runs.values()), 4), **scored, **spread,
        "n_images": first["n_images"], "epochs": len(first["curve"]),
        "train_seconds": round(sum(r["train_seconds"] for r in runs.values()), 1),
        "eval_seconds": round(sum(r["eval_seconds"] for r in runs.values()), 1),
        "curve": first["curve"], "command": "python benchmarks/peer/iwae_peer.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    sd = f", seed-to-seed sd {spread['seed_sd']:.2f} over {len(values)} seeds" if spread else ""
    print(f"{args.row}: peer {scored['metric']} {doc['rows'][args.row]['value']:.2f}{sd} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
