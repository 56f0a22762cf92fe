"""One set of argument checks: the same mistake raises the same exception everywhere.

A table of mistakes x entry points (ops, models, data, plan, tuning): every entry point
that takes an argument of a kind must raise the mistake's exception type (wrong type ->
TypeError, wrong value -> ValueError) with a message naming the argument, and must accept
the same forms of a valid value (0-d arrays as scalars). Then the once-per-fit
validation: the estimators read X for NaN/Inf once, and their inner ops calls (the
already-validated path) give the same bits as the public ops.
"""

from __future__ import annotations

import math
import re
import types

import numpy as np
import pytest

from dpfc_native import _validation, data, models, ops, plan, tuning

pytestmark = pytest.mark.filterwarnings("ignore::dpfc_native.PrivacyWarning")

RNG = np.random.default_rng(7)
X = RNG.standard_normal((11, 5))
Y = np.arange(11) % 3
K = 3

# ---------------------------------------------------------------------------------------
# Entry points, grouped by the kind of argument they take. Each is a function of the
# argument's value and the name the message must contain.
# ---------------------------------------------------------------------------------------


def _planned(cls, name):
    """An estimator parameter, checked when the estimator plans its noise."""
    return (lambda v: cls(**{name: v}).noise_plan(100, 5, K), name)


