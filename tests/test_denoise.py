"""Noise-aware eigenvalue shrinkage of released matrices (``denoise``): the shrinkers
against float64 references and planted signals, the eigen-solve, and the estimators'
``denoise`` parameter (post-processing only: same ledger, same released statistics)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg

from dpfc_native import linalg
from dpfc_native.models import (
    ALPHA_MAX,
    DENOISE_AUTO,
    DENOISE_DEFAULT,
    DPFCClassifier,
    DPLeastSquaresClassifier,
    DPNewtonClassifier,
    _default_alpha,
    _default_reg,
    _resolve_denoise,
)

INF = float("inf")
SHRINKERS = ["psd", "soft", "spiked", "rie"]
METHODS = ["none"] + SHRINKERS
FACTORING = [
    (DPLeastSquaresClassifier, {}),
    (DPLeastSquaresClassifier, {"variant": "per_class"}),
    (DPNewtonClassifier, {"steps": 2}),
    (DPFCClassifier, {"steps": 3}),
]


def _goe(rng, d, s, batch=()):
    """Symmetric Gaussian noise: std s on the diagonal, s / sqrt(2) off it (as released)."""
    y = rng.standard_normal(batch + (d, d)) * (s / math.sqrt(2.0))
    return (y + np.swapaxes(y, -1, -2)) / math.sqrt(2.0)


def _planted(rng, d, rank, scale):
    u = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    return (u * scale) @ u.T


def _data(seed=0, n=240, d=6, k=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    means = rng.standard_normal((k, d))
    x = means[y] + 0.8 * rng.standard_normal((n, d))
    x *= np.exp(rng.uniform(-1, 1, size=(n, 1))) * 3.0 / np.sqrt(d)
    return x, y


# --------------------------------------------------------------------------------------
# The shrinkers
# --------------------------------------------------------------------------------------


def test_bulk_edge_matches_the_noise_spectrum(rng):
    d, s = 401, 0.7
    w = np.linalg.eigvalsh(_goe(rng, d, s))
    edge = linalg.bulk_edge(d, s)
    assert edge == pytest.approx(s * math.sqrt(2 * d))
    assert abs(w.max() - edge) < 0.05 * edge and abs(w.min() + edge) < 0.05 * edge


@pytest.mark.parametrize("d", [1, 2, 7, 64, 129])
def test_shrinkers_are_psd_projection_without_noise(rng, d):
    w = np.sort(rng.standard_normal((3, d)), axis=-1)
    for m in SHRINKERS:
        out = linalg.shrink_eigenvalues(w, 0.0, d, m)
        np.testing.assert_array_equal(out, np.maximum(w, 0.0), err_msg=m)


def test_shrinker_formulas_against_reference(rng):
    d, s = 50, 0.3
    e = s * math.sqrt(2 * d)
    w = np.sort(rng.uniform(-2 * e, 4 * e, size=(2, d)), axis=-1)
    np.testing.assert_allclose(linalg.shrink_eigenvalues(w, s, d, "soft"), np.maximum(w - e, 0))
    spk = np.where(w > e, np.sqrt(np.maximum(w**2 - e**2, 0)), 0.0)
    np.testing.assert_allclose(linalg.shrink_eigenvalues(w, s, d, "spiked"), spk, rtol=1e-12)
    # RIE: w_i - 2 sigma^2 Re g(w_i + i eta), written out with a double loop.
    sigma2, eta = e * e / 4, e / math.sqrt(d)
    ref = np.empty_like(w)
    for b in range(2):
        for i in range(d):
            g = sum(1.0 / (w[b, i] + 1j * eta - w[b, j]) for j in range(d)) / d
            ref[b, i] = max(w[b, i] - 2 * sigma2 * g.real, 0.0)
    np.testing.assert_allclose(
        linalg.shrink_eigenvalues(w, s, d, "rie"), ref, rtol=1e-10, atol=1e-12 * e
    )


@pytest.mark.parametrize("scale", [1e-200, 1e-160, 1e-30, 1e30, 1e160, 1e200])
def test_shrinkers_are_scale_equivariant_far_from_one(rng, scale):
    """Every shrinker is homogeneous, f(c w, c s) = c f(w, s): the released matrices of
    clip norms far from 1 (C^2 from 1e-200 to 1e200 is accepted) shrink like those near
    1, with no overflow to inf or underflow to 0/0 (squares of eigenvalues overflowed)."""
    d, s = 40, 0.3
    e = s * math.sqrt(2 * d)
    w = np.sort(rng.uniform(-2 * e, 4 * e, size=(3, d)), axis=-1)
    for m in SHRINKERS:
        ref = linalg.shrink_eigenvalues(w, s, d, m)
        got = linalg.shrink_eigenvalues(w * scale, s * scale, d, m)
        assert np.isfinite(got).all() and (got > 0).any(), m
        np.testing.assert_allclose(got / scale, ref, rtol=1e-12, atol=1e-13 * e, err_msg=m)


@pytest.mark.parametrize("s", [5e-324, 1e-310, 1e-300, 1e300, 1e308])
def test_shrinkers_finite_at_extreme_noise_std(rng, s):
    """Any finite noise std gives finite, non-negative values (the edge sqrt(2 d) s
    overflowed to inf, and w / edge to inf: NaN from "spiked", "soft" and "rie")."""
    w = np.sort(rng.uniform(-2.0, 3.0, size=(2, 7)), axis=-1)
    for scale in (1.0, 1e300, 1e-300):
        for m in SHRINKERS:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no overflow / invalid warning either
                got = linalg.shrink_eigenvalues(w * scale, s, 7, m)
            assert np.isfinite(got).all() and (got >= 0).all(), (m, scale)
            if s * math.sqrt(14) < 1e-15 * scale:  # noise far below w: the PSD projection
                np.testing.assert_allclose(got, np.maximum(w * scale, 0), rtol=1e-12)
            if s * math.sqrt(14) > 10 * scale and m in ("soft", "spiked"):  # all in the bulk
                assert (got == 0).all(), m


def test_shrink_eigenvalues_checks_d(rng):
    w = rng.standard_normal((2, 4))
    for d in (8, 2, 3):
        with pytest.raises(ValueError, match="d must be the length"):
            linalg.shrink_eigenvalues(w, [1.0, 2.0], d, "rie")
    with pytest.raises(TypeError, match="d"):
        linalg.shrink_eigenvalues(w, 1.0, 4.0, "soft")


@pytest.mark.parametrize("clip_norm", [1e-90, 1e80])
@pytest.mark.parametrize("cls,kw", FACTORING)
def test_denoised_fits_at_extreme_clip_norms_are_finite(rng, clip_norm, cls, kw):
    x = rng.standard_normal((300, 5)) * clip_norm
    y = np.arange(300) % 3
    for m in METHODS:
        est = cls(
            epsilon=1.0, classes=range(3), clip_norm=clip_norm, normalize=False, denoise=m, **kw
        ).fit(x, y)
        assert np.isfinite(est.coef_).all() and np.abs(est.coef_).max() > 0, m


def test_noise_std_and_empty_batches_checked():
    w = np.array([[1.0, 2.0]])
    for bad, exc in ((-1.0, ValueError), (np.nan, ValueError), ("1", TypeError), (None, TypeError)):
        with pytest.raises(exc, match="noise_std"):
            linalg.shrink_eigenvalues(w, bad, 2, "soft")
        with pytest.raises(exc, match="noise_std"):
            linalg.denoise_eigh(np.eye(2)[None], bad, "soft")
    w0, v0 = linalg.denoise_eigh(np.zeros((0, 3, 3)), 1.0, "soft")
    assert w0.shape == (0, 3) and v0.shape == (0, 3, 3)


def test_per_matrix_noise_std(rng):
    d = 20
    w = np.sort(rng.standard_normal((3, d)) * 5, axis=-1)
    s = np.array([0.0, 0.5, 2.0])
    out = linalg.shrink_eigenvalues(w, s, d, "soft")
    for b in range(3):
        np.testing.assert_allclose(out[b], linalg.shrink_eigenvalues(w[b], s[b], d, "soft"))


@pytest.mark.parametrize("d,rank", [(60, 3), (151, 5), (300, 8)])
def test_planted_low_rank_plus_noise_error_below_raw(rng, d, rank):
    """Each shrinker's estimate is closer to the planted PSD signal (Frobenius) than the
    released matrix, and closer than the PSD projection, for a batch of 3."""
    s = 1.0
    edge = s * math.sqrt(2 * d)
    signal = np.stack(
        [_planted(rng, d, rank, edge * rng.uniform(0.8, 3.0, size=rank)) for _ in range(3)]
    )
    released = signal + _goe(rng, d, s, (3,))
    raw_err = np.linalg.norm(released - signal, axis=(1, 2))
    psd_err = np.linalg.norm(linalg.denoise(released, s, "psd") - signal, axis=(1, 2))
    assert (psd_err < raw_err).all()
    for m in ("soft", "spiked", "rie"):
        err = np.linalg.norm(linalg.denoise(released, s, m) - signal, axis=(1, 2))
        assert (err < 0.6 * raw_err).all() and (err < psd_err).all(), (m, err, raw_err)


def test_full_rank_decaying_signal_rie_beats_raw(rng):
    d, s = 200, 1.0
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    lam = 40.0 * s * math.sqrt(2 * d) / np.arange(1, d + 1)
    signal = (q * lam) @ q.T
    released = signal + _goe(rng, d, s)
    raw = np.linalg.norm(released - signal)
    psd = np.linalg.norm(linalg.denoise(released, s, "psd") - signal)
    # The thresholding shrinkers assume a low-rank signal and zero out the many small
    # signal eigenvalues inside the bulk; the RIE does not assume it.
    assert np.linalg.norm(linalg.denoise(released, s, "rie") - signal) < min(raw, psd)


def test_denoise_reads_lower_triangle_only(rng):
    d = 9
    a = _goe(rng, d, 1.0) + 3 * np.eye(d)
    junk = np.tril(a) + np.triu(rng.standard_normal((d, d)) * 100, 1)
    for m in SHRINKERS:
        np.testing.assert_allclose(
            linalg.denoise(junk, 0.2, m), linalg.denoise(a, 0.2, m), rtol=1e-12, atol=1e-12
        )


# --------------------------------------------------------------------------------------
# The eigen-solve
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,d,m", [((), 1, 1), ((), 13, 4), ((5,), 7, 3), ((2, 3), 17, 1)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_eigh_solve_matches_float64_reference(rng, batch, d, m, dtype):
    a = (_goe(rng, d, 1.0, batch) + 2 * np.eye(d)).astype(dtype)
    b = rng.standard_normal(batch + (d, m))
    w, v = linalg.denoise_eigh(a, 0.5, "rie")
    reg = 0.3
    x = linalg.eigh_solve(w, v, reg, b)
    assert x.shape == batch + (d, m) and x.dtype == np.float64 and np.isfinite(x).all()
    dn = linalg.denoise(a, 0.5, "rie").reshape((-1, d, d))
    ref = np.stack(
        [
            scipy.linalg.solve(dn[i] + reg * np.eye(d), b.reshape((-1, d, m))[i], assume_a="pos")
            for i in range(dn.shape[0])
        ]
    )
    np.testing.assert_allclose(x, ref.reshape(x.shape), rtol=1e-9, atol=1e-12)
    # Vector right-hand side.
    xv = linalg.eigh_solve(w, v, reg, b[..., 0])
    np.testing.assert_allclose(xv, x[..., 0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", ["indefinite", "rank_deficient", "zero", "tiny"])
@pytest.mark.parametrize("method", SHRINKERS)
def test_finite_solutions_on_hard_inputs(rng, case, method):
    d = 11
    if case == "indefinite":
        a = _goe(rng, d, 5.0) - 3 * np.eye(d)
    elif case == "rank_deficient":
        x = rng.standard_normal((3, d))
        a = x.T @ x
    elif case == "zero":
        a = np.zeros((d, d))
    else:
        d = 1
        a = np.array([[-1e-300]])
    b = rng.standard_normal((d, 2))
    for reg in (0.0, 1e-3):
        w, v = linalg.denoise_eigh(a, 0.1, method)
        assert (w >= 0).all()
        assert np.isfinite(linalg.eigh_solve(w, v, reg, b)).all(), (case, method, reg)


@pytest.mark.parametrize("batch,d", [(1, 1), (1, 9), (4, 32), (3, 33), (2, 130)])
def test_batched_eigh_matches_float64_reference(rng, batch, d):
    a = _goe(rng, d, 1.0, (batch,)) + _planted(rng, d, min(d, 3), 10.0)
    junk = np.tril(a) + np.triu(rng.standard_normal((batch, d, d)) * 50, 1)
    w, v = linalg.batched_eigh(junk)
    assert w.shape == (batch, d) and v.shape == (batch, d, d) and np.isfinite(v).all()
    for i in range(batch):
        ref = scipy.linalg.eigh(a[i], eigvals_only=True)
        np.testing.assert_allclose(w[i], ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
        # Reconstruction from the lower triangle only.
        np.testing.assert_allclose((v[i] * w[i]) @ v[i].T, a[i], rtol=1e-10, atol=1e-9)


def test_auto_denoise_resolves_per_shape():
    assert DENOISE_DEFAULT == "auto" and DENOISE_AUTO == "soft"
    # One gram (or one step's Hessians): the eigendecomposition pays unless d > n.
    assert _resolve_denoise("auto", 1, 768, 50_000) == "soft"
    assert _resolve_denoise("auto", 1, 1664, 1_000) == "none"
    # Per-class grams: K eigendecompositions against one pass over n rows.
    assert _resolve_denoise("auto", 10, 768, 50_000) == "soft"
    assert _resolve_denoise("auto", 1000, 1664, 1_281_167) == "none"
    for m in METHODS:
        assert _resolve_denoise(m, 1000, 1664, 10) == m
    est = DPLeastSquaresClassifier(epsilon=1.0, variant="per_class")
    assert est.noise_plan(50_000, 768, 10).defaults["denoise"] == "soft"
    assert est.noise_plan(50_000, 768, 100).defaults["denoise"] == "none"
    assert DPFCClassifier().noise_plan(100, 64, 10).defaults["denoise"] == "soft"
    assert DPNewtonClassifier().noise_plan(100, 64, 10).defaults["denoise"] == "soft"
    # The resolved choice is what fit uses: same weights as passing it explicitly.
    x, y = _data(12, n=300, d=9, k=4)
    for variant in ("global", "per_class"):
        auto = DPLeastSquaresClassifier(epsilon=0.5, random_state=1, variant=variant).fit(x, y)
        soft = DPLeastSquaresClassifier(
            epsilon=0.5, random_state=1, variant=variant, denoise="soft"
        ).fit(x, y)
        np.testing.assert_array_equal(auto.coef_, soft.coef_)


def test_default_alpha_grows_with_the_class_grams_noise():
    d, n, k = 128, 20_000, 20
    assert _default_alpha(0.0, d, n, k, 1.0) == 1.0
    alphas = [_default_alpha(s, d, n, k, 1.0) for s in (1.0, 10.0, 50.0, 200.0, 1e4)]
    assert alphas == sorted(alphas) and alphas[0] == 1.0 and alphas[-1] == ALPHA_MAX
    # r = sqrt(2 d) s K d / (n C^2); alpha = r / 20 between the bounds.
    s = 60.0
    r = math.sqrt(2 * d) * s * k * d / n
    assert _default_alpha(s, d, n, k, 1.0) == pytest.approx(r / 20.0)
    # The clip norm only rescales: the same ratio at C = 2 with 4x the noise std.
    assert _default_alpha(4 * s, d, n, k, 2.0) == pytest.approx(r / 20.0)
    x, y = _data(13, n=400, d=8, k=4)
    for eps in (0.03, INF):
        est = DPLeastSquaresClassifier(epsilon=eps, random_state=0, variant="per_class").fit(x, y)
        s_a = est.noise_plan(400, 8, 4).z["class_grams"]
        assert est.alpha_ == pytest.approx(_default_alpha(s_a, 8, 400, 4, 1.0))
        assert (est.alpha_ > 1.0) == (eps != INF)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        linalg.shrink_eigenvalues(np.zeros(3), 1.0, 3, "none")
    with pytest.raises(ValueError, match="noise_std"):
        linalg.denoise_eigh(np.eye(3), -1.0)
    with pytest.raises(ValueError, match="noise_std"):
        linalg.denoise_eigh(np.stack([np.eye(3)] * 2), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        linalg.denoise_eigh(np.full((3, 3), np.nan), 1.0)
    with pytest.raises(ValueError, match="reg"):
        linalg.eigh_solve(np.ones(3), np.eye(3), -1.0, np.ones(3))


# --------------------------------------------------------------------------------------
# The estimators' denoise parameter
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,kw", FACTORING)
def test_ledger_and_released_statistics_unchanged_by_denoise(cls, kw):
    x, y = _data(3, d=8)
    fits = {
        m: cls(epsilon=0.5, random_state=11, denoise=m, keep_stats=True, **kw).fit(x, y)
        for m in METHODS
    }
    ref = fits["none"]
    for m, est in fits.items():
        assert est.privacy_.to_dict() == ref.privacy_.to_dict(), m
        assert est.stats_.keys() == ref.stats_.keys()
        if cls is DPLeastSquaresClassifier or cls is DPFCClassifier:
            # Released once before any solve: bit-identical whatever the solve.
            for key in ("gram", "class_grams", "class_sums", "covariance"):
                if key in ref.stats_:
                    np.testing.assert_array_equal(est.stats_[key], ref.stats_[key])
        else:
            # Newton's first release is taken at W = 0, before any solve.
            np.testing.assert_array_equal(est.stats_["hessians"][0], ref.stats_["hessians"][0])
        assert np.isfinite(est.coef_).all()
    assert not np.allclose(fits["rie"].coef_, ref.coef_)


@pytest.mark.parametrize("cls,kw", FACTORING)
@pytest.mark.parametrize("method", SHRINKERS)
def test_non_private_denoised_solve_equals_todays(cls, kw, method):
    x, y = _data(4, d=7)
    today = cls(epsilon=INF, denoise="none", **kw).fit(x, y)
    den = cls(epsilon=INF, denoise=method, **kw).fit(x, y)
    assert den.reg_ == today.reg_
    np.testing.assert_allclose(den.coef_, today.coef_, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", SHRINKERS)
def test_small_user_ridge_is_not_overridden_by_the_eigen_floor(method):
    """A user's small ridge on an ill-conditioned Gram (eigenvalues ~4e-6 to 2000): the
    eigen-solve's relative floor (1e-6 x the largest denominator = 2e-3) replaced the
    ridge, so the non-private denoised weights differed from today's by 99%."""
    rng = np.random.default_rng(17)
    n, d, k = 2000, 5, 2
    y = rng.integers(0, k, n)
    x = 1.0 + 1e-4 * rng.normal(size=(n, d))
    x[:, 0] += 1e-4 * (2 * y - 1)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    gram = xn.T @ xn
    assert np.linalg.eigvalsh(gram)[0] < 1e-5
    b = np.stack([xn[y == j].sum(0) for j in range(k)])
    for reg in (1e-7, 1e-5):
        ref = np.linalg.solve(gram + reg * np.eye(d), b.T).T  # float64 reference
        today = DPLeastSquaresClassifier(epsilon=INF, reg=reg, denoise="none").fit(x, y)
        den = DPLeastSquaresClassifier(epsilon=INF, reg=reg, denoise=method).fit(x, y)
        scale = np.abs(ref).max()
        assert np.abs(today.coef_ - ref).max() < 1e-5 * scale
        assert np.abs(den.coef_ - ref).max() < 1e-5 * scale
    # reg = 0 keeps the floor: finite weights on a singular matrix.
    w, v = linalg.denoise_eigh(np.zeros((3, 3)) + np.diag([1.0, 0.0, 0.0]), 0.0, method)
    assert np.isfinite(linalg.eigh_solve(w, v, 0.0, np.ones(3))).all()


