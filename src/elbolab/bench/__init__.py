"""``elbolab bench`` / ``python benchmarks/run.py``: speed against pythae and against this machine's peak.

Run ``--quick`` (about a minute) to check the harness, the full mode for the README table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from .measure import machine_info, matmul_peak_flops, use_cpu_clock
from .report import format_table, plot_curves, write_json
from .suite import Bench, Row, Settings, stopwatch, training_plan

DEFAULT_OUT = Path("benchmarks") / "results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes, about a minute (checks the harness)")
    p.add_argument("--name", help="results file name (default: quick or full, plus the device)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"results folder (default: {DEFAULT_OUT})")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (default: the number of CPU cores)")
    p.add_argument("--only", action="append", metavar="TEXT",
                   help="run only rows whose name contains TEXT (repeatable); curves run with 'curves'")
    p.add_argument("--no-pythae", action="store_true", help="time elbolab alone")
    p.add_argument("--compile", action="store_true",
                   help="also time training steps as train.compile=true runs them (CUDA graphs on a GPU; "
                        "on a CPU each row compiles for 10-30 s)")
    p.add_argument("--seconds", type=float, metavar="S",
                   help="seconds of work per timed repeat (default: 0.12 quick, 1.0 full; a GPU needs less)")
    p.add_argument("--repeats", type=int, metavar="N", help="interleaved repeats per row (default: 3 quick, 5 full)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time (default), or process CPU time for a busy shared machine (use with --threads 1)")


def _wanted(name: str, only: list[str] | None) -> bool:
    return not only or any(s.lower() in name.lower() for s in only)


def run(args: argparse.Namespace, log=print) -> dict:
    from ..config import ConfigError
    from ..training import resolve_device

    device = resolve_device(args.device, "--device")
    if args.clock == "cpu" and device.type != "cpu":
        raise ConfigError("--clock cpu: only for --device cpu (GPU work is not this process's CPU time)")
    use_cpu_clock(args.clock == "cpu")
    threads = args.threads or os.cpu_count() or 1
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
    peak = matmul_peak_flops(device, n=8192 if device.type == "cuda" else 2048 if args.quick else 4096)
    log(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    bench = Bench(settings, device, peak, use_pythae=not args.no_pythae, log=log, compiled=args.compile)
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

    for row_name, overrides, objective, k, batch, with_pythae, skip in training_plan():
        if not _wanted(row_name, args.only):
            continue
        if skip:
            rows.append(Row(name=row_name, library="elbolab", note=skip))
        else:
            rows += bench.training_row(row_name, overrides, objective, k, batch, with_pythae)
        for line in format_table([r.to_dict() for r in rows if r.name == row_name]).splitlines()[2:]:
            log(line)
        save()
    if _wanted("IS log-lik", args.only):
        with stopwatch(log, "IS log-likelihood"):
            rows += bench.likelihood_row()
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
    log(f"\nwrote {out / (name + '.json')}" + (f" and {name}.png" if curves else "")
        + f"; load average at end {info.get('loadavg_at_end')}")
    return final


def cmd_bench(args: argparse.Namespace) -> int:
    run(args)
    return 0


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time training and evaluation against pythae and the machine's FLOP peak")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def run_script(script_main) -> None:
    """``sys.exit(script_main())`` for the scripts in benchmarks/: a bad option is one line, exit 2."""
    from ..config import ConfigError

    try:
        code = script_main()
    except ConfigError as e:
        print(f"{sys.argv[0]}: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    from ..config import ConfigError

    try:
        return cmd_bench(parser.parse_args(sys.argv[1:] if argv is None else argv))
    except (ConfigError, RuntimeError) as e:
        print(f"benchmarks/run.py: error: {e}", file=sys.stderr)
        return 2
