"""The exact reduction contract: fixed leaves, integer partials on a fixed grid, coverage.

* Merges in any order or partitioning give identical bits (integer addition).
* The finished value is the correctly rounded exact sum of the grid-rounded leaf values
  (checked with Python integers and fractions).
* Overlapping partials and missing leaves raise.
* Every statistic matches an independent float64 reference on fresh random data with odd
  sizes (n not a multiple of the leaf, unequal shards), within the a-priori bound.
* At n = 2^21 the error against an exact reference is within the leaf bound.
* Poisson masks: Philox matches the native core; masks do not depend on the partitioning.
"""

from __future__ import annotations

import math
import os
import signal
import time
from fractions import Fraction

import numpy as np
import pytest
from _reference import npy_shards
from conftest import reference_clip64

from dpfc_native import _core, ops
from dpfc_native import reduction as R

SHARDS = (301, 77, 1000)  # unequal, none a multiple of the leaf
LEAF = 64
D = 6
K = 3


def _bits(a) -> bytes:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float64)).tobytes()


def _data(rng, n=sum(SHARDS), d=D, k=K):
    x = rng.standard_normal((n, d)) * rng.uniform(0.2, 3.0, size=(n, 1))
    y = rng.integers(0, k, size=n)
    return x, y


# --------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------


def test_leaves_never_cross_shards():
    lay = R.LeafLayout(SHARDS, LEAF)
    assert lay.n_leaves == 5 + 2 + 16
    assert lay.n_rows == sum(SHARDS)
    np.testing.assert_array_equal(
        lay.stop - lay.start, [64] * 4 + [45] + [64, 13] + [64] * 15 + [40]
    )
    assert set(zip(lay.shard.tolist(), lay.global_start.tolist())) >= {(1, 301), (2, 378)}
    assert lay.tasks(None) == [(0, 5), (5, 7), (7, 23)]
    assert lay.tasks(3) == [
        (0, 3),
        (3, 5),
        (5, 7),
        (7, 10),
        (10, 13),
        (13, 16),
        (16, 19),
        (19, 22),
        (22, 23),
    ]
    with pytest.raises(ValueError):
        R.LeafLayout([3, 0], 2)
    with pytest.raises(ValueError):
        R.LeafLayout([5], 0)


# --------------------------------------------------------------------------------------
# Merge order and partitioning
# --------------------------------------------------------------------------------------


def _leaf_partials(stat, x, y, leaf=LEAF, **kw):
    src = R.ArraySource(x, y, shard_rows=SHARDS)
    lay = R.LeafLayout(src.shard_rows, leaf)
    return src, lay, [R.leaf_partial(stat, src, lay, i, **kw) for i in range(lay.n_leaves)]


def _merge_all(parts):
    acc = parts[0]
    for p in parts[1:]:
        acc = acc.merge(p)
    return acc


def _tree(parts, rng):
    parts = list(parts)
    while len(parts) > 1:
        i, j = sorted(rng.choice(len(parts), size=2, replace=False))
        merged = parts[i].merge(parts[j])
        parts = [p for t, p in enumerate(parts) if t not in (i, j)] + [merged]
    return parts[0]


def test_every_merge_order_gives_the_same_bits(rng):
    x, y = _data(rng)
    stat = R.Stats(1.3, K)
    src, lay, parts = _leaf_partials(stat, x, y)
    results = []
    orders = [parts, parts[::-1], [parts[i] for i in rng.permutation(len(parts))]]
    for order in orders:
        results.append(_merge_all(order).values(lay.n_leaves))
    for _ in range(3):
        results.append(_tree(parts, rng).values(lay.n_leaves))
    for ranges in (
        [(0, 23)],
        [(0, 1), (1, 23)],
        [(0, 5), (5, 7), (7, 23)],
        [(0, 11), (11, 12), (12, 23)],
    ):
        results.append(
            _merge_all([R.range_partial(stat, src, lay, a, b) for a, b in ranges[::-1]]).values(
                lay.n_leaves
            )
        )
    for r in results[1:]:
        for name in ("G", "B", "counts"):
            assert _bits(r[name]) == _bits(results[0][name])


def test_finish_is_the_correctly_rounded_exact_sum_of_grid_values(rng):
    """Independent of the limb arithmetic: Python integers and fractions."""
    x, y = _data(rng)
    w = rng.standard_normal((K, D))
    for stat, name in (
        (R.Stats(0.7, K), "G"),
        (R.Stats(0.7, K), "B"),
        (R.LinearGrad(0.05, w, 0.3, loss="softmax"), "grad"),
    ):
        src, lay, parts = _leaf_partials(stat, x, y)
        got = _merge_all(parts).values(lay.n_leaves)[name]
        e = math.frexp(stat.bounds(D)[name])[1]
        f = lay.fraction_bits
        assert f == 62 - 6  # leaves of 64 rows
        total = None
        for g0, a, b in zip(lay.global_start, lay.start, lay.stop):
            rows = slice(g0, g0 + (b - a))
            leaf = stat.leaf(x[rows], y[rows], None)[name]
            q = np.vectorize(
                lambda v: round(Fraction(float(v)) * Fraction(2) ** (f - e)), otypes=[object]
            )(leaf)
            total = q if total is None else total + q
        expect = np.vectorize(
            lambda t: float(Fraction(int(t)) * Fraction(2) ** (e - f)), otypes=[float]
        )(total)
        assert _bits(got) == _bits(expect), name


def test_grid_handles_carries_and_negative_values():
    lay = R.LeafLayout([4, 4], 4)
    stat = R.ClassSums(1.0, 1)
    # Row values chosen so lo limbs carry: v * 2^52 mod 2^32 close to 2^32.
    x = np.array([[-(1 - 2.0**-21)], [-(2.0**-21)], [0.5 - 2.0**-30], [1e-300]] * 2)
    src = R.ArraySource(x, np.zeros(8, np.int64), shard_rows=(4, 4))
    a = R.range_partial(stat, src, lay, 0, 1)
    b = R.range_partial(stat, src, lay, 1, 2)
    got = a.merge(b).values(2)["B"]
    exact = sum(Fraction(float(v)) for v in ops.clip_rows(x, 1.0)[0][:, 0])
    assert got[0, 0] == float(exact)


# --------------------------------------------------------------------------------------
# Coverage
# --------------------------------------------------------------------------------------


def test_overlapping_partials_raise(rng):
    x, y = _data(rng)
    stat = R.Gram(1.0)
    src, lay, parts = _leaf_partials(stat, x, y)
    a = R.range_partial(stat, src, lay, 0, 5)
    b = R.range_partial(stat, src, lay, 4, 9)
    with pytest.raises(R.CoverageError, match=r"\[4, 5\) would be counted twice"):
        a.merge(b)
    with pytest.raises(R.CoverageError):
        parts[7].merge(parts[7])  # a duplicated (retried) partial
    whole = R.range_partial(stat, src, lay, 0, lay.n_leaves)
    with pytest.raises(R.CoverageError):
        whole.merge(parts[22])


def test_missing_leaves_raise_at_finish(rng):
    x, y = _data(rng)
    stat = R.Gram(1.0)
    src, lay, parts = _leaf_partials(stat, x, y)
    partial = _merge_all(parts[:6] + parts[7:20])
    with pytest.raises(R.CoverageError, match=r"missing \[6, 7\) \[20, 23\)"):
        partial.values(lay.n_leaves)
    full = _merge_all(parts)
    full.check_complete(lay.n_leaves)
    assert full.ranges == ((0, lay.n_leaves),)
    with pytest.raises(R.CoverageError):  # a layout with fewer leaves
        full.values(lay.n_leaves - 1)


