"""Runs each native GPU op once, warm, inside a profiler range, for Nsight Compute:

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats python3 benchmarks/profile_kernels.py

Each op is called once outside the range (module load, handles, allocator) and once inside
it, so the report holds one launch set per op. --only picks ops (comma list of the names
below). The shapes are smaller than the benchmarks' so the replayed passes stay short, but
large enough to fill the chip the way the benchmark shapes do.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    import cupy as cp

    from dpfc_native import ops

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", default="gram,weighted,noise,linear_grad,chol_small,chol_mid,solve")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    rng = cp.random.default_rng(0)

    def feats(n, d, dtype=cp.float32):
        return rng.standard_normal((n, d), dtype=cp.float32).astype(dtype)

    def spd(batch, d):
        a = rng.standard_normal((batch, d, d))
        return a @ a.transpose(0, 2, 1) / d + cp.eye(d)

    x768 = feats(200_000, 768) if only & {"gram", "weighted"} else None
    cases = {
        "gram": lambda: ops.clipped_gram(x768, 1.0),
        "weighted": lambda: ops.clipped_weighted_grams(
            x768[:50_000], rng.random((50_000, 20)), 1.0
        ),
        "noise": lambda: ops.sym_gaussian_noise(
            1024, 1.0, batch=64, key=1, dtype=np.float32, device="cuda"
        ),
    }
    if "linear_grad" in only:
        xl, w = feats(100_000, 1664), 0.01 * feats(1000, 1664)
        yl = cp.asarray(np.random.default_rng(1).integers(0, 1000, 100_000), dtype=cp.int32)
        cases["linear_grad"] = lambda: ops.clipped_linear_grad(xl, yl, w, 0.0, 1.0, loss="softmax")
    if "chol_small" in only:
        a64 = spd(10_000, 64)
        cases["chol_small"] = lambda: ops.cholesky(a64)
    if "chol_mid" in only:
        a256 = spd(1000, 256)
        cases["chol_mid"] = lambda: ops.cholesky(a256)
    if "solve" in only:
        L = cp.linalg.cholesky(spd(1, 1664)[0])
        b = rng.standard_normal((1664, 1000))
        cases["solve"] = lambda: ops.cho_solve(L, b)
    for name, fn in cases.items():
        if name not in only:
            continue
        fn()
        cp.cuda.Device().synchronize()
        print(f"== {name}", flush=True)
        cp.cuda.profiler.start()
        fn()
        cp.cuda.Device().synchronize()
        cp.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
