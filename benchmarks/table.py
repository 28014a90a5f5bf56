"""A benchmark result as the Markdown table docs/bench.md shows, with the machine it ran on.

    python benchmarks/table.py benchmarks/results/full-cpu-1thread-cpuclock.json
"""

import json
import sys

from elbolab.speed.report import markdown_table

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        result = json.load(f)
    m = result["machine"]
    print(f"{m.get('gpu') or m['cpu']}, torch {m['torch']} ({m['cpu_capability']}), {m['torch_threads']} thread(s), "
          f"{m.get('clock', 'wall')} clock; load average {m.get('loadavg_at_start')} at start, "
          f"{m.get('loadavg_at_end')} at end; matmul peak {result['peak_flops'] / 1e9:.0f} GFLOP/s\n")
    print(markdown_table(result["rows"]))
