"""Evaluating a model on data: the importance-sampled log-likelihood and mean bounds.

log p(x) ~ L_K for large K. Many test points are evaluated together and the K samples
are drawn in chunks; a running log-sum-exp in float64 combines the chunks, so memory is
bounded by ``batch_size * chunk_size`` log weights (plus the model's activations for that
many samples) at any K, and the estimate does not depend on the chunking beyond rounding.
On a CPU a small chunk keeps the decoder's activations in cache (docs/bench.md measures
the chunk sizes). Also here: the seeding and eval-mode helpers every evaluation shares.

An estimate over a whole test set at K = 5000 can take an hour of a CPU core, so
``log_likelihood`` can keep its finished points and the RNG state in a file: a killed
scoring continues from there and gives the same numbers bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import bounds
from .files import atomic_torch_save
from .models.base import HasLogWeights, model_input
from .progress import Progress

#: how often a scoring with a partial_file writes it, in seconds: losing up to a minute is cheap,
#: and the write (the scores so far) is small
SAVE_EVERY_S = 60.0


@dataclass
class LikelihoodResult:
    #: [N] float64 estimates of log p(x_n), nats
    per_point: Tensor
    k: int
    #: wall seconds that earlier sittings spent on the points this one continued from
    #: (a killed scoring's kept file): this sitting's time plus it is the whole scoring's
    earlier_seconds: float = 0.0

    @property
    def mean(self) -> float:
        return float(self.per_point.mean())

    @property
    def stderr(self) -> float:
        """Standard error of the mean over test points."""
        n = self.per_point.numel()
        return float(self.per_point.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")

    def to_dict(self) -> dict:
        return {"k": self.k, "mean": self.mean, "stderr": self.stderr, "n": self.per_point.numel(),
                "earlier_seconds": self.earlier_seconds}


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block with torch's global RNG seeded, then restore the caller's RNG state,
    so an evaluation inside training neither repeats nor perturbs the training stream."""
    if seed is None:
        yield
        return
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def eval_mode(model: object) -> Iterator[None]:
    """Evaluate in eval mode, then give the model back in the mode it was in."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def model_device(model: object) -> torch.device:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def model_dtype(model: object) -> torch.dtype | None:
    """The floating dtype of the model's parameters (None without any): the data is cast
    to it, so a float64 model scores float32 images (as LinearGaussian does itself)."""
    params = model.parameters() if hasattr(model, "parameters") else ()
    return next((p.dtype for p in params if p.is_floating_point()), None)


def progress_bar(total: int, what: str | None, unit: str = "img") -> Progress:
    """A progress bar over ``total`` items saying ``what`` is being done; none when ``what`` is
    None; off a terminal, a plain line every few seconds (:class:`~elbolab.progress.Progress`)."""
    return Progress(total, what or "", unit, enabled=what is not None)


def random_subset(x: Tensor, n: int, seed: int = 0) -> Tensor:
    """``n`` rows of ``x`` ``[N, ...]`` chosen at random with ``seed``, in their stored order
    (all of them when ``n`` is 0 or at least N); stored splits may be sorted by class.
    The same rows as ``elbolab diagnose --points n``."""
    if n <= 0 or n >= x.shape[0]:
        return x
    keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return x[keep.to(x.device)]


def batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def check_inputs(data: Tensor, k: int, batch_size: int, chunk_size: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    if data.dim() != 2 or data.shape[0] == 0:
        raise ValueError(f"data must be a non-empty [N, D] tensor, got shape {tuple(data.shape)}")


def log_weight_chunks(model: HasLogWeights, x: Tensor, k: int, chunk_size: int) -> Iterator[Tensor]:
    """Yield ``[c, B]`` float64 log weights, ``c <= chunk_size``, ``k`` rows in all.

    One ``log_weights`` call per chunk draws c samples for all B points at once: the
    model sees ``c * B`` rows, so the decoder runs as one GEMM per layer (k is folded
    into the batch) and nothing is repeated per point.
    """
    for chunk in batches(k, chunk_size):
        yield model.log_weights(x, chunk.stop - chunk.start).double()


@torch.inference_mode()
def log_likelihood(
    model: HasLogWeights,
    data: Tensor,
    k: int = 5000,
    batch_size: int = 100,
    chunk_size: int = 50,
    seed: int | None = 0,
    device: str | torch.device | None = None,
    progress: str | None = None,
    partial_file: str | Path | None = None,
    save_every_s: float | None = None,
) -> LikelihoodResult:
    """L_K estimate of log p(x) for every row of ``data`` ([N, D] floats), in nats.

    Exactly ``k`` samples are used for every point (the last chunk is shorter); the
    per-chunk log-sum-exps are combined in float64 by a running ``logaddexp``, so the
    result equals one logsumexp over all k weights up to rounding, whatever the chunking.

    Memory is bounded independently of k: one call holds the model's activations for
    ``batch_size * chunk_size`` samples plus ``batch_size`` running sums (halve either size
    to halve it; the benchmark reports the peak).
    ``seed`` makes the estimate reproducible without touching the caller's RNG stream.
    ``progress``: show a progress bar with this description (:func:`progress_bar`).
    ``partial_file``: keep the finished points there (atomically, at most every
    ``save_every_s`` seconds, default :data:`SAVE_EVERY_S`) and continue from it when it holds the same scoring (same
    weights, data, k, batches, chunks and seed); removed once every point is scored.
    """
    if data.dim() >= 2:  # uint8 or [N, H, W] images as the data hands them out
        data = model_input(data, getattr(model, "data_dim", None))
    check_inputs(data, k, batch_size, chunk_size)
    device = torch.device(device) if device is not None else model_device(model)
    dtype = model_dtype(model) or data.dtype
    out = torch.empty(data.shape[0], dtype=torch.float64)
    keep = None
    if partial_file is not None and seed is not None:  # unseeded draws cannot be continued alike
        every = SAVE_EVERY_S if save_every_s is None else save_every_s
        keep = _PartialScores(Path(partial_file), model, data, (k, batch_size, chunk_size, seed), device, every)
    with seeded(seed, device), eval_mode(model), progress_bar(data.shape[0], progress) as bar:
        done = keep.restore(out) if keep is not None else 0
        bar.update(done)
        for sl in batches(data.shape[0], batch_size):
            if sl.stop <= done:
                continue
            x = data[sl].to(device, dtype, non_blocking=True)
            acc = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=device)
            for lw in log_weight_chunks(model, x, k, chunk_size):
                acc = torch.logaddexp(acc, torch.logsumexp(lw, dim=0))
            out[sl] = (acc - math.log(k)).cpu()
            bar.update(x.shape[0])
            if keep is not None:
                keep.save(out, sl.stop)
    if keep is not None:
        keep.remove()
    return LikelihoodResult(out, k, keep.earlier_seconds if keep is not None else 0.0)


def _raw_bytes(t: Tensor) -> bytes:
    """A tensor's bytes as stored, whatever its dtype (numpy has no bfloat16)."""
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


