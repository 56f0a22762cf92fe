"""Seconds to calibrate DP-SGD's noise multiplier, for sample rates down to 1e-9.

The PLD accountant's grid grows as the privacy-loss range over its interval; for tiny
sample rates the interval is coarsened (conservatively) and the search stops at the
smallest useful multiplier, so the calibration stays within a few seconds for any q.
Reports wall and process-CPU seconds (CPU seconds are less sensitive to a busy machine),
min and median over the repeats.

Usage::

    python benchmarks/bench_calibration.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import git_commit, results_path, utc_now, write_json  # noqa: E402

CASES = [(q, steps) for q in (1e-9, 1e-6, 1e-4, 1e-2, 0.05, 0.5) for steps in (5, 1000)]


def main() -> None:
    from dpfc_native import accounting

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--method", default="auto", choices=("auto", "pld", "rdp"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    head = f"{'q':>7} {'steps':>6} {'z':>9} {'wall min/med (s)':>18} {'cpu min/med (s)':>17}"
    print(head + "\n" + "-" * len(head))
    for q, steps in CASES:
        wall, cpu, z = [], [], None
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            z = accounting.calibrate_dpsgd_noise_multiplier(
                args.epsilon, args.delta, q, steps, method=args.method
            )
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        row = {
            "sample_rate": q,
            "steps": steps,
            "noise_multiplier": z,
            "wall_s": {"min": min(wall), "median": statistics.median(wall), "all": wall},
            "cpu_s": {"min": min(cpu), "median": statistics.median(cpu), "all": cpu},
        }
        rows.append(row)
        print(
            f"{q:>7.0e} {steps:>6} {z:>9.4f} "
            f"{min(wall):>8.2f}/{statistics.median(wall):<9.2f} "
            f"{min(cpu):>7.2f}/{statistics.median(cpu):<9.2f}",
            flush=True,
        )
    result = {
        "benchmark": "bench_calibration",
        "commit": git_commit(),
        "date": utc_now(),
        "machine": f"{os.cpu_count()} CPUs",
        "epsilon": args.epsilon,
        "delta": args.delta,
        "method": args.method,
        "repeats": args.repeats,
        "rows": rows,
    }
    write_json(args.out or results_path("calibration_cpu.json"), result, indent=1)


if __name__ == "__main__":
    main()
