"""GPU tests of the batched Cholesky kernels (csrc/cuda/cholesky.cu) against LAPACK.

Run with ``python3 -m pytest -m gpu tests/test_gpu_cholesky.py`` on a machine with a CUDA
device, a CUDA build of dpfc_native and CuPy; everything here is skipped otherwise.

What is checked, for every kernel path (one-block small kernel, blocked left- and
right-looking, tensor-core mma and SIMT update GEMMs: forced through the DPFC_CHOL_*
environment variables) and both dtypes:
  * reconstruction error ||L L^T - A|| / ||A|| within a small multiple of LAPACK potrf's
    own in the same precision, on fresh random SPD matrices of odd sizes;
  * info equal to LAPACK's for indefinite matrices failing at a known column, NaN/Inf
    placed at known positions, and noisy (indefinite) Gram matrices;
  * failed matrices are all NaN; every output element is written (outputs poisoned
    before the native call); zeros above the diagonal;
  * cho_solve against float64 references, with every broadcast form;
  * cholesky_shifts and cholesky_repair on the GPU agree with the CPU path;
  * no synchronisation: the native calls can be captured into a CUDA graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.linalg.lapack as lapack

import dpfc_native
from dpfc_native import linalg, ops

from conftest import requires_gpu

pytestmark = [pytest.mark.gpu, requires_gpu]

DTYPES = [np.float64, np.float32]
EPS = {np.float64: np.finfo(np.float64).eps, np.float32: np.finfo(np.float32).eps}

# Kernel paths, forced through the DPFC_CHOL_* variables (the kernel configuration passes
# them to the native launcher).
PATHS = {
    "auto": {},
    "blocked-left-mma": {"DPFC_CHOL_SMALL_MAX": "0", "DPFC_CHOL_SCHEDULE": "left", "DPFC_CHOL_KERNEL": "mma"},
    "blocked-right-mma": {"DPFC_CHOL_SMALL_MAX": "0", "DPFC_CHOL_SCHEDULE": "right", "DPFC_CHOL_KERNEL": "mma"},
    "blocked-left-simt": {"DPFC_CHOL_SMALL_MAX": "0", "DPFC_CHOL_SCHEDULE": "left", "DPFC_CHOL_KERNEL": "simt"},
    "blocked-right-simt": {"DPFC_CHOL_SMALL_MAX": "0", "DPFC_CHOL_SCHEDULE": "right", "DPFC_CHOL_KERNEL": "simt"},
}
AUTO_SIZES = [1, 2, 3, 16, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 200, 257, 1000, 1664]
BLOCKED_SIZES = [1, 2, 33, 64, 65, 127, 129, 191, 257, 1000]


@pytest.fixture
def cp():
    import cupy

    return cupy


@pytest.fixture
def path_env(request, kernel_env):
    kernel_env(DPFC_CHOL_SMALL_MAX=None, DPFC_CHOL_SCHEDULE=None, DPFC_CHOL_KERNEL=None)
    kernel_env(**PATHS[request.param])
    return request.param


def _core():
    return dpfc_native._core


def _chol_options():
    """The kernel options of the active configuration, for direct calls into _core."""
    from dpfc_native import _gpu_linalg

    return _gpu_linalg._options()


def _spd_batch(cp, seed, batch, d, dtype, ridge=0.05):
    """Fresh random SPD matrices (float64 on the device, then cast), never zeros."""
    g = cp.random.default_rng(seed)
    n = d + 8
    x = g.standard_normal((batch, n, d), dtype=cp.float64)
    a = cp.einsum("bni,bnj->bij", x, x) / n + ridge * cp.eye(d)
    return a.astype(dtype)


def _sym_from_lower(a):
    return np.tril(a) + np.swapaxes(np.tril(a, -1), -1, -2)


def _recon_err(cp, L, a):
    """||L L^T - A|| / ||A|| in float64 on the device, per matrix (A from its lower part)."""
    L64 = cp.tril(cp.asarray(L, dtype=cp.float64))
    a64 = cp.asarray(a, dtype=cp.float64)
    a64 = cp.tril(a64) + cp.swapaxes(cp.tril(a64, -1), -1, -2)
    r = L64 @ cp.swapaxes(L64, -1, -2) - a64
    num = cp.linalg.norm(r.reshape(r.shape[0], -1), axis=1)
    den = cp.linalg.norm(a64.reshape(a64.shape[0], -1), axis=1)
    return cp.asnumpy(num / den)


def _lapack_potrf(a):
    """LAPACK potrf on every matrix of a host batch: (L, info) with L NaN where info != 0."""
    potrf = lapack.dpotrf if a.dtype == np.float64 else lapack.spotrf
    L = np.empty_like(a)
    info = np.zeros(a.shape[0], dtype=np.int32)
    for i in range(a.shape[0]):
        li, code = potrf(a[i], lower=1, clean=1, overwrite_a=0)
        # Some LAPACKs (OpenBLAS in scipy's wheels) let a NaN pivot through; the defined
        # rule (ops.cholesky) is the first pivot that is not > 0, NaN included.
        valid = np.diagonal(li)[: code - 1 if code > 0 else a.shape[-1]]
        if not (valid > 0).all():
            code = int(np.argmin(valid > 0)) + 1
        info[i] = code
        L[i] = li if code == 0 else np.nan
    return L, info


def _check_factor_against_lapack(cp, a_dev, L_dev, info_dev):
    a = cp.asnumpy(a_dev)
    L = cp.asnumpy(L_dev)
    info = cp.asnumpy(info_dev)
    L_ref, info_ref = _lapack_potrf(a)
    np.testing.assert_array_equal(info, info_ref)
    assert (info == 0).all()
    assert np.isfinite(L).all()
    assert (np.triu(L, 1) == 0).all(), "zeros strictly above the diagonal"
    assert (np.diagonal(L, axis1=-2, axis2=-1) > 0).all()
    eps = EPS[a.dtype.type]
    err = _recon_err(cp, L_dev, a_dev)
    err_ref = _recon_err(cp, cp.asarray(L_ref), a_dev)
    bound = 8.0 * np.maximum(err_ref, 4.0 * eps)
    assert (err <= bound).all(), f"reconstruction error {err} vs LAPACK {err_ref}"
    # The factor itself (well conditioned inputs: ridge 0.05).
    tol = 1e-9 if a.dtype == np.float64 else 5e-3
    scale = np.abs(L_ref).max(axis=(-2, -1), keepdims=True)
    assert (np.abs(L - L_ref) <= tol * scale).all()


# --------------------------------------------------------------------------------------
# Factorisation accuracy
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path_env", ["auto"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", AUTO_SIZES)
@pytest.mark.parametrize("batch", [1, 3])
def test_factor_random_spd_auto(cp, path_env, dtype, d, batch, rng):
    a = _spd_batch(cp, int(rng.integers(1 << 31)), batch, d, dtype)
    L, info = ops.cholesky(a)
    assert L.dtype == dtype and L.shape == (batch, d, d) and info.dtype == np.int32
    _check_factor_against_lapack(cp, a, L, info)


@pytest.mark.parametrize("path_env", [p for p in PATHS if p != "auto"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", BLOCKED_SIZES)
@pytest.mark.parametrize("batch", [1, 5])
def test_factor_random_spd_blocked(cp, path_env, dtype, d, batch, rng):
    a = _spd_batch(cp, int(rng.integers(1 << 31)), batch, d, dtype)
    L, info = ops.cholesky(a)
    _check_factor_against_lapack(cp, a, L, info)


@pytest.mark.parametrize("path_env", list(PATHS), indirect=True)
def test_factor_1664_each_path(cp, path_env, rng):
    a = _spd_batch(cp, int(rng.integers(1 << 31)), 2, 1664, np.float64)
    L, info = ops.cholesky(a)
    _check_factor_against_lapack(cp, a, L, info)


def test_unbatched_and_nd_batch_shapes(cp, rng):
    a = _spd_batch(cp, int(rng.integers(1 << 31)), 6, 40, np.float64)
    L2, info2 = ops.cholesky(a[0])
    assert L2.shape == (40, 40) and info2.shape == ()
    L4, info4 = ops.cholesky(a.reshape(2, 3, 40, 40))
    assert L4.shape == (2, 3, 40, 40) and info4.shape == (2, 3)
    L, _ = ops.cholesky(a)
    cp.testing.assert_array_equal(L4.reshape(6, 40, 40), L)
    cp.testing.assert_array_equal(L2, L[0])


@pytest.mark.parametrize("d", [7, 64, 130])
def test_non_contiguous_input(cp, d, rng):
    a = _spd_batch(cp, int(rng.integers(1 << 31)), 4, d, np.float64)
    view = cp.swapaxes(a, -1, -2)[::2]  # symmetric, so the transpose is the same matrix
    assert not view.flags.c_contiguous
    L, info = ops.cholesky(view)
    L_ref, _ = ops.cholesky(cp.ascontiguousarray(view))
    cp.testing.assert_array_equal(L, L_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,batch", [(8, 20000), (32, 5000), (64, 3000), (100, 2000), (128, 2000), (300, 200)])
def test_large_batches(cp, dtype, d, batch, rng):
    a = _spd_batch(cp, int(rng.integers(1 << 31)), batch, d, dtype)
    L, info = ops.cholesky(a)
    assert int(cp.count_nonzero(info)) == 0
    err = _recon_err(cp, L, a)
    assert err.max() <= 64 * d ** 0.5 * EPS[dtype]
    # LAPACK on a random subset.
    sub = rng.choice(batch, size=8, replace=False)
    _check_factor_against_lapack(cp, a[sub], L[sub], info[sub])


@pytest.mark.parametrize("path_env", ["blocked-left-mma", "blocked-right-mma"], indirect=True)
def test_blocked_workspace_chunks(cp, path_env, rng):
    """d = 200: 4 diagonal tiles (128 KiB) per matrix, so 9000 matrices span two work-space
    chunks of 8192; failures in both chunks."""
    batch, d = 9000, 200
    a = _spd_batch(cp, int(rng.integers(1 << 31)), batch, d, np.float64)
    a[8191, 150, 150] = -1.0  # last matrix of chunk 0 (pivot 151 < 0: a_kk < 0)
    a[8192, 10, 3] = cp.nan  # first matrix of chunk 1 -> info 11
    L, info = ops.cholesky(a)
    info_h = cp.asnumpy(info)
    assert info_h[8191] == 151 and info_h[8192] == 11
    assert np.count_nonzero(info_h) == 2
    ok = cp.asarray(info_h == 0)
    err = _recon_err(cp, L[ok], a[ok])
    assert err.max() <= 64 * d**0.5 * EPS[np.float64]
    assert bool(cp.isnan(L[8191]).all()) and bool(cp.isnan(L[8192]).all())
    sub = np.array([0, 8190, 8193, batch - 1])
    _check_factor_against_lapack(cp, a[sub], L[sub], info[sub])


# --------------------------------------------------------------------------------------
# Failures: info and NaN
# --------------------------------------------------------------------------------------


def _fail_at(a_host, k, delta=0.5):
    """Make the pivot of column k (0-based) equal to -delta x its old value: info = k + 1."""
    a = a_host.copy()
    L0 = np.linalg.cholesky(a.astype(np.float64))
    a[k, k] -= (1.0 + delta) * L0[k, k] ** 2
    return a


INDEF_CASES = [
    (5, [0, 1, 4]),
    (33, [0, 15, 31, 32]),
    (100, [0, 63, 64, 99]),
    (128, [3, 127]),
    (129, [0, 63, 64, 127, 128]),
    (300, [1, 64, 65, 200, 299]),
    (1000, [0, 511, 999]),
]


@pytest.mark.parametrize("path_env", list(PATHS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,cols", INDEF_CASES)
def test_indefinite_known_column(cp, path_env, dtype, d, cols, rng):
    base = cp.asnumpy(_spd_batch(cp, int(rng.integers(1 << 31)), len(cols) + 2, d, np.float64))
    mats = [base[0]]
    for j, k in enumerate(cols):
        mats.append(_fail_at(base[j + 1], k))
    mats.append(base[-1])
    a = np.stack(mats).astype(dtype)
    L, info = ops.cholesky(cp.asarray(a))
    info_h = cp.asnumpy(info)
    L_h = cp.asnumpy(L)
    _, info_ref = _lapack_potrf(a)
    expected = np.array([0] + [k + 1 for k in cols] + [0])
    np.testing.assert_array_equal(info_ref, expected)  # the construction is right
    np.testing.assert_array_equal(info_h, expected)
    for i in range(len(mats)):
        if expected[i]:
            assert np.isnan(L_h[i]).all(), "a failed matrix is all NaN"
        else:
            assert np.isfinite(L_h[i]).all()
    ok = expected == 0
    _check_factor_against_lapack(cp, cp.asarray(a[ok]), L[cp.asarray(ok)], info[cp.asarray(ok)])


def _clear_pivots(a, info):
    """True if the pivots up to LAPACK's failing one are clearly away from zero, so that
    rounding (a different summation order) cannot change info."""
    k = info - 1
    a = _sym_from_lower(a.astype(np.float64))
    scale = np.abs(a).max()
    if k < 0:
        return np.linalg.eigvalsh(a).min() > 1e-6 * scale
    if k > 0:
        try:
            Lk = np.linalg.cholesky(a[:k, :k])
        except np.linalg.LinAlgError:
            return False
        if (np.diag(Lk) ** 2).min() < 1e-6 * scale:
            return False
        row = scipy.linalg.solve_triangular(Lk, a[k, :k], lower=True)
        piv = a[k, k] - row @ row
    else:
        piv = a[0, 0]
    return piv < -1e-6 * scale


@pytest.mark.parametrize("path_env", ["auto", "blocked-left-mma", "blocked-right-mma"], indirect=True)
@pytest.mark.parametrize("d", [20, 96, 150, 400])
def test_noisy_gram_info_matches_lapack(cp, path_env, d, rng):
    n = d // 3
    x = rng.standard_normal((12, n, d)) / np.sqrt(d)
    g = np.einsum("bni,bnj->bij", x, x)
    z = rng.standard_normal((12, d, d)) * np.linspace(0.001, 0.2, 12)[:, None, None]
    a = g + (z + np.swapaxes(z, -1, -2)) / 2
    L, info = ops.cholesky(cp.asarray(a))
    _, info_ref = _lapack_potrf(a)
    info_h = cp.asnumpy(info)
    checked = 0
    for i in range(a.shape[0]):
        if _clear_pivots(a[i], info_ref[i]):
            assert info_h[i] == info_ref[i], (i, info_h[i], info_ref[i])
            checked += 1
    assert checked >= 4
    assert (info_h != 0).sum() >= 3, "the construction should give indefinite matrices"
    L_h = cp.asnumpy(L)
    assert np.isnan(L_h[info_h != 0]).all() and np.isfinite(L_h[info_h == 0]).all()


NAN_CASES = [
    (31, [(0, 0), (5, 2), (30, 0), (30, 30), (17, 16)]),
    (100, [(0, 0), (64, 63), (99, 1), (70, 70)]),
    (300, [(0, 0), (130, 7), (64, 0), (299, 298), (200, 200), (128, 64)]),
]


@pytest.mark.parametrize("path_env", list(PATHS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("d,positions", NAN_CASES)
def test_nan_inf_input(cp, path_env, dtype, bad, d, positions, rng):
    a = cp.asnumpy(_spd_batch(cp, int(rng.integers(1 << 31)), len(positions) + 1, d, dtype))
    expected = [0]
    for j, (r, c) in enumerate(positions):
        val = bad if not (bad == np.inf and r == c) else -np.inf  # +inf pivots pass LAPACK
        a[j + 1, r, c] = val
        expected.append(r + 1)  # row r's pivot is the first to see it
    L, info = ops.cholesky(cp.asarray(a))
    _, info_ref = _lapack_potrf(a)
    np.testing.assert_array_equal(cp.asnumpy(info), expected)
    np.testing.assert_array_equal(info_ref, expected)
    L_h = cp.asnumpy(L)
    assert np.isnan(L_h[1:]).all() and np.isfinite(L_h[0]).all()


@pytest.mark.parametrize("path_env", ["auto", "blocked-left-mma", "blocked-right-simt"], indirect=True)
@pytest.mark.parametrize("d", [9, 100, 200])
def test_upper_triangle_not_read(cp, path_env, d, rng):
    a = _spd_batch(cp, int(rng.integers(1 << 31)), 3, d, np.float64)
    junk = a.copy()
    iu = cp.triu_indices(d, 1)
    junk[:, iu[0], iu[1]] = cp.nan
    L1, i1 = ops.cholesky(a)
    L2, i2 = ops.cholesky(junk)
    cp.testing.assert_array_equal(i2, 0)
    cp.testing.assert_array_equal(L1, L2)


# --------------------------------------------------------------------------------------
# Every element written (low-level call with poisoned outputs), no synchronisation
# --------------------------------------------------------------------------------------

_POISON = {np.float64: 7.77e77, np.float32: 7.7e37}


@pytest.mark.parametrize("path_env", list(PATHS), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 3, 32, 65, 128, 129, 257])
def test_every_element_written(cp, path_env, dtype, d, rng):
    batch = 5
    a = cp.asnumpy(_spd_batch(cp, int(rng.integers(1 << 31)), batch, d, dtype))
    a[2] = _fail_at(a[2].astype(np.float64), d // 2).astype(dtype)
    a[4, d - 1, 0] = np.nan
    a_dev = cp.asarray(a)
    L = cp.full((batch, d, d), _POISON[dtype], dtype=dtype)
    info = cp.full((batch,), -12345, dtype=cp.int32)
    code = 1 if dtype == np.float64 else 0  # runtime.cuh DType
    _core().cuda_cholesky(
        a_dev.data.ptr, d * d, d, 0, L.data.ptr, info.data.ptr, batch, d, code,
        cp.cuda.get_current_stream().ptr, **_chol_options(),
    )
    L_h, info_h = cp.asnumpy(L), cp.asnumpy(info)
    assert not (L_h == _POISON[dtype]).any(), "an output element was not written"
    exp2 = d // 2 + 1
    np.testing.assert_array_equal(info_h, [0, 0, exp2, 0, d] if d > 1 else [0, 0, 1, 0, 1])
    assert np.isnan(L_h[[2, 4]]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,m", [(1, 1), (5, 3), (64, 8), (100, 9), (257, 20)])
def test_solve_every_element_written(cp, dtype, d, m, rng):
    batch = 3
    a = _spd_batch(cp, int(rng.integers(1 << 31)), batch, d, dtype)
    L, _ = ops.cholesky(a)
    b = cp.asarray(rng.standard_normal((batch, d, m)), dtype=dtype)
    x = cp.full((batch, d, m), _POISON[dtype], dtype=dtype)
    code = 1 if dtype == np.float64 else 0  # runtime.cuh DType
    _core().cuda_cho_solve(
        L.data.ptr, d * d, b.data.ptr, d * m, m, x.data.ptr, batch, d, m, code,
        cp.cuda.get_current_stream().ptr,
    )
    assert not bool((x == _POISON[dtype]).any())
    assert bool(cp.isfinite(x).all())


@pytest.mark.parametrize("schedule", ["left", "right"])
def test_caller_workspace_chunks(cp, kernel_env, schedule, rng):
    """A caller work space holding one matrix's diagonal tiles: the batch runs one matrix
    per chunk and gives the same result as the internally allocated work space."""
    kernel_env(DPFC_CHOL_SCHEDULE=schedule)
    kernel_env(DPFC_CHOL_SMALL_MAX=None)
    batch, d = 7, 150
    a = _spd_batch(cp, int(rng.integers(1 << 31)), batch, d, np.float64)
    a[3, 100, 100] = -5.0
    need = _core().cuda_cholesky_workspace_bytes(batch, d, 1)
    per = 3 * 64 * 64 * 8
    assert need == batch * per
    assert _core().cuda_cholesky_workspace_bytes(batch, 100, 1) == 0  # one-block kernel
    ws = cp.empty((per,), dtype=cp.uint8)
    L1 = cp.full((batch, d, d), _POISON[np.float64])
    i1 = cp.full((batch,), -1, dtype=cp.int32)
    stream = cp.cuda.get_current_stream().ptr
    _core().cuda_cholesky(a.data.ptr, d * d, d, 0, L1.data.ptr, i1.data.ptr, batch, d, 1,
                          stream, ws.data.ptr, per, **_chol_options())
    L2, i2 = ops.cholesky(a)
    cp.testing.assert_array_equal(i1, i2)
    cp.testing.assert_array_equal(L1, L2)
    assert int(i1[3]) == 101
    with pytest.raises(ValueError, match="workspace"):
        _core().cuda_cholesky(a.data.ptr, d * d, d, 0, L1.data.ptr, i1.data.ptr, batch, d,
                              1, stream, ws.data.ptr, per - 8, **_chol_options())


def test_no_sync_graph_capture(cp, rng):
    """The native calls only enqueue work: they can be captured into a CUDA graph."""
    d, batch = 200, 4
    a = _spd_batch(cp, int(rng.integers(1 << 31)), batch, d, np.float64)
    L = cp.empty_like(a)
    info = cp.empty((batch,), dtype=cp.int32)
    b = cp.asarray(rng.standard_normal((batch, d, 5)))
    x = cp.empty_like(b)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        _core().cuda_cholesky(a.data.ptr, d * d, d, 0, L.data.ptr, info.data.ptr, batch, d,
                              1, stream.ptr)
        _core().cuda_cho_solve(L.data.ptr, d * d, b.data.ptr, d * 5, 5, x.data.ptr, batch, d, 5,
                               1, stream.ptr)
        graph = stream.end_capture()
        graph.launch()
    stream.synchronize()
    L_ref, _ = ops.cholesky(a)
    cp.testing.assert_array_equal(L, L_ref)
    cp.testing.assert_allclose(a @ x, b, rtol=1e-8, atol=1e-8)


def test_env_validation(cp, kernel_env):
    a = cp.eye(4)[None]
    kernel_env(DPFC_CHOL_KERNEL="tensor")
    with pytest.raises(ValueError, match="DPFC_CHOL_KERNEL"):
        ops.cholesky(a)
    kernel_env(DPFC_CHOL_KERNEL="mma")
    kernel_env(DPFC_CHOL_SCHEDULE="sideways")
    with pytest.raises(ValueError, match="DPFC_CHOL_SCHEDULE"):
        ops.cholesky(a)


def test_plan_follows_env(cp, kernel_env):
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
# cho_solve
# --------------------------------------------------------------------------------------


def _solve_ref(L_h, b_h):
    """float64 reference of L L^T x = b per batch entry (L, b broadcast already)."""
    out = np.empty(b_h.shape, dtype=np.float64)
    for i in range(b_h.shape[0]):
        out[i] = scipy.linalg.cho_solve((L_h[i].astype(np.float64), True), b_h[i].astype(np.float64))
    return out


def _lapack_solve_same_precision(L_h, b_h, dtype):
    potrs = lapack.dpotrs if dtype == np.float64 else lapack.spotrs
    out = np.empty(b_h.shape, dtype=dtype)
    for i in range(b_h.shape[0]):
        out[i], _ = potrs(L_h[i].astype(dtype), b_h[i].astype(dtype), lower=1)
    return out


def _rel(x, ref):
    x = np.asarray(x, dtype=np.float64)
    return np.linalg.norm((x - ref).reshape(x.shape[0], -1), axis=1) / np.linalg.norm(
        ref.reshape(ref.shape[0], -1), axis=1
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 5, 63, 64, 65, 129, 300, 1000])
@pytest.mark.parametrize("m", [1, 7, 8, 9, 100])
def test_cho_solve_matches_reference(cp, dtype, d, m, rng):
    batch = 3
    a = _spd_batch(cp, int(rng.integers(1 << 31)), batch, d, dtype)
    L, info = ops.cholesky(a)
    b = cp.asarray(rng.standard_normal((batch, d, m)), dtype=dtype)
    x = ops.cho_solve(L, b)
    assert x.dtype == dtype and x.shape == (batch, d, m)
    L_h, b_h = cp.asnumpy(L), cp.asnumpy(b)
    ref = _solve_ref(L_h, b_h)
    err = _rel(cp.asnumpy(x), ref)
    err_lapack = _rel(_lapack_solve_same_precision(L_h, b_h, dtype), ref)
    assert (err <= 8 * np.maximum(err_lapack, 16 * EPS[dtype])).all(), (err, err_lapack)


@pytest.mark.parametrize("d,m", [(257, 1000), (1000, 1000), (1664, 64)])
def test_cho_solve_many_rhs(cp, d, m, rng):
    a = _spd_batch(cp, int(rng.integers(1 << 31)), 1, d, np.float64)[0]
    L, _ = ops.cholesky(a)
    b = cp.asarray(rng.standard_normal((d, m)))
    x = ops.cho_solve(L, b)
    ref = _solve_ref(cp.asnumpy(L)[None], cp.asnumpy(b)[None])
    err_lapack = _rel(_lapack_solve_same_precision(cp.asnumpy(L)[None], cp.asnumpy(b)[None], np.float64), ref)
    assert _rel(cp.asnumpy(x)[None], ref)[0] <= 8 * max(err_lapack[0], 16 * EPS[np.float64])


def test_cho_solve_broadcasting(cp, rng):
    d, m = 70, 11
    a = _spd_batch(cp, int(rng.integers(1 << 31)), 4, d, np.float64)
    L, _ = ops.cholesky(a)
    L_h = cp.asnumpy(L)
    # Unbatched L, batched b.
    b = cp.asarray(rng.standard_normal((5, d, m)))
    x = ops.cho_solve(L[0], b)
    ref = _solve_ref(np.broadcast_to(L_h[0], (5, d, d)), cp.asnumpy(b))
    assert _rel(cp.asnumpy(x), ref).max() < 1e-10
    # Batched L, one b block for all (b[None]).
    b1 = cp.asarray(rng.standard_normal((d, m)))
    x = ops.cho_solve(L, b1[None])
    ref = _solve_ref(L_h, np.broadcast_to(cp.asnumpy(b1), (4, d, m)))
    assert x.shape == (4, d, m) and _rel(cp.asnumpy(x), ref).max() < 1e-10
    # Vectors, batched both.
    bv = cp.asarray(rng.standard_normal((4, d)))
    xv = ops.cho_solve(L, bv)
    ref = _solve_ref(L_h, cp.asnumpy(bv)[..., None])[..., 0]
    assert xv.shape == (4, d) and np.abs(cp.asnumpy(xv) - ref).max() < 1e-9 * np.abs(ref).max()
    # General broadcast (2, 1) x (1, 3) -> (2, 3).
    L4 = L.reshape(2, 2, d, d)[:, :1]
    b3 = cp.asarray(rng.standard_normal((1, 3, d, m)))
    x = ops.cho_solve(L4, b3)
    assert x.shape == (2, 3, d, m)
    ref = _solve_ref(
        np.broadcast_to(cp.asnumpy(L4), (2, 3, d, d)).reshape(6, d, d),
        np.broadcast_to(cp.asnumpy(b3), (2, 3, d, m)).reshape(6, d, m),
    )
    assert _rel(cp.asnumpy(x).reshape(6, d, m), ref).max() < 1e-10


def test_cho_solve_dtypes_and_nan_factor(cp, rng):
    d = 40
    a = _spd_batch(cp, int(rng.integers(1 << 31)), 2, d, np.float32)
    L, _ = ops.cholesky(a)
    b64 = cp.asarray(rng.standard_normal((2, d, 3)))
    x = ops.cho_solve(L, b64)
    assert x.dtype == np.float64
    # The CPU rule, result_type(L, b, float32): int16 keeps float32, int64 promotes.
    bint = cp.asarray(rng.integers(-5, 5, size=(2, d, 3)))
    assert ops.cho_solve(L, bint.astype(cp.int16)).dtype == np.float32
    assert ops.cho_solve(L, bint).dtype == np.float64
    Lnan = L.copy()
    Lnan[1] = cp.nan
    xn = ops.cho_solve(Lnan, b64)
    assert bool(cp.isnan(xn[1]).all()) and bool(cp.isfinite(xn[0]).all())


# --------------------------------------------------------------------------------------
# linalg helpers on the GPU agree with the CPU path
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [24, 150])
def test_cholesky_shifts_gpu(cp, dtype, d, rng):
    x = rng.standard_normal((d // 2, d)) / np.sqrt(d)
    z = rng.standard_normal((d, d)) * 0.1
    a = (x.T @ x + (z + z.T) / 2).astype(dtype)
    shifts = np.array([0.0, 1e-3, 0.05, 0.3, 1.0, 5.0])
    L, info = linalg.cholesky_shifts(cp.asarray(a), cp.asarray(shifts))
    L_cpu, info_cpu = linalg.cholesky_shifts(a, shifts)
    stacked = cp.asarray(a)[None] + cp.asarray(shifts.astype(dtype))[:, None, None] * cp.eye(d, dtype=dtype)
    L_st, info_st = ops.cholesky(stacked)
    cp.testing.assert_array_equal(info, info_st)
    cp.testing.assert_array_equal(L, L_st)  # same kernels, same arithmetic
    ok = cp.asnumpy(info) == 0
    assert ok[-1]
    clear = [i for i in range(len(shifts)) if _clear_pivots(a + shifts[i] * np.eye(d), info_cpu[i])]
    np.testing.assert_array_equal(cp.asnumpy(info)[clear], info_cpu[clear])
    tol = 1e-9 if dtype == np.float64 else 5e-3
    both = ok & (info_cpu == 0)
    np.testing.assert_allclose(cp.asnumpy(L)[both], L_cpu[both], rtol=0, atol=tol * np.abs(L_cpu[both]).max())


@pytest.mark.parametrize("method", ["shift", "eig"])
def test_cholesky_repair_gpu(cp, method, rng):
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


def test_solve_spd_gpu(cp, rng):
    d = 90
    x = rng.standard_normal((d // 2, d)) / np.sqrt(d)
    z = rng.standard_normal((d, d))
    a = np.stack([x.T @ x + 0.1 * np.eye(d), x.T @ x + (z + z.T) / 2])
    b = rng.standard_normal((2, d, 3))
    xs, report = linalg.solve_spd(cp.asarray(a), cp.asarray(b))
    xs_cpu, report_cpu = linalg.solve_spd(a, b)
    assert report.indices == report_cpu.indices == (1,)
    np.testing.assert_allclose(cp.asnumpy(xs), xs_cpu, rtol=1e-7, atol=1e-9)
