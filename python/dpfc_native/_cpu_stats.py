"""CPU implementations behind :mod:`dpfc_native.ops` for clipping, the clipped statistics,
the clipped linear-layer gradient and the Philox Gaussian noise (the GPU ones are in
:mod:`dpfc_native._gpu_stats`, with the same signatures).

Private: :mod:`dpfc_native.ops` validates the arguments (finite values, shapes, labels in
range, positive clip norms) and calls these with NumPy arrays. NumPy/SciPy BLAS does the
products (the Gram updates through SciPy's BLAS without the GIL), the native core
(``dpfc_native._core``) the row clipping, the mirror and the noise. Memory: rows are
processed in chunks of about ``_CHUNK_ELEMENTS`` float64 values (never an n x d copy).
"""

from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np
import scipy.linalg.blas as _blas
import scipy.sparse as _sparse

from . import _core
from ._special import sigmoid as _sigmoid

__all__ = [
    "clip_rows",
    "clipped_gram",
    "clipped_class_sums",
    "clipped_stats",
    "clipped_class_grams",
    "clipped_weighted_grams",
    "clipped_linear_grad",
    "sym_gaussian_noise",
    "gaussian_noise",
]

#: The shared clip margin (csrc/common/clip.hpp): rows are clipped to C (1 - 2^-20).
_CLIP_MARGIN: float = float(_core.clip_margin)

# Rows processed per chunk: bounded extra memory (about 32 MiB of float64 per chunk).
_CHUNK_ELEMENTS = 1 << 22
# The float32 accumulation mode sums this many rows in float32 before a float64 reduction
# (the same block the GPU kernels use); its rounding error is documented in README.md.
_F32_BLOCK_ROWS = 4096