@pytest.mark.parametrize("cls,kw", FACTORING)
def test_finite_weights_rank_deficient_and_tiny(cls, kw):
    # n < d: every gram is rank deficient, and noisy at small epsilon (indefinite).
    x, y = _data(5, n=12, d=40, k=3)
    for m in METHODS:
        for eps in (0.05, INF):
            for reg in (None, 0.0):
                est = cls(epsilon=eps, random_state=0, denoise=m, reg=reg, **kw).fit(x, y)
                assert np.isfinite(est.coef_).all(), (m, eps, reg)
    # d = 1, two classes, two rows.
    est = cls(epsilon=0.3, random_state=1, denoise=DENOISE_DEFAULT, **kw).fit(
        np.array([[1.0], [-2.0]]), np.array([0, 1])
    )
    assert np.isfinite(est.coef_).all()


def test_default_ridge_moves_with_denoise():
    s, d, n = 3.0, 100, 5000
    base = 1e-3 * n / d
    assert _default_reg(s, d, n, 1.0, denoise="none") == pytest.approx(
        2.0 * math.sqrt(2 * d) * s + base
    )
    for m in SHRINKERS:
        assert _default_reg(s, d, n, 1.0, denoise=m) < _default_reg(s, d, n, 1.0)
    x, y = _data(6, d=8)
    a = DPLeastSquaresClassifier(epsilon=1.0, random_state=0, denoise="none").fit(x, y)
    b = DPLeastSquaresClassifier(epsilon=1.0, random_state=0, denoise="rie").fit(x, y)
    assert b.reg_ < a.reg_