def test_partials_of_different_statistics_do_not_merge(rng):
    x, y = _data(rng)
    src = R.ArraySource(x, y)
    lay = R.LeafLayout(src.shard_rows, LEAF)
    a = R.leaf_partial(R.Gram(1.0), src, lay, 0)
    for other in (R.Gram(2.0),):
        with pytest.raises(ValueError, match="different statistics"):
            a.merge(R.leaf_partial(other, src, lay, 1))
    lay2 = R.LeafLayout(src.shard_rows, LEAF * 2)
    with pytest.raises(ValueError, match="different statistics"):
        a.merge(R.leaf_partial(R.Gram(1.0), src, lay2, 1))
    s = R.PoissonSampling.new(0.5, seed=3)
    p0 = R.leaf_partial(R.Gram(1.0), src, lay, 1, sampling=s)
    with pytest.raises(ValueError, match="different statistics"):
        p0.merge(R.leaf_partial(R.Gram(1.0), src, lay, 2, sampling=s.at_step(1)))


# --------------------------------------------------------------------------------------
# Against float64 references, every statistic, sharded and in-memory sources
# --------------------------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path, rng):
    x, y = _data(rng)
    return npy_shards(tmp_path, x, y, SHARDS, K, stem="s"), x, y


def _reference(kind, x, y, c, **kw):
    xc, _ = reference_clip64(x, c)
    if kind == "gram":
        return xc.T @ xc
    if kind == "sums":
        return np.stack([xc[y == k].sum(axis=0) for k in range(K)])
    if kind == "class_grams":
        return np.stack([xc[y == k].T @ xc[y == k] for k in range(K)])
    if kind == "weighted":
        w = kw["w"]
        return np.einsum("ik,ia,ib->kab", w, xc, xc)
    raise AssertionError(kind)


def _tol(n, r, entries):
    return R.rounding_bound(n, LEAF, r, entries) + 1e-12 * n * r


def test_statistics_match_float64_references(sharded, rng):
    sf, x, y = sharded
    n, c = x.shape[0], 1.7
    for src in (sf, x):
        lab = None if src is sf else y
        g = R.reduce(R.Gram(c), src, lab, leaf_rows=LEAF)
        np.testing.assert_allclose(
            g, _reference("gram", x, y, c), rtol=0, atol=_tol(n, c * c, D * D)
        )
        g2, b, counts = R.reduce(R.Stats(c, K), src, lab, leaf_rows=LEAF)
        assert _bits(g2) == _bits(g)
        np.testing.assert_allclose(b, _reference("sums", x, y, c), rtol=0, atol=_tol(n, c, K * D))
        np.testing.assert_array_equal(counts, np.bincount(y, minlength=K))
        b2 = R.reduce(R.ClassSums(c, K), src, lab, leaf_rows=LEAF)
        assert _bits(b2) == _bits(b)
        a = R.reduce(R.ClassGrams(c, K), src, lab, leaf_rows=LEAF)
        np.testing.assert_allclose(
            a, _reference("class_grams", x, y, c), rtol=0, atol=_tol(n, c * c, K * D * D)
        )
        # Class blocks are separate reductions giving the same bits, block by block.
        blocks = [
            R.reduce(R.ClassGrams(c, K, classes=(0, 2)), src, lab, leaf_rows=LEAF),
            R.reduce(R.ClassGrams(c, K, classes=(2, 3)), src, lab, leaf_rows=LEAF),
        ]
        assert _bits(np.concatenate(blocks)) == _bits(a)
    # The same rows as an array cut like the files: the same leaves, the same bits.
    assert _bits(R.reduce(R.Gram(c), x, leaf_rows=LEAF, shard_rows=SHARDS)) == _bits(
        R.reduce(R.Gram(c), sf, leaf_rows=LEAF)
    )


def test_weighted_grams_and_linear_grad(rng):
    x, y = _data(rng)
    n, c = x.shape[0], 1.1
    w = rng.uniform(0.0, 0.25, size=(n, K))
    h = R.reduce(R.WeightedGrams(c, K), x, y, leaf_rows=LEAF, weights=w)
    np.testing.assert_allclose(
        h, _reference("weighted", x, y, c, w=w), rtol=0, atol=_tol(n, 0.25 * c * c, K * D * D)
    )
    hb = R.reduce(R.WeightedGrams(c, K, classes=(1, 3)), x, y, leaf_rows=LEAF, weights=w)
    assert _bits(hb) == _bits(h[1:3])
    with pytest.raises(ValueError, match="weight_bound"):
        R.reduce(R.WeightedGrams(c, K, weight_bound=0.1), x, y, leaf_rows=LEAF, weights=w)
    wk = rng.standard_normal((K, D))
    bias = rng.standard_normal(K)

    def newton_weights(xr, yr):
        p = 1 / (1 + np.exp(-(np.asarray(xr, np.float64) @ wk.T + bias)))
        return p * (1 - p)

    hf = R.reduce(
        R.WeightedGrams(c, K, weight_fn=newton_weights, weight_fn_id="t"), x, y, leaf_rows=LEAF
    )
    np.testing.assert_allclose(
        hf,
        _reference("weighted", x, y, c, w=newton_weights(x, y)),
        rtol=0,
        atol=_tol(n, 0.25 * c * c, K * D * D),
    )
    for loss in ("sigmoid", "softmax"):
        for fc in (None, 2.0):
            grad, nclip = R.reduce(
                R.LinearGrad(0.3, wk, bias, loss=loss, feature_clip=fc), x, y, leaf_rows=LEAF
            )
            ref, ref_n = ops.clipped_linear_grad(x, y, wk, bias, 0.3, loss=loss, feature_clip=fc)
            assert nclip == ref_n and nclip > 0
            np.testing.assert_allclose(grad, ref, rtol=0, atol=_tol(n, 0.3, K * D))
            assert np.abs(grad).max() > 0.1


def _result_bits(r):
    """Bits of an op's result: an array, or a tuple of arrays and ints."""
    if isinstance(r, tuple):
        return tuple(_result_bits(v) for v in r)
    return int(r) if isinstance(r, (int, np.integer)) else _bits(r)


def _ops_leaf_cases(x, y, rng):
    """(name, ops call with leaf_rows=LEAF, the same statistic by reduction.reduce,
    float64 reference, per-row bound, entries) for every statistic op."""
    n, c, cg = x.shape[0], 1.7, 0.3
    w = rng.uniform(0.0, 0.25, size=(n, K))
    wk, bias = rng.standard_normal((K, D)), rng.standard_normal(K)
    x64 = np.asarray(x, np.float64)
    grad_ref = ops.clipped_linear_grad(x64, y, wk, bias, cg, loss="softmax", feature_clip=2.0)
    return [
        (
            "gram",
            lambda m: ops.clipped_gram(x, c, leaf_rows=m),
            lambda: R.reduce(R.Gram(c), x, leaf_rows=LEAF),
            _reference("gram", x64, y, c),
            c * c,
        ),
        (
            "stats",
            lambda m: ops.clipped_stats(x, y, K, c, leaf_rows=m)[:2],
            lambda: R.reduce(R.Stats(c, K), x, y, leaf_rows=LEAF)[:2],
            (_reference("gram", x64, y, c), _reference("sums", x64, y, c)),
            c * c,
        ),
        (
            "class_sums",
            lambda m: ops.clipped_class_sums(x, y, K, c, leaf_rows=m),
            lambda: R.reduce(R.ClassSums(c, K), x, y, leaf_rows=LEAF),
            _reference("sums", x64, y, c),
            c,
        ),
        (
            "class_grams",
            lambda m: ops.clipped_class_grams(x, y, K, c, leaf_rows=m),
            lambda: R.reduce(R.ClassGrams(c, K), x, y, leaf_rows=LEAF),
            _reference("class_grams", x64, y, c),
            c * c,
        ),
        (
            "weighted_grams",
            lambda m: ops.clipped_weighted_grams(x, w, c, leaf_rows=m, weight_bound=0.25),
            lambda: R.reduce(R.WeightedGrams(c, K), x, y, leaf_rows=LEAF, weights=w),
            _reference("weighted", x64, y, c, w=w),
            0.25 * c * c,
        ),
        (
            "linear_grad",
            lambda m: ops.clipped_linear_grad(
                x, y, wk, bias, cg, loss="softmax", feature_clip=2.0, leaf_rows=m
            ),
            lambda: R.reduce(
                R.LinearGrad(cg, wk, bias, loss="softmax", feature_clip=2.0),
                x,
                y,
                leaf_rows=LEAF,
            ),
            grad_ref,
            cg,
        ),
    ]


