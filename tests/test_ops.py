"""The clipping and clipped-statistics ops (dpfc_native.ops; CPU bodies in _cpu_stats,
GPU glue in _gpu_stats) against float64 references, one body per op on every backend.

Each test runs on NumPy and, with ``-m gpu`` on a machine with a device, on CuPy
(``xp``; cases from tests/_reference.py: xp_cases, the CPU cases first, then the GPU's,
whose sizes reach the kernels' tiles and blocks). Data are fresh random draws (never
zeros) of odd sizes, outputs are NaN-poisoned before the ops write them (``poisoned``),
and errors are measured against float64 references relative to the matching sum of
absolute products (so cancellation cannot hide or fake an error):

  float64 accumulation: 1e-12; float32: 1e-5 plus the documented elementwise bound;
  tf32 / bf16 (GPU): the documented bound (tests/_reference.py: check_gram).
  clipped linear gradient: 1e-11 (float64, and float32 features on the CPU, which
  computes in float64); 5e-4 for float32 on the GPU (float32 logits), clipped-row counts
  exact, or within max(1, n / 1000) for float32 on the GPU.

Engine agreement, raw kernel calls, bfloat16 bit patterns and streams are GPU-only facts:
tests/test_gpu_only.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from _reference import (
    EPS32,
    GPU_GRAM_SHAPES,
    assert_all_written,
    check_gram,
    draw_features,
    draw_labels,
    ref_class_sums,
    ref_gram,
    ref_linear_grad,
    ref_norms,
    reference_clip64,
    rel_err,
    to_host,
    xp_cases,
)

from dpfc_native import ops

F32, F64, F16 = "float32", "float64", "float16"
CPU_DIMS = [1, 7, 64, 130]
CPU_NS = [1, 5, 1001, 4099]  # 4099 > the float32 block of 4096 rows


def _on_gpu(xp) -> bool:
    return xp is not np


# --------------------------------------------------------------------------------------
# clip_rows
# --------------------------------------------------------------------------------------

CLIP_CASES = xp_cases(
    cpu=[(dt, 1001, d) for dt in (F32, F64) for d in CPU_DIMS],
    gpu=[
        (dt, n, d)
        for dt in (F32, F64)
        for n, d in [(1, 1), (1, 257), (31, 7), (31, 1000), (100003, 64)]
    ],
)


@pytest.mark.parametrize("xp,dtype,n,d", CLIP_CASES, indirect=["xp"])
def test_clip_rows_matches_reference(poisoned, xp, rng, dtype, n, d):
    clip_norm = float(rng.uniform(0.5, 2.0))
    x = draw_features(rng, n, d, clip_norm, dtype)
    xd = xp.asarray(x)
    out, scale = ops.clip_rows(xd, clip_norm)
    np.testing.assert_array_equal(to_host(xd), x)  # the input is never modified
    out_h, scale_h = to_host(out), to_host(scale)
    assert out_h.dtype == np.dtype(dtype) and out_h.shape == x.shape and scale_h.dtype == np.float64
    assert_all_written(out_h, "clipped rows")
    ref, ref_s = reference_clip64(x, clip_norm)
    np.testing.assert_allclose(scale_h, ref_s, rtol=5e-14 if _on_gpu(xp) else 1e-14, atol=0)
    if _on_gpu(xp):
        tol = 2 * EPS32 if dtype == F32 else 5e-14
    else:
        tol = 4 * np.finfo(dtype).eps
    np.testing.assert_allclose(out_h.astype(np.float64), ref, rtol=tol, atol=1e-300)
    assert (ref_norms(out_h.astype(np.float64)) < clip_norm).all()
    if n > 30:
        assert 0 < np.count_nonzero(scale_h < 1) < n


@pytest.mark.parametrize(
    "xp", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)], indirect=True
)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_clipping_soundness_adversarial_rows(xp, dtype, rng):
    d = 257
    clip_norm = 1.7
    rows = []
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    rows.append(u * clip_norm)  # norm exactly C (as stored)
    rows.append(u * clip_norm * (1 + 1e-7))  # just above C
    rows.append(u * clip_norm * (1 - 1e-7))  # just below C
    rows.append(np.full(d, clip_norm / np.sqrt(d)))  # constant row of norm C
    rows.append(u * 1e30)  # huge (float32 max ~3e38)
    rows.append(np.full(d, 1e-40 if dtype == F32 else 5e-324))  # denormals
    rows.append(np.zeros(d))  # zero row: scale 1
    rows.append(rng.standard_normal(d) * 1e3)
    if dtype == F64:
        rows.append(u * 1e200)  # sum of squares overflows
        rows.append(np.full(d, 1e300))
    x = np.array(rows).astype(dtype)
    out, scale = ops.clip_rows(xp.asarray(x), clip_norm)
    out_h, scale_h = to_host(out).astype(np.float64), to_host(scale)
    assert np.isfinite(out_h).all() and np.isfinite(scale_h).all()
    norms = ref_norms(out_h)
    assert (norms < clip_norm).all(), f"clipped norms {norms.max()} >= C = {clip_norm}"
    assert scale_h[6] == 1.0 and scale_h[5] == 1.0
    # The Gram of the same rows is finite and its trace (sum of squared norms) < n C^2.
    g = to_host(ops.clipped_gram(xp.asarray(x), clip_norm))
    assert np.isfinite(g).all()
    assert np.trace(g) < x.shape[0] * clip_norm**2


# --------------------------------------------------------------------------------------
# clipped_gram
# --------------------------------------------------------------------------------------

GRAM_CASES = xp_cases(
    cpu=[
        (n, d, dt, mode)
        for n in CPU_NS
        for d in CPU_DIMS
        for dt in (F32, F64)
        for mode in ("float64", "float32")
    ]
    + [(4099, d, F16, mode) for d in (1, 7, 130) for mode in ("float64", "float32")],
    gpu=[
        (n, d, dt, mode)
        for n, d in GPU_GRAM_SHAPES
        for dt in (F32, F64, F16)
        for mode in ("float64", "float32", "tf32", "bf16")
    ],
)


@pytest.mark.parametrize("xp,n,d,dtype,mode", GRAM_CASES, indirect=["xp"])
def test_clipped_gram(poisoned, xp, rng, n, d, dtype, mode):
    clip_norm = float(rng.uniform(0.5, 2.0))
    x = draw_features(rng, n, d, clip_norm, dtype)
    g = to_host(ops.clipped_gram(xp.asarray(x), clip_norm, accumulate=mode))
    ref, absref = ref_gram(reference_clip64(x, clip_norm)[0])
    check_gram(g, ref, absref, mode)
    if not _on_gpu(xp):  # the CPU's own bound: float64 dot / float32 blocks, vs n C^2
        assert np.abs(g - ref).max() <= (1e-13 if mode == "float64" else 1e-5) * n * clip_norm**2


@pytest.mark.parametrize(
    "xp", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)], indirect=True
)
def test_gram_strided_and_noncontiguous_inputs(xp, rng):
    n, d = 3001, 130
    clip_norm = 1.3
    x = draw_features(rng, n, d, clip_norm, F64)
    ref, absref = ref_gram(reference_clip64(x, clip_norm)[0])
    # Row stride > d, used in place.
    wide = xp.full((n, d + 13), np.nan)
    wide[:, :d] = xp.asarray(x)
    view = wide[:, :d]
    assert view.strides[0] == (d + 13) * 8
    assert rel_err(ops.clipped_gram(view, clip_norm), ref, absref) <= 1e-12
    # Every other row of a taller array.
    tall = xp.full((2 * n, d), np.nan)
    tall[::2] = xp.asarray(x)
    assert rel_err(ops.clipped_gram(tall[::2], clip_norm), ref, absref) <= 1e-12
    # Element stride != 1 (Fortran order; and strided in both dimensions).
    xt = xp.asfortranarray(xp.asarray(x))
    assert xt.strides[1] != 8
    assert rel_err(ops.clipped_gram(xt, clip_norm), ref, absref) <= 1e-12
    both = xp.asarray(x)[::2, ::3]
    ref2, absref2 = ref_gram(reference_clip64(x[::2, ::3], clip_norm)[0])
    assert rel_err(ops.clipped_gram(both, clip_norm), ref2, absref2) <= 1e-12


# --------------------------------------------------------------------------------------
# Class sums and one-pass statistics
# --------------------------------------------------------------------------------------

GPU_CLASS_CASES = [
    (1, 7, 1),
    (31, 7, 3),
    (31, 130, 10),
    (31, 1000, 100),
    (3001, 130, 100),
    (100003, 64, 1),
    (100003, 130, 10),
    (20011, 257, 3),
]
CLASS_SUM_CASES = xp_cases(
    cpu=[(1003, d, k, F32) for d in CPU_DIMS for k in (1, 3, 10)],
    gpu=[(n, d, k, dt) for n, d, k in GPU_CLASS_CASES for dt in (F32, F64)],
)  # float16 rows: the public op takes float32/float64; clipped_stats' B covers float16


@pytest.mark.parametrize("xp,n,d,k,dtype", CLASS_SUM_CASES, indirect=["xp"])
def test_clipped_class_sums(poisoned, xp, rng, n, d, k, dtype):
    clip_norm = float(rng.uniform(0.5, 2.0))
    x = draw_features(rng, n, d, clip_norm, dtype)
    labels = draw_labels(rng, n, k)
    b = to_host(ops.clipped_class_sums(xp.asarray(x), xp.asarray(labels), k, clip_norm))
    assert b.shape == (k, d) and b.dtype == np.float64
    assert_all_written(b, "B")
    ref, absref = ref_class_sums(reference_clip64(x, clip_norm)[0], labels, k)
    assert rel_err(b, ref, absref) <= 1e-12
    np.testing.assert_allclose(b, ref, rtol=0, atol=1e-12 * n * clip_norm)
    absent = np.bincount(labels, minlength=k) == 0
    assert (b[absent] == 0).all(), "a class that never occurs has an exactly zero sum"


STATS_CASES = xp_cases(
    cpu=[(1003, d, k, F32, "float64") for d in CPU_DIMS for k in (1, 3, 10)]
    + [(4099, d, 3, F16, mode) for d in (1, 7, 130) for mode in ("float64", "float32")],
    gpu=[
        (n, d, k, dt, mode)
        for n, d, k in GPU_CLASS_CASES
        for dt in (F32, F64, F16)
        for mode in ("float64", "float32", "tf32")
    ],
)


@pytest.mark.parametrize("xp,n,d,k,dtype,mode", STATS_CASES, indirect=["xp"])
def test_clipped_stats(poisoned, xp, rng, n, d, k, dtype, mode):
    clip_norm = float(rng.uniform(0.5, 2.0))
    x = draw_features(rng, n, d, clip_norm, dtype)
    labels = draw_labels(rng, n, k)
    xd, ld = xp.asarray(x), xp.asarray(labels)
    g, b, counts = ops.clipped_stats(xd, ld, k, clip_norm, accumulate=mode)
    g, b, counts = to_host(g), to_host(b), to_host(counts)
    xb = reference_clip64(x, clip_norm)[0]
    ref, absref = ref_gram(xb)
    check_gram(g, ref, absref, mode)
    assert_all_written(b, "B")
    ref_b, abs_b = ref_class_sums(xb, labels, k)
    assert rel_err(b, ref_b, abs_b) <= 1e-12
    np.testing.assert_allclose(b, ref_b, rtol=0, atol=1e-12 * n * clip_norm)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=k))
    # The one pass agrees with the separate ops (same scales, same arithmetic).
    g_sep = to_host(ops.clipped_gram(xd, clip_norm, accumulate=mode))
    if _on_gpu(xp):
        assert rel_err(g, g_sep, absref) <= (1e-14 if mode == "float64" else 1e-3)
    else:
        np.testing.assert_array_equal(g, g_sep)
    if dtype != F16:  # clipped_class_sums takes float32/float64 rows
        b_sep = to_host(ops.clipped_class_sums(xd, ld, k, clip_norm))
        assert rel_err(b, b_sep, abs_b) <= 1e-14


# --------------------------------------------------------------------------------------
# Per-class and weighted grams (the GPU cases also force each Gram engine)
# --------------------------------------------------------------------------------------

CLASS_GRAM_CASES = xp_cases(
    cpu=[
        (n, d, k, F64, "auto") for n, d, k in [(517, 1, 4), (517, 7, 4), (517, 33, 4), (50, 5, 3)]
    ],
    gpu=[
        (n, d, k, dt, kernel)
        for n, d, k in [
            (1, 7, 1),
            (31, 7, 3),
            (31, 130, 10),
            (3001, 130, 3),
            (3001, 257, 10),
            (20011, 64, 100),
            (100003, 64, 1),
        ]
        for dt in (F32, F64)
        for kernel in ("mma", "simt")
    ],
)


@pytest.mark.parametrize("xp,n,d,k,dtype,kernel", CLASS_GRAM_CASES, indirect=["xp"])
def test_clipped_class_grams(poisoned, xp, rng, kernel_env, n, d, k, dtype, kernel):
    if kernel != "auto":
        kernel_env(DPFC_GRAM_KERNEL=kernel)
    clip_norm = float(rng.uniform(0.5, 2.0))
    x = draw_features(rng, n, d, clip_norm, dtype)
    labels = draw_labels(rng, n, k)  # the last class is empty when k > 2
    got = to_host(ops.clipped_class_grams(xp.asarray(x), xp.asarray(labels), k, clip_norm))
    assert got.shape == (k, d, d) and got.dtype == np.float64
    assert_all_written(got, "A")
    xb = reference_clip64(x, clip_norm)[0]
    for cls in range(k):
        rows = xb[labels == cls]
        if rows.shape[0] == 0:
            np.testing.assert_array_equal(got[cls], 0.0)
        else:
            ref, absref = ref_gram(rows)
            assert rel_err(got[cls], ref, absref) <= 1e-12, f"class {cls}"
            np.testing.assert_allclose(got[cls], ref, rtol=0, atol=1e-12 * n * clip_norm**2)
        np.testing.assert_array_equal(got[cls], got[cls].T)


WEIGHTED_CASES = xp_cases(
    cpu=[(517, d, 4, F64, F64, "auto") for d in (1, 7, 33)],
    gpu=[
        (n, d, k, F32, wdt, kernel)
        for n, d, k in [
            (1, 7, 1),
            (31, 7, 3),
            (31, 130, 10),
            (2001, 130, 3),
            (2001, 257, 10),
            (50003, 64, 4),
        ]
        for kernel in ("mma", "simt")
        for wdt in (F32, F64)
    ],
)


@pytest.mark.parametrize("xp,n,d,k,dtype,wdtype,kernel", WEIGHTED_CASES, indirect=["xp"])
def test_clipped_weighted_grams(poisoned, xp, rng, kernel_env, n, d, k, dtype, wdtype, kernel):
    if kernel != "auto":
        kernel_env(DPFC_GRAM_KERNEL=kernel)
    clip_norm = float(rng.uniform(0.5, 2.0))
    x = draw_features(rng, n, d, clip_norm, dtype)
    w = rng.uniform(0.0, 0.25, size=(n, k)).astype(wdtype)
    got = to_host(ops.clipped_weighted_grams(xp.asarray(x), xp.asarray(w), clip_norm))
    assert got.shape == (k, d, d) and got.dtype == np.float64
    assert_all_written(got, "H")
    xb = reference_clip64(x, clip_norm)[0]
    w64 = w.astype(np.float64)
    for cls in range(k):
        ref = (xb * w64[:, cls : cls + 1]).T @ xb
        absref = (np.abs(xb) * w64[:, cls : cls + 1]).T @ np.abs(xb)
        assert rel_err(got[cls], ref, absref) <= 1e-12, f"class {cls}"
        np.testing.assert_allclose(got[cls], ref, rtol=0, atol=1e-12 * n * clip_norm**2)


# --------------------------------------------------------------------------------------
# Clipped linear gradient
# --------------------------------------------------------------------------------------

LINEAR_GRAD_CASES = xp_cases(
    cpu=[
        (301, d, k, dt, loss, fc)
        for d, k in [(1, 1), (7, 3), (64, 10), (130, 5)]
        for dt in (F32, F64)
        for loss in ("sigmoid", "softmax")
        for fc in (None, 0.8)
    ],
    gpu=[
        (n, d, k, dt, loss, fc)
        for n, d, k in [
            (1, 7, 1),
            (31, 7, 3),
            (31, 130, 10),
            (5003, 130, 100),
            (20011, 257, 10),
            (3001, 1000, 3),
        ]
        for dt in (F32, F64)
        for loss in ("sigmoid", "softmax")
        for fc in (None, 0.8)
    ],
)


@pytest.mark.parametrize("xp,n,d,k,dtype,loss,feature_clip", LINEAR_GRAD_CASES, indirect=["xp"])
def test_clipped_linear_grad(poisoned, xp, rng, n, d, k, dtype, loss, feature_clip):
    x = draw_features(rng, n, d, float(rng.uniform(0.5, 2.0)), dtype)
    x64 = x.astype(np.float64)
    labels = rng.integers(0, k, size=n)
    w = (rng.standard_normal((k, d)) * 0.5).astype(dtype)
    bias = rng.uniform(-2, 2, size=k)
    # Clip bound near the median gradient norm: about half the rows are clipped.
    ratio = ref_linear_grad(x64, labels, w.astype(np.float64), bias, 1.0, loss, feature_clip)[3]
    # (1 + 1e-7): no row sits within rounding of the bound, so float64 counts are exact.
    clip_norm = (float(np.median(ratio)) if n > 1 else float(ratio[0]) * 0.5) * (1 + 1e-7)
    if not clip_norm > 0:  # softmax with K = 1: every residual is 0
        clip_norm = 1.0
    ref, absref, ref_clipped, _ = ref_linear_grad(
        x64, labels, w.astype(np.float64), bias, clip_norm, loss, feature_clip
    )
    grad, n_clipped = ops.clipped_linear_grad(
        xp.asarray(x),
        xp.asarray(labels),
        xp.asarray(w),
        xp.asarray(bias),
        clip_norm,
        loss=loss,
        feature_clip=feature_clip,
    )
    got = to_host(grad)
    assert got.shape == (k, d) and got.dtype == np.float64
    assert_all_written(got, "grad")
    err = rel_err(got, ref, absref)
    if dtype == F32 and _on_gpu(xp):  # float32 logits on the GPU
        assert err <= 5e-4, f"float32 relative error {err:.3e}"
        assert abs(int(n_clipped) - ref_clipped) <= max(1, n // 1000)
    else:
        assert err <= 1e-11, f"relative error {err:.3e}"
        assert int(n_clipped) == ref_clipped


# --------------------------------------------------------------------------------------
# Validation, device rules, chunking (backend-independent Python)
# --------------------------------------------------------------------------------------


def test_validation_names_the_argument(rng):
    x = rng.standard_normal((10, 3))
    y = rng.integers(0, 2, 10)
    with pytest.raises(ValueError, match="clip_norm"):
        ops.clipped_gram(x, 0.0)
    with pytest.raises(ValueError, match="clip_norm"):
        ops.clipped_gram(x, float("nan"))
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.clipped_gram(x[0], 1.0)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.clipped_gram(x.astype(np.int64), 1.0)
    bad = x.copy()
    bad[4, 1] = np.inf
    with pytest.raises(ValueError, match="x contains NaN or Inf .first at row 4"):
        ops.clipped_gram(bad, 1.0)
    with pytest.raises(ValueError, match="labels must lie"):
        ops.clipped_class_sums(x, y + 1, 2, 1.0)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        ops.clipped_class_sums(x, y.astype(float), 2, 1.0)
    with pytest.raises(ValueError, match="accumulate"):
        ops.clipped_gram(x, 1.0, accumulate="float16")
    with pytest.raises(ValueError, match="x is empty"):
        ops.clipped_gram(np.zeros((0, 3)), 1.0)
    with pytest.raises(ValueError, match="loss"):
        ops.clipped_linear_grad(x, y, np.zeros((2, 3)), 0.0, 1.0, loss="hinge")
    with pytest.raises(ValueError, match="a must have shape"):
        ops.cholesky(np.zeros((3, 4)))


def test_mixed_devices_rejected():
    class FakeDeviceArray:
        __cuda_array_interface__ = {
            "shape": (2, 2),
            "typestr": "<f8",
            "data": (0, False),
            "version": 3,
        }

    with pytest.raises(ValueError, match="mixed devices"):
        ops.array_module(np.zeros(2), FakeDeviceArray())


def test_device_of_is_the_one_device_rule():
    """ops.device_of decides where arrays live; mechanisms and models ask it too."""
    from dpfc_native import mechanisms, models

    class FakeDeviceArray:
        __cuda_array_interface__ = {
            "shape": (2,),
            "typestr": "<f8",
            "data": (0, False),
            "version": 3,
        }

    assert ops.device_of(np.zeros(2), None, [1.0]) == "cpu"
    assert ops.device_of() == "cpu"
    assert ops.device_of(FakeDeviceArray(), None) == "cuda"
    with pytest.raises(ValueError, match="mixed devices"):
        ops.device_of(np.zeros(2), FakeDeviceArray())
    assert not hasattr(mechanisms, "_device_of")
    assert models.resolve_device("cpu", FakeDeviceArray()) == "cpu"


def test_arrays_on_different_gpus_are_refused():
    """A GPU call's arrays must share one device: a kernel launched on x's device read a
    label or weight array living on another GPU through its pointer. Device ordinals come
    from DLPack (CuPy's too); stand-ins on devices 0 and 1 check the rule on the CPU."""

    class OnGpu:
        __cuda_array_interface__ = {"shape": (2,), "typestr": "<f8", "data": (0, False)}

        def __init__(self, ordinal):
            self.ordinal = ordinal

        def __dlpack_device__(self):
            return (2, self.ordinal)  # kDLCUDA, device ordinal

    assert ops.device_of(OnGpu(1), OnGpu(1), None) == "cuda"
    assert ops.device_of(OnGpu(0)) == "cuda"
    with pytest.raises(ValueError, match=r"different GPUs \(devices \[0, 1\]\)"):
        ops.device_of(OnGpu(0), OnGpu(1))
    with pytest.raises(ValueError, match="different GPUs"):
        ops.clipped_class_sums(OnGpu(0), OnGpu(1), 2, 1.0)


def test_memory_is_chunked(monkeypatch, rng):
    """clipped_gram never converts more than one chunk of rows at a time."""
    seen = []
    from dpfc_native import _cpu_stats

    original = _cpu_stats._clipped_chunk

    def spy(x, sl, c):
        out = original(x, sl, c)
        seen.append(out[0].shape[0])
        return out

    monkeypatch.setattr(_cpu_stats, "_CHUNK_ELEMENTS", 64 * 5)
    monkeypatch.setattr(_cpu_stats, "_clipped_chunk", spy)
    x = rng.standard_normal((1000, 5))
    xb, _ = reference_clip64(x, 1.0)
    np.testing.assert_allclose(ops.clipped_gram(x, 1.0), xb.T @ xb, atol=1e-12)
    assert max(seen) == 64 and sum(seen) == 1000


@pytest.mark.parametrize(
    "env,tf32,want",
    [
        (None, False, "cublas"),
        ("auto", False, "cublas"),
        ("cublas", False, "cublas"),
        (None, True, "native"),
        ("simt32", False, "native"),
        ("mma", True, "native"),
    ],
)
def test_gpu_grad_engine_choice(monkeypatch, kernel_env, env, tf32, want):
    """The clipped gradient runs its GEMMs on cuBLAS unless CuPy would use TF32 there (which
    rounds the clipped per-example terms) or a native engine is asked for."""
    from dpfc_native import _gpu_stats

    monkeypatch.setattr(_gpu_stats, "_tf32_matmul", lambda: tf32)
    if env is None:
        kernel_env(DPFC_GRAD_KERNEL=None)
    else:
        kernel_env(DPFC_GRAD_KERNEL=env)
    assert _gpu_stats._grad_engine(np.float32) == want
    # float64 features never go through TF32.
    assert _gpu_stats._grad_engine(np.float64) == (
        "native" if env in ("simt32", "mma") else "cublas"
    )


def test_gpu_grad_engine_refuses_tf32_and_unknown_names(monkeypatch, kernel_env):
    from dpfc_native import _gpu_stats

    monkeypatch.setattr(_gpu_stats, "_tf32_matmul", lambda: True)
    kernel_env(DPFC_GRAD_KERNEL="cublas")
    with pytest.raises(ValueError, match="TF32"):
        _gpu_stats._grad_engine(np.float32)
    kernel_env(DPFC_GRAD_KERNEL="tensorcore")
    with pytest.raises(ValueError, match="DPFC_GRAD_KERNEL"):
        _gpu_stats._grad_engine(np.float32)


@pytest.mark.parametrize(
    "n,k,d,item,want",
    [
        (1_281_167, 1000, 1664, 4, 32768),  # the logits budget binds, a multiple of 4096
        (1_281_167, 10, 768, 4, 86016),  # the scaled-rows budget binds
        (5003, 100, 130, 4, 5003),  # all rows in one chunk
        (10**6, 10**6, 8, 8, 128),  # at least 128 rows
    ],
)
def test_gpu_grad_chunk_rows(kernel_env, n, k, d, item, want):
    from dpfc_native import _gpu_stats

    kernel_env(DPFC_LG_CHUNK=None)
    assert _gpu_stats._lg_chunk_rows(n, k, d, item) == want
    kernel_env(DPFC_LG_CHUNK="777")
    assert _gpu_stats._lg_chunk_rows(n, k, d, item) == min(777, n)
