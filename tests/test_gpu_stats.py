"""GPU kernels of clipping, clipped statistics, noise and the clipped linear gradient
(csrc/cuda/{stats,noise,linear_grad}.cu) against float64 NumPy references written here.

Every test is marked ``gpu`` and skipped without a CUDA build, a device and CuPy
(tests/conftest.py). Data are fresh random draws (never zeros), sizes are odd (d not a
multiple of any tile, n = 1, 31, 100003), outputs are poisoned with NaN before the kernels
write them, and errors are measured against float64 references relative to the matching
sum of absolute products (so cancellation cannot hide or fake an error).

Tolerances (relative, Frobenius, against |Xbar|^T |Xbar| or the analogous absolute sums):
  float64 accumulation: 1e-12 (expected ~1e-14: sqrt(n) float64 roundings).
  float32 accumulation: 1e-5, plus the documented elementwise worst case
      |G - G_ref| <= (4096 + 8) * 2**-24 * (|Xbar|^T |Xbar|).
  tf32 / bf16 (exploration modes): the documented worst case
      |G - G_ref| <= (2u + u^2 + (4096 + 8) 2**-24) (|Xbar|^T |Xbar|), u = 2**-11 / 2**-8.
  clipped linear gradient: 1e-11 (float64); 5e-4 (float32: logits in float32 FFMA),
      clipped-row counts exact (float64) or within max(1, n / 1000) (float32).
  noise: exact equality with the CPU path (dpfc_native._core.cpu_*_noise).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

import dpfc_native
from dpfc_native import _core

try:  # the module must import (and its tests be skipped) without CuPy
    import cupy as cp
except ImportError:  # pragma: no cover - depends on the machine
    cp = None

pytestmark = pytest.mark.gpu

MARGIN = float(_core.clip_margin)
EPS32 = 2.0**-24
F32_BLOCK = 4096
DTYPE_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}


def gs():
    from dpfc_native import _gpu_stats

    return _gpu_stats


def stream_ptr() -> int:
    return int(cp.cuda.get_current_stream().ptr)


# --------------------------------------------------------------------------------------
# References (float64, independent of the package)
# --------------------------------------------------------------------------------------


def ref_norms(x64: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", x64, x64)
    norms = np.sqrt(sq)
    bad = ~np.isfinite(norms)
    if bad.any():
        amax = np.abs(x64[bad]).max(axis=1)
        sc = x64[bad] / amax[:, None]
        norms[bad] = amax * np.sqrt(np.einsum("ij,ij->i", sc, sc))
    return norms


def ref_scale(x64: np.ndarray, clip_norm: float) -> np.ndarray:
    norms = ref_norms(x64)
    target = clip_norm * MARGIN
    out = np.ones_like(norms)
    over = norms > target
    out[over] = target / norms[over]
    return out


def ref_xbar(x64: np.ndarray, clip_norm: float) -> np.ndarray:
    return x64 * ref_scale(x64, clip_norm)[:, None]


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even) as uint16."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return b.astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def draw_features(rng, n: int, d: int, clip_norm: float) -> np.ndarray:
    """Rows of random direction with norms spread over [0.05 C, 4 C] (about half clipped)."""
    x = rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x *= clip_norm * rng.uniform(0.05, 4.0, size=(n, 1))
    return x


@functools.lru_cache(maxsize=64)
def dataset(n: int, d: int, dtype: str, seed: int = 0):
    """(host values as stored (float64 array), device array or bf16 bits, clip_norm)."""
    rng = np.random.default_rng(1000003 * n + 7919 * d + seed)
    clip_norm = float(rng.uniform(0.5, 2.0))
    x = draw_features(rng, n, d, clip_norm)
    if dtype == "bfloat16":
        bits = to_bf16_bits(x)
        return from_bf16_bits(bits), bits, clip_norm
    stored = x.astype(dtype)
    return stored.astype(np.float64), stored, clip_norm


@functools.lru_cache(maxsize=32)
def gram_reference(n: int, d: int, dtype: str, seed: int = 0):
    x64, _, clip_norm = dataset(n, d, dtype, seed)
    xb = ref_xbar(x64, clip_norm)
    return xb.T @ xb, np.abs(xb).T @ np.abs(xb)


def rel_err(got: np.ndarray, ref: np.ndarray, scale: np.ndarray) -> float:
    den = float(np.linalg.norm(scale))
    return float(np.linalg.norm(got - ref)) / (den if den > 0 else 1.0)


def assert_all_written(a: np.ndarray, what: str) -> None:
    assert np.isfinite(a).all(), f"{what}: unwritten (NaN-poisoned) or non-finite elements"


def nan_like(shape, dtype=None):
    return cp.full(shape, np.nan, dtype=dtype or cp.float64)


def gram_raw(xd, dtype: str, clip_norm: float, mode: str, out, kernel: str = "auto", ld=None):
    n, d = xd.shape
    _core.cuda_clipped_gram(
        xd.data.ptr, DTYPE_CODES[dtype], n, d, ld if ld is not None else d, clip_norm, mode,
        out.data.ptr, stream_ptr(), kernel,
    )
    return out


# --------------------------------------------------------------------------------------
# clip_rows and clipping soundness
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n,d", [(1, 1), (1, 257), (31, 7), (31, 1000), (100003, 64)])
def test_clip_rows_matches_reference(dtype, n, d):
    x64, host, clip_norm = dataset(n, d, dtype)
    out, scale = gs().clip_rows(cp.asarray(host), clip_norm)
    out_h, scale_h = cp.asnumpy(out), cp.asnumpy(scale)
    assert out_h.dtype == np.dtype(dtype) and scale_h.dtype == np.float64
    ref_s = ref_scale(x64, clip_norm)
    np.testing.assert_allclose(scale_h, ref_s, rtol=5e-14, atol=0)
    tol = 2 * EPS32 if dtype == "float32" else 5e-14
    np.testing.assert_allclose(out_h.astype(np.float64), x64 * ref_s[:, None], rtol=tol, atol=1e-300)
    assert (ref_norms(out_h.astype(np.float64)) < clip_norm).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_clipping_soundness_adversarial_rows(dtype, rng):
    d = 257
    clip_norm = 1.7
    rows = []
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    rows.append(u * clip_norm)                              # norm exactly C (as stored)
    rows.append(u * clip_norm * (1 + 1e-7))                  # just above C
    rows.append(u * clip_norm * (1 - 1e-7))                  # just below C
    rows.append(np.full(d, clip_norm / math.sqrt(d)))        # constant row of norm C
    rows.append(u * 1e30)                                   # huge (float32 max ~3e38)
    rows.append(np.full(d, 1e-40 if dtype == "float32" else 5e-324))  # denormals
    rows.append(np.zeros(d))                                # zero row: scale 1
    rows.append(rng.standard_normal(d) * 1e3)
    if dtype == "float64":
        rows.append(u * 1e200)                              # sum of squares overflows
        rows.append(np.full(d, 1e300))
    x = np.array(rows).astype(dtype)
    out, scale = gs().clip_rows(cp.asarray(x), clip_norm)
    out_h = cp.asnumpy(out).astype(np.float64)
    scale_h = cp.asnumpy(scale)
    assert np.isfinite(out_h).all() and np.isfinite(scale_h).all()
    norms = ref_norms(out_h)
    assert (norms < clip_norm).all(), f"clipped norms {norms.max()} >= C = {clip_norm}"
    assert scale_h[6] == 1.0 and scale_h[5] == 1.0
    # The Gram of the same rows is finite and its trace (sum of squared norms) < n C^2.
    g = cp.asnumpy(gs().clipped_gram(cp.asarray(x), clip_norm))
    assert np.isfinite(g).all()
    assert np.trace(g) < x.shape[0] * clip_norm**2


# --------------------------------------------------------------------------------------
# clipped_gram
# --------------------------------------------------------------------------------------

GRAM_SHAPES = [(1, 1), (1, 257), (31, 7), (31, 130), (31, 1000), (2000, 257), (100003, 64),
               (100003, 130)]


def _check_gram(got: np.ndarray, n: int, d: int, dtype: str, mode: str):
    ref, absref = gram_reference(n, d, dtype)
    assert got.shape == (d, d) and got.dtype == np.float64
    assert_all_written(got, "G")
    np.testing.assert_array_equal(got, got.T)  # mirrored, not recomputed
    err = rel_err(got, ref, absref)
    if mode == "float64":
        assert err <= 1e-12, f"float64 relative error {err:.3e}"
        return
    u = {"float32": 0.0, "tf32": 2.0**-11, "bf16": 2.0**-8}[mode]
    coef = 2 * u + u * u + (F32_BLOCK + 8) * EPS32
    assert err <= (1e-5 if mode == "float32" else coef), f"{mode} relative error {err:.3e}"
    bound = coef * absref + 1e-300
    worst = float(np.max(np.abs(got - ref) / bound))
    assert worst <= 1.0, f"{mode} elementwise error {worst:.3f} x the documented bound"


@pytest.mark.parametrize("mode", ["float64", "float32", "tf32", "bf16"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("n,d", GRAM_SHAPES)
def test_clipped_gram(n, d, dtype, mode):
    _, host, clip_norm = dataset(n, d, dtype)
    xd = cp.asarray(host)
    out = nan_like((d, d))
    if dtype == "bfloat16":
        gram_raw(xd, dtype, clip_norm, mode, out)
    else:
        gs()._gram_into(xd, clip_norm, mode, out)
    _check_gram(cp.asnumpy(out), n, d, dtype, mode)


@pytest.mark.parametrize("n,d", [(31, 7), (2000, 257), (100003, 130), (5000, 1000)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gram_mma_and_simt_kernels_agree(n, d, dtype):
    """Self-check of the DMMA engines (m16n8k8 on sm_90, m8n8k4) against FP64 SIMT."""
    _, host, clip_norm = dataset(n, d, dtype)
    xd = cp.asarray(host)
    absref = gram_reference(n, d, dtype)[1]
    g = {}
    for kernel in ("mma", "mma884", "simt"):
        g[kernel] = cp.asnumpy(gram_raw(xd, dtype, clip_norm, "float64", nan_like((d, d)), kernel))
        assert_all_written(g[kernel], f"G ({kernel})")
        _check_gram(g[kernel], n, d, dtype, "float64")
    assert rel_err(g["mma"], g["simt"], absref) <= 1e-12
    assert rel_err(g["mma884"], g["simt"], absref) <= 1e-12


def test_gram_env_kernel_choice(kernel_env):
    n, d = 3001, 130
    _, host, clip_norm = dataset(n, d, "float32")
    xd = cp.asarray(host)
    outs = {}
    for k in ("mma", "mma884", "simt"):
        kernel_env(DPFC_GRAM_KERNEL=k)
        outs[k] = cp.asnumpy(gs().clipped_gram(xd, clip_norm, "float64"))
    kernel_env(DPFC_GRAM_KERNEL="bogus")
    with pytest.raises(ValueError, match="DPFC_GRAM_KERNEL"):
        gs().clipped_gram(xd, clip_norm, "float64")
    absref = gram_reference(n, d, "float32")[1]
    assert rel_err(outs["mma"], outs["simt"], absref) <= 1e-12
    assert rel_err(outs["mma884"], outs["simt"], absref) <= 1e-12


@pytest.mark.parametrize("mode", ["float64", "float32"])
def test_gram_is_deterministic(mode):
    n, d = 100003, 257
    _, host, clip_norm = dataset(n, d, "float32")
    xd = cp.asarray(host)
    a = cp.asnumpy(gs().clipped_gram(xd, clip_norm, mode))
    b = cp.asnumpy(gs().clipped_gram(xd, clip_norm, mode))
    np.testing.assert_array_equal(a, b)


def test_gram_strided_and_noncontiguous_inputs():
    n, d = 3001, 130
    x64, host, clip_norm = dataset(n, d, "float64")
    ref, absref = gram_reference(n, d, "float64")
    # Row stride > d, used in place.
    wide = cp.full((n, d + 13), np.nan)
    wide[:, :d] = cp.asarray(host)
    view = wide[:, :d]
    assert view.strides[0] == (d + 13) * 8
    assert rel_err(cp.asnumpy(gs().clipped_gram(view, clip_norm)), ref, absref) <= 1e-12
    # Every other row of a taller array.
    tall = cp.full((2 * n, d), np.nan)
    tall[::2] = cp.asarray(host)
    assert rel_err(cp.asnumpy(gs().clipped_gram(tall[::2], clip_norm)), ref, absref) <= 1e-12
    # Element stride != 1 (a transposed view): copied by the glue, same result.
    xt = cp.asfortranarray(cp.asarray(host))
    assert xt.strides[1] != 8
    assert rel_err(cp.asnumpy(gs().clipped_gram(xt, clip_norm)), ref, absref) <= 1e-12


def test_gram_rejects_bad_arguments():
    xd = cp.asarray(dataset(31, 7, "float32")[1])
    with pytest.raises(ValueError, match="accumulate"):
        gs().clipped_gram(xd, 1.0, "float16")
    out = cp.empty((7, 7))
    with pytest.raises(ValueError, match="accumulate"):
        _core.cuda_clipped_gram(xd.data.ptr, 0, 31, 7, 7, 1.0, "fp8", out.data.ptr, stream_ptr())
    with pytest.raises(TypeError):
        gs().clipped_gram(xd.astype(cp.int32), 1.0)
    out = cp.empty((7, 7))
    with pytest.raises(ValueError):  # clip_norm <= 0 reaches the native check
        _core.cuda_clipped_gram(xd.data.ptr, 0, 31, 7, 7, -1.0, "float64", out.data.ptr,
                                stream_ptr())
    with pytest.raises(ValueError):  # invalid dtype code
        _core.cuda_clipped_gram(xd.data.ptr, 9, 31, 7, 7, 1.0, "float64", out.data.ptr,
                                stream_ptr())
    with pytest.raises(ValueError):  # row stride < d
        _core.cuda_clipped_gram(xd.data.ptr, 0, 31, 7, 3, 1.0, "float64", out.data.ptr,
                                stream_ptr())
    with pytest.raises(ValueError):  # null pointer
        _core.cuda_clipped_gram(0, 0, 31, 7, 7, 1.0, "float64", out.data.ptr, stream_ptr())


def test_cuda_errors_become_python_exceptions():
    with pytest.raises(dpfc_native.CudaError):
        _core.cuda_workspace_probe(1 << 52, stream_ptr())  # 4 PiB: allocation fails
    # The context is still usable afterwards.
    xd = cp.asarray(dataset(31, 7, "float64")[1])
    assert np.isfinite(cp.asnumpy(gs().clipped_gram(xd, 1.0))).all()


# --------------------------------------------------------------------------------------
# Class sums, stats, class grams, weighted grams
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def labels_for(n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(31 * n + k + seed)
    used = max(1, k - 1) if k > 2 else k  # leave a class empty when K > 2
    return rng.integers(0, used, size=n).astype(np.int64)


def ref_class_sums(xb: np.ndarray, labels: np.ndarray, k: int):
    onehot = np.zeros((xb.shape[0], k))
    onehot[np.arange(xb.shape[0]), labels] = 1.0
    return onehot.T @ xb, onehot.T @ np.abs(xb)


CLASS_CASES = [(1, 7, 1), (31, 7, 3), (31, 130, 10), (31, 1000, 100), (3001, 130, 100),
               (100003, 64, 1), (100003, 130, 10), (20011, 257, 3)]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("n,d,k", CLASS_CASES)
def test_clipped_class_sums(n, d, k, dtype):
    x64, host, clip_norm = dataset(n, d, dtype)
    labels = labels_for(n, k)
    out = nan_like((k, d))
    counts = cp.full((k,), -1, dtype=cp.int64)
    gs()._class_sums_into(cp.asarray(host), cp.asarray(labels), k, clip_norm, out, counts)
    got = cp.asnumpy(out)
    assert_all_written(got, "B")
    ref, absref = ref_class_sums(ref_xbar(x64, clip_norm), labels, k)
    assert rel_err(got, ref, absref) <= 1e-12
    np.testing.assert_array_equal(cp.asnumpy(counts), np.bincount(labels, minlength=k))


@pytest.mark.parametrize("mode", ["float64", "float32", "tf32"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("n,d,k", CLASS_CASES)
def test_clipped_stats(n, d, k, dtype, mode):
    x64, host, clip_norm = dataset(n, d, dtype)
    labels = labels_for(n, k)
    xd, ld = cp.asarray(host), cp.asarray(labels)
    g, b, counts = nan_like((d, d)), nan_like((k, d)), cp.full((k,), -1, dtype=cp.int64)
    gs()._stats_into(xd, ld, k, clip_norm, mode, g, b, counts)
    g_h, b_h = cp.asnumpy(g), cp.asnumpy(b)
    assert_all_written(g_h, "G")
    assert_all_written(b_h, "B")
    _check_gram(g_h, n, d, dtype, mode)
    ref_b, abs_b = ref_class_sums(ref_xbar(x64, clip_norm), labels, k)
    assert rel_err(b_h, ref_b, abs_b) <= 1e-12
    np.testing.assert_array_equal(cp.asnumpy(counts), np.bincount(labels, minlength=k))
    # The one-pass op agrees with the separate ops (same scales, same kernels).
    absref = gram_reference(n, d, dtype)[1]
    g_sep = cp.asnumpy(gs().clipped_gram(xd, clip_norm, mode))
    assert rel_err(g_h, g_sep, absref) <= (1e-14 if mode == "float64" else 1e-3)
    b_sep = cp.asnumpy(gs().clipped_class_sums(xd, ld, k, clip_norm))
    assert rel_err(b_h, b_sep, abs_b) <= 1e-14


def test_clipped_stats_bfloat16_raw():
    n, d, k = 3001, 130, 10
    x64, bits, clip_norm = dataset(n, d, "bfloat16")
    labels = labels_for(n, k)
    xd, lab = cp.asarray(bits), cp.asarray(labels.astype(np.int32))
    g, b, counts = nan_like((d, d)), nan_like((k, d)), cp.full((k,), -1, dtype=cp.int64)
    _core.cuda_clipped_stats(xd.data.ptr, 3, n, d, d, lab.data.ptr, k, clip_norm, "float64",
                             g.data.ptr, b.data.ptr, counts.data.ptr, stream_ptr())
    _check_gram(cp.asnumpy(g), n, d, "bfloat16", "float64")
    ref_b, abs_b = ref_class_sums(ref_xbar(x64, clip_norm), labels, k)
    assert rel_err(cp.asnumpy(b), ref_b, abs_b) <= 1e-12


@pytest.mark.parametrize("kernel", ["mma", "simt"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n,d,k", [(1, 7, 1), (31, 7, 3), (31, 130, 10), (3001, 130, 3),
                                   (3001, 257, 10), (20011, 64, 100), (100003, 64, 1)])
def test_clipped_class_grams(n, d, k, dtype, kernel):
    x64, host, clip_norm = dataset(n, d, dtype)
    labels = labels_for(n, k)
    out = nan_like((k, d, d))
    gs()._class_grams_into(cp.asarray(host), cp.asarray(labels), k, clip_norm, out, kernel)
    got = cp.asnumpy(out)
    assert_all_written(got, "A")
    xb = ref_xbar(x64, clip_norm)
    for cls in range(k):
        rows = xb[labels == cls]
        ref, absref = rows.T @ rows, np.abs(rows).T @ np.abs(rows)
        if rows.shape[0] == 0:
            np.testing.assert_array_equal(got[cls], 0.0)
        else:
            assert rel_err(got[cls], ref, absref) <= 1e-12, f"class {cls}"
        np.testing.assert_array_equal(got[cls], got[cls].T)


@pytest.mark.parametrize("wdtype", ["float32", "float64"])
@pytest.mark.parametrize("kernel", ["mma", "simt"])
@pytest.mark.parametrize("n,d,k", [(1, 7, 1), (31, 7, 3), (31, 130, 10), (2001, 130, 3),
                                   (2001, 257, 10), (50003, 64, 4)])
def test_clipped_weighted_grams(n, d, k, kernel, wdtype):
    x64, host, clip_norm = dataset(n, d, "float32")
    rng = np.random.default_rng(n + d + k)
    w = rng.uniform(0.0, 0.25, size=(n, k)).astype(wdtype)
    out = nan_like((k, d, d))
    gs()._weighted_grams_into(cp.asarray(host), cp.asarray(w), clip_norm, out, kernel)
    got = cp.asnumpy(out)
    assert_all_written(got, "H")
    xb = ref_xbar(x64, clip_norm)
    w64 = w.astype(np.float64)
    for cls in range(k):
        ref = (xb * w64[:, cls : cls + 1]).T @ xb
        absref = (np.abs(xb) * w64[:, cls : cls + 1]).T @ np.abs(xb)
        assert rel_err(got[cls], ref, absref) <= 1e-12, f"class {cls}"


# --------------------------------------------------------------------------------------
# Noise: bit-identical to the CPU path
# --------------------------------------------------------------------------------------

KEYS = [(0x01234567, 0x89ABCDEF, 0xDEADBEEF, 0x0BADF00D), (0, 0, 0, 0),
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [None, 1, 3])
@pytest.mark.parametrize("d", [1, 2, 3, 7, 63, 64, 65, 130, 257])
def test_sym_noise_bit_identical_to_cpu(d, batch, dtype):
    for key, block0 in ((KEYS[0], 0), (KEYS[1], 12345), (KEYS[2], (1 << 63) + 977)):
        std = 1.37
        got = cp.asnumpy(gs().sym_gaussian_noise(d, std, batch, key, block0, dtype))
        nb = 1 if batch is None else batch
        ref = np.empty((nb, d, d), dtype=dtype)
        _core.cpu_sym_gaussian_noise(ref, std, key, block0)
        ref = ref[0] if batch is None else ref
        assert got.shape == ref.shape and got.dtype == ref.dtype
        np.testing.assert_array_equal(got, ref)
        assert_all_written(got, "noise")


def test_sym_noise_large_batch_bit_identical_and_poisoned():
    d, batch, key, block0 = 1024, 4, KEYS[0], 99
    out = cp.full((batch, d, d), np.nan, dtype=cp.float64)
    gs()._sym_noise_into(out, 2.5, key, block0)
    ref = np.empty((batch, d, d))
    _core.cpu_sym_gaussian_noise(ref, 2.5, key, block0)
    np.testing.assert_array_equal(cp.asnumpy(out), ref)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("count", [1, 2, 3, 1000, 100001])
def test_gaussian_noise_bit_identical_to_cpu(count, dtype):
    for key, block0 in ((KEYS[0], 0), (KEYS[2], (1 << 64) - 10**6)):
        got = cp.asnumpy(gs().gaussian_noise((count,), 0.5, key, block0, dtype))
        ref = np.empty(count, dtype=dtype)
        _core.cpu_gaussian_noise(ref, 0.5, key, block0)
        np.testing.assert_array_equal(got, ref)


def test_gaussian_noise_unaligned_output_and_shapes():
    key, block0, count = KEYS[0], 5, 1001
    big = cp.full(count + 1, np.nan, dtype=cp.float32)
    _core.cuda_gaussian_noise(big.data.ptr + 4, 0, count, 1.0, list(key), block0, stream_ptr())
    ref = np.empty(count, dtype=np.float32)
    _core.cpu_gaussian_noise(ref, 1.0, key, block0)
    got = cp.asnumpy(big)
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:], ref)
    shaped = cp.asnumpy(gs().gaussian_noise((3, 5, 7), 1.0, key, block0, "float64"))
    ref = np.empty((3, 5, 7))
    _core.cpu_gaussian_noise(ref.reshape(-1), 1.0, key, block0)
    np.testing.assert_array_equal(shaped, ref)


def test_noise_moments():
    z = cp.asnumpy(gs().gaussian_noise((1 << 20,), 1.0, KEYS[0], 0, "float64"))
    assert abs(z.mean()) < 5e-3 and abs(z.std() - 1.0) < 5e-3
    s = cp.asnumpy(gs().sym_gaussian_noise(512, 2.0, None, KEYS[0], 0, "float64"))
    off = s[np.triu_indices(512, 1)]
    assert abs(np.diag(s).std() - 2.0) < 0.3
    assert abs(off.std() - 2.0 / math.sqrt(2.0)) < 0.02


# --------------------------------------------------------------------------------------
# Clipped linear gradient
# --------------------------------------------------------------------------------------


def ref_linear_grad(x64, labels, w64, b64, clip_norm, loss, feature_clip):
    if feature_clip is not None:
        x64 = ref_xbar(x64, feature_clip)
    z = x64 @ w64.T + b64
    k = w64.shape[0]
    rows = np.arange(x64.shape[0])
    if loss == "sigmoid":
        r = 1.0 / (1.0 + np.exp(-z))
        r[rows, labels] -= 1.0
        r /= k
    else:
        z = z - z.max(axis=1, keepdims=True)
        r = np.exp(z)
        r /= r.sum(axis=1, keepdims=True)
        r[rows, labels] -= 1.0
    gnorm = np.linalg.norm(r, axis=1) * ref_norms(x64)
    target = clip_norm * MARGIN
    c = np.where(gnorm <= target, 1.0, target / np.where(gnorm > 0, gnorm, 1.0))
    rc = r * c[:, None]
    return rc.T @ x64, np.abs(rc).T @ np.abs(x64), int(np.count_nonzero(c < 1.0)), gnorm / target


@pytest.mark.parametrize("feature_clip", [None, 0.8])
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n,d,k", [(1, 7, 1), (31, 7, 3), (31, 130, 10), (5003, 130, 100),
                                   (20011, 257, 10), (3001, 1000, 3)])
def test_clipped_linear_grad(n, d, k, dtype, loss, feature_clip):
    x64, host, _ = dataset(n, d, dtype)
    rng = np.random.default_rng(7 * n + k)
    labels = rng.integers(0, k, size=n)
    w = (rng.standard_normal((k, d)) * 0.5).astype(dtype)
    bias = rng.uniform(-2, 2, size=k)
    # Clip bound near the median gradient norm: about half the rows are clipped.
    _, _, _, ratio = ref_linear_grad(x64, labels, w.astype(np.float64), bias, 1.0, loss,
                                     feature_clip)
    # (1 + 1e-7): no row sits within rounding of the bound, so float64 counts are exact.
    clip_norm = (float(np.median(ratio)) if n > 1 else float(ratio[0]) * 0.5) * (1 + 1e-7)
    if not clip_norm > 0:  # softmax with K = 1: every residual is 0
        clip_norm = 1.0
    ref, absref, ref_clipped, _ = ref_linear_grad(x64, labels, w.astype(np.float64), bias,
                                                  clip_norm, loss, feature_clip)
    grad = nan_like((k, d))
    nclip = cp.full((), -1, dtype=cp.int64)
    gs()._linear_grad_into(cp.asarray(host), cp.asarray(labels), cp.asarray(w), cp.asarray(bias),
                           clip_norm, loss, feature_clip, grad, nclip)
    got = cp.asnumpy(grad)
    assert_all_written(got, "grad")
    err = rel_err(got, ref, absref)
    if dtype == "float64":
        assert err <= 1e-11, f"float64 relative error {err:.3e}"
        assert int(nclip.get()) == ref_clipped
    else:
        assert err <= 5e-4, f"float32 relative error {err:.3e}"
        assert abs(int(nclip.get()) - ref_clipped) <= max(1, n // 1000)


@pytest.mark.parametrize("engine", ["cublas", "simt32", "mma", "mma884", "simt"])
def test_linear_grad_chunking_and_engines(kernel_env, engine):
    n, d, k = 20011, 130, 10
    x64, host, _ = dataset(n, d, "float32")
    rng = np.random.default_rng(5)
    labels = rng.integers(0, k, size=n)
    w = (rng.standard_normal((k, d)) * 0.5).astype(np.float32)
    bias = np.full(k, -10.0)
    ref, absref, ref_clipped, _ = ref_linear_grad(x64, labels, w.astype(np.float64), bias, 0.05,
                                                  "sigmoid", None)
    args = (cp.asarray(host), cp.asarray(labels), cp.asarray(w), cp.asarray(bias), 0.05,
            "sigmoid", None)
    kernel_env(DPFC_GRAD_KERNEL=engine)
    full, nfull = gs().clipped_linear_grad(*args)
    kernel_env(DPFC_LG_CHUNK="777")  # many chunks, last one partial
    chunked, nchunk = gs().clipped_linear_grad(*args)
    for got, nc in ((cp.asnumpy(full), nfull), (cp.asnumpy(chunked), nchunk)):
        assert rel_err(got, ref, absref) <= 5e-4
        assert abs(nc - ref_clipped) <= max(1, n // 1000)


def test_linear_grad_strided_input_and_bad_loss():
    n, d, k = 3001, 130, 10
    x64, host, _ = dataset(n, d, "float64")
    rng = np.random.default_rng(11)
    labels = rng.integers(0, k, size=n)
    w = rng.standard_normal((k, d)) * 0.3
    bias = np.zeros(k)
    ref, absref, ref_clipped, _ = ref_linear_grad(x64, labels, w, bias, 0.1, "softmax", None)
    wide = cp.full((n, d + 3), np.nan)
    wide[:, :d] = cp.asarray(host)
    got, nc = gs().clipped_linear_grad(wide[:, :d], cp.asarray(labels), cp.asarray(w),
                                       cp.asarray(bias), 0.1, "softmax", None)
    assert rel_err(cp.asnumpy(got), ref, absref) <= 1e-11 and nc == ref_clipped
    with pytest.raises(ValueError, match="loss"):
        gs().clipped_linear_grad(cp.asarray(host), cp.asarray(labels), cp.asarray(w),
                                 cp.asarray(bias), 0.1, "hinge", None)


# --------------------------------------------------------------------------------------
# GPU vs the CPU ops (dpfc_native.ops)
# --------------------------------------------------------------------------------------


def _ops():
    return pytest.importorskip("dpfc_native.ops")


@pytest.mark.parametrize("mode", ["float64", "float32"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ops_gpu_matches_cpu(dtype, mode):
    ops = _ops()
    n, d, k = 5003, 130, 10
    _, host, clip_norm = dataset(n, d, dtype)
    labels = labels_for(n, k)
    absref = gram_reference(n, d, dtype)[1]
    tol = 1e-12 if mode == "float64" else 2e-5
    g_cpu = ops.clipped_gram(host, clip_norm, accumulate=mode)
    g_gpu = cp.asnumpy(ops.clipped_gram(cp.asarray(host), clip_norm, accumulate=mode))
    assert rel_err(g_gpu, g_cpu, absref) <= tol
    g2, b2, c2 = ops.clipped_stats(cp.asarray(host), cp.asarray(labels), k, clip_norm,
                                   accumulate=mode)
    g1, b1, c1 = ops.clipped_stats(host, labels, k, clip_norm, accumulate=mode)
    assert rel_err(cp.asnumpy(g2), g1, absref) <= tol
    _, abs_b = ref_class_sums(np.abs(host.astype(np.float64)), labels, k)
    assert rel_err(cp.asnumpy(b2), b1, abs_b) <= 1e-12
    np.testing.assert_array_equal(cp.asnumpy(c2), c1)
    xc_gpu, s_gpu = ops.clip_rows(cp.asarray(host), clip_norm)
    xc_cpu, s_cpu = ops.clip_rows(host, clip_norm)
    np.testing.assert_allclose(cp.asnumpy(s_gpu), s_cpu, rtol=5e-14)
    np.testing.assert_allclose(cp.asnumpy(xc_gpu), xc_cpu, rtol=4 * EPS32 if dtype == "float32"
                               else 5e-14)


def test_ops_noise_gpu_matches_cpu():
    ops = _ops()
    key = 0x0123456789ABCDEF0123456789ABCDEF
    for dt in (np.float32, np.float64):
        a = ops.sym_gaussian_noise(130, 0.7, batch=3, key=key, counter=17, dtype=dt)
        b = ops.sym_gaussian_noise(130, 0.7, batch=3, key=key, counter=17, dtype=dt,
                                   device="cuda")
        np.testing.assert_array_equal(cp.asnumpy(b), a)
        a = ops.gaussian_noise((7, 33), 0.7, key=key, counter=5, dtype=dt)
        b = ops.gaussian_noise((7, 33), 0.7, key=key, counter=5, dtype=dt, device="cuda")
        np.testing.assert_array_equal(cp.asnumpy(b), a)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_ops_linear_grad_gpu_matches_cpu(loss):
    ops = _ops()
    n, d, k = 3001, 130, 10
    _, host, _ = dataset(n, d, "float64")
    rng = np.random.default_rng(3)
    labels = rng.integers(0, k, size=n)
    w = rng.standard_normal((k, d)) * 0.3
    bias = rng.uniform(-1, 1, size=k)
    g_cpu, n_cpu = ops.clipped_linear_grad(host, labels, w, bias, 0.05, loss=loss,
                                           feature_clip=0.9)
    g_gpu, n_gpu = ops.clipped_linear_grad(cp.asarray(host), cp.asarray(labels), cp.asarray(w),
                                           cp.asarray(bias), 0.05, loss=loss, feature_clip=0.9)
    scale = np.abs(g_cpu).sum() / max(1, g_cpu.size) + 1e-300
    np.testing.assert_allclose(cp.asnumpy(g_gpu), g_cpu, rtol=1e-9, atol=1e-9 * scale)
    assert n_gpu == n_cpu
