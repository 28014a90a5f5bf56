"""The benchmark rows: training steps, stacked runs, IS log-likelihood, ELBO surgery, curves.

Each row times elbolab and, where pythae has the same thing, pythae in the same process
with interleaved repeats, and reports images/s, peak memory, the ratio between the
two, and the achieved fraction of this machine's measured matmul peak. A stacked-run row
times S runs trained as one model against the same S runs stepped one by one in the same
process, and against S separate processes started side by side (images/s per run).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..config import EvalConfig, ObjectiveConfig, RunConfig, TrainConfig
from ..data import load
from ..diagnostics.surgery import elbo_surgery
from ..evaluation import log_likelihood
from ..fastpaths import compile_objective, retain_freed_memory, with_precision
from ..models import build_model
from ..objectives import make_objective, objective_plan
from ..optimizers import make_optimizer
from ..training import NonFiniteError, StepRun, make_step, take_step
from . import pythae_models
from .measure import (
    Throughput,
    busy_note,
    clock_name,
    compare,
    count_flops,
    current_rss,
    matmul_step,
    now,
    use_cpu_clock,
)

#: the reference matrix product timed beside every row
PEAK = "matmul"


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run: ``quick`` (about a minute) or ``full``."""

    #: seconds of work per timed repeat
    target_s: float
    #: interleaved repeats per measurement
    repeats: int
    #: test images for elbolab's IS log-likelihood row (the issue's target: 10,000)
    ll_images: int
    #: test images for pythae's get_nll (slow; extrapolated)
    ll_images_pythae: int
    #: importance samples of the log-likelihood row
    ll_k: int
    #: test images of the other models' log-likelihood rows (flows, conv models: seconds per image on a CPU)
    model_ll_images: int
    #: training points of the ELBO surgery row
    surgery_points: int
    #: sample counts and batch sizes of the scaling curves
    curve_ks: tuple[int, ...]
    curve_batches: tuple[int, ...]
    #: IS log-likelihood chunk sizes (samples per pass, per image) of the cache curve
    curve_chunks: tuple[int, ...]
    #: importance samples (images x K) spent per point of the K curve
    curve_sample_budget: int

    @staticmethod
    def quick() -> Settings:
        return Settings(target_s=0.12, repeats=3, ll_images=20, ll_images_pythae=2, ll_k=5000, model_ll_images=1,
                        surgery_points=60_000, curve_ks=(1, 10, 100, 1000, 5000),
                        curve_batches=(1, 20, 100, 500), curve_chunks=(20, 50, 500), curve_sample_budget=20_000)

    @staticmethod
    def full() -> Settings:
        return Settings(target_s=1.0, repeats=5, ll_images=10_000, ll_images_pythae=50, ll_k=5000, model_ll_images=4,
                        surgery_points=60_000, curve_ks=(1, 5, 10, 50, 100, 500, 1000, 5000),
                        curve_batches=(1, 10, 20, 50, 100, 200, 500, 1000),
                        curve_chunks=(10, 20, 50, 100, 200, 500, 1000), curve_sample_budget=500_000)


