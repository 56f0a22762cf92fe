"""Inputs that used to crash or give unclear errors: each now raises one clear exception
naming the argument (and in the CLI prints one line, exit status 2, no traceback)."""

from __future__ import annotations

import io
import math
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
from _reference import ESTIMATORS, labelled_blobs
from typer.testing import CliRunner

from dpfc_native import PrivacyWarning, accounting, data, load_model, models, ops
from dpfc_native._cpu_stats import _clip_scale
from dpfc_native.cli import app
from dpfc_native.models import DPFCClassifier, DPLeastSquaresClassifier, DPSGDClassifier

runner = CliRunner()


_data = labelled_blobs


def _kw(cls, **kw):
    kw.setdefault("classes", [0, 1, 2])
    if cls is not DPLeastSquaresClassifier:
        kw.setdefault("steps", 2)
    return kw


def _cli_error(result, needle):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert any(ln.startswith("Error:") and needle in ln for ln in lines), result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------------------
# DP-SGD with a tiny sample rate: bounded accountant work
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [1e-9, 1e-4])
def test_tiny_sample_rate_calibration_does_bounded_work(monkeypatch, q):
    grids, multipliers = [], []
    real_pld = accounting.PrivacyAccountant._pld
    real_eps = accounting.dpsgd_epsilon

    def pld(self, eps_scale):
        acc = real_pld(self, eps_scale)
        interval = acc._value_discretization_interval
        width = max(
            accounting.accountant._pld_loss_width(z, q_)
            for (z, q_) in self._mu2_and_subsampled()[1]
        )
        grids.append(width / interval)
        return acc

    def eps_of(z, *args, **kwargs):
        multipliers.append(z)
        return real_eps(z, *args, **kwargs)

    monkeypatch.setattr(accounting.PrivacyAccountant, "_pld", pld)
    monkeypatch.setattr(accounting.calibration, "dpsgd_epsilon", eps_of)
    z = accounting.calibrate_dpsgd_noise_multiplier(1.0, 1e-5, q, 5)
    assert grids and max(grids) <= accounting.accountant._PLD_MAX_POINTS * (1 + 1e-9)
    assert min(multipliers) >= accounting.calibration._MIN_DPSGD_MULTIPLIER / math.e
    # Still sound: every accountant bounds the result by the target.
    assert real_eps(z, q, 5, 1e-5, method="auto") <= 1.0
    assert real_eps(z, q, 5, 1e-5, method="pld") <= 1.0


@pytest.mark.parametrize("q", [5e-324, 1e-310])
def test_subnormal_sample_rate_is_refused_by_name(q):
    """A subnormal rate reached dp-accounting's PLD and failed there ("a must be greater
    than b. Got a=inf and b=inf"): refused up front, by every entry point."""
    x, y = _data(22, n=50, d=3)
    with pytest.raises(ValueError, match="sample_rate must be at least"):
        DPSGDClassifier(classes=[0, 1, 2], sample_rate=q).fit(x, y)
    with pytest.raises(ValueError, match="sample_rate must be at least"):
        accounting.calibrate_dpsgd_noise_multiplier(1.0, 1e-5, q, 5, method="pld")
    with pytest.raises(ValueError, match="sample_rate must be at least"):
        accounting.SubsampledGaussian(1.0, q, 5)
    # The smallest normal rate is accepted (and calibrates in bounded work).
    z = accounting.calibrate_dpsgd_noise_multiplier(1.0, 1e-5, 2.3e-308, 5, method="rdp")
    assert z >= accounting.calibration._MIN_DPSGD_MULTIPLIER


@pytest.mark.parametrize("q", [1e-9, 1e-4])
def test_dpsgd_fit_with_a_tiny_sample_rate(monkeypatch, q):
    # The estimator's calibration and ledger: a bounded number of accountant evaluations
    # (each on a bounded grid, above), a result within the budget. The seconds it takes
    # are in benchmarks/bench_calibration.py.
    calls = []
    real_eps = accounting.calibration.dpsgd_epsilon

    def eps_of(z, *args, **kwargs):
        calls.append(z)
        return real_eps(z, *args, **kwargs)

    monkeypatch.setattr(accounting.calibration, "dpsgd_epsilon", eps_of)
    x, y = _data(21, n=300, d=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivacyWarning)
        est = DPSGDClassifier(epsilon=1.0, classes=[0, 1, 2], steps=5, sample_rate=q).fit(x, y)
    assert 1 <= len(calls) <= 30
    assert est.noise_multiplier_ >= accounting.calibration._MIN_DPSGD_MULTIPLIER
    assert est.privacy_.epsilon <= 1.0
    assert len(est.diagnostics_["batch_sizes"]) == 5
    assert np.isfinite(est.coef_).all()