POSITIVE = {  # real scalars > 0
    "ops.clip_rows/clip_norm": (lambda v: ops.clip_rows(X, v), "clip_norm"),
    "ops.clipped_gram/clip_norm": (lambda v: ops.clipped_gram(X, v), "clip_norm"),
    "ops.clipped_linear_grad/clip_norm": (
        lambda v: ops.clipped_linear_grad(X, Y, np.zeros((K, 5)), 0.0, v),
        "clip_norm",
    ),
    "models.DPFCClassifier/clip_norm": _planned(models.DPFCClassifier, "clip_norm"),
    "models.DPSGDClassifier/grad_clip_norm": _planned(models.DPSGDClassifier, "grad_clip_norm"),
    "data.digits_features/gamma": (
        lambda v: data.digits_features("random_fourier", gamma=v, num_features=8),
        "gamma",
    ),
}
NONNEG = {  # real scalars >= 0
    "ops.gaussian_noise/std": (lambda v: ops.gaussian_noise(3, v), "std"),
    "ops.sym_gaussian_noise/std": (lambda v: ops.sym_gaussian_noise(3, v), "std"),
    "models.DPFCClassifier/reg": _planned(models.DPFCClassifier, "reg"),
    "data.synthetic_features/spectrum_decay": (
        lambda v: data.synthetic_features(30, 4, 3, spectrum_decay=v, workers=1),
        "spectrum_decay",
    ),
    "tuning.selection_epsilon/shape": (
        lambda v: tuning.selection_epsilon(1.0, 1e-5, 3.0, shape=v),
        "shape",
    ),
}
SHARE = {  # real scalars in the open interval (0, 1)
    "models.DPFCClassifier/covariance_share": _planned(models.DPFCClassifier, "covariance_share"),
    "models.DPNewtonClassifier/hessian_share": _planned(models.DPNewtonClassifier, "hessian_share"),
    "models.DPLeastSquaresClassifier/delta": _planned(models.DPLeastSquaresClassifier, "delta"),
    "tuning.PrivacyBudget/delta": (lambda v: tuning.PrivacyBudget(1.0, v), "delta"),
    "tuning.selection_epsilon/delta": (lambda v: tuning.selection_epsilon(1.0, v, 3.0), "delta"),
}
INTEGER = {  # integers >= a minimum
    "ops.clipped_class_sums/num_classes": (
        lambda v: ops.clipped_class_sums(X, Y, v, 1.0),
        "num_classes",
    ),
    "ops.sym_gaussian_noise/d": (lambda v: ops.sym_gaussian_noise(v, 1.0), "d"),
    "ops.sym_gaussian_noise/batch": (lambda v: ops.sym_gaussian_noise(3, 1.0, batch=v), "batch"),
    "models.DPFCClassifier/steps": _planned(models.DPFCClassifier, "steps"),
    "models.noise_plan/n": (lambda v: models.DPFCClassifier().noise_plan(v, 5, K), "n"),
    "data.synthetic_features/n": (lambda v: data.synthetic_features(v, 4, 3, workers=1), "n"),
    "data.check_feature_arrays/num_classes": (
        lambda v: data.check_feature_arrays(X, Y, num_classes=v),
        "num_classes",
    ),
    "data.FeatureSet/num_classes": (
        lambda v: data.FeatureSet(np.ascontiguousarray(X), Y.astype(np.int64), v),
        "num_classes",
    ),
}
CHOICE = {  # a string from a fixed set
    "ops.clipped_gram/accumulate": (lambda v: ops.clipped_gram(X, 1.0, accumulate=v), "accumulate"),
    "ops.clipped_linear_grad/loss": (
        lambda v: ops.clipped_linear_grad(X, Y, np.zeros((K, 5)), 0.0, 1.0, loss=v),
        "loss",
    ),
    "ops.gaussian_noise/device": (lambda v: ops.gaussian_noise(3, 1.0, device=v), "device"),
    "models.DPSGDClassifier/optimizer": _planned(models.DPSGDClassifier, "optimizer"),
    "models.DPSGDClassifier/accountant": _planned(models.DPSGDClassifier, "accountant"),
    "models.DPFCClassifier/device": _planned(models.DPFCClassifier, "device"),
    "tuning.PrivacyBudget/method": (lambda v: tuning.PrivacyBudget(1.0, 1e-5, method=v), "method"),
    "plan.noise_plans/method": (lambda v: plan.noise_plans(100, 5, K, [1.0], method=v), "method"),
    "data.digits_features/feature_map": (lambda v: data.digits_features(v), "feature_map"),
}
DTYPE_PARAM = {  # a dtype= parameter
    "ops.gaussian_noise/dtype": (lambda v: ops.gaussian_noise(3, 1.0, dtype=v), "dtype"),
    "ops.sym_gaussian_noise/dtype": (lambda v: ops.sym_gaussian_noise(3, 1.0, dtype=v), "dtype"),
    "data.synthetic_features/dtype": (
        lambda v: data.synthetic_features(30, 4, 3, dtype=v, workers=1),
        "dtype",
    ),
    "data.digits_features/dtype": (lambda v: data.digits_features(dtype=v), "dtype"),
}
FEATURES = {  # a feature matrix (n, d)
    "ops.clipped_gram/x": (lambda v: ops.clipped_gram(v, 1.0), "x"),
    "ops.clip_rows/x": (lambda v: ops.clip_rows(v, 1.0), "x"),
    "data.check_feature_arrays/features": (
        lambda v: data.check_feature_arrays(v, np.zeros(len(np.atleast_1d(v)), np.int64)),
        "features",
    ),
    "models.DPFCClassifier.fit/X": (
        lambda v: models.DPFCClassifier(steps=1).fit(v, np.arange(len(np.atleast_1d(v))) % 2),
        "X",
    ),
}
CLASS_INDICES = {  # integer labels in [0, K)
    "ops.clipped_class_sums/labels": (lambda v: ops.clipped_class_sums(X, v, K, 1.0), "labels"),
    "ops.clipped_stats/labels": (lambda v: ops.clipped_stats(X, v, K, 1.0), "labels"),
    "data.check_feature_arrays/labels": (lambda v: data.check_feature_arrays(X, v), "labels"),
}

# Entry points exempt from a mistake's row, with the reason: the estimators' X follows
# scikit-learn's check_array for complex data (ValueError "Complex data not supported"),
# which scikit-learn's own estimator checks require.
EXEMPT = {("complex dtype", "models.DPFCClassifier.fit/X")}

