"""Tests for dpfc_native.data: feature files, validation, digits and synthetic data."""

import dataclasses

import numpy as np
import pytest

from dpfc_native import data
from dpfc_native.data import FeatureSet


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def _arrays(n=50, d=7, k=4, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(dtype)
    y = (np.arange(n) % k).astype(np.int64)
    rng.shuffle(y)
    return x, y


def _save_pair(tmp_path, x, y, stem="feat"):
    fpath = tmp_path / f"{stem}.features.npy"
    lpath = tmp_path / f"{stem}.labels.npy"
    np.save(fpath, x)
    np.save(lpath, y)
    return fpath, lpath


def _ridge_accuracy(train, test, lam=1e-3):
    x = train.features.astype(np.float64)
    targets = np.eye(train.num_classes)[train.labels]
    w = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ targets)
    return float(((test.features.astype(np.float64) @ w).argmax(1) == test.labels).mean())


# --------------------------------------------------------------------------- #
# Round trips
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("compress", [False, True])
def test_npz_round_trip(tmp_path, dtype, compress):
    x, y = _arrays(dtype=dtype)
    path = tmp_path / "set.npz"
    assert data.save_features(path, x, y.astype(np.int32), compress=compress) == str(path)
    fs = data.load_features(path)
    assert isinstance(fs, FeatureSet)
    assert fs.features.dtype == dtype and fs.labels.dtype == np.int64
    np.testing.assert_array_equal(fs.features, x)
    np.testing.assert_array_equal(fs.labels, y)
    assert fs.num_classes == 4 and fs.name == "set.npz"
    assert (fs.n, fs.d, len(fs)) == (50, 7, 50)


def test_save_features_accepts_feature_set(tmp_path):
    x, y = _arrays()
    fs = FeatureSet.from_arrays(x, y, name="a")
    data.save_features(tmp_path / "b.npz", fs, None)
    np.testing.assert_array_equal(data.load_features(tmp_path / "b.npz").features, x)


def test_paired_npy_sibling_convention_is_memory_mapped(tmp_path):
    x, y = _arrays()
    fpath, _ = _save_pair(tmp_path, x, y)
    fs = data.load_features(fpath)
    assert isinstance(fs.features, np.memmap)
    assert not fs.features.flags.writeable
    np.testing.assert_array_equal(np.asarray(fs.features), x)
    np.testing.assert_array_equal(fs.labels, y)
    assert "memmap" in data.describe(fs)


def test_paired_npy_explicit_labels_path_and_no_mmap(tmp_path):
    x, y = _arrays(dtype=np.float64)
    np.save(tmp_path / "X.npy", x)
    np.save(tmp_path / "y.npy", y.astype(np.uint8))
    fs = data.load_features(tmp_path / "X.npy", labels_path=tmp_path / "y.npy", mmap=False)
    assert not isinstance(fs.features, np.memmap)
    np.testing.assert_array_equal(fs.features, x)
    assert fs.labels.dtype == np.int64
    np.testing.assert_array_equal(fs.labels, y)


def test_safetensors_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    x, y = _arrays()
    path = tmp_path / "set.safetensors"
    st.save_file({"features": x, "labels": y}, str(path))
    fs = data.load_features(path)
    np.testing.assert_array_equal(fs.features, x)
    np.testing.assert_array_equal(fs.labels, y)


def test_safetensors_errors(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    x, y = _arrays()
    path = tmp_path / "nolabels.safetensors"
    st.save_file({"features": x}, str(path))
    with pytest.raises(ValueError, match="labels"):
        data.load_features(path)
    good = tmp_path / "good.safetensors"
    st.save_file({"features": x, "labels": y}, str(good))
    raw = good.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="trunc.safetensors"):
        data.load_features(bad)


def test_num_classes_explicit_and_default():
    x, y = _arrays(k=3)
    assert FeatureSet.from_arrays(x, y).num_classes == 3
    fs = FeatureSet.from_arrays(x, y, num_classes=10)
    assert fs.num_classes == 10
    np.testing.assert_array_equal(fs.class_counts()[3:], 0)
    with pytest.raises(ValueError, match="num_classes"):
        FeatureSet.from_arrays(x, y, num_classes=2)


