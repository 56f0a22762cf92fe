"""Bounded memory: no estimator copies X.

Every fit, and predict / score / decision_function, reads the features a row block at a
time (centred, normalised and clipped per block), so the memory a call allocates beyond
X (here a float32 memmap) is a few blocks plus O(K d + d^2) for the statistics and the
model, plus O(n) label-sized vectors (the encoded labels, the predictions): nothing of
size n x d, and nothing of size n x K. Measured with tracemalloc (NumPy reports every
array buffer to it) at two sizes of n, with the block size lowered so that a block is
much smaller than X. The full-size numbers (n = 2,000,000, d = 768) are in
benchmarks/bench_memory.py.
"""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
from _reference import reference_clip64
from scipy.special import log_expit, log_softmax, softmax

from dpfc_native import PrivacyWarning, _cpu_stats, _fitstats, _validation, models
from dpfc_native.models import (
    DPFCClassifier,
    DPLeastSquaresClassifier,
    DPNewtonClassifier,
    DPSGDClassifier,
)

D, K = 64, 6
BLOCK = 1 << 13  # float64 elements per block in the test (64 KiB; the default is 32 MiB)
SIZES = (8_000, 32_000)

ESTIMATORS = {
    "ls": lambda: DPLeastSquaresClassifier(epsilon=1.0, classes=list(range(K))),
    "ls-per-class": lambda: DPLeastSquaresClassifier(
        epsilon=1.0, classes=list(range(K)), variant="per_class"
    ),
    "newton": lambda: DPNewtonClassifier(epsilon=1.0, classes=list(range(K)), steps=2),
    "fc": lambda: DPFCClassifier(epsilon=1.0, classes=list(range(K)), steps=2),
    "sgd": lambda: DPSGDClassifier(epsilon=1.0, classes=list(range(K)), steps=2),
    # Poisson batches; the RDP accountant keeps the calibration's own memory small.
    "sgd-poisson": lambda: DPSGDClassifier(
        epsilon=1.0, classes=list(range(K)), steps=3, sample_rate=0.05, accountant="rdp"
    ),
}


#: The methods whose statistics are K d x d matrices (class grams, Newton Hessians).
PER_CLASS = ("ls-per-class", "newton")


def _bound(n: int, name: str = "ls") -> int:
    """Bytes a call may allocate: 8 blocks, 16 statistics' worth of float64 values (K d +
    d^2, plus K d^2 for the class grams / Hessians; the exact reduction holds a few
    partials, each two int64 limbs per value), 48 bytes per row (a few label-sized
    vectors) and 256 KiB for the interpreter. Nothing grows with n but the labels."""
    stats = K * D + D * D + (K * D * D if name in PER_CLASS else 0)
    return 8 * BLOCK * 8 + 16 * stats * 8 + 48 * n + (1 << 18)


