"""The native ops of dpfc_native: one API, a CPU and a GPU implementation behind it.

This is the stable surface downstream libraries import. Every op takes NumPy arrays (CPU
path: NumPy/SciPy BLAS and LAPACK, plus the native Philox core for noise) or GPU arrays
(CuPy, or anything exposing ``__cuda_array_interface__`` or DLPack on a CUDA device, which
is returned as CuPy) and returns arrays of the same kind. Mixing CPU and GPU arrays in one
call is an error.

Layout: this module validates the arguments and dispatches on the arrays' device
(:func:`device_of`) to the backend modules, which share one signature per op:
``_cpu_stats`` / ``_gpu_stats`` (clipping, statistics, gradient, noise) and
``_cpu_linalg`` / ``_gpu_linalg`` (Cholesky). The argument rules are the package's
(:mod:`dpfc_native._validation`); callers that validated once (the estimators, once per
fit) use ``_unchecked``, the same ops without the per-call checks.

Pipeline: features -> clip -> statistics -> noise -> solve -> weights.

Summation: one pass over the rows (default), or, with ``leaf_rows=m``, the exact leaf
reduction of :mod:`dpfc_native.reduction` (the same bits as ``reduction.reduce``, the
Dask backend and the estimators' fits with the same leaves).

Clipping: every op that clips uses the same factor ``s_i = min(1, C' / ||x_i||)`` with
``C' = C (1 - 2^-20)`` and ``||x_i||`` computed in float64, so that the clipped rows have
norm strictly below ``C`` on the stored floats, rounding included (see
``csrc/common/clip.hpp``). Statistics that get noised are accumulated in float64 by
default.
"""

from __future__ import annotations

import math
import secrets
from types import ModuleType
from typing import Any

import numpy as np

from . import _core, _cpu_linalg, _cpu_stats
from . import _validation as _v
from ._optional import install_hint

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
    "sym_noise_blocks",
    "noise_blocks",
    "cholesky",
    "cholesky_shifts",
    "cho_solve",
    "array_module",
    "device_of",
    "is_gpu_array",
    "CLIP_MARGIN",
    "ACCUMULATE_MODES",
]

#: Clipping targets ``clip_norm * CLIP_MARGIN`` (1 - 2^-20) so rounding can never exceed C.
CLIP_MARGIN: float = float(_core.clip_margin)
#: Accumulation modes of the clipped statistics (the GPU may add faster ones).
ACCUMULATE_MODES = ("float64", "float32")

_FLOAT_DTYPES = _v.FLOAT_DTYPES


# --------------------------------------------------------------------------------------
# Array kind and validation
# --------------------------------------------------------------------------------------


def is_gpu_array(a: Any) -> bool:
    """True for CuPy arrays and other arrays living on a CUDA device."""
    if isinstance(a, np.ndarray):
        return False
    if hasattr(a, "__cuda_array_interface__"):
        return True
    dev = getattr(a, "__dlpack_device__", None)
    if dev is not None:
        try:
            return int(dev()[0]) in (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged
        except Exception:  # pragma: no cover - foreign objects
            return False
    return False


def _cupy():
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            f"a GPU array was given but CuPy is not installed: {install_hint('cuda')}"
        ) from exc
    if not _core.cuda_compiled:
        raise RuntimeError(
            "a GPU array was given but this build of dpfc_native has no CUDA kernels "
            "(rebuild with nvcc available, DPFC_CUDA=ON)"
        )
    return cupy


def _as_cupy(a: Any, name: str):
    cp = _cupy()
    if isinstance(a, cp.ndarray):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        return cp.asarray(a)
    try:
        return cp.from_dlpack(a)
    except Exception as exc:
        raise TypeError(f"{name}: cannot convert {type(a).__name__} to a CuPy array") from exc


def device_of(*arrays: Any) -> str:
    """``"cpu"`` or ``"cuda"``: where the given arrays live (None entries ignored; no
    arrays: ``"cpu"``). The one rule every module uses to derive the device from arrays.

    Raises
    ------
    ValueError
        If CPU and GPU arrays are mixed.
    """
    kinds = {is_gpu_array(a) for a in arrays if a is not None}
    if len(kinds) > 1:
        raise ValueError("mixed devices: all array arguments must be on the CPU or all on the GPU")
    if kinds == {True}:
        ids = {i for i in map(_gpu_id, arrays) if i is not None}
        if len(ids) > 1:
            # A kernel launched on one device would read the others' memory.
            raise ValueError(
                f"arrays on different GPUs (devices {sorted(ids)}): put every array "
                "argument on one device"
            )
        return "cuda"
    return "cpu"


