"""Benchmark of the clipped-statistics, noise and clipped-linear-gradient kernels against CuPy
(cuBLAS / cuRAND) doing the same job, with the measured ceilings of the device.

    python benchmarks/bench_stats.py            # full shapes (a few minutes on an H100)
    python benchmarks/bench_stats.py --quick    # small smoke run
    python benchmarks/bench_stats.py --out $OUT/bench_stats.json --only gram,noise

Rows (targets from the issue; "x" = speed-up base/ours unless said otherwise):
  clipped_gram     per mode, vs CuPy's clip pass + X.T @ X in the same precision: >= 1.5x.
                   TFLOP/s counts n d (d + 1); the ceiling is CuPy's GEMM rate on X.T @ X.
  clipped_stats    time / clipped_gram time: <= 1.05.
  sym_noise        batch 64, d = 1024: bytes written / s >= 0.70 x copy bandwidth
                   (copy bandwidth counts bytes read + written of a 1 GiB device copy).
  linear_grad      n = 1281167, d = 1664, K = 1000, float32: time <= 1.15 x the two CuPy GEMMs
                   it replaces, and >= 50x faster than CuPy materialising per-example gradients
                   in batches (timed on a few batches, extrapolated to n).
  newton_grams     n = 50000, d = 768, K = 100: >= 1.5x faster than CuPy's loop of K weighted
                   float64 matmuls.
Times are medians of CUDA-event timings after a warm-up; data are fresh random normals
generated on the device, one shape at a time, freed in between.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

import numpy as np

try:
    import cupy as cp
except ImportError:  # pragma: no cover
    print("bench_stats: CuPy is required", file=sys.stderr)
    raise

from _common import device_name, env_vars, git_commit, utc_now

from dpfc_native import _core
from dpfc_native import _gpu_stats as gs

MARGIN = float(_core.clip_margin)
KEY = (0x01234567, 0x89ABCDEF, 0xDEADBEEF, 0x0BADF00D)

_sumsq = cp.ReductionKernel("T x", "T y", "x * x", "a + b", "y = a", "0", "dpfc_bench_sumsq")


def sync():
    cp.cuda.get_current_stream().synchronize()


def free_all():
    sync()
    cp.get_default_memory_pool().free_all_blocks()


def time_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def features(n: int, d: int, dtype, clip_norm: float = 1.0):
    """Random rows with norms spread around clip_norm (about half clipped)."""
    x = cp.random.standard_normal((n, d), dtype=cp.float32)
    x *= cp.float32(clip_norm / math.sqrt(d)) * cp.random.uniform(
        0.3, 2.0, (n, 1), dtype=cp.float32
    )
    return x if np.dtype(dtype) == np.float32 else x.astype(dtype)


def clip_cupy(x, clip_norm: float, dtype):
    xx = x if x.dtype == np.dtype(dtype) else x.astype(dtype)
    norms = cp.sqrt(_sumsq(xx, axis=1))
    s = cp.minimum(1.0, (clip_norm * MARGIN) / cp.maximum(norms, 1e-300)).astype(dtype)
    return xx * s[:, None]


class Bench:
    def __init__(self, args):
        self.args = args
        self.rows = []
        self.reps = 3 if args.quick else args.reps
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        self.meta = {
            "device": device_name(cp),
            "sm_count": int(props["multiProcessorCount"]),
            "date": utc_now(),
            "commit": git_commit(),
            "quick": bool(args.quick),
            "env": {
                k: os.environ.get(k)
                for k in ("DPFC_GRAM_KERNEL", "DPFC_GRAD_KERNEL", "DPFC_LG_CHUNK")
            },
            "reps": self.reps,
        }
        self.ceil = {}

    # ---- bookkeeping -----------------------------------------------------------------
    def add(
        self,
        op,
        shape,
        mode,
        ours,
        base,
        target,
        rate=None,
        rate_unit="",
        ceiling=None,
        note="",
        ratio_kind="speedup",
    ):
        if ratio_kind == "speedup":
            ratio = base / ours if ours > 0 else float("nan")
            met = ratio >= target
            tstr = f">={target:g}x"
        elif ratio_kind == "fraction":  # ours / base must stay below target
            ratio = ours / base if base > 0 else float("nan")
            met = ratio <= target
            tstr = f"<={target:g}x"
        elif ratio_kind == "share":  # rate / ceiling must reach target
            ratio = rate / ceiling if ceiling else float("nan")
            met = ratio >= target
            tstr = f">={target:g}"
        else:  # "info": speed-up reported, no target
            ratio = base / ours if ours > 0 else float("nan")
            met = None
            tstr = "-"
        row = {
            "op": op,
            "shape": shape,
            "mode": mode,
            "ours_ms": ours,
            "base_ms": base,
            "ratio": ratio,
            "target": tstr,
            "met": None if met is None else bool(met),
            "rate": rate,
            "rate_unit": rate_unit,
            "ceiling": ceiling,
            "note": note,
        }
        self.rows.append(row)
        print(self.fmt(row), flush=True)
        self.save()

    def fail(self, op, shape, mode, err):
        row = {"op": op, "shape": shape, "mode": mode, "error": err}
        self.rows.append(row)
        print(f"{op:<14} {shape:<22} {mode:<16} ERROR {err}", flush=True)
        self.save()

    @staticmethod
    def fmt(r) -> str:
        def f(v, p=3):
            return "-" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))

        rate = "-" if r["rate"] is None else f"{r['rate']:.1f} {r['rate_unit']}"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        ceil = "-" if r["ceiling"] is None else f"{r['ceiling']:.1f}"
        return (
            f"{r['op']:<14} {r['shape']:<22} {r['mode']:<16} {f(r['ours_ms']):>10} "
            f"{f(r['base_ms']):>10} {f(r['ratio'], 2):>7} {r['target']:>8} "
            f"{met:>4} {rate:>16} {ceil:>9}  {r['note']}"
        )

    def header(self):
        print(
            f"{'op':<14} {'shape':<22} {'mode':<16} {'ours ms':>10} {'base ms':>10} "
            f"{'ratio':>7} {'target':>8} {'met':>4} {'rate':>16} {'ceiling':>9}",
            flush=True,
        )

    def save(self):
        if not self.args.out:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
        with open(self.args.out, "w") as fh:
            json.dump({"meta": self.meta, "ceilings": self.ceil, "rows": self.rows}, fh, indent=2)

    # ---- ceilings --------------------------------------------------------------------
    def ceilings(self):
        nbytes = (1 << 28) if self.args.quick else (1 << 30)
        src = cp.random.standard_normal(nbytes // 4, dtype=cp.float32)
        dst = cp.empty_like(src)
        t = time_ms(lambda: cp.copyto(dst, src), self.reps)
        self.ceil["copy_GBps"] = 2 * nbytes / t / 1e6
        src = dst = None
        m = 4096 if self.args.quick else 8192
        for name, dt in (("gemm_f32_TFLOPs", cp.float32), ("gemm_f64_TFLOPs", cp.float64)):
            a = cp.random.standard_normal((m, m)).astype(dt)
            b = cp.random.standard_normal((m, m)).astype(dt)
            t = time_ms(lambda: a @ b, self.reps)
            self.ceil[name] = 2 * m**3 / t / 1e9
            a = b = None
        free_all()
        print("ceilings: " + ", ".join(f"{k} = {v:.1f}" for k, v in self.ceil.items()), flush=True)
        self.save()

    # ---- clipped_gram and clipped_stats ------------------------------------------------
    def gram(self, shapes, stats: bool):
        reps = self.reps
        for n, d in shapes:
            for in_dtype, modes in (("float32", ("float64", "float32")), ("float64", ("float64",))):
                if in_dtype == "float64" and self.args.skip_f64_input:
                    continue
                shape = f"{n}x{d} {in_dtype[-2:]}in"
                try:
                    x = features(n, d, in_dtype)
                    labels = cp.random.randint(0, 1000, size=n).astype(cp.int32)
                    flops = n * d * (d + 1)
                    for mode in modes:
                        acc = cp.float64 if mode == "float64" else cp.float32
                        ours = time_ms(lambda: gs.clipped_gram(x, 1.0, mode), reps)
                        base = time_ms(lambda: (lambda xb: xb.T @ xb)(clip_cupy(x, 1.0, acc)), reps)
                        xb = clip_cupy(x, 1.0, acc)
                        gemm = time_ms(lambda: xb.T @ xb, reps)
                        xb = None
                        free_all()
                        self.add(
                            "clipped_gram",
                            shape,
                            mode,
                            ours,
                            base,
                            1.5,
                            rate=flops / ours / 1e9,
                            rate_unit="TFLOP/s",
                            ceiling=2 * n * d * d / gemm / 1e9,
                            note=f"cupy gemm {gemm:.1f} ms",
                        )
                        if (
                            mode == "float64"
                            and in_dtype == "float32"
                            and not self.args.no_variants
                        ):
                            # The other float64 engines, for the record (no target).
                            for kern in ("mma884", "simt"):
                                with env_vars(DPFC_GRAM_KERNEL=kern):
                                    tk = time_ms(lambda: gs.clipped_gram(x, 1.0, mode), reps)
                                self.add(
                                    "clipped_gram",
                                    shape,
                                    f"float64 [{kern}]",
                                    tk,
                                    base,
                                    0.0,
                                    rate=flops / tk / 1e9,
                                    rate_unit="TFLOP/s",
                                    ratio_kind="info",
                                    note="engine variant",
                                )
                        if stats:
                            st = time_ms(lambda: gs.clipped_stats(x, labels, 1000, 1.0, mode), reps)
                            self.add(
                                "clipped_stats",
                                shape,
                                mode + " K1000",
                                st,
                                ours,
                                1.05,
                                ratio_kind="fraction",
                                note="base = our clipped_gram",
                            )
                    if in_dtype == "float32" and not self.args.no_tc:
                        # Exploration modes: no target; the baseline is CuPy's FP32 clip + GEMM.
                        base32 = time_ms(
                            lambda: (lambda xb: xb.T @ xb)(clip_cupy(x, 1.0, cp.float32)), reps
                        )
                        for mode in ("tf32", "bf16"):
                            ours = time_ms(lambda: gs.clipped_gram(x, 1.0, mode), reps)
                            self.add(
                                "clipped_gram",
                                shape,
                                mode,
                                ours,
                                base32,
                                0.0,
                                rate=flops / ours / 1e9,
                                rate_unit="TFLOP/s",
                                ratio_kind="info",
                                note="exploration; base = cupy FP32",
                            )
                except cp.cuda.memory.OutOfMemoryError as exc:
                    self.fail("clipped_gram", shape, "-", f"out of memory: {exc}")
                except Exception as exc:  # keep going: record and continue
                    traceback.print_exc()
                    self.fail("clipped_gram", shape, "-", repr(exc))
                finally:
                    x = labels = None
                    free_all()

    # ---- noise -------------------------------------------------------------------------
    def noise(self, batch: int, d: int):
        copy = self.ceil.get("copy_GBps")
        for dt in (np.float32, np.float64):
            try:
                nbytes = batch * d * d * np.dtype(dt).itemsize
                out = cp.empty((batch, d, d), dtype=dt)
                ours = time_ms(lambda: gs._sym_noise_into(out, 1.0, KEY, 0), self.reps)

                def base():
                    z = cp.random.standard_normal((batch, d, d), dtype=dt)
                    return (z + z.transpose(0, 2, 1)) * dt(0.5)

                tb = time_ms(base, self.reps)
                self.add(
                    "sym_noise",
                    f"b{batch} d{d}",
                    np.dtype(dt).name,
                    ours,
                    tb,
                    0.70,
                    rate=nbytes / ours / 1e6,
                    rate_unit="GB/s",
                    ceiling=copy,
                    ratio_kind="share",
                    note=f"cuRAND+symmetrise {tb:.3f} ms",
                )
                flat = out.reshape(-1)
                og = time_ms(lambda: gs._gaussian_into(flat, 1.0, KEY, 0), self.reps)
                tg = time_ms(lambda: cp.random.standard_normal(flat.size, dtype=dt), self.reps)
                self.add(
                    "gauss_noise",
                    f"{flat.size}",
                    np.dtype(dt).name,
                    og,
                    tg,
                    0.70,
                    rate=nbytes / og / 1e6,
                    rate_unit="GB/s",
                    ceiling=copy,
                    ratio_kind="share",
                    note=f"cuRAND {tg:.3f} ms (no target)",
                )
                out = flat = None
            except Exception as exc:
                traceback.print_exc()
                self.fail("sym_noise", f"b{batch} d{d}", np.dtype(dt).name, repr(exc))
            finally:
                free_all()

    # ---- clipped linear gradient ---------------------------------------------------------
    def linear_grad(self, n: int, d: int, k: int, perex_batches: int):
        shape = f"{n}x{d} K{k}"
        try:
            x = features(n, d, "float32")
            labels = cp.random.randint(0, k, size=n).astype(cp.int32)
            w = cp.random.standard_normal((k, d), dtype=cp.float32) * 0.1
            bias = cp.full((k,), -10.0)
            grad = cp.empty((k, d))
            nclip = cp.empty((), dtype=cp.int64)
            ours = time_ms(
                lambda: gs._linear_grad_into(
                    x, labels, w, bias, 1e-3, "sigmoid", None, grad, nclip
                ),
                self.reps,
            )
            z = cp.empty((n, k), dtype=cp.float32)
            t1 = time_ms(lambda: cp.matmul(x, w.T, out=z), self.reps)
            t2 = time_ms(lambda: z.T @ x, self.reps)
            z = None
            free_all()
            flops = 4 * n * d * k
            self.add(
                "linear_grad",
                shape,
                "float32 sigmoid",
                ours,
                t1 + t2,
                1.15,
                rate=flops / ours / 1e9,
                rate_unit="TFLOP/s",
                ceiling=flops / (t1 + t2) / 1e9,
                ratio_kind="fraction",
                note=f"cuBLAS passes + native epilogue; base: 2 cupy GEMMs "
                f"({t1:.1f} + {t2:.1f} ms)",
            )
            if not self.args.no_variants:
                for engine, label in (
                    ("simt32", "f32 [native SIMT]"),
                    ("mma", "f32 [DMMA pass 2]"),
                ):
                    with env_vars(DPFC_GRAD_KERNEL=engine):
                        tv = time_ms(
                            lambda: gs._linear_grad_into(
                                x, labels, w, bias, 1e-3, "sigmoid", None, grad, nclip
                            ),
                            self.reps,
                        )
                    self.add(
                        "linear_grad",
                        shape,
                        label,
                        tv,
                        t1 + t2,
                        1.15,
                        rate=flops / tv / 1e9,
                        rate_unit="TFLOP/s",
                        ratio_kind="fraction",
                        note=f"DPFC_GRAD_KERNEL={engine} variant (all-native passes)",
                    )
            self.linear_grad_parts(x, labels, w, bias, n, d, k, shape, t1 + t2)
            # Per-example gradients materialised in batches (timed on a few, extrapolated).
            bsz = 128

            def perex(i):
                xb = x[i * bsz : (i + 1) * bsz]
                yb = labels[i * bsz : (i + 1) * bsz]
                p = 1.0 / (1.0 + cp.exp(-(xb @ w.T + bias.astype(cp.float32))))
                p[cp.arange(bsz), yb] -= 1.0
                r = p / k
                g = r[:, :, None] * xb[:, None, :]
                norms = cp.sqrt(_sumsq(g.reshape(bsz, -1), axis=1))
                c = cp.minimum(1.0, 1e-3 * MARGIN / cp.maximum(norms, 1e-30))
                return (g * c[:, None, None].astype(cp.float32)).sum(axis=0, dtype=cp.float64)

            perex(0)
            sync()
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            for i in range(perex_batches):
                perex(i)
            end.record()
            end.synchronize()
            tp = cp.cuda.get_elapsed_time(start, end) / perex_batches * (n / bsz)
            self.add(
                "linear_grad",
                shape,
                "vs per-example",
                ours,
                tp,
                50.0,
                note=f"cupy per-example, batches of {bsz}, extrapolated from "
                f"{perex_batches} batches",
            )
        except Exception as exc:
            traceback.print_exc()
            self.fail("linear_grad", shape, "-", repr(exc))
        finally:
            x = labels = w = None
            free_all()

    def linear_grad_parts(self, x, labels, w, bias, n, d, k, shape, base):
        """Where the cuBLAS path's time goes: each part timed on one chunk, times the number
        of chunks (the row norms over all rows), plus the float32 block-size variants."""
        core, st = gs._core(), gs._stream()
        nc = gs._lg_chunk_rows(n, k, d, 4)
        nch = -(-n // nc)
        xc = x[:nc]
        zc = cp.empty((nc, k), dtype=cp.float32)
        xs = cp.empty_like(xc)
        fb, norms = cp.empty(nc), cp.empty(n)
        cnt = cp.zeros((), dtype=cp.int64)
        blk = gs._LG_BLOCK
        nb = nc // blk
        parts = {
            "row norms": time_ms(
                lambda: core.cuda_row_norms(x.data.ptr, 0, n, d, d, 0.0, norms.data.ptr, 0, st),
                self.reps,
            ),
            "logits GEMM": nch * time_ms(lambda: cp.matmul(xc, w.T, out=zc), self.reps),
            "epilogue": nch
            * time_ms(
                lambda: core.cuda_residual_clip(
                    zc.data.ptr,
                    0,
                    nc,
                    k,
                    labels.data.ptr,
                    norms.data.ptr,
                    0,
                    bias.data.ptr,
                    1e-3,
                    "sigmoid",
                    fb.data.ptr,
                    cnt.data.ptr,
                    st,
                ),
                self.reps,
            ),
            "row scaling": nch
            * time_ms(
                lambda: core.cuda_scale_rows(
                    xc.data.ptr, 0, nc, d, d, fb.data.ptr, xs.data.ptr, d, st
                ),
                self.reps,
            ),
            f"grad GEMM ({blk}-row blocks + f64 sum)": nch
            * time_ms(
                lambda: cp.matmul(
                    zc[: nb * blk].reshape(nb, blk, k).transpose(0, 2, 1),
                    xs[: nb * blk].reshape(nb, blk, d),
                ).sum(axis=0, dtype=cp.float64),
                self.reps,
            ),
            "grad GEMM (one per chunk)": nch * time_ms(lambda: zc.T @ xs, self.reps),
        }
        total = sum(v for key, v in parts.items() if key != "grad GEMM (one per chunk)")
        self.add(
            "linear_grad",
            shape,
            "parts (cuBLAS path)",
            total,
            base,
            0.0,
            ratio_kind="info",
            note="; ".join(f"{key} {v:.1f}" for key, v in parts.items())
            + f" ms ({nch} chunks of {nc} rows)",
        )
        for b in (16384, nc):
            with env_vars(DPFC_LG_BLOCK=str(b)):
                tv = time_ms(
                    lambda: gs._linear_grad_into(
                        x,
                        labels,
                        w,
                        bias,
                        1e-3,
                        "sigmoid",
                        None,
                        cp.empty((k, d)),
                        cp.empty((), dtype=cp.int64),
                    ),
                    self.reps,
                )
            self.add(
                "linear_grad",
                shape,
                f"f32 blocks of {b}",
                tv,
                base,
                1.15,
                ratio_kind="fraction",
                note=f"DPFC_LG_BLOCK={b} variant",
            )

    # ---- Newton weighted grams -----------------------------------------------------------
    def newton(self, n: int, d: int, k: int):
        shape = f"{n}x{d} K{k}"
        try:
            x = features(n, d, "float32")
            wts = cp.random.uniform(0.0, 0.25, (n, k))
            ours = time_ms(lambda: gs.clipped_weighted_grams(x, wts, 1.0), self.reps)
            xb = clip_cupy(x, 1.0, cp.float64)
            out = cp.empty((k, d, d))

            def base():
                for cls in range(k):
                    cp.matmul((xb * wts[:, cls : cls + 1]).T, xb, out=out[cls])

            tb = time_ms(base, max(1, self.reps - 1))
            flops = k * n * d * (d + 1)
            self.add(
                "newton_grams",
                shape,
                "float64",
                ours,
                tb,
                1.5,
                rate=flops / ours / 1e9,
                rate_unit="TFLOP/s",
                ceiling=2 * k * n * d * d / tb / 1e9,
                note="base: K x (weighting + cupy DGEMM)",
            )
        except Exception as exc:
            traceback.print_exc()
            self.fail("newton_grams", shape, "-", repr(exc))
        finally:
            x = wts = xb = out = None
            free_all()


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--out", default=None, help="write JSON results here")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    ap.add_argument(
        "--only",
        default="gram,noise,linear_grad,newton",
        help="comma list of: gram, noise, linear_grad, newton",
    )
    ap.add_argument(
        "--skip-f64-input",
        action="store_true",
        help="skip float64-input gram rows (17 GB inputs at full size)",
    )
    ap.add_argument("--no-tc", action="store_true", help="skip the tf32/bf16 gram rows")
    ap.add_argument(
        "--no-variants",
        action="store_true",
        help="skip the engine-variant rows (mma884/simt grams, DMMA linear_grad)",
    )
    ap.add_argument(
        "--gram-kernel",
        choices=["mma", "mma884", "simt"],
        default=None,
        help="sets DPFC_GRAM_KERNEL for this run",
    )
    args = ap.parse_args(argv)
    if args.gram_kernel:
        from dpfc_native import _config

        os.environ["DPFC_GRAM_KERNEL"] = args.gram_kernel
        _config.reload()
    only = set(args.only.split(","))
    b = Bench(args)
    print(
        f"device: {b.meta['device']} ({b.meta['sm_count']} SMs), commit {b.meta['commit']}, "
        f"{'quick' if args.quick else 'full'} run",
        flush=True,
    )
    b.ceilings()
    b.header()
    if args.quick:
        gram_shapes = [(50000, 768), (20011, 257)]
        noise_shape = (8, 512)
        lg = (50000, 768, 100, 4)
        nw = (20000, 256, 20)
    else:
        gram_shapes = [(1281167, 1664), (1281167, 768), (50000, 768), (50000, 2048)]
        noise_shape = (64, 1024)
        lg = (1281167, 1664, 1000, 8)
        nw = (50000, 768, 100)
    if "gram" in only:
        b.gram(gram_shapes, stats=True)
    if "noise" in only:
        b.noise(*noise_shape)
    if "linear_grad" in only:
        b.linear_grad(*lg)
    if "newton" in only:
        b.newton(*nw)
    print("\nsummary:")
    b.header()
    for r in b.rows:
        if "error" in r:
            print(f"{r['op']:<14} {r['shape']:<22} {r['mode']:<16} ERROR {r['error']}")
        else:
            print(Bench.fmt(r))
    print("ceilings: " + ", ".join(f"{k} = {v:.1f}" for k, v in b.ceil.items()))
    b.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
