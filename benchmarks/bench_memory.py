"""Peak memory of fit / predict / score on a float32 memmap (CPU): nothing of size n x d.

Each case runs in a fresh Python process on the same memmapped ``.npy`` file and reports
two peaks above the process's state just before the call:

* ``tracemalloc`` peak: every NumPy buffer the call allocates (exact);
* ``RssAnon`` peak: anonymous resident memory (excludes the file's own mapped pages),
  sampled every millisecond by a thread (catches BLAS and native allocations too).

Columns ``X file`` (the memmap itself) and ``f64 copy`` (one float64 copy of X, what a
preprocessed copy costs) are the references. Repeats report min and median.

Usage::

    python benchmarks/bench_memory.py                       # n = 2,000,000, d = 768
    python benchmarks/bench_memory.py --n 200000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import git_commit, results_path, utc_now, write_json  # noqa: E402

#: case -> (estimator factory source, operation); K classes, d features from the file.
CASES = {
    "fit DP-LS": ("DPLeastSquaresClassifier(epsilon=1.0, classes=list(range(k)))", "fit"),
    "fit DP-FC (2 steps)": ("DPFCClassifier(epsilon=1.0, classes=list(range(k)), steps=2)", "fit"),
    "fit DP-SGD (q=0.01; 5 steps)": (
        "DPSGDClassifier(epsilon=1.0, classes=list(range(k)), steps=5, sample_rate=0.01, "
        "accountant='rdp')",
        "fit",
    ),
    "fit DP Newton (1 step)": (
        "DPNewtonClassifier(epsilon=1.0, classes=list(range(k)), steps=1)",
        "fit",
    ),
    "predict": ("DPLeastSquaresClassifier(epsilon=1.0, classes=list(range(k)))", "predict"),
    "score": ("DPLeastSquaresClassifier(epsilon=1.0, classes=list(range(k)))", "score"),
}
#: Newton's K Hessians cost n d^2 K flops: on a 2-core machine it runs on the first rows.
NEWTON_ROWS = 200_000


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _worker(path: str, labels: str, case: str) -> dict:
    from dpfc_native import models

    warnings.simplefilter("ignore")
    x = np.load(path, mmap_mode="r")
    y = np.load(labels)
    if case.startswith("fit DP Newton"):
        x, y = x[:NEWTON_ROWS], y[:NEWTON_ROWS]
    k = int(y.max()) + 1
    source, op = CASES[case]
    # The factories name the estimators of dpfc_native.models and k.
    est = eval(source, {**vars(models), "k": k})
    if op != "fit":
        est.fit(x[:20_000], y[:20_000])  # a fitted model; the call measured reads all of X
    est2 = eval(source, {**vars(models), "k": k})
    est2.fit(x[:2000], y[:2000])  # imports, BLAS and accountant caches outside the count
    call = {
        "fit": lambda: est.fit(x, y),
        "predict": lambda: est.predict(x),
        "score": lambda: est.score(x, y),
    }[op]
    base = _rss_anon()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    tracemalloc.start()
    t0 = time.perf_counter()
    call()
    seconds = time.perf_counter() - t0
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    done.set()
    thread.join()
    peak[0] = max(peak[0], _rss_anon())
    return {
        "case": case,
        "rows": int(x.shape[0]),
        "tracemalloc_peak": traced,
        "rss_anon_peak": peak[0] - base,
        "seconds": seconds,
    }


def _make_file(path: str, labels: str, n: int, d: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)).astype(np.float32)
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    y = rng.integers(0, k, size=n)
    for start in range(0, n, 65536):
        sl = slice(start, min(n, start + 65536))
        x[sl] = centers[y[sl]] + rng.standard_normal((sl.stop - sl.start, d), dtype=np.float32)
    x.flush()
    del x
    np.save(labels, y)


def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2_000_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated case names (default: all)"
    )
    ap.add_argument(
        "--dir",
        default=None,
        help="where to write the memmap (default: a temporary folder, removed afterwards)",
    )
    ap.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/memory_cpu_<n>.json)"
    )
    ap.add_argument(
        "--reuse",
        nargs=2,
        metavar=("X_NPY", "Y_NPY"),
        default=None,
        help="measure on an existing float32 features .npy and labels .npy "
        "(e.g. the files of an interrupted run) instead of writing new ones",
    )
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(*args.worker)))
        return
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r} (known: {', '.join(CASES)})")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.reuse:
            path, labels = args.reuse
            shape = np.load(path, mmap_mode="r").shape
            args.n, args.d, args.k = shape[0], shape[1], int(np.load(labels).max()) + 1
        else:
            path, labels = os.path.join(tmp, "x.npy"), os.path.join(tmp, "y.npy")
            t0 = time.perf_counter()
            _make_file(path, labels, args.n, args.d, args.k, seed=0)
            print(
                f"wrote {args.n} x {args.d} float32 memmap ({_mib(os.path.getsize(path))} "
                f"MiB) in {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
        rows = []
        for case in cases:
            runs = []
            for _ in range(args.repeats):
                out = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--worker", path, labels, case],
                    capture_output=True,
                    text=True,
                )
                if out.returncode != 0:
                    raise SystemExit(f"{case} failed:\n{out.stderr}")
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            n_rows = runs[0]["rows"]
            row = {
                "case": case,
                "n": n_rows,
                "d": args.d,
                "k": args.k,
                "x_file_bytes": n_rows * args.d * 4,
                "f64_copy_bytes": n_rows * args.d * 8,
            }
            for key in ("tracemalloc_peak", "rss_anon_peak", "seconds"):
                vals = [r[key] for r in runs]
                row[key] = {"min": min(vals), "median": statistics.median(vals), "all": vals}
            rows.append(row)
            print(
                f"{case}: tracemalloc {_mib(row['tracemalloc_peak']['median'])} MiB, "
                f"RssAnon {_mib(row['rss_anon_peak']['median'])} MiB, "
                f"{row['seconds']['median']:.1f} s",
                flush=True,
            )
    head = (
        f"{'case':<30} {'n':>9} {'X file':>8} {'f64 copy':>9} {'traced min/med':>15} "
        f"{'RssAnon min/med':>16} {'s (med)':>8}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        peak, rss = r["tracemalloc_peak"], r["rss_anon_peak"]
        print(
            f"{r['case']:<30} {r['n']:>9} {_mib(r['x_file_bytes']):>8} "
            f"{_mib(r['f64_copy_bytes']):>9} "
            f"{_mib(peak['min']) + '/' + _mib(peak['median']):>15} "
            f"{_mib(rss['min']) + '/' + _mib(rss['median']):>16} "
            f"{r['seconds']['median']:>8.1f}"
        )
    print("(MiB above the process's state before the call; X itself is a memmap)")
    result = {
        "benchmark": "bench_memory",
        "commit": git_commit(),
        "date": utc_now(),
        "machine": f"{os.cpu_count()} CPUs",
        "n": args.n,
        "d": args.d,
        "k": args.k,
        "dtype": "float32 memmap",
        "repeats": args.repeats,
        "newton_rows": NEWTON_ROWS,
        "rows": rows,
    }
    write_json(args.out or results_path(f"memory_cpu_n{args.n}.json"), result, indent=1)


if __name__ == "__main__":
    main()
