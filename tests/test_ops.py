"""The CPU ops against float64 references on random data of odd sizes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from dpfc_native import ops

from conftest import reference_clip64

DIMS = [1, 7, 64, 130]
NS = [1, 5, 1001, 4099]  # 4099 > the float32 block of 4096 rows


def _features(rng, n, d, dtype, spread=3.0):
    # Row norms spread around C = 1 so that some rows are clipped and some are not.
    x = rng.standard_normal((n, d)) * np.exp(rng.uniform(-spread, spread, size=(n, 1))) / np.sqrt(d)
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", DIMS)
def test_clip_rows_matches_reference(rng, dtype, d):
    x = _features(rng, 1001, d, dtype)
    before = x.copy()
    out, scale = ops.clip_rows(x, 1.0)
    np.testing.assert_array_equal(x, before)  # the input is never modified
    ref, ref_scale = reference_clip64(x, 1.0)
    assert out.dtype == dtype and out.shape == x.shape
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-14)
    np.testing.assert_allclose(out, ref, rtol=np.finfo(dtype).eps * 4, atol=0)
    assert np.all(np.linalg.norm(out.astype(np.float64), axis=1) <= 1.0)
    assert 0 < np.count_nonzero(scale < 1) < x.shape[0]


@pytest.mark.parametrize("accumulate", ["float64", "float32"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("n", NS)
def test_clipped_gram_matches_reference(rng, accumulate, dtype, d, n):
    x = _features(rng, n, d, dtype)
    c = 0.7
    g = ops.clipped_gram(x, c, accumulate=accumulate)
    xb, _ = reference_clip64(x, c)
    ref = xb.T @ xb
    assert g.dtype == np.float64 and g.shape == (d, d)
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g, g.T)
    # Error relative to the sensitivity scale n C^2: float64 ~ eps64, float32 blocks ~ eps32.
    tol = (1e-13 if accumulate == "float64" else 1e-5) * max(1, n) * c**2
    assert np.abs(g - ref).max() <= tol


@pytest.mark.parametrize("accumulate", ["float64", "float32"])
@pytest.mark.parametrize("d", [1, 7, 130])
def test_half_precision_features(rng, accumulate, d):
    """float16 rows are read exactly (every float16 is a float32 and a float64)."""
    n = 4099
    x = _features(rng, n, d, np.float16, spread=1.0)
    y = rng.integers(0, 3, size=n)
    xb, _ = reference_clip64(x.astype(np.float64), 0.7)
    tol = (1e-13 if accumulate == "float64" else 1e-5) * n * 0.7**2
    g = ops.clipped_gram(x, 0.7, accumulate=accumulate)
    assert g.dtype == np.float64 and np.abs(g - xb.T @ xb).max() <= tol
    g2, b, counts = ops.clipped_stats(x, y, 3, 0.7, accumulate=accumulate)
    np.testing.assert_array_equal(g2, g)
    ref_b = np.zeros((3, d))
    np.add.at(ref_b, y, xb)
    np.testing.assert_allclose(b, ref_b, rtol=0, atol=1e-12 * n)
    np.testing.assert_array_equal(counts, np.bincount(y, minlength=3))


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("d", DIMS)
def test_clipped_stats_and_class_sums(rng, k, d):
    n = 1003
    x = _features(rng, n, d, np.float32)
    y = rng.integers(0, k, size=n)
    xb, _ = reference_clip64(x, 1.0)
    ref_b = np.zeros((k, d))
    np.add.at(ref_b, y, xb)
    g, b, counts = ops.clipped_stats(x, y, k, 1.0)
    np.testing.assert_allclose(g, xb.T @ xb, rtol=0, atol=1e-12 * n)
    np.testing.assert_allclose(b, ref_b, rtol=0, atol=1e-12 * n)
    np.testing.assert_array_equal(counts, np.bincount(y, minlength=k))
    assert counts.dtype == np.int64
    np.testing.assert_allclose(ops.clipped_class_sums(x, y, k, 1.0), ref_b, rtol=0, atol=1e-12 * n)


def test_class_that_never_occurs_gives_zero_rows(rng):
    x = _features(rng, 50, 5, np.float64)
    y = rng.integers(0, 2, size=50)  # class 2 of 3 never occurs
    g, b, counts = ops.clipped_stats(x, y, 3, 1.0)
    assert counts[2] == 0 and np.all(b[2] == 0)
    grams = ops.clipped_class_grams(x, y, 3, 1.0)
    assert np.all(grams[2] == 0)


@pytest.mark.parametrize("d", [1, 7, 33])
def test_class_grams_and_weighted_grams(rng, d):
    n, k = 517, 4
    x = _features(rng, n, d, np.float64)
    y = rng.integers(0, k, size=n)
    xb, _ = reference_clip64(x, 1.0)
    ref = np.stack([xb[y == c].T @ xb[y == c] for c in range(k)])
    np.testing.assert_allclose(ops.clipped_class_grams(x, y, k, 1.0), ref, rtol=0, atol=1e-12 * n)
    w = rng.uniform(0, 0.25, size=(n, k))
    ref_w = np.einsum("ik,ia,ib->kab", w, xb, xb)
    h = ops.clipped_weighted_grams(x, w, 1.0)
    assert h.shape == (k, d, d)
    np.testing.assert_allclose(h, ref_w, rtol=0, atol=1e-12 * n)


def _reference_linear_grad(x, y, w, bias, cg, loss, feature_clip):
    x64 = reference_clip64(x, feature_clip)[0] if feature_clip else np.asarray(x, np.float64)
    k = w.shape[0]
    z = x64 @ w.T + bias
    onehot = np.eye(k)[y]
    if loss == "sigmoid":
        r = (1 / (1 + np.exp(-z)) - onehot) / k
    else:
        p = np.exp(z - z.max(axis=1, keepdims=True))
        r = p / p.sum(axis=1, keepdims=True) - onehot
    per_example = np.einsum("ik,id->ikd", r, x64)  # materialised on purpose: the reference
    norms = np.sqrt((per_example**2).sum(axis=(1, 2)))
    target = cg * ops.CLIP_MARGIN
    scale = np.where(norms <= target, 1.0, target / np.maximum(norms, 1e-300))
    return (per_example * scale[:, None, None]).sum(axis=0), int((scale < 1).sum())


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("feature_clip", [None, 1.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d,k", [(1, 1), (7, 3), (64, 10), (130, 5)])
def test_clipped_linear_grad_matches_materialised_reference(rng, loss, feature_clip, dtype, d, k):
    n = 301
    x = _features(rng, n, d, dtype)
    y = rng.integers(0, k, size=n)
    w = rng.standard_normal((k, d))
    bias = rng.standard_normal(k)
    cg = 0.05
    grad, n_clipped = ops.clipped_linear_grad(x, y, w, bias, cg, loss=loss, feature_clip=feature_clip)
    ref, ref_clipped = _reference_linear_grad(x, y, w, bias, cg, loss, feature_clip)
    assert grad.shape == (k, d) and grad.dtype == np.float64
    np.testing.assert_allclose(grad, ref, rtol=1e-10, atol=1e-13)
    assert n_clipped == ref_clipped


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [1, 2, 31, 130])
def test_cholesky_matches_lapack_and_reconstructs(rng, dtype, d):
    m = rng.standard_normal((5, d, d))
    a = (m @ np.swapaxes(m, 1, 2) + d * np.eye(d)).astype(dtype)
    L, info = ops.cholesky(a)
    assert info.shape == (5,) and info.dtype == np.int32 and np.all(info == 0)
    assert L.dtype == dtype
    assert np.all(np.triu(L, 1) == 0)
    for i in range(5):
        ref = scipy.linalg.cholesky(a[i].astype(np.float64), lower=True)
        np.testing.assert_allclose(L[i], ref, rtol=0, atol=np.finfo(dtype).eps * 50 * np.abs(ref).max())
    rec = np.linalg.norm(L @ np.swapaxes(L, 1, 2) - a) / np.linalg.norm(a)
    assert rec < np.finfo(dtype).eps * 10 * d


@pytest.mark.parametrize("d", [3, 8, 31])
def test_cholesky_info_on_indefinite_and_nan(rng, d):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = q @ np.diag(rng.uniform(1, 2, d)) @ q.T
    bad = a.copy()
    j = d // 2  # make the leading minor of order j + 1 singular-negative
    bad[j, j] = bad[j, :j] @ np.linalg.solve(bad[:j, :j], bad[:j, j]) - 0.5 if j else -1.0
    nan = a.copy()
    nan[d - 1, 0] = np.nan
    nan[0, d - 1] = np.nan
    L, info = ops.cholesky(np.stack([a, bad, nan, np.zeros((d, d))]))
    lapack_info = scipy.linalg.lapack.dpotrf(bad, lower=1)[1]
    assert info[0] == 0
    assert info[1] == lapack_info == j + 1
    assert info[2] == (d if d > 1 else 1)
    assert info[3] == 1
    assert np.isnan(L[1]).all() and np.isnan(L[2]).all() and np.isnan(L[3]).all()
    assert np.isfinite(L[0]).all()


def test_cholesky_batch_shape_preserved(rng):
    a = np.broadcast_to(np.eye(4) * 2, (2, 3, 4, 4)).copy()
    L, info = ops.cholesky(a)
    assert L.shape == (2, 3, 4, 4) and info.shape == (2, 3)
    np.testing.assert_allclose(L, np.sqrt(2) * np.broadcast_to(np.eye(4), (2, 3, 4, 4)))


@pytest.mark.parametrize("d,m", [(1, 1), (7, 3), (130, 11)])
def test_cho_solve_shapes_and_values(rng, d, m):
    mats = rng.standard_normal((3, d, d))
    a = mats @ np.swapaxes(mats, 1, 2) + d * np.eye(d)
    L, info = ops.cholesky(a)
    assert np.all(info == 0)
    b = rng.standard_normal((3, d, m))
    x = ops.cho_solve(L, b)
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-9, atol=1e-12)
    v = rng.standard_normal((3, d))
    np.testing.assert_allclose(ops.cho_solve(L, v), np.linalg.solve(a, v[..., None])[..., 0], rtol=1e-9, atol=1e-12)
    # One factor, a batch of right-hand sides; and one block for every factor.
    np.testing.assert_allclose(ops.cho_solve(L[0], b), np.linalg.solve(a[0], b), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ops.cho_solve(L, b[:1]), np.linalg.solve(a, b[:1]), rtol=1e-9, atol=1e-12)


def test_validation_names_the_argument(rng):
    x = rng.standard_normal((10, 3))
    y = rng.integers(0, 2, 10)
    with pytest.raises(ValueError, match="clip_norm"):
        ops.clipped_gram(x, 0.0)
    with pytest.raises(ValueError, match="clip_norm"):
        ops.clipped_gram(x, float("nan"))
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.clipped_gram(x[0], 1.0)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.clipped_gram(x.astype(np.int64), 1.0)
    bad = x.copy()
    bad[4, 1] = np.inf
    with pytest.raises(ValueError, match="x contains NaN or Inf .first at row 4"):
        ops.clipped_gram(bad, 1.0)
    with pytest.raises(ValueError, match="labels must lie"):
        ops.clipped_class_sums(x, y + 1, 2, 1.0)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        ops.clipped_class_sums(x, y.astype(float), 2, 1.0)
    with pytest.raises(ValueError, match="accumulate"):
        ops.clipped_gram(x, 1.0, accumulate="float16")
    with pytest.raises(ValueError, match="x is empty"):
        ops.clipped_gram(np.zeros((0, 3)), 1.0)
    with pytest.raises(ValueError, match="loss"):
        ops.clipped_linear_grad(x, y, np.zeros((2, 3)), 0.0, 1.0, loss="hinge")
    with pytest.raises(ValueError, match="a must have shape"):
        ops.cholesky(np.zeros((3, 4)))


def test_non_contiguous_input_is_handled(rng):
    base = rng.standard_normal((40, 10))
    view = base[::2, ::3]  # strided in both dimensions
    xb, _ = reference_clip64(np.ascontiguousarray(view), 1.0)
    np.testing.assert_allclose(ops.clipped_gram(view, 1.0), xb.T @ xb, atol=1e-13)
    np.testing.assert_allclose(ops.clipped_gram(np.asfortranarray(view), 1.0), xb.T @ xb, atol=1e-13)


def test_mixed_devices_rejected():
    class FakeDeviceArray:
        __cuda_array_interface__ = {"shape": (2, 2), "typestr": "<f8", "data": (0, False), "version": 3}

    with pytest.raises(ValueError, match="mixed devices"):
        ops.array_module(np.zeros(2), FakeDeviceArray())


def test_device_of_is_the_one_device_rule():
    """ops.device_of decides where arrays live; mechanisms and models ask it too."""
    from dpfc_native import mechanisms, models

    class FakeDeviceArray:
        __cuda_array_interface__ = {"shape": (2,), "typestr": "<f8", "data": (0, False), "version": 3}

    assert ops.device_of(np.zeros(2), None, [1.0]) == "cpu"
    assert ops.device_of() == "cpu"
    assert ops.device_of(FakeDeviceArray(), None) == "cuda"
    with pytest.raises(ValueError, match="mixed devices"):
        ops.device_of(np.zeros(2), FakeDeviceArray())
    assert not hasattr(mechanisms, "_device_of")
    assert models.resolve_device("cpu", FakeDeviceArray()) == "cpu"


def test_cholesky_shifts_matches_shifted_factors(rng):
    d, shifts = 7, np.array([-50.0, 0.0, 0.5, 3.0])
    m = rng.standard_normal((d, d))
    a = m @ m.T + 0.1 * np.eye(d)
    L, info = ops.cholesky_shifts(a, shifts)
    for j, s in enumerate(shifts):
        Lj, ij = ops.cholesky(a + s * np.eye(d))
        np.testing.assert_array_equal(info[j], ij)
        np.testing.assert_array_equal(L[j], Lj)
    assert info[0] > 0 and np.isnan(L[0]).all() and (info[1:] == 0).all()
    with pytest.raises(ValueError, match="shifts must be finite"):
        ops.cholesky_shifts(a, np.array([np.nan]))
    with pytest.raises(ValueError, match=r"shape \(d, d\)"):
        ops.cholesky_shifts(np.stack([a, a]), shifts)


def test_memory_is_chunked(monkeypatch, rng):
    """clipped_gram never converts more than one chunk of rows at a time."""
    seen = []
    from dpfc_native import _cpu_stats

    original = _cpu_stats._clipped_chunk

    def spy(x, sl, c):
        out = original(x, sl, c)
        seen.append(out[0].shape[0])
        return out

    monkeypatch.setattr(_cpu_stats, "_CHUNK_ELEMENTS", 64 * 5)
    monkeypatch.setattr(_cpu_stats, "_clipped_chunk", spy)
    x = rng.standard_normal((1000, 5))
    xb, _ = reference_clip64(x, 1.0)
    np.testing.assert_allclose(ops.clipped_gram(x, 1.0), xb.T @ xb, atol=1e-12)
    assert max(seen) == 64 and sum(seen) == 1000


@pytest.mark.parametrize("env,tf32,want", [
    (None, False, "cublas"), ("auto", False, "cublas"), ("cublas", False, "cublas"),
    (None, True, "native"), ("simt32", False, "native"), ("mma", True, "native"),
])
def test_gpu_grad_engine_choice(monkeypatch, kernel_env, env, tf32, want):
    """The clipped gradient runs its GEMMs on cuBLAS unless CuPy would use TF32 there (which
    rounds the clipped per-example terms) or a native engine is asked for."""
    from dpfc_native import _gpu_stats

    monkeypatch.setattr(_gpu_stats, "_tf32_matmul", lambda: tf32)
    if env is None:
        kernel_env(DPFC_GRAD_KERNEL=None)
    else:
        kernel_env(DPFC_GRAD_KERNEL=env)
    assert _gpu_stats._grad_engine(np.float32) == want
    # float64 features never go through TF32.
    assert _gpu_stats._grad_engine(np.float64) == ("native" if env in ("simt32", "mma")
                                                   else "cublas")


def test_gpu_grad_engine_refuses_tf32_and_unknown_names(monkeypatch, kernel_env):
    from dpfc_native import _gpu_stats

    monkeypatch.setattr(_gpu_stats, "_tf32_matmul", lambda: True)
    kernel_env(DPFC_GRAD_KERNEL="cublas")
    with pytest.raises(ValueError, match="TF32"):
        _gpu_stats._grad_engine(np.float32)
    kernel_env(DPFC_GRAD_KERNEL="tensorcore")
    with pytest.raises(ValueError, match="DPFC_GRAD_KERNEL"):
        _gpu_stats._grad_engine(np.float32)


@pytest.mark.parametrize("n,k,d,item,want", [
    (1_281_167, 1000, 1664, 4, 32768),   # the logits budget binds, a multiple of 4096
    (1_281_167, 10, 768, 4, 86016),      # the scaled-rows budget binds
    (5003, 100, 130, 4, 5003),           # all rows in one chunk
    (10**6, 10**6, 8, 8, 128),           # at least 128 rows
])
def test_gpu_grad_chunk_rows(kernel_env, n, k, d, item, want):
    from dpfc_native import _gpu_stats

    kernel_env(DPFC_LG_CHUNK=None)
    assert _gpu_stats._lg_chunk_rows(n, k, d, item) == want
    kernel_env(DPFC_LG_CHUNK="777")
    assert _gpu_stats._lg_chunk_rows(n, k, d, item) == min(777, n)
