"""The training loop: batches, objective, optimizer, validation, checkpoints, resume.

No lost training: state is checkpointed atomically at every epoch end and, mid-epoch,
every ``train.checkpoint_minutes`` (or ``train.checkpoint_steps``), on Ctrl-C and on
SIGTERM. A checkpoint holds tensors and plain containers only (read back with
``weights_only=True``): model, optimizer, the position in the epoch (its permutation and
the next batch), early-stopping counters and every RNG the run draws from, so a resumed
run continues the very same stream of batches and samples; on CPU it ends bit-identical
to a run that was never interrupted.

No silent NaN: each step checks its loss and gradients (one host sync per step, shared
with the bound that is logged anyway). A fault names the step, batch, images and the
terms or layers that went non-finite; ``train.nonfinite`` skips or stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import __version__
from .allocator import retain_freed_memory
from .config import ConfigError, RunConfig, _did_you_mean, load_config
from .data import Batcher, ImageDataset, evaluation_images, load
from .diagnostics.likelihood import evaluate_bounds
from .files import (
    OutputError,
    append_line,
    atomic_torch_save,
    atomic_write_text,
    fault_point,
    make_dir,
    remove_stale_temp_files,
)
from .models import LatentVariableModel, build_model
from .models.base import LogWeightTerms
from .objectives import compile_objective, make_objective
from .optimizers import OPTIMIZERS, make_optimizer
from .runs import RunError, environment_info, read_json, read_metrics, save_weights, write_json
from .schedules import kl_weight, learning_rate

log = logging.getLogger("elbolab")

CHECKPOINT = "checkpoint.pt"

#: config keys that may differ between a run and its resumption: they do not change what
#: is trained. A run resumed on another device continues correctly, but draws its remaining
#: samples from that device's random stream, so it is bit-identical to an uninterrupted run
#: only on the device it stopped on.
RESUME_FREE_KEYS = ("data.data_dir", "train.progress", "train.compile", "train.device")


class NonFiniteError(FloatingPointError):
    """A loss or gradient became inf/NaN; the message names the step, batch and terms."""


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """The device a config or option names, refused with a message naming ``key`` when
    this machine does not have it (before anything is built or written)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{key}: {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: {name!r} but CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}: {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}: {name!r} but MPS is not available on this machine; use cpu")
    return device


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint without unpickling code (weights_only=True): a file that asks
    for anything but tensors and plain containers is refused, never run."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: checkpoint missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable file
        why = " ".join(str(e).split())[:200]
        raise RunError(f"{path}: refused or unreadable checkpoint ({type(e).__name__}: {why})") from None
    if not isinstance(state, dict) or "model" not in state or "elbolab" not in state:
        raise RunError(f"{path}: not an elbolab checkpoint")
    if str(state["elbolab"]).split(".")[0] != __version__.split(".")[0]:
        raise RunError(f"{path}: written by elbolab {state['elbolab']}, this is {__version__}")
    return state


def preflight(cfg: RunConfig) -> None:
    """Reject names no registry knows before anything is built or written, naming the key."""
    from .data.registry import DATASETS
    from .likelihoods import LIKELIHOODS
    from .models import MODELS
    from .models.layers import ACTIVATIONS
    from .objectives import OBJECTIVES
    from .priors import PRIORS

    checks = [
        ("data.name", cfg.data.name, DATASETS),
        ("model.name", cfg.model.name, MODELS),
        ("model.activation", cfg.model.activation, ACTIVATIONS),
        ("model.likelihood", cfg.model.likelihood, LIKELIHOODS),
        ("model.prior.name", cfg.model.prior.name, PRIORS),
        ("objective.name", cfg.objective.name, OBJECTIVES),
        ("train.optimizer", cfg.train.optimizer, OPTIMIZERS),
    ]
    for key, name, registry in checks:
        if name not in registry:
            raise ConfigError(f"{key}: unknown {name!r}{_did_you_mean(name, sorted(registry))}")
    device = resolve_device(cfg.train.device)
    if cfg.train.compile and device.type != "cuda":
        compilers = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            raise ConfigError("train.compile: torch.compile on a CPU needs a C++ compiler and none is on PATH "
                              "(c++, g++, clang++ or $CXX); install one or set train.compile=false")


