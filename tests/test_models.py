"""The estimators: non-private mode against float64 NumPy/SciPy references, calibrated
noise on the released statistics, the ledger, reproducibility, sweeps, labels, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
from _reference import ESTIMATORS
from conftest import GPU_AVAILABLE, reference_clip64
from scipy.special import expit, softmax
from sklearn.exceptions import NotFittedError

from dpfc_native import accounting, models, ops
from dpfc_native.models import (
    DPFCClassifier,
    DPLeastSquaresClassifier,
    DPNewtonClassifier,
    DPSGDClassifier,
)

# These tests fix noise seeds (replayable) and often infer the label set on purpose;
# the PrivacyWarning for that is tested in test_tuning.py.
pytestmark = pytest.mark.filterwarnings("ignore::dpfc_native.PrivacyWarning")

INF = float("inf")


def _data(seed=0, n=240, d=6, k=3, scale=3.0):
    """Class-separated features with row norms spread around 1 (some get clipped)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    means = rng.standard_normal((k, d))
    x = means[y] + 0.8 * rng.standard_normal((n, d))
    x *= np.exp(rng.uniform(-1, 1, size=(n, 1))) * scale / np.sqrt(d)
    return x, y


def _prep(x, clip=1.0, normalize=True):
    """Reference preprocessing: unit rows (optional), then the shared clip (float64)."""
    x = np.asarray(x, dtype=np.float64)
    if normalize:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return reference_clip64(x, clip)[0]


def _onehot(y, k):
    return np.eye(k)[y]


# --------------------------------------------------------------------------------------
# scikit-learn conventions
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_get_set_params_and_clone(cls):
    from sklearn.base import clone

    est = cls(epsilon=2.0, random_state=3, clip_norm=0.5)
    params = est.get_params()
    assert params["epsilon"] == 2.0 and params["random_state"] == 3 and params["clip_norm"] == 0.5
    twin = clone(est)
    assert twin is not est and twin.get_params() == params
    assert est.set_params(epsilon=0.5) is est and est.epsilon == 0.5
    with pytest.raises(ValueError, match="(?i)invalid parameter 'nope'"):  # scikit-learn's
        est.set_params(nope=1)
    assert cls.__name__ in repr(est) and "epsilon=0.5" in repr(est)
    # __init__ stores parameters verbatim, without validation.
    lst = [0.1, 1.0]
    odd = cls(epsilon="not a number", reg=lst) if "reg" in params else cls(epsilon="x", lr=lst)
    assert (odd.get_params().get("reg") or odd.get_params().get("lr")) is lst


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_fitted_attributes_and_predict(cls):
    x, y = _data()
    est = cls(epsilon=INF).fit(x, y)
    assert est.coef_.shape == (3, 6) and est.coef_.dtype == np.float64
    assert est.intercept_.shape == (3,)
    np.testing.assert_array_equal(est.classes_, [0, 1, 2])
    scores = est.decision_function(x)
    assert isinstance(scores, np.ndarray) and scores.shape == (240, 3)
    assert set(np.unique(est.predict(x))) <= {0, 1, 2}
    assert est.score(x, y) > 0.8
    assert est.privacy_.epsilon == INF and est.privacy_.entries == ()
    with pytest.raises(NotFittedError, match="not fitted"):
        cls().predict(x)
    with pytest.raises(ValueError, match="features"):
        est.predict(x[:, :4])


# --------------------------------------------------------------------------------------
# Non-private mode equals a float64 reference
# --------------------------------------------------------------------------------------


def test_ls_global_matches_ridge_closed_form():
    x, y = _data()
    reg = 0.7
    est = DPLeastSquaresClassifier(epsilon=INF, reg=reg, clip_norm=1.0).fit(x, y)
    xc = _prep(x)
    g = xc.T @ xc
    b = _onehot(y, 3).T @ xc
    ref = scipy.linalg.solve(g + reg * np.eye(6), b.T, assume_a="pos").T
    np.testing.assert_allclose(est.coef_, ref, rtol=1e-10, atol=1e-12)
    assert est.reg_ == reg


def test_ls_per_class_matches_closed_form():
    x, y = _data(1)
    reg, alpha = 0.3, 0.5
    est = DPLeastSquaresClassifier(epsilon=INF, variant="per_class", reg=reg, alpha=alpha).fit(x, y)
    xc = _prep(x)
    g = xc.T @ xc
    b = _onehot(y, 3).T @ xc
    ref = np.stack(
        [
            scipy.linalg.solve(xc[y == c].T @ xc[y == c] + alpha * g + reg * np.eye(6), b[c])
            for c in range(3)
        ]
    )
    np.testing.assert_allclose(est.coef_, ref, rtol=1e-10, atol=1e-12)


def test_ls_without_normalize_clips_rows():
    x, y = _data(2, scale=4.0)
    est = DPLeastSquaresClassifier(epsilon=INF, reg=0.1, normalize=False, clip_norm=0.5).fit(x, y)
    xc = _prep(x, clip=0.5, normalize=False)
    ref = scipy.linalg.solve(xc.T @ xc + 0.1 * np.eye(6), xc.T @ _onehot(y, 3)).T
    np.testing.assert_allclose(est.coef_, ref, rtol=1e-10, atol=1e-12)


def test_public_center_is_subtracted_before_normalising():
    x, y = _data(3)
    center = np.linspace(-0.2, 0.3, 6)
    a = DPLeastSquaresClassifier(epsilon=INF, reg=0.2, center=center).fit(x, y)
    b = DPLeastSquaresClassifier(epsilon=INF, reg=0.2).fit(x - center, y)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-12)
    np.testing.assert_allclose(a.decision_function(x), b.decision_function(x - center), rtol=1e-10)
    with pytest.raises(ValueError, match="center"):
        DPLeastSquaresClassifier(center=np.zeros(5)).fit(x, y)


