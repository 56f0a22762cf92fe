"""What the test modules share: float64 references written independently of
dpfc_native.ops, random and adversarial data, and the checks made on every backend.

The op tests run one body on NumPy and (where a device, a CUDA build and CuPy are
present) on CuPy: :func:`xp_cases` builds their parameters, :func:`to_host` brings any
result to NumPy, and every result is compared with the float64 reference here (never with
the other backend). Nothing here imports a test module.
"""

from __future__ import annotations

import collections
import math
import os
from fractions import Fraction

import numpy as np
import pytest
import scipy.linalg
import scipy.linalg.lapack as lapack
import scipy.stats

from dpfc_native import _core, mechanisms, models, ops
from dpfc_native.models import (
    DPFCClassifier,
    DPLeastSquaresClassifier,
    DPNewtonClassifier,
    DPSGDClassifier,
)

MARGIN = float(_core.clip_margin)  # 1 - 2^-20
EPS32 = 2.0**-24
F32_BLOCK = 4096  # rows summed in float32 per block by accumulate="float32"
EPS = {t: np.finfo(t).eps for t in (np.float64, np.float32)}
EPS.update({np.dtype(t): e for t, e in list(EPS.items())})

# Rows, examples and normals tried by the adversarial and statistical tests; printed in
# pytest's terminal summary (tests/conftest.py), whatever order the tests ran in.
COUNTS: collections.Counter = collections.Counter()
# The audit's lower bounds, (mechanism, epsilon, planted bug, backend) -> eps_lower, printed
# in the same summary.
AUDIT_RESULTS: dict = {}


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------


def xp_cases(cpu, gpu, names: str | None = None):
    """pytest parameters ``(backend, *case)``: the ``cpu`` cases on "numpy", the ``gpu``
    cases on "cupy" (marked ``gpu``: selected by ``-m gpu``, skipped without a device).
    Use with ``indirect=["xp"]``. A case is a tuple (or one value)."""
    out = []
    for backend, cases in (("numpy", cpu), ("cupy", gpu)):
        marks = [pytest.mark.gpu] if backend == "cupy" else []
        for case in cases:
            case = case if isinstance(case, tuple) else (case,)
            out.append(pytest.param(backend, *case, marks=marks))
    return out


def backend_name(xp) -> str:
    return "numpy" if xp is np else "cupy"


def to_host(a) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array (or scalar)."""
    if isinstance(a, np.ndarray):
        return a
    get = getattr(a, "get", None)
    return np.asarray(get() if get is not None and not np.isscalar(a) else a)


def assert_all_written(a, what: str) -> None:
    """Outputs are poisoned (NaN) before the ops write them (the ``poisoned`` fixture)."""
    assert np.isfinite(to_host(a)).all(), f"{what}: unwritten (NaN-poisoned) or non-finite elements"


def rel_err(got, ref: np.ndarray, scale: np.ndarray) -> float:
    """||got - ref||_F / ||scale||_F: errors relative to the matching sum of absolute
    products, so cancellation can neither hide nor fake an error."""
    den = float(np.linalg.norm(scale))
    return float(np.linalg.norm(to_host(got) - ref)) / (den if den > 0 else 1.0)


# --------------------------------------------------------------------------------------
# Features, labels and the clipping reference
# --------------------------------------------------------------------------------------


def draw_features(rng, n: int, d: int, clip_norm: float, dtype="float64") -> np.ndarray:
    """Rows of random direction with norms spread over [0.05 C, 4 C] (about half clipped),
    stored in dtype."""
    x = rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x *= clip_norm * rng.uniform(0.05, 4.0, size=(n, 1))
    return x.astype(dtype)


def draw_labels(rng, n: int, k: int) -> np.ndarray:
    """Labels in [0, k), leaving the last class empty when k > 2."""
    used = max(1, k - 1) if k > 2 else k
    return rng.integers(0, used, size=n).astype(np.int64)


def ref_norms(x64: np.ndarray) -> np.ndarray:
    """Row norms in float64, rescaled where the plain sum of squares overflows."""
    sq = np.einsum("ij,ij->i", x64, x64)
    norms = np.sqrt(sq)
    bad = ~np.isfinite(norms)
    if bad.any():
        amax = np.abs(x64[bad]).max(axis=1)
        sc = x64[bad] / amax[:, None]
        norms[bad] = amax * np.sqrt(np.einsum("ij,ij->i", sc, sc))
    return norms


def ref_scale(x64: np.ndarray, clip_norm: float) -> np.ndarray:
    norms = ref_norms(x64)
    target = clip_norm * MARGIN
    out = np.ones_like(norms)
    over = norms > target
    out[over] = target / norms[over]
    return out


def reference_clip64(x, clip_norm: float) -> tuple[np.ndarray, np.ndarray]:
    """Float64 clipped rows and scales."""
    x64 = np.asarray(to_host(x), dtype=np.float64)
    scale = ref_scale(x64, clip_norm)
    return x64 * scale[:, None], scale


def ref_gram(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(xb^T xb, |xb|^T |xb|)."""
    return xb.T @ xb, np.abs(xb).T @ np.abs(xb)


