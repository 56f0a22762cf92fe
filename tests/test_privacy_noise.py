"""The noise: distribution, keys, and (key, counter) bookkeeping.

* Moments and Kolmogorov-Smirnov tests of the normals, diagonal and off-diagonal entries
  of the symmetric noise separately (N(0, s^2) and N(0, s^2 / 2)), float64 and float32,
  with fixed keys so the tests are deterministic (they cannot flake).
* Independence of disjoint counters and of different keys.
* Keys drawn from OS entropy: key=None and NoiseSource() keys differ, and every one of the
  128 key bits varies across draws (the generator takes 128 bits of key material: 64 in
  Philox's key, 64 in the upper counter words).
* A (key, counter) pair is never reused: NoiseSource hands out disjoint block ranges, and
  through every estimator (DP-LS global/per-class, Newton, DP-FC, DP-SGD full batch and
  Poisson) every noise call of a fit is recorded and checked for overlap; two fits with
  random_state=None use different keys; a user seed is reproducible (and flagged).
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import scipy.stats
from _reference import COUNTS, NoiseCallRecorder, assert_no_block_reuse, assert_sym_noise_calibrated
from _reference import ks_ok as _ks_ok
from _reference import moments_ok as _moments_ok

from dpfc_native import mechanisms, models, ops

# These tests fix noise seeds (replayable) and often infer the label set on purpose;
# the PrivacyWarning for that is tested in test_tuning.py.
pytestmark = pytest.mark.filterwarnings("ignore::dpfc_native.PrivacyWarning")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("key", [0x1234, (1 << 127) + 987654321])
def test_sym_noise_diag_offdiag_moments_and_ks(dtype, key):
    d, batch, std = 64, 60, 2.5
    m = ops.sym_gaussian_noise(d, std, batch=batch, key=key, counter=77, dtype=dtype)
    assert m.dtype == dtype and m.shape == (batch, d, d)
    diag, off = assert_sym_noise_calibrated(m, std, "cpu")
    # The two kinds are separately calibrated: their variance ratio is 2.
    ratio = diag.astype(np.float64).var() / off.astype(np.float64).var()
    assert abs(ratio - 2) < 5 * 2 * np.sqrt(2 / diag.size)
    COUNTS["normals tested (sym)"] += diag.size + off.size


def test_iid_noise_moments_ks_and_tails():
    n, std = 2_000_000, 0.7
    z = ops.gaussian_noise(n, std, key=2**64 + 5, counter=3)
    _moments_ok(z, std, "iid")
    _ks_ok(z, std, "iid")
    # Tails: frequencies beyond 3 and 4 std within 5 binomial standard errors.
    for t in (3.0, 4.0):
        p = 2 * scipy.stats.norm.sf(t)
        f = np.mean(np.abs(z) > t * std)
        assert abs(f - p) < 5 * np.sqrt(p / n), (t, f, p)
    # Box-Muller on 52-bit uniforms never exceeds sqrt(-2 ln 2^-53) = 8.57 std.
    assert np.abs(z).max() / std < 8.58
    COUNTS["normals tested (iid)"] += n


def test_disjoint_counters_and_keys_are_independent():
    n = 400_000
    key = 0xDEADBEEF
    a = ops.gaussian_noise(n, 1.0, key=key, counter=0)
    b = ops.gaussian_noise(n, 1.0, key=key, counter=ops.noise_blocks(n))  # the next blocks
    c = ops.gaussian_noise(n, 1.0, key=key + 1, counter=0)  # neighbouring key
    e = ops.gaussian_noise(n, 1.0, key=key + (1 << 64), counter=0)  # upper key half
    bound = 5 / np.sqrt(n)
    for other, what in ((b, "next counters"), (c, "key + 1"), (e, "key + 2^64")):
        r = np.corrcoef(a, other)[0, 1]
        assert abs(r) < bound, (what, r)
    # Lag-1 correlation inside the stream (the two halves of a Box-Muller pair included).
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < bound
    assert abs(np.corrcoef(a[0::2], a[1::2])[0, 1]) < bound
    COUNTS["normals tested (independence)"] += 4 * n


def test_counter_addresses_the_stream():
    """Blocks are addressed by counter: overlapping ranges give the SAME normals (which is
    why a pair must never be reused), disjoint ranges different ones."""
    key = 42
    z = ops.gaussian_noise(100, 1.0, key=key, counter=10)
    tail = ops.gaussian_noise(60, 1.0, key=key, counter=30)
    np.testing.assert_array_equal(z[40:], tail)
    assert not np.intersect1d(z, ops.gaussian_noise(100, 1.0, key=key, counter=60)).size


def test_os_entropy_keys_span_128_bits():
    words = np.array([ops._key_words(None) for _ in range(256)], dtype=np.uint64)
    assert len({tuple(w) for w in words.tolist()}) == 256
    bits = np.zeros(128, dtype=np.int64)
    for row in words.tolist():
        key = sum(int(w) << (32 * i) for i, w in enumerate(row))
        bits += np.array([(key >> i) & 1 for i in range(128)])
    # Every bit of the 128 takes both values (each is 0 with probability 2^-256 otherwise).
    assert (bits > 0).all() and (bits < 256).all()
    # NoiseSource() keys too.
    keys = [mechanisms.NoiseSource()._key for _ in range(256)]
    assert len(set(keys)) == 256
    kb = np.array([[(k >> i) & 1 for i in range(128)] for k in keys]).sum(axis=0)
    assert (kb > 0).all() and (kb < 256).all()
    # key=None gives fresh noise at every call.
    draws = [ops.sym_gaussian_noise(8, 1.0) for _ in range(3)]
    assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[1], draws[2])


def test_user_seed_is_reproducible_and_flagged():
    a, b = mechanisms.NoiseSource(7), mechanisms.NoiseSource(7)
    assert a.seeded and b.seeded and not mechanisms.NoiseSource().seeded
    np.testing.assert_array_equal(a.normal((5,), 1.0), b.normal((5,), 1.0))
    assert mechanisms.NoiseSource(8)._key != a._key
    doc = (mechanisms.NoiseSource.__doc__ or "").lower()
    assert "reproducible" in doc and "no privacy guarantee" in doc
    assert "experiments" in (ops.sym_gaussian_noise.__doc__ or "")


# --------------------------------------------------------------------------------------
# (key, counter) bookkeeping
# --------------------------------------------------------------------------------------


def test_noise_source_hands_out_disjoint_blocks(monkeypatch):
    rec = NoiseCallRecorder(monkeypatch)
    src = mechanisms.NoiseSource()
    rng = np.random.default_rng(0)
    for i in range(200):
        if rng.random() < 0.5:
            src.sym(int(rng.integers(1, 20)), 1.0, batch=int(rng.integers(1, 4)), name=f"s{i}")
        else:
            src.normal(tuple(int(v) for v in rng.integers(1, 9, size=2)), 1.0, name=f"n{i}")
    assert len(rec.calls) == len(src.draws) == 200
    assert_no_block_reuse(rec.calls)
    # The draws log agrees with what was actually passed to the generator.
    for (key, first, blocks), draw in zip(rec.calls, src.draws):
        assert key == src._key and first == draw.first_block and blocks == draw.blocks
    COUNTS["noise calls checked"] += 200


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("seed", [None, 5])
def test_a_noise_source_inherited_by_fork_refuses_to_draw(seed):
    """A forked child holds the same key and counter as its parent: its draws were the
    parent's (and every sibling's) noise, block for block."""
    src = mechanisms.NoiseSource(seed)
    src.normal((3,), 1.0, name="before")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(30)
            try:
                src.normal((4,), 1.0, name="child")
                code = 2
            except RuntimeError as e:
                code = 0 if "inherited by fork" in str(e) and len(src.draws) == 1 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    src.normal((4,), 1.0, name="parent")  # the creating process still draws
    assert [d.name for d in src.draws] == ["before", "parent"]


@pytest.mark.parametrize(
    "bad",
    [
        lambda src: src.normal((-2, 3), 1.0),  # a negative block count rewound the counter
        lambda src: src.sym(6, 1.0, batch=-1),
        lambda src: src.sym(0, 1.0),
        lambda src: src.normal((2, 2), -1.0),
        lambda src: src.normal((2, 2), 1.0, dtype=np.int32),
        lambda src: src.sym(3, 1.0, device="tpu"),
        lambda src: src.normal(2.0, 1.0),
    ],
)
def test_a_refused_draw_takes_no_blocks(monkeypatch, bad):
    """Arguments are checked before blocks are reserved: a refused call neither moves
    the counter (backwards: the next release reused 6 released normals) nor logs."""
    rec = NoiseCallRecorder(monkeypatch)
    src = mechanisms.NoiseSource()
    a = src.normal((4, 5), 1.0, name="a")
    before = (src.normal_pairs_drawn, len(src.draws))
    with pytest.raises((ValueError, TypeError)):
        bad(src)
    assert (src.normal_pairs_drawn, len(src.draws)) == before
    b = src.normal((4, 5), 1.0, name="b")
    assert np.intersect1d(a, b).size == 0
    assert_no_block_reuse(rec.calls)


FITS = [
    ("ls_global", models.DPLeastSquaresClassifier, {}),
    ("ls_per_class", models.DPLeastSquaresClassifier, {"variant": "per_class"}),
    ("newton", models.DPNewtonClassifier, {"steps": 3}),
    ("fc", models.DPFCClassifier, {"steps": 5}),
    ("sgd_full", models.DPSGDClassifier, {"steps": 5}),
    ("sgd_poisson", models.DPSGDClassifier, {"steps": 5, "sample_rate": 0.5}),
]


def _data(rng, n=120, d=6, k=3):
    X = rng.standard_normal((n, d))
    y = rng.integers(0, k, size=n)
    return X, y


@pytest.mark.parametrize("name,cls,kw", FITS, ids=[f[0] for f in FITS])
def test_estimators_never_reuse_key_counter(monkeypatch, name, cls, kw):
    rng = np.random.default_rng(1)
    X, y = _data(rng)
    if kw.get("sample_rate", 1.0) < 1.0:
        # The RDP calibration takes seconds and is not what is tested here.
        from dpfc_native import accounting

        monkeypatch.setattr(accounting, "calibrate_dpsgd_noise_multiplier", lambda *a, **k: 3.0)
    keys = []
    for _ in range(2):  # two fits with random_state=None
        rec = NoiseCallRecorder(monkeypatch)
        est = cls(epsilon=1.0, delta=1e-5, device="cpu", **kw).fit(X, y)
        assert rec.calls, "no noise drawn"
        assert len({c[0] for c in rec.calls}) == 1, "one fit, one key"
        assert_no_block_reuse(rec.calls)
        # One noise call per release made (the ledger counts releases).
        n_releases = sum(e.count for e in est.privacy_.entries)
        assert len(rec.calls) == n_releases, (len(rec.calls), n_releases)
        assert est.noise_seeded_ is False
        keys.append(rec.calls[0][0])
        COUNTS["estimator noise calls checked"] += len(rec.calls)
    assert keys[0] != keys[1], "two fits with random_state=None used the same key"
    # A user seed: same key for the same seed (reproducible), flagged as seeded.
    seeded = []
    for _ in range(2):
        rec = NoiseCallRecorder(monkeypatch)
        est = cls(epsilon=1.0, delta=1e-5, device="cpu", random_state=3, **kw).fit(X, y)
        assert est.noise_seeded_ is True
        seeded.append(rec.calls)
    assert seeded[0] == seeded[1]


def test_release_symmetric_refuses_a_non_symmetric_statistic():
    """Symmetric noise cancels in out - out^T: the antisymmetric part of a non-symmetric
    statistic was released with no noise at all."""
    rng = np.random.default_rng(8)
    s = rng.standard_normal((4, 4))
    with pytest.raises(ValueError, match="exactly symmetric"):
        mechanisms.release_symmetric(s, 1.0, 10.0, mechanisms.NoiseSource(), "G")
    batch = np.stack([s + s.T, s])
    with pytest.raises(ValueError, match="exactly symmetric"):
        mechanisms.release_symmetric(batch, 1.0, 10.0, mechanisms.NoiseSource(), "G")
    sym = s + s.T
    out, rec = mechanisms.release_symmetric(sym, 1.0, 10.0, mechanisms.NoiseSource(), "G")
    assert rec is not None and np.array_equal(out, out.T) and not np.array_equal(out, sym)


def test_noise_shape_may_be_any_sequence_of_ints():
    src = mechanisms.NoiseSource(seed=3)
    a = ops.gaussian_noise(np.array([2, 3]), 1.0, key=1)
    b = ops.gaussian_noise([2, 3], 1.0, key=1)
    assert a.shape == (2, 3) and np.array_equal(a, b)
    assert src.normal(np.array([4]), 1.0).shape == (4,)
    with pytest.raises(TypeError, match="shape"):
        src.normal("23", 1.0)