@pytest.fixture(scope="module")
def memmaps(tmp_path_factory):
    out = {}
    rng = np.random.default_rng(2024)
    centers = rng.standard_normal((K, D)).astype(np.float32)
    for n in SIZES:
        path = tmp_path_factory.mktemp("mem") / f"x{n}.npy"
        x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, D))
        y = rng.integers(0, K, size=n)
        for start in range(0, n, 4096):
            sl = slice(start, min(n, start + 4096))
            x[sl] = centers[y[sl]] + rng.standard_normal((sl.stop - sl.start, D), dtype=np.float32)
        x.flush()
        del x
        out[n] = (np.load(path, mmap_mode="r"), y)
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    for module in (models, _cpu_stats, _validation):
        monkeypatch.setattr(module, "_CHUNK_ELEMENTS", BLOCK)
    # The fits' leaves (the exact reduction's unit of work) as small as a block.
    monkeypatch.setattr(_fitstats, "FIT_LEAF_ROWS", BLOCK // D)


def _peak(call) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_fit_predict_score_memory_is_bounded_and_independent_of_n(name, memmaps, small_blocks):
    warnings.simplefilter("ignore", PrivacyWarning)
    x0, y0 = memmaps[SIZES[0]]
    ESTIMATORS[name]().fit(x0[:2000], y0[:2000])  # imports and caches outside the count
    peaks = {}
    for n in SIZES:
        x, y = memmaps[n]
        assert isinstance(x, np.memmap)
        est = ESTIMATORS[name]()
        fit = _peak(lambda: est.fit(x, y))
        labels = {}
        predict = _peak(lambda: labels.setdefault("p", est.predict(x)))
        score = _peak(lambda: est.score(x, y))
        peaks[n] = (fit, predict, score)
        for what, peak in zip(("fit", "predict", "score"), peaks[n]):
            assert peak <= _bound(n, name), (name, n, what, peak, _bound(n, name))
        # The blocked argmax is the argmax of the full scores, and the fit learned.
        np.testing.assert_array_equal(
            labels["p"], est.classes_[np.argmax(est.decision_function(x), 1)]
        )
        assert np.mean(labels["p"] == y) > 0.5
    # Four times the rows: the peak grows by label-sized vectors only (48 bytes a row),
    # never by a fraction of a copy of X (n d 4 bytes more).
    assert _bound(SIZES[1]) < SIZES[1] * D * 4 / 2  # below half a float32 copy of X
    grown = SIZES[1] - SIZES[0]
    for before, after in zip(peaks[SIZES[0]], peaks[SIZES[1]]):
        assert after - before <= 48 * grown < grown * D * 4 / 4


def test_predict_with_many_classes_holds_no_scores(memmaps, small_blocks):
    # K = 200 > d: (n, K) float64 scores would be 51 MB here, X itself 8 MB.
    x, _ = memmaps[SIZES[1]]
    n, k = x.shape[0], 200
    y = np.arange(n) % k
    est = DPLeastSquaresClassifier(epsilon=1.0, classes=list(range(k))).fit(x, y)
    peak = _peak(lambda: est.score(x, y))
    assert peak <= 8 * BLOCK * 8 + 16 * (k * D + D * D) * 8 + 48 * n + (1 << 18) < n * k * 8 / 4
    decisions = est.decision_function(x[:500])
    np.testing.assert_array_equal(est.predict(x[:500]), np.argmax(decisions, axis=1))


@pytest.mark.parametrize("name", ["ls", "fc", "sgd"])
@pytest.mark.parametrize("method", ["decision_function", "predict_proba", "predict_log_proba"])
def test_scores_and_probabilities_memory_is_their_output(name, method, memmaps, small_blocks):
    # The (n, K) output and a block: the scores, the log-weights and softmax's work
    # arrays are never (n, K) each (they were: four to five outputs' worth).
    warnings.simplefilter("ignore", PrivacyWarning)
    x, y = memmaps[SIZES[1]]
    est = ESTIMATORS[name]().fit(x, y)
    n = x.shape[0]
    out = {}
    peak = _peak(lambda: out.setdefault("v", getattr(est, method)(x)))
    slack = 8 * BLOCK * 8 + 16 * (K * D + D * D) * 8 + (1 << 18)  # _bound's, no labels
    assert slack < n * K * 8  # no room for a second (n, K) array
    assert peak <= n * K * 8 + slack, (peak, n * K * 8)
    # The blocks are the rows of the whole computation, every one written.
    assert est.center_ is None and est.normalize_  # the defaults: normalise, then clip
    x64 = np.asarray(x, np.float64)
    xc, _ = reference_clip64(x64 / np.linalg.norm(x64, axis=1, keepdims=True), est.clip_norm_)
    s = xc @ est.coef_.T + est.intercept_
    w = log_expit(s) if name != "ls" else s  # one-vs-all sigmoid; LS and SGD: softmax
    if name == "sgd":
        w = s if est.loss == "softmax" else log_expit(s)
    ref = {
        "decision_function": s,
        "predict_proba": softmax(w, axis=1),
        "predict_log_proba": log_softmax(w, axis=1),
    }[method]
    assert out["v"].shape == (n, K) and np.isfinite(out["v"]).all()
    np.testing.assert_allclose(out["v"], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.int8, np.uint16])
def test_half_and_integer_features_are_read_as_stored(memmaps, small_blocks, tmp_path, dtype):
    """float16 and integer memmaps are widened a leaf at a time (exactly, to float64),
    never copied whole: the same bound as float32, the same bits as the float64 rows."""
    warnings.simplefilter("ignore", PrivacyWarning)
    x32, y = memmaps[SIZES[1]]
    path = tmp_path / "x.npy"
    x = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=x32.shape)
    x[:] = np.clip(np.rint(np.asarray(x32) * 4), 0 if dtype == np.uint16 else -100, 100)
    x.flush()
    del x
    x = np.load(path, mmap_mode="r")
    ESTIMATORS["ls"]().fit(x[:2000], y[:2000])
    est = DPLeastSquaresClassifier(epsilon=1.0, classes=list(range(K)), random_state=3)
    peak = _peak(lambda: est.fit(x, y))
    assert peak <= _bound(SIZES[1]), (peak, _bound(SIZES[1]))
    ref = DPLeastSquaresClassifier(epsilon=1.0, classes=list(range(K)), random_state=3)
    ref.fit(np.asarray(x, np.float64), y)
    assert est.coef_.tobytes() == ref.coef_.tobytes()
    np.testing.assert_array_equal(est.predict(x), ref.predict(np.asarray(x, np.float64)))
