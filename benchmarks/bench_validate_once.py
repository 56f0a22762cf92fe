"""Validate once per fit: estimator fit time with and without the per-call op checks.

"before": the estimators' inner op calls go through the public ops, which check every
argument again at every call (a NaN/Inf scan of the feature rows they read, the label
range, the weights: one device sync each on the GPU). "after": the already-validated
path (``ops._unchecked``) the estimators use, X having been checked once in ``fit``.
Both run the same fits on the same data, interleaved, with the same noise seed; the
script checks they give identical weights. Reports min and median over the repeats, the
number of full-width finiteness scans per fit, and writes JSON. Wall time and process CPU
time (all threads) are both recorded: on a shared machine the CPU time is the steadier
of the two.

Usage::

    python benchmarks/bench_validate_once.py [--n 50000] [--d 256] [--k 10]
        [--steps 10] [--repeats 5] [--methods fc,sgd] [--device auto] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import git_commit, results_path, utc_now, write_json  # noqa: E402

from dpfc_native import _validation, models, ops  # noqa: E402


def _estimator(method: str, steps: int, device: str):
    common = dict(epsilon=2.0, classes=None, random_state=0, device=device)
    if method == "fc":
        return models.DPFCClassifier(steps=steps, **common)
    if method == "sgd":
        return models.DPSGDClassifier(steps=steps, **common)
    if method == "newton":
        return models.DPNewtonClassifier(steps=max(1, steps // 5), **common)
    raise ValueError(f"unknown method {method!r}")


def _fit(method, steps, device, X, y, path):
    """(wall seconds, CPU seconds, weights, feature scans) of one fit on the given path."""
    saved_ops, saved_finite = ops._unchecked, _validation.finite
    scans = [0]

    def counting_finite(a, name, xp=np):
        if getattr(a, "ndim", 0) == 2 and a.shape[1] == X.shape[1]:
            scans[0] += 1
        return saved_finite(a, name, xp)

    if path == "before":
        ops._unchecked = ops  # the public, checking ops have the same names: the old path
    _validation.finite = counting_finite
    try:
        est = _estimator(method, steps, device)
        t0, c0 = time.perf_counter(), time.process_time()
        est.fit(X, y)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    finally:
        ops._unchecked, _validation.finite = saved_ops, saved_finite
    return dt, dc, est.coef_, scans[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default="fc,sgd")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    commit = git_commit()  # the code that runs (HEAD may move while it does)

    import warnings

    warnings.simplefilter("ignore")  # the seeded / inferred-classes PrivacyWarnings
    device = models.resolve_device(args.device)
    rng = np.random.default_rng(0)
    y = rng.integers(0, args.k, args.n)
    X = (rng.standard_normal((args.n, args.d)) + np.eye(args.k, args.d)[y]).astype(np.float32)
    if device == "cuda":
        import cupy as cp

        X = cp.asarray(X)

    rows = []
    for method in args.methods.split(","):
        for path in ("before", "after"):  # warm-up: first-call imports and caches
            _fit(method, args.steps, device, X, y, path)
        times = {"before": [], "after": []}
        cpu = {"before": [], "after": []}
        scans, coefs = {}, {}
        for _ in range(args.repeats):
            for path in ("before", "after"):
                dt, dc, coef, n_scans = _fit(method, args.steps, device, X, y, path)
                times[path].append(dt)
                cpu[path].append(dc)
                scans[path], coefs[path] = n_scans, coef
        identical = bool(np.array_equal(coefs["before"], coefs["after"]))
        row = {
            "method": method,
            "n": args.n,
            "d": args.d,
            "k": args.k,
            "steps": args.steps,
            "device": device,
            "repeats": args.repeats,
            "identical_weights": identical,
        }
        for path in ("before", "after"):
            row[f"{path}_min_s"] = min(times[path])
            row[f"{path}_median_s"] = statistics.median(times[path])
            row[f"{path}_feature_scans"] = scans[path]
            row[f"{path}_times_s"] = times[path]
            row[f"{path}_cpu_min_s"] = min(cpu[path])
            row[f"{path}_cpu_median_s"] = statistics.median(cpu[path])
            row[f"{path}_cpu_s"] = cpu[path]
        row["speedup_median"] = row["before_median_s"] / row["after_median_s"]
        row["cpu_speedup_median"] = row["before_cpu_median_s"] / row["after_cpu_median_s"]
        rows.append(row)

    print(
        f"{'method':7} {'device':6} {'n x d':>12} {'T':>3} {'clock':5} "
        f"{'before min/med (s)':>19} {'after min/med (s)':>18} {'speedup':>8} "
        f"{'scans b/a':>9} same"
    )
    for r in rows:
        for clock, key in (("wall", ""), ("cpu", "cpu_")):
            print(
                f"{r['method']:7} {r['device']:6} {r['n']:>6} x {r['d']:<4} {r['steps']:>3} "
                f"{clock:5} {r[f'before_{key}min_s']:>9.3f}/{r[f'before_{key}median_s']:<9.3f} "
                f"{r[f'after_{key}min_s']:>8.3f}/{r[f'after_{key}median_s']:<9.3f} "
                f"{r[f'{key}speedup_median']:>6.2f}x {r['before_feature_scans']:>4}/"
                f"{r['after_feature_scans']:<4} {r['identical_weights']}"
            )

    write_json(
        args.out or results_path(f"validate_once_{device}.json"),
        {
            "benchmark": "validate_once",
            "commit": commit,
            "date": utc_now(),
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
            "rows": rows,
        },
    )
    return 0 if all(r["identical_weights"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