def ref_class_sums(xb: np.ndarray, labels: np.ndarray, k: int):
    onehot = np.zeros((xb.shape[0], k))
    onehot[np.arange(xb.shape[0]), labels] = 1.0
    return onehot.T @ xb, onehot.T @ np.abs(xb)


def check_gram(got, ref: np.ndarray, absref: np.ndarray, mode: str) -> None:
    """A clipped Gram against its float64 reference, for accumulation ``mode``.

    float64: 1e-12 relative to |Xbar|^T |Xbar| (expected ~1e-14). float32: 1e-5, plus the
    documented elementwise worst case (4096 + 8) 2^-24 |Xbar|^T |Xbar|. tf32 / bf16: the
    documented worst case (2u + u^2 + (4096 + 8) 2^-24) |Xbar|^T |Xbar|, u = 2^-11 / 2^-8.
    """
    got = to_host(got)
    d = ref.shape[0]
    assert got.shape == (d, d) and got.dtype == np.float64
    assert_all_written(got, "G")
    np.testing.assert_array_equal(got, got.T)  # mirrored, not recomputed
    err = rel_err(got, ref, absref)
    if mode == "float64":
        assert err <= 1e-12, f"float64 relative error {err:.3e}"
        return
    u = {"float32": 0.0, "tf32": 2.0**-11, "bf16": 2.0**-8}[mode]
    coef = 2 * u + u * u + (F32_BLOCK + 8) * EPS32
    assert err <= (1e-5 if mode == "float32" else coef), f"{mode} relative error {err:.3e}"
    worst = float(np.max(np.abs(got - ref) / (coef * absref + 1e-300)))
    assert worst <= 1.0, f"{mode} elementwise error {worst:.3f} x the documented bound"


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even) as uint16."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return b.astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def ref_linear_grad(x64, labels, w64, b64, clip_norm, loss, feature_clip):
    """(sum of clipped per-example gradients, the same with absolute values, rows clipped,
    per-example norm / clip target). ||r_i x_i^T||_F = ||r_i|| ||x_i||."""
    if feature_clip is not None:
        x64 = reference_clip64(x64, feature_clip)[0]
    z = x64 @ w64.T + b64
    k = w64.shape[0]
    rows = np.arange(x64.shape[0])
    if loss == "sigmoid":
        r = 1.0 / (1.0 + np.exp(-z))
        r[rows, labels] -= 1.0
        r /= k
    else:
        z = z - z.max(axis=1, keepdims=True)
        r = np.exp(z)
        r /= r.sum(axis=1, keepdims=True)
        r[rows, labels] -= 1.0
    gnorm = np.linalg.norm(r, axis=1) * ref_norms(x64)
    target = clip_norm * MARGIN
    c = np.where(gnorm <= target, 1.0, target / np.where(gnorm > 0, gnorm, 1.0))
    rc = r * c[:, None]
    return rc.T @ x64, np.abs(rc).T @ np.abs(x64), int(np.count_nonzero(c < 1.0)), gnorm / target


# --------------------------------------------------------------------------------------
# Cholesky and SPD solves
# --------------------------------------------------------------------------------------


def spd_batch(xp, rng, batch: int, d: int, dtype, ridge: float = 0.05):
    """Fresh random SPD matrices X^T X / n + ridge I on xp (float64, then cast)."""
    n = d + 8
    x = xp.asarray(rng.standard_normal((batch, n, d)))
    a = xp.matmul(xp.swapaxes(x, -1, -2), x) / n + ridge * xp.eye(d)
    return a.astype(dtype)