def _row_chunks(n: int, d: int, rows: int | None = None):
    step = rows or max(1, _CHUNK_ELEMENTS // max(1, d))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


#: Below this sum of squares its terms may have underflowed (2^-900: squares of entries
#: under ~1e-135 lose bits, under ~1e-162 vanish): such rows are rescaled too.
_TINY_SUMSQ = 2.0**-900


def _row_norms64(xc: np.ndarray) -> np.ndarray:
    """Float64 row norms, rescaling rows whose sum of squares overflows or underflows."""
    sq = np.einsum("ij,ij->i", xc, xc)
    norms = np.sqrt(sq)
    bad = ~np.isfinite(norms) | (sq < _TINY_SUMSQ)
    if bad.any() and xc.shape[1] > 0:
        rows = xc[bad]
        amax = np.abs(rows).max(axis=1)
        # over: a norm beyond the float64 range is inf (its clip factor is then 0).
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            scaled = rows / np.where(amax > 0, amax, 1.0)[:, None]
            norms[bad] = np.where(
                amax > 0, amax * np.sqrt(np.einsum("ij,ij->i", scaled, scaled)), 0.0
            )
    return norms


_MIN_NORMAL = float(np.finfo(np.float64).tiny)
_DENORM_MIN = float(np.finfo(np.float64).smallest_subnormal)


def _clip_scale(norms: np.ndarray, clip_norm: float) -> np.ndarray:
    """The shared clip factor (csrc/common/clip.hpp) for an array of norms."""
    target = clip_norm * _CLIP_MARGIN
    # Divide only where the row is clipped (norm > target > 0): target / norm is then
    # below 1, so no overflow (a tiny norm with a huge C warned from np.where's other
    # branch) and no division by zero.
    s = np.divide(target, norms, out=np.ones(norms.shape, dtype=np.float64), where=norms > target)
    # A subnormal factor (norm / C beyond ~1e308) lost bits in its rounding: one unit
    # (2^-1074, exact there) down, never above target / norm, as clip.hpp does.
    sub = s < _MIN_NORMAL
    if sub.any():
        s[sub] = np.maximum(s[sub] - _DENORM_MIN, 0.0)
    return s


_SCRATCH = threading.local()


def _scratch(rows: int, d: int, slot: str = "chunk") -> np.ndarray:
    """This thread's float64 scratch block ``slot`` of shape (rows, d), overwritten by the
    next call for the same slot.

    The chunk copies are the hot allocations of every statistic (16 MiB per 4096 x 512
    leaf). A fresh block costs its page faults on every call wherever malloc maps and
    unmaps large blocks each time (Dask's workers set ``MALLOC_TRIM_THRESHOLD_``, which
    does that): measured as about 15% of a Gram leaf's CPU time. Each thread keeps the
    largest block it was asked for: about ``_CHUNK_ELEMENTS`` values. The "chunk" slot
    holds the clipped rows (:func:`_clipped_chunk`) or the widened rows of the gradient;
    "weighted" the weighted rows of :func:`clipped_weighted_grams`; "logits" the gradient's
    (rows, K) logits and residuals, "grad_chunk" its (K, d) sum over one chunk.
    """
    need = rows * d
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.size < need:
        buf = bufs[slot] = np.empty(need, dtype=np.float64)
    return buf[:need].reshape(rows, d)


_OUTPUTS = threading.local()


@contextlib.contextmanager
def leaf_outputs():
    """A block (on this thread) in which the statistics return what the exact reduction
    needs, cheaper than a standalone result:

    * outputs are this thread's buffers, zeroed and reused from one call to the next
      instead of fresh arrays, so a result is valid only until the next call of the same
      statistic on this thread. A fresh d x d (or K x d x d) output per leaf would be
      page-faulted anew on every leaf wherever malloc maps and unmaps large blocks each
      time (Dask's workers: ``MALLOC_TRIM_THRESHOLD_``);
    * symmetric (..., d, d) outputs have only their lower triangles (C order) written:
      the reduction puts only those on the grid (``reduction._Statistic.symmetric``)
      and mirrors the sum once.

    The reduction turns each leaf's statistic into integer limbs before it computes the
    next leaf. The buffers are dropped when the outermost block exits; nested blocks
    share them.
    """
    depth = getattr(_OUTPUTS, "depth", 0)
    if depth == 0:
        _OUTPUTS.bufs = {}
    _OUTPUTS.depth = depth + 1
    try:
        yield
    finally:
        _OUTPUTS.depth = depth
        if depth == 0:
            _OUTPUTS.bufs = None


def _in_leaf_outputs() -> bool:
    """Whether this thread is inside :func:`leaf_outputs`."""
    return getattr(_OUTPUTS, "bufs", None) is not None


def _symmetric(g: np.ndarray) -> np.ndarray:
    """The statistic from ``?syrk``'s upper triangle of ``g`` ((d, d), Fortran order):
    mirrored to the full matrix, or inside :func:`leaf_outputs` its C-order view as it is
    (lower triangle written, upper zero)."""
    if _in_leaf_outputs():
        return np.asfortranarray(g).T
    return _mirror_upper(g)


def _zeros(key, shape: tuple, order: str = "C") -> np.ndarray:
    """A zeroed float64 array: this thread's buffer ``key`` inside :func:`leaf_outputs`,
    else a fresh one."""
    buf = leaf_buffer(key, shape, order)
    buf.fill(0.0)
    return buf


def leaf_buffer(key, shape: tuple, order: str = "C") -> np.ndarray:
    """An uninitialised float64 array: this thread's buffer ``key`` inside
    :func:`leaf_outputs` (valid until the next request for ``key`` on this thread), else a
    fresh one."""
    bufs = getattr(_OUTPUTS, "bufs", None)
    if bufs is None:
        return np.empty(shape, dtype=np.float64, order=order)
    buf = bufs.get(key)
    if buf is None or buf.shape != shape or not buf.flags[f"{order}_CONTIGUOUS"]:
        buf = bufs[key] = np.empty(shape, dtype=np.float64, order=order)
    return buf


def _clipped_chunk(x: np.ndarray, sl: slice, clip_norm: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``sl`` of x in float64, clipped, and their scales. The rows are this thread's
    scratch block (:func:`_scratch`): use them before the next call.

    One native pass per row (``_core.cpu_clip_rows``: widen, norm, the shared clip
    factor), float32 and float64 rows read as they are; other dtypes are widened into the
    block first."""
    rows = np.asarray(x[sl])
    xc = _scratch(rows.shape[0], rows.shape[1])
    scale = np.empty(rows.shape[0], dtype=np.float64)
    _core.cpu_clip_rows(native_rows(rows, xc), xc, scale, float(clip_norm))
    return xc, scale


def native_rows(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """What the native row passes read: x itself when it is C-ordered float32 or float64,
    else x widened into the float64 ``out`` (which they then process in place)."""
    if x.dtype in (np.float32, np.float64) and x.flags.c_contiguous:
        return x
    np.copyto(out, x, casting="unsafe")
    return out


# The signature SciPy's Cython BLAS exports for ?syrk with 32-bit integers (the BLAS SciPy
# links, and the one scipy.linalg.blas calls): the only one the native call accepts.
_SYRK_SIGNATURE = "void (char *, char *, int *, int *, {t} *, {t} *, int *, {t} *, {t} *, int *)"


@functools.lru_cache(maxsize=None)
def _syrk_capsule(kind: str):
    """SciPy's ``?syrk`` (``kind`` "d" or "s") as a capsule for ``_core.cpu_syrk_upper``,
    or None when SciPy exports no such function with the expected signature."""
    try:
        from scipy.linalg import cython_blas
    except ImportError:  # pragma: no cover - SciPy always ships it
        return None
    cap = getattr(cython_blas, "__pyx_capi__", {}).get(kind + "syrk")
    if cap is None:  # pragma: no cover
        return None
    name = _capsule_name(cap)
    expected = _SYRK_SIGNATURE.format(t=f"__pyx_t_5scipy_6linalg_11cython_blas_{kind}")
    return cap if name == expected else None


def _capsule_name(cap) -> str | None:
    import ctypes

    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype = ctypes.c_char_p
    get_name.argtypes = [ctypes.py_object]
    raw = get_name(cap)
    return raw.decode() if raw is not None else None


def _syrk_upper_into(g_f: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """g_f (Fortran order) += rows^T rows, upper triangle only (BLAS ?syrk).

    Through SciPy's Cython BLAS export without the GIL where it can (the same BLAS
    function as ``scipy.linalg.blas.?syrk``, which holds the GIL for the whole product, so
    leaves computed on threads would run one at a time); else through that wrapper."""
    kind = "d" if rows.dtype == np.float64 else "s"
    cap = _syrk_capsule(kind)
    # rows.T is Fortran-contiguous, so BLAS sees it without a copy: C = A A^T with A = rows^T.
    if (
        cap is not None
        and rows.flags.c_contiguous
        and g_f.flags.f_contiguous
        and g_f.dtype == rows.dtype
        and g_f.flags.writeable
    ):
        _core.cpu_syrk_upper(cap, rows.T, g_f, 1.0, 1.0)
        return g_f
    syrk = _blas.dsyrk if kind == "d" else _blas.ssyrk
    return syrk(1.0, rows.T, beta=1.0, c=g_f, trans=0, lower=0, overwrite_c=1)


def _mirror_upper(g: np.ndarray) -> np.ndarray:
    """The full symmetric matrix from the upper triangle of ``g`` ((d, d), Fortran order as
    ``?syrk`` leaves it), mirrored in place by the native core (no temporaries: NumPy's
    ``triu`` route cost 3 d x d arrays, a sixteenth of a 4096-row leaf's time). Returned
    as the C-contiguous view of the same buffer (symmetric, so it is the same matrix)."""
    g = np.asfortranarray(g, dtype=np.float64)
    _core.cpu_mirror_upper(g)
    return g.T


def _gram_cpu(x: np.ndarray, clip_norm: float, accumulate: str, labels=None, num_classes=0):
    n, d = x.shape
    g = _zeros("gram", (d, d), order="F")
    b = _zeros("class_sums", (num_classes, d)) if labels is not None else None
    counts = (
        np.bincount(labels, minlength=num_classes).astype(np.int64) if labels is not None else None
    )
    chunk_rows = _F32_BLOCK_ROWS if accumulate == "float32" else None
    for sl in _row_chunks(n, d, chunk_rows):
        xc, scale = _clipped_chunk(x, sl, clip_norm)
        if accumulate == "float32":
            # Round the clipped float64 rows once: casting x to float32 first would turn
            # float64 entries beyond float32's range into inf (inf * 0 = NaN in G).
            block = xc.astype(np.float32)
            partial = _syrk_upper_into(np.zeros((d, d), dtype=np.float32, order="F"), block)
            g += partial
        else:
            g = _syrk_upper_into(g, xc)
        if b is not None:
            b += _class_sum_matrix(labels[sl], num_classes) @ xc
    return _symmetric(g), b, counts


def _class_sum_matrix(labels: np.ndarray, num_classes: int):
    """Sparse (num_classes, m) one-hot matrix: its product with rows sums them per class."""
    m = labels.shape[0]
    return _sparse.csr_matrix(
        (np.ones(m), (labels.astype(np.int64), np.arange(m))), shape=(num_classes, m)
    )


# --------------------------------------------------------------------------------------
# Clipping and clipped statistics
# --------------------------------------------------------------------------------------


def clip_rows(x: np.ndarray, c: float):
    """``(x_i s_i, s_i)`` with ``s_i = clip_scale(||x_i||, c)`` (x's dtype; float64 scales)."""
    out = np.empty(x.shape, dtype=x.dtype)
    scales = np.empty(x.shape[0], dtype=np.float64)
    for sl in _row_chunks(*x.shape):
        xc, scale = _clipped_chunk(x, sl, c)
        out[sl] = xc
        scales[sl] = scale
    return out, scales


def clipped_gram(x: np.ndarray, c: float, mode: str):
    """``G = sum_i xbar_i xbar_i^T`` ((d, d) float64), accumulated as ``mode`` says."""
    g, _, _ = _gram_cpu(x, c, mode)
    return g


def clipped_class_sums(x: np.ndarray, labels: np.ndarray, k: int, c: float):
    """``B[l] = sum_{y_i = l} xbar_i`` ((k, d) float64)."""
    b = np.zeros((k, x.shape[1]), dtype=np.float64)
    for sl in _row_chunks(*x.shape):
        xc, _ = _clipped_chunk(x, sl, c)
        b += _class_sum_matrix(labels[sl], k) @ xc
    return b


def clipped_stats(x: np.ndarray, labels: np.ndarray, k: int, c: float, mode: str):
    """``(G, B, counts)`` in one pass over x."""
    return _gram_cpu(x, c, mode, labels=labels, num_classes=k)


def clipped_class_grams(x: np.ndarray, labels: np.ndarray, k: int, c: float):
    """``A_l = sum_{y_i = l} xbar_i xbar_i^T`` ((k, d, d) float64)."""
    n, d = x.shape
    grams = _zeros("class_grams", (k, d, d))
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    for cls in range(k):
        idx = order[bounds[cls] : bounds[cls + 1]]
        g = _zeros("gram", (d, d), order="F")
        for sl in _row_chunks(idx.shape[0], d):
            xc, _ = _clipped_chunk(x, idx[sl], c)
            g = _syrk_upper_into(g, xc)
        grams[cls] = _symmetric(g)
    return grams


def clipped_weighted_grams(x: np.ndarray, weights: np.ndarray, c: float):
    """``H_l = sum_i weights[i, l] xbar_i xbar_i^T`` ((K, d, d) float64)."""
    n, d = x.shape
    k = weights.shape[1]
    out = _zeros("weighted_grams", (k, d, d))
    # ?syrk accumulates straight into each (d, d) slice through its Fortran-order view
    # (upper triangle there = lower triangle of the C-order slice): no second K x d x d.
    acc = [out[cls].T for cls in range(k)]
    for sl in _row_chunks(n, d):
        xc, _ = _clipped_chunk(x, sl, c)
        w = np.asarray(weights[sl], dtype=np.float64)
        if not (np.isfinite(w).all() and (w >= 0).all()):  # a row view's block: unchecked
            raise ValueError("weights must be finite and non-negative")
        root_w = np.sqrt(w)
        xw = _scratch(*xc.shape, slot="weighted")
        for cls in range(k):
            np.multiply(xc, root_w[:, cls : cls + 1], out=xw)
            _syrk_upper_into(acc[cls], xw)
    if not _in_leaf_outputs():  # inside leaf_outputs: the lower triangles only
        for g in acc:
            _core.cpu_mirror_upper(g)
    return out


def clipped_linear_grad(
    x: np.ndarray,
    labels: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray,
    c: float,
    loss: str,
    fc: float | None,
):
    """``(grad, n_clipped)``: the clipped per-example gradient sum ((K, d) float64) and the
    number of clipped examples (see :func:`dpfc_native.ops.clipped_linear_grad`)."""
    k = w.shape[0]
    n, d = x.shape
    w64 = np.asarray(w, dtype=np.float64)
    b64 = np.asarray(bias, dtype=np.float64)
    grad = np.zeros((k, d), dtype=np.float64)
    n_clipped = 0
    step = max(1, _CHUNK_ELEMENTS // max(d, k))
    for sl in _row_chunks(n, d, step):
        if fc is not None:
            xc, _ = _clipped_chunk(x, sl, fc)
        elif x.dtype == np.float64:
            xc = x[sl]
        else:  # widened in this thread's scratch block, not a fresh chunk-sized array
            rows_in = x[sl]
            xc = _scratch(rows_in.shape[0], d)
            np.copyto(xc, rows_in, casting="unsafe")
        # The (rows, K) temporaries live in this thread's scratch blocks too (computed in
        # place: the same operations, the same bits as fresh arrays).
        m = xc.shape[0]
        logits = np.matmul(xc, w64.T, out=_scratch(m, k, "logits"))
        logits += b64
        rows = np.arange(m)
        if loss == "sigmoid":
            r = _sigmoid(logits, out=logits)
            r[rows, labels[sl]] -= 1.0
            r /= k
        else:
            logits -= logits.max(axis=1, keepdims=True)
            r = np.exp(logits, out=logits)
            r /= r.sum(axis=1, keepdims=True)
            r[rows, labels[sl]] -= 1.0
        # Logits that overflow (inf - inf) give NaN residuals: such a row contributes
        # nothing (norm 0 <= C_g) instead of making the whole sum NaN.
        r[~np.isfinite(r).all(axis=1)] = 0.0
        # Both norms rescaled where needed (a residual whose squares underflow must not
        # hide a row with a huge ||x|| from the clip); a zero residual contributes nothing
        # whatever ||x|| is, even inf (no 0 * inf).
        rnorm = _row_norms64(r)
        with np.errstate(invalid="ignore"):
            gnorm = np.where(rnorm > 0, rnorm * _row_norms64(xc), 0.0)
        scale = _clip_scale(gnorm, c)
        n_clipped += int(np.count_nonzero(scale < 1.0))
        # The factor goes on the residual (|r| <= ~1), unless the scaled residual would
        # sit where the subnormal grid's rounding is large against it (a row with a huge
        # ||x||): there it goes on x, whose scaled norm is about C / |r| (normal).
        far = (rnorm > 0) & (rnorm * scale < _SMALL_SCALED_RESIDUAL)
        if far.any():
            grad += np.matmul(r[far].T, xc[far] * scale[far, None])
            r[far] = 0.0
        r *= scale[:, None]
        grad += np.matmul(r.T, xc, out=_scratch(k, d, "grad_chunk"))
    return grad, n_clipped


#: Below this norm a scaled residual's entries lose bits to the subnormal grid (2^-1074
#: apart): the clip factor is then applied to the features instead.
_SMALL_SCALED_RESIDUAL = 2.0**-960


# --------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------


def sym_gaussian_noise(d: int, s: float, batch: int | None, words, c: int, dt):
    """Symmetric noise (batch, d, d) (or (d, d) when batch is None) from the Philox stream."""
    nb = 1 if batch is None else int(batch)
    out = np.empty((nb, d, d), dtype=dt)
    _core.cpu_sym_gaussian_noise(out, s, words, c)
    return out[0] if batch is None else out


def gaussian_noise(shape: tuple, s: float, words, c: int, dt):
    """I.i.d. N(0, s^2) of the given shape (C order) from the Philox stream."""
    count = int(np.prod(shape, dtype=np.int64))
    out = np.empty(shape, dtype=dt)
    if count:
        _core.cpu_gaussian_noise(out.reshape(-1), s, words, c)
    return out