def test_pld_interval_coarsened_only_when_the_grid_is_huge():
    acct = accounting.PrivacyAccountant(method="pld")
    acct.compose(accounting.SubsampledGaussian(1.0, 0.01, 10))
    assert acct._pld_interval(1.0) == pytest.approx(1.0 / 3000)  # a typical case: unchanged
    tiny = accounting.PrivacyAccountant(method="pld")
    tiny.compose(accounting.SubsampledGaussian(0.002, 1e-9, 5))
    width = accounting.accountant._pld_loss_width(0.002, 1e-9)
    assert width * 3000 > accounting.accountant._PLD_MAX_POINTS  # the default grid would be huge
    assert tiny._pld_interval(1.0) == pytest.approx(width / accounting.accountant._PLD_MAX_POINTS)


# --------------------------------------------------------------------------------------
# .npz / .npy headers that claim more data than the file holds
# --------------------------------------------------------------------------------------


def _npy_bytes_with_header(shape, dtype=np.float32, payload=b"\0" * 64) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf,
        {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": shape,
        },
    )
    return buf.getvalue() + payload  # the header writer includes the magic


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_npz_header_claiming_a_huge_shape(tmp_path, compression):
    path = tmp_path / "huge.npz"
    labels = io.BytesIO()
    np.save(labels, np.zeros(4, dtype=np.int64))
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr("features.npy", _npy_bytes_with_header((10**12, 10**6)))
        zf.writestr("labels.npy", labels.getvalue())
    with pytest.raises(ValueError, match=r"header claims shape \(1000000000000, 1000000\)"):
        data.load_features(path)
    res = runner.invoke(app, ["train", str(path), "-o", str(tmp_path / "m.npz")])
    _cli_error(res, "header claims")


def test_npy_labels_header_claiming_a_huge_shape(tmp_path):
    x = tmp_path / "a.features.npy"
    np.save(x, np.ones((4, 3), dtype=np.float32))
    (tmp_path / "a.labels.npy").write_bytes(_npy_bytes_with_header((10**13,), np.int64))
    with pytest.raises(ValueError, match="header claims"):
        data.load_features(x)


# --------------------------------------------------------------------------------------
# clip_norm whose square over- or underflows; epsilon = 1e300
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ESTIMATORS)
@pytest.mark.parametrize("clip", [1e300, 1e-170])
def test_clip_norm_out_of_range_names_clip_norm(cls, clip):
    x, y = _data(1)
    with pytest.raises(ValueError, match="clip_norm must be in"):
        cls(epsilon=1.0, clip_norm=clip, **_kw(cls)).fit(x, y)


@pytest.mark.parametrize("cls", [DPFCClassifier, DPSGDClassifier])
def test_grad_clip_norm_out_of_range(cls):
    x, y = _data(2)
    with pytest.raises(ValueError, match="grad_clip_norm must be in"):
        cls(epsilon=1.0, grad_clip_norm=1e300, **_kw(cls)).fit(x, y)


def test_cli_clip_norm_out_of_range(tmp_path):
    x, y = _data(3)
    data.save_features(tmp_path / "t.npz", x.astype(np.float32), y)
    res = runner.invoke(
        app,
        ["train", str(tmp_path / "t.npz"), "--clip-norm", "1e300", "-o", str(tmp_path / "m.npz")],
    )
    _cli_error(res, "--clip-norm must be in")


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_epsilon_1e300_is_refused_clearly(cls):
    x, y = _data(4)
    with pytest.raises(ValueError, match="epsilon=1e.300 is too large.*inf"):
        cls(epsilon=1e300, **_kw(cls)).fit(x, y)