def test_float16_upcast_and_fortran_order_made_contiguous():
    x, y = _arrays(dtype=np.float16)
    fs = FeatureSet.from_arrays(x, y)
    assert fs.features.dtype == np.float32
    fs = FeatureSet.from_arrays(np.asfortranarray(x.astype(np.float32)), y)
    assert fs.features.flags.c_contiguous


def test_feature_set_is_frozen_and_checked():
    x, y = _arrays()
    fs = FeatureSet.from_arrays(x, y)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fs.num_classes = 7
    with pytest.raises(TypeError, match="int64"):  # a wrong dtype is a wrong type
        FeatureSet(x, y.astype(np.int32), 4)
    with pytest.raises(ValueError, match="0..3"):
        FeatureSet(x, y + 1, 4)
    with pytest.raises(ValueError, match="rows"):
        FeatureSet(x[:-1], y, 4)


# --------------------------------------------------------------------------- #
# Validation errors
# --------------------------------------------------------------------------- #
def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        data.load_features(tmp_path / "nope.npz")
    x, y = _arrays()
    np.save(tmp_path / "lonely.features.npy", x)
    with pytest.raises(FileNotFoundError, match="lonely.labels.npy"):
        data.load_features(tmp_path / "lonely.features.npy")
    np.save(tmp_path / "X.npy", x)
    with pytest.raises(ValueError, match="labels_path"):
        data.load_features(tmp_path / "X.npy")


