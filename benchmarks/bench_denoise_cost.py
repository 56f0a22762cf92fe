"""Cost of the denoised solve against the Cholesky it replaces, per shape (batch K, order d).

    python benchmarks/bench_denoise_cost.py                    # CPU (NumPy/LAPACK)
    python benchmarks/bench_denoise_cost.py --device cuda      # GPU (CuPy: cuSOLVER)
    python benchmarks/bench_denoise_cost.py --shapes 1x768,100x768 --repeats 5

For each shape: a released-like batch ``G + Z`` (a Wishart gram plus symmetric noise),
timed as
* ``cholesky``: today's factorisation of ``M + reg I`` (:func:`dpfc_native.linalg.cholesky_repair`
  with the "eig" repair, as the estimators call it; the matrices are made positive
  definite by the ridge so no repair runs) plus ``cho_solve`` with K right-hand sides;
* ``eigh``: the float64 batched eigendecomposition alone;
* ``denoise=<m>``: :func:`dpfc_native.linalg.denoise_eigh` (eigh + shrinker) plus
  :func:`~dpfc_native.linalg.eigh_solve`.
Each is repeated and the min and median wall times are reported (the machine is shared).
Writes JSON next to the other results.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np
from _common import device_name, git_commit, results_path, utc_now, write_json

SHAPES = ["1x64", "1x128", "1x768", "1x1664", "10x768", "100x128", "100x768"]


def _timeit(fn, repeats, sync):
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return min(out), float(np.median(out))


def main():
    from dpfc_native import linalg, ops

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--methods", default="soft,rie")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device == "cuda":
        import cupy as xp

        def sync():
            xp.cuda.get_current_stream().synchronize()

        dev = device_name(xp)
    else:
        xp = np

        def sync():
            pass

        dev = f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs, shared)"
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'K x d':>10} {'what':>14} {'min s':>9} {'median s':>9} {'x cholesky':>10}")
    for shape in args.shapes.split(","):
        k, d = (int(v) for v in shape.split("x"))
        x = rng.standard_normal((k, 2 * d, d)) / math.sqrt(d)
        s = 1.0
        z = rng.standard_normal((k, d, d)) * (s / math.sqrt(2))
        a = np.einsum("kni,knj->kij", x, x) * d + (z + np.swapaxes(z, 1, 2)) / math.sqrt(2)
        reg = 2.0 * s * math.sqrt(2 * d)
        a = xp.asarray(a if k > 1 else a[0])
        b = xp.asarray(rng.standard_normal((k, d, 10) if k > 1 else (d, 10)))
        ridge = a + reg * xp.eye(d)

        def chol():
            L, _ = linalg.cholesky_repair(ridge, method="eig", floor=reg)
            return ops.cho_solve(L, b)

        t_chol = _timeit(chol, args.repeats, sync)
        res = {
            "cholesky": t_chol,
            "eigh": _timeit(lambda: linalg.batched_eigh(a.reshape(-1, d, d)), args.repeats, sync),
        }
        for m in args.methods.split(","):

            def den(m=m):
                w, v = linalg.denoise_eigh(a, s, m)
                return linalg.eigh_solve(w, v, reg / 2, b)

            res[f"denoise={m}"] = _timeit(den, args.repeats, sync)
        for what, (tmin, tmed) in res.items():
            print(
                f"{shape:>10} {what:>14} {tmin:9.4f} {tmed:9.4f} {tmin / t_chol[0]:10.1f}",
                flush=True,
            )
            rows.append(
                {
                    "k": k,
                    "d": d,
                    "what": what,
                    "min_s": tmin,
                    "median_s": tmed,
                    "ratio_to_cholesky": tmin / t_chol[0],
                }
            )
    write_json(
        args.out or results_path(f"denoise_cost_{args.device}_{utc_now()[:10]}.json"),
        {
            "benchmark": "denoise_cost",
            "date": utc_now(),
            "commit": git_commit(),
            "device": dev,
            "machine": platform.node(),
            "repeats": args.repeats,
            "rows": rows,
        },
        indent=1,
    )


if __name__ == "__main__":
    main()