def _gpu_id(a: Any):
    """The CUDA device ordinal of a GPU array (DLPack's, else CuPy's), or None."""
    if a is None:
        return None
    dev = getattr(a, "__dlpack_device__", None)
    if dev is not None:
        try:
            return int(dev()[1])
        except Exception:  # pragma: no cover - foreign objects
            return None
    return getattr(getattr(a, "device", None), "id", None)


def array_module(*arrays: Any):
    """``numpy`` or ``cupy``: the module of the given arrays (None entries ignored).

    Raises
    ------
    ValueError
        If CPU and GPU arrays are mixed.
    """
    return _cupy() if device_of(*arrays) == "cuda" else np


def _backend(family: str, xp) -> ModuleType:
    """The implementation module of ``family`` ("stats" or "linalg") for arrays of module xp."""
    if xp is np:
        return _cpu_stats if family == "stats" else _cpu_linalg
    if family == "stats":
        from . import _gpu_stats

        return _gpu_stats
    from . import _gpu_linalg

    return _gpu_linalg


def _dispatch(family: str, *arrays: Any) -> tuple[Any, ModuleType]:
    """``(xp, backend)`` of a call: the arrays' module and the matching implementation."""
    xp = array_module(*arrays)
    return xp, _backend(family, xp)


def _coerce(a: Any, name: str, xp):
    """The argument as an array of module xp, the call's kind (no dtype change).

    A row view (an object with ``_dpfc_row_view = True``: ``shape``, ``dtype``, ``ndim``
    and row indexing returning finite NumPy blocks, e.g. the estimators' preprocessed
    rows) passes through on the CPU: the CPU paths read x by row blocks only.
    """
    if getattr(a, "_dpfc_row_view", False):
        if xp is not np:
            raise ValueError(f"{name}: a row view is a CPU object (mixed devices)")
        return a
    if xp is not np:
        if not is_gpu_array(a):
            raise ValueError(
                f"{name}: expected a GPU array like the other arguments (mixed devices)"
            )
        return _as_cupy(a, name)
    if is_gpu_array(a):
        raise ValueError(f"{name}: expected a CPU array like the other arguments (mixed devices)")
    if isinstance(a, np.ndarray):
        return a
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    try:
        return np.asarray(a)
    except Exception as exc:
        raise TypeError(f"{name}: cannot convert {type(a).__name__} to an array") from exc


# The scalar checks every module shares (the rules are in _validation's docstring).
_check_real = _v.real
_check_positive = _v.positive

#: Smallest clip norm per sqrt(d), by what the clipped values are rounded to: one rounding
#: of an element to the subnormal grid (half of 2^-149 in float32, 2^-1074 in float64) must
#: stay inside the 2^-20 clip margin; for squared statistics (grams), the products of
#: two clipped entries must too (C^2 far above the float64 subnormals).
#: With float32 accumulation the products are float32 too: C^2 2^-20 must exceed the
#: float32 subnormal spacing d times ("squares32").
_CLIP_FLOOR = {
    "float32": 2.0**-128,
    "float64": 2.0**-1052,
    "squares": 2.0**-500,
    "squares32": 2.0**-65,
}


def _grad_floor(x) -> str:
    """The clip-norm floor of the per-example gradients of rows ``x``: the CPU computes
    them in float64 whatever x's dtype; the GPU rounds float32 rows' products to float32
    (cuBLAS or the native float32 kernels), so their clipped values live on float32's
    subnormal grid."""
    return "float32" if is_gpu_array(x) and x.dtype == np.float32 else "float64"


def _check_clip_norm(
    clip_norm,
    x,
    floor: str = "float64",
    accumulate: str = "float64",
    *,
    width=None,
    name="clip_norm",
):
    """clip_norm > 0, finite, and far enough above the subnormal range of what the clipped
    values (``width`` per row, default x's columns) are rounded to (``floor``: a key of
    ``_CLIP_FLOOR``) that the clip bound holds on the stored values; with float32
    accumulation, C^2 times the rows must fit float32."""
    c = _check_positive(clip_norm, name)
    d = width if width is not None else (int(x.shape[1]) if x.ndim == 2 else 1)
    if floor == "squares" and accumulate != "float64":
        floor = "squares32"
    low = math.sqrt(max(d, 1)) * _CLIP_FLOOR[floor]
    if c < low:
        raise ValueError(
            f"{name} must be at least {low:.3g} here (sqrt(d) x {_CLIP_FLOOR[floor]:.3g}: "
            f"below it the rounding of the clipped values to the subnormal range can exceed "
            f"the bound), got {clip_norm!r}; rescale the features instead"
        )
    # Blocks of _F32_BLOCK_ROWS rows are summed in float32, the blocks in float64.
    block = min(max(int(x.shape[0]), 1), _cpu_stats._F32_BLOCK_ROWS)
    if accumulate != "float64" and c * c * block > 2.0**127:
        raise ValueError(
            f"clip_norm={clip_norm!r} with accumulate={accumulate!r}: a float32 block of "
            f"{block} rows can sum to {block} clip_norm**2, beyond float32's range (2^127); "
            'use accumulate="float64"'
        )
    return c