def test_missing_key_in_npz(tmp_path):
    x, y = _arrays()
    np.savez(tmp_path / "a.npz", features=x, targets=y)
    with pytest.raises(ValueError, match=r"a\.npz.*'labels'"):
        data.load_features(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", X=x, labels=y)
    with pytest.raises(ValueError, match=r"b\.npz.*'features'"):
        data.load_features(tmp_path / "b.npz")


@pytest.mark.parametrize(
    "case, match",
    [
        ("mismatch", "shape mismatch"),
        ("features_1d", "2-D"),
        ("features_3d", "2-D"),
        ("labels_2d", "1-D"),
        ("labels_float", "integer dtype"),
        ("labels_bool", "integer dtype"),
        ("features_int", "floating dtype"),
        ("empty", "empty"),
    ],
)
def test_bad_arrays_in_file(tmp_path, case, match):
    x, y = _arrays()
    if case == "mismatch":
        y = y[:-3]
    elif case == "features_1d":
        x = x[:, 0]
    elif case == "features_3d":
        x = x.reshape(50, 7, 1)
    elif case == "labels_2d":
        y = y.reshape(-1, 1)
    elif case == "labels_float":
        y = y.astype(np.float64)  # integer-valued floats are still rejected
    elif case == "labels_bool":
        y = y > 1
    elif case == "features_int":
        x = (x * 10).astype(np.int32)
    elif case == "empty":
        x, y = x[:0], y[:0]
    path = tmp_path / f"{case}.npz"
    np.savez(path, features=x, labels=y)
    with pytest.raises(ValueError, match=match) as info:
        data.load_features(path)
    assert f"{case}.npz" in str(info.value)


def test_negative_labels_reported_with_count_and_first_index(tmp_path):
    x, y = _arrays()
    y[[7, 30, 31]] = -1
    fpath, _ = _save_pair(tmp_path, x, y)
    with pytest.raises(ValueError, match=r"3 negative label\(s\); first at index 7") as info:
        data.load_features(fpath)
    assert "feat.labels.npy" in str(info.value)


def test_label_beyond_num_classes(tmp_path):
    x, y = _arrays()
    path = tmp_path / "a.npz"
    data.save_features(path, x, y)
    with pytest.raises(ValueError, match=">= num_classes=3"):
        data.load_features(path, num_classes=3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_rows_in_memmap_are_counted_blockwise(tmp_path, monkeypatch, bad):
    x, y = _arrays(n=200)
    x[[13, 14, 150]] = 0
    x[13, 2] = bad
    x[14, :] = bad
    x[150, 6] = bad
    fpath, _ = _save_pair(tmp_path, x, y)
    # Force many small blocks so the count must be accumulated across them.
    monkeypatch.setattr(data, "_FINITE_CHECK_BLOCK_ELEMENTS", 7 * 16)
    with pytest.raises(ValueError, match=r"3 row\(s\) containing NaN or Inf; first at row 13"):
        data.load_features(fpath)
    fs = data.load_features(fpath, check_finite=False)
    assert isinstance(fs.features, np.memmap)


def test_nonfinite_scan_random_positions_and_overflow_is_not_a_false_alarm():
    rng = np.random.default_rng(1)
    for _ in range(25):
        n, d = int(rng.integers(1, 80)), int(rng.integers(1, 9))
        x = rng.standard_normal((n, d)).astype(np.float32)
        rows = np.sort(rng.choice(n, size=int(rng.integers(0, n + 1)), replace=False))
        for r in rows:
            x[r, rng.integers(d)] = rng.choice([np.nan, np.inf, -np.inf])
        assert data._count_nonfinite_rows(x) == (rows.size, int(rows[0]) if rows.size else -1)
    huge = np.full((64, 4), 3e38, dtype=np.float32)  # finite, but the sum overflows
    assert data._count_nonfinite_rows(huge) == (0, -1)
    FeatureSet.from_arrays(huge, np.zeros(64, np.int64))


def test_truncated_npy(tmp_path):
    x, y = _arrays(n=500)
    fpath, _ = _save_pair(tmp_path, x, y)
    raw = fpath.read_bytes()
    fpath.write_bytes(raw[: len(raw) // 2])
    for mmap in (True, False):
        with pytest.raises(ValueError, match="feat.features.npy"):
            data.load_features(fpath, mmap=mmap)


def test_garbage_npy_and_unknown_extension(tmp_path):
    x, y = _arrays()
    _, lpath = _save_pair(tmp_path, x, y, stem="g")
    (tmp_path / "g.features.npy").write_bytes(b"not a numpy file at all" * 4)
    with pytest.raises(ValueError, match="g.features.npy"):
        data.load_features(tmp_path / "g.features.npy")
    (tmp_path / "a.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="a.csv"):
        data.load_features(tmp_path / "a.csv")
    with pytest.raises(ValueError, match="labels_path"):
        data.load_features(tmp_path / "x.npz", labels_path=lpath)


def test_truncated_and_corrupted_npz(tmp_path):
    x, y = _arrays(n=300)
    good = tmp_path / "good.npz"
    data.save_features(good, x, y)
    raw = good.read_bytes()
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="trunc.npz"):
        data.load_features(trunc)
    corrupt = bytearray(raw)
    mid = len(raw) // 3
    corrupt[mid : mid + 64] = bytes(64)  # inside the features member: CRC mismatch
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="corrupt.npz"):
        data.load_features(bad)
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="text.npz"):
        data.load_features(tmp_path / "text.npz")


def test_save_features_validates(tmp_path):
    x, y = _arrays()
    with pytest.raises(ValueError, match=r"\.npz"):
        data.save_features(tmp_path / "a.npy", x, y)
    x[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        data.save_features(tmp_path / "a.npz", x, y)
    assert not (tmp_path / "a.npz").exists()


# --------------------------------------------------------------------------- #
# Splitting and describing
# --------------------------------------------------------------------------- #
def test_train_test_split_is_stratified_exact_and_deterministic():
    x, y = _arrays(n=103, k=4)
    fs = FeatureSet.from_arrays(x, y, name="s")
    tr, te = data.train_test_split_features(fs, 0.3, seed=5)
    assert (tr.n, te.n) == (72, 31)
    assert tr.name == "s-train" and te.name == "s-test"
    counts, test_counts = fs.class_counts(), te.class_counts()
    assert np.all(np.abs(test_counts - counts * 0.3) < 1.0)
    rows = np.concatenate([tr.features, te.features])
    assert np.unique(rows, axis=0).shape[0] == fs.n  # a partition of the rows
    tr2, te2 = data.train_test_split_features(fs, 0.3, seed=5)
    np.testing.assert_array_equal(te.features, te2.features)
    _, te3 = data.train_test_split_features(fs, 0.3, seed=6)
    assert not np.array_equal(te.features, te3.features)
    assert data.train_test_split_features(fs, 10, seed=0)[1].n == 10
    assert data.train_test_split_features(fs, 0.5, stratify=False)[1].n == 52
    with pytest.raises(ValueError):
        data.train_test_split_features(fs, 1.5)


def test_describe_is_a_short_line():
    x, y = _arrays()
    text = data.describe(FeatureSet.from_arrays(x, y, name="toy"))
    assert text.startswith("toy:") and "n=50" in text and "d=7" in text and "K=4" in text
    assert "\n" not in text and len(text) < 300


# --------------------------------------------------------------------------- #
# Digits
# --------------------------------------------------------------------------- #
def test_digits_pixels():
    tr, te = data.digits_features("pixels")
    assert tr.features.shape == (1347, 64) and te.features.shape == (450, 64)
    for fs in (tr, te):
        assert fs.features.dtype == np.float32 and fs.labels.dtype == np.int64
        assert fs.num_classes == 10
        assert fs.labels.min() == 0 and fs.labels.max() == 9
        assert np.all(fs.class_counts() > 0)
        assert fs.features.min() >= 0.0 and fs.features.max() <= 1.0
    # Stratified: each class has about a quarter of its rows in the test split.
    ratio = te.class_counts() / (te.class_counts() + tr.class_counts())
    assert np.all(np.abs(ratio - 450 / 1797) < 0.02)
    tr2, te2 = data.digits_features("pixels", dtype=np.float64)
    np.testing.assert_array_equal(tr2.features, tr.features)
    assert tr2.features.dtype == np.float64


def test_digits_random_fourier_deterministic_and_seeded():
    tr, te = data.digits_features("random_fourier", seed=0)
    assert tr.features.shape == (1347, 512) and te.features.shape == (450, 512)
    norms = np.linalg.norm(tr.features, axis=1)
    assert np.all((norms > 0.8) & (norms < 1.2))
    tr_again, _ = data.digits_features("random_fourier", seed=0)
    np.testing.assert_array_equal(tr.features, tr_again.features)
    tr_other, _ = data.digits_features("random_fourier", seed=1)
    assert not np.allclose(tr.features, tr_other.features)
    # Same split for every feature map and seed.
    np.testing.assert_array_equal(tr.labels, tr_other.labels)
    np.testing.assert_array_equal(tr.labels, data.digits_features("pixels")[0].labels)
    assert data.digits_features("random_fourier", num_features=32)[0].d == 32
    with pytest.raises(ValueError, match="feature_map"):
        data.digits_features("resnet")


def test_digits_are_learnable():
    assert _ridge_accuracy(*data.digits_features("pixels")) > 0.9


# --------------------------------------------------------------------------- #
# Synthetic
# --------------------------------------------------------------------------- #
def test_synthetic_shapes_dtypes_and_finite():
    tr, te = data.synthetic_features(300, 24, 5, seed=3, test_size=70)
    assert tr.features.shape == (300, 24) and te.features.shape == (70, 24)
    assert tr.features.dtype == np.float32 and tr.labels.dtype == np.int64
    assert tr.num_classes == te.num_classes == 5
    np.testing.assert_array_equal(tr.class_counts(), 60)  # balanced
    for fs in (tr, te):
        assert np.isfinite(fs.features).all()
        assert fs.features.flags.c_contiguous
    norms = np.linalg.norm(tr.features.astype(np.float64), axis=1)
    assert 0.9 < norms.mean() < 1.1 and norms.min() > 0.5 and norms.max() < 2.0
    assert (tr.features > 0).mean() > 0.6  # non-negative-ish
    tr64, _ = data.synthetic_features(300, 24, 5, seed=3, dtype=np.float64, test_size=70)
    assert tr64.features.dtype == np.float64
    np.testing.assert_allclose(tr64.features, tr.features, atol=1e-5)
    np.testing.assert_array_equal(tr64.labels, tr.labels)


def test_synthetic_unit_norm_rows_without_spread():
    tr, _ = data.synthetic_features(200, 16, 3, norm_spread=0.0)
    np.testing.assert_allclose(
        np.linalg.norm(tr.features.astype(np.float64), axis=1), 1.0, atol=1e-5
    )


def test_synthetic_deterministic_and_seed_dependent():
    a = data.synthetic_features(500, 32, 4, seed=7)
    b = data.synthetic_features(500, 32, 4, seed=7)
    c = data.synthetic_features(500, 32, 4, seed=8)
    for s, t in zip(a, b):
        np.testing.assert_array_equal(s.features, t.features)
        np.testing.assert_array_equal(s.labels, t.labels)
    assert not np.allclose(a[0].features, c[0].features)
    assert not np.array_equal(a[0].labels, c[0].labels)
    # Train and test are different draws.
    assert not np.allclose(a[0].features[:100], a[1].features[:100])


def test_synthetic_independent_of_worker_count():
    # More rows than one chunk, so several chunks run in parallel.
    n = data._SYNTH_CHUNK_ROWS * 2 + 123
    one = data.synthetic_features(n, 8, 3, seed=2, test_size=10, workers=1)[0]
    many = data.synthetic_features(n, 8, 3, seed=2, test_size=10, workers=3)[0]
    np.testing.assert_array_equal(one.features, many.features)


def test_synthetic_spectrum_decays():
    def top_eigenvalues(decay):
        tr, _ = data.synthetic_features(4000, 64, 10, spectrum_decay=decay, seed=1, test_size=1)
        x = tr.features.astype(np.float64)
        x -= x.mean(axis=0)
        return np.linalg.eigvalsh(x.T @ x / len(x))[::-1]

    ev1 = top_eigenvalues(1.0)
    j = np.arange(1, 41)
    assert np.all(np.diff(ev1[:40]) <= 0)
    assert ev1[39] / ev1[0] < 0.05
    # Power law with exponent 1: lambda_j * j stays within a small factor of lambda_1.
    assert np.all((ev1[:40] * j / ev1[0] > 0.4) & (ev1[:40] * j / ev1[0] < 2.0))
    ev2, ev0 = top_eigenvalues(2.0), top_eigenvalues(0.0)
    assert ev2[19] / ev2[0] < ev1[19] / ev1[0] / 5  # steeper decay
    assert ev0[19] / ev0[39] < 1.3  # flat (isotropic) tail


def test_synthetic_difficulty_is_monotone():
    accs = [
        _ridge_accuracy(
            *data.synthetic_features(3000, 64, 10, difficulty=t, seed=0, test_size=2000)
        )
        for t in (0.0, 0.5, 1.0)
    ]
    assert accs[0] > 0.97
    assert accs[0] > accs[1] + 0.05 > accs[2] + 0.1
    assert accs[2] > 0.15  # hard, but above chance (0.1)


def test_synthetic_out_writes_loadable_memmaps(tmp_path):
    out = tmp_path / "syn"
    tr, te = data.synthetic_features(400, 12, 3, seed=4, test_size=50, out=out)
    assert isinstance(tr.features, np.memmap)
    ref_tr, ref_te = data.synthetic_features(400, 12, 3, seed=4, test_size=50)
    np.testing.assert_array_equal(np.asarray(tr.features), ref_tr.features)
    loaded = data.load_features(f"{out}.test.features.npy")
    assert isinstance(loaded.features, np.memmap)
    np.testing.assert_array_equal(np.asarray(loaded.features), ref_te.features)
    np.testing.assert_array_equal(loaded.labels, ref_te.labels)


def test_synthetic_presets():
    assert data.SYNTHETIC_PRESETS == {
        "cifar10": (50_000, 768, 10),
        "cifar100": (50_000, 768, 100),
        "imagenet": (1_281_167, 1664, 1000),
    }
    tr, te = data.synthetic_preset("cifar100", n=600)
    assert tr.features.shape == (600, 768) and te.features.shape == (120, 768)
    assert tr.num_classes == 100 and tr.name == "synthetic-cifar100-train"
    tr, te = data.synthetic_preset("imagenet", n=1000, test_size=20)
    assert tr.features.shape == (1000, 1664) and te.n == 20 and tr.num_classes == 1000
    with pytest.raises(ValueError, match="unknown preset"):
        data.synthetic_preset("mnist")
    # The preset's default difficulty is the one passed on.
    default = data.synthetic_preset("cifar10", n=200)[0]
    explicit = data.synthetic_preset(
        "cifar10", n=200, difficulty=data.SYNTHETIC_PRESET_DIFFICULTY["cifar10"]
    )[0]
    np.testing.assert_array_equal(default.features, explicit.features)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(difficulty=1.5),
        dict(difficulty=-0.1),
        dict(num_classes=1),
        dict(n=0),
        dict(spectrum_decay=-1.0),
        dict(dtype=np.int32),
        dict(test_size=0),
        dict(class_dim=0),
        dict(norm_spread=float("nan")),
        dict(workers=0),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs):
    args = dict(n=50, d=8, num_classes=3)
    args.update(kwargs)
    # An unsupported dtype is a wrong type (as in NumPy); the rest are wrong values.
    with pytest.raises(TypeError if "dtype" in kwargs else ValueError):
        data.synthetic_features(**args)


def test_feature_set_round_trip_keeps_num_classes_and_arguments_checked(tmp_path):
    import scipy.sparse as sp

    rng = np.random.default_rng(31)
    fs = data.FeatureSet.from_arrays(
        rng.random((50, 4)).astype(np.float32), np.arange(50) % 3, num_classes=5
    )
    data.save_features(tmp_path / "a.npz", fs)  # labels may be left out with a FeatureSet
    back = data.load_features(tmp_path / "a.npz")
    assert back.num_classes == 5
    np.testing.assert_array_equal(back.features, fs.features)
    with pytest.raises(TypeError, match="needs labels"):
        data.save_features(tmp_path / "b.npz", fs.features)
    with pytest.raises(TypeError, match="sparse"):
        data.FeatureSet.from_arrays(sp.csr_matrix(np.eye(3, dtype=np.float32)), [0, 1, 2])
    for kw, exc in (
        ({"test_size": 449.7}, TypeError),
        ({"test_size": True}, TypeError),
        ({"seed": -1}, ValueError),
        ({"seed": 1.5}, TypeError),
        ({"split_seed": None}, TypeError),
    ):
        with pytest.raises(exc, match=next(iter(kw))):
            data.digits_features(**kw)
    for seed, exc in ((-1, ValueError), (1.5, TypeError), (None, TypeError)):
        with pytest.raises(exc, match="seed"):
            data.synthetic_preset("cifar10", n=100, seed=seed)
    with pytest.raises(TypeError, match="seed"):
        data.train_test_split_features(fs, 0.2, seed="1")


def test_a_copied_memmap_is_not_described_as_a_memory_map(tmp_path):
    """Big-endian or Fortran-ordered .npy features are read into a native C-ordered copy
    (FeatureSet's layout): the copy is a plain array, not a map without a file."""
    rng = np.random.default_rng(32)
    x = rng.standard_normal((40, 3))
    for name, arr in (("be", x.astype(">f8")), ("f", np.asfortranarray(x))):
        np.save(tmp_path / f"{name}.features.npy", arr)
        np.save(tmp_path / f"{name}.labels.npy", np.arange(40) % 2)
        fs = data.load_features(tmp_path / f"{name}.features.npy", mmap=True)
        assert type(fs.features) is np.ndarray, name
        np.testing.assert_array_equal(fs.features, x)
    np.save(tmp_path / "c.features.npy", x)
    np.save(tmp_path / "c.labels.npy", np.arange(40) % 2)
    assert isinstance(
        data.load_features(tmp_path / "c.features.npy", mmap=True).features, np.memmap
    )


def _npy_v2_header(shape, descr: str, header_length: int) -> bytes:
    """A version-2 .npy header declaring ``header_length`` bytes of header (the dict,
    then spaces, as NumPy pads it)."""
    text = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
    text += b" " * (header_length - len(text) - 1) + b"\n"
    return b"\x93NUMPY\x02\x00" + header_length.to_bytes(4, "little") + text


def _npz_with(tmp_path, name, members, method=None):
    import zipfile

    path = tmp_path / name
    with zipfile.ZipFile(path, "w", method or zipfile.ZIP_DEFLATED) as z:
        for member, raw in members.items():
            z.writestr(member, raw)
    return path


def _npy_bytes(a) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_a_header_length_bomb_is_refused_before_it_is_read(tmp_path):
    """NumPy reads a header of the length it declares before checking that length: 8 MB
    of header (spaces, deflated to a few KB) was read whole, from any member."""
    import tracemalloc

    rng = np.random.default_rng(40)
    y = _npy_bytes(rng.integers(0, 3, 20))
    bomb = _npy_v2_header((20, 4), "<f8", 8 << 20) + np.zeros(80).tobytes()
    path = _npz_with(tmp_path, "bomb.npz", {"features.npy": bomb, "labels.npy": y})
    assert path.stat().st_size < 64 << 10
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="header length 8388608 is beyond 10000"):
            data.load_features(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # nothing near the declared 8 MB


def test_zip_members_read_only_when_safe(tmp_path):
    """bzip2/LZMA members (zipfile decompresses them without bound: 4 KB of a bzip2
    member made a gigabyte), a member named twice (zipfile read the last, other tools
    the first), an encrypted member (RuntimeError), a num_classes member declaring 2^45
    entries (MemoryError): each one ValueError naming the file."""
    import zipfile

    rng = np.random.default_rng(41)
    x, y = rng.standard_normal((30, 4)), rng.integers(0, 3, 30)
    members = {"features.npy": _npy_bytes(x), "labels.npy": _npy_bytes(y)}
    bz = _npz_with(tmp_path, "bz.npz", members, zipfile.ZIP_BZIP2)
    with pytest.raises(ValueError, match="only stored or deflated members"):
        data.load_features(bz)
    twice = tmp_path / "twice.npz"
    import warnings

    with zipfile.ZipFile(twice, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile's "Duplicate name"
        for member, raw in members.items():
            z.writestr(member, raw)
        z.writestr("features.npy", _npy_bytes(np.zeros((30, 4))))
    with pytest.raises(ValueError, match="duplicated members"):
        data.load_features(twice)
    huge = _npy_v2_header((2**45,), "<i8", 128)
    nc = _npz_with(tmp_path, "nc.npz", {**members, "num_classes.npy": huge})
    with pytest.raises(ValueError, match="num_classes"):
        data.load_features(nc)
    assert data.load_features(_npz_with(tmp_path, "ok.npz", members)).n == 30


def test_uint64_labels_beyond_int64_are_refused():
    """They wrapped to negative int64 labels (other classes than stored)."""
    y = np.array([5, 2**63 + 5, 1], dtype=np.uint64)
    with pytest.raises(ValueError, match="beyond the int64 range"):
        data.coerce_labels(y)
    assert data.coerce_labels(np.array([5, 2**63 - 1], np.uint64)).tolist() == [5, 2**63 - 1]


def test_cli_predict_on_broken_feature_archives_is_one_line(tmp_path):
    """Not a zip, a truncated one, no 'features' member: a BadZipFile traceback, or a
    KeyError message about 'features.npy' internals."""
    from typer.testing import CliRunner

    from dpfc_native.cli import app
    from dpfc_native.models import DPLeastSquaresClassifier

    rng = np.random.default_rng(42)
    x, y = rng.standard_normal((60, 4)), np.arange(60) % 3
    model = DPLeastSquaresClassifier(float("inf"), classes=[0, 1, 2]).fit(x, y)
    model = model.save(tmp_path / "m.npz")
    good = tmp_path / "good.npz"
    np.savez(good, features=x, labels=y)
    (tmp_path / "notzip.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:-300])
    np.savez(tmp_path / "nofeat.npz", labels=y)
    runner = CliRunner()
    for name, needle in (
        ("notzip.npz", "corrupted"),
        ("cut.npz", "corrupted"),
        ("nofeat.npz", "has no array 'features' (arrays present: ['labels'])"),
    ):
        res = runner.invoke(app, ["predict", str(model), str(tmp_path / name)])
        assert res.exit_code == 2 and needle in res.output, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
