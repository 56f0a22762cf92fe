"""GPU-only facts: what has no CPU counterpart to share a test body with.

Engine agreement (the DMMA Gram engines against FP64 SIMT, the gradient engines and
chunking, the GPU against the CPU path bit for bit or within rounding), raw kernel calls
(bfloat16 bit patterns, argument checks, outputs poisoned with a finite value so that a
failed matrix's NaN still proves it written), work spaces, streams and CUDA graph capture,
CUDA errors as Python exceptions, and the kernel configuration. The behaviour both devices
share is tested once, on each backend, against float64 references in tests/test_ops*.py.

Every test is marked ``gpu`` and skipped without a CUDA build, a device and CuPy
(tests/conftest.py).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from _reference import CHOL_PATHS as PATHS
from _reference import (
    EPS,
    EPS32,
    GPU_GRAM_SHAPES,
    assert_all_written,
    check_factor_against_lapack,
    check_gram,
    clear_pivots,
    draw_features,
    draw_labels,
    fail_at,
    from_bf16_bits,
    recon_err,
    ref_class_sums,
    ref_gram,
    ref_linear_grad,
    reference_clip64,
    rel_err,
    spd_batch,
    to_bf16_bits,
)

import dpfc_native
from dpfc_native import _core, linalg, ops

try:  # the module must import (and its tests be skipped) without CuPy
    import cupy as cp
except ImportError:  # pragma: no cover - depends on the machine
    cp = None

pytestmark = pytest.mark.gpu

DTYPE_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}
DTYPES = [np.float64, np.float32]


def gs():
    from dpfc_native import _gpu_stats

    return _gpu_stats


def stream_ptr() -> int:
    return int(cp.cuda.get_current_stream().ptr)


@functools.lru_cache(maxsize=64)
def dataset(n: int, d: int, dtype: str, seed: int = 0):
    """(host values as stored (float64 array), host array or bf16 bits, clip_norm)."""
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
    return ref_gram(reference_clip64(x64, clip_norm)[0])


@functools.lru_cache(maxsize=32)
def labels_for(n: int, k: int, seed: int = 0) -> np.ndarray:
    return draw_labels(np.random.default_rng(31 * n + k + seed), n, k)


def ref_xbar(x64: np.ndarray, clip_norm: float) -> np.ndarray:
    return reference_clip64(x64, clip_norm)[0]


def nan_like(shape, dtype=None):
    return cp.full(shape, np.nan, dtype=dtype or cp.float64)


def gram_raw(xd, dtype: str, clip_norm: float, mode: str, out, kernel: str = "auto", ld=None):
    n, d = xd.shape
    _core.cuda_clipped_gram(
        xd.data.ptr,
        DTYPE_CODES[dtype],
        n,
        d,
        ld if ld is not None else d,
        clip_norm,
        mode,
        out.data.ptr,
        stream_ptr(),
        kernel,
    )
    return out


def _check_gram(got, n: int, d: int, dtype: str, mode: str):
    check_gram(got, *gram_reference(n, d, dtype), mode)


# --------------------------------------------------------------------------------------
# Gram engines and raw calls
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["float64", "float32", "tf32", "bf16"])
@pytest.mark.parametrize("n,d", GPU_GRAM_SHAPES)
def test_clipped_gram_bfloat16_raw(n, d, mode):
    """bfloat16 rows (bit patterns: NumPy has no bfloat16) through the raw launcher."""
    _, bits, clip_norm = dataset(n, d, "bfloat16")
    out = nan_like((d, d))
    gram_raw(cp.asarray(bits), "bfloat16", clip_norm, mode, out)
    _check_gram(cp.asnumpy(out), n, d, "bfloat16", mode)


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
        _core.cuda_clipped_gram(
            xd.data.ptr, 0, 31, 7, 7, -1.0, "float64", out.data.ptr, stream_ptr()
        )
    with pytest.raises(ValueError):  # invalid dtype code
        _core.cuda_clipped_gram(
            xd.data.ptr, 9, 31, 7, 7, 1.0, "float64", out.data.ptr, stream_ptr()
        )
    with pytest.raises(ValueError):  # row stride < d
        _core.cuda_clipped_gram(
            xd.data.ptr, 0, 31, 7, 3, 1.0, "float64", out.data.ptr, stream_ptr()
        )
    with pytest.raises(ValueError):  # null pointer
        _core.cuda_clipped_gram(0, 0, 31, 7, 7, 1.0, "float64", out.data.ptr, stream_ptr())


def test_cuda_errors_become_python_exceptions():
    with pytest.raises(dpfc_native.CudaError):
        _core.cuda_workspace_probe(1 << 52, stream_ptr())  # 4 PiB: allocation fails
    # The context is still usable afterwards.
    xd = cp.asarray(dataset(31, 7, "float64")[1])
    assert np.isfinite(cp.asnumpy(gs().clipped_gram(xd, 1.0))).all()


def test_clipped_stats_bfloat16_raw():
    n, d, k = 3001, 130, 10
    x64, bits, clip_norm = dataset(n, d, "bfloat16")
    labels = labels_for(n, k)
    xd, lab = cp.asarray(bits), cp.asarray(labels.astype(np.int32))
    g, b, counts = nan_like((d, d)), nan_like((k, d)), cp.full((k,), -1, dtype=cp.int64)
    _core.cuda_clipped_stats(
        xd.data.ptr,
        3,
        n,
        d,
        d,
        lab.data.ptr,
        k,
        clip_norm,
        "float64",
        g.data.ptr,
        b.data.ptr,
        counts.data.ptr,
        stream_ptr(),
    )
    _check_gram(cp.asnumpy(g), n, d, "bfloat16", "float64")
    ref_b, abs_b = ref_class_sums(ref_xbar(x64, clip_norm), labels, k)
    assert rel_err(cp.asnumpy(b), ref_b, abs_b) <= 1e-12


# --------------------------------------------------------------------------------------
# Noise: bit-identical to the CPU path
# --------------------------------------------------------------------------------------

KEYS = [
    (0x01234567, 0x89ABCDEF, 0xDEADBEEF, 0x0BADF00D),
    (0, 0, 0, 0),
    (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
]


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


# --------------------------------------------------------------------------------------
# Clipped linear gradient: engines, chunking, strided rows
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["cublas", "simt32", "mma", "mma884", "simt"])
def test_linear_grad_chunking_and_engines(kernel_env, engine):
    n, d, k = 20011, 130, 10
    x64, host, _ = dataset(n, d, "float32")
    rng = np.random.default_rng(5)
    labels = rng.integers(0, k, size=n)
    w = (rng.standard_normal((k, d)) * 0.5).astype(np.float32)
    bias = np.full(k, -10.0)
    ref, absref, ref_clipped, _ = ref_linear_grad(
        x64, labels, w.astype(np.float64), bias, 0.05, "sigmoid", None
    )
    args = (
        cp.asarray(host),
        cp.asarray(labels),
        cp.asarray(w),
        cp.asarray(bias),
        0.05,
        "sigmoid",
        None,
    )
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
    got, nc = gs().clipped_linear_grad(
        wide[:, :d], cp.asarray(labels), cp.asarray(w), cp.asarray(bias), 0.1, "softmax", None
    )
    assert rel_err(cp.asnumpy(got), ref, absref) <= 1e-11 and nc == ref_clipped
    with pytest.raises(ValueError, match="loss"):
        gs().clipped_linear_grad(
            cp.asarray(host),
            cp.asarray(labels),
            cp.asarray(w),
            cp.asarray(bias),
            0.1,
            "hinge",
            None,
        )


# --------------------------------------------------------------------------------------
# GPU vs the CPU ops (dpfc_native.ops)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["float64", "float32"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ops_gpu_matches_cpu(dtype, mode):
    n, d, k = 5003, 130, 10
    _, host, clip_norm = dataset(n, d, dtype)
    labels = labels_for(n, k)
    absref = gram_reference(n, d, dtype)[1]
    tol = 1e-12 if mode == "float64" else 2e-5
    g_cpu = ops.clipped_gram(host, clip_norm, accumulate=mode)
    g_gpu = cp.asnumpy(ops.clipped_gram(cp.asarray(host), clip_norm, accumulate=mode))
    assert rel_err(g_gpu, g_cpu, absref) <= tol
    g2, b2, c2 = ops.clipped_stats(
        cp.asarray(host), cp.asarray(labels), k, clip_norm, accumulate=mode
    )
    g1, b1, c1 = ops.clipped_stats(host, labels, k, clip_norm, accumulate=mode)
    assert rel_err(cp.asnumpy(g2), g1, absref) <= tol
    _, abs_b = ref_class_sums(np.abs(host.astype(np.float64)), labels, k)
    assert rel_err(cp.asnumpy(b2), b1, abs_b) <= 1e-12
    np.testing.assert_array_equal(cp.asnumpy(c2), c1)
    xc_gpu, s_gpu = ops.clip_rows(cp.asarray(host), clip_norm)
    xc_cpu, s_cpu = ops.clip_rows(host, clip_norm)
    np.testing.assert_allclose(cp.asnumpy(s_gpu), s_cpu, rtol=5e-14)
    np.testing.assert_allclose(
        cp.asnumpy(xc_gpu), xc_cpu, rtol=4 * EPS32 if dtype == "float32" else 5e-14
    )


def test_ops_noise_gpu_matches_cpu():
    key = 0x0123456789ABCDEF0123456789ABCDEF
    for dt in (np.float32, np.float64):
        a = ops.sym_gaussian_noise(130, 0.7, batch=3, key=key, counter=17, dtype=dt)
        b = ops.sym_gaussian_noise(130, 0.7, batch=3, key=key, counter=17, dtype=dt, device="cuda")
        np.testing.assert_array_equal(cp.asnumpy(b), a)
        a = ops.gaussian_noise((7, 33), 0.7, key=key, counter=5, dtype=dt)
        b = ops.gaussian_noise((7, 33), 0.7, key=key, counter=5, dtype=dt, device="cuda")
        np.testing.assert_array_equal(cp.asnumpy(b), a)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_ops_linear_grad_gpu_matches_cpu(loss):
    n, d, k = 3001, 130, 10
    _, host, _ = dataset(n, d, "float64")
    rng = np.random.default_rng(3)
    labels = rng.integers(0, k, size=n)
    w = rng.standard_normal((k, d)) * 0.3
    bias = rng.uniform(-1, 1, size=k)
    g_cpu, n_cpu = ops.clipped_linear_grad(host, labels, w, bias, 0.05, loss=loss, feature_clip=0.9)
    g_gpu, n_gpu = ops.clipped_linear_grad(
        cp.asarray(host),
        cp.asarray(labels),
        cp.asarray(w),
        cp.asarray(bias),
        0.05,
        loss=loss,
        feature_clip=0.9,
    )
    scale = np.abs(g_cpu).sum() / max(1, g_cpu.size) + 1e-300
    np.testing.assert_allclose(cp.asnumpy(g_gpu), g_cpu, rtol=1e-9, atol=1e-9 * scale)
    assert n_gpu == n_cpu


def test_ops_leaf_rows_on_gpu(monkeypatch):
    """``leaf_rows`` on CuPy arrays: GPU leaves through the native kernels, merged exactly
    on the host, returned as CuPy arrays; the same bits at any thread count and for the
    rows cut into shards at leaf multiples, and within the reduction's a-priori bound
    (twice, for both sides) of the CPU leaves."""
    from dpfc_native import reduction as R

    n, d, k, leaf, c = 3001, 70, 4, 256, 1.3
    _, host, _ = dataset(n, d, "float32")
    rng = np.random.default_rng(5)
    y = rng.integers(0, k, size=n)
    w, bias = rng.standard_normal((k, d)) * 0.3, rng.uniform(-1, 1, size=k)
    weights = rng.uniform(0, 0.25, size=(n, k))
    dx, dy = cp.asarray(host), cp.asarray(y)
    calls = {
        "gram": (lambda a, b, ww: ops.clipped_gram(a, c, leaf_rows=leaf), c * c),
        "stats": (lambda a, b, ww: ops.clipped_stats(a, b, k, c, leaf_rows=leaf), c * c),
        "sums": (lambda a, b, ww: ops.clipped_class_sums(a, b, k, c, leaf_rows=leaf), c),
        "class_grams": (
            lambda a, b, ww: ops.clipped_class_grams(a, b, k, c, leaf_rows=leaf),
            c * c,
        ),
        "weighted": (
            lambda a, b, ww: ops.clipped_weighted_grams(a, ww, c, leaf_rows=leaf),
            0.25 * c * c,
        ),
        "grad": (
            lambda a, b, ww: ops.clipped_linear_grad(
                a, b, *(map(cp.asarray, (w, bias)) if a is dx else (w, bias)), 0.05, leaf_rows=leaf
            ),
            0.05,
        ),
    }
    for name, (call, bound) in calls.items():
        monkeypatch.setenv("DPFC_REDUCE_THREADS", "2")
        gpu = call(dx, dy, cp.asarray(weights))
        monkeypatch.setenv("DPFC_REDUCE_THREADS", "1")
        again = call(dx, dy, cp.asarray(weights))
        cpu = call(host, y, weights)
        gpu, again, cpu = (r if isinstance(r, tuple) else (r,) for r in (gpu, again, cpu))
        for g, a, h in zip(gpu, again, cpu):
            if isinstance(h, int):
                assert g == a == h, name
                continue
            assert isinstance(g, cp.ndarray), name
            g = cp.asnumpy(g)
            np.testing.assert_array_equal(g, cp.asnumpy(a), err_msg=name)
            tol = 2 * R.rounding_bound(n, leaf, bound, h.size)
            np.testing.assert_allclose(g, h, rtol=0, atol=tol, err_msg=name)
            assert np.isfinite(g).all()
    cut = R.reduce(
        R.Gram(c), R.ArraySource(dx, shard_rows=(2 * leaf, n - 2 * leaf)), leaf_rows=leaf
    )
    np.testing.assert_array_equal(cut, cp.asnumpy(ops.clipped_gram(dx, c, leaf_rows=leaf)))


def test_mixed_devices_rejected():
    x = cp.asarray(np.ones((4, 3)))
    with pytest.raises(ValueError, match="mixed devices"):
        ops.clipped_class_sums(x, np.zeros(4, dtype=np.int64), 2, 1.0)
    with pytest.raises(ValueError, match="mixed devices"):
        ops.clipped_linear_grad(
            np.ones((4, 3)), cp.zeros(4, dtype=cp.int64), np.zeros((2, 3)), 0.0, 1.0
        )


# --------------------------------------------------------------------------------------
# Cholesky: raw calls, work spaces, graph capture, kernel configuration
# --------------------------------------------------------------------------------------


@pytest.fixture
def path_env(request, kernel_env):
    kernel_env(DPFC_CHOL_SMALL_MAX=None, DPFC_CHOL_SCHEDULE=None, DPFC_CHOL_KERNEL=None)
    kernel_env(**PATHS[request.param])
    return request.param


def _chol_options():
    """The kernel options of the active configuration, for direct calls into _core."""
    from dpfc_native import _gpu_linalg

    return _gpu_linalg._options()


def _spd(rng, batch, d, dtype):
    return spd_batch(cp, rng, batch, d, dtype)


@pytest.mark.parametrize("path_env", ["blocked-left-mma", "blocked-right-mma"], indirect=True)
def test_blocked_workspace_chunks(path_env, rng):
    """d = 200: 4 diagonal tiles (128 KiB) per matrix, so 9000 matrices span two work-space
    chunks of 8192; failures in both chunks."""
    batch, d = 9000, 200
    a = _spd(rng, batch, d, np.float64)
    a[8191, 150, 150] = -1.0  # last matrix of chunk 0 (pivot 151 < 0: a_kk < 0)
    a[8192, 10, 3] = cp.nan  # first matrix of chunk 1 -> info 11
    L, info = ops.cholesky(a)
    info_h = cp.asnumpy(info)
    assert info_h[8191] == 151 and info_h[8192] == 11
    assert np.count_nonzero(info_h) == 2
    ok = cp.asarray(info_h == 0)
    err = recon_err(cp, L[ok], a[ok])
    assert err.max() <= 64 * d**0.5 * EPS[np.float64]
    assert bool(cp.isnan(L[8191]).all()) and bool(cp.isnan(L[8192]).all())
    sub = np.array([0, 8190, 8193, batch - 1])
    check_factor_against_lapack(cp, a[sub], L[sub], info[sub])


_POISON = {np.float64: 7.77e77, np.float32: 7.7e37}


@pytest.mark.parametrize("path_env", list(PATHS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 3, 32, 65, 128, 129, 257])
def test_every_element_written(path_env, dtype, d, rng):
    batch = 5
    a = cp.asnumpy(_spd(rng, batch, d, dtype))
    a[2] = fail_at(a[2].astype(np.float64), d // 2).astype(dtype)
    a[4, d - 1, 0] = np.nan
    a_dev = cp.asarray(a)
    L = cp.full((batch, d, d), _POISON[dtype], dtype=dtype)
    info = cp.full((batch,), -12345, dtype=cp.int32)
    code = 1 if dtype == np.float64 else 0  # runtime.cuh DType
    _core.cuda_cholesky(
        a_dev.data.ptr,
        d * d,
        d,
        0,
        L.data.ptr,
        info.data.ptr,
        batch,
        d,
        code,
        cp.cuda.get_current_stream().ptr,
        **_chol_options(),
    )
    L_h, info_h = cp.asnumpy(L), cp.asnumpy(info)
    assert not (L_h == _POISON[dtype]).any(), "an output element was not written"
    exp2 = d // 2 + 1
    np.testing.assert_array_equal(info_h, [0, 0, exp2, 0, d] if d > 1 else [0, 0, 1, 0, 1])
    assert np.isnan(L_h[[2, 4]]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,m", [(1, 1), (5, 3), (64, 8), (100, 9), (257, 20)])
def test_solve_every_element_written(dtype, d, m, rng):
    batch = 3
    a = _spd(rng, batch, d, dtype)
    L, _ = ops.cholesky(a)
    b = cp.asarray(rng.standard_normal((batch, d, m)), dtype=dtype)
    x = cp.full((batch, d, m), _POISON[dtype], dtype=dtype)
    code = 1 if dtype == np.float64 else 0  # runtime.cuh DType
    _core.cuda_cho_solve(
        L.data.ptr,
        d * d,
        b.data.ptr,
        d * m,
        m,
        x.data.ptr,
        batch,
        d,
        m,
        code,
        cp.cuda.get_current_stream().ptr,
    )
    assert not bool((x == _POISON[dtype]).any())
    assert bool(cp.isfinite(x).all())


@pytest.mark.parametrize("schedule", ["left", "right"])
def test_caller_workspace_chunks(kernel_env, schedule, rng):
    """A caller work space holding one matrix's diagonal tiles: the batch runs one matrix
    per chunk and gives the same result as the internally allocated work space."""
    kernel_env(DPFC_CHOL_SCHEDULE=schedule)
    kernel_env(DPFC_CHOL_SMALL_MAX=None)
    batch, d = 7, 150
    a = _spd(rng, batch, d, np.float64)
    a[3, 100, 100] = -5.0
    need = _core.cuda_cholesky_workspace_bytes(batch, d, 1)
    per = 3 * 64 * 64 * 8
    assert need == batch * per
    assert _core.cuda_cholesky_workspace_bytes(batch, 100, 1) == 0  # one-block kernel
    ws = cp.empty((per,), dtype=cp.uint8)
    L1 = cp.full((batch, d, d), _POISON[np.float64])
    i1 = cp.full((batch,), -1, dtype=cp.int32)
    stream = cp.cuda.get_current_stream().ptr

    def factor(workspace_bytes):
        _core.cuda_cholesky(
            a.data.ptr,
            d * d,
            d,
            0,
            L1.data.ptr,
            i1.data.ptr,
            batch,
            d,
            1,
            stream,
            ws.data.ptr,
            workspace_bytes,
            **_chol_options(),
        )

    factor(per)
    L2, i2 = ops.cholesky(a)
    cp.testing.assert_array_equal(i1, i2)
    cp.testing.assert_array_equal(L1, L2)
    assert int(i1[3]) == 101
    with pytest.raises(ValueError, match="workspace"):
        factor(per - 8)


def test_no_sync_graph_capture(rng):
    """The native calls only enqueue work: they can be captured into a CUDA graph."""
    d, batch = 200, 4
    a = _spd(rng, batch, d, np.float64)
    L = cp.empty_like(a)
    info = cp.empty((batch,), dtype=cp.int32)
    b = cp.asarray(rng.standard_normal((batch, d, 5)))
    x = cp.empty_like(b)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        _core.cuda_cholesky(
            a.data.ptr, d * d, d, 0, L.data.ptr, info.data.ptr, batch, d, 1, stream.ptr
        )
        _core.cuda_cho_solve(
            L.data.ptr, d * d, b.data.ptr, d * 5, 5, x.data.ptr, batch, d, 5, 1, stream.ptr
        )
        graph = stream.end_capture()
        graph.launch()
    stream.synchronize()
    L_ref, _ = ops.cholesky(a)
    cp.testing.assert_array_equal(L, L_ref)
    cp.testing.assert_allclose(a @ x, b, rtol=1e-8, atol=1e-8)


def test_env_validation(kernel_env):
    a = cp.eye(4)[None]
    kernel_env(DPFC_CHOL_KERNEL="tensor")
    with pytest.raises(ValueError, match="DPFC_CHOL_KERNEL"):
        ops.cholesky(a)
    kernel_env(DPFC_CHOL_KERNEL="mma")
    kernel_env(DPFC_CHOL_SCHEDULE="sideways")
    with pytest.raises(ValueError, match="DPFC_CHOL_SCHEDULE"):
        ops.cholesky(a)


def test_plan_follows_env(kernel_env):
    from dpfc_native import _gpu_linalg

    kernel_env(DPFC_CHOL_SMALL_MAX=None, DPFC_CHOL_SCHEDULE=None, DPFC_CHOL_KERNEL=None)
    assert _gpu_linalg.plan(1000, 100).startswith("small tier=128")
    assert _gpu_linalg.plan(1000, 20).startswith("small tier=32")
    assert "gemm=mma" in _gpu_linalg.plan(1, 1024)
    assert "gemm=simt" in _gpu_linalg.plan(1, 1024, "float32")
    kernel_env(DPFC_CHOL_SCHEDULE="left")
    assert "schedule=left" in _gpu_linalg.plan(1, 1024)
    kernel_env(DPFC_CHOL_SMALL_MAX="0")
    assert _gpu_linalg.plan(10, 5).startswith("blocked")


# --------------------------------------------------------------------------------------
# linalg helpers on the GPU agree with the CPU path
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [24, 150])
def test_cholesky_shifts_gpu(dtype, d, rng):
    x = rng.standard_normal((d // 2, d)) / np.sqrt(d)
    z = rng.standard_normal((d, d)) * 0.1
    a = (x.T @ x + (z + z.T) / 2).astype(dtype)
    shifts = np.array([0.0, 1e-3, 0.05, 0.3, 1.0, 5.0])
    L, info = linalg.cholesky_shifts(cp.asarray(a), cp.asarray(shifts))
    L_cpu, info_cpu = linalg.cholesky_shifts(a, shifts)
    stacked = cp.asarray(a)[None] + cp.asarray(shifts.astype(dtype))[:, None, None] * cp.eye(
        d, dtype=dtype
    )
    L_st, info_st = ops.cholesky(stacked)
    cp.testing.assert_array_equal(info, info_st)
    cp.testing.assert_array_equal(L, L_st)  # same kernels, same arithmetic
    ok = cp.asnumpy(info) == 0
    assert ok[-1]
    clear = [i for i in range(len(shifts)) if clear_pivots(a + shifts[i] * np.eye(d), info_cpu[i])]
    np.testing.assert_array_equal(cp.asnumpy(info)[clear], info_cpu[clear])
    tol = 1e-9 if dtype == np.float64 else 5e-3
    both = ok & (info_cpu == 0)
    np.testing.assert_allclose(
        cp.asnumpy(L)[both], L_cpu[both], rtol=0, atol=tol * np.abs(L_cpu[both]).max()
    )


@pytest.mark.parametrize("method", ["shift", "eig"])
def test_cholesky_repair_gpu(method, rng):
    d = 64
    mats = []
    for i in range(8):
        x = rng.standard_normal((d // 2, d)) / np.sqrt(d)
        g = x.T @ x + 0.01 * np.eye(d)
        if i % 2:
            z = rng.standard_normal((d, d))
            g = g + (z + z.T) / 2  # clearly indefinite
        mats.append(g)
    a = np.stack(mats)
    L, report = linalg.cholesky_repair(cp.asarray(a), method=method)
    L_cpu, report_cpu = linalg.cholesky_repair(a, method=method)
    assert isinstance(L, cp.ndarray) and bool(cp.isfinite(L).all())
    assert report.indices == report_cpu.indices == (1, 3, 5, 7)
    assert report.tries == report_cpu.tries
    if method == "shift":
        np.testing.assert_allclose(report.shifts, report_cpu.shifts, rtol=1e-12)
    else:
        np.testing.assert_allclose(report.min_eigenvalues, report_cpu.min_eigenvalues, rtol=1e-8)
    np.testing.assert_allclose(cp.asnumpy(L), L_cpu, rtol=0, atol=1e-8 * np.abs(L_cpu).max())
    bad = a.copy()
    bad[3, 10, 2] = np.nan
    with pytest.raises(ValueError, match=r"a: .*\[3\]"):
        linalg.cholesky_repair(cp.asarray(bad), method=method)


def test_solve_spd_gpu(rng):
    d = 90
    x = rng.standard_normal((d // 2, d)) / np.sqrt(d)
    z = rng.standard_normal((d, d))
    a = np.stack([x.T @ x + 0.1 * np.eye(d), x.T @ x + (z + z.T) / 2])
    b = rng.standard_normal((2, d, 3))
    xs, report = linalg.solve_spd(cp.asarray(a), cp.asarray(b))
    xs_cpu, report_cpu = linalg.solve_spd(a, b)
    assert report.indices == report_cpu.indices == (1,)
    np.testing.assert_allclose(cp.asnumpy(xs), xs_cpu, rtol=1e-7, atol=1e-9)
