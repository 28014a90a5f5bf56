"""The benchmark harness behind ``elbolab bench``: speed against pythae and this machine's peak.

``run(options)`` times every row and writes the results; the scripts and the measured
results live in benchmarks/ at the top of the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch

from .. import limits
from ..config import ConfigError
from ..devices import resolve_device
from .measure import machine_info, matmul_peak_flops, use_cpu_clock
from .report import format_table, plot_curves, write_json
from .suite import Bench, Row, Settings, likelihood_plan, stacked_plan, stopwatch, training_plan

DEFAULT_OUT = Path("benchmarks") / "results"


def _wanted(name: str, only: list[str] | None) -> bool:
    return not only or any(s.lower() in name.lower() for s in only)


def run(args: argparse.Namespace, log=print) -> dict:
    """Every row the options select (``elbolab bench --help`` lists them); returns the results."""
    device = resolve_device(args.device, "--device")
    if args.clock == "cpu" and device.type != "cpu":
        raise ConfigError("--clock cpu: only for --device cpu (GPU work is not this process's CPU time)")
    use_cpu_clock(args.clock == "cpu")
    threads = limits.threads(args.threads, "--threads") or os.cpu_count() or 1
    torch.set_num_threads(threads)
    settings = Settings.quick() if args.quick else Settings.full()
    if args.seconds is not None:
        if args.seconds <= 0:
            raise ConfigError(f"--seconds: must be > 0, got {args.seconds}")
        settings = dataclasses.replace(settings, target_s=args.seconds)
    if args.repeats is not None:
        if args.repeats < 1:
            raise ConfigError(f"--repeats: must be >= 1, got {args.repeats}")
        settings = dataclasses.replace(settings, repeats=args.repeats)
    mode = "quick" if args.quick else "full"
    info = machine_info(device)
    info["clock"] = args.clock
    log(f"elbolab bench ({mode}) on {info['cpu']} / {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock; load average {info.get('loadavg_at_start')}")
    load = (info.get("loadavg_at_start") or [0.0])[0]
    if device.type == "cpu" and args.clock == "wall" and load >= 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {load} on {os.cpu_count()} cores: other work competes for them, and "
            f"wall-clock timings with {threads} threads read low (rows say BUSY MACHINE when their process got "
            "under half its CPU time); --threads 1 --clock cpu holds up on a busy machine")
    peak = matmul_peak_flops(device, n=8192 if device.type == "cuda" else 2048 if args.quick else 4096)
    log(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    bench = Bench(settings, device, peak, use_pythae=not args.no_pythae, log=log, compiled=args.compile,
                  bf16=args.bf16)
    if bench.pythae_reason:
        log(f"pythae: {bench.pythae_reason}")
    rows: list[Row] = []
    curves: dict = {}
    t0 = time.perf_counter()
    name = args.name or f"{mode}-{device.type}"
    out = Path(args.out)

    def save(finished: bool = False) -> dict:
        """Write the JSON so far (``finished`` false while rows remain): a killed run keeps its rows."""
        if hasattr(os, "getloadavg"):
            info["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
        result = {
            "mode": mode,
            "finished": finished,
            "machine": info,
            "peak_flops": peak,
            #: the best matmul FLOP/s seen over the run (the reference is re-timed beside each row)
            "peak_flops_seen": bench.peak_seen,
            "settings": vars(settings) if hasattr(settings, "__dict__") else {},
            "seconds": round(time.perf_counter() - t0, 1),
            "rows": [r.to_dict() for r in rows],
            "curves": curves,
        }
        write_json(result, out / f"{name}.json")
        return result

    for row_name, overrides, objective, k, batch, with_pythae in training_plan():
        if not _wanted(row_name, args.only):
            continue
        rows += bench.training_row(row_name, overrides, objective, k, batch, with_pythae)
        for line in format_table([r.to_dict() for r in rows if r.name == row_name]).splitlines()[2:]:
            log(line)
        save()
    for row_name, runs, batch, k in stacked_plan():
        if not _wanted(row_name, args.only):
            continue
        rows += bench.stacked_row(row_name, runs, batch, k)
        for line in format_table([r.to_dict() for r in rows if r.name == row_name]).splitlines()[2:]:
            log(line)
        save()
    if _wanted("IS log-lik", args.only):
        with stopwatch(log, "IS log-likelihood"):
            rows += bench.likelihood_row()
        save()
    for row_name, overrides, chunk in likelihood_plan():
        if _wanted(row_name, args.only):
            with stopwatch(log, row_name):
                rows += bench.model_likelihood_row(row_name, overrides, chunk)
            for line in format_table([r.to_dict() for r in rows if r.name == row_name]).splitlines()[2:]:
                log(line)
            save()
    if _wanted("ELBO surgery", args.only):
        rows += bench.surgery_row()
        save()
    if _wanted("curves", args.only):
        log("scaling curves:")
        curves["k_curve"] = bench.k_curve()
        curves["batch_curve"] = bench.batch_curve()
        curves["chunk_curve"] = bench.chunk_curve(k=200 if args.quick else 1000)
    final = save(finished=True)
    if curves:
        plot_curves(curves, out / f"{name}.png",
                    f"{info.get('gpu', info['cpu'])}, threads: {torch.get_num_threads()}, {args.clock} clock, "
                    f"torch {torch.__version__} ({mode})")
    log("")
    log(format_table(final["rows"]))
    busy = [r["name"] for r in final["rows"] if "BUSY MACHINE" in r["note"]]
    if busy:
        log(f"\n{len(busy)} of {len(final['rows'])} rows ran on a busy machine (see their notes): their wall-clock "
            "img/s are not this machine's speed")
    log(f"\nwrote {out / (name + '.json')}" + (f" and {name}.png" if curves else "")
        + f"; load average at end {info.get('loadavg_at_end')}")
    return final