def _check_int(value: Any, name: str, minimum: int) -> int:
    return _v.integer(value, name, minimum)


def _half_dtypes(xp) -> tuple:
    out = [xp.dtype(xp.float16)]
    try:  # bfloat16 exists for CuPy via ml_dtypes only; accepted where available
        import ml_dtypes  # type: ignore

        out.append(xp.dtype(ml_dtypes.bfloat16))
    except ImportError:
        pass
    return tuple(out)


def _check_features(x, name: str, xp, *, allow_half: bool = False):
    _v.nonempty(_v.ndim(x, name, 2, "(n, d)"), name)
    allowed = _FLOAT_DTYPES + (_half_dtypes(xp) if allow_half else ())
    if xp is np and x.dtype.kind == "f" and not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))  # e.g. big-endian files: one native copy
    _v.dtype_in(x, name, allowed)
    return _v.finite(x, name, xp)


def _check_finite(a, name: str, xp) -> None:
    """Raises ValueError if any element is NaN or Inf (chunked over rows on the CPU)."""
    _v.finite(a, name, xp)


def _check_labels(labels, n: int, num_classes: int, xp):
    return _v.labels(labels, "labels", n, num_classes)


def _check_accumulate(accumulate: str, xp) -> str:
    modes = ACCUMULATE_MODES + (("tf32", "bf16") if xp is not np else ())
    return _v.choice(accumulate, "accumulate", modes)


def _features(x, xp, *, allow_half: bool = False):
    """The feature matrix argument ``x``, coerced to xp and validated."""
    return _check_features(_coerce(x, "x", xp), "x", xp, allow_half=allow_half)


def _check_leaf_rows(leaf_rows: Any, accumulate: str = "float64") -> int | None:
    """None (one pass over the rows) or the leaf size of the exact reduction."""
    if leaf_rows is None:
        return None
    m = _check_int(leaf_rows, "leaf_rows", 1)
    if accumulate != "float64":
        raise ValueError(
            "leaf_rows sums each leaf in float64 and merges the leaves exactly: it needs "
            f"accumulate='float64', got {accumulate!r}"
        )
    return m


def _by_leaves(make_stat, x, xp, leaf_rows: int, labels=None, num_classes: int = 1, weights=None):
    """The statistic ``make_stat(reduction, host)`` over validated arguments by the exact
    leaf reduction (:func:`dpfc_native.reduction.reduce`: leaves of ``leaf_rows`` rows from
    row 0, one shard), returned on the device of ``x``. Labels, the statistic's parameters
    (``host`` copies them) and the per-row weights go to the reduction on the host;
    GPU leaves take them back to the device."""
    from . import reduction

    host = (lambda a: a) if xp is np else xp.asnumpy
    source = reduction.ArraySource(
        x, None if labels is None else host(labels), num_classes, rows_checked=True
    )
    out = reduction.reduce(
        make_stat(reduction, host),
        source,
        leaf_rows=leaf_rows,
        threads=None if xp is np else 1,  # GPU leaves: the device serialises them anyway
        weights=None if weights is None else host(weights),
    )
    if xp is np:
        return out
    on_device = lambda v: xp.asarray(v) if isinstance(v, np.ndarray) else v  # noqa: E731
    return tuple(map(on_device, out)) if isinstance(out, tuple) else on_device(out)


# --------------------------------------------------------------------------------------
# Clipping and clipped statistics
# --------------------------------------------------------------------------------------


def clip_rows(x, clip_norm: float):
    """Clip each row of ``x`` to L2 norm at most ``clip_norm``.

    Parameters
    ----------
    x : array (n, d), float32 or float64
    clip_norm : float > 0
        The bound C on each clipped row's L2 norm (same units as the features).

    Returns
    -------
    x_clipped : array (n, d), same dtype and device as ``x``
        ``x_i * scale_i``; every row has exact norm below ``clip_norm``.
    scale : array (n,), float64
        ``min(1, C (1 - 2^-20) / ||x_i||)``.
    """
    xp, backend = _dispatch("stats", x)
    x = _features(x, xp)
    floor = "float32" if x.dtype == np.float32 else "float64"
    return backend.clip_rows(x, _check_clip_norm(clip_norm, x, floor))