def sym_from_lower(a: np.ndarray) -> np.ndarray:
    return np.tril(a) + np.swapaxes(np.tril(a, -1), -1, -2)


def recon_err(xp, L, a) -> np.ndarray:
    """||L L^T - A|| / ||A|| per matrix, in float64 on xp (A from its lower part)."""
    L64 = xp.tril(xp.asarray(L, dtype=xp.float64))
    a64 = xp.asarray(a, dtype=xp.float64)
    a64 = xp.tril(a64) + xp.swapaxes(xp.tril(a64, -1), -1, -2)
    r = L64 @ xp.swapaxes(L64, -1, -2) - a64
    num = xp.linalg.norm(r.reshape(r.shape[0], -1), axis=1)
    den = xp.linalg.norm(a64.reshape(a64.shape[0], -1), axis=1)
    return to_host(num / den)


def lapack_potrf(a: np.ndarray):
    """LAPACK potrf on every matrix of a host batch: (L, info) with L NaN where info != 0."""
    potrf = lapack.dpotrf if a.dtype == np.float64 else lapack.spotrf
    L = np.empty_like(a)
    info = np.zeros(a.shape[0], dtype=np.int32)
    for i in range(a.shape[0]):
        li, code = potrf(a[i], lower=1, clean=1, overwrite_a=0)
        # Some LAPACKs (OpenBLAS in scipy's wheels) let a NaN pivot through; the defined
        # rule (ops.cholesky) is the first pivot that is not > 0, NaN included.
        valid = np.diagonal(li)[: code - 1 if code > 0 else a.shape[-1]]
        if not (valid > 0).all():
            code = int(np.argmin(valid > 0)) + 1
        info[i] = code
        L[i] = li if code == 0 else np.nan
    return L, info


def check_factor_against_lapack(xp, a_dev, L_dev, info_dev) -> None:
    """info as LAPACK's (all 0), zeros above the diagonal, positive diagonal, and the
    reconstruction error within 8x LAPACK's own in the same precision."""
    a, L, info = to_host(a_dev), to_host(L_dev), to_host(info_dev)
    L_ref, info_ref = lapack_potrf(a)
    np.testing.assert_array_equal(info, info_ref)
    assert (info == 0).all()
    assert np.isfinite(L).all()
    assert (np.triu(L, 1) == 0).all(), "zeros strictly above the diagonal"
    assert (np.diagonal(L, axis1=-2, axis2=-1) > 0).all()
    eps = EPS[a.dtype]
    err = recon_err(xp, L_dev, a_dev)
    err_ref = recon_err(xp, xp.asarray(L_ref), a_dev)
    bound = 8.0 * np.maximum(err_ref, 4.0 * eps)
    assert (err <= bound).all(), f"reconstruction error {err} vs LAPACK {err_ref}"
    # The factor itself (well conditioned inputs: ridge 0.05).
    tol = 1e-9 if a.dtype == np.float64 else 5e-3
    scale = np.abs(L_ref).max(axis=(-2, -1), keepdims=True)
    assert (np.abs(L - L_ref) <= tol * scale).all()


def fail_at(a_host: np.ndarray, k: int, delta: float = 0.5) -> np.ndarray:
    """Make the pivot of column k (0-based) equal to -delta x its old value: info = k + 1."""
    a = a_host.copy()
    L0 = np.linalg.cholesky(a.astype(np.float64))
    a[k, k] -= (1.0 + delta) * L0[k, k] ** 2
    return a


def clear_pivots(a: np.ndarray, info: int) -> bool:
    """True if the pivots up to LAPACK's failing one are clearly away from zero, so that
    rounding (a different summation order) cannot change info."""
    k = info - 1
    a = sym_from_lower(a.astype(np.float64))
    scale = np.abs(a).max()
    if k < 0:
        return np.linalg.eigvalsh(a).min() > 1e-6 * scale
    if k > 0:
        try:
            Lk = np.linalg.cholesky(a[:k, :k])
        except np.linalg.LinAlgError:
            return False
        if (np.diag(Lk) ** 2).min() < 1e-6 * scale:
            return False
        row = scipy.linalg.solve_triangular(Lk, a[k, :k], lower=True)
        piv = a[k, k] - row @ row
    else:
        piv = a[0, 0]
    return piv < -1e-6 * scale


