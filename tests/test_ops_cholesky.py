"""The batched Cholesky ops (ops.cholesky, ops.cholesky_shifts, ops.cho_solve; CPU bodies
in _cpu_linalg, GPU glue in _gpu_linalg) against LAPACK and float64 references, one body
per behaviour on every backend.

Each test runs on NumPy and, with ``-m gpu`` on a machine with a device, on CuPy. The GPU
cases also force every kernel path (one-block small kernel, blocked left- and
right-looking, tensor-core mma and SIMT update GEMMs) through the DPFC_CHOL_* variables:
``path`` is "auto" on the CPU, where the variables do not apply. Checked:
  * reconstruction error ||L L^T - A|| / ||A|| within a small multiple of LAPACK potrf's
    own in the same precision, on fresh random SPD matrices of odd sizes;
  * info equal to LAPACK's for indefinite matrices failing at a known column, NaN/Inf
    placed at known positions, and noisy (indefinite) Gram matrices;
  * failed matrices are all NaN; outputs are NaN-poisoned before the ops write them
    (``poisoned``); zeros above the diagonal; the upper triangle is never read;
  * cho_solve against float64 references, with every broadcast form.
Raw kernel calls (poisoned with a finite value), work spaces and graph capture are
GPU-only facts: tests/test_gpu_only.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from _reference import CHOL_PATHS as PATHS
from _reference import (
    EPS,
    check_factor_against_lapack,
    clear_pivots,
    fail_at,
    lapack_potrf,
    lapack_solve_same_precision,
    recon_err,
    rel_rows,
    solve_ref,
    spd_batch,
    to_host,
    xp_cases,
)

from dpfc_native import ops

DTYPES = ["float64", "float32"]

BLOCKED = [p for p in PATHS if p != "auto"]
AUTO_SIZES = [1, 2, 3, 16, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 200, 257, 1000, 1664]
BLOCKED_SIZES = [1, 2, 33, 64, 65, 127, 129, 191, 257, 1000]
BOTH = ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)]


@pytest.fixture
def use_path(kernel_env):
    """Forces one kernel path (a PATHS key) for the rest of the test."""

    def use(path):
        kernel_env(DPFC_CHOL_SMALL_MAX=None, DPFC_CHOL_SCHEDULE=None, DPFC_CHOL_KERNEL=None)
        kernel_env(**PATHS[path])

    return use


def _seed(rng) -> int:
    return int(rng.integers(1 << 31))


# --------------------------------------------------------------------------------------
# Factorisation accuracy
# --------------------------------------------------------------------------------------

FACTOR_CASES = xp_cases(
    cpu=[("auto", dt, d, 5) for dt in DTYPES for d in (1, 2, 31, 130)],
    gpu=[("auto", dt, d, b) for dt in DTYPES for d in AUTO_SIZES for b in (1, 3)]
    + [(p, dt, d, b) for p in BLOCKED for dt in DTYPES for d in BLOCKED_SIZES for b in (1, 5)]
    + [(p, "float64", 1664, 2) for p in PATHS],
)


@pytest.mark.parametrize("xp,path,dtype,d,batch", FACTOR_CASES, indirect=["xp"])
def test_factor_random_spd(poisoned, xp, rng, use_path, path, dtype, d, batch):
    use_path(path)
    a = spd_batch(xp, rng, batch, d, dtype)
    L, info = ops.cholesky(a)
    assert L.dtype == np.dtype(dtype) and L.shape == (batch, d, d) and info.dtype == np.int32
    check_factor_against_lapack(xp, a, L, info)
    if xp is np:  # LAPACK itself: also within 10 d eps of A
        assert recon_err(xp, L, a).max() < EPS[np.dtype(dtype)] * 10 * d


@pytest.mark.parametrize("xp", BOTH, indirect=True)
def test_unbatched_and_nd_batch_shapes(xp, rng):
    a = spd_batch(xp, rng, 6, 40, np.float64)
    L2, info2 = ops.cholesky(a[0])
    assert L2.shape == (40, 40) and info2.shape == ()
    L4, info4 = ops.cholesky(a.reshape(2, 3, 40, 40))
    assert L4.shape == (2, 3, 40, 40) and info4.shape == (2, 3)
    L, _ = ops.cholesky(a)
    np.testing.assert_array_equal(to_host(L4).reshape(6, 40, 40), to_host(L))
    np.testing.assert_array_equal(to_host(L2), to_host(L[0]))
    eye = xp.asarray(np.broadcast_to(np.eye(4) * 2, (2, 3, 4, 4)).copy())
    L, info = ops.cholesky(eye)
    assert L.shape == (2, 3, 4, 4) and info.shape == (2, 3)
    np.testing.assert_allclose(to_host(L), np.sqrt(2) * np.broadcast_to(np.eye(4), (2, 3, 4, 4)))


@pytest.mark.parametrize("xp", BOTH, indirect=True)
@pytest.mark.parametrize("d", [7, 64, 130])
def test_non_contiguous_input(xp, d, rng):
    a = spd_batch(xp, rng, 4, d, np.float64)
    view = xp.swapaxes(a, -1, -2)[::2]  # symmetric, so the transpose is the same matrix
    assert not view.flags.c_contiguous
    L, info = ops.cholesky(view)
    L_ref, _ = ops.cholesky(xp.ascontiguousarray(view))
    np.testing.assert_array_equal(to_host(L), to_host(L_ref))


LARGE_CASES = xp_cases(
    cpu=[(dt, d, b) for dt in DTYPES for d, b in [(8, 2000), (64, 50)]],
    gpu=[
        (dt, d, b)
        for dt in DTYPES
        for d, b in [(8, 20000), (32, 5000), (64, 3000), (100, 2000), (128, 2000), (300, 200)]
    ],
)


@pytest.mark.parametrize("xp,dtype,d,batch", LARGE_CASES, indirect=["xp"])
def test_large_batches(xp, rng, dtype, d, batch):
    a = spd_batch(xp, rng, batch, d, dtype)
    L, info = ops.cholesky(a)
    assert int(np.count_nonzero(to_host(info))) == 0
    err = recon_err(xp, L, a)
    assert err.max() <= 64 * d**0.5 * EPS[np.dtype(dtype)]
    # LAPACK on a random subset.
    sub = rng.choice(batch, size=8, replace=False)
    check_factor_against_lapack(xp, a[sub], L[sub], info[sub])


# --------------------------------------------------------------------------------------
# Failures: info and NaN
# --------------------------------------------------------------------------------------

INDEF_CASES = [
    (5, [0, 1, 4]),
    (33, [0, 15, 31, 32]),
    (100, [0, 63, 64, 99]),
    (128, [3, 127]),
    (129, [0, 63, 64, 127, 128]),
    (300, [1, 64, 65, 200, 299]),
    (1000, [0, 511, 999]),
]


@pytest.mark.parametrize(
    "xp,path,dtype,d,cols",
    xp_cases(
        cpu=[("auto", dt, d, cols) for dt in DTYPES for d, cols in INDEF_CASES if d <= 129],
        gpu=[(p, dt, d, cols) for p in PATHS for dt in DTYPES for d, cols in INDEF_CASES],
    ),
    indirect=["xp"],
)
def test_indefinite_known_column(poisoned, xp, rng, use_path, path, dtype, d, cols):
    use_path(path)
    base = to_host(spd_batch(np, rng, len(cols) + 2, d, np.float64))
    mats = [base[0]]
    for j, k in enumerate(cols):
        mats.append(fail_at(base[j + 1], k))
    mats.append(base[-1])
    a = np.stack(mats).astype(dtype)
    L, info = ops.cholesky(xp.asarray(a))
    info_h, L_h = to_host(info), to_host(L)
    _, info_ref = lapack_potrf(a)
    expected = np.array([0] + [k + 1 for k in cols] + [0])
    np.testing.assert_array_equal(info_ref, expected)  # the construction is right
    np.testing.assert_array_equal(info_h, expected)
    for i in range(len(mats)):
        if expected[i]:
            assert np.isnan(L_h[i]).all(), "a failed matrix is all NaN"
        else:
            assert np.isfinite(L_h[i]).all()
    ok = np.flatnonzero(expected == 0)
    check_factor_against_lapack(xp, xp.asarray(a[ok]), L[xp.asarray(ok)], info[xp.asarray(ok)])


@pytest.mark.parametrize("xp", BOTH, indirect=True)
@pytest.mark.parametrize("d", [3, 8, 31])
def test_info_on_indefinite_nan_and_zero(xp, rng, d):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = q @ np.diag(rng.uniform(1, 2, d)) @ q.T
    bad = a.copy()
    j = d // 2  # make the leading minor of order j + 1 singular-negative
    bad[j, j] = bad[j, :j] @ np.linalg.solve(bad[:j, :j], bad[:j, j]) - 0.5 if j else -1.0
    nan = a.copy()
    nan[d - 1, 0] = np.nan
    nan[0, d - 1] = np.nan
    L, info = ops.cholesky(xp.asarray(np.stack([a, bad, nan, np.zeros((d, d))])))
    L, info = to_host(L), to_host(info)
    lapack_info = lapack_potrf(bad[None])[1][0]
    assert info[0] == 0
    assert info[1] == lapack_info == j + 1
    assert info[2] == (d if d > 1 else 1)
    assert info[3] == 1
    assert np.isnan(L[1]).all() and np.isnan(L[2]).all() and np.isnan(L[3]).all()
    assert np.isfinite(L[0]).all()


@pytest.mark.parametrize(
    "xp,path,d",
    xp_cases(
        cpu=[("auto", d) for d in (20, 96, 150, 400)],
        gpu=[
            (p, d)
            for p in ("auto", "blocked-left-mma", "blocked-right-mma")
            for d in (20, 96, 150, 400)
        ],
    ),
    indirect=["xp"],
)
def test_noisy_gram_info_matches_lapack(xp, rng, use_path, path, d):
    use_path(path)
    n = d // 3
    x = rng.standard_normal((12, n, d)) / np.sqrt(d)
    g = np.einsum("bni,bnj->bij", x, x)
    z = rng.standard_normal((12, d, d)) * np.linspace(0.001, 0.2, 12)[:, None, None]
    a = g + (z + np.swapaxes(z, -1, -2)) / 2
    L, info = ops.cholesky(xp.asarray(a))
    _, info_ref = lapack_potrf(a)
    info_h = to_host(info)
    checked = 0
    for i in range(a.shape[0]):
        if clear_pivots(a[i], info_ref[i]):
            assert info_h[i] == info_ref[i], (i, info_h[i], info_ref[i])
            checked += 1
    assert checked >= 4
    assert (info_h != 0).sum() >= 3, "the construction should give indefinite matrices"
    L_h = to_host(L)
    assert np.isnan(L_h[info_h != 0]).all() and np.isfinite(L_h[info_h == 0]).all()


NAN_CASES = [
    (31, [(0, 0), (5, 2), (30, 0), (30, 30), (17, 16)]),
    (100, [(0, 0), (64, 63), (99, 1), (70, 70)]),
    (300, [(0, 0), (130, 7), (64, 0), (299, 298), (200, 200), (128, 64)]),
]


@pytest.mark.parametrize(
    "xp,path,dtype,bad,d,positions",
    xp_cases(
        cpu=[
            ("auto", dt, bad, d, pos)
            for dt in DTYPES
            for bad in (np.nan, np.inf)
            for d, pos in NAN_CASES
            if d <= 100
        ],
        gpu=[
            (p, dt, bad, d, pos)
            for p in PATHS
            for dt in DTYPES
            for bad in (np.nan, np.inf)
            for d, pos in NAN_CASES
        ],
    ),
    indirect=["xp"],
)
def test_nan_inf_input(xp, rng, use_path, path, dtype, bad, d, positions):
    use_path(path)
    a = to_host(spd_batch(np, rng, len(positions) + 1, d, dtype))
    expected = [0]
    for j, (r, c) in enumerate(positions):
        val = bad if not (bad == np.inf and r == c) else -np.inf  # +inf pivots pass LAPACK
        a[j + 1, r, c] = val
        expected.append(r + 1)  # row r's pivot is the first to see it
    L, info = ops.cholesky(xp.asarray(a))
    _, info_ref = lapack_potrf(a)
    np.testing.assert_array_equal(to_host(info), expected)
    np.testing.assert_array_equal(info_ref, expected)
    L_h = to_host(L)
    assert np.isnan(L_h[1:]).all() and np.isfinite(L_h[0]).all()


@pytest.mark.parametrize(
    "xp,path,d",
    xp_cases(
        cpu=[("auto", d) for d in (9, 100, 200)],
        gpu=[
            (p, d)
            for p in ("auto", "blocked-left-mma", "blocked-right-simt")
            for d in (9, 100, 200)
        ],
    ),
    indirect=["xp"],
)
def test_upper_triangle_not_read(xp, rng, use_path, path, d):
    use_path(path)
    a = spd_batch(xp, rng, 3, d, np.float64)
    junk = a.copy()
    iu = np.triu_indices(d, 1)
    junk[:, xp.asarray(iu[0]), xp.asarray(iu[1])] = np.nan
    L1, i1 = ops.cholesky(a)
    L2, i2 = ops.cholesky(junk)
    np.testing.assert_array_equal(to_host(i2), 0)
    np.testing.assert_array_equal(to_host(L1), to_host(L2))


# --------------------------------------------------------------------------------------
# cholesky_shifts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("xp", BOTH, indirect=True)
def test_cholesky_shifts_matches_shifted_factors(xp, rng):
    d, shifts = 7, np.array([-50.0, 0.0, 0.5, 3.0])
    m = rng.standard_normal((d, d))
    a = m @ m.T + 0.1 * np.eye(d)
    L, info = ops.cholesky_shifts(xp.asarray(a), xp.asarray(shifts))
    L, info = to_host(L), to_host(info)
    for j, s in enumerate(shifts):
        Lj, ij = ops.cholesky(xp.asarray(a + s * np.eye(d)))
        np.testing.assert_array_equal(info[j], to_host(ij))
        np.testing.assert_array_equal(L[j], to_host(Lj))
    assert info[0] > 0 and np.isnan(L[0]).all() and (info[1:] == 0).all()
    with pytest.raises(ValueError, match="shifts must be finite"):
        ops.cholesky_shifts(xp.asarray(a), xp.asarray([np.nan]))
    with pytest.raises(ValueError, match=r"shape \(d, d\)"):
        ops.cholesky_shifts(xp.asarray(np.stack([a, a])), xp.asarray(shifts))


# --------------------------------------------------------------------------------------
# cho_solve
# --------------------------------------------------------------------------------------

SOLVE_CASES = xp_cases(
    cpu=[(dt, d, m) for dt in DTYPES for d, m in [(1, 1), (7, 3), (130, 11)]],
    gpu=[
        (dt, d, m)
        for dt in DTYPES
        for d in (1, 5, 63, 64, 65, 129, 300, 1000)
        for m in (1, 7, 8, 9, 100)
    ],
)


@pytest.mark.parametrize("xp,dtype,d,m", SOLVE_CASES, indirect=["xp"])
def test_cho_solve_matches_reference(poisoned, xp, rng, dtype, d, m):
    batch = 3
    a = spd_batch(xp, rng, batch, d, dtype)
    L, info = ops.cholesky(a)
    b = xp.asarray(rng.standard_normal((batch, d, m)).astype(dtype))
    x = ops.cho_solve(L, b)
    assert x.dtype == np.dtype(dtype) and x.shape == (batch, d, m)
    L_h, b_h = to_host(L), to_host(b)
    ref = solve_ref(L_h, b_h)
    err = rel_rows(x, ref)
    err_lapack = rel_rows(lapack_solve_same_precision(L_h, b_h, dtype), ref)
    assert (err <= 8 * np.maximum(err_lapack, 16 * EPS[np.dtype(dtype)])).all(), (err, err_lapack)
    # Vectors solve like one-column blocks.
    v = xp.asarray(rng.standard_normal((batch, d)).astype(dtype))
    xv = to_host(ops.cho_solve(L, v))
    ref_v = solve_ref(L_h, to_host(v)[..., None])[..., 0]
    assert xv.shape == (batch, d)
    assert (rel_rows(xv, ref_v) <= 8 * np.maximum(err_lapack, 16 * EPS[np.dtype(dtype)])).all()


@pytest.mark.parametrize(
    "xp,d,m",
    xp_cases(cpu=[(257, 1000)], gpu=[(257, 1000), (1000, 1000), (1664, 64)]),
    indirect=["xp"],
)
def test_cho_solve_many_rhs(xp, rng, d, m):
    a = spd_batch(xp, rng, 1, d, np.float64)[0]
    L, _ = ops.cholesky(a)
    b = xp.asarray(rng.standard_normal((d, m)))
    x = ops.cho_solve(L, b)
    L_h, b_h = to_host(L)[None], to_host(b)[None]
    ref = solve_ref(L_h, b_h)
    err_lapack = rel_rows(lapack_solve_same_precision(L_h, b_h, np.float64), ref)
    assert rel_rows(to_host(x)[None], ref)[0] <= 8 * max(
        err_lapack[0], 16 * EPS[np.dtype(np.float64)]
    )


@pytest.mark.parametrize("xp", BOTH, indirect=True)
def test_cho_solve_broadcasting(xp, rng):
    d, m = 70, 11
    a = spd_batch(xp, rng, 4, d, np.float64)
    L, _ = ops.cholesky(a)
    L_h = to_host(L)
    # Unbatched L, batched b.
    b = xp.asarray(rng.standard_normal((5, d, m)))
    x = ops.cho_solve(L[0], b)
    ref = solve_ref(np.broadcast_to(L_h[0], (5, d, d)), to_host(b))
    assert rel_rows(x, ref).max() < 1e-10
    # Batched L, one b block for all (b[None]).
    b1 = xp.asarray(rng.standard_normal((d, m)))
    x = ops.cho_solve(L, b1[None])
    ref = solve_ref(L_h, np.broadcast_to(to_host(b1), (4, d, m)))
    assert x.shape == (4, d, m) and rel_rows(x, ref).max() < 1e-10
    # Vectors, batched both.
    bv = xp.asarray(rng.standard_normal((4, d)))
    xv = ops.cho_solve(L, bv)
    ref = solve_ref(L_h, to_host(bv)[..., None])[..., 0]
    assert xv.shape == (4, d) and np.abs(to_host(xv) - ref).max() < 1e-9 * np.abs(ref).max()
    # General broadcast (2, 1) x (1, 3) -> (2, 3).
    L4 = L.reshape(2, 2, d, d)[:, :1]
    b3 = xp.asarray(rng.standard_normal((1, 3, d, m)))
    x = ops.cho_solve(L4, b3)
    assert x.shape == (2, 3, d, m)
    ref = solve_ref(
        np.broadcast_to(to_host(L4), (2, 3, d, d)).reshape(6, d, d),
        np.broadcast_to(to_host(b3), (2, 3, d, m)).reshape(6, d, m),
    )
    assert rel_rows(to_host(x).reshape(6, d, m), ref).max() < 1e-10


@pytest.mark.parametrize("xp", BOTH, indirect=True)
def test_cho_solve_dtypes_and_nan_factor(xp, rng):
    d = 40
    a = spd_batch(xp, rng, 2, d, np.float32)
    L, _ = ops.cholesky(a)
    b64 = xp.asarray(rng.standard_normal((2, d, 3)))
    x = ops.cho_solve(L, b64)
    assert x.dtype == np.float64
    # The rule: result_type(L, b, float32): int16 keeps float32, int64 promotes.
    bint = xp.asarray(rng.integers(-5, 5, size=(2, d, 3)))
    assert ops.cho_solve(L, bint.astype(np.int16)).dtype == np.float32
    assert ops.cho_solve(L, bint).dtype == np.float64
    Lnan = L.copy()
    Lnan[1] = np.nan
    xn = to_host(ops.cho_solve(Lnan, b64))
    assert np.isnan(xn[1]).all() and np.isfinite(xn[0]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cho_solve_with_no_right_hand_side(rng, dtype):
    """Zero columns or an empty batch: an empty result of the broadcast shape, as
    np.linalg.solve gives (it was "cannot reshape array of size 0")."""
    a = (rng.standard_normal((3, 3)) + 3 * np.eye(3)).astype(dtype)
    L, _ = ops.cholesky(a @ a.T)
    for b, shape in (
        (np.ones((3, 0)), (3, 0)),
        (np.ones((0, 3, 2)), (0, 3, 2)),
        (np.ones((2, 3, 0)), (2, 3, 0)),
    ):
        x = ops.cho_solve(L, b.astype(dtype))
        assert x.shape == shape and x.dtype == dtype
        assert x.shape == np.linalg.solve(np.broadcast_to(a, shape[:-2] + (3, 3)), b).shape
    x = ops.cho_solve(np.zeros((0, 3, 3), dtype), np.ones((0, 3), dtype))
    assert x.shape == (0, 3)