def clipped_gram(x, clip_norm: float, *, accumulate: str = "float64", leaf_rows=None):
    """Sum of outer products of the clipped rows: ``G = sum_i xbar_i xbar_i^T``.

    Add/remove sensitivity of ``G`` in Frobenius norm: ``clip_norm**2`` in exact
    arithmetic. With ``accumulate="float64"`` the rounding of the sum is at most about
    ``n^2 2^-53 clip_norm**2`` in the worst case (1.1e-4 C^2 at n = 10^6; observed about
    1e-9 C^2, tests/test_privacy_rounding.py), negligible next to the sensitivity. With
    "float32" (and the GPU's "tf32"/"bf16") it is not: one added row can change the
    float32 block sums' rounding by ``~ 4096 * 2^-24 C^2`` per block (measured 1.0006 C^2
    at n = 5e5), so a statistic accumulated that way needs a widened sensitivity before
    it is noised. The estimators always use "float64".

    Parameters
    ----------
    x : array (n, d), float32 or float64; float16 (and bfloat16 where ml_dtypes is
        installed) too: half-precision features are read as they are, never copied whole
    clip_norm : float > 0
        Row clip bound C.
    accumulate : {"float64", "float32"}
        "float64" (default): float64 products and sums. "float32": blocks of 4096 rows
        summed in float32, block partials reduced in float64 (faster on GPUs; its
        rounding error bound is in README.md). The GPU also offers "tf32"/"bf16".
    leaf_rows : int >= 1 or None
        None (default): one pass over the rows. An int: the exact leaf reduction of
        :mod:`dpfc_native.reduction` (leaves of ``leaf_rows`` rows summed in float64, each
        put once on a fixed grid and merged as integers, correctly rounded at the end;
        leaves side by side on ``DPFC_REDUCE_THREADS`` threads): the same bits as
        ``reduction.reduce`` and the Dask backend with the same leaves, whatever the
        thread count. Its grid step is ``2^-50`` of the per-row bound (at 4096 rows), so
        keep ``clip_norm`` near the rows' scale.

    Returns
    -------
    G : array (d, d), float64, symmetric, every element written.
    """
    xp, backend = _dispatch("stats", x)
    x = _features(x, xp, allow_half=True)
    accumulate = _check_accumulate(accumulate, xp)
    c = _check_clip_norm(clip_norm, x, "squares", accumulate)
    m = _check_leaf_rows(leaf_rows, accumulate)
    if m is not None:
        return _by_leaves(lambda R, _: R.Gram(c), x, xp, m)
    return backend.clipped_gram(x, c, accumulate)


def clipped_class_sums(x, labels, num_classes: int, clip_norm: float, *, leaf_rows=None):
    """Per-class sums of the clipped rows: ``B[l] = sum_{y_i = l} xbar_i``.

    Add/remove sensitivity (Frobenius): ``clip_norm`` (one row of B moves).
    ``leaf_rows``: as :func:`clipped_gram`.

    Returns
    -------
    B : array (num_classes, d), float64.
    """
    xp, backend = _dispatch("stats", x, labels)
    x = _features(x, xp)
    k = _check_int(num_classes, "num_classes", 1)
    labels = _check_labels(_coerce(labels, "labels", xp), x.shape[0], k, xp)
    c = _check_clip_norm(clip_norm, x, "float64")
    m = _check_leaf_rows(leaf_rows)
    if m is not None:
        return _by_leaves(lambda R, _: R.ClassSums(c, k), x, xp, m, labels, k)
    return backend.clipped_class_sums(x, labels, k, c)


def clipped_stats(
    x, labels, num_classes: int, clip_norm: float, *, accumulate: str = "float64", leaf_rows=None
):
    """Gram, class sums and class counts of the clipped rows in one pass over ``x``.
    ``accumulate`` and ``leaf_rows``: as :func:`clipped_gram`.

    Returns
    -------
    G : (d, d) float64, as :func:`clipped_gram`.
    B : (num_classes, d) float64, as :func:`clipped_class_sums` (always float64 sums).
    counts : (num_classes,) int64, examples per class (not clipped, not private: see the
        README's "Privacy guarantees" before releasing it).
    """
    xp, backend = _dispatch("stats", x, labels)
    x = _features(x, xp, allow_half=True)
    k = _check_int(num_classes, "num_classes", 1)
    labels = _check_labels(_coerce(labels, "labels", xp), x.shape[0], k, xp)
    accumulate = _check_accumulate(accumulate, xp)
    c = _check_clip_norm(clip_norm, x, "squares", accumulate)
    m = _check_leaf_rows(leaf_rows, accumulate)
    if m is not None:
        return _by_leaves(lambda R, _: R.Stats(c, k), x, xp, m, labels, k)
    return backend.clipped_stats(x, labels, k, c, accumulate)