def solve_ref(L_h: np.ndarray, b_h: np.ndarray) -> np.ndarray:
    """float64 reference of L L^T x = b per batch entry (L, b broadcast already)."""
    out = np.empty(b_h.shape, dtype=np.float64)
    for i in range(b_h.shape[0]):
        out[i] = scipy.linalg.cho_solve(
            (L_h[i].astype(np.float64), True), b_h[i].astype(np.float64)
        )
    return out


def lapack_solve_same_precision(L_h: np.ndarray, b_h: np.ndarray, dtype) -> np.ndarray:
    potrs = lapack.dpotrs if np.dtype(dtype) == np.float64 else lapack.spotrs
    out = np.empty(b_h.shape, dtype=dtype)
    for i in range(b_h.shape[0]):
        out[i], _ = potrs(L_h[i].astype(dtype), b_h[i].astype(dtype), lower=1)
    return out


def rel_rows(x, ref: np.ndarray) -> np.ndarray:
    """Relative Frobenius error per batch entry."""
    x = np.asarray(to_host(x), dtype=np.float64)
    return np.linalg.norm((x - ref).reshape(x.shape[0], -1), axis=1) / np.linalg.norm(
        ref.reshape(ref.shape[0], -1), axis=1
    )


def spd(rng, d: int, n: int | None = None, dtype=np.float64) -> np.ndarray:
    x = rng.standard_normal((n or 2 * d + 3, d))
    return (x.T @ x / x.shape[0] + 0.1 * np.eye(d)).astype(dtype)


