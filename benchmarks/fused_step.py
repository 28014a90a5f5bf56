"""The batch-20 training step, plain against fused (elbolab.fused) and compiled fused (elbolab.fused_cpp), one thread.

    python benchmarks/fused_step.py                  # the full table (a few minutes)
    python benchmarks/fused_step.py --ks 1 --models one-layer --seconds 0.2 --repeats 3
    python benchmarks/fused_step.py --stacks 1,2,4 --ks 1,5 --objectives iwae   # fused stacks

For each dense model of the IWAE paper, objective and k: ms per step of the trainer's plain
step (training.take_step), of the fused step (torch ops) and of the compiled fused step
(train.fused_backend=cpp; the column is left out, saying why, where it does not build), pythae's
step on the one-layer model, all in
this process with their repeats interleaved beside a 1024 x 1024 float32 matrix product whose
best rate is the one-thread FLOP peak; "of peak" is the step's matrix-product FLOPs (torch's
FLOP counter on the plain step) per second over that peak. "hours/row" is a paper-budget table
row at the measured step: 3,280 epochs x 60,000 / 20 steps (the iwae-paper preset trains on MNIST's
60,000 training images). Timings are the minimum over the
repeats (CPU clock by default: a shared machine's waiting is not counted); the CPU share of
each reported repeat is kept. Prints the table and writes JSON to benchmarks/results/.

``--stacks``: instead, ms per step and run of S runs of one shape in one fused step
(training.make_step's FusedStackStep, each run its own generator), for each S given, beside the
plain step of one run, interleaved in one process; best and median over the repeats.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from elbolab import fused_cpp
from elbolab.cli.bench import run_script
from elbolab.config import ConfigError, RunConfig, TrainConfig
from elbolab.data import load
from elbolab.fastpaths import retain_freed_memory
from elbolab.fused import FusedStep, supports
from elbolab.models import build_model
from elbolab.objectives import make_objective
from elbolab.optimizers import make_optimizer
from elbolab.speed import pythae_models
from elbolab.speed.measure import compare, count_flops, machine_info, matmul_step, use_cpu_clock
from elbolab.speed.report import write_json
from elbolab.speed.suite import trainer_step
from elbolab.training import NonFiniteError

BATCH = 20
#: steps in one table row at the IWAE paper's budget: 3,280 epochs of 60,000 / 20 batches (the
#: iwae-paper preset: data.name=mnist, every training image, no validation split held out)
PAPER_STEPS = 3280 * 60_000 // BATCH
MODELS = {"one-layer": [], "two-layer": ["model.name=two-layer"]}


def fused_step(model, cfg: RunConfig, x: torch.Tensor, backend: str = "torch"):
    opt = make_optimizer(model, TrainConfig(lr=1e-4), x.device)
    step = FusedStep(model, opt, cfg.objective.name, cfg.objective.k, cfg.objective.estimator, backend=backend)
    if backend == "cpp" and step.compiled is None:
        raise RuntimeError("the compiled fused step did not build")

    def run() -> None:
        if not step.step(x)[2]:
            raise NonFiniteError("non-finite loss or gradient in the benchmark")

    return run


def _fused(mname: str, obj: str, k: int, data_dim: int, train: torch.Tensor, widths: bool = False,
           backend: str = "torch") -> FusedStep:
    over = [*MODELS[mname], f"objective.name={obj}", f"objective.k={k}"]
    if widths:  # every layer 8 wide: the same operations on almost no data
        over += (["model.hidden=[8,8]", "model.latent_dim=4"] if mname == "one-layer" else
                 ["model.two_layer.hidden1=[8,8]", "model.two_layer.hidden2=[8,8]",
                  "model.two_layer.latent_dims=[8,4]"])
    cfg = RunConfig().with_overrides(over)
    torch.manual_seed(0)
    model = build_model(cfg.model, data_dim, train).train()
    opt = make_optimizer(model, TrainConfig(lr=1e-4), train.device)
    return FusedStep(model, opt, obj, k, backend=backend)


def _aten_ops(fn) -> int:
    """How many ATen operations one call dispatches (views included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def profile(mname: str, obj: str, k: int, x: torch.Tensor, data_dim: int, train: torch.Tensor, repeats: int,
            seconds: float) -> dict[str, float]:
    """Where a fused step's time goes, each part timed alone and interleaved with the step:
    its matrix products (the step's GEMMs on its own buffers), the Adam kernel, the gradient
    norm that checks finiteness, and the dispatch floor (the same step with every layer 8
    wide: the same operations on almost no data). The rest of the step is elementwise work. The
    compiled step takes Adam's step inside its call (its forward+backward alone, ``gradients``, does not)."""
    step = _fused(mname, obj, k, data_dim, train)
    step.step(x)
    step.step(x)  # Adam's state exists: the direct kernel call runs
    tiny = _fused(mname, obj, k, 8, train[:, :8].contiguous(), widths=True)
    x8 = x[:, :8].contiguous()
    tiny.step(x8)
    bufs = step._buffers(x.shape[0])
    ins = {role: x.unsqueeze(0) if role == "q1" else torch.randn_like(b.grad_in) for role, b in bufs.items()}

    def products() -> None:
        for role, chain in step.chains.items():
            buf = bufs[role]
            inputs = [ins[role], *buf.acts]
            outs = [*buf.acts, buf.out]
            for i in range(len(chain.w)):
                torch.baddbmm(chain.b[i], inputs[i], chain.wt[i], out=outs[i])
            for i in range(len(chain.w) - 1, -1, -1):
                d = outs[i]
                torch.bmm(d.transpose(1, 2), inputs[i], out=chain.gw[i])
                if i > 0:
                    torch.bmm(d, chain.w[i], out=buf.deltas[i - 1])
                elif role != "q1":
                    torch.bmm(d, chain.w[0], out=buf.grad_in)

    peak_step, peak_flops = matmul_step(x.device, 1024)
    parts = {"step": (lambda: step.step(x), 1), "matrix products": (products, 1), "Adam update": (step._adam_direct, 1),
             "finiteness probe (gradient norm)": ((lambda: step.flat.norm()), 1),
             "dispatch floor (all layers 8 wide)": ((lambda: tiny.step(x8)), 1), "matmul": (peak_step, peak_flops)}
    compiled = _fused(mname, obj, k, data_dim, train, backend="cpp") if fused_cpp.load() is not None else None
    if compiled is not None:
        compiled.step(x)
        compiled.step(x)
        parts["compiled step"] = ((lambda: compiled.step(x)), 1)
        parts["compiled forward+backward"] = ((lambda: compiled.gradients(x)), 1)
    with torch.no_grad():
        res = compare(parts, x.device, repeats, seconds)
    out = {name: 1e3 / tp.median for name, (tp, _) in res.items() if name != "matmul"}
    flops = count_flops(products)
    torch_parts = ("matrix products", "Adam update", "finiteness probe (gradient norm)",
                   "dispatch floor (all layers 8 wide)")
    out["elementwise (the rest)"] = out["step"] - sum(out[n] for n in torch_parts)
    if compiled is not None:
        # the compiled step's forward+backward beyond its products: its elementwise loops, its
        # finiteness proof or check, and one call; its step beyond that: the Adam update inside the call
        # and the step's Python (the noise draw, the result objects)
        out["compiled: elementwise and call"] = out["compiled forward+backward"] - out["matrix products"]
        out["compiled: Adam in the call and the rest"] = out["compiled step"] - out["compiled forward+backward"]
        out["compiled step of peak"] = flops / (out["compiled step"] / 1e3) / res["matmul"][0].median
    out["aten ops per step"] = _aten_ops(lambda: step.step(x))
    out["products of peak"] = flops / (out["matrix products"] / 1e3) / res["matmul"][0].median
    out["step of peak"] = flops / (out["step"] / 1e3) / res["matmul"][0].median
    return out


def stack_row(mname: str, obj: str, k: int, stacks: list[int], x: torch.Tensor, data_dim: int, train: torch.Tensor,
              repeats: int, seconds: float) -> dict:
    """Per-run ms of a fused stack of each size in ``stacks`` and of one run's plain step, interleaved."""
    from elbolab.objectives import objective_plan
    from elbolab.training import StepRun, make_step

    cfg = RunConfig().with_overrides([*MODELS[mname], f"objective.name={obj}", f"objective.k={k}"])
    plan, estimator = objective_plan(cfg.objective)

    def run(seed: int) -> StepRun:
        torch.manual_seed(seed)
        model = build_model(cfg.model, data_dim, train).train()
        opt = make_optimizer(model, TrainConfig(lr=1e-4), x.device)
        return StepRun(model, opt, make_objective(cfg.objective), plan, estimator,
                       torch.Generator().manual_seed(seed), fused=FusedStep(model, opt, obj, k, estimator))

    torch.manual_seed(0)
    plain_model = build_model(cfg.model, data_dim, train).train()
    steps = {"plain S=1": (trainer_step(make_objective(cfg.objective), plain_model, x), 1)}
    for s in stacks:
        stack = make_step([run(i) for i in range(s)])
        xs, betas = torch.stack([x] * s), [1.0] * s
        steps[f"fused S={s}"] = ((lambda stack=stack, xs=xs, betas=betas: stack.step(xs, betas)), s)
    res = compare(steps, x.device, repeats, seconds)
    return {"name": f"{mname} {obj.upper()} k={k}", "model": mname, "objective": obj, "k": k, "batch": BATCH,
            "ms_per_run_step": {n: 1e3 / tp.best for n, (tp, _) in res.items()},
            "ms_per_run_step_median": {n: 1e3 / tp.median for n, (tp, _) in res.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="one-layer,two-layer")
    p.add_argument("--objectives", default="iwae,vae")
    p.add_argument("--ks", default="1,5,50")
    p.add_argument("--seconds", type=float, default=0.5, help="seconds per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--no-pythae", action="store_true")
    p.add_argument("--no-compiled", action="store_true", help="leave out the compiled fused step (no build)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fused-step-cpu-1thread.json"))
    p.add_argument("--profile", action="store_true", help="instead of the table: where a fused step's time goes")
    p.add_argument("--stacks", default="", help="instead of the table: per-run ms of fused stacks of these sizes")
    args = p.parse_args(argv)
    models, objectives = args.models.split(","), args.objectives.split(",")
    bad = [m for m in models if m not in MODELS] + [o for o in objectives if o not in ("iwae", "vae")]
    if bad:
        raise ConfigError(f"--models/--objectives: unknown {bad}; models: {', '.join(MODELS)}; objectives: iwae, vae")
    try:
        ks = [int(k) for k in args.ks.split(",")]
    except ValueError:
        raise ConfigError(f"--ks: expected integers like 1,5,50, got {args.ks!r}") from None
    torch.set_num_threads(1)
    use_cpu_clock(args.clock == "cpu")
    retain_freed_memory()
    device = torch.device("cpu")
    data = load("binarized-mnist-embedded")
    train = data.as_float("train")
    x = train[:BATCH].contiguous()
    pythae_reason = "--no-pythae" if args.no_pythae else pythae_models.available()
    peak_step, peak_flops = matmul_step(device, 1024)
    info = machine_info(device)
    if args.stacks:
        try:
            stacks = [int(v) for v in args.stacks.split(",")]
        except ValueError:
            raise ConfigError(f"--stacks: expected integers like 1,2,4, got {args.stacks!r}") from None
        rows = []
        for mname in models:
            for obj in objectives:
                for k in ks:
                    row = stack_row(mname, obj, k, stacks, x, data.data_dim, train, args.repeats, args.seconds)
                    rows.append(row)
                    print(f"{row['name']:<26} " + "  ".join(
                        f"{n} {row['ms_per_run_step'][n]:.3f} (median {row['ms_per_run_step_median'][n]:.3f})"
                        for n in row["ms_per_run_step"]), flush=True)
        out = args.out.with_name("fused-stacks-cpu-1thread.json")
        write_json({"machine": info, "clock": args.clock, "threads": 1, "rows": rows}, out)
        print(f"ms per step and run; wrote {out}")
        return 0
    if args.profile:
        prof_rows = []
        for mname in models:
            for obj in objectives:
                for k in ks:
                    parts = profile(mname, obj, k, x, data.data_dim, train, args.repeats, args.seconds)
                    step_ms = parts["step"]
                    shown = [f"{n} {v:.3f} ms ({100 * v / step_ms:.0f}%)" for n, v in parts.items()
                             if n not in ("step", "aten ops per step", "products of peak", "step of peak",
                                          "compiled step of peak") and not n.startswith("compiled")]
                    if "compiled step" in parts:
                        c_ms = parts["compiled step"]
                        c_peak = 100 * parts["compiled step of peak"]
                        shown.append(f"COMPILED step {c_ms:.3f} ms ({c_peak:.0f}% of peak): "
                                     + "; ".join(f"{n} {parts[n]:.3f} ms ({100 * parts[n] / c_ms:.0f}%)" for n in
                                                 ("compiled forward+backward", "matrix products",
                                                  "compiled: elementwise and call",
                                                  "compiled: Adam in the call and the rest")))
                    print(f"{mname} {obj.upper()} k={k}: step {step_ms:.3f} ms, {parts['aten ops per step']} aten ops, "
                          f"{100 * parts['step of peak']:.0f}% of peak (its products alone: "
                          f"{100 * parts['products of peak']:.0f}%): " + "; ".join(shown), flush=True)
                    prof_rows.append({"name": f"{mname} {obj.upper()} k={k}", "median_ms_and_fractions": parts})
        write_json({"machine": info, "clock": args.clock, "threads": 1, "rows": prof_rows},
                   args.out.with_name("fused-step-profile-cpu-1thread.json"))
        return 0
    rows, peak_seen = [], 0.0
    compiled_reason = "--no-compiled" if args.no_compiled else (
        None if fused_cpp.load() is not None else "it does not build here")
    if compiled_reason:
        print(f"compiled fused step: left out ({compiled_reason})")
    print(f"{'row':<28} {'plain ms':>9} {'fused ms':>9} {'speed-up':>8} {'plain':>6} {'fused':>6} "
          f"{'pythae ms':>9} {'hours/row':>9} {'share':>5}  compiled: median ms, vs fused median, of peak, hours/row")
    for mname in models:
        for obj in objectives:
            for k in ks:
                cfg = RunConfig().with_overrides([*MODELS[mname], f"objective.name={obj}", f"objective.k={k}"])
                torch.manual_seed(0)
                plain_model = build_model(cfg.model, data.data_dim, train).train()
                fused_model = build_model(cfg.model, data.data_dim, train).train()
                fused_model.load_state_dict(plain_model.state_dict())
                reason = supports(fused_model, cfg)
                if reason is not None:
                    raise ConfigError(f"{mname} {obj} k={k}: the fused step does not fit: {reason}")
                plain = trainer_step(make_objective(cfg.objective), plain_model, x)
                flops = count_flops(plain)
                steps = {"plain": (plain, 1), "fused": (fused_step(fused_model, cfg, x), 1)}
                if compiled_reason is None:
                    compiled_model = build_model(cfg.model, data.data_dim, train).train()
                    compiled_model.load_state_dict(plain_model.state_dict())
                    steps["compiled"] = (fused_step(compiled_model, cfg, x, backend="cpp"), 1)
                if mname == "one-layer" and pythae_reason is None:
                    torch.manual_seed(0)
                    pm = pythae_models.build(obj, k)
                    popt = torch.optim.Adam(pm.parameters(), lr=1e-4)
                    rep = k if obj == "vae" else 1
                    steps["pythae"] = ((lambda pm=pm, popt=popt, rep=rep: pythae_models.train_step(pm, popt, x, rep)),
                                       1)
                steps["matmul"] = (peak_step, peak_flops)
                res = compare(steps, device, args.repeats, args.seconds)
                peak = res["matmul"][0].best
                peak_seen = max(peak_seen, peak)
                ms = {name: 1e3 / tp.best for name, (tp, _) in res.items() if name != "matmul"}
                median_ms = {name: 1e3 / tp.median for name, (tp, _) in res.items() if name != "matmul"}
                of_peak = {name: flops / (v / 1e3) / peak for name, v in ms.items() if name != "pythae"}
                peak_median = res["matmul"][0].median
                of_peak_median = {name: flops / (v / 1e3) / peak_median for name, v in median_ms.items()
                                  if name != "pythae"}
                row = {
                    "name": f"{mname} {obj.upper()} k={k}", "model": mname, "objective": obj, "k": k,
                    "batch": BATCH, "ms_per_step": ms, "ms_per_step_median": median_ms,
                    "flops_per_step": flops, "peak_flops": peak, "of_peak": of_peak,
                    "peak_flops_median": peak_median, "of_peak_median": of_peak_median,
                    "hours_per_paper_row": {n: v * PAPER_STEPS / 3.6e6 for n, v in ms.items()},
                    "hours_per_paper_row_median": {n: v * PAPER_STEPS / 3.6e6 for n, v in median_ms.items()},
                    "cpu_share": {n: tp.best_cpu_share for n, (tp, _) in res.items()},
                    "speedup": ms["plain"] / ms["fused"],
                }
                rows.append(row)
                py = f"{ms['pythae']:9.3f}" if "pythae" in ms else f"{'-':>9}"
                share = row["cpu_share"]["fused"]
                comp = ""
                if "compiled" in ms:
                    row["compiled_vs_fused_median"] = median_ms["fused"] / median_ms["compiled"]
                    comp = (f"  {median_ms['compiled']:.3f} {row['compiled_vs_fused_median']:.2f}x "
                            f"{100 * of_peak_median['compiled']:.0f}% "
                            f"{row['hours_per_paper_row_median']['compiled']:.2f}")
                print(f"{row['name']:<28} {ms['plain']:9.3f} {ms['fused']:9.3f} {row['speedup']:7.2f}x "
                      f"{100 * of_peak['plain']:5.0f}% {100 * of_peak['fused']:5.0f}% {py} "
                      f"{row['hours_per_paper_row']['fused']:9.2f} {share:5.2f}{comp}", flush=True)
                write_json({"machine": info, "clock": args.clock, "threads": 1, "paper_steps": PAPER_STEPS,
                            "pythae": pythae_reason or "0.1.2", "peak_flops_seen": peak_seen, "rows": rows,
                            "compiled": compiled_reason or "built", "finished": False}, args.out)
    if hasattr(os, "getloadavg"):
        info["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    write_json({"machine": info, "clock": args.clock, "threads": 1, "paper_steps": PAPER_STEPS,
                "pythae": pythae_reason or "0.1.2", "peak_flops_seen": peak_seen, "rows": rows, "finished": True,
                "compiled": compiled_reason or "built"},
               args.out)
    print(f"matmul peak (1 thread, {args.clock} clock): {peak_seen / 1e9:.1f} GFLOP/s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_script(main)