def clipped_class_grams(x, labels, num_classes: int, clip_norm: float, *, leaf_rows=None):
    """Per-class grams ``A_l = sum_{y_i = l} xbar_i xbar_i^T`` (per-class DP-LS).

    Add/remove sensitivity (Frobenius, over all K together): ``clip_norm**2``.
    ``leaf_rows``: as :func:`clipped_gram`.

    Returns
    -------
    A : array (num_classes, d, d), float64, symmetric.
    """
    xp, backend = _dispatch("stats", x, labels)
    x = _features(x, xp)
    k = _check_int(num_classes, "num_classes", 1)
    labels = _check_labels(_coerce(labels, "labels", xp), x.shape[0], k, xp)
    c = _check_clip_norm(clip_norm, x, "squares")
    m = _check_leaf_rows(leaf_rows)
    if m is not None:
        return _by_leaves(lambda R, _: R.ClassGrams(c, k), x, xp, m, labels, k)
    return backend.clipped_class_grams(x, labels, k, c)


def clipped_weighted_grams(x, weights, clip_norm: float, *, leaf_rows=None, weight_bound=None):
    """Per-class weighted grams ``H_l = sum_i w_il xbar_i xbar_i^T`` (DP Newton Hessians).

    Parameters
    ----------
    x : array (n, d)
    weights : array (n, K), non-negative (Newton: ``sigmoid'(w_l . xbar_i) <= 1/4``).
    clip_norm : float > 0
    leaf_rows : int or None
        As :func:`clipped_gram`.
    weight_bound : float > 0 or None
        With ``leaf_rows``: a public bound on every weight, which sets the grid (the
        result has the bits of ``reduction.WeightedGrams(clip_norm, K,
        weight_bound=weight_bound)`` and of the Dask backend with the same bound, e.g.
        Newton's 1/4); a larger weight raises. None: ``max(weights)``.

    Returns
    -------
    H : array (K, d, d), float64, symmetric. Add/remove sensitivity (Frobenius, all K
    together): ``clip_norm**2 * ||w_i||_2`` for the added example's weight row.
    """
    xp, backend = _dispatch("stats", x, weights)
    x = _features(x, xp)
    weights = _coerce(weights, "weights", xp)
    if weights.ndim != 2 or weights.shape[0] != x.shape[0]:
        raise ValueError(f"weights must have shape ({x.shape[0]}, K), got {tuple(weights.shape)}")
    _v.finite(_v.dtype_in(weights, "weights", _FLOAT_DTYPES), "weights", xp)
    # A row view's blocks are checked by the CPU backend as it reads them.
    if not getattr(weights, "_dpfc_row_view", False) and bool((weights < 0).any()):
        raise ValueError("weights must be non-negative")
    c = _check_clip_norm(clip_norm, x, "squares")
    m = _check_leaf_rows(leaf_rows)
    if weight_bound is not None:
        if m is None:
            raise ValueError("weight_bound sets the leaf reduction's grid: it needs leaf_rows")
        weight_bound = _check_positive(weight_bound, "weight_bound")
    if m is not None:
        if getattr(weights, "_dpfc_row_view", False):
            raise TypeError("leaf_rows needs weights as an array, not a row view")
        k = weights.shape[1]
        bound = weight_bound
        if bound is None:
            bound = float(weights.max()) if weights.size else 0.0
            bound = bound if bound > 0 else 1.0
        return _by_leaves(
            lambda R, _: R.WeightedGrams(c, k, weight_bound=bound),
            x,
            xp,
            m,
            weights=weights,
        )
    return backend.clipped_weighted_grams(x, weights, c)