def config_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted keys whose values differ (ignoring :data:`RESUME_FREE_KEYS`)."""
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else k)
        elif x != y and prefix not in RESUME_FREE_KEYS:
            out.append(f"{prefix}: {x!r} -> {y!r}")

    walk(a.to_dict(), b.to_dict(), "")
    return out


def _term_labels(terms: LogWeightTerms) -> dict[str, Tensor]:
    """Every log-weight term by what it is: reconstruction, prior/KL or posterior, per layer."""
    out = {"reconstruction log p(x|z)": terms.log_likelihood}
    out.update({f"prior log p({n}) (KL, layer {n})": t for n, t in terms.log_prior.items()})
    out.update({f"posterior log q({n}|.) (KL, layer {n})": t for n, t in terms.log_posterior.items()})
    return out


def describe_fault(loss: Tensor, terms: LogWeightTerms, model: torch.nn.Module, where: str,
                   image_ids: Tensor) -> str:
    """One line: where it happened, which terms (how many images) and which layers' gradients."""
    parts = []
    if not torch.isfinite(loss):
        parts.append(f"loss={float(loss.detach())}")
    bad_images: set[int] = set()
    for name, t in _term_labels(terms).items():
        bad = ~torch.isfinite(t.detach())
        if bad.any():
            cols = bad.reshape(-1, bad.shape[-1]).any(0).nonzero().flatten().tolist()
            bad_images.update(cols)
            parts.append(f"{name} non-finite for {len(cols)} of {bad.shape[-1]} images")
    grads = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if grads:
        shown = ", ".join(grads[:4]) + (f" and {len(grads) - 4} more" if len(grads) > 4 else "")
        parts.append(f"gradient non-finite in {shown}")
    ids = image_ids.cpu()
    picked = [int(ids[i]) for i in sorted(bad_images)[:5]] if bad_images else [int(i) for i in ids[:5]]
    what = "; ".join(parts) or "the bound overflowed with finite terms"
    return f"non-finite value at {where} (training images {picked}{'...' if len(ids) > 5 else ''}): {what}"