# (group, mistake, value, exception)
MISTAKES = [
    (POSITIVE, "str", "1.0", TypeError),
    (POSITIVE, "bool", True, TypeError),
    (POSITIVE, "complex", 1 + 0j, TypeError),
    (POSITIVE, "1-element array", np.array([1.0]), TypeError),
    (POSITIVE, "NaN", math.nan, ValueError),
    (POSITIVE, "zero", 0.0, ValueError),
    (POSITIVE, "negative", -1.0, ValueError),
    (POSITIVE, "inf", math.inf, ValueError),
    (NONNEG, "str", "0", TypeError),
    (NONNEG, "bool", False, TypeError),
    (NONNEG, "NaN", math.nan, ValueError),
    (NONNEG, "negative", -0.5, ValueError),
    (NONNEG, "inf", math.inf, ValueError),
    (SHARE, "str", "0.5", TypeError),
    (SHARE, "None-like list", [0.5], TypeError),
    (SHARE, "zero", 0.0, ValueError),
    (SHARE, "one", 1.0, ValueError),
    (SHARE, "NaN", math.nan, ValueError),
    (INTEGER, "float", 3.0, TypeError),
    (INTEGER, "bool", True, TypeError),
    (INTEGER, "str", "3", TypeError),
    (INTEGER, "float array", np.array(3.0), TypeError),
    (INTEGER, "zero", 0, ValueError),
    (INTEGER, "negative", -2, ValueError),
    (CHOICE, "unknown", "nope", ValueError),
    (CHOICE, "None", None, ValueError),
    (CHOICE, "wrong case", "SGD?", ValueError),
    (DTYPE_PARAM, "int32", np.int32, TypeError),
    (DTYPE_PARAM, "float16", np.float16, TypeError),
    (DTYPE_PARAM, "not a dtype", "banana", TypeError),
    (FEATURES, "complex dtype", X.astype(complex), TypeError),
    (FEATURES, "str dtype", X.astype(str), TypeError),
    (FEATURES, "1-D", X[0], ValueError),
    (FEATURES, "0-d", np.array(1.0), ValueError),
    (FEATURES, "3-D", X[:, :, None], ValueError),
    (FEATURES, "empty", X[:0], ValueError),
    (FEATURES, "NaN", np.where(np.arange(5) == 2, np.nan, X), ValueError),
    (FEATURES, "Inf", np.where(np.arange(5) == 4, -np.inf, X), ValueError),
    (CLASS_INDICES, "float dtype", Y.astype(float), TypeError),
    (CLASS_INDICES, "bool dtype", Y > 0, TypeError),
    (CLASS_INDICES, "2-D", Y[:, None], ValueError),
    (CLASS_INDICES, "negative", Y - 1, ValueError),
]

CASES = [
    pytest.param(fn, name, value, exc, id=f"{entry}-{mistake}")
    for group, mistake, value, exc in MISTAKES
    for entry, (fn, name) in group.items()
    if (mistake, entry) not in EXEMPT
]


@pytest.mark.parametrize("fn,name,value,exc", CASES)
def test_same_mistake_same_exception(fn, name, value, exc):
    with np.errstate(all="ignore"), pytest.raises(Exception) as info:
        fn(value)
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    assert re.search(rf"(^|\W){re.escape(name)}\W", str(info.value)), (
        f"the message does not name {name!r}: {info.value}"
    )


@pytest.mark.parametrize("entry", sorted(POSITIVE))
@pytest.mark.parametrize(
    "form", [2, 2.0, np.float32(2.0), np.int64(2), np.array(2.0), np.array(2)], ids=repr
)
def test_real_scalars_accept_numpy_scalars_and_0d_arrays(entry, form):
    fn, _ = POSITIVE[entry]
    fn(form)  # no exception: a 0-d array is a scalar, as in NumPy


@pytest.mark.parametrize("entry", sorted(INTEGER))
@pytest.mark.parametrize("form", [5, np.int32(5), np.uint8(5), np.array(5)], ids=repr)
def test_integers_accept_numpy_integers_and_0d_arrays(entry, form):
    fn, _ = INTEGER[entry]
    fn(form)


def test_file_contents_are_values(tmp_path):
    """The same wrong dtype is a TypeError as an argument, a ValueError inside a file."""
    xi = (X * 10).astype(np.int32)
    with pytest.raises(TypeError, match="features"):
        data.check_feature_arrays(xi, Y)
    path = tmp_path / "ints.npz"
    np.savez(path, features=xi, labels=Y)
    with pytest.raises(ValueError, match=r"ints\.npz\['features'\]"):
        data.load_features(path)
    np.savez(path, features=X, labels=Y.astype(float))
    with pytest.raises(ValueError, match=r"ints\.npz\['labels'\]"):
        data.load_features(path)
    with pytest.raises(TypeError, match="num_classes"):  # an argument, not the file's
        data.load_features(path, num_classes=3.0)