def clipped_linear_grad(
    x,
    labels,
    w,
    bias,
    clip_norm: float,
    *,
    loss: str = "sigmoid",
    feature_clip: float | None = None,
    leaf_rows=None,
):
    """Sum of per-example gradients of a linear classifier, each clipped in Frobenius norm.

    Per-example gradients are rank one, ``g_i = r_i x_i^T`` with ``r_i = (p_i - e_{y_i}) / K``
    for the one-vs-all sigmoid loss averaged over the K classes (``p = sigmoid(W x + b)``)
    or ``r_i = softmax(W x + b) - e_{y_i}`` for softmax cross-entropy. Hence
    ``||g_i||_F = ||r_i|| ||x_i||`` exactly and the clipped sum is one matrix product,
    never materialising per-example gradients. The bias is fixed (not differentiated).

    Parameters
    ----------
    x : array (n, d); labels : int array (n,) in [0, K)
    w : array (K, d), the current weights; bias : array (K,) or float
    clip_norm : float > 0
        Per-example gradient clip bound C_g (add/remove sensitivity of the sum).
    loss : {"sigmoid", "softmax"}
    feature_clip : float > 0 or None
        If given, each feature row is first clipped to this norm (fused, no copy).
    leaf_rows : int or None
        As :func:`clipped_gram`.

    Returns
    -------
    grad : array (K, d), float64, ``sum_i min(1, C_g' / ||g_i||) g_i``.
    n_clipped : int, examples whose gradient was scaled down.
    """
    scalar_bias = _v.is_scalar(bias)
    xp, backend = _dispatch("stats", x, labels, w, None if scalar_bias else bias)
    x = _features(x, xp)
    w = _coerce(w, "w", xp)
    if w.ndim != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"w must have shape (K, {x.shape[1]}), got {tuple(w.shape)}")
    _v.finite(_v.dtype_in(w, "w", _FLOAT_DTYPES), "w", xp)
    k = w.shape[0]
    labels = _check_labels(_coerce(labels, "labels", xp), x.shape[0], k, xp)
    if scalar_bias:
        bias = xp.full((k,), _check_real(bias, "bias"), dtype=xp.float64)
    bias = _coerce(bias, "bias", xp)
    if bias.shape != (k,):
        raise ValueError(f"bias must be a float or have shape ({k},), got {tuple(bias.shape)}")
    _v.finite(_v.real_dtype(bias, "bias"), "bias", xp)
    c = _check_clip_norm(clip_norm, x, _grad_floor(x), width=k * int(x.shape[1]))
    _v.choice(loss, "loss", ("sigmoid", "softmax"))
    fc = None if feature_clip is None else _check_clip_norm(feature_clip, x, name="feature_clip")
    m = _check_leaf_rows(leaf_rows)
    if m is not None:
        return _by_leaves(
            lambda R, host: R.LinearGrad(c, host(w), host(bias), loss=loss, feature_clip=fc),
            x,
            xp,
            m,
            labels,
            k,
        )
    return backend.clipped_linear_grad(x, labels, w, bias, c, loss, fc)


# --------------------------------------------------------------------------------------
# The already-validated path
# --------------------------------------------------------------------------------------


class _Unchecked:
    """The statistics ops without their argument checks, for callers that validated once.

    The estimators check X (rank, dtype, finiteness) once per fit and derive every later
    argument themselves (clipped float64 rows, labels in ``[0, K)``, weights, ``W``), so
    the per-call checks of the public ops would only re-read the whole feature matrix
    (and sync the GPU) at every step. These entries dispatch straight to the backend:
    same results, bit for bit, as the public ops on valid arguments. A NaN that reached
    a statistic anyway is still refused by :mod:`dpfc_native.mechanisms` before release.
    Arguments: arrays of one device, ``x`` 2-D float32/float64 (or a row view) and
    finite, labels int64 in ``[0, num_classes)``, ``clip_norm`` a float > 0.
    """

    @staticmethod
    def clip_rows(x, clip_norm: float):
        return _dispatch("stats", x)[1].clip_rows(x, clip_norm)

    @staticmethod
    def clipped_gram(x, clip_norm: float, *, accumulate: str = "float64"):
        return _dispatch("stats", x)[1].clipped_gram(x, clip_norm, accumulate)

    @staticmethod
    def clipped_stats(
        x, labels, num_classes: int, clip_norm: float, *, accumulate: str = "float64"
    ):
        backend = _dispatch("stats", x, labels)[1]
        return backend.clipped_stats(x, labels, num_classes, clip_norm, accumulate)

    @staticmethod
    def clipped_class_sums(x, labels, num_classes: int, clip_norm: float):
        backend = _dispatch("stats", x, labels)[1]
        return backend.clipped_class_sums(x, labels, num_classes, clip_norm)

    @staticmethod
    def clipped_class_grams(x, labels, num_classes: int, clip_norm: float):
        backend = _dispatch("stats", x, labels)[1]
        return backend.clipped_class_grams(x, labels, num_classes, clip_norm)

    @staticmethod
    def clipped_weighted_grams(x, weights, clip_norm: float):
        return _dispatch("stats", x, weights)[1].clipped_weighted_grams(x, weights, clip_norm)

    @staticmethod
    def clipped_linear_grad(
        x,
        labels,
        w,
        bias,
        clip_norm: float,
        *,
        loss: str = "sigmoid",
        feature_clip: float | None = None,
    ):
        scalar_bias = _v.is_scalar(bias)
        xp, backend = _dispatch("stats", x, labels, w, None if scalar_bias else bias)
        if scalar_bias:
            bias = xp.full((w.shape[0],), float(bias), dtype=xp.float64)
        return backend.clipped_linear_grad(x, labels, w, bias, clip_norm, loss, feature_clip)


