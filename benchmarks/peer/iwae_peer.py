"""An equal-budget peer for the IWAE table: the same model and schedule, trained by a short
plain-PyTorch loop that shares no code with elbolab's models, objectives or trainer.

    python benchmarks/peer/iwae_peer.py mnist-1layer-vae-k1 --passes 3 --data-dir /work/shared/data

Burda et al.'s one-layer MNIST model (784-200-200 tanh -> 50 Gaussian latents -> 200-200 tanh
-> Bernoulli logits), the IWAE (or k-sample VAE) bound, Adam (0.9, 0.999, eps 1e-4), batch 20,
dynamic binarization, lr 1e-3 * 10^(-i/7) for 3^i epochs in pass i (``--passes 3``: the quick
budget's 13 epochs). Only the data loading and the IS estimator are elbolab's, so both rows are
scored by the same estimator on the same fixed binarization of the same test images. The result
goes into ``<results>/iwae-table/<budget>/peer.json``, which ``elbolab reproduce`` prints in
the table's peer column.
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
from torch.distributions import Normal

from elbolab.data import evaluation_images, load
from elbolab.evaluation import log_likelihood

#: row id -> (objective, k); all are the one-layer MNIST model
ROWS = {f"mnist-1layer-{o}-k{k}": (o, k) for o in ("vae", "iwae") for k in (1, 5, 50)}
BUDGET_PASSES = {"quick": 3, "medium": 5, "paper": 8}


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
          batch: int = 20, log=print, checkpoint: Path | None = None) -> list[list[float]]:
    """The IWAE paper's schedule; returns [epoch, mean training bound] per epoch. With
    ``checkpoint``, the state is saved after every epoch and a rerun continues from it."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-4)
    curve: list[list[float]] = []
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        curve = state["curve"]
        log(f"resumed after epoch {len(curve)} from {checkpoint}")
    epoch = 0
    for i in range(passes):
        for _ in range(3**i):
            epoch += 1
            if epoch <= len(curve):
                continue
            for group in opt.param_groups:
                group["lr"] = 1e-3 * 10 ** (-i / 7)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("row", choices=sorted(ROWS))
    p.add_argument("--budget", default="quick", choices=sorted(BUDGET_PASSES))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--results", default="results")
    p.add_argument("--k-eval", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    objective, k = ROWS[args.row]
    data = load("mnist", args.data_dir)
    x_train = data.as_float("train")
    model = PeerVAE(data.data_dim)
    t0 = time.perf_counter()
    # beside the row folders (not committed): a killed run continues from its last epoch
    ckpt = Path(args.results) / "iwae-table" / args.budget / "rows" / f"peer-{args.row}-seed{args.seed}"
    ckpt = ckpt / "checkpoint.pt"
    curve = train(model, x_train, objective, k, BUDGET_PASSES[args.budget], args.seed,
                  log=lambda m: print(m, flush=True), checkpoint=ckpt)
    t1 = time.perf_counter()
    x_test = evaluation_images(data, "test", "dynamic", 0)  # the fixed draw every elbolab row is scored on
    ll = log_likelihood(model, x_test, k=args.k_eval, seed=1)
    out = Path(args.results) / "iwae-table" / args.budget / "peer.json"
    doc = json.loads(out.read_text()) if out.exists() else {"implementation": "benchmarks/peer/iwae_peer.py",
                                                            "rows": {}}
    doc["rows"][args.row] = {
        "value": round(-ll.mean, 4), "stderr": round(ll.stderr, 4), "k_importance": args.k_eval,
        "n_test": int(x_test.shape[0]), "epochs": len(curve), "train_seconds": round(t1 - t0, 1),
        "eval_seconds": round(time.perf_counter() - t1, 1), "curve": curve,
        "command": "python benchmarks/peer/iwae_peer.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{args.row}: peer NLL {-ll.mean:.2f} ± {ll.stderr:.2f} (K = {args.k_eval}) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