def test_newton_matches_float64_newton_iteration():
    x, y = _data(4)
    reg, lr, steps, bias = 0.4, 0.8, 3, -0.5
    est = DPNewtonClassifier(epsilon=INF, reg=reg, lr=lr, steps=steps, bias=bias).fit(x, y)
    xc = _prep(x)
    yy = _onehot(y, 3)
    w = np.zeros((3, 6))
    for _ in range(steps):
        p = expit(xc @ w.T + bias)
        grad = (p - yy).T @ xc
        for c in range(3):
            h = (xc * (p[:, c] * (1 - p[:, c]))[:, None]).T @ xc
            w[c] = w[c] - lr * scipy.linalg.solve(h + reg * np.eye(6), grad[c])
    np.testing.assert_allclose(est.coef_, w, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(est.intercept_, bias)


def _fc_reference(xc, y, k, steps, lr, reg, bias, gclip):
    yy = _onehot(y, k)
    g = xc.T @ xc + reg * np.eye(xc.shape[1])
    w = np.zeros((k, xc.shape[1]))
    target = gclip * (1 - 2.0**-20)
    for _ in range(steps):
        r = (expit(xc @ w.T + bias) - yy) / k
        norms = np.linalg.norm(r, axis=1) * np.linalg.norm(xc, axis=1)
        scale = np.minimum(1.0, target / norms)
        grad = (r * scale[:, None]).T @ xc
        w = w - lr * scipy.linalg.solve(g, grad.T, assume_a="pos").T
    return w


def test_dpfc_matches_preconditioned_gd_iterates():
    x, y = _data(5)
    kw = dict(steps=6, lr=20.0, reg=0.5, bias=-2.0, grad_clip_norm=0.2)
    est = DPFCClassifier(epsilon=INF, **kw).fit(x, y)
    ref = _fc_reference(
        _prep(x), y, 3, kw["steps"], kw["lr"], kw["reg"], kw["bias"], kw["grad_clip_norm"]
    )
    np.testing.assert_allclose(est.coef_, ref, rtol=1e-9, atol=1e-11)
    assert sum(est.diagnostics_["n_clipped"]) > 0  # the gradient clip was active, and matched


def test_dpfc_defaults_from_k_only():
    x, y = _data(6)
    est = DPFCClassifier(epsilon=INF).fit(x, y)
    k = 3
    assert est.bias_ == pytest.approx(-math.log(k - 1))
    assert est.lr_ == 8 * k
    s = 1 / k
    assert est.grad_clip_norm_ == pytest.approx(math.sqrt((1 - s) ** 2 + (k - 1) * s**2) / k)
    ref = _fc_reference(_prep(x), y, k, 10, est.lr_, est.reg_, est.bias_, est.grad_clip_norm_)
    np.testing.assert_allclose(est.coef_, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_dpsgd_full_batch_matches_reference(optimizer, loss):
    x, y = _data(7)
    n, k = len(y), 3
    steps, lr, mom, gclip, bias = 8, 0.3, 0.7, 0.3, -1.0
    est = DPSGDClassifier(
        epsilon=INF,
        steps=steps,
        lr=lr,
        optimizer=optimizer,
        momentum=mom,
        loss=loss,
        grad_clip_norm=gclip,
        bias=bias,
    ).fit(x, y)
    xc, yy = _prep(x), _onehot(y, k)
    w = np.zeros((k, 6))
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    b = bias if loss == "sigmoid" else 0.0
    for t in range(steps):
        logits = xc @ w.T + b
        r = softmax(logits, axis=1) - yy if loss == "softmax" else (expit(logits) - yy) / k
        norms = np.linalg.norm(r, axis=1) * np.linalg.norm(xc, axis=1)
        grad = (r * np.minimum(1.0, gclip * (1 - 2.0**-20) / norms)[:, None]).T @ xc / n
        if optimizer == "sgd":
            m = mom * m + grad
            w = w - lr * m
        else:
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad**2
            w = w - lr * (m / (1 - 0.9 ** (t + 1))) / (np.sqrt(v / (1 - 0.999 ** (t + 1))) + 1e-8)
    np.testing.assert_allclose(est.coef_, w, rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------------------
# Private mode: released statistics carry noise of the calibrated scale
# --------------------------------------------------------------------------------------


def _std_ratio(diffs, std):
    """Empirical std of ``diffs`` over ``std``, and its 5-sigma tolerance."""
    diffs = np.concatenate([np.ravel(a) for a in diffs])
    ratio = np.sqrt(np.mean(diffs**2)) / std
    return ratio, 5.0 / math.sqrt(2 * diffs.size), float(np.mean(diffs)) / std


def _check_sym_noise(noisy_list, exact, std):
    d = exact.shape[-1]
    iu = np.triu_indices(d, 1)
    diag = [np.diagonal(a - exact, axis1=-2, axis2=-1) for a in noisy_list]
    off = [(a - exact)[..., iu[0], iu[1]] for a in noisy_list]
    for a in noisy_list:
        np.testing.assert_array_equal(a, np.swapaxes(a, -1, -2))  # symmetric noise
    for parts, s in ((diag, std), (off, std / math.sqrt(2))):
        ratio, tol, mean = _std_ratio(parts, s)
        assert abs(ratio - 1) < tol, (ratio, tol)
        assert abs(mean) < 5 * tol


def _check_dense_noise(noisy_list, exact, std):
    ratio, tol, mean = _std_ratio([a - exact for a in noisy_list], std)
    assert abs(ratio - 1) < tol, (ratio, tol)
    assert abs(mean) < 5 * tol


def _entry(ledger, name):
    (e,) = [e for e in ledger.entries if e.name == name]
    return e


RUNS = 30


@pytest.mark.parametrize(
    ("eps", "denoise", "variant", "k", "share", "factor"),
    [
        (0.5, "soft", "global", 3, 0.2, 0.5),  # noisy gram, many classes: sums get 0.8
        (1e4, "soft", "global", 3, 0.5, 1.0),  # quiet gram: the equal split
        (0.5, "none", "global", 3, 0.2, 2.0),  # not denoised: same split, usual ridge
        (0.5, "soft", "global", 2, 0.5, 1.0),  # noisy, but fewer than d / 20 classes
        (0.5, "soft", "per_class", 3, 0.5, None),  # per class: unchanged
    ],
)
def test_auto_gram_share_follows_the_planned_noise_to_signal(
    eps, denoise, variant, k, share, factor
):
    n, d = 300, (12 if k == 3 else 64)
    x, y = _data(9, n=n, d=d, k=k)
    est = DPLeastSquaresClassifier(
        epsilon=eps, denoise=denoise, variant=variant, classes=np.arange(k), random_state=0
    ).fit(x, y)
    z_eq = accounting.calibrate_plan(eps, est.delta_, {"gram": 0.5, "class_sums": 0.5})["gram"]
    assert (models._noise_norm(d, z_eq) * d / n >= models.GRAM_SHARE_NOISY_RATIO) == (eps < 1)
    assert (k >= models.GRAM_SHARE_MIN_CLASSES_PER_FEATURE * d) == (k == 3)
    led = est.privacy_
    if variant == "global":
        z = accounting.calibrate_plan(eps, est.delta_, {"gram": share, "class_sums": 1 - share})
        assert _entry(led, "gram").noise_std == pytest.approx(z["gram"], rel=1e-12)
        assert _entry(led, "class_sums").noise_std == pytest.approx(z["class_sums"], rel=1e-12)
        want_reg = factor * models._noise_norm(d, z["gram"]) + models.REG_FLOOR * n / d
        assert est.reg_ == pytest.approx(want_reg, rel=1e-12)
    else:
        z = accounting.calibrate_plan(
            eps, est.delta_, {"class_grams": 0.25, "gram": 0.25, "class_sums": 0.5}
        )
        assert _entry(led, "class_sums").noise_std == pytest.approx(z["class_sums"], rel=1e-12)
    # An explicit share is used as given, with the usual ridge factor.
    est2 = DPLeastSquaresClassifier(
        epsilon=eps, denoise=denoise, variant=variant, gram_share=0.3, classes=np.arange(k)
    ).fit(x, y)
    z2 = accounting.calibrate_plan(
        eps,
        est2.delta_,
        {"gram": 0.3, "class_sums": 0.7}
        if variant == "global"
        else {"class_grams": 0.15, "gram": 0.15, "class_sums": 0.7},
    )
    assert _entry(est2.privacy_, "class_sums").noise_std == pytest.approx(
        z2["class_sums"], rel=1e-12
    )


def test_ls_global_noise_matches_calibration():
    x, y = _data(8, d=12)
    c = 2.0  # C != C^2: the sensitivities must be C^2 (gram) and C (class sums)
    kw = dict(clip_norm=c, keep_stats=True, reg=1.0, gram_share=0.5)
    exact = DPLeastSquaresClassifier(epsilon=INF, **kw).fit(x, y).stats_
    fits = [DPLeastSquaresClassifier(epsilon=1.0, **kw).fit(x, y) for _ in range(RUNS)]
    led = fits[0].privacy_
    g, b = _entry(led, "gram"), _entry(led, "class_sums")
    assert g.sensitivity == c**2 and b.sensitivity == c
    z = accounting.calibrate_plan(1.0, fits[0].delta_, {"gram": 0.5, "class_sums": 0.5})
    assert g.noise_std == pytest.approx(z["gram"] * c**2, rel=1e-12)
    assert b.noise_std == pytest.approx(z["class_sums"] * c, rel=1e-12)
    _check_sym_noise([f.stats_["gram"] for f in fits], exact["gram"], g.noise_std)
    _check_dense_noise([f.stats_["class_sums"] for f in fits], exact["class_sums"], b.noise_std)


def test_ls_per_class_noise_matches_calibration():
    x, y = _data(9, d=8)
    kw = dict(variant="per_class", keep_stats=True, reg=1.0)
    exact = DPLeastSquaresClassifier(epsilon=INF, **kw).fit(x, y).stats_
    fits = [DPLeastSquaresClassifier(epsilon=1.0, **kw).fit(x, y) for _ in range(RUNS)]
    led = fits[0].privacy_
    assert [e.name for e in led.entries] == ["class_grams", "gram", "class_sums"]
    a = _entry(led, "class_grams")
    assert a.sensitivity == 1.0  # one example touches one class gram: C^2 jointly
    _check_sym_noise([f.stats_["class_grams"] for f in fits], exact["class_grams"], a.noise_std)
    _check_sym_noise([f.stats_["gram"] for f in fits], exact["gram"], _entry(led, "gram").noise_std)
    _check_dense_noise(
        [f.stats_["class_sums"] for f in fits],
        exact["class_sums"],
        _entry(led, "class_sums").noise_std,
    )


def test_newton_first_step_noise_matches_calibration():
    x, y = _data(10, d=6)
    c, k = 1.5, 3
    kw = dict(clip_norm=c, keep_stats=True, steps=2, reg=1.0)
    exact = DPNewtonClassifier(epsilon=INF, **kw).fit(x, y).stats_
    fits = [DPNewtonClassifier(epsilon=2.0, **kw).fit(x, y) for _ in range(RUNS)]
    led = fits[0].privacy_
    h, g = _entry(led, "hessians"), _entry(led, "gradients")
    assert h.count == 2 and g.count == 2
    assert h.sensitivity == pytest.approx(math.sqrt(k) * c**2 / 4)
    assert g.sensitivity == pytest.approx(math.sqrt(k) * c)
    # Step 0 is at W = 0 in every run: its exact statistics are the non-private ones.
    _check_sym_noise([f.stats_["hessians"][0] for f in fits], exact["hessians"][0], h.noise_std)
    _check_dense_noise([f.stats_["gradients"][0] for f in fits], exact["gradients"][0], g.noise_std)


def test_dpfc_noise_matches_calibration():
    x, y = _data(11, d=6)
    kw = dict(keep_stats=True, steps=3, reg=1.0, grad_clip_norm=0.25)
    exact = DPFCClassifier(epsilon=INF, **kw).fit(x, y).stats_
    fits = [DPFCClassifier(epsilon=1.0, **kw).fit(x, y) for _ in range(RUNS)]
    led = fits[0].privacy_
    cov, grad = _entry(led, "covariance"), _entry(led, "gradient")
    assert (cov.count, grad.count, cov.sensitivity, grad.sensitivity) == (1, 3, 1.0, 0.25)
    # The paper's equal multipliers by default.
    assert cov.noise_multiplier == pytest.approx(grad.noise_multiplier, rel=1e-9)
    _check_sym_noise([f.stats_["covariance"] for f in fits], exact["covariance"], cov.noise_std)
    _check_dense_noise(
        [f.stats_["gradient"][0] for f in fits], exact["gradient"][0], grad.noise_std
    )


def test_dpsgd_noise_matches_calibration():
    x, y = _data(12, d=6)
    kw = dict(keep_stats=True, steps=4, grad_clip_norm=0.5)
    exact = DPSGDClassifier(epsilon=INF, **kw).fit(x, y).stats_
    fits = [DPSGDClassifier(epsilon=1.0, **kw).fit(x, y) for _ in range(RUNS)]
    grad = _entry(fits[0].privacy_, "gradient")
    assert grad.count == 4 and grad.sensitivity == 0.5
    z = accounting.calibrate_noise_multiplier(1.0, fits[0].delta_, 4)
    assert grad.noise_multiplier == pytest.approx(z, rel=1e-12)
    _check_dense_noise(
        [f.stats_["gradient"][0] for f in fits], exact["gradient"][0], grad.noise_std
    )


# --------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------

LEDGER_CASES = [
    (DPLeastSquaresClassifier, {}, {"gram": 1, "class_sums": 1}),
    (
        DPLeastSquaresClassifier,
        {"variant": "per_class"},
        {"class_grams": 1, "gram": 1, "class_sums": 1},
    ),
    (DPNewtonClassifier, {"steps": 3}, {"hessians": 3, "gradients": 3}),
    (DPFCClassifier, {"steps": 4, "covariance_share": 0.3}, {"covariance": 1, "gradient": 4}),
    (DPSGDClassifier, {"steps": 5}, {"gradient": 5}),
]


@pytest.mark.parametrize("cls,kw,counts", LEDGER_CASES)
@pytest.mark.parametrize("eps", [0.3, 2.0])
def test_ledger_epsilon_equals_target(cls, kw, counts, eps):
    x, y = _data(13)
    est = cls(epsilon=eps, delta=1e-6, **kw).fit(x, y)
    led = est.privacy_
    assert (1 - 1e-3) * eps <= led.epsilon <= eps
    assert led.delta == 1e-6
    assert {e.name: e.count for e in led.entries} == counts
    # Independent recomputation from the recorded multipliers (exact Gaussian DP).
    mu = math.sqrt(sum(e.count / e.noise_multiplier**2 for e in led.entries))
    assert led.mu == pytest.approx(mu, rel=1e-12)
    assert accounting.gdp_epsilon(mu, 1e-6) == pytest.approx(led.epsilon, rel=1e-9)
    for e in led.entries:
        assert e.noise_std == pytest.approx(e.noise_multiplier * e.sensitivity, rel=1e-12)


def test_dpfc_covariance_share_is_respected():
    x, y = _data(14)
    led = DPFCClassifier(epsilon=1.0, steps=4, covariance_share=0.4).fit(x, y).privacy_
    assert _entry(led, "covariance").share == pytest.approx(0.4, rel=1e-6)


def test_default_delta_and_explicit_delta():
    x, y = _data(15)
    assert DPLeastSquaresClassifier(epsilon=1.0).fit(x, y).delta_ == pytest.approx(1e-5)
    small = DPLeastSquaresClassifier(epsilon=1.0).fit(np.tile(x, (500, 1)), np.tile(y, 500))
    assert small.delta_ == pytest.approx(1 / (240 * 500))


def test_dpsgd_poisson_subsampling():
    x, y = _data(16, n=400)
    q, steps = 0.2, 30
    est = DPSGDClassifier(epsilon=1.0, delta=1e-5, steps=steps, sample_rate=q, random_state=1).fit(
        x, y
    )
    (entry,) = est.privacy_.entries
    assert entry.sample_rate == q and entry.count == steps
    assert (1 - 1e-3) <= est.privacy_.epsilon <= 1.0
    rdp = DPSGDClassifier(
        epsilon=1.0, delta=1e-5, steps=steps, sample_rate=q, accountant="rdp"
    ).fit(x, y)
    assert "RDP" in rdp.privacy_.method and (1 - 1e-3) <= rdp.privacy_.epsilon <= 1.0
    assert rdp.noise_multiplier_ == pytest.approx(
        accounting.calibrate_dpsgd_noise_multiplier(1.0, 1e-5, q, steps, method="rdp")
    )
    sizes = np.array(est.diagnostics_["batch_sizes"])
    assert len(set(sizes.tolist())) > 3  # real Poisson sampling: the batch size varies
    assert abs(sizes.mean() - q * 400) < 5 * math.sqrt(q * (1 - q) * 400 / steps) + 1
    z_full = accounting.calibrate_noise_multiplier(1.0, 1e-5, steps)
    assert est.noise_multiplier_ < z_full  # amplification by subsampling
    again = DPSGDClassifier(
        epsilon=1.0, delta=1e-5, steps=steps, sample_rate=q, random_state=1
    ).fit(x, y)
    assert again.diagnostics_ == est.diagnostics_
    np.testing.assert_array_equal(again.coef_, est.coef_)


# --------------------------------------------------------------------------------------
# Keys: reproducible with random_state, fresh without
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_reproducible_with_random_state_fresh_without(cls):
    x, y = _data(17)
    kw = {"steps": 2} if cls is not DPLeastSquaresClassifier else {}
    a = cls(epsilon=1.0, random_state=5, **kw).fit(x, y)
    b = cls(epsilon=1.0, random_state=5, **kw).fit(x, y)
    c = cls(epsilon=1.0, random_state=6, **kw).fit(x, y)
    d = cls(epsilon=1.0, **kw).fit(x, y)
    e = cls(epsilon=1.0, **kw).fit(x, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert a.noise_seeded_ and not d.noise_seeded_
    assert not np.array_equal(a.coef_, c.coef_)
    assert not np.array_equal(d.coef_, e.coef_)
    assert d.noise_key_fingerprint_ != e.noise_key_fingerprint_


# --------------------------------------------------------------------------------------
# Sweeps on a public validation split are post-processing
# --------------------------------------------------------------------------------------

SWEEP_CASES = [
    (DPLeastSquaresClassifier, {"reg": [0.5, 5.0, 50.0]}, {"reg": 5.0}),
    (
        DPLeastSquaresClassifier,
        {"variant": "per_class", "reg": [1.0, 10.0], "alpha": [0.3, 1.0]},
        {"variant": "per_class", "reg": 1.0, "alpha": 0.3},
    ),
    (DPNewtonClassifier, {"reg": [1.0, 10.0], "lr": [0.5, 1.0]}, {"reg": 1.0, "lr": 0.5}),
    (
        DPFCClassifier,
        {"steps": 4, "reg": [1.0, 10.0], "lr": [10.0, 30.0]},
        {"steps": 4, "reg": 1.0, "lr": 10.0},
    ),
    (DPSGDClassifier, {"steps": 5, "lr": [0.1, 1.0, 3.0]}, {"steps": 5, "lr": 0.1}),
]


@pytest.mark.parametrize("cls,sweep,single", SWEEP_CASES)
def test_sweep_reuses_released_statistics(cls, sweep, single):
    x, y = _data(18, n=300)
    xv, yv = _data(19, n=150)
    swept = cls(epsilon=1.0, random_state=7, keep_stats=True, **sweep).fit(x, y, X_val=xv, y_val=yv)
    one = cls(epsilon=1.0, random_state=7, keep_stats=True, **single).fit(x, y)
    assert swept.privacy_.to_dict() == one.privacy_.to_dict()
    assert swept.privacy_.epsilon <= 1.0
    assert swept.sweep_results_ and one.sweep_results_ == []
    # The first release is identical (same key, same counter, same statistic).
    first = next(iter(one.stats_))
    a, b = swept.stats_[first], one.stats_[first]
    np.testing.assert_array_equal(
        a[0] if isinstance(a, list) else a, b[0] if isinstance(b, list) else b
    )
    if cls is DPLeastSquaresClassifier:
        for key in one.stats_:
            np.testing.assert_array_equal(swept.stats_[key], one.stats_[key])
        best = max(swept.sweep_results_, key=lambda r: r["val_accuracy"])
        assert swept.reg_ == best["reg"]
        assert len(swept.sweep_results_) == (3 if "alpha" not in sweep else 4)
    with pytest.raises(ValueError, match="validation split"):
        cls(epsilon=1.0, **sweep).fit(x, y)


# --------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_public_classes_that_never_occur(cls):
    x, y = _data(20)
    est = cls(epsilon=1.0, classes=[0, 1, 2, 3, 4], random_state=0).fit(x, y)
    assert est.coef_.shape == (5, 6)
    assert np.isfinite(est.coef_).all()
    np.testing.assert_array_equal(est.classes_, np.arange(5))
    assert est.decision_function(x).shape == (240, 5)
    with pytest.raises(ValueError, match="not in classes"):
        cls(classes=[0, 1]).fit(x, y)
    with pytest.raises(ValueError, match="duplicates"):
        cls(classes=[0, 1, 1, 2]).fit(x, y)


def test_arbitrary_labels_are_mapped():
    x, y = _data(21)
    names = np.array(["cat", "dog", "emu"])
    est = DPLeastSquaresClassifier(epsilon=INF, reg=0.1).fit(x, names[y])
    np.testing.assert_array_equal(est.classes_, names)
    ref = DPLeastSquaresClassifier(epsilon=INF, reg=0.1).fit(x, y)
    np.testing.assert_array_equal(est.predict(x), names[ref.predict(x)])
    assert est.score(x, names[y]) == ref.score(x, y)


def test_single_class_rejected():
    x, _ = _data(22)
    with pytest.raises(ValueError, match="at least 2 classes"):
        DPLeastSquaresClassifier().fit(x, np.zeros(240, dtype=int))


# --------------------------------------------------------------------------------------
# Numerics: repair of indefinite noisy matrices; float32 input
# --------------------------------------------------------------------------------------


def test_indefinite_noisy_gram_is_repaired():
    x, y = _data(23, d=20)
    # denoise="none": the Cholesky path with repair (a shrinker never needs one).
    est = DPLeastSquaresClassifier(epsilon=0.1, reg=0.0, random_state=0, denoise="none").fit(x, y)
    assert est.repaired_ == [0]
    assert np.isfinite(est.coef_).all()
    newton = DPNewtonClassifier(epsilon=0.1, reg=0.0, random_state=0, denoise="none").fit(x, y)
    assert newton.repaired_ and np.isfinite(newton.coef_).all()


def test_float32_features_close_to_float64():
    x, y = _data(24)
    a = DPFCClassifier(epsilon=INF, steps=3).fit(x.astype(np.float32), y)
    b = DPFCClassifier(epsilon=INF, steps=3).fit(x, y)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# Errors name the argument
# --------------------------------------------------------------------------------------

BAD_PARAMS = [
    (DPLeastSquaresClassifier, {"epsilon": 0.0}, ValueError, "epsilon"),
    (DPLeastSquaresClassifier, {"epsilon": -1.0}, ValueError, "epsilon"),
    (DPLeastSquaresClassifier, {"epsilon": float("nan")}, ValueError, "epsilon"),
    (DPLeastSquaresClassifier, {"epsilon": "1"}, TypeError, "epsilon"),
    (DPLeastSquaresClassifier, {"delta": 0.0}, ValueError, "delta"),
    (DPLeastSquaresClassifier, {"delta": 1.0}, ValueError, "delta"),
    (DPLeastSquaresClassifier, {"clip_norm": 0.0}, ValueError, "clip_norm"),
    (DPLeastSquaresClassifier, {"clip_norm": INF}, ValueError, "clip_norm"),
    (DPLeastSquaresClassifier, {"reg": -1.0}, ValueError, "reg"),
    (DPLeastSquaresClassifier, {"reg": []}, ValueError, "reg"),
    (DPLeastSquaresClassifier, {"variant": "local"}, ValueError, "variant"),
    (DPLeastSquaresClassifier, {"gram_share": 1.0}, ValueError, "gram_share"),
    (DPLeastSquaresClassifier, {"alpha": 0.5}, ValueError, "alpha"),
    (DPLeastSquaresClassifier, {"random_state": 1.5}, TypeError, "random_state"),
    (DPLeastSquaresClassifier, {"device": "tpu"}, ValueError, "device"),
    (DPLeastSquaresClassifier, {"normalize": "yes"}, TypeError, "normalize"),
    (DPNewtonClassifier, {"steps": 0}, ValueError, "steps"),
    (DPNewtonClassifier, {"steps": 2.0}, TypeError, "steps"),
    (DPNewtonClassifier, {"lr": -1.0}, ValueError, "lr"),
    (DPNewtonClassifier, {"hessian_share": 0.0}, ValueError, "hessian_share"),
    (DPFCClassifier, {"grad_clip_norm": 0.0}, ValueError, "grad_clip_norm"),
    (DPFCClassifier, {"covariance_share": 1.5}, ValueError, "covariance_share"),
    (DPFCClassifier, {"lr": [1.0, 0.0]}, ValueError, "lr"),
    (DPSGDClassifier, {"optimizer": "rmsprop"}, ValueError, "optimizer"),
    (DPSGDClassifier, {"loss": "hinge"}, ValueError, "loss"),
    (DPSGDClassifier, {"sample_rate": 0.0}, ValueError, "sample_rate"),
    (DPSGDClassifier, {"sample_rate": 1.5}, ValueError, "sample_rate"),
    (DPSGDClassifier, {"momentum": 1.0}, ValueError, "momentum"),
]


@pytest.mark.parametrize("cls,kw,exc,match", BAD_PARAMS)
def test_bad_parameters_raise_at_fit(cls, kw, exc, match):
    x, y = _data(25, n=60)
    est = cls(**kw)  # stored verbatim, checked at fit
    with pytest.raises(exc, match=match):
        est.fit(x, y)


def test_bad_data_raises():
    x, y = _data(26, n=60)
    est = DPLeastSquaresClassifier()
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="X contains NaN"):
        est.fit(bad, y)
    with pytest.raises(ValueError, match="2-D"):
        est.fit(x[:, 0], y)
    with pytest.raises(ValueError, match="empty"):
        est.fit(x[:0], y[:0])
    with pytest.raises(ValueError, match="labels but X has"):
        est.fit(x, y[:-1])
    with pytest.raises(ValueError, match="dtype"):  # scikit-learn: ValueError for complex
        est.fit(x.astype(np.complex128), y)
    with pytest.raises(ValueError, match="together"):
        est.fit(x, y, X_val=x)
    with pytest.raises(ValueError, match="y_val contains labels"):
        est.fit(x, y, X_val=x[:5], y_val=np.full(5, 9))


@pytest.mark.skipif(GPU_AVAILABLE, reason="a GPU is present")
def test_device_cuda_without_gpu_is_a_clear_error():
    x, y = _data(27, n=60)
    with pytest.raises(RuntimeError, match="GPU path is not usable") as info:
        DPLeastSquaresClassifier(device="cuda").fit(x, y)
    missing = models._cuda_missing()
    assert missing and all(m in str(info.value) for m in missing)
    assert DPLeastSquaresClassifier(device="auto", epsilon=1.0).fit(x, y).device_ == "cpu"


@pytest.mark.parametrize(
    "compiled,devices,cupy,words",
    [
        (False, 0, None, ["no CUDA kernels", 'pip install "dpfc-native[cuda]"']),
        (False, 0, "13.6.0", ["no CUDA kernels"]),
        (True, 0, "13.6.0", ["no usable GPU (GPU 0: sm_75 is older than sm_80)"]),
        (
            True,
            1,
            None,
            ['CuPy is not installed or does not import (pip install "dpfc-native[cuda]")'],
        ),
    ],
)
def test_device_cuda_error_names_what_is_missing(monkeypatch, compiled, devices, cupy, words):
    import dpfc_native

    info = {
        "cuda_compiled": compiled,
        "cuda_devices": devices,
        "cuda_devices_skipped": []
        if devices or not compiled
        else ["GPU 0: sm_75 is older than sm_80"],
        "cupy": cupy,
    }
    monkeypatch.setattr(dpfc_native, "build_info", lambda: info)
    with pytest.raises(RuntimeError, match="GPU path is not usable") as err:
        models.resolve_device("cuda")
    for word in words:
        assert word in str(err.value)
    assert models.resolve_device("auto") == "cpu"
    assert ("CuPy" in str(err.value)) == (cupy is None)


@pytest.mark.gpu
@pytest.mark.parametrize("cls", ESTIMATORS)
def test_gpu_matches_cpu(cls):
    import cupy

    x, y = _data(28)
    kw = {"steps": 3} if cls is not DPLeastSquaresClassifier else {}
    cpu = cls(epsilon=1.0, random_state=3, device="cpu", **kw).fit(x, y)
    gpu = cls(epsilon=1.0, random_state=3, device="cuda", **kw).fit(cupy.asarray(x), y)
    assert gpu.device_ == "cuda" and isinstance(gpu.coef_, np.ndarray)
    np.testing.assert_allclose(gpu.coef_, cpu.coef_, rtol=1e-6, atol=1e-8)
    assert gpu.privacy_.to_dict() == cpu.privacy_.to_dict()


# --------------------------------------------------------------------------------------
# Defaults work without tuning
# --------------------------------------------------------------------------------------


def test_defaults_work_on_digits():
    from dpfc_native import data

    train, test = data.digits_features()
    x, y, xt, yt = train.features, train.labels, test.features, test.labels
    for cls in ESTIMATORS:
        assert cls(epsilon=INF).fit(x, y).score(xt, yt) > 0.85, cls.__name__
        assert cls(epsilon=8.0, random_state=0).fit(x, y).score(xt, yt) > 0.8, cls.__name__


def _preprocess_reference(x, clip, center, normalize):
    """The generic NumPy formula (the GPU path's), in float64."""
    ref = np.array(x, dtype=np.float64)
    if center is not None:
        ref -= center
    if normalize:
        amax = np.abs(ref).max(axis=1)
        ref /= np.where(amax > 0, amax, 1.0)[:, None]
        nrm = np.sqrt((ref * ref).sum(axis=1))
        ref /= np.where(nrm > 0, nrm, 1.0)[:, None]
    return ops.clip_rows(ref, clip)[0]


def _exact_norms(a):
    from fractions import Fraction

    return [math.sqrt(float(sum(Fraction(float(v)) ** 2 for v in row))) for row in a]


@pytest.mark.parametrize(("m", "d"), [(1, 1), (7, 5), (333, 769), (4096, 64)])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("centre", [False, True])
def test_cpu_preprocessing_native_pass_matches_the_float64_formula(m, d, normalize, centre):
    """The fused native pass (centre, normalise, clip) against the generic float64 formula
    on fresh data of extreme scales: within a few ulps of each row's scale, every element
    written, in place or not, float32 rows read as they are; every row's exact norm below
    the clip bound."""
    rng = np.random.default_rng(m + d + 10 * normalize + 100 * centre)
    x = rng.standard_normal((m, d)) * np.exp(rng.uniform(-30, 30, (m, 1)))
    x[0] = 0.0  # a zero row: no division by zero
    if m > 4:
        x[1] *= 1e290  # its sum of squares overflows: the rescaled norm
        x[2] *= 1e-280  # its sum of squares underflows
    center = rng.standard_normal(d) * 0.1 if centre else None
    clip = 0.7
    ref = _preprocess_reference(x, clip, center, normalize)
    out = np.full(x.shape, np.nan)
    got = models._preprocess_rows_cpu(x, clip, center, normalize, out=out)
    assert got is out and np.isfinite(got).all()
    scale = np.abs(ref).max(axis=1, keepdims=True)
    assert (np.abs(got - ref) <= 8 * d * 2.0**-52 * scale).all()
    inplace = x.copy()
    assert models._preprocess_rows_cpu(inplace, clip, center, normalize, out=inplace) is inplace
    assert inplace.tobytes() == got.tobytes()
    rows = [0, 1, 2, m - 1] if m > 4 else list(range(m))
    assert max(_exact_norms(got[rows])) < clip
    assert (np.linalg.norm(got, axis=1) < clip).all()
    # float32 rows: read as stored, the same bits as their float64 widening.
    x32 = x[3:].astype(np.float32) if m > 4 else x.astype(np.float32)
    a = models._preprocess_rows_cpu(x32, clip, center, normalize)
    b = models._preprocess_rows_cpu(x32.astype(np.float64), clip, center, normalize)
    assert a.tobytes() == b.tobytes()


def test_cpu_preprocessing_names_the_row_a_centre_overflows():
    x = np.ones((5, 3))
    x[3, 1] = 1.5e308
    center = np.array([0.0, -1.5e308, 0.0])
    with pytest.raises(ValueError, match="overflows float64 at row 13"):
        models._preprocess_rows_cpu(x, 1.0, center, False, first_row=10)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf at row 3"):
        models._preprocess_rows_cpu(x, 1.0, None, True)


def test_refits_and_validation_splits_keep_their_contracts():
    """A global refit drops a per-class fit's alpha_ (and save() does not write it); a
    validation DataFrame with other or reordered columns is refused; the binary
    decision function keeps the sign of log-odds that underflow (predict agrees)."""
    import json
    import tempfile
    import warnings

    import pandas as pd

    from dpfc_native import PrivacyWarning

    warnings.simplefilter("ignore", PrivacyWarning)
    rng = np.random.default_rng(33)
    X = rng.standard_normal((200, 4))
    y = np.arange(200) % 3
    est = DPLeastSquaresClassifier(classes=[0, 1, 2], variant="per_class").fit(X, y)
    assert hasattr(est, "alpha_")
    est.set_params(variant="global").fit(X, y)
    assert not hasattr(est, "alpha_")
    with tempfile.TemporaryDirectory() as tmp:
        path = est.save(f"{tmp}/m.npz")
        assert "alpha_" not in json.loads(str(np.load(path)["fitted"]))
    frame = pd.DataFrame(X, columns=list("abcd"))
    with pytest.raises(ValueError, match="X_val's feature names differ"):
        DPLeastSquaresClassifier(classes=[0, 1, 2], reg=[1, 10]).fit(
            frame, y, X_val=frame.iloc[:50][list("dcba")], y_val=y[:50]
        )
    Xb, yb = rng.standard_normal((400, 4)), rng.integers(0, 2, 400)
    sgd = DPSGDClassifier(
        float("inf"), classes=[0, 1], loss="sigmoid", bias=5.0, lr=1e6, steps=5
    ).fit(Xb, yb)
    scores = sgd._map_scores(Xb, models._to_numpy)
    assert (np.minimum(scores[:, 0], scores[:, 1]) > 745).any()  # the log-odds underflow
    df = sgd.decision_function(Xb)
    np.testing.assert_array_equal(sgd.predict(Xb), sgd.classes_[(df > 0).astype(int)])


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_a_refused_refit_leaves_the_previous_model(cls):
    """A refit refused by its budget (or by a PrivacyWarning raised as an error) set
    n_features_in_ / feature_names_in_ from the refused data first: the old weights were
    then unusable ("X has 6 features, but ... is expecting 4")."""
    import warnings

    from dpfc_native import PrivacyBudget, PrivacyWarning
    from dpfc_native.tuning import PrivacyBudgetExceeded

    rng = np.random.default_rng(31)
    x6 = rng.standard_normal((200, 6))
    y = rng.integers(0, 3, 200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivacyWarning)
        est = cls(classes=[0, 1, 2]).fit(x6, y)
    before = {k: v for k, v in vars(est).items() if k.endswith("_")}
    pred = est.predict(x6)
    est.set_params(budget=PrivacyBudget(0.1, 1e-5))
    with pytest.raises(PrivacyBudgetExceeded):
        est.fit(x6[:, :4], y)
    est.set_params(budget=None, classes=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrivacyWarning)
        with pytest.raises(PrivacyWarning):
            est.fit(x6[:, :5], y)
    assert {k: v for k, v in vars(est).items() if k.endswith("_")}.keys() == before.keys()
    assert est.n_features_in_ == 6 and est.coef_ is before["coef_"]
    np.testing.assert_array_equal(est.predict(x6), pred)


def test_dpsgd_probabilities_follow_the_trained_loss(tmp_path):
    """predict_proba read the current loss parameter: set_params(loss=...) after fit
    changed the probabilities (and the saved file labelled the wrong link)."""
    from dpfc_native import load_model

    rng = np.random.default_rng(32)
    x = rng.standard_normal((300, 5))
    y = (x[:, 0] > 0).astype(int)
    est = DPSGDClassifier(epsilon=math.inf, loss="sigmoid", steps=20).fit(x, y)
    p0, d0 = est.predict_proba(x[:7]), est.decision_function(x[:7])
    assert est.loss_ == "sigmoid"
    est.set_params(loss="softmax")
    np.testing.assert_array_equal(est.predict_proba(x[:7]), p0)
    np.testing.assert_array_equal(est.decision_function(x[:7]), d0)
    loaded = load_model(est.save(tmp_path / "m.npz"))
    assert loaded.loss_ == "sigmoid"
    np.testing.assert_array_equal(loaded.predict_proba(x[:7]), p0)


def test_center_is_copied_and_score_refuses_mixed_label_types():
    rng = np.random.default_rng(33)
    x = rng.standard_normal((120, 4))
    y = np.array(["a", "b"])[rng.integers(0, 2, 120)]
    center = np.full(4, 0.5)
    est = DPLeastSquaresClassifier(epsilon=math.inf, center=center).fit(x, y)
    pred = est.predict(x)
    center += 3.0  # the user's array, changed after fit: the model must not move
    np.testing.assert_array_equal(est.predict(x), pred)
    with pytest.raises(ValueError, match="Mix of label input types"):
        est.score(x, (y == "b").astype(int))
    assert est.score(x, y) == np.mean(pred == y)


def test_label_outside_classes_error_does_not_show_the_label():
    x = np.random.default_rng(34).standard_normal((30, 3))
    y = np.arange(30) % 3
    y[7] = 987654
    with pytest.raises(ValueError, match="not in classes") as err:
        DPLeastSquaresClassifier(classes=[0, 1, 2]).fit(x, y)
    assert "987654" not in str(err.value)