#: Entry point of the already-validated path (``ops._unchecked.clipped_gram(...)``).
_unchecked = _Unchecked()


# --------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------


def _key_words(key: Any) -> tuple[int, int, int, int]:
    """Split a 128-bit key into Philox key words and the counter's upper words."""
    if key is None:
        key = secrets.randbits(128)  # OS entropy: 128 bits of key material
    key = _v.integer(key, "key")
    if not 0 <= key < 1 << 128:
        raise ValueError(f"key must be in [0, 2**128), got {key}")
    return tuple((key >> (32 * i)) & 0xFFFFFFFF for i in range(4))  # type: ignore[return-value]


def _check_counter(counter: Any, blocks: int) -> int:
    c = _check_int(counter, "counter", 0)
    if c + blocks > 1 << 64:
        raise ValueError(f"counter + blocks used must stay below 2**64, got counter={c}")
    return c


def _check_noise_args(std, dtype, device):
    s = _v.nonneg(std, "std")
    dt = _v.float_dtype(dtype, "dtype")
    _v.choice(device, "device", ("cpu", "cuda"))
    return s, dt


def _device_module(device: str):
    """numpy for "cpu", cupy for "cuda" (a clear error when CuPy or the CUDA build is missing)."""
    return np if device == "cpu" else _cupy()


def sym_noise_blocks(d: int, batch: int = 1) -> int:
    """Philox blocks consumed by :func:`sym_gaussian_noise` (two normals per block)."""
    return noise_blocks(batch * d * (d + 1) // 2)


def noise_blocks(count: int) -> int:
    """Philox blocks consumed by ``count`` normals of :func:`gaussian_noise`."""
    return (int(count) + 1) // 2


def sym_gaussian_noise(
    d: int,
    std: float,
    *,
    batch: int | None = None,
    key: int | None = None,
    counter: int = 0,
    dtype=np.float64,
    device: str = "cpu",
):
    """Symmetric Gaussian noise: the Gaussian mechanism on a symmetric d x d statistic.

    Diagonal entries are N(0, std^2), off-diagonal N(0, std^2 / 2), mirrored: in the
    vectorisation ``v = (G_ii, sqrt(2) G_ij for i < j)``, whose norm is ``||G||_F``, this is
    i.i.d. N(0, std^2) per coordinate, so ``std = z * sensitivity`` with sensitivity in
    Frobenius norm. Only d(d+1)/2 normals are drawn per matrix.

    Parameters
    ----------
    d : int >= 1
    std : float >= 0
        Noise standard deviation (not a multiplier).
    batch : int or None
        None: one (d, d) matrix; else (batch, d, d), matrix b using the normals after
        those of matrices 0..b-1.
    key : int or None
        128-bit key. None draws a fresh one from OS entropy (the secure choice). An
        explicit key makes the noise reproducible, which is for experiments: anyone who
        knows it can remove the noise.
    counter : int >= 0
        First Philox block. The call consumes ``sym_noise_blocks(d, batch)`` blocks; a
        (key, block) pair must never serve two releases.
    dtype : float32 or float64
    device : "cpu" or "cuda" (CuPy array; bit-identical to the CPU output)
    """
    d, blocks, s, dt = _sym_noise_args(d, std, batch, dtype, device)
    words = _key_words(key)
    c = _check_counter(counter, blocks)
    return _backend("stats", _device_module(device)).sym_gaussian_noise(d, s, batch, words, c, dt)


def _sym_noise_args(d, std, batch, dtype, device):
    """(d, blocks, std, dtype) of :func:`sym_gaussian_noise`, checked (no draw)."""
    d = _check_int(d, "d", 1)
    nb = 1 if batch is None else _check_int(batch, "batch", 1)
    s, dt = _check_noise_args(std, dtype, device)
    return d, sym_noise_blocks(d, nb), s, dt


def gaussian_noise(
    shape,
    std: float,
    *,
    key: int | None = None,
    counter: int = 0,
    dtype=np.float64,
    device: str = "cpu",
):
    """I.i.d. N(0, std^2) noise of the given shape from the Philox stream (C order).

    Same key and counter conventions as :func:`sym_gaussian_noise`; consumes
    ``noise_blocks(prod(shape))`` blocks.
    """
    shape, blocks, s, dt = _noise_args(shape, std, dtype, device)
    words = _key_words(key)
    c = _check_counter(counter, blocks)
    return _backend("stats", _device_module(device)).gaussian_noise(shape, s, words, c, dt)


def _noise_args(shape, std, dtype, device):
    """(shape, blocks, std, dtype) of :func:`gaussian_noise`, checked (no draw)."""
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"shape must be an int or a sequence of ints, got {type(shape).__name__}")
    shape = tuple(_v.integer(v, "shape", 0) for v in shape)
    s, dt = _check_noise_args(std, dtype, device)
    return shape, noise_blocks(math.prod(shape)), s, dt


