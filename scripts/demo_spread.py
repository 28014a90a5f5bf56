"""How far do the demo's numbers move from one training trajectory to another? The spread behind
the tolerances of scripts/check_readme_demo.py (README's demo block against a fresh run).

    python scripts/demo_spread.py --seeds 0,1,2,3 --out scripts/demo_spread.json   # train 4 demos now (one stack)
    python scripts/demo_spread.py --from runs/seeds --out scripts/demo_spread.json # a sweep trained before, or
                                                                                    # still training (a proxy)

Another machine's float rounding (another CPU type picks other kernels) makes the demo follow
another trajectory from the first epochs on, as another seed does; the thread count does not (the
demo's weights after an epoch at 1 and at 2 threads are bit-identical on this project's machine). So
the seeds' spread stands for the machines' spread. For each run this reads the collapse monitor's epochs
(active units, validation L_5) from metrics.jsonl and, for finished runs, the test report; it writes
each number's values per epoch and their standard deviation across runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_numbers(run: Path) -> dict:
    """One run's monitor epochs ({epoch: {active_units, valid_bound}}) and, when finished, its test report."""
    epochs = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "active_units" in row:
            bound = next(v for k, v in row.items() if k.startswith("valid_iwae_"))
            epochs[row["epoch"]] = {"active_units": row["active_units"], "valid_bound": bound}
    out: dict = {"run": run.name, "monitor": epochs}
    report = run / "report.json"
    if report.exists():
        r = json.loads(report.read_text())
        out["test"] = {"elbo": r["elbo"], "iwae": r[f"iwae_{r['iwae_k']}"], "log_p": r["log_likelihood"]["mean"],
                       "active_units": r["active_units"]["total"] if isinstance(r["active_units"], dict)
                       else r["active_units"]}
    return out


def spread(runs: list[dict]) -> dict:
    """Per monitor epoch that every run reached, and for the test numbers of finished runs: values and sd."""
    common = set.intersection(*(set(r["monitor"]) for r in runs)) if runs else set()
    per_epoch = {}
    for e in sorted(common):
        per_epoch[e] = {}
        for key in ("active_units", "valid_bound"):
            values = [r["monitor"][e][key] for r in runs]
            per_epoch[e][key] = {"values": values, "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    done = [r for r in runs if "test" in r]
    test = {}
    for key in ("elbo", "iwae", "log_p", "active_units"):
        values = [r["test"][key] for r in done]
        if values:
            test[key] = {"values": values, "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    return {"monitor_epochs": per_epoch, "test": test, "runs_finished": len(done), "runs": len(runs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3", help="train.seed values to train now (one stacked sweep)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to `elbolab train`")
    p.add_argument("--from", dest="source", type=Path, help="summarize this sweep folder instead of training")
    p.add_argument("--other-active-units", default="",
                   help="the demo's final active units seen elsewhere, comma-separated (recorded beside the seeds)")
    p.add_argument("--other-source", default="", help="where those counts come from")
    p.add_argument("--out", type=Path, help="JSON file to write")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source
        if source is None:
            source = Path(tmp) / "seeds"
            cmd = [sys.executable, "-m", "elbolab.cli", "train", "--sweep", f"train.seed={args.seeds}",
                   "--set", "train.progress=false", "--out", str(source),
                   *[a for kv in args.set for a in ("--set", kv)]]
            if subprocess.run(cmd).returncode != 0:
                print("demo_spread: error: the sweep failed", file=sys.stderr)
                return 1
        names = json.loads((source / "sweep.json").read_text())["runs"]
        runs = [run_numbers(source / name) for name in names]
    result = {"source": str(args.source or f"--seeds {args.seeds}"), "set": args.set, **spread(runs), "per_run": runs}
    if args.other_active_units:
        result["other_machines"] = {"active_units": [int(v) for v in args.other_active_units.split(",")],
                                    "source": args.other_source}
    for e, row in result["monitor_epochs"].items():
        print(f"epoch {e:3d}: active units {row['active_units']['values']} (sd {row['active_units']['sd']:.2f}), "
              f"valid bound sd {row['valid_bound']['sd']:.3f}")
    for key, row in result["test"].items():
        print(f"test {key}: {row['values']} (sd {row['sd']:.3f})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