def _rng_state(batcher: Batcher, shuffle: torch.Generator, device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "batcher": batcher.generator.get_state(),
        #: the batcher's generator lives on the training device; its state fits only that kind
        "batcher_device": batcher.generator.device.type,
        "shuffle": shuffle.get_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _set_rng_state(rng: dict[str, Any], batcher: Batcher, shuffle: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    here = batcher.generator.device.type
    saved = rng.get("batcher_device")  # absent from checkpoints written before it was recorded
    refused = f"it was saved on {saved}" if saved not in (None, here) else None
    if refused is None:
        try:
            batcher.generator.set_state(rng["batcher"])
        except RuntimeError as e:  # an untagged state of the other device's size
            refused = " ".join(str(e).split())[:90]
    if refused:  # a run moved between CPU and GPU (README: Reliability)
        log.warning("the checkpoint's binarization stream cannot continue on %s (%s); it restarts from its "
                    "seed, so this run is no longer bit-identical to an uninterrupted one", here, refused)
    shuffle.set_state(rng["shuffle"])
    if "numpy" in rng:
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "python" in rng:
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def step_readout(bound: Tensor, loss: Tensor, grads: list[Tensor]) -> tuple[float, float]:
    """The batch's summed bound, and a number that is finite when the loss and every
    gradient are, read back in one host transfer (one sync per step on a GPU).

    The number is loss + the gradients' total norm (one multi-tensor kernel, not a
    reduction per parameter): non-finite when any element is, or, rarely, when the norm
    overflows, which the caller re-checks element by element.
    """
    probe = loss.detach().float()
    if grads:
        probe = probe + torch.nn.utils.get_total_norm(grads, foreach=True).float()
    bound_sum, probe_value = torch.stack([bound.detach().sum().float(), probe]).tolist()
    return bound_sum, probe_value


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, dataset: ImageDataset | None = None) -> None:
        preflight(cfg)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = resolve_device(cfg.train.device)
        if self.device.type == "cpu":
            retain_freed_memory()  # the step's big temporaries reuse pages (allocator.py)
        self.dataset = (
            dataset if dataset is not None else load(cfg.data.name, cfg.data.data_dir, validation=cfg.data.validation)
        )
        torch.manual_seed(cfg.train.seed)
        d = cfg.data
        self.batcher = Batcher(self.dataset.split("train"), self.dataset.binary, d.binarization,
                               d.binarization_seed, self.device)
        self.valid = (
            evaluation_images(self.dataset, "valid", d.binarization, d.binarization_seed).to(self.device)
            if "valid" in self.dataset.splits else None
        )
        train_float = self.dataset.as_float("train", "none")
        try:
            model = build_model(cfg.model.for_dataset(cfg.data.name), self.dataset.data_dim, train_float)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"model: cannot build {cfg.model.name!r} with this config: {e}") from None
        self.model: LatentVariableModel = model.to(self.device)
        t = cfg.train
        self.optimizer = make_optimizer(t.optimizer, self.model.parameters(), t.lr, t.adam_betas, t.adam_eps,
                                        self.device)
        self.objective = make_objective(cfg.objective)
        if cfg.train.compile:
            self.objective = compile_objective(self.objective, self.device)
        self.shuffle = torch.Generator().manual_seed(cfg.train.seed + 7)
        #: completed epochs, and steps taken (skipped ones included)
        self.epoch = 0
        self.step = 0
        self.best_valid = -math.inf
        self.epochs_since_best = 0
        self.nonfinite_skips = 0
        self.finished = False
        #: position inside the current epoch: its permutation (None until drawn), the
        #: next batch, and the running sums behind the epoch's train_bound
        self.order: Tensor | None = None
        self.next_batch = 0
        self.epoch_bound_sum = 0.0
        self.epoch_count = 0
        self._last_checkpoint = time.monotonic()
        self._interrupt: str | None = None

    # --- persistence -----------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "elbolab": __version__,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_valid": self.best_valid,
            "epochs_since_best": self.epochs_since_best,
            "nonfinite_skips": self.nonfinite_skips,
            "finished": self.finished,
            "position": {
                "order": self.order,
                "next_batch": self.next_batch,
                "bound_sum": self.epoch_bound_sum,
                "count": self.epoch_count,
            },
            "rng": _rng_state(self.batcher, self.shuffle, self.device),
        }

    def load_state(self, state: dict[str, Any], source: Path | str = CHECKPOINT) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            why = " ".join(str(e).split())[:300]
            raise RunError(f"{source}: does not fit the configured model/optimizer ({why})") from None
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.best_valid = float(state["best_valid"])
        self.epochs_since_best = int(state["epochs_since_best"])
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
        self.finished = bool(state["finished"])
        pos = state.get("position") or {}
        self.order = pos.get("order")
        self.next_batch = int(pos.get("next_batch", 0))
        self.epoch_bound_sum = float(pos.get("bound_sum", 0.0))
        self.epoch_count = int(pos.get("count", 0))
        if self.order is not None and self.order.numel() != len(self.batcher):
            raise RunError(f"{source}: its epoch permutation covers {self.order.numel()} images, "
                           f"the training split has {len(self.batcher)}")
        _set_rng_state(state["rng"], self.batcher, self.shuffle, self.device)

    def save_checkpoint(self) -> None:
        atomic_torch_save(self.state(), self.run_dir / CHECKPOINT)
        self._last_checkpoint = time.monotonic()

    def prepare_run_dir(self, resume: bool | None = None) -> bool:
        """Create the run folder, or take up the unfinished run it holds.

        ``resume``: True (the folder must hold a run to continue), False (it must not),
        None (continue an unfinished run of the same config, else start one). A folder
        holding anything else is refused and left untouched. Returns True when resuming.
        """
        info_path = self.run_dir / "run.json"
        if not info_path.exists():
            if resume:
                raise RunError(f"{self.run_dir}: no run to resume here (run.json missing)")
            if self.run_dir.exists() and (not self.run_dir.is_dir() or any(self.run_dir.iterdir())):
                raise RunError(f"{self.run_dir}: exists and is not an empty folder or an elbolab run; "
                               "choose another --out")
            make_dir(self.run_dir)
            atomic_write_text(self.run_dir / "config.yaml", self.cfg.to_yaml())
            write_json(self.run_dir / "environment.json", environment_info())
            self._write_info("running")
            return False
        if resume is False:
            raise RunError(f"{self.run_dir}: already holds a run; resume it or choose another --out")
        info = read_json(info_path)
        if str(info.get("elbolab", "?")).split(".")[0] != __version__.split(".")[0]:
            raise RunError(f"{info_path}: written by elbolab {info.get('elbolab')}, this is {__version__}; "
                           "it cannot be resumed")
        try:
            saved = load_config(self.run_dir / "config.yaml")
        except ConfigError as e:
            raise RunError(str(e)) from None
        diff = config_differences(saved, self.cfg)
        if diff:
            raise RunError(f"{self.run_dir}: holds a run of another config ({'; '.join(diff[:3])}"
                           f"{'; ...' if len(diff) > 3 else ''}); nothing was changed. "
                           f"Continue it with --resume {self.run_dir}, or choose another --out")
        if info.get("status") == "finished":
            raise RunError(f"{self.run_dir}: already holds a finished run of this config; choose another --out")
        for p in remove_stale_temp_files(self.run_dir):
            log.info("removed %s, left by a write that was killed half-way", p)
        ckpt = self.run_dir / CHECKPOINT
        if ckpt.exists():
            self.load_state(load_checkpoint(ckpt), ckpt)
        # else: killed before the first checkpoint; the freshly seeded state is where it began
        kept = [r for r in read_metrics(self.run_dir / "metrics.jsonl") if r.get("epoch", 0) <= self.epoch]
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        log.warning("continuing the unfinished run in %s at epoch %d, batch %d (step %d)",
                    self.run_dir, self.epoch + 1, self.next_batch, self.step)
        self._write_info("running")
        return True

    def _write_info(self, status: str, error: str | None = None) -> None:
        info = {
            "elbolab": __version__,
            "status": status,
            "dataset": self.dataset.name,
            "data_dim": self.dataset.data_dim,
            "image_shape": list(self.dataset.image_shape),
            "epochs_done": self.epoch,
            "step": self.step,
            "config": self.cfg.to_dict(),
        }
        if error:
            info["error"] = error
        write_json(self.run_dir / "run.json", info)

    # --- one step --------------------------------------------------------------
    def _step(self, x: Tensor, beta: float, where: str, image_ids: Tensor) -> float | None:
        """One optimizer step; returns the batch's summed bound, or None when the step was skipped.

        Loss and gradients are checked on the device and read back together with the
        bound in a single transfer, so the check costs no extra host sync.
        """
        res = self.objective(self.model, x, beta)
        self.optimizer.zero_grad(set_to_none=True)
        res.loss.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        bound_sum, probe_value = step_readout(res.bound, res.loss, grads)
        self.step += 1
        if math.isfinite(probe_value) or self._all_finite(res.loss, grads):
            self.optimizer.step()
            return bound_sum
        msg = describe_fault(res.loss, res.terms, self.model, f"step {self.step} ({where})", image_ids)
        self.optimizer.zero_grad(set_to_none=True)
        t = self.cfg.train
        if t.nonfinite == "skip" and self.nonfinite_skips < t.max_nonfinite_skips:
            self.nonfinite_skips += 1
            log.warning("%s; step skipped (%d of %d allowed)", msg, self.nonfinite_skips, t.max_nonfinite_skips)
            return None
        policy = ("train.nonfinite=stop" if t.nonfinite == "stop"
                  else f"{t.max_nonfinite_skips} skipped steps already (train.max_nonfinite_skips)")
        raise NonFiniteError(f"{msg}; stopped ({policy}); the last good checkpoint is kept")

    @staticmethod
    def _all_finite(loss: Tensor, grads: list[Tensor]) -> bool:
        return bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)

    # --- the loop --------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        """Run the rest of the current epoch (all of it, unless resumed mid-epoch)."""
        cfg = self.cfg
        if self.order is None:
            self.order = torch.randperm(len(self.batcher), generator=self.shuffle)
            self.next_batch, self.epoch_bound_sum, self.epoch_count = 0, 0.0, 0
        # one host-to-device copy of the permutation per epoch, none per step
        batches = self.order.to(self.device).split(cfg.train.batch_size)
        lr = learning_rate(cfg.train, self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        bar = tqdm(range(self.next_batch, len(batches)), desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}",
                   leave=False, disable=not cfg.train.progress, unit="batch")
        for i in bar:
            idx = batches[i]
            x = self.batcher.batch(idx)
            beta = kl_weight(self.epoch + i / len(batches), cfg.objective.warmup_epochs)
            bound_sum = self._step(x, beta, f"epoch {self.epoch + 1}, batch {i}", idx)
            if bound_sum is not None:
                self.epoch_bound_sum += bound_sum
                self.epoch_count += x.shape[0]
            self.next_batch = i + 1
            fault_point("step")
            if self._interrupt or (i + 1 < len(batches) and self._checkpoint_due()):
                self.save_checkpoint()
                self._raise_if_interrupted()
            if i % 10 == 0 and self.epoch_count:
                bar.set_postfix(bound=f"{self.epoch_bound_sum / self.epoch_count:.2f}")
        mean = self.epoch_bound_sum / self.epoch_count if self.epoch_count else math.nan
        beta = kl_weight(self.epoch + (len(batches) - 1) / len(batches), cfg.objective.warmup_epochs)
        return {"train_bound": mean, "lr": lr, "kl_weight": beta}

    def _checkpoint_due(self) -> bool:
        t = self.cfg.train
        if t.checkpoint_steps and self.step % t.checkpoint_steps == 0:
            return True
        return bool(t.checkpoint_minutes) and time.monotonic() - self._last_checkpoint >= 60 * t.checkpoint_minutes

    def _raise_if_interrupted(self) -> None:
        if self._interrupt:
            log.warning("%s: checkpoint written at step %d; stopping", self._interrupt, self.step)
            raise KeyboardInterrupt(self._interrupt)

    @contextlib.contextmanager
    def _graceful_signals(self) -> Iterator[None]:
        """Ctrl-C / SIGTERM ask the loop to checkpoint at the next step and stop; a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def ask(signum: int, frame: object) -> None:
            if self._interrupt:
                raise KeyboardInterrupt
            self._interrupt = signal.Signals(signum).name

        old = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def validate(self) -> dict[str, float]:
        if self.valid is None:
            return {}
        self.model.eval()
        k = self.cfg.objective.k
        b = evaluate_bounds(self.model, self.valid, k=k, batch_size=500, seed=self.cfg.eval.seed)
        return {"valid_elbo": b["elbo"], f"valid_iwae_{k}": b[f"iwae_{k}"]}

    def fit(self, resume: bool | None = None) -> Path:
        """Train to the end; ``resume`` as in :meth:`prepare_run_dir` (None: automatic)."""
        self.prepare_run_dir(resume)
        cfg = self.cfg
        metrics_path = self.run_dir / "metrics.jsonl"
        writer = self._tensorboard()
        self._last_checkpoint = time.monotonic()
        try:
            with self._graceful_signals():
                while self.epoch < cfg.train.epochs and not self.finished:
                    t0 = time.perf_counter()
                    row: dict[str, Any] = {"epoch": self.epoch + 1}
                    row.update(self.train_epoch())
                    if cfg.train.eval_every and (self.epoch + 1) % cfg.train.eval_every == 0:
                        row.update(self.validate())
                    row["seconds"] = round(time.perf_counter() - t0, 3)
                    self.epoch += 1
                    self.order, self.next_batch = None, 0
                    self._track_best(row)
                    append_line(metrics_path, json.dumps(row))
                    if writer is not None:
                        for key, v in row.items():
                            if key != "epoch":
                                writer.add_scalar(key, v, self.epoch)
                    log.info("epoch %d: %s", self.epoch,
                             ", ".join(f"{k}={v:.3f}" for k, v in row.items() if k != "epoch"))
                    patience = cfg.train.early_stopping_patience
                    if patience and self.epochs_since_best >= patience:
                        log.info("early stopping: %d epochs without a better validation bound", patience)
                        self.finished = True
                    self.save_checkpoint()
                    self._write_info("running")
                    self._raise_if_interrupted()
                self.finished = True
                save_weights(self.model, self.run_dir / "model.safetensors")
                if not (self.run_dir / "best.safetensors").exists():
                    save_weights(self.model, self.run_dir / "best.safetensors")
                self.save_checkpoint()
                self._write_info("finished")
        except KeyboardInterrupt:
            self._write_info_quietly("interrupted")
            raise
        except (NonFiniteError, OutputError) as e:
            self._write_info_quietly("failed", str(e))
            raise
        finally:
            if writer is not None:
                writer.close()
        return self.run_dir

    def _write_info_quietly(self, status: str, error: str | None = None) -> None:
        """Record how the run ended, unless the disk refuses that too (the real error wins)."""
        with contextlib.suppress(OutputError):
            self._write_info(status, error)

    def _track_best(self, row: dict[str, Any]) -> None:
        """Keep the weights best on validation; count epochs without a better bound.

        As in the VampPrior code (utils/perform_experiment.py), the best weights are
        tracked from the first epoch, but the early-stopping count stays at zero while
        the KL weight is below 1 (epochs 1..warmup_epochs), so no run stops in warm-up.
        """
        key = f"valid_iwae_{self.cfg.objective.k}"
        if key not in row:
            return
        if row[key] > self.best_valid:
            self.best_valid = row[key]
            self.epochs_since_best = 0
            save_weights(self.model, self.run_dir / "best.safetensors")
        elif self.epoch <= self.cfg.objective.warmup_epochs:
            self.epochs_since_best = 0
        else:
            self.epochs_since_best += 1

    def _tensorboard(self):
        if not self.cfg.train.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError("train.tensorboard=true needs the tensorboard package: "
                               "pip install 'elbolab[tensorboard]'") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))


def train(cfg: RunConfig, run_dir: str | Path, resume: bool | None = None,
          dataset: ImageDataset | None = None) -> Path:
    """Train ``cfg`` into ``run_dir``; an unfinished run of the same config there is continued."""
    return Trainer(cfg, run_dir, dataset).fit(resume=resume)