def test_helpers_direct():
    v = _validation
    assert v.real(np.array(2.5), "a") == 2.5 and isinstance(v.real(np.float32(1), "a"), float)
    assert v.integer(np.array(4), "k", 1) == 4
    assert v.interval(0.0, "p", 0.0, 1.0, closed="left") == 0.0
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\]"):
        v.interval(0.0, "p", 0.0, 1.0, closed="right")
    with pytest.raises(ValueError, match="k must be <= 3"):
        v.integer(4, "k", 1, 3)
    assert v.boolean(np.bool_(True), "flag") is True
    with pytest.raises(TypeError, match="flag"):
        v.boolean(1, "flag")
    assert v.seed(None) is None and v.seed(np.int64(3)) == 3
    with pytest.raises(TypeError, match="random_state"):
        v.seed(1.0)
    with pytest.raises(ValueError, match="x"):
        v.choice(np.array(["a"]), "x", ("a",))
    assert v.is_scalar(np.array(1.0)) and v.is_scalar("a") and not v.is_scalar(np.ones(1))


def test_finite_scan_chunks_and_reports_first_bad_row(monkeypatch):
    a = RNG.standard_normal((37, 3))
    a[29, 1] = np.inf
    monkeypatch.setattr(_validation, "_CHUNK_ELEMENTS", 6)  # 2 rows per chunk
    with pytest.raises(ValueError, match=r"a contains NaN or Inf \(first at row 29\)"):
        _validation.finite(a, "a")
    _validation.finite(a[:29], "a")
    with pytest.raises(ValueError, match="s contains NaN"):
        _validation.finite(np.array(np.nan), "s")
    # A block whose sum overflows is finite; half precision is summed in float64.
    for dtype, big in ((np.float16, 6e4), (np.float32, 3e38), (np.float64, 1e308)):
        h = np.full((37, 3), big, dtype=dtype)
        _validation.finite(h, "h")
        h[31, 0] = -np.inf
        with pytest.raises(ValueError, match=r"first at row 31"):
            _validation.finite(h, "h")
        assert _validation.nonfinite_rows(h, block_elements=6) == (1, 31)


def test_finite_scan_device_branch_chunks_with_one_verdict(monkeypatch):
    """The GPU branch (any array module other than NumPy): chunked, one final sync."""
    calls = []

    def isfinite(a):
        calls.append(a.shape)
        return np.isfinite(a)

    xp = types.SimpleNamespace(isfinite=isfinite, stack=np.stack)
    monkeypatch.setattr(_validation, "_GPU_CHUNK_ELEMENTS", 9)  # 3 rows of 3 per chunk
    a = RNG.standard_normal((10, 3))
    _validation.finite(a, "a", xp)
    assert [s[0] for s in calls] == [3, 3, 3, 1]
    a[9, 2] = np.nan
    with pytest.raises(ValueError, match="a contains NaN or Inf"):
        _validation.finite(a, "a", xp)
    calls.clear()
    _validation.finite(a[:2], "a", xp)  # small: one reduction
    assert calls == [(2, 3)]


# ---------------------------------------------------------------------------------------
# Validate once per fit
# ---------------------------------------------------------------------------------------