@pytest.mark.parametrize("kind", ["float32", "float64", "memmap"])
def test_ops_leaf_rows_is_the_exact_reduction(tmp_path, rng, monkeypatch, kind):
    """``ops.<statistic>(..., leaf_rows=m)``: the same bits as ``reduction.reduce`` with
    leaves of m rows (hence as the Dask backend), whatever the thread count, within the
    reduction's a-priori bound of a float64 reference; on odd n and every op."""
    x, y = _data(rng)
    assert x.shape[0] % LEAF
    if kind == "float32":
        x = x.astype(np.float32)
    elif kind == "memmap":
        np.save(tmp_path / "x.npy", x.astype(np.float32))
        x = np.load(tmp_path / "x.npy", mmap_mode="r")
    n = x.shape[0]
    for name, by_ops, by_reduce, ref, bound in _ops_leaf_cases(x, y, rng):
        monkeypatch.setenv("DPFC_REDUCE_THREADS", "3")
        got = by_ops(LEAF)
        assert _result_bits(got) == _result_bits(by_reduce()), name
        monkeypatch.setenv("DPFC_REDUCE_THREADS", "1")
        assert _result_bits(by_ops(LEAF)) == _result_bits(got), name
        got = got if isinstance(got, tuple) else (got,)
        ref = ref if isinstance(ref, tuple) else (ref,)
        for g, r in zip(got, ref):
            if isinstance(r, int):  # the gradient's count of clipped examples
                assert g == r and r > 0, name
                continue
            assert isinstance(g, np.ndarray) and g.dtype == np.float64 and g.shape == r.shape
            assert np.isfinite(g).all() and np.abs(g).max() > 0.1
            np.testing.assert_allclose(g, r, rtol=0, atol=_tol(n, bound, r.size), err_msg=name)
        # Another leaf size sums other leaves: still within its own bound, other bits.
        other = by_ops(97)
        other = other if isinstance(other, tuple) else (other,)
        np.testing.assert_allclose(other[0], ref[0], rtol=0, atol=_tol(n, bound, ref[0].size))
    counts = ops.clipped_stats(x, y, K, 1.7, leaf_rows=LEAF)[2]
    np.testing.assert_array_equal(counts, np.bincount(y, minlength=K))
    assert counts.dtype == np.int64


def test_ops_leaf_rows_validates_like_the_one_pass_ops(rng):
    x, y = _data(rng)
    x[5, 2] = np.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        ops.clipped_gram(x, 1.0, leaf_rows=LEAF)
    x[5, 2] = 0.0
    with pytest.raises(ValueError, match="labels"):
        ops.clipped_stats(x, y + 1, K, 1.0, leaf_rows=LEAF)
    with pytest.raises(ValueError, match="non-negative"):
        ops.clipped_weighted_grams(x, -np.ones((x.shape[0], 2)), 1.0, leaf_rows=LEAF)
    # Half precision is read as stored, leaf by leaf, like the one-pass op.
    x16 = x.astype(np.float16)
    assert _bits(ops.clipped_gram(x16, 2.0, leaf_rows=LEAF)) == _bits(
        R.reduce(R.Gram(2.0), x16, leaf_rows=LEAF)
    )
    # Big-endian, Fortran-ordered and strided copies of the rows: the same bits.
    ref = ops.clipped_stats(x, y, K, 1.0, leaf_rows=LEAF)
    for layout in (x.astype(">f8"), np.asfortranarray(x), np.repeat(x, 2, axis=1)[:, ::2]):
        assert _result_bits(ops.clipped_stats(layout, y, K, 1.0, leaf_rows=LEAF)) == _result_bits(
            ref
        )
    # The weight bound: by default max(weights), else the given one (a larger weight
    # raises); it sets the grid, as WeightedGrams' weight_bound does.
    w = rng.uniform(0.0, 0.24995, size=(x.shape[0], 2))
    by_max = ops.clipped_weighted_grams(x, w, 1.0, leaf_rows=LEAF)
    assert _bits(by_max) == _bits(
        R.reduce(R.WeightedGrams(1.0, 2, weight_bound=float(w.max())), x, weights=w, leaf_rows=LEAF)
    )
    assert _bits(ops.clipped_weighted_grams(x, w, 1.0, leaf_rows=LEAF, weight_bound=0.25)) == _bits(
        R.reduce(R.WeightedGrams(1.0, 2), x, weights=w, leaf_rows=LEAF)
    )
    with pytest.raises(ValueError, match="weight_bound"):
        ops.clipped_weighted_grams(x, w, 1.0, leaf_rows=LEAF, weight_bound=0.1)
    with pytest.raises(ValueError, match="weight_bound.*leaf_rows"):
        ops.clipped_weighted_grams(x, w, 1.0, weight_bound=0.25)
    # All-zero weights: a positive grid bound, zero grams.
    h = ops.clipped_weighted_grams(x, np.zeros((x.shape[0], 2)), 1.0, leaf_rows=LEAF)
    assert h.shape == (2, D, D) and not h.any()


def test_float16_leaves_kept_as_stored(rng):
    x, y = _data(rng)
    x16 = x.astype(np.float16)
    g = R.reduce(R.Gram(2.0), x16, y, leaf_rows=LEAF)
    np.testing.assert_allclose(
        g, _reference("gram", x16.astype(np.float64), y, 2.0), rtol=0, atol=_tol(len(x), 4.0, D * D)
    )
    b = R.reduce(R.ClassSums(2.0, K), x16, y, leaf_rows=LEAF)
    np.testing.assert_allclose(
        b, _reference("sums", x16.astype(np.float64), y, 2.0), rtol=0, atol=_tol(len(x), 2.0, K * D)
    )


def _limbs(shape):
    return np.zeros(shape, np.int64), np.zeros(shape, np.int64)


def test_statistic_beyond_its_range_raises_and_adds_nothing():
    hi, lo = _limbs(2)
    with pytest.raises(ValueError, match="a-priori range"):
        R._grid_add(np.array([1.0, 3.0 * 8]), R._grid_exponent(1.0), 50, 4, "G", hi, lo)
    assert not hi.any() and not lo.any()
    R._grid_add(np.array([1.0, -4.0 * 0.999]), R._grid_exponent(1.0), 50, 4, "G", hi, lo)
    assert lo.any()  # within range: added
    for bad in (np.nan, np.inf, -np.inf):
        hi, lo = _limbs(3)
        with pytest.raises(ValueError, match="NaN"):
            R._grid_add(np.array([1e9, 0.5, bad]), 1, 50, 4, "G", hi, lo)  # NaN wins over range
        assert not hi.any() and not lo.any()
    with pytest.raises(ValueError, match="shape"):
        R._grid_add(np.ones((2, 2)), 1, 50, 4, "G", *_limbs((2, 3)))


