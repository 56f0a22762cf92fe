"""Benchmark: dpfc_native batched Cholesky / cho_solve vs CuPy (cuSOLVER / cuBLAS).

The kernel targets, each printed with its ratio and met yes/no:
  * small:  d <= 128, batch >= 1000: >= 3x faster than cupy.linalg.cholesky on the stacked
            batch (cuSOLVER potrfBatched);
  * mid:    d in {256, 512, 768, 1024, 1664}, batch in {16, 100, 1000 where it fits}:
            >= 1.5x faster than cupy.linalg.cholesky (potrfBatched);
  * single: batch 1, same d: within 1.1x of cupy.linalg.cholesky on one matrix (potrf);
  * solve:  K = 1000 right-hand sides: at least as fast as CuPy's two triangular solves
            (cupyx.scipy.linalg.solve_triangular, cuBLAS trsm);
plus informational rows: the per-class solve (K matrices, one right-hand side each, vs
batched trsm), the shift batch, and each blocked variant (schedule x update kernel).
Achieved TFLOP/s counts d^3/3 per factorisation (2 d^2 m per two-sided solve) and is
shown against the measured FP64 and FP32 GEMM rates and the copy bandwidth.

Usage: python benchmarks/bench_cholesky.py [--quick] [--out results.json] [--dtype float64]
Times are CUDA-event medians after warm-up; inputs rotate over several buffers so that
small problems are not timed out of L2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
from _common import device_name, env_vars, git_commit, utc_now


class Timer:
    def __init__(self, cp, budget_s: float, min_reps: int, max_reps: int, warmup: int):
        self.cp = cp
        self.budget_s = budget_s
        self.min_reps = min_reps
        self.max_reps = max_reps
        self.warmup = warmup

    def __call__(self, fn, args_for):
        """Median milliseconds of fn(*args_for(i)) timed with CUDA events."""
        cp = self.cp
        for i in range(self.warmup):
            fn(*args_for(i))
        cp.cuda.get_current_stream().synchronize()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        t0 = time.perf_counter()
        start.record()
        fn(*args_for(self.warmup))
        end.record()
        end.synchronize()
        first = cp.cuda.get_elapsed_time(start, end)
        wall = time.perf_counter() - t0
        reps = int(min(self.max_reps, max(self.min_reps, self.budget_s / max(wall, 1e-6))))
        times = [first]
        for i in range(reps - 1):
            args = args_for(self.warmup + 1 + i)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end))
        return float(statistics.median(times))


def _spd(cp, batch, d, dtype, seed):
    g = cp.random.default_rng(seed)
    # Random SPD with a moderate condition number, built in chunks (bounded memory).
    out = cp.empty((batch, d, d), dtype=dtype)
    chunk = max(1, int(2**28 // (8 * d * (d + 8))))
    for s in range(0, batch, chunk):
        e = min(batch, s + chunk)
        x = g.standard_normal((e - s, d + 8, d), dtype=cp.float64)
        a = cp.einsum("bni,bnj->bij", x, x) / (d + 8) + 0.05 * cp.eye(d)
        out[s:e] = a.astype(dtype)
    return out


def _rotation(cp, batch, d, dtype, seed, l2_bytes):
    """Enough input sets that the rotation exceeds twice the L2 (at most 4)."""
    size = batch * d * d * np.dtype(dtype).itemsize
    n = int(min(4, max(1, math.ceil(2 * l2_bytes / max(size, 1)))))
    return [_spd(cp, batch, d, dtype, seed + i) for i in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    ap.add_argument("--out", default=None, help="write JSON results here")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--no-variants", action="store_true", help="skip the per-variant rows")
    args = ap.parse_args(argv)

    import dpfc_native

    info = dpfc_native.build_info()
    if not info["cuda_compiled"] or info["cuda_devices"] == 0 or info["cupy"] is None:
        print("no CUDA build, no device or no CuPy:", info)
        return 1

    import cupy as cp
    import cupyx.scipy.linalg as cpx_linalg

    from dpfc_native import _gpu_linalg, linalg, ops

    dtype = np.dtype(args.dtype)
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    dev_name = device_name(cp)
    l2_bytes = int(props.get("l2CacheSize", 50 << 20))
    timer = Timer(
        cp,
        budget_s=0.05 if args.quick else 0.4,
        min_reps=3 if args.quick else 5,
        max_reps=10 if args.quick else 50,
        warmup=1 if args.quick else 2,
    )

    # ---- ceilings --------------------------------------------------------------------
    n_copy = (64 << 20) if args.quick else (512 << 20)
    src = cp.ones(n_copy // 8, dtype=cp.float64)
    dst = cp.empty_like(src)
    t = timer(cp.copyto, lambda i: (dst, src))
    copy_tbps = 2 * n_copy / (t * 1e-3) / 1e12
    gemm = {}
    for name, dt in (("fp64", cp.float64), ("fp32", cp.float32)):
        n = 2048 if args.quick else 8192
        x = cp.random.default_rng(1).standard_normal((n, n), dtype=cp.float64).astype(dt)
        y = cp.random.default_rng(2).standard_normal((n, n), dtype=cp.float64).astype(dt)
        t = timer(cp.matmul, lambda i: (x, y))
        gemm[name] = 2 * n**3 / (t * 1e-3) / 1e12
        x = y = None
    src = dst = None  # free before the next case
    print(
        f"device: {dev_name}   copy {copy_tbps:.2f} TB/s   GEMM fp64 {gemm['fp64']:.1f} TFLOP/s"
        f"   fp32 {gemm['fp32']:.1f} TFLOP/s   dtype {dtype}"
    )
    gemm_same = gemm["fp64"] if dtype == np.float64 else gemm["fp32"]

    rows = []

    def record(kind, d, batch, ours_ms, base_ms, target, flops, extra=None, *, faster_by=None):
        speed = base_ms / ours_ms if ours_ms > 0 else float("nan")
        if target == "info":
            met = None
        elif faster_by is not None:
            met = bool(speed >= faster_by)
        else:
            met = bool(ours_ms <= target * base_ms)
        tf = flops / (ours_ms * 1e-3) / 1e12
        row = dict(
            kind=kind,
            d=d,
            batch=batch,
            dtype=str(dtype),
            ours_ms=ours_ms,
            baseline_ms=base_ms,
            speedup=speed,
            target=(
                f">= {faster_by}x"
                if faster_by
                else ("info" if target == "info" else f"<= {target}x baseline time")
            ),
            met=met,
            tflops=tf,
            pct_gemm_same=100 * tf / gemm_same,
            pct_gemm_fp64=100 * tf / gemm["fp64"],
            plan=extra or "",
        )
        rows.append(row)
        flag = "-" if met is None else ("yes" if met else "NO")
        print(
            f"{kind:<14} d={d:<5} batch={batch:<6} ours {ours_ms:9.3f} ms  base {base_ms:9.3f} ms  "
            f"x{speed:6.2f} ({row['target']}: {flag})  {tf:6.2f} TF/s "
            f"({row['pct_gemm_same']:.0f}% GEMM)  {extra or ''}",
            flush=True,
        )
        save()

    def save():
        """Rewrite the JSON after every row: a killed run still leaves its results."""
        if not args.out:
            return
        result = dict(
            benchmark="bench_cholesky",
            device=dev_name,
            date=utc_now(),
            git_commit=git_commit(),
            cupy=cp.__version__,
            dpfc_native=dpfc_native.__version__,
            dtype=str(dtype),
            quick=args.quick,
            ceilings=dict(
                copy_tbps=copy_tbps, gemm_fp64_tflops=gemm["fp64"], gemm_fp32_tflops=gemm["fp32"]
            ),
            rows=rows,
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    def error(kind, d, batch, exc):
        rows.append(dict(kind=kind, d=d, batch=batch, dtype=str(dtype), error=repr(exc), met=None))
        print(f"{kind:<14} d={d:<5} batch={batch:<6} ERROR {exc!r}", flush=True)
        save()

    def fits(batch, d, copies=5):
        free, _ = dev.mem_info
        return batch * d * d * dtype.itemsize * copies < 0.8 * free

    def check_close(L, L_ref, what):
        # Relative agreement on the first matrix (both are backward-stable factors).
        a = cp.asnumpy(L.reshape(-1, L.shape[-2], L.shape[-1])[0]).astype(np.float64)
        b = cp.asnumpy(L_ref.reshape(-1, L.shape[-2], L.shape[-1])[0]).astype(np.float64)
        rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)
        tol = 1e-8 if dtype == np.float64 else 1e-2
        if not rel < tol:
            print(f"  WARNING {what}: ours and cupy differ, rel {rel:.2e}", flush=True)
        return float(rel)

    def factor_ms(inputs):
        """Median ms of ops.cholesky over the rotated inputs."""
        return timer(lambda a: ops.cholesky(a), lambda i: (inputs[i % len(inputs)],))

    def ours_vs_cupy(inputs, what):
        """(ours ms, cupy.linalg.cholesky ms) over the rotated inputs, after checking that the
        two factors of the first input agree."""
        t_ours = factor_ms(inputs)
        t_base = timer(lambda a: cp.linalg.cholesky(a), lambda i: (inputs[i % len(inputs)],))
        check_close(ops.cholesky(inputs[0])[0], cp.linalg.cholesky(inputs[0]), what)
        return t_ours, t_base

    def batched(kind, d, batch, seed, faster_by):
        """Time a rotated batch against CuPy and record it; (inputs, cupy ms)."""
        inputs = _rotation(cp, batch, d, dtype, seed, l2_bytes)
        t_ours, t_base = ours_vs_cupy(inputs, f"{kind} d={d}")
        record(
            kind,
            d,
            batch,
            t_ours,
            t_base,
            None,
            batch * d**3 / 3,
            _gpu_linalg.plan(batch, d, dtype),
            faster_by=faster_by,
        )
        return inputs, t_base

    # ---- small: d <= 128, batch >= 1000 ------------------------------------------------
    small = (
        [(32, 1000), (128, 1000)]
        if args.quick
        else [
            (8, 10000),
            (16, 10000),
            (32, 1000),
            (32, 10000),
            (64, 1000),
            (64, 10000),
            (100, 1000),
            (128, 1000),
            (128, 10000),
        ]
    )
    for d, batch in small:
        try:
            if not fits(batch, d):
                continue
            batched("small", d, batch, 10 + d, faster_by=3.0)
        except Exception as exc:  # record and go on: one failure must not hide the rest
            error("small", d, batch, exc)

    # ---- mid: batched blocked sizes ---------------------------------------------------
    mids = [256, 1024] if args.quick else [256, 512, 768, 1024, 1664]
    batches = [16] if args.quick else [16, 100, 1000]
    for d in mids:
        for batch in batches:
            try:
                if not fits(batch, d):
                    print(
                        f"mid            d={d:<5} batch={batch:<6} skipped: does not fit",
                        flush=True,
                    )
                    continue
                inputs, t_base = batched("mid", d, batch, 100 + d, faster_by=1.5)
                if not args.no_variants and not args.quick and batch in (16, 100):
                    variants = [
                        ("left", "mma"),
                        ("right", "mma"),
                        ("left", "simt"),
                        ("right", "simt"),
                    ]
                    if dtype != np.float64:
                        variants = [("left", "simt"), ("right", "simt")]
                    for sched, kern in variants:
                        with env_vars(DPFC_CHOL_SCHEDULE=sched, DPFC_CHOL_KERNEL=kern):
                            t_v = factor_ms(inputs)
                        record(
                            "variant",
                            d,
                            batch,
                            t_v,
                            t_base,
                            "info",
                            batch * d**3 / 3,
                            f"{sched}/{kern}",
                        )
                inputs = None
            except Exception as exc:  # record and go on: one failure must not hide the rest
                error("mid", d, batch, exc)

    # ---- single matrix: within 1.1x of potrf ------------------------------------------
    for d in mids:
        try:
            inputs = [x[0] for x in _rotation(cp, 1, d, dtype, 300 + d, l2_bytes)]
            t_ours, t_base = ours_vs_cupy(inputs, f"single d={d}")
            record("single", d, 1, t_ours, t_base, 1.1, d**3 / 3, _gpu_linalg.plan(1, d, dtype))
            if not args.no_variants and not args.quick:
                for sched, kern in (
                    [("left", "mma"), ("right", "mma"), ("right", "simt")]
                    if dtype == np.float64
                    else [("left", "simt"), ("right", "simt")]
                ):
                    with env_vars(DPFC_CHOL_SCHEDULE=sched, DPFC_CHOL_KERNEL=kern):
                        t_v = factor_ms(inputs)
                    record("variant", d, 1, t_v, t_base, "info", d**3 / 3, f"{sched}/{kern}")
        except Exception as exc:  # record and go on: one failure must not hide the rest
            error("single", d, 1, exc)

    # ---- solves with K = 1000 right-hand sides ----------------------------------------
    solve_ds = [256, 1024] if args.quick else [256, 512, 1024, 1664]
    m = 1000
    for d in solve_ds:
        try:
            L = cp.linalg.cholesky(_spd(cp, 1, d, dtype, 500 + d)[0])
            bs = [
                cp.random.default_rng(600 + i)
                .standard_normal((d, m), dtype=cp.float64)
                .astype(dtype)
                for i in range(3)
            ]

            def cupy_two(Lm, b):
                y = cpx_linalg.solve_triangular(Lm, b, lower=True)
                return cpx_linalg.solve_triangular(Lm, y, lower=True, trans="T")

            t_ours = timer(lambda b: ops.cho_solve(L, b), lambda i: (bs[i % 3],))
            t_base = timer(lambda b: cupy_two(L, b), lambda i: (bs[i % 3],))
            x1, x2 = ops.cho_solve(L, bs[0]), cupy_two(L, bs[0])
            rel = float(cp.linalg.norm(x1 - x2) / cp.linalg.norm(x2))
            record("solve K=1000", d, 1, t_ours, t_base, 1.0, 2 * d * d * m, f"rel diff {rel:.1e}")
        except Exception as exc:  # record and go on: one failure must not hide the rest
            error("solve K=1000", d, 1, exc)

    # ---- per-class solves: K matrices, one right-hand side each (informational) --------
    for d, k in [(256, 100)] if args.quick else [(256, 1000), (1024, 100), (1024, 1000)]:
        try:
            if not fits(k, d, copies=3):
                continue
            Ls = cp.linalg.cholesky(_spd(cp, k, d, dtype, 700 + d))
            b = cp.random.default_rng(7).standard_normal((k, d, 1), dtype=cp.float64).astype(dtype)

            def cupy_two_batched(Lm, bb):
                y = cpx_linalg.solve_triangular(Lm, bb, lower=True)
                return cpx_linalg.solve_triangular(Lm, y, lower=True, trans="T")

            t_ours = timer(ops.cho_solve, lambda i: (Ls, b))
            t_base = timer(cupy_two_batched, lambda i: (Ls, b))
            record(
                "solve per-class",
                d,
                k,
                t_ours,
                t_base,
                "info",
                2 * k * d * d,
                "trsmBatched baseline",
            )
            Ls = b = None
        except Exception as exc:  # record and go on: one failure must not hide the rest
            error("solve per-class", d, k, exc)

    # ---- shift batch (informational) --------------------------------------------------
    for d, nshift in [(256, 20)] if args.quick else [(512, 100), (1024, 100)]:
        try:
            a = _spd(cp, 1, d, dtype, 800 + d)[0]
            shifts = cp.logspace(-4, 1, nshift).astype(dtype)
            eye = cp.eye(d, dtype=dtype)
            t_ours = timer(lambda: linalg.cholesky_shifts(a, shifts), lambda i: ())
            t_base = timer(
                lambda: cp.linalg.cholesky(a[None] + shifts[:, None, None] * eye), lambda i: ()
            )
            record(
                "shifts",
                d,
                nshift,
                t_ours,
                t_base,
                "info",
                nshift * d**3 / 3,
                "vs stack + potrfBatched",
            )
        except Exception as exc:  # record and go on: one failure must not hide the rest
            error("shifts", d, nshift, exc)

    # ---- summary ----------------------------------------------------------------------
    targets = [r for r in rows if r["met"] is not None]
    print()
    print(
        f"{'kind':<14}{'d':>6}{'batch':>8}{'ours ms':>11}{'base ms':>11}{'ratio':>8}"
        "  target            met  TF/s"
    )
    for r in targets:
        print(
            f"{r['kind']:<14}{r['d']:>6}{r['batch']:>8}{r['ours_ms']:>11.3f}{r['baseline_ms']:>11.3f}"
            f"{r['speedup']:>8.2f}  {r['target']:<18}{'yes' if r['met'] else 'NO ':<5}"
            f"{r['tflops']:.2f}"
        )
    print(f"targets met: {sum(r['met'] for r in targets)} / {len(targets)}")

    errors = [r for r in rows if "error" in r]
    if errors:
        print(
            f"errors: {len(errors)} case(s): "
            + ", ".join(f"{r['kind']} d={r['d']}" for r in errors)
        )
    save()
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