@pytest.mark.parametrize("cls,kw", FACTORING)
def test_bad_denoise_raises(cls, kw):
    x, y = _data(7)
    with pytest.raises(ValueError, match="denoise"):
        cls(denoise="clamp", **kw).fit(x, y)


def test_reg_sweep_shares_one_eigendecomposition():
    x, y = _data(8, d=10)
    xv, yv = _data(9, d=10)
    swept = DPLeastSquaresClassifier(
        epsilon=1.0, random_state=2, reg=[0.5, 5.0], denoise="rie"
    ).fit(x, y, X_val=xv, y_val=yv)
    single = DPLeastSquaresClassifier(
        epsilon=1.0, random_state=2, reg=swept.reg_, denoise="rie"
    ).fit(x, y)
    np.testing.assert_array_equal(swept.coef_, single.coef_)


# --------------------------------------------------------------------------------------
# GPU (cupy.linalg.eigh, batched) against the CPU
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("method", SHRINKERS)
@pytest.mark.parametrize("batch,d", [((), 33), ((6,), 17), ((3,), 130)])
def test_gpu_denoise_matches_cpu(rng, method, batch, d):
    import cupy

    a = _goe(rng, d, 1.0, batch) + _planted(rng, d, 3, 30.0)
    b = rng.standard_normal(batch + (d, 4))
    s = 1.0 if not batch else np.linspace(0.5, 1.5, batch[0])
    w, v = linalg.denoise_eigh(a, s, method)
    wg, vg = linalg.denoise_eigh(cupy.asarray(a), s, method)
    assert isinstance(wg, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(wg), w, rtol=1e-9, atol=1e-9)
    x = linalg.eigh_solve(w, v, 0.5, b)
    xg = linalg.eigh_solve(wg, vg, 0.5, cupy.asarray(b))
    np.testing.assert_allclose(cupy.asnumpy(xg), x, rtol=1e-8, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,d", [(5, 32), (5, 33), (1, 200)])
def test_gpu_batched_eigh_both_paths_match_cpu(rng, batch, d):
    """The batched Jacobi path (d <= 32) and the per-matrix syevd loop (d > 32, or one
    matrix) against LAPACK: eigenvalues, and the matrix rebuilt from the factors."""
    import cupy

    from dpfc_native import _gpu_linalg

    a = _goe(rng, d, 1.0, (batch,)) + _planted(rng, d, 3, 20.0)
    junk = np.tril(a) + np.triu(rng.standard_normal((batch, d, d)) * 50, 1)
    wg, vg = linalg.batched_eigh(cupy.asarray(junk))
    assert isinstance(wg, cupy.ndarray) and wg.dtype == np.float64
    assert (d <= _gpu_linalg.EIGH_BATCHED_MAX_D) == (d == 32)
    w, _ = linalg.batched_eigh(junk)
    wg, vg = cupy.asnumpy(wg), cupy.asnumpy(vg)
    np.testing.assert_allclose(wg, w, rtol=1e-9, atol=1e-9 * np.abs(w).max())
    rebuilt = (vg * wg[:, None, :]) @ np.swapaxes(vg, -1, -2)
    np.testing.assert_allclose(rebuilt, a, rtol=1e-9, atol=1e-8)


@pytest.mark.gpu
@pytest.mark.parametrize("cls,kw", FACTORING)
def test_gpu_estimators_denoise_match_cpu(cls, kw):
    import cupy

    x, y = _data(10, d=12)
    cpu = cls(epsilon=1.0, random_state=3, device="cpu", denoise="rie", **kw).fit(x, y)
    gpu = cls(epsilon=1.0, random_state=3, device="cuda", denoise="rie", **kw).fit(
        cupy.asarray(x), y
    )
    np.testing.assert_allclose(gpu.coef_, cpu.coef_, rtol=1e-6, atol=1e-8)
    assert gpu.privacy_.to_dict() == cpu.privacy_.to_dict()


def test_noiseless_matrices_are_exactly_the_psd_projection_and_psd_checks_noise_std():
    """s = 0 gives max(w, 0) exactly even when the spectrum spans beyond 2^1022 (the
    power-of-two units zeroed 1e-300 next to 1e300); "psd" checks noise_std like the
    others (it returned before the check)."""
    w = np.array([[-2.0, 1e-300, 3e-10, 1e300], [1e-20, 1.0, 2.0, 1e300]])
    for m in SHRINKERS + ["psd"]:
        out = linalg.shrink_eigenvalues(w, [0.0, 0.0], 4, m)
        np.testing.assert_array_equal(out, np.maximum(w, 0.0))
        mixed = linalg.shrink_eigenvalues(w, [0.0, 0.5], 4, m)
        np.testing.assert_array_equal(mixed[0], np.maximum(w[0], 0.0))
        np.testing.assert_array_equal(mixed[1], linalg.shrink_eigenvalues(w[1:], 0.5, 4, m)[0])
    for bad, exc in (("abc", TypeError), (-1.0, ValueError), (np.ones(5), ValueError)):
        with pytest.raises(exc):
            linalg.shrink_eigenvalues(w, bad, 4, "psd")