def _data(n=203, d=13, k=4, seed=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = rng.standard_normal((n, d)) + 0.5 * np.eye(k, d)[y]
    return x, y


FITS = {
    "DPFC": lambda: models.DPFCClassifier(
        epsilon=2.0, steps=6, classes=np.arange(4), random_state=1
    ),
    "DPSGD-full": lambda: models.DPSGDClassifier(
        epsilon=2.0, steps=5, classes=np.arange(4), random_state=1
    ),
    "DPSGD-poisson": lambda: models.DPSGDClassifier(
        epsilon=2.0, steps=5, sample_rate=0.3, classes=np.arange(4), random_state=1
    ),
    "DPNewton": lambda: models.DPNewtonClassifier(
        epsilon=2.0, steps=2, classes=np.arange(4), random_state=1
    ),
    "DPLS-per_class": lambda: models.DPLeastSquaresClassifier(
        epsilon=2.0, variant="per_class", classes=np.arange(4), random_state=1
    ),
    "DPFC-center": lambda: models.DPFCClassifier(
        epsilon=2.0,
        steps=3,
        classes=np.arange(4),
        center=np.full(13, 0.1),
        normalize=False,
        random_state=1,
    ),
}


@pytest.mark.parametrize("method", sorted(FITS))
def test_fit_scans_x_once(monkeypatch, method):
    """X is read for NaN/Inf once per fit, however many steps; labels are not re-checked."""
    x, y = _data()
    scans, label_checks = [], []
    real_finite, real_labels = _validation.finite, _validation.labels

    def finite(a, name, xp=np):
        scans.append((name, tuple(getattr(a, "shape", ()))))
        return real_finite(a, name, xp)

    def labels(a, name, n, k):
        label_checks.append(name)
        return real_labels(a, name, n, k)

    monkeypatch.setattr(_validation, "finite", finite)
    monkeypatch.setattr(_validation, "labels", labels)
    FITS[method]().fit(x, y)
    feature_scans = [s for s in scans if len(s[1]) == 2 and s[1][1] == x.shape[1]]
    assert feature_scans == [("X", x.shape)], scans
    assert label_checks == []


def test_fit_with_validation_disabled_after_first_scan(monkeypatch):
    """After the one scan of X, a checker that raises is never reached by a DP-FC fit."""
    x, y = _data()
    real_finite = _validation.finite
    state = {"armed": False}

    def finite(a, name, xp=np):
        if state["armed"] and getattr(a, "ndim", 0) == 2 and a.shape[1] == x.shape[1]:
            raise AssertionError(f"{name} re-scanned during the fit")
        out = real_finite(a, name, xp)
        state["armed"] |= name == "X"
        return out

    monkeypatch.setattr(_validation, "finite", finite)
    for make in (FITS["DPFC"], FITS["DPSGD-full"]):
        state["armed"] = False
        make().fit(x, y)
        assert state["armed"]


@pytest.mark.parametrize("method", sorted(FITS))
def test_fit_bits_unchanged_by_the_unchecked_path(monkeypatch, method):
    x, y = _data()
    fast = FITS[method]().fit(x, y)
    # The public ops carry the names and signatures of ops._unchecked: the checking path.
    monkeypatch.setattr(ops, "_unchecked", ops)
    slow = FITS[method]().fit(x, y)
    np.testing.assert_array_equal(fast.coef_, slow.coef_)
    np.testing.assert_array_equal(fast.intercept_, slow.intercept_)
    assert np.isfinite(fast.coef_).all()


@pytest.mark.parametrize("n,d,k", [(1, 1, 2), (37, 5, 3), (129, 17, 7)])
def test_unchecked_ops_match_public_ops(n, d, k):
    rng = np.random.default_rng(n + d)
    x = rng.standard_normal((n, d)) * 3.0
    y = rng.integers(0, k, n)
    w = rng.standard_normal((k, d))
    weights = rng.uniform(0.0, 0.25, (n, k))
    u, c = ops._unchecked, 1.5
    pairs = [
        (u.clip_rows(x, c), ops.clip_rows(x, c)),
        (u.clipped_gram(x, c), ops.clipped_gram(x, c)),
        (
            u.clipped_gram(x.astype(np.float32), c, accumulate="float32"),
            ops.clipped_gram(x.astype(np.float32), c, accumulate="float32"),
        ),
        (u.clipped_stats(x, y, k, c), ops.clipped_stats(x, y, k, c)),
        (u.clipped_class_grams(x, y, k, c), ops.clipped_class_grams(x, y, k, c)),
        (u.clipped_weighted_grams(x, weights, c), ops.clipped_weighted_grams(x, weights, c)),
        (
            u.clipped_linear_grad(x, y, w, 0.3, c, loss="softmax", feature_clip=2.0),
            ops.clipped_linear_grad(x, y, w, 0.3, c, loss="softmax", feature_clip=2.0),
        ),
        (
            u.clipped_linear_grad(x, y, w, np.full(k, -0.2), c),
            ops.clipped_linear_grad(x, y, w, np.full(k, -0.2), c),
        ),
    ]
    for fast, checked in pairs:
        fast = fast if isinstance(fast, tuple) else (fast,)
        checked = checked if isinstance(checked, tuple) else (checked,)
        for a, b in zip(fast, checked):
            np.testing.assert_array_equal(a, b)
            assert np.isfinite(np.asarray(a, dtype=np.float64)).all()
    # A float64 reference for one of them (the gram): every element written.
    s = np.minimum(1.0, c * ops.CLIP_MARGIN / np.maximum(np.linalg.norm(x, axis=1), 1e-300))
    xc = x * s[:, None]
    np.testing.assert_allclose(u.clipped_gram(x, c), xc.T @ xc, rtol=1e-12, atol=1e-12)