@dataclass
class Row:
    """One line of the table; ``None`` where a number does not apply."""

    name: str
    library: str
    images_per_s: float | None = None
    images_per_s_median: float | None = None
    peak_mb: float | None = None
    #: elbolab images/s divided by pythae's in the same run
    vs_pythae: float | None = None
    flops_per_image: float | None = None
    #: achieved matmul FLOP/s divided by the measured peak
    of_peak: float | None = None
    note: str = ""
    #: process CPU seconds / (wall seconds x threads) of the reported repeat (CPU only;
    #: measure.busy_note flags a row below measure.BUSY_SHARE)
    cpu_share: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Bench:
    def __init__(self, settings: Settings, device: torch.device, peak_flops: float, use_pythae: bool = True,
                 log: Callable[[str], None] = print, compiled: bool = False, bf16: bool = False) -> None:
        self.s = settings
        #: a busy machine makes wall-clock timings wrong (measure.busy_note); CPU-clock ones hold up
        self.wall_clock = clock_name() == "wall"
        #: also time the training step as train.compile=true runs it (CUDA graphs on a GPU)
        self.compiled = compiled
        #: also time the training step as train.precision=bf16 runs it (rows with k >= 5)
        self.bf16 = bf16
        self.device = device
        self.peak_flops = peak_flops
        self.log = log
        self.pythae_reason = pythae_models.available() if use_pythae else "disabled with --no-pythae"
        # the reference beside each row: 1024 fills this CPU's cores; a GPU needs 4096 to come near its peak
        self.matmul = matmul_step(device, n=4096 if device.type == "cuda" else 1024)
        self.peak_seen = peak_flops
        data = load("binarized-mnist-embedded")
        self.train_data = data.as_float("train")
        self.test_data = data.as_float("test")
        self.data_dim = data.data_dim

    # --- helpers -------------------------------------------------------------------
    def images(self, n: int, split: str = "train") -> Tensor:
        """``n`` images on the device; the packaged split is tiled when n exceeds it
        (throughput does not depend on which binary images are fed)."""
        x = self.train_data if split == "train" else self.test_data
        reps = math.ceil(n / x.shape[0])
        return (x.repeat(reps, 1) if reps > 1 else x)[:n].contiguous().to(self.device)

    def model(self, overrides: list[str]):
        cfg = RunConfig().with_overrides(overrides) if overrides else RunConfig()
        torch.manual_seed(0)
        return build_model(cfg.model, self.data_dim, self.train_data).to(self.device)

    def compare(self, steps: dict, repeats: int, target_s: float, warmup: int = 2) -> dict:
        """``measure.compare`` with the reference matmul interleaved as one more contestant."""
        steps = {**steps, PEAK: self.matmul}
        res = compare(steps, self.device, repeats, target_s, warmup)
        self.peak_seen = max(self.peak_seen, res[PEAK][0].best)
        return res

    def _rows(self, name: str, results: dict[str, tuple[Throughput, int]], flops: float | None, items_note: str = ""
              ) -> list[Row]:
        rows = []
        # the reference timed beside the row sees the row's background load; a row timed in one
        # call (the log-likelihood) gets a single short reference, which can read low, so never
        # below the large matmul timed at the start (of peak then cannot pass 100% by noise)
        peak_flops = max(results[PEAK][0].best, self.peak_flops) if PEAK in results else self.peak_flops
        for lib, (tp, peak) in results.items():
            if lib == PEAK:
                continue
            achieved = flops * tp.best if flops else None
            rows.append(Row(name=name, library=lib, images_per_s=tp.best, images_per_s_median=tp.median,
                            peak_mb=peak / 2**20, flops_per_image=flops,
                            of_peak=achieved / peak_flops if achieved else None, cpu_share=tp.best_cpu_share,
                            extra={"per_repeat": tp.per_repeat, "matmul_flops_per_s": peak_flops,
                                   "cpu_share_per_repeat": tp.cpu_share}))
        rows[-1].note = items_note
        if self.wall_clock:
            for row in rows:
                busy = busy_note(row.cpu_share, torch.get_num_threads())
                row.note = "; ".join(n for n in (busy, row.note) if n)
        if "pythae" in results:
            for row in rows:
                if row.library != "pythae":
                    row.vs_pythae = results[row.library][0].best / results["pythae"][0].best
        return rows

    def _pythae_works(self, fn: Callable[[], None]) -> bool:
        """One trial call: a pythae failure on this device becomes a note, not a lost run."""
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - any failure of the peer is reported, ours are not caught
            self.pythae_reason = f"pythae failed on {self.device}: {type(e).__name__}: {str(e)[:120]}"
            self.log(self.pythae_reason)
            return False

    # --- training --------------------------------------------------------------------
    def elbolab_train_step(self, model, objective_name: str, k: int, x: Tensor, compiled: bool = False,
                           precision: str = "fp32") -> Callable[[], None]:
        """The trainer's inner loop: objective, backward, one read-back of the bound and a finiteness
        probe, Adam step."""
        objective = with_precision(make_objective(ObjectiveConfig(name=objective_name, k=k)), model, precision,
                                   self.device)
        if compiled:  # as RunState compiles it
            objective = compile_objective(objective, self.device)
        return trainer_step(objective, model, x)

    def training_row(self, name: str, overrides: list[str], objective: str, k: int, batch: int,
                     with_pythae: bool) -> list[Row]:
        x = self.images(batch)
        model = self.model(overrides)
        model.train()
        step = self.elbolab_train_step(model, objective, k, x)
        flops = count_flops(step) / batch
        steps = {"elbolab": (step, batch)}
        if self.compiled:
            cmodel = self.model(overrides)
            cmodel.train()
            steps["elbolab+compile"] = (self.elbolab_train_step(cmodel, objective, k, x, compiled=True), batch)
        if self.bf16 and k >= 5:
            bmodel = self.model(overrides)
            bmodel.train()
            steps["elbolab+bf16"] = (self.elbolab_train_step(bmodel, objective, k, x, precision="bf16"), batch)
        note = ""
        if with_pythae and self.pythae_reason is None:
            torch.manual_seed(0)
            pmodel = pythae_models.build(objective, k).to(self.device)
            popt = torch.optim.Adam(pmodel.parameters(), lr=1e-4)
            repeat = k if objective == "vae" else 1
            pstep = lambda: pythae_models.train_step(pmodel, popt, x, repeat)  # noqa: E731
            if self._pythae_works(pstep):
                steps["pythae"] = (pstep, batch)
                if objective == "vae" and k > 1:
                    note = f"pythae: VAE on the batch repeated {k}x"
            else:
                note = self.pythae_reason or ""
        elif with_pythae:
            note = self.pythae_reason or ""
        else:
            note = "pythae has no such model"
        return self._rows(name, self.compare(steps, self.s.repeats, self.s.target_s), flops, note)

    # --- stacked runs ---------------------------------------------------------------------
    def stacked_row(self, name: str, runs: int, batch: int, k: int) -> list[Row]:
        """S one-layer IWAE runs (seeds 0..S-1, each on its own images) stacked, against the same S
        stepped one by one here and S processes running one each; images/s per run."""
        alone = [_bench_run(self, s, batch, k) for s in range(runs)]
        stack = make_step([_bench_run(self, s, batch, k) for s in range(runs)])
        xs = torch.stack([self.images(batch * runs)[s * batch:(s + 1) * batch] for s in range(runs)])
        ones = [1.0] * runs

        def one_by_one() -> None:
            for r, x in zip(alone, xs, strict=True):
                take_step(r.model, r.optimizer, r.objective, x)

        steps = {f"{runs} runs one by one": (one_by_one, batch), f"{runs} runs stacked": (lambda: stack.step(xs, ones),
                                                                                         batch)}
        rows = self._rows(name, self.compare(steps, self.s.repeats, self.s.target_s), None)
        procs = separate_processes(runs, batch, k, self.s.target_s * self.s.repeats, self.device)
        rows.append(Row(name=name, library=f"{runs} processes", images_per_s=procs["images_per_s"],
                        images_per_s_median=procs["images_per_s_median"], peak_mb=procs["peak_mb"],
                        extra={"per_process": procs["per_process"]}))
        stacked_rate = rows[1].images_per_s
        for row in rows:
            row.extra["runs"] = runs
            if row is not rows[1] and row.images_per_s:
                row.extra["stacked_speedup"] = stacked_rate / row.images_per_s
        rows[1].note = (f"per run: {stacked_rate / rows[0].images_per_s:.2f}x one by one, "
                        f"{stacked_rate / rows[2].images_per_s:.2f}x {runs} processes")
        return rows

    # --- log-likelihood ----------------------------------------------------------------
    def likelihood_row(self) -> list[Row]:
        """The IS log-likelihood of the default model over the test images, beside pythae's get_nll."""
        k = self.s.ll_k
        x = self.images(self.s.ll_images, "test")
        model = self.model([])
        flops = count_flops(lambda: log_likelihood(model, x[:1], k=k))
        chunk = EvalConfig().chunk_for(self.device)  # what the CLI uses on this device
        steps = {"elbolab": (lambda: log_likelihood(model, x, k=k, chunk_size=chunk), x.shape[0])}
        if self.pythae_reason is None:
            torch.manual_seed(0)
            pmodel = pythae_models.build("iwae", 1).to(self.device).eval()
            xp = x[: self.s.ll_images_pythae]

            def pythae_nll() -> None:
                with torch.no_grad():  # get_nll builds autograd graphs otherwise; be generous to it
                    pmodel.get_nll(xp, n_samples=k, batch_size=100)

            if self._pythae_works(lambda: pythae_probe(pmodel, xp[:1])):
                steps["pythae"] = (pythae_nll, xp.shape[0])
        res = self.compare(steps, repeats=1, target_s=0.0, warmup=0)  # one pass over the test set, as a user runs it
        n = x.shape[0]
        rows = self._rows(f"IS log-lik K={k} ({n} test images)", res, flops)
        rows[0].extra["seconds_for_all"] = n / rows[0].images_per_s
        rows[0].note = f"{n} images: {n / rows[0].images_per_s:.1f} s (chunk {chunk})"
        if len(rows) > 1:
            rows[1].extra["seconds_extrapolated"] = n / rows[1].images_per_s
            rows[1].note = (f"get_nll timed on {self.s.ll_images_pythae} images; "
                            f"{n} images extrapolated: {n / rows[1].images_per_s:.0f} s")
        return rows

    def model_likelihood_row(self, name: str, overrides: list[str], chunk: int) -> list[Row]:
        """IS log-likelihood at K = ll_k of a costly model on a few test images (elbolab alone):
        ``chunk`` samples per image and pass, so a pass holds images x chunk decoder rows."""
        k, n = self.s.ll_k, self.s.model_ll_images
        x = self.images(n, "test")
        model = self.model(overrides)
        # every pass costs the same: count one, then scale to the k / chunk passes of a run
        flops = count_flops(lambda: log_likelihood(model, x, k=chunk, chunk_size=chunk)) * k / chunk / n
        steps = {"elbolab": (lambda: log_likelihood(model, x, k=k, chunk_size=chunk), n)}
        res = self.compare(steps, repeats=1, target_s=0.0, warmup=0)
        rows = self._rows(name, res, flops)
        rows[0].extra["seconds_per_image"] = 1 / rows[0].images_per_s
        rows[0].note = f"{n} image(s): {1 / rows[0].images_per_s:.2f} s each (chunk {chunk}); pythae has no such model"
        return rows

    # --- ELBO surgery -------------------------------------------------------------------
    def surgery_row(self) -> list[Row]:
        name = f"ELBO surgery ({self.s.surgery_points} points)"
        model = self.model([])
        x = self.images(self.s.surgery_points)
        res = self.compare({"elbolab": (lambda: elbo_surgery(model, x), x.shape[0])}, repeats=1, target_s=0.0,
                           warmup=0)
        rows = self._rows(name, res, None)
        rows[0].extra["seconds"] = x.shape[0] / rows[0].images_per_s
        return rows

    # --- curves ---------------------------------------------------------------------------
    def k_curve(self) -> dict:
        """Evaluation images/s of the IS log-likelihood as K grows."""
        model = self.model([])
        curve: dict[str, list] = {"k": list(self.s.curve_ks), "elbolab": [], "pythae": []}
        chunk = EvalConfig().chunk_for(self.device)
        if self.pythae_reason is None:
            pmodel = pythae_models.build("iwae", 1).to(self.device).eval()
            self._pythae_works(lambda: pythae_probe(pmodel, self.images(1, "test")))
        for k in self.s.curve_ks:
            n = max(1, min(2000, self.s.curve_sample_budget // k))
            x = self.images(n, "test")
            steps = {"elbolab": (lambda x=x, k=k: log_likelihood(model, x, k=k, chunk_size=chunk), n)}
            if self.pythae_reason is None:
                xp = x[: max(1, n // 20)]

                def nll(xp=xp, k=k) -> None:
                    with torch.no_grad():
                        pmodel.get_nll(xp, n_samples=k, batch_size=100)

                steps["pythae"] = (nll, xp.shape[0])
            res = compare(steps, self.device, repeats=max(1, self.s.repeats // 2), target_s=0.0, warmup=1)
            for lib, (tp, _) in res.items():
                curve[lib].append(tp.best)
            self.log(f"  K={k}: " + ", ".join(f"{lib} {tp.best:,.0f} img/s" for lib, (tp, _) in res.items()))
        return curve

    def chunk_curve(self, k: int = 1000, batch: int = 100) -> dict:
        """IS log-likelihood images/s against the samples drawn per pass (batch x chunk rows):
        the cache effect behind EvalConfig.chunk_size's default."""
        model = self.model([])
        x = self.images(batch, "test")
        chunks = self.s.curve_chunks
        steps = {f"chunk {c}": (lambda c=c: log_likelihood(model, x, k=k, batch_size=batch, chunk_size=c), batch)
                 for c in chunks}
        res = compare(steps, self.device, repeats=self.s.repeats, target_s=0.0, warmup=1)
        curve = {"chunk": list(chunks), "rows_per_pass": [batch * c for c in chunks], "k": k, "batch": batch,
                 "elbolab": [res[f"chunk {c}"][0].best for c in chunks],
                 "peak_mb": [res[f"chunk {c}"][1] / 2**20 for c in chunks]}
        self.log("  " + ", ".join(f"chunk {c}: {v:,.1f} img/s" for c, v in zip(chunks, curve["elbolab"], strict=True)))
        return curve

    def batch_curve(self, objective: str = "iwae", k: int = 5) -> dict:
        """Training images/s as the batch grows (one-layer model)."""
        curve: dict[str, list] = {"batch": list(self.s.curve_batches), "objective": objective, "k": k,
                                  "elbolab": [], "pythae": []}
        for b in self.s.curve_batches:
            rows = self.training_row(f"batch {b}", [], objective, k, b, with_pythae=True)
            for r in rows:
                curve.setdefault(r.library, []).append(r.images_per_s)
                curve.setdefault(f"{r.library}_cpu_share", []).append(r.cpu_share)
            self.log(f"  batch={b}: " + ", ".join(f"{r.library} {r.images_per_s:,.0f} img/s"
                                                  + (" (BUSY MACHINE)" if "BUSY MACHINE" in r.note else "")
                                                  for r in rows))
        return curve


def _bench_run(bench: Bench, seed: int, batch: int, k: int) -> StepRun:
    """One benchmark run: the one-layer model of ``seed`` with the trainer's Adam and objective."""
    cfg = RunConfig().with_overrides({"objective.k": k, "train.seed": seed, "train.batch_size": batch})
    torch.manual_seed(seed)
    model = build_model(cfg.model, bench.data_dim, bench.train_data).to(bench.device).train()
    plan, estimator = objective_plan(cfg.objective)
    gen = torch.Generator(device=bench.device).manual_seed(seed)
    return StepRun(model, make_optimizer(model, TrainConfig(lr=1e-4), bench.device), make_objective(cfg.objective),
                    plan, estimator, gen, device=bench.device)


def _process_run(args: tuple[int, int, int, float, str, str, int]) -> dict:
    """A spawned process training one run alone for about ``seconds``: its own steps per second."""
    seed, batch, k, seconds, clock, device, threads = args
    torch.set_num_threads(threads)
    retain_freed_memory()
    use_cpu_clock(clock == "cpu")
    dev = torch.device(device)
    cfg = RunConfig().with_overrides({"objective.k": k, "train.seed": seed})
    data = load("binarized-mnist-embedded").as_float("train")
    torch.manual_seed(seed)
    model = build_model(cfg.model, data.shape[1], data).to(dev).train()
    step = trainer_step(make_objective(cfg.objective), model, data[seed * batch:(seed + 1) * batch].to(dev))
    base = current_rss()
    for _ in range(3):
        step()
    rates, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 3:
        t0, n = now(), 0
        while n < 5 or now() - t0 < 0.05:
            step()
            n += 1
        rates.append(n * batch / (now() - t0))
    return {"best": max(rates), "median": sorted(rates)[len(rates) // 2], "peak_mb": (current_rss() - base) / 2**20}


def separate_processes(runs: int, batch: int, k: int, seconds: float, device: torch.device) -> dict:
    """``runs`` processes started together, each training its own run alone with this process's
    thread count and clock: images/s per run, each run charged for the whole machine time of all.

    Wall clock: the processes run side by side, so a run advances at its own process's rate
    (their mean). CPU clock: the S runs together cost the sum of their CPU seconds per step,
    so a run advances ``batch`` images per that sum, as the stacked and one-by-one rows count.
    """
    name = clock_name()
    ctx = multiprocessing.get_context("spawn")
    jobs = [(s, batch, k, seconds, name, str(device), torch.get_num_threads()) for s in range(runs)]
    with ctx.Pool(runs) as pool:
        out = pool.map(_process_run, jobs)

    def per_run(rates: list[float]) -> float:
        return sum(rates) / runs if name == "wall" else 1.0 / sum(1.0 / r for r in rates)

    return {"images_per_s": per_run([o["best"] for o in out]),
            "images_per_s_median": per_run([o["median"] for o in out]),
            "peak_mb": max(o["peak_mb"] for o in out), "per_process": out,
            "loadavg": [round(v, 2) for v in os.getloadavg()]}


def stacked_plan() -> list[tuple[str, int, int, int]]:
    """(row name, runs S, batch, k) of the stacked-run rows (the one-layer model, IWAE)."""
    return [(f"stacked S={s}: IWAE k={k}, batch {b}", s, b, k)
            for b, ks in ((20, (1, 5)), (100, (5,))) for k in ks for s in (4, 8)]


def trainer_step(objective: Callable[..., Any], model: torch.nn.Module, x: Tensor) -> Callable[[], None]:
    """The trainer's step (training.take_step) on a fixed batch, with the trainer's optimizer."""
    opt = make_optimizer(model, TrainConfig(lr=1e-4), x.device)

    def step() -> None:
        if not take_step(model, opt, objective, x)[2]:
            raise NonFiniteError("non-finite loss or gradient in the benchmark")

    return step


def training_plan() -> list[tuple[str, list[str], str, int, int, bool]]:
    """(row name, config overrides, objective, k, batch, compare with pythae)."""
    plan = []
    for batch in (100, 20):
        for objective in ("vae", "iwae"):
            for k in (1, 5, 50):
                plan.append((f"one-layer {objective.upper()} k={k} B={batch}", [], objective, k, batch, True))
    plan.append(("two-layer IWAE k=50 B=100", ["model.name=two-layer"], "iwae", 50, 100, False))
    plan.append(("hierarchical VampPrior VAE k=1 B=100",
                 ["model.name=hierarchical", "model.prior.name=vampprior"], "vae", 1, 100, False))
    for label, overrides in flow_models():
        plan.append((f"one-layer 300-300-40 + {label} VAE k=1 B=100", overrides, "vae", 1, 100, False))
    for name in CONV_MODELS:
        plan.append((f"{name} VampPrior VAE k=1 B=100", [f"model.name={name}", "model.prior.name=vampprior"],
                     "vae", 1, 100, False))
    return plan


def flow_models() -> list[tuple[str, list[str]]]:
    """(label, config overrides): the flow posteriors of the VampPrior table's one-layer rows."""
    base = ["model.latent_dim=40", "model.hidden=[300,300]"]
    return [
        ("planar flow x80", [*base, "model.posterior.flow=planar", "model.posterior.length=80"]),
        ("IAF x8 width 320", [*base, "model.posterior.flow=iaf", "model.posterior.length=8",
                              "model.posterior.width=320"]),
    ]


#: the VampPrior paper's convolutional models, timed at their paper sizes (elbolab alone)
CONV_MODELS = ("conv-hierarchical", "pixel-hierarchical")
#: importance samples per image and pass of their log-likelihood rows: one pass of a few
#: images then holds a few thousand decoder rows, so the VampPrior's 500 pseudo-inputs,
#: encoded once per pass, stay a small part of the cost
CONV_CHUNK = 1000


def likelihood_plan() -> list[tuple[str, list[str], int]]:
    """(row name, config overrides, chunk) of the per-model IS log-likelihood rows."""
    flows = [(f"IS log-lik K=5000, {label}", overrides, EvalConfig().chunk_size) for label, overrides in flow_models()]
    return flows + [(f"{name} VampPrior IS log-lik K=5000", [f"model.name={name}", "model.prior.name=vampprior"],
                     CONV_CHUNK) for name in CONV_MODELS]


def pythae_probe(pmodel, x: Tensor) -> None:
    """A tiny get_nll call, to learn whether pythae runs here before timing it."""
    with torch.no_grad():
        pmodel.get_nll(x, n_samples=10, batch_size=10)


@contextlib.contextmanager
def stopwatch(log: Callable[[str], None], what: str):
    t0 = time.perf_counter()
    yield
    log(f"  ({what}: {time.perf_counter() - t0:.1f} s)")