def test_epsilon_1e300_in_the_accountant():
    for call in (
        lambda: accounting.calibrate_mu(1e300, 1e-5),
        lambda: accounting.calibrate_noise_multiplier(1e300, 1e-5),
        lambda: accounting.calibrate_dpsgd_noise_multiplier(1e300, 1e-5, 0.01, 3),
    ):
        with pytest.raises(ValueError, match="epsilon=1e.300 is too large"):
            call()
    assert accounting.calibrate_mu(1e5, 1e-5) > 0  # large but supported


# --------------------------------------------------------------------------------------
# Labels: absurd inferred label sets, mixed types
# --------------------------------------------------------------------------------------


def test_absurd_inferred_label_is_refused(tmp_path):
    x = np.ones((10, 3), dtype=np.float32)
    y = np.zeros(10, dtype=np.int64)
    y[3] = 10**9
    with pytest.raises(ValueError, match="num_classes"):
        data.check_feature_arrays(x, y)
    np.savez(tmp_path / "t.npz", features=x, labels=y)
    # The CLI reads labels as class names: the set is the 2 labels that occur (K = 2),
    # and nothing O(label value) is allocated (a bincount would need 8 GB).
    tracemalloc.start()
    try:
        res = runner.invoke(
            app,
            [
                "train",
                str(tmp_path / "t.npz"),
                "--num-classes",
                "3",
                "-o",
                str(tmp_path / "m3.npz"),
            ],
        )
        _cli_error(res, "label")
        res = runner.invoke(app, ["train", str(tmp_path / "t.npz"), "-o", str(tmp_path / "m.npz")])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.exit_code == 0, res.output
    assert "the 2 labels that occur" in res.output
    assert peak < 64 * 2**20
    assert list(load_model(tmp_path / "m.npz").classes_) == [0, 10**9]
    # A legitimate large label set still loads, and an explicit one is honoured.
    y[3] = 2000
    assert data.check_feature_arrays(x, y)[2] == 2001
    assert data.check_feature_arrays(x, y, num_classes=5000)[2] == 5000


@pytest.mark.parametrize("labels", [[0, 1, "a"] * 40, [0, 1, None] * 40])
def test_mixed_type_labels_name_y(labels):
    x, _ = _data(5, n=120)
    y = np.array(labels, dtype=object)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivacyWarning)
        with pytest.raises(TypeError, match=r"^y mixes label types"):
            DPLeastSquaresClassifier(epsilon=1.0).fit(x, y)
        with pytest.raises((TypeError, ValueError), match=r"^y "):
            DPLeastSquaresClassifier(epsilon=1.0, classes=["a", "b"]).fit(x, y)


# --------------------------------------------------------------------------------------
# Float32 rows near the float32 maximum with a public center
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_float32_near_max_with_center(normalize):
    rng = np.random.default_rng(6)
    n, d = 120, 4
    y = rng.integers(0, 3, n)
    x = (rng.uniform(0.5, 1.0, (n, d)) * 3.0e38).astype(np.float32)
    x[::2] *= -1
    center = np.full(d, -3.0e38)  # x - center reaches 6e38 > float32 max
    est = DPLeastSquaresClassifier(
        epsilon=2.0, classes=[0, 1, 2], center=center, normalize=normalize, random_state=0
    ).fit(x, y)
    assert np.isfinite(est.coef_).all()
    assert np.isfinite(est.decision_function(x)).all()
    # The preprocessed rows: what exact float64 arithmetic gives, clipped below C.
    rows = models._preprocess(x, np, 1.0, center, normalize)[:]
    ref = x.astype(np.float64) - center
    if normalize:
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    ref *= np.minimum(1.0, ops.CLIP_MARGIN / np.linalg.norm(ref, axis=1))[:, None]
    np.testing.assert_allclose(rows, ref, rtol=1e-12, atol=0)


def test_float64_overflow_with_center_names_center():
    x, y = _data(7, n=60)
    x[5] = 1.7e308
    with pytest.raises(ValueError, match="center"):
        DPLeastSquaresClassifier(
            epsilon=1.0, classes=[0, 1, 2], normalize=False, center=np.full(5, -1.7e308)
        ).fit(x, y)


# --------------------------------------------------------------------------------------
# pandas: feature names, nullable dtypes
# --------------------------------------------------------------------------------------