def noisy_gram(rng, d: int, noise: float, dtype=np.float64) -> np.ndarray:
    """A Gram matrix plus symmetric noise: typically indefinite for noise >~ its spectrum."""
    x = rng.standard_normal((d // 2 + 1, d)) / np.sqrt(d)
    g = x.T @ x
    z = rng.standard_normal((d, d)) * noise
    return (g + (z + z.T) / 2).astype(dtype)


# --------------------------------------------------------------------------------------
# Exact norms and adversarial rows (clipping soundness on the stored floats)
# --------------------------------------------------------------------------------------

# Clip norms tried by the adversarial suite. The extremes have their own tests in
# test_privacy_clipping.py: clip norms below sqrt(d) 2^-128 (float32 output) or
# sqrt(d) 2^-1052 (float64) are refused (one rounding to the subnormal grid would leave
# the 2^-20 margin), and a subnormal clip factor C'/||x|| is stepped down one unit.
CLIP_NORMS = [1.0, 0.1, 1e-3, 3.0, 1e3, 1e-5, 1e30]


def exact_sq_norm(v) -> Fraction:
    """The exact sum of squares of the float entries of v (any shape), as a Fraction."""
    a = np.asarray(v, dtype=np.float64).ravel()  # float32 -> float64 is exact
    assert np.isfinite(a).all(), "a clipped value is not finite"
    a = a[a != 0]
    if a.size == 0:
        return Fraction(0)
    mant, exp = np.frexp(a)  # a = mant * 2**exp, 0.5 <= |mant| < 1 (denormals included)
    m = (mant * 2.0**53).astype(np.int64)  # exact: 53 significant bits
    e = exp.astype(np.int64) - 53
    emin = int(e.min())
    total = 0
    for mi, ei in zip(m.tolist(), e.tolist()):
        total += (mi * mi) << (2 * (ei - emin))
    return Fraction(total) * Fraction(2) ** (2 * emin)


def _float_decides(v: np.ndarray, bound_sq: Fraction) -> bool | None:
    """A rigorous float64 shortcut: True/False when a float sum of squares with its
    worst-case rounding bound decides ``||v||^2 <= bound_sq``; None to fall back to exact."""
    a = np.abs(np.asarray(v, dtype=np.float64).ravel())
    nz = a[a != 0]
    if nz.size == 0:
        return True
    if not nz.max() < 2.0**500:
        return None
    if not (Fraction(2.0**-900) < bound_sq < Fraction(2.0**1000)):
        return None
    big = nz[nz >= 2.0**-500]  # squares of these are normal floats
    small_bound = (nz.size - big.size) * 2.0**-1000  # each tiny square is < 2^-1000
    s = float(np.dot(big, big))
    gamma = 2 * (nz.size + 2) * 2.0**-53
    b = float(bound_sq)
    if s * (1 + gamma) + small_bound < b * (1 - 2.0**-50):
        return True
    if s * (1 - gamma) > b * (1 + 2.0**-50):
        return False
    return None


def assert_norm_le(v, bound_sq: Fraction, what: str) -> None:
    """||v||_F^2 <= bound_sq exactly, on the stored floats (v: NumPy or CuPy)."""
    v = to_host(v)
    assert np.isfinite(np.asarray(v, dtype=np.float64)).all(), f"{what}: not finite"
    if _float_decides(v, bound_sq):
        return
    s = exact_sq_norm(v)
    assert s <= bound_sq, f"{what}: exact squared norm {float(s)!r} > bound {float(bound_sq)!r}"


def _nudge_to_float_norm(row: np.ndarray, c: float) -> np.ndarray:
    """Adjust one entry by ulps until the float64 norm of the row (as computed by
    np.linalg.norm) equals c, when reachable; returns the row either way."""
    row = row.copy()
    j = int(np.argmax(np.abs(row)))
    for _ in range(64):
        nrm = float(np.linalg.norm(row.astype(np.float64)))
        if nrm == c:
            break
        toward = np.inf if nrm < c else -np.inf
        row[j] = np.nextafter(row[j], row.dtype.type(toward if row[j] > 0 else -toward))
    return row


def adversarial_rows(dtype, c: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Rows (1-D arrays of dtype) chosen to break a clip at norm c."""
    dt = np.dtype(dtype)
    fi = np.finfo(dt)
    big, tiny = dt.type(fi.max), dt.type(fi.smallest_subnormal)
    rows: list[np.ndarray] = []

    def add(r):
        r = np.asarray(r, dtype=dt)
        if np.isfinite(r).all():
            rows.append(r)

    # All-zero rows.
    for d in (1, 3, 64):
        add(np.zeros(d))
    # Entries at and near the maximum, with mixed signs, alone or with tiny entries.
    for d in (1, 2, 7, 64):
        add(np.full(d, big))
        add(np.where(np.arange(d) % 2, big, -big))
        add(np.full(d, big / dt.type(3)))
        r = np.full(d, tiny)
        r[0] = big
        add(r)
    # Denormals: alone, many of them, mixed with normal entries.
    for d in (1, 5, 64):
        add(np.full(d, tiny))
        add(tiny * rng.integers(1, 1 << 20, size=d))
        r = tiny * rng.integers(1, 1000, size=d)
        r[0] = dt.type(c)
        add(r)
        add(np.full(d, fi.tiny))  # smallest normal
    # Rows whose norm is exactly C, or whose float norm is C, or sits at the clip target.
    for d in (1, 2, 4, 16, 33):
        e = np.zeros(d)
        e[d // 2] = c
        add(e)  # exactly C when C is representable in dtype; else the nearest float
        if d == 4:
            add(np.full(4, c / 2))  # exactly C for powers of two (C/2 * 2)
        direction = rng.standard_normal(d)
        direction /= np.linalg.norm(direction)
        add(_nudge_to_float_norm((direction * c).astype(dt), c))
        for factor in (MARGIN, 1.0):
            target = c * factor
            for v in (target, np.nextafter(target, np.inf), np.nextafter(target, 0)):
                add(direction * v)
    # Just above C: relative excess 2^-k for k = 1..55.
    direction = rng.standard_normal(8)
    direction /= np.linalg.norm(direction)
    for k in range(1, 56):
        add(direction * (c * (1.0 + 2.0**-k)))
    # Mixed magnitudes over the whole exponent range of the dtype.
    lo, hi = (-320, 306) if dt == np.float64 else (-44, 36)
    for _ in range(120):
        d = int(rng.integers(1, 65))
        mags = 10.0 ** rng.uniform(lo, hi, size=d)
        add(rng.choice([-1.0, 1.0], size=d) * mags)
    # Random rows at scales around C.
    for scale in (1e-6, 0.5, 0.999, 1.001, 2.0, 1e6):
        for d in (3, 50):
            add(rng.standard_normal(d) * (c * scale / np.sqrt(d)))
    return rows


def group_by_length(rows) -> dict[int, np.ndarray]:
    groups: dict[int, list] = collections.defaultdict(list)
    for r in rows:
        groups[r.shape[0]].append(r)
    return {d: np.stack(rs) for d, rs in groups.items()}


def overflow_logit_rows():
    """(x, labels, w): row 0 of 1e308 overflows the logits (inf - inf = NaN on blocked
    BLAS); the other two rows are ordinary. The clipped sum must stay finite, <= 3 C_g."""
    d = 64
    x = np.ones((3, d))
    x[0] = 1e308
    w = np.full((2, d), 2.0)
    w[0, 1::4] = -2.0
    w[0, 2::4] = -2.0
    return x, np.array([0, 1, 0]), w


def confident_rows(scales=(1e150, 1e300)):
    """Rows the model is sure of: the true label's logit +gap, the others -gap, so every
    residual entry is ~e^-gap (or exactly 0). For gap ~ 375 their squares underflow to 0,
    and a naive sqrt(r . r) ||x|| = 0 would pass a huge ||x|| unclipped (norm ~1e137).
    Yields (x (1, 5), w (k, 5), label, description)."""
    for gap in (360.0, 375.0, 380.0, 700.0):
        for scale in scales:
            for k in (2, 3, 7):
                x = np.zeros((1, 5))
                x[0, 0] = scale
                x[0, 3] = -scale / 3
                w = np.full((k, 5), -gap / scale)
                w[:, 3] = 0.0
                w[1] = gap / scale
                yield x, w, 1, f"gap={gap} scale={scale} k={k}"


# --------------------------------------------------------------------------------------
# Noise: moments, Kolmogorov-Smirnov, (key, counter) bookkeeping
# --------------------------------------------------------------------------------------


def moments_ok(z, std: float, what: str, k: float = 5.0) -> None:
    """Sample mean, variance, skewness and excess kurtosis of N(0, std^2) draws, each
    within k standard errors of its expectation."""
    z = to_host(z)
    n = z.size
    x = z.astype(np.float64).ravel() / std
    mean, var = x.mean(), x.var()
    skew = scipy.stats.skew(x)
    kurt = scipy.stats.kurtosis(x)  # excess
    assert abs(mean) < k / np.sqrt(n), (what, "mean", mean)
    assert abs(var - 1) < k * np.sqrt(2.0 / n), (what, "variance", var)
    assert abs(skew) < k * np.sqrt(6.0 / n), (what, "skew", skew)
    assert abs(kurt) < k * np.sqrt(24.0 / n), (what, "kurtosis", kurt)


def ks_ok(z, std: float, what: str) -> None:
    p = scipy.stats.kstest(to_host(z).astype(np.float64).ravel() / std, "norm").pvalue
    assert p > 1e-4, (what, "KS p-value", p)


def assert_sym_noise_calibrated(m, std: float, where: str):
    """A batch of symmetric noise matrices: exactly symmetric, diagonal N(0, std^2) and
    off-diagonal N(0, std^2 / 2) by moments and KS. Returns (diag, off) on the host."""
    m = to_host(m)
    np.testing.assert_array_equal(m, np.swapaxes(m, 1, 2))  # exactly symmetric
    iu = np.triu_indices(m.shape[-1], 1)
    diag = np.diagonal(m, axis1=1, axis2=2)
    off = m[:, iu[0], iu[1]]
    moments_ok(diag, std, f"{where} diagonal")
    ks_ok(diag, std, f"{where} diagonal")
    moments_ok(off, std / np.sqrt(2), f"{where} off-diagonal")
    ks_ok(off, std / np.sqrt(2), f"{where} off-diagonal")
    return diag, off


_ORIGINAL_SYM, _ORIGINAL_DENSE = ops.sym_gaussian_noise, ops.gaussian_noise


class NoiseCallRecorder:
    """Records (key, first block, blocks) of every ops noise call made by anyone."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, int, int]] = []
        sym, dense = _ORIGINAL_SYM, _ORIGINAL_DENSE

        def rec_sym(d, std, *, batch=None, key=None, counter=0, **kw):
            assert key is not None, "a release drew noise without an explicit managed key"
            self.calls.append(
                (key, counter, ops.sym_noise_blocks(d, 1 if batch is None else batch))
            )
            return sym(d, std, batch=batch, key=key, counter=counter, **kw)

        def rec_dense(shape, std, *, key=None, counter=0, **kw):
            assert key is not None, "a release drew noise without an explicit managed key"
            count = int(np.prod((shape,) if isinstance(shape, int) else shape))
            self.calls.append((key, counter, ops.noise_blocks(count)))
            return dense(shape, std, key=key, counter=counter, **kw)

        monkeypatch.setattr(ops, "sym_gaussian_noise", rec_sym)
        monkeypatch.setattr(ops, "gaussian_noise", rec_dense)


def assert_no_block_reuse(calls) -> None:
    by_key = collections.defaultdict(list)
    for key, first, blocks in calls:
        assert blocks >= 1
        by_key[key].append((first, first + blocks))
    for ranges in by_key.values():
        ranges.sort()
        for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
            assert a1 <= b0, f"blocks [{a0}, {a1}) and [{b0}, {b1}) overlap under one key"


# --------------------------------------------------------------------------------------
# Neighbouring datasets (sensitivity replay)
# --------------------------------------------------------------------------------------


def adversarial_additions(X, k, C, rng):
    """(row, label) candidates for the added example, adversarial and random."""
    n, d = X.shape
    x64 = X.astype(np.float64)
    # The direction least present in D (smallest eigenvector of X^T X) and the most.
    _, vecs = np.linalg.eigh(x64.T @ x64)
    least, most = vecs[:, 0], vecs[:, -1]
    dt = X.dtype.type
    big = 1e30 if X.dtype == np.float32 else 1e200
    rows = [
        least * C,  # exactly along the least present direction, norm C
        least * C * 1e6,  # far outside the clip ball
        least * big,
        most * C * 3,
        -most * C * 3,
        np.zeros(d),
        np.full(d, C / math.sqrt(d)),  # norm C (up to rounding)
        np.eye(d)[0] * C,  # exactly norm C
        np.eye(d)[0] * np.nextafter(C, np.inf),  # just above C
        X[int(rng.integers(0, n))].astype(np.float64),  # a duplicate of an example
        X[int(rng.integers(0, n))].astype(np.float64) * 1e4,
    ]
    rows += [rng.standard_normal(d) * C * float(rng.choice([0.1, 1.0, 10.0])) for _ in range(6)]
    out = []
    for i, r in enumerate(rows):
        label = i % k
        out.append((np.asarray(r).astype(dt), label))
    # Every label for the worst rows, including classes that never occur in D.
    for label in range(k):
        out.append(((least * C * 10).astype(dt), label))
    return out


def add_example(X, y, row, label, pos):
    X2 = np.concatenate([X[:pos], row[None, :], X[pos:]])
    y2 = np.concatenate([y[:pos], [label], y[pos:]]).astype(y.dtype)
    return X2, y2


def f32_widened_sensitivity(n: int, C: float) -> float:
    """Sensitivity of accumulate='float32' including its rounding: the change between
    fl(G(D')) and fl(G(D)) is at most C^2 plus both rounding errors, each at most
    (m + 2) u32 n C^2 + (n / m) u64 n C^2 in Frobenius norm (blocks of m = min(4096, n)
    rows summed in float32 from float32-rounded rows, block partials in float64)."""
    m = min(4096, n)
    u32, u64 = 2.0**-24, 2.0**-53
    per_fit = ((m + 2) * u32 + (n / m + 1) * u64) * n * C**2
    return C**2 + 2 * per_fit


#: The four estimators, in the order the tests report them.
ESTIMATORS = (DPLeastSquaresClassifier, DPNewtonClassifier, DPFCClassifier, DPSGDClassifier)

#: The Gram shapes (n, d) the GPU engines are tested on, by the op tests and the engine tests.
GPU_GRAM_SHAPES = [
    (1, 1),
    (1, 257),
    (31, 7),
    (31, 130),
    (31, 1000),
    (2000, 257),
    (100003, 64),
    (100003, 130),
]


def npy_shards(folder, x, y, sizes, num_classes: int, stem: str = "part", **open_kw):
    """Write the rows of (x, y) as consecutive ``.npy`` shard pairs of the given sizes in
    ``folder`` (made if missing) and open them as one sharded set."""
    from dpfc_native.shards import open_sharded

    os.makedirs(folder, exist_ok=True)
    start = 0
    for i, m in enumerate(sizes):
        np.save(os.path.join(folder, f"{stem}{i}.features.npy"), x[start : start + m])
        np.save(os.path.join(folder, f"{stem}{i}.labels.npy"), y[start : start + m])
        start += m
    return open_sharded(os.path.join(folder, "*.npy"), num_classes=num_classes, **open_kw)


# --------------------------------------------------------------------------------------
# Sensitivity replay through the estimators
# --------------------------------------------------------------------------------------

_ORIGINAL_RELEASES = {f: getattr(mechanisms, f) for f in ("release_symmetric", "release_dense")}


class ReleaseRecorder:
    """Wraps mechanisms.release_symmetric/release_dense: records (name, statistic before
    noise, declared sensitivity, noisy output); optionally returns the noisy outputs of an
    earlier fit instead of fresh ones (same trajectory for neighbouring datasets)."""

    def __init__(self, monkeypatch, replay=None):
        self.records: list[dict] = []
        self.replay = replay
        for fname in ("release_symmetric", "release_dense"):
            monkeypatch.setattr(mechanisms, fname, self._wrap(_ORIGINAL_RELEASES[fname]))

    def _wrap(self, orig):
        def release(stat, sensitivity, noise_multiplier, source, name):
            noisy, rec = orig(stat, sensitivity, noise_multiplier, source, name)
            i = len(self.records)
            if self.replay is not None:
                assert self.replay[i]["name"] == name
                noisy = self.replay[i]["noisy"].copy()
            self.records.append(
                {
                    "name": name,
                    "stat": np.array(stat, dtype=np.float64),
                    "sens": sensitivity,
                    "noisy": np.array(noisy),
                }
            )
            return noisy, rec

        return release


def expected_sensitivity(name, k, C, est):
    """The add/remove sensitivity of the release ``name`` of a fitted estimator."""
    cg = getattr(est, "grad_clip_norm_", None)
    return {
        "gram": C**2,
        "covariance": C**2,
        "class_grams": C**2,
        "class_sums": C,
        "hessians": math.sqrt(k) * C**2 / 4,
        "gradients": math.sqrt(k) * C,
        "gradient": cg,
    }[name]


# The sensitivity replay's fits (name, estimator, parameters). An explicit ridge (large
# enough that no noisy matrix needs repair): the default one depends on n (treated as
# public), which would make the trajectories on D and D' differ after the first step even
# with identical releases.
REPLAY_FITS = [
    ("ls_global", models.DPLeastSquaresClassifier, {"reg": 30.0}),
    ("ls_per_class", models.DPLeastSquaresClassifier, {"variant": "per_class", "reg": 30.0}),
    ("newton", models.DPNewtonClassifier, {"steps": 3, "reg": 30.0}),
    ("fc", models.DPFCClassifier, {"steps": 4, "reg": 30.0}),
    ("sgd_softmax", models.DPSGDClassifier, {"steps": 4}),
    (
        "sgd_sigmoid_adam",
        models.DPSGDClassifier,
        {"steps": 3, "loss": "sigmoid", "optimizer": "adam", "bias": -2.0},
    ),
]


def labelled_blobs(seed=0, n=200, d=5, k=3, dtype=np.float64):
    """(x, y): n rows around k random centres in d dimensions (classes 0..k-1), seeded."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    x = rng.standard_normal((k, d))[y] + 0.8 * rng.standard_normal((n, d))
    return x.astype(dtype), y


# Cholesky kernel paths, forced through the DPFC_CHOL_* variables (the kernel
# configuration passes them to the native launcher).
CHOL_PATHS = {
    "auto": {},
    "blocked-left-mma": {
        "DPFC_CHOL_SMALL_MAX": "0",
        "DPFC_CHOL_SCHEDULE": "left",
        "DPFC_CHOL_KERNEL": "mma",
    },
    "blocked-right-mma": {
        "DPFC_CHOL_SMALL_MAX": "0",
        "DPFC_CHOL_SCHEDULE": "right",
        "DPFC_CHOL_KERNEL": "mma",
    },
    "blocked-left-simt": {
        "DPFC_CHOL_SMALL_MAX": "0",
        "DPFC_CHOL_SCHEDULE": "left",
        "DPFC_CHOL_KERNEL": "simt",
    },
    "blocked-right-simt": {
        "DPFC_CHOL_SMALL_MAX": "0",
        "DPFC_CHOL_SCHEDULE": "right",
        "DPFC_CHOL_KERNEL": "simt",
    },
}