class _PartialScores:
    """The points a scoring has finished, with the RNG state after them, in one file.

    A file from another scoring (other weights, data or settings) is ignored and later
    replaced; its fingerprint is a digest of all of them, so a retrained model never
    continues an old model's scores.
    """

    def __init__(self, path: Path, model: object, data: Tensor, settings: tuple, device: torch.device,
                 save_every_s: float) -> None:
        self.path, self.device, self.save_every_s = path, device, save_every_s
        self.started = self.last_save = time.monotonic()
        self.earlier_seconds = 0.0
        h = hashlib.sha256(repr((settings, tuple(data.shape), str(data.dtype))).encode())
        h.update(_raw_bytes(data))
        for name, t in model.state_dict().items() if hasattr(model, "state_dict") else ():
            h.update(name.encode())
            h.update(_raw_bytes(t))
        self.fingerprint = h.hexdigest()

    def restore(self, out: Tensor) -> int:
        """Fill ``out`` with the kept points and set the RNG where they stopped; how many."""
        try:
            kept = torch.load(self.path, weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):  # none, or damaged
            return 0
        if not isinstance(kept, dict) or kept.get("fingerprint") != self.fingerprint:
            return 0
        done = int(kept["done"])
        out[:done] = kept["scores"]
        self.earlier_seconds = float(kept.get("seconds", 0.0))
        torch.set_rng_state(kept["rng"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(kept["cuda_rng"], self.device)
        return done

    def save(self, out: Tensor, done: int) -> None:
        if done == out.shape[0] or time.monotonic() - self.last_save < self.save_every_s:
            return
        kept = {"fingerprint": self.fingerprint, "done": done, "scores": out[:done].clone(),
                "rng": torch.get_rng_state(), "seconds": self.earlier_seconds + time.monotonic() - self.started}
        if self.device.type == "cuda":
            kept["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        atomic_torch_save(kept, self.path)
        self.last_save = time.monotonic()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@torch.no_grad()
def evaluate_bounds(
    model: HasLogWeights, data: Tensor, k: int, batch_size: int = 100, seed: int | None = 0
) -> dict[str, float]:
    """Mean ELBO and L_k over a dataset from the same k draws per point, in nats."""
    data = model_input(data, getattr(model, "data_dim", None))
    device = model_device(model)
    dtype = model_dtype(model) or data.dtype
    elbo_sum = iwae_sum = 0.0
    with seeded(seed, device), eval_mode(model):
        for sl in batches(data.shape[0], batch_size):
            lw = model.log_weights(data[sl].to(device, dtype), k).double()
            elbo_sum += float(bounds.elbo(lw).sum())
            iwae_sum += float(bounds.iwae(lw).sum())
    n = data.shape[0]
    return {"elbo": elbo_sum / n, f"iwae_{k}": iwae_sum / n}