pd = pytest.importorskip("pandas")


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_reordered_dataframe_columns_are_refused(cls, tmp_path):
    x, y = _data(8, n=150)
    cols = ["f0", "f1", "f2", "f3", "f4"]
    frame = pd.DataFrame(x, columns=cols)
    est = cls(epsilon=2.0, random_state=1, **_kw(cls)).fit(frame, y)
    np.testing.assert_array_equal(est.feature_names_in_, cols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ndarray after a named fit
        np.testing.assert_array_equal(est.predict(frame), est.predict(x))
    with pytest.raises(ValueError, match="same order"):
        est.predict(frame[cols[::-1]])
    with pytest.raises(ValueError, match="unseen at fit time"):
        est.predict(frame.rename(columns={"f0": "g0"}))
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        est.predict(x)
    # The names survive save/load and are checked there too.
    from dpfc_native import load_model

    loaded = load_model(est.save(tmp_path / "m.npz"))
    with pytest.raises(ValueError, match="same order"):
        loaded.predict(frame[cols[::-1]])
    np.testing.assert_array_equal(loaded.predict(frame), est.predict(frame))


def test_fit_without_names_warns_on_named_predict():
    x, y = _data(9, n=90)
    est = DPLeastSquaresClassifier(epsilon=1.0, classes=[0, 1, 2]).fit(x, y)
    assert not hasattr(est, "feature_names_in_")
    with pytest.warns(UserWarning, match="fitted without feature names"):
        est.predict(pd.DataFrame(x, columns=list("abcde")))
    # Non-string column names are not feature names (scikit-learn's rule).
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        est.predict(pd.DataFrame(x))


def test_nullable_float64_frame_is_converted():
    x, y = _data(10, n=130)
    frame = pd.DataFrame(x, columns=list("abcde")).astype("Float64")
    a = DPFCClassifier(epsilon=1.0, steps=2, classes=[0, 1, 2], random_state=3).fit(frame, y)
    b = DPFCClassifier(epsilon=1.0, steps=2, classes=[0, 1, 2], random_state=3).fit(x, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    frame.iloc[4, 2] = pd.NA
    with pytest.raises(ValueError, match="NaN"):
        DPFCClassifier(epsilon=1.0, steps=2, classes=[0, 1, 2]).fit(frame, y)
    with pytest.raises(TypeError, match=r"to_numpy\(float\)"):
        DPFCClassifier(epsilon=1.0, classes=[0, 1, 2]).fit(
            pd.DataFrame({"a": ["x"] * 130, "b": x[:, 0]}), y
        )


# --------------------------------------------------------------------------------------
# The CLI's catch list and --debug
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [OverflowError("math range error"), ZeroDivisionError("float division by zero"), MemoryError()],
)
def test_cli_catches_arithmetic_and_memory_errors(tmp_path, monkeypatch, exc):
    x, y = _data(11)
    data.save_features(tmp_path / "t.npz", x.astype(np.float32), y)

    def fit(self, *args, **kwargs):
        raise exc

    monkeypatch.setattr(DPFCClassifier, "fit", fit)
    args = ["train", str(tmp_path / "t.npz"), "-o", str(tmp_path / "m.npz")]
    res = runner.invoke(app, args)
    _cli_error(res, "memory" if isinstance(exc, MemoryError) else str(exc))
    res = runner.invoke(app, ["--debug"] + args)
    assert res.exit_code == 2 and "Traceback" in res.output, res.output


# --------------------------------------------------------------------------------------
# No RuntimeWarning from the clip scale on extreme rows
# --------------------------------------------------------------------------------------


def test_clip_scale_has_no_overflow_warning():
    rows = np.array([[1e-300, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1e308, 1e308, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out, scale = ops.clip_rows(rows, 1e10)
        scale2 = _clip_scale(np.array([1e-320, 0.0, 5.0, np.inf]), 1e10)
        x, y = _data(12, n=60)
        x[3] = 1e-300
        DPLeastSquaresClassifier(
            epsilon=1.0, classes=[0, 1, 2], normalize=False, clip_norm=1e10
        ).fit(x, y)
    np.testing.assert_array_equal(scale[:3], 1.0)
    np.testing.assert_array_equal(out[:3], rows[:3])
    assert 0.0 < scale[3] < 1.0 and np.linalg.norm(out[3]) < 1e10
    np.testing.assert_array_equal(scale2, [1.0, 1.0, 1.0, 0.0])