@pytest.mark.parametrize("n", [1, 7, 4097])
def test_grid_add_matches_python_integers(n):
    """The native limb accumulation against exact Python integers: round half to even on the
    grid, negative values, values near the range limit, several leaves accumulated."""
    rng = np.random.default_rng(n)
    frac, exponent, rows = 50, 3, 16
    hi, lo = _limbs(n)
    want = [0] * n
    for leaf in range(3):
        v = rng.standard_normal(n) * 2.0**exponent * rng.choice([1e-12, 1e-3, 1.0], n)
        if leaf == 1:  # exact ties on the grid: rint must round them to even
            v = (np.arange(n) - n // 2 + 0.5) * 2.0 ** (exponent - frac)
        if leaf == 2 and n > 1:  # the largest magnitude the range allows, both signs
            v[:2] = [rows * 2.0**exponent, -rows * 2.0**exponent]
        R._grid_add(v, exponent, frac, rows, "G", hi, lo)
        for k, x in enumerate(v.tolist()):
            scaled = x * 2.0 ** (frac - exponent)
            want[k] += round(scaled)  # Python's round: half to even, exact on doubles
    assert ((lo >= 0) & (lo < 1 << 32)).all()  # the low limb stays normalised
    got = [int(h) * (1 << 32) + int(low) for h, low in zip(hi.tolist(), lo.tolist())]
    assert got == want


def test_grid_add_rejects_converted_copies():
    v = np.ones(4)
    for hi, lo in [
        (np.zeros(4, np.int32), np.zeros(4, np.int64)),
        (np.zeros(8, np.int64)[::2], np.zeros(4, np.int64)),
    ]:
        with pytest.raises(ValueError, match="hi must be"):
            R._core.cpu_grid_accumulate(v, 1.0, 2.0**40, hi, lo)
    ro = np.zeros(4, np.int64)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="lo must be writeable"):
        R._core.cpu_grid_accumulate(v, 1.0, 2.0**40, np.zeros(4, np.int64), ro)


# --------------------------------------------------------------------------------------
# Large n: the rounding bound
# --------------------------------------------------------------------------------------


def _two_product(a, b):
    p = a * b

    def split(v):
        t = 134217729.0 * v
        hi = t - (t - v)
        return hi, v - hi

    ah, al = split(a)
    bh, bl = split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def test_large_n_rounding_within_the_leaf_bound():
    n, d, c, m = 1 << 21, 2, 1.0, 4096
    rng = np.random.default_rng(20261207)
    # Positive entries (no cancellation) and every row longer than C: all clipped.
    x = np.abs(rng.standard_normal((n, d))) * 3.0 + 0.5
    g = R.reduce(R.Gram(c), x, leaf_rows=m)
    xc = ops.clip_rows(x, c)[0]
    exact = np.zeros((d, d))
    for a in range(d):
        for b in range(d):
            p, e = _two_product(xc[:, a], xc[:, b])
            exact[a, b] = math.fsum(np.concatenate([p, e]))
    err = np.linalg.norm(g - exact)
    bound = R.rounding_bound(n, m, c * c, d * d)
    one_pass_bound = (n + 1) * 2.0**-53 * n * c * c
    print(
        f"n={n}: |err|_F = {err:.3g} C^2, leaf bound {bound:.3g} C^2, "
        f"one-pass bound {one_pass_bound:.3g} C^2"
    )
    assert err <= bound
    assert bound < one_pass_bound / 400  # m / n of the one-pass bound, about


def test_merge_rounding_at_three_hundred_million_rows_by_construction():
    """n = 3e8 rows in leaves of m = 4096 (73,243 leaf partials, built directly: each
    leaf's float64 value is what a leaf of m rows of norm C could give, placed 0.4999 grid
    steps above a grid point so every conversion rounds the same way and the errors add
    up). The finished sum is within the grid and final-conversion terms of the exact sum
    of the leaf values, and the whole a-priori bound (leaf float sums included) is about
    m n u C^2 = 1.4e-4 C^2, against one float64 pass's n^2 u C^2 (about 10 C^2)."""
    n, m, c2 = 300_000_000, 4096, 1.0
    layout = R.LeafLayout([n], m)
    leaves = layout.n_leaves
    rows = (layout.stop - layout.start).astype(np.float64)
    e = R._grid_exponent(c2)  # noqa: SLF001 - the grid under test
    step = 2.0 ** (e - layout.fraction_bits)
    rng = np.random.default_rng(300)
    # Leaf values near zero (rows that cancel), so the final conversion's rounding does
    # not hide the grid's: a grid point plus 0.4999 steps, exact in float64.
    k = rng.integers(-1000, 1000, (leaves, 2, 2)).astype(np.float64)
    k[:, 0, 1] = k[:, 1, 0]  # a Gram leaf is symmetric (the grid reads one triangle)
    values = (k + 0.4999) * step
    assert np.all(np.abs(values) <= rows[:, None, None] * c2)
    acc = R._accumulator(R.Gram(1.0), layout, None, 2)  # noqa: SLF001
    for i in range(leaves):
        acc.add({"G": values[i]}, int(rows[i]), i)
    got = acc.partial().values(leaves)["G"]
    exact = np.array([[math.fsum(values[:, a, b]) for b in range(2)] for a in range(2)])
    err = float(np.linalg.norm(got - exact))
    merge_bound = 2 * leaves * step / 2 + 2.0**-53 * float(np.linalg.norm(exact)) * 1.01
    assert err <= merge_bound
    assert err >= 0.5 * 2 * leaves * 0.4999 * step  # the construction did accumulate
    naive = values.sum(axis=0)  # float64 pairwise sum of the same leaf values, for scale
    bound = R.rounding_bound(n, m, c2, 4)
    one_pass = (n + 1) * 2.0**-53 * n * c2
    print(
        f"n = 3e8: merge error {err:.3g} C^2 (grid + final bound {merge_bound:.3g}); "
        f"float sum of the leaves off by {np.linalg.norm(naive - exact):.3g}; a-priori "
        f"bound {bound:.3g} C^2 vs one float64 pass {one_pass:.3g} C^2"
    )
    assert err <= bound
    assert 1.0e-4 < bound < 2.0e-4 and 9.0 < one_pass < 11.0


# --------------------------------------------------------------------------------------
# Poisson sampling
# --------------------------------------------------------------------------------------


def test_philox_matches_the_native_core(rng):
    for _ in range(20):
        c = [int(v) for v in rng.integers(0, 2**32, size=4, dtype=np.uint64)]
        k = [int(v) for v in rng.integers(0, 2**32, size=2, dtype=np.uint64)]
        got = R.philox4x32_10(*[[v] for v in c], k[0], k[1])
        assert tuple(int(w[0]) for w in got) == tuple(_core.philox4x32_10(tuple(c), tuple(k)))


def test_poisson_masks_do_not_depend_on_partitioning(rng):
    s = R.PoissonSampling.new(0.25, seed=11).at_step(5)
    n = 10_001
    full = s.mask(0, n)
    cuts = np.sort(rng.choice(np.arange(1, n), size=40, replace=False))
    pieces = np.concatenate([s.mask(a, b) for a, b in zip([0, *cuts], [*cuts, n])])
    np.testing.assert_array_equal(pieces, full)
    np.testing.assert_array_equal(s.mask(7, 8), full[7:8])
    # Bernoulli(q): the count is within 5 sigma; steps and keys give other batches.
    sd = math.sqrt(n * 0.25 * 0.75)
    assert abs(full.sum() - 0.25 * n) < 5 * sd
    assert not np.array_equal(full, s.at_step(6).mask(0, n))
    assert not np.array_equal(full, R.PoissonSampling.new(0.25, seed=12).at_step(5).mask(0, n))
    assert str(s.key) not in repr(s)
    with pytest.raises(ValueError):
        R.PoissonSampling(0.0, 1)
    with pytest.raises(ValueError):
        R.PoissonSampling(0.5, 1, step=1 << 24)