# --------------------------------------------------------------------------------------
# Cholesky
# --------------------------------------------------------------------------------------


def _check_square_batch(a, name: str):
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} must have shape (..., d, d), got {tuple(a.shape)}")
    if a.shape[-1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(a.shape)}")
    return _v.dtype_in(a, name, _FLOAT_DTYPES)


def cholesky(a):
    """Batched Cholesky factorisation ``a = L L^T``; failures are reported, not raised.

    Only the lower triangle of ``a`` is read.

    Parameters
    ----------
    a : array (..., d, d), float32 or float64

    Returns
    -------
    L : array (..., d, d), same dtype; lower triangular with zeros above the diagonal.
        For a matrix whose factorisation failed, L is all NaN (so ignoring ``info`` cannot
        silently give a wrong factor).
    info : int32 array (...)
        0 on success; k > 0 if the leading minor of order k is not positive definite, i.e.
        the k-th pivot is not > 0 (NaN counts as failure), as LAPACK's potrf reports it.
        On the GPU it stays on the device (no synchronisation).
    """
    xp, backend = _dispatch("linalg", a)
    return backend.cholesky(_check_square_batch(_coerce(a, "a", xp), "a"))


def cholesky_shifts(a, shifts):
    """Factor ``a + shifts[j] I`` for every shift in one call (a regularisation sweep).

    Parameters
    ----------
    a : array (d, d), float32 or float64. Only the lower triangle is read.
    shifts : array (m,) of finite reals on the same device (cast to ``a.dtype``).

    Returns
    -------
    L : array (m, d, d), same dtype and device as ``a``; all NaN where the factorisation
        failed.
    info : int32 array (m,), as :func:`cholesky` reports it.

    On the GPU one batched native call reads ``a`` once per tile (no stacked copy); on the
    CPU one LAPACK call per shift. No device synchronisation.
    """
    xp, backend = _dispatch("linalg", a, shifts)
    a = _check_square_batch(_coerce(a, "a", xp), "a")
    if a.ndim != 2:
        raise ValueError(f"a must have shape (d, d), got {tuple(a.shape)}")
    s = _coerce(shifts, "shifts", xp)
    _v.ndim(s, "shifts", 1, "(m,)")
    _v.finite(_v.real_dtype(s, "shifts"), "shifts", xp)
    return backend.cholesky_shifts(a, s)


def cho_solve(L, b):
    """Solve ``L L^T x = b`` given the lower Cholesky factor ``L``.

    Parameters
    ----------
    L : array (..., d, d), lower triangular (upper triangle ignored)
    b : array (..., d, m) or (..., d)
        Right-hand sides. If ``b.ndim == L.ndim - 1`` each is a vector, else a (d, m)
        matrix; batch dimensions broadcast (an unbatched L serves every batch entry of b;
        pass ``b[None]`` to use one (d, m) block for every matrix of a batched L).

    Returns
    -------
    x : array shaped like the broadcast of b, dtype ``result_type(L, b)`` (float).
    """
    xp, backend = _dispatch("linalg", L, b)
    L = _check_square_batch(_coerce(L, "L", xp), "L")
    b = _coerce(b, "b", xp)
    d = L.shape[-1]
    vector = b.ndim == L.ndim - 1
    if b.ndim < (1 if vector else 2) or b.shape[-1 if vector else -2] != d:
        raise ValueError(f"b must have shape (..., {d}, m) or (..., {d}), got {tuple(b.shape)}")
    _v.finite(_v.real_dtype(b, "b"), "b", xp)
    bm_shape = tuple(b.shape) + ((1,) if vector else ())
    shape = np.broadcast_shapes(tuple(L.shape[:-2]), bm_shape[:-2]) + bm_shape[-2:]
    if math.prod(shape) == 0:  # no right-hand side (m = 0 or an empty batch): nothing to solve
        out = xp.zeros(shape, dtype=np.result_type(L.dtype, b.dtype, np.float32))
        return out[..., 0] if vector else out
    return backend.cho_solve(L, b)
