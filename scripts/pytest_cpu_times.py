"""A pytest plugin: each test's wall and CPU seconds (this process plus the child processes it waited
for), one line per test as it finishes, so a run on a busy machine still tells an idle machine's times.

    PYTHONPATH=scripts pytest -p pytest_cpu_times                 # the fast tier -> test-cpu-times.tsv
    PYTHONPATH=scripts pytest -p pytest_cpu_times -m slow         # the slow tier
    python scripts/pytest_cpu_times.py test-cpu-times.tsv         # sums per file, largest first

CPU seconds of a one-thread test are about its wall seconds on an idle machine; under load the wall
seconds grow with the number of jobs and the CPU seconds hardly move.
"""

from __future__ import annotations

import collections
import os
import resource
import sys
import time

import pytest

LOG = os.environ.get("PYTEST_CPU_TIMES", "test-cpu-times.tsv")


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, wall = _cpu(), time.perf_counter()
    yield
    with open(LOG, "a") as f:
        f.write(f"{item.nodeid}\t{time.perf_counter() - wall:.3f}\t{_cpu() - cpu:.3f}\n")


def main(path: str) -> int:
    per_file: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    with open(path) as f:
        lines = f.read().splitlines()
    for line in lines:
        nodeid, wall, cpu = line.split("\t")[:3]
        row = per_file[nodeid.split("::")[0]]
        row[0], row[1], row[2] = row[0] + float(wall), row[1] + float(cpu), row[2] + 1
    print(f"{'CPU s':>8} {'wall s':>8} {'tests':>5}  file")
    for name, (wall, cpu, n) in sorted(per_file.items(), key=lambda kv: -kv[1][1]):
        print(f"{cpu:8.1f} {wall:8.1f} {n:5d}  {name}")
    total = [sum(r[i] for r in per_file.values()) for i in range(3)]
    print(f"{total[1]:8.1f} {total[0]:8.1f} {total[2]:5d}  all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else LOG))