def test_sampled_reduction_sums_exactly_the_sampled_rows(sharded):
    sf, x, y = sharded
    s = R.PoissonSampling.new(0.3, seed=5).at_step(2)
    mask = s.mask(0, x.shape[0])
    g, b, counts = R.reduce(R.Stats(1.0, K), sf, leaf_rows=LEAF, sampling=s)
    g_arr, _, _ = R.reduce(R.Stats(1.0, K), x, y, leaf_rows=sum(SHARDS), sampling=s)
    np.testing.assert_array_equal(counts, np.bincount(y[mask], minlength=K))
    np.testing.assert_allclose(
        g, _reference("gram", x[mask], y[mask], 1.0), rtol=0, atol=_tol(len(x), 1.0, D * D)
    )
    np.testing.assert_allclose(g_arr, g, rtol=0, atol=_tol(len(x), 1.0, D * D))
    # A rate so small most leaves sample nothing: zero partials still count as covered.
    tiny = R.PoissonSampling.new(1e-3, seed=6)
    g0, partial = R.reduce(R.Gram(1.0), sf, leaf_rows=LEAF, sampling=tiny, return_partial=True)
    assert partial.ranges == ((0, 23),)
    sel = tiny.mask(0, x.shape[0])
    np.testing.assert_allclose(g0, _reference("gram", x[sel], y[sel], 1.0), rtol=0, atol=1e-12)


def test_reads_never_exceed_one_leaf(sharded):
    """Memory stays bounded by the leaf: every read the reduction makes is one leaf (or
    its sampled rows), whatever the source's size or the task's length."""
    sf, x, y = sharded

    class Counting:
        def __init__(self, inner):
            self.inner, self.sizes = inner, []
            self.shard_rows, self.n_features = inner.shard_rows, inner.n_features
            self.shards = inner.shards

        def read(self, i, a, b):
            self.sizes.append(b - a)
            return self.inner.read(i, a, b)

        def take(self, i, rows):
            self.sizes.append(len(rows))
            return self.inner.take(i, rows)

    src = Counting(sf)
    lay = R.LeafLayout(sf.shard_rows, LEAF)
    R.range_partial(R.Stats(1.0, K), src, lay, 0, lay.n_leaves)
    assert len(src.sizes) == lay.n_leaves and max(src.sizes) == LEAF
    src.sizes.clear()
    R.range_partial(
        R.Gram(1.0), src, lay, 0, lay.n_leaves, sampling=R.PoissonSampling.new(0.5, seed=1)
    )
    assert max(src.sizes) <= LEAF and sum(src.sizes) < 0.6 * len(x)


def test_leaves_do_not_depend_on_blas_threads_or_local_threads(rng):
    """A 1808 x 512 gradient leaf rounds differently on one and two OpenBLAS threads:
    leaves are computed on one BLAS thread whatever the process's setting, and leaves
    computed side by side (``threads``) merge to the same bits."""
    from threadpoolctl import threadpool_limits

    x = rng.standard_normal((4096 + 4096 + 1808, 512)).astype(np.float32)
    y = rng.integers(0, 10, x.shape[0])
    stat = R.LinearGrad(0.09, np.zeros((10, 512)), -2.2, feature_clip=1.0)
    results = []
    for blas in (2, 1):
        with threadpool_limits(limits=blas, user_api="blas"):
            for threads in (1, 3):
                results.append(_bits(R.reduce(stat, x, y, threads=threads)[0]))
    assert len(set(results)) == 1


