"""CPU tests of dpfc_native.linalg: shift batches, repaired Cholesky, SPD solves.

Their GPU agreement with this path is checked in test_gpu_only.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.linalg

from dpfc_native import linalg, ops

DTYPES = [np.float64, np.float32]


def _spd(rng, d, n=None, dtype=np.float64):
    x = rng.standard_normal((n or 2 * d + 3, d))
    return (x.T @ x / x.shape[0] + 0.1 * np.eye(d)).astype(dtype)


def _noisy_gram(rng, d, noise, dtype=np.float64):
    """A Gram matrix plus symmetric noise: typically indefinite for noise >~ its spectrum."""
    x = rng.standard_normal((d // 2 + 1, d)) / np.sqrt(d)
    g = x.T @ x
    z = rng.standard_normal((d, d)) * noise
    return (g + (z + z.T) / 2).astype(dtype)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-300))


def _tol(dtype):
    return 1e-10 if dtype == np.float64 else 2e-4


# --------------------------------------------------------------------------------------
# cholesky_shifts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_shifts_match_stacking(rng, dtype):
    d = 17
    a = _noisy_gram(rng, d, 0.3, dtype)
    shifts = np.array([0.0, 0.05, 0.5, 2.0, 10.0])
    L, info = linalg.cholesky_shifts(a, shifts)
    assert L.shape == (5, d, d) and L.dtype == dtype and info.dtype == np.int32
    stacked = a[None] + shifts.astype(dtype)[:, None, None] * np.eye(d, dtype=dtype)
    L_ref, info_ref = ops.cholesky(stacked)
    np.testing.assert_array_equal(info, info_ref)
    np.testing.assert_array_equal(np.isnan(L), np.isnan(L_ref))
    ok = info == 0
    np.testing.assert_allclose(L[ok], L_ref[ok], rtol=0, atol=_tol(dtype) * np.abs(L_ref[ok]).max())
    assert ok[-1], "a large enough shift must succeed"
    assert np.isnan(L[~ok]).all()


def test_shifts_info_at_known_column():
    d = 9
    a = np.eye(d)
    a[4, 4] = -1.0  # fails at pivot 5 unless the shift exceeds 1
    L, info = linalg.cholesky_shifts(a, [0.0, 0.5, 1.5])
    np.testing.assert_array_equal(info, [5, 5, 0])
    assert np.isnan(L[0]).all() and not np.isnan(L[2]).any()
    np.testing.assert_allclose(np.diag(L[2])[4], np.sqrt(0.5))


def test_shifts_validation(rng):
    a = _spd(rng, 4)
    with pytest.raises(ValueError, match="shifts"):
        linalg.cholesky_shifts(a, np.ones((2, 2)))
    with pytest.raises(ValueError, match="finite"):
        linalg.cholesky_shifts(a, [0.0, np.nan])
    with pytest.raises(ValueError, match="a must"):
        linalg.cholesky_shifts(np.stack([a, a]), [0.0])
    with pytest.raises(TypeError):
        linalg.cholesky_shifts(a.astype(np.int64), [0.0])
    L, info = linalg.cholesky_shifts(a, np.array([], dtype=np.float64))
    assert L.shape == (0, 4, 4) and info.shape == (0,)


# --------------------------------------------------------------------------------------
# cholesky_repair
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["shift", "eig"])
def test_repair_spd_batch_untouched(rng, dtype, method):
    a = np.stack([_spd(rng, 13, dtype=dtype) for _ in range(6)])
    L, report = linalg.cholesky_repair(a, method=method)
    L_ref, info = ops.cholesky(a)
    assert (info == 0).all()
    np.testing.assert_array_equal(L, L_ref)
    assert report.n_repaired == 0 and not report.repaired
    assert report.batch_shape == (6,)
    assert "0 of 6" in str(report)


@pytest.mark.parametrize("dtype", DTYPES)
def test_repair_shift_indefinite(rng, dtype):
    d = 24
    mats = [
        _spd(rng, d, dtype=dtype),
        _noisy_gram(rng, d, 1.0, dtype),
        _spd(rng, d, dtype=dtype),
        _noisy_gram(rng, d, 3.0, dtype),
    ]
    a = np.stack(mats)
    _, info = ops.cholesky(a)
    failed = np.flatnonzero(info)
    assert set(failed) == {1, 3}, "the noisy grams must be indefinite"
    L, report = linalg.cholesky_repair(a, method="shift")
    assert not np.isnan(L).any()
    assert report.indices == (1, 3)
    assert report.info == tuple(int(info[i]) for i in (1, 3))
    assert len(report.shifts) == 2 and len(report.tries) == 2 and report.min_eigenvalues == ()
    # Untouched matrices keep ops.cholesky's factor; repaired ones factor a + tau I.
    L_ref, _ = ops.cholesky(a)
    for i in (0, 2):
        np.testing.assert_array_equal(L[i], L_ref[i])
    for k, i in enumerate(report.indices):
        tau = report.shifts[k]
        lam_min = np.linalg.eigvalsh(a[i].astype(np.float64)).min()
        assert tau > -lam_min, "the shift must make the matrix positive definite"
        target = a[i].astype(np.float64) + tau * np.eye(d)
        assert _rel(L[i].astype(np.float64) @ L[i].T.astype(np.float64), target) < 50 * _tol(dtype)
        assert np.allclose(np.triu(L[i], 1), 0)
    assert "2 of 4" in str(report) and "shift" in str(report)


@pytest.mark.parametrize("dtype", DTYPES)
def test_repair_eig_indefinite(rng, dtype):
    d = 20
    a = np.stack([_noisy_gram(rng, d, 2.0, dtype), _spd(rng, d, dtype=dtype)])
    L, report = linalg.cholesky_repair(a, method="eig")
    assert report.indices == (0,)
    w, v = np.linalg.eigh(a[0].astype(np.float64))
    assert report.min_eigenvalues[0] == pytest.approx(w.min(), rel=1e-6, abs=1e-6)
    fl = report.floors[0]
    assert fl == pytest.approx(1e-6 * np.abs(w).max() * 10 ** (report.tries[0] - 1), rel=1e-9)
    target = (v * np.maximum(w, fl)) @ v.T
    assert _rel(L[0].astype(np.float64) @ L[0].T.astype(np.float64), target) < 50 * _tol(dtype)
    assert "eigenvalue" in str(report)


def test_repair_eig_explicit_floor(rng):
    a = _noisy_gram(rng, 12, 2.0)
    L, report = linalg.cholesky_repair(a, method="eig", floor=0.25)
    assert report.floors == (0.25,)
    w = np.linalg.eigvalsh(L @ L.T)
    assert w.min() == pytest.approx(0.25, rel=1e-8)


def test_repair_exactly_singular(rng):
    d = 16
    x = rng.standard_normal((5, d))
    g = x.T @ x  # rank 5: exactly singular (rounding decides the sign of the pivots)
    z = np.zeros((d, d))
    a = np.stack([g, z, -np.eye(d)])
    for method in ("shift", "eig"):
        L, report = linalg.cholesky_repair(a, method=method)
        assert not np.isnan(L).any()
        assert 1 in report.indices and 2 in report.indices
        LLt = np.einsum("bij,bkj->bik", L, L)
        # Every repaired matrix is close to the original at its own scale.
        assert _rel(LLt[0], g) < 1e-4
        assert np.abs(LLt[1]).max() <= 1e-9
    # The all-zero matrix gets the absolute floor shift.
    _, report = linalg.cholesky_repair(z, method="shift")
    assert report.shifts == (1e-12,)


def test_repair_known_info_and_batch_shape():
    d = 6
    a = np.broadcast_to(np.eye(d), (2, 3, d, d)).copy()
    a[1, 2, 3, 3] = -2.0  # fails at pivot 4
    a[0, 1, 0, 0] = 0.0  # fails at pivot 1
    L, report = linalg.cholesky_repair(a)
    assert L.shape == (2, 3, d, d)
    assert report.indices == (1, 5)
    assert report.info == (1, 4)
    assert report.multi_indices() == ((0, 1), (1, 2))
    np.testing.assert_allclose(L[1, 2] @ L[1, 2].T, a[1, 2] + report.shifts[1] * np.eye(d))
    assert report.shifts[1] > 2.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_repair_nan_inf_raises(rng, bad):
    a = np.stack([_spd(rng, 8) for _ in range(4)])
    a[2, 5, 1] = bad  # lower triangle
    with pytest.raises(ValueError, match=r"a: .*\[2\]"):
        linalg.cholesky_repair(a)
    with pytest.raises(ValueError, match=r"a: .*\[2\]"):
        linalg.cholesky_repair(a, method="eig")


def test_nan_in_upper_triangle_is_not_read(rng):
    a = _spd(rng, 8)
    a[1, 5] = np.nan  # upper triangle: never read
    L, report = linalg.cholesky_repair(a)
    assert report.n_repaired == 0 and not np.isnan(L).any()
    np.testing.assert_allclose(L @ L.T, np.tril(a) + np.tril(a, -1).T, rtol=1e-12, atol=1e-12)


def test_repair_single_try_uses_gershgorin(rng):
    a = _noisy_gram(rng, 30, 5.0)
    L, report = linalg.cholesky_repair(a, max_tries=1)
    assert report.tries == (1,)
    assert not np.isnan(L).any()


def test_repair_validation(rng):
    a = _spd(rng, 5)
    with pytest.raises(ValueError, match="method"):
        linalg.cholesky_repair(a, method="clip")
    with pytest.raises(ValueError, match="floor"):
        linalg.cholesky_repair(a, method="shift", floor=1.0)
    with pytest.raises(ValueError, match="floor"):
        linalg.cholesky_repair(a, method="eig", floor=-1.0)
    with pytest.raises(ValueError, match="max_tries"):
        linalg.cholesky_repair(a, max_tries=0)
    with pytest.raises(ValueError, match="shape"):
        linalg.cholesky_repair(np.ones((3, 4)))
    with pytest.raises(TypeError):
        linalg.cholesky_repair(a.astype(np.int32))


def test_report_is_frozen():
    r = linalg.RepairReport(method="shift", batch_shape=())
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.method = "eig"  # type: ignore[misc]


# --------------------------------------------------------------------------------------
# solve_spd
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_solve_spd(rng, dtype):
    d, m = 15, 4
    a = _spd(rng, d, dtype=dtype)
    b = rng.standard_normal((d, m)).astype(dtype)
    x, report = linalg.solve_spd(a, b)
    assert report.n_repaired == 0 and x.dtype == dtype
    ref = scipy.linalg.solve(a.astype(np.float64), b.astype(np.float64), assume_a="pos")
    assert _rel(x, ref) < 100 * _tol(dtype)
    xv, _ = linalg.solve_spd(a, b[:, 0])
    assert xv.shape == (d,)


def test_solve_spd_repaired_and_batched(rng):
    d = 12
    a = np.stack([_noisy_gram(rng, d, 2.0), _spd(rng, d)])
    b = rng.standard_normal((2, d))
    x, report = linalg.solve_spd(a, b)
    assert report.indices == (0,)
    tau = report.shifts[0]
    ref0 = np.linalg.solve(a[0] + tau * np.eye(d), b[0])
    ref1 = np.linalg.solve(a[1], b[1])
    assert _rel(x[0], ref0) < 1e-6 and _rel(x[1], ref1) < 1e-10
    with pytest.raises(np.linalg.LinAlgError, match=r"\[0\]"):
        linalg.solve_spd(a, b, repair=None)


def test_infinite_pivots_are_failures_not_factors():
    """A pivot (or factor row) that is not finite is a failed factorisation: LAPACK passes
    +inf through, and a shift beyond float32's range is +inf after the cast."""
    L, info = ops.cholesky(np.array([[np.inf]]))
    assert int(info) == 1 and np.isnan(L).all()
    huge = np.array([[0.0, 3e38], [3e38, 0.0]], np.float32)
    with np.errstate(all="raise"):  # no RuntimeWarning escapes either
        with pytest.raises(ValueError, match="could not be repaired"):
            linalg.cholesky_repair(huge)
        with pytest.raises(ValueError, match="could not be repaired"):
            linalg.solve_spd(huge, np.ones(2, np.float32))
        L, info = linalg.cholesky_shifts(np.eye(2, dtype=np.float32), [1.0, 1e39])
    assert info.tolist() == [0, 1] and np.isfinite(L[0]).all() and np.isnan(L[1]).all()
    # Finite factors near the top of the range still succeed.
    big = np.diag([1e300, 4e300])
    L, info = ops.cholesky(big)
    assert int(info) == 0
    np.testing.assert_allclose(np.diag(L), np.sqrt([1e300, 4e300]), rtol=1e-15)
