"""Check README's demo block against a fresh run of the demo (`elbolab train`, 80 epochs).

    OMP_NUM_THREADS=1 python scripts/check_readme_demo.py            # train the demo now, then compare
    python scripts/check_readme_demo.py --output demo-stdout.txt     # compare a saved run's stdout

It reads the ``` block that follows "it prints" in README.md, runs `python -m elbolab.cli train
--out TMP` (what `elbolab train` runs, in a temporary folder), and compares every number the
report prints. Another machine (another CPU type, other float rounding) trains the demo along
another trajectory, as another seed does, so each tolerance is the larger of a number's own
error and the spread measured between trajectories (scripts/demo_spread.json, written by
scripts/demo_spread.py; 3 standard deviations of the difference of two runs, 3 * sqrt(2) * sd):

- test points: exact (the embedded test split is fixed);
- test ELBO, test L_5, test log p(x): 3 standard errors of the test mean (the "+-" the report
  prints for log p(x)), or the trajectories' spread of the bound when larger;
- active units: the trajectories' spread (a unit near the 0.01 threshold crosses it on one machine
  and not on another: README's 33 came back as 38 and 39 on another machine of this kind);
- the last epoch line: its validation L_5 within 3 standard errors scaled to the 1,000 validation
  images (sqrt(2) times the test one), or the spread, its active units as above.

Exit 0 when every number is within its tolerance, 1 otherwise (each miss on a line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SPREAD = Path(__file__).resolve().with_name("demo_spread.json")
NUM = r"(-?\d+(?:\.\d+)?)"

#: report line -> (key, pattern) of the numbers it holds
PATTERNS = {
    "n_test": r"^test points\s+(\d+)$",
    "elbo": rf"^test ELBO \(L_1\)\s+{NUM} nats$",
    "iwae": rf"^test L_(\d+)\s+{NUM} nats$",
    "log_p": rf"^test log p\(x\), IS K=(\d+)\s+{NUM} \+- {NUM} nats$",
    "active_units": r"^active units\s+(\d+) \(threshold ([\d.]+)\)$",
    "last_epoch": (rf"^epoch (\d+)/(\d+): train bound {NUM}, valid L_(\d+) {NUM}, {NUM} s"
                   rf"(?:, active units (\d+), I\(x;z\) {NUM} nats)?(?:, (~[\d hmins]+) left)?$"),
}


def readme_block(text: str) -> str:
    """The demo's output: the first ``` block after the line saying what `elbolab train` prints."""
    at = text.index("it prints")
    start = text.index("```\n", at) + 4
    return text[start:text.index("```", start)]


def demo_numbers(output: str) -> dict[str, float]:
    """The numbers of a demo's printed output (README's block or a fresh run's stdout)."""
    found: dict[str, float] = {}
    for line in output.splitlines():
        line = line.rstrip()
        for key, pattern in PATTERNS.items():
            m = re.match(pattern, line)
            if not m:
                continue
            g = m.groups()
            if key == "n_test":
                found["n_test"] = int(g[0])
            elif key in ("elbo",):
                found["elbo"] = float(g[0])
            elif key == "iwae":
                found["iwae_k"], found["iwae"] = int(g[0]), float(g[1])
            elif key == "log_p":
                found["k_importance"], found["log_p"], found["log_p_stderr"] = int(g[0]), float(g[1]), float(g[2])
            elif key == "active_units":
                found["active_units"] = int(g[0])
            elif key == "last_epoch" and int(g[0]) == int(g[1]):  # the last epoch's line
                found["valid_bound"] = float(g[4])
                if g[6] is not None:
                    found["epoch_active_units"] = int(g[6])
    missing = {"n_test", "elbo", "iwae", "log_p", "active_units", "valid_bound"} - set(found)
    if missing:
        raise ValueError(f"demo output lacks {sorted(missing)}")
    return found


def spread_sds(spread: dict) -> dict[str, float]:
    """Standard deviations between trajectories, from demo_spread.py's JSON: the test numbers where
    finished runs were measured, else the monitor's last common epoch (a proxy, said in the JSON),
    each count pooled with the final counts seen on other machines."""
    epochs = spread["monitor_epochs"]
    last = epochs[max(epochs, key=int)] if epochs else {}
    test = spread.get("test", {})

    def sd(key: str, monitor_key: str) -> float:
        return test[key]["sd"] if key in test else last.get(monitor_key, {}).get("sd", 0.0)

    units = [*test.get("active_units", {}).get("values", []), *spread.get("other_machines", {}).get("active_units", [])]
    units_sd = max(sd("active_units", "active_units"), statistics.stdev(units) if len(units) > 1 else 0.0)
    bound_sd = max(sd("log_p", "valid_bound"), sd("elbo", "valid_bound"), sd("iwae", "valid_bound"))
    return {"bound": bound_sd, "active_units": units_sd, "valid_bound": last.get("valid_bound", {}).get("sd", 0.0)}


def tolerances(readme: dict[str, float], spread: dict | None = None) -> dict[str, float]:
    """Each number's tolerance (see the module doc); ``spread`` defaults to scripts/demo_spread.json."""
    sds = spread_sds(spread if spread is not None else json.loads(SPREAD.read_text()))
    between = 3 * math.sqrt(2)  # 3 sd of the difference of two independent trajectories
    se = readme["log_p_stderr"]
    valid_se = se * math.sqrt(2000 / 1000)
    bound = max(3 * se, between * sds["bound"])
    units = max(3, math.ceil(between * sds["active_units"]))
    return {"n_test": 0, "elbo": bound, "iwae": bound, "log_p": bound, "active_units": units,
            "valid_bound": max(3 * valid_se, between * sds["valid_bound"]), "epoch_active_units": units}


def compare(readme: dict[str, float], fresh: dict[str, float], spread: dict | None = None) -> list[str]:
    """One line per number outside its tolerance (empty: README is current)."""
    misses = []
    for key, tol in tolerances(readme, spread).items():
        if key not in readme and key not in fresh:
            continue
        if key not in readme or key not in fresh:
            misses.append(f"{key}: README {readme.get(key)}, fresh run {fresh.get(key)}")
        elif abs(readme[key] - fresh[key]) > tol:
            misses.append(f"{key}: README {readme[key]}, fresh run {fresh[key]} (tolerance {tol:.2f})")
    for key in ("iwae_k", "k_importance"):
        if readme.get(key) != fresh.get(key):
            misses.append(f"{key}: README {readme.get(key)}, fresh run {fresh.get(key)}")
    return misses


def run_demo() -> str:
    """The stdout of `elbolab train` (the demo) run now, in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "elbolab.cli", "train", "--out", str(Path(tmp) / "demo")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            raise RuntimeError(f"the demo failed (exit code {proc.returncode}): {proc.stderr.strip()[-500:]}")
        return proc.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", help="a saved stdout of `elbolab train` to compare instead of training now")
    args = p.parse_args()
    readme = demo_numbers(readme_block(README.read_text()))
    try:
        output = Path(args.output).read_text() if args.output else run_demo()
    except (OSError, RuntimeError) as e:
        print(f"check_readme_demo: error: {e}", file=sys.stderr)
        return 2
    fresh = demo_numbers(output)
    misses = compare(readme, fresh)
    for key in tolerances(readme):
        if key in readme:
            print(f"{key:20s} README {readme[key]:>10}  fresh {fresh.get(key)!s:>10}")
    if misses:
        print("README's demo block is out of date:\n  " + "\n  ".join(misses))
        return 1
    print("README's demo block matches a fresh run within each number's tolerance")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