# --------------------------------------------------------------------------------------
# Symmetric statistics: one triangle on the grid
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 3, 17])
def test_grid_add_lower_triangles_match_python_integers(d):
    """tri_d mode: only the lower triangle (column <= row) of each d x d matrix is put on
    the grid, exactly as Python integers say; the other limbs keep their bits."""
    rng = np.random.default_rng(d)
    k, frac, exponent, rows = 2, 50, 1, 8
    hi = rng.integers(-(2**40), 2**40, (k, d, d))
    lo = rng.integers(0, 2**32, (k, d, d))
    start = [int(h) * (1 << 32) + int(low) for h, low in zip(hi.ravel(), lo.ravel())]
    hi0, lo0 = hi.copy(), lo.copy()
    want = list(start)
    lower = np.broadcast_to(np.tril(np.ones((d, d), bool)), (k, d, d)).ravel()
    for _ in range(3):
        v = rng.standard_normal((k, d, d)) * 2.0**exponent
        R._grid_add(v, exponent, frac, rows, "G", hi, lo, lower=True)
        for i, x in enumerate(v.ravel().tolist()):
            if lower[i]:
                want[i] += round(x * 2.0 ** (frac - exponent))
    got = [int(h) * (1 << 32) + int(low) for h, low in zip(hi.ravel(), lo.ravel())]
    assert got == want
    assert ((lo >= 0) & (lo < 1 << 32))[lower.reshape(k, d, d)].all()
    assert np.array_equal(hi[~lower.reshape(k, d, d)], hi0[~lower.reshape(k, d, d)])
    assert np.array_equal(lo[~lower.reshape(k, d, d)], lo0[~lower.reshape(k, d, d)])
    # A bad value in the last row of the last matrix: everything added before it is taken
    # back, to the same bits; NaN is reported over a range failure found earlier.
    before = hi.copy(), lo.copy()
    v = rng.standard_normal((k, d, d))
    v[-1, -1, 0] = rows * 2.0**exponent * 4  # out of range (lower triangle)
    with pytest.raises(ValueError, match="a-priori range"):
        R._grid_add(v, exponent, frac, rows, "G", hi, lo, lower=True)
    assert np.array_equal(hi, before[0]) and np.array_equal(lo, before[1])
    v[-1, -1, -1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        R._grid_add(v, exponent, frac, rows, "G", hi, lo, lower=True)
    assert np.array_equal(hi, before[0]) and np.array_equal(lo, before[1])
    if d > 1:  # a NaN in the unread upper triangle is not read at all
        v = rng.standard_normal((k, d, d))
        v[0, 0, 1] = np.nan
        R._grid_add(v, exponent, frac, rows, "G", hi, lo, lower=True)
    with pytest.raises(ValueError, match="square"):
        R._grid_add(np.ones((2, 3)), exponent, frac, rows, "G", *_limbs((2, 3)), lower=True)


def test_symmetric_statistics_are_exactly_symmetric_with_one_triangle_in_the_partial(rng):
    x, y = _data(rng)
    w = rng.uniform(0.0, 0.25, size=(x.shape[0], K))
    for stat, name, kw in (
        (R.Gram(1.3), "G", {}),
        (R.Stats(1.3, K), "G", {}),
        (R.ClassGrams(1.3, K), "A", {}),
        (R.WeightedGrams(1.3, K, 0.25), "H", {"weights": w}),
    ):
        assert stat.symmetric == (name,)
        out, part = R.reduce(stat, x, y, leaf_rows=LEAF, return_partial=True, **kw)
        m = out[0] if isinstance(out, tuple) else out
        assert np.isfinite(m).all() and np.count_nonzero(m) == m.size  # every element written
        assert _bits(m) == _bits(np.swapaxes(m, -1, -2)), name
        hi, lo, _, _ = part.fixed[name]
        upper = np.triu(np.ones(hi.shape[-2:], bool), 1)
        assert not hi[..., upper].any() and not lo[..., upper].any()
        assert lo[..., ~upper].any()
        assert part.lower == (name,)


def test_leaf_outputs_reuse_buffers_and_leave_the_upper_triangle(rng):
    from dpfc_native import _cpu_stats

    x, y = _data(rng, n=301, d=7)
    full = ops.clipped_gram(x, 0.9)
    grams = ops.clipped_class_grams(x, y, K, 0.9)
    with _cpu_stats.leaf_outputs():
        g1 = ops.clipped_gram(x, 0.9)
        assert _bits(np.tril(g1)) == _bits(np.tril(full))
        assert not np.triu(g1, 1).any()
        with _cpu_stats.leaf_outputs():  # nested: the same buffers
            g2 = ops.clipped_gram(x[:100], 0.9)
        assert np.shares_memory(g1, g2)
        a = ops.clipped_class_grams(x, y, K, 0.9)
        assert _bits(np.tril(a)) == _bits(np.tril(grams))
    g3 = ops.clipped_gram(x, 0.9)  # outside: a fresh, full matrix again
    assert not np.shares_memory(g3, g1) and _bits(g3) == _bits(full)
    assert _cpu_stats._OUTPUTS.bufs is None


def test_gradient_scratch_reuse_keeps_the_bits(rng):
    # The gradient's (rows, K) logits and residuals live in per-thread scratch blocks,
    # computed in place: calls of other shapes in between (odd n, other K, both losses,
    # inside leaf_outputs or not) give the same bits, and results never share memory.
    from dpfc_native import _cpu_stats

    cases = []
    for n, d, k, loss in ((301, 7, 3, "sigmoid"), (4099, 7, 11, "softmax"), (5, 7, 1, "sigmoid")):
        x = rng.standard_normal((n, d)) * rng.uniform(0.1, 5.0, (n, 1))
        args = (x, rng.integers(0, k, n), rng.standard_normal((k, d)), rng.standard_normal(k))
        cases.append((args, loss, ops.clipped_linear_grad(*args, 0.7, loss=loss)))
    with _cpu_stats.leaf_outputs():
        got = [ops.clipped_linear_grad(*a, 0.7, loss=loss) for a, loss, _ in cases * 2]
    for (_, _, want), (g, nc) in zip(cases * 2, got):
        assert _bits(g) == _bits(want[0]) and nc == want[1]
        assert np.isfinite(g).all() and np.abs(g).min() > 0
    assert not any(
        np.shares_memory(got[i][0], got[j][0]) for i in range(len(got)) for j in range(i)
    )


def test_partials_pickle_with_packed_triangles(rng):
    import pickle

    x, y = _data(rng)
    for stat in (R.Gram(1.1), R.ClassGrams(1.1, K), R.Stats(1.1, K)):
        _, part = R.reduce(stat, x, y, leaf_rows=LEAF, return_partial=True)
        blob = pickle.dumps(part)
        back = pickle.loads(blob)
        assert back.key == part.key and back.ranges == part.ranges and back.lower == part.lower
        for name, (hi, lo, e, f) in part.fixed.items():
            bhi, blo, be, bf = back.fixed[name]
            assert (be, bf) == (e, f)
            assert np.array_equal(bhi, hi) and np.array_equal(blo, lo)
            assert bhi.dtype == np.int64 and bhi.flags.c_contiguous
        for name, a in part.ints.items():
            assert np.array_equal(back.ints[name], a)
        assert len(blob) < part.nbytes + 2048
    # d = 64: about half the limb bytes of the full matrix travel (2080 of 4096 entries).
    _, big = R.reduce(
        R.Gram(1.1), rng.standard_normal((300, 64)), leaf_rows=LEAF, return_partial=True
    )
    assert len(pickle.dumps(big)) < 0.53 * big.nbytes
    # Limbs above the diagonal of a symmetric statistic are a bug: never shipped silently.
    hi, lo, e, f = part.fixed["G"]
    bad = hi.copy()
    bad[0, -1] = 1
    broken = R.Partial(
        part.key, part.ranges, {**part.fixed, "G": (bad, lo, e, f)}, part.ints, part.lower
    )
    with pytest.raises(ValueError, match="above the diagonal"):
        pickle.dumps(broken)


def test_leaf_rows_beyond_the_data_keep_the_grid_of_the_longest_leaf(rng):
    """The grid is set by the longest leaf the layout holds: a leaf_rows larger than every
    shard (even 2^62 or 10^30) gives the bits of one leaf per shard, not a coarser grid."""
    x = (rng.standard_normal((1001, 5)) * 0.3).astype(np.float32)
    ref = _reference("gram", np.asarray(x, np.float64), None, 1.0)
    one_leaf = ops.clipped_gram(x, 1.0, leaf_rows=1001)
    np.testing.assert_allclose(one_leaf, ref, rtol=0, atol=_tol(1001, 1.0, 25))
    for m in (4096, 2**40, 2**62, 10**30):
        assert R.LeafLayout((1001,), m).fraction_bits == R.fraction_bits(1001)
        assert _bits(ops.clipped_gram(x, 1.0, leaf_rows=m)) == _bits(one_leaf), m
    lay = R.LeafLayout((300, 77), 2**40)
    assert lay.max_leaf_rows == 300 and lay.fraction_bits == R.fraction_bits(300)
    assert R.LeafLayout((300, 77), 64).fraction_bits == R.fraction_bits(64)


def test_statistic_and_source_arguments_checked(rng):
    x, y = _data(rng)
    for make in (
        lambda k: R.Stats(1.0, k),
        lambda k: R.ClassSums(1.0, k),
        lambda k: R.ClassGrams(1.0, k),
        lambda k: R.WeightedGrams(1.0, k),
    ):
        with pytest.raises(TypeError, match="num_(classes|weights)"):
            make(4.5)
        with pytest.raises(ValueError, match="num_(classes|weights)"):
            make(-1)
        assert make(np.int64(3)) == make(3)
    with pytest.raises(TypeError, match="x must hold float"):
        R.reduce(R.Gram(1.0), np.array([[16777217, 1], [2, 3]]))
    with pytest.raises(ValueError, match=r"weights must have one row per example \(1378\)"):
        R.reduce(R.WeightedGrams(1.0, 2), x, y, weights=np.ones((x.shape[0] + 5, 2)) * 0.1)


def test_preprocessing_errors_name_the_shard_and_its_row(tmp_path, rng):
    """A NaN met while a fit reads a shard: the message names the shard and the row in it,
    also when only Poisson-sampled rows are read."""
    from dpfc_native import _fitstats

    x, y = _data(rng)
    x[1000, 2] = np.nan  # row 1000 - 378 = 622 of the third shard
    sf = npy_shards(tmp_path, x, y, SHARDS, K, stem="s")
    src = R.TransformedSource(sf, _fitstats.RowTransform(1.0))
    with pytest.raises(ValueError, match=r"s2.features.npy: X has NaN or Inf at row 622"):
        R.reduce(R.Gram(1.0), src, leaf_rows=LEAF)
    with pytest.raises(ValueError, match=r"s2.features.npy: X has NaN or Inf at row 622"):
        R.reduce(R.Gram(1.0), src, leaf_rows=LEAF, sampling=R.PoissonSampling.new(0.9, seed=5))


@pytest.mark.parametrize(
    "call",
    [
        lambda x, y: ops.clipped_gram(x, 1e200, leaf_rows=8),  # C^2: OverflowError
        lambda x, y: ops.clipped_class_sums(x, y, 2, 1e-300, leaf_rows=8),  # 2^(F-E) overflowed
        lambda x, y: ops.clipped_weighted_grams(
            x, np.ones((x.shape[0], 2)), 1.0, leaf_rows=4, weight_bound=1e-300
        ),
        lambda x, y: R.reduce(R.Gram(1e-140), R.ArraySource(x), leaf_rows=8),
    ],
)
def test_leaf_reduction_bounds_out_of_grid_range_are_named(call):
    """Per-row bounds the fixed grid cannot hold raise one ValueError naming the
    statistic and clip_norm (an OverflowError, or "per-row bound must be finite" with no
    name, came from deep inside)."""
    x = np.random.default_rng(3).standard_normal((10, 3))
    y = np.arange(10) % 2
    with pytest.raises(ValueError, match="per-row bound .*clip_norm"):
        call(x, y)


def test_statistic_parameters_are_real_numbers():
    for bad in (True, "a", None):
        with pytest.raises(TypeError, match="clip_norm"):
            R.Gram(bad)
    with pytest.raises(ValueError, match="clip_norm"):
        R.Gram(-1.0)


def test_blas_limit_is_counted_across_threads(monkeypatch):
    """Two leaf reductions on two Python threads: the process-wide BLAS limit is counted,
    so the first to finish does not restore the thread count while the other still
    computes leaves (that changed gradient-leaf bits), and the last one out restores the
    count the process had (it was left at one thread). Interleaved by events: A enters,
    B enters, A leaves, B checks, B leaves; the limiter is recorded, not applied."""
    import threading

    import threadpoolctl

    log = []

    class Limiter:
        def __init__(self, limits, user_api):
            assert (limits, user_api) == (1, "blas")
            log.append("set 1")

        def restore_original_limits(self):
            log.append("restore")

        def __enter__(self):  # threadpoolctl's own use as a context manager
            return self

        def __exit__(self, *exc):
            self.restore_original_limits()

    monkeypatch.setattr(threadpoolctl, "threadpool_limits", Limiter)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with R.one_blas_thread():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second():
        a_in.wait(10)
        with R.one_blas_thread():
            b_in.set()
            a_out.wait(10)
            seen["inside"] = list(log)

    ts = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert seen["inside"] == ["set 1"]  # A left; B still limited
    assert log == ["set 1", "restore"]
    # Nested blocks on one thread: one limit, one restore.
    log.clear()
    with R.one_blas_thread(), R.one_blas_thread():
        pass
    assert log == ["set 1", "restore"]


@pytest.mark.parametrize("env", ["abc", "0", "-2", "1.5", "\u00b2"])
def test_reduce_threads_environment_is_checked_by_name(monkeypatch, env):
    monkeypatch.setenv("DPFC_REDUCE_THREADS", env)
    x = np.random.default_rng(0).standard_normal((20, 3))
    with pytest.raises(ValueError, match="DPFC_REDUCE_THREADS"):
        ops.clipped_gram(x, 1.0, leaf_rows=8)
    monkeypatch.setenv("DPFC_REDUCE_THREADS", "3")
    assert np.array_equal(
        ops.clipped_gram(x, 1.0, leaf_rows=8),
        R.reduce(R.Gram(1.0), R.ArraySource(x), leaf_rows=8, threads=1),
    )
    with pytest.raises(TypeError, match="x must be an array"):
        ops.clipped_gram(None, 1.0)


class _DeviceArray:
    """Stands in for a CuPy array on a CPU machine: it lives "on a GPU"
    (``__cuda_array_interface__``) and, like CuPy, refuses an implicit conversion to NumPy."""

    def __init__(self, a):
        self.a = np.asarray(a)
        self.shape, self.dtype, self.ndim = self.a.shape, self.a.dtype, self.a.ndim

    @property
    def __cuda_array_interface__(self):  # only its presence is read
        return {"shape": self.shape, "typestr": self.dtype.str, "version": 3}

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed")


def test_gpu_leaves_bring_every_output_to_the_host(monkeypatch):
    """A GPU leaf's statistic comes back as device arrays: every output (the counts of
    `Stats` included, which were converted with np.asarray and raised on CuPy) is copied
    to the host before it goes on the grid. Checked on the CPU with a stand-in device
    array and the real CPU op inside it."""

    class FakeCupy:
        @staticmethod
        def asnumpy(v):
            return v.a

    real = R._leaf_ops()

    class DeviceOps:
        @staticmethod
        def clipped_stats(x, y, k, c):
            return tuple(_DeviceArray(v) for v in real.clipped_stats(x, y, k, c))

    rng = np.random.default_rng(61)
    x, y = rng.standard_normal((37, 5)), rng.integers(0, 3, 37)
    expected = R.reduce(R.Stats(1.0, 3), R.ArraySource(x, y, 3), leaf_rows=8, threads=1)
    monkeypatch.setattr(R, "_leaf_ops", lambda: DeviceOps)
    monkeypatch.setattr(ops, "_cupy", lambda: FakeCupy)
    stat = R.Stats(1.0, 3)
    leaf = stat.leaf(x, y, None)
    for key in ("G", "B", "counts"):
        assert isinstance(R._host(leaf[key]), np.ndarray), key
    np.testing.assert_array_equal(R._host(leaf["counts"]), np.bincount(y, minlength=3))
    assert R._host(leaf["counts"]).dtype == np.int64
    # Through the whole reduction (grid, merge, finish): the same bits as host leaves.
    got = R.reduce(R.Stats(1.0, 3), R.ArraySource(x, y, 3), leaf_rows=8, threads=1)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_float32_gpu_gradients_take_the_float32_clip_floor():
    """The GPU rounds float32 rows' gradient products to float32: a gradient clip norm in
    float32's subnormal range (about 1e-40) rounds above itself there, so such rows take
    float32's floor; the CPU widens to float64 and keeps float64's."""
    x32, x64 = np.ones((2, 1), np.float32), np.ones((2, 1))
    assert ops._grad_floor(_DeviceArray(x32)) == "float32"
    assert ops._grad_floor(_DeviceArray(x64)) == "float64"
    assert ops._grad_floor(x32) == "float64"
    with pytest.raises(ValueError, match="clip_norm must be at least"):
        ops._check_clip_norm(1.0000026e-40, _DeviceArray(x32), ops._grad_floor(_DeviceArray(x32)))
    # On the CPU the same float32 rows keep the float64 floor: a clip norm of 1e-40 is fine.
    g, _ = ops.clipped_linear_grad(x32, np.zeros(2, np.int64), np.zeros((1, 1)), 0.0, 1e-40)
    assert 0 < float(np.abs(g).max()) <= 2e-40


def _blas_threads() -> set:
    from threadpoolctl import threadpool_info

    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def test_one_blas_thread_holds_on_every_python_thread():
    """With the real threadpoolctl: the limit holds inside a block entered on any Python
    thread, and the last thread out restores the count. threadpoolctl >= 3.8 lets only one
    "controlling" thread change OpenBLAS's count: after a block on the main thread, a
    block on another thread ran on every BLAS thread (a gradient leaf of 1807 x 512 rows
    came out with other bits), and a restore from a second thread was ignored."""
    import threading

    import scipy.linalg.blas  # noqa: F401 - the BLAS the leaves use, loaded first
    import threadpoolctl
    from threadpoolctl import threadpool_limits

    # threadpoolctl >= 3.8: one controlling thread, so outside changes can be kept out.
    gated = hasattr(getattr(threadpoolctl, "OpenBLASController", None), "clear_controlling_thread")
    with threadpool_limits(limits=2, user_api="blas"):
        if _blas_threads() != {2}:
            pytest.skip("this BLAS cannot be set to two threads here")
        with R.one_blas_thread():  # the main thread first
            assert _blas_threads() == {1}
            if gated:  # another thread's threadpool_limits cannot change it under the leaves
                t = threading.Thread(target=lambda: threadpool_limits(limits=2, user_api="blas"))
                t.start()
                t.join(20)
                assert _blas_threads() == {1}
        assert _blas_threads() == {2}
        seen = {}

        def alone():
            with R.one_blas_thread():
                seen["alone"] = _blas_threads()

        t = threading.Thread(target=alone)
        t.start()
        t.join(20)
        assert seen["alone"] == {1} and _blas_threads() == {2}
        # Interleaved: main enters, a thread enters, main leaves (the thread still limited),
        # the thread leaves last and restores.
        entered, main_left = threading.Event(), threading.Event()

        def second():
            with R.one_blas_thread():
                entered.set()
                main_left.wait(20)
                seen["after main left"] = _blas_threads()

        t = threading.Thread(target=second)
        with R.one_blas_thread():
            t.start()
            entered.wait(20)
        main_left.set()
        t.join(20)
        assert seen["after main left"] == {1}
        assert _blas_threads() == {2}


def test_leaf_results_do_not_depend_on_the_calling_thread():
    """The same leaf reduction on the main thread and on another thread: the same bits
    (the other thread's leaves ran on two BLAS threads: 1.8e-15 apart)."""
    import threading

    rng = np.random.default_rng(71)
    n, d, k = 9999, 512, 3
    x = rng.standard_normal((n, d))
    y = rng.integers(0, k, n)
    w = rng.standard_normal((k, d)) * 0.01

    def grad():
        g, _ = ops.clipped_linear_grad(x, y, w, 0.0, 1.0, feature_clip=1.0, leaf_rows=4096)
        return g

    main = grad()
    out = {}
    t = threading.Thread(target=lambda: out.update(g=grad()))
    t.start()
    t.join(120)
    np.testing.assert_array_equal(out["g"], main)


def test_no_leaf_runs_on_two_blas_threads_while_another_thread_sets_limits():
    """Another Python thread using threadpool_limits while reductions run (as scikit-learn
    does): the block cleared threadpoolctl's controlling thread and then set its limit,
    and a thread that took control in between made the limit do nothing; whole
    reductions then computed their leaves on two BLAS threads (about 1 in 6 here)."""
    import threading

    import threadpoolctl
    from threadpoolctl import threadpool_limits

    if not hasattr(getattr(threadpoolctl, "OpenBLASController", None), "_SHARED_STATE"):
        pytest.skip("threadpoolctl without a controlling thread")
    with threadpool_limits(limits=2, user_api="blas"):
        if _blas_threads() != {2}:
            pytest.skip("this BLAS cannot be set to two threads here")
    seen = []

    class Spy(R.Gram):
        def leaf(self, x, y, w):
            seen.append(frozenset(_blas_threads()))
            return super().leaf(x, y, w)

    rng = np.random.default_rng(31)
    x, y = rng.standard_normal((8000, 8)), rng.integers(0, 3, 8000)
    stop = threading.Event()

    def other():
        a = rng.standard_normal((200, 200))
        while not stop.is_set():
            with threadpool_limits(limits=2, user_api="blas"):
                a @ a

    t = threading.Thread(target=other)
    t.start()
    try:
        for _ in range(20):
            R.reduce(Spy(1.0), x, y, threads=2, leaf_rows=256)
    finally:
        stop.set()
        t.join(20)
    assert len(seen) == 20 * 32 and set(seen) == {frozenset({1})}, set(seen)
    assert _blas_threads() == {2} or len(_blas_threads()) == 1  # restored


def test_a_failing_range_stops_the_others_at_their_next_leaf():
    """One leaf range raising (or Ctrl-C) waited for every other range to finish its
    whole pass before the error surfaced; now they stop at their next leaf."""
    import threading
    import time

    rng = np.random.default_rng(32)
    x, y = rng.standard_normal((64 * 40, 4)), rng.integers(0, 3, 64 * 40)
    computed = []
    lock = threading.Lock()
    other_started = threading.Event()

    class Failing(R.Gram):
        def leaf(self, xl, yl, w):
            with lock:
                computed.append(threading.get_ident())
            if float(xl[0, 0]) == float(x[0, 0]):  # the first leaf of the first range
                other_started.wait(20)  # the other range is running (not just queued)
                raise ValueError("leaf 0 is bad")
            other_started.set()
            time.sleep(0.02)
            return super().leaf(xl, yl, w)

    with pytest.raises(ValueError, match="leaf 0 is bad"):
        R.reduce(Failing(1.0), x, y, threads=2, leaf_rows=64)
    # Before: all 40 leaves were computed (20 after the failure in the other range).
    assert len(computed) < 20, len(computed)
    assert R._BLAS_USERS == 0 and not R._BLAS_LOCK.locked()
    # The exception is the first range's, not the cancellation of the others.
    assert R.reduce(R.Gram(1.0), x, y, threads=2, leaf_rows=64).shape == (4, 4)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_inside_blas_blocks_computes_and_restores_blas():
    """A child forked while other threads were inside one_blas_thread (and one held its
    lock) hung on that lock on its first fit, or stayed on one BLAS thread for good."""
    import threading

    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(33)
    x, y = rng.standard_normal((300, 5)), rng.integers(0, 3, 300)
    want = R.reduce(R.Gram(1.0), x, y, threads=1, leaf_rows=64)
    before = _blas_threads()
    inside, release = threading.Event(), threading.Event()

    def hold_block():
        with R.one_blas_thread():
            inside.set()
            release.wait(30)

    t = threading.Thread(target=hold_block)
    t.start()
    inside.wait(30)
    holder = threading.Thread(target=lambda: (R._BLAS_LOCK.acquire(), release.wait(30)))
    holder.start()
    for _ in range(200):
        if R._BLAS_LOCK.locked():
            break
        time.sleep(0.01)
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, an exit code per outcome
        code = 1
        try:
            signal.alarm(30)  # a hang ends as SIGALRM, not a stuck test run
            got = R.reduce(R.Gram(1.0), x, y, threads=1, leaf_rows=64)
            ok = np.array_equal(got, want) and R._BLAS_USERS == 0
            code = 0 if ok and _blas_threads() == before else 3
        finally:
            os._exit(code)
    release.set()
    R._BLAS_LOCK.release()
    holder.join(30)
    t.join(30)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    with threadpool_limits(limits=None):
        pass
    assert R._BLAS_USERS == 0 and _blas_threads() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_inside_its_own_blas_block_keeps_it_balanced():
    """Forked by the thread inside a block: the child's count was reset to 0, and the
    block's end took it to -1, after which no block set the limit again."""
    rng = np.random.default_rng(34)
    x, y = rng.standard_normal((300, 5)), rng.integers(0, 3, 300)
    want = R.reduce(R.Gram(1.0), x, y, threads=1, leaf_rows=64)
    before = _blas_threads()
    with R.one_blas_thread():
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.alarm(30)
                code = 0 if R._BLAS_USERS == 1 and _blas_threads() == {1} else 3
            finally:
                if code:
                    os._exit(code)
        if pid != 0:
            _, status = os.waitpid(pid, 0)
    if pid == 0:  # the child, out of the block it inherited
        code = 4
        try:
            ok = R._BLAS_USERS == 0 and _blas_threads() == before
            got = R.reduce(R.Gram(1.0), x, y, threads=2, leaf_rows=64)
            code = 0 if ok and np.array_equal(got, want) and R._BLAS_USERS == 0 else 5
        finally:
            os._exit(code)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_threadpoolctl_is_locked_does_not_hang():
    """Another thread inside threadpoolctl's lock (taking control of OpenBLAS) at the
    fork, with no limit set: the child's first block waited on that lock forever."""
    import threading

    state = R._blas_shared_state()
    if state is None:
        pytest.skip("threadpoolctl without a controlling-thread record")
    held, release = threading.Event(), threading.Event()

    def holder():
        with state.lock:
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(30)
    assert R._BLAS_LIMIT is None
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(30)
            with R.one_blas_thread():
                code = 0 if _blas_threads() == {1} else 3
        finally:
            os._exit(code)
    release.set()
    t.join(30)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
