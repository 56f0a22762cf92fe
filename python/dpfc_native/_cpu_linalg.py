"""CPU implementations behind :mod:`dpfc_native.ops` for the batched Cholesky
factorisation and solves: LAPACK (``?potrf``, ``?potrs``) through SciPy, one call per matrix
(the GPU ones are in :mod:`dpfc_native._gpu_linalg`, with the same signatures).

Private: :mod:`dpfc_native.ops` validates the arguments and calls these with NumPy arrays.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.lapack as _lapack

__all__ = ["cholesky", "cho_solve", "cholesky_shifts"]


def cholesky(a: np.ndarray):
    """``(L, info)`` for a batch ``a`` (..., d, d): failed matrices' L all NaN, info as potrf."""
    d = a.shape[-1]
    batch_shape = a.shape[:-2]
    flat = a.reshape(-1, d, d)
    potrf = _lapack.dpotrf if a.dtype == np.float64 else _lapack.spotrf
    out = np.empty_like(flat)
    info = np.zeros(flat.shape[0], dtype=np.int32)
    for i in range(flat.shape[0]):
        lower, code = potrf(flat[i], lower=1, clean=1, overwrite_a=0)
        if code == 0:
            # Some LAPACKs let NaN pivots through, and an infinite pivot (a matrix or a
            # shift beyond the dtype's range) "succeeds": a factor row that is not finite
            # and positive on the diagonal is a failure at that row.
            bad = ~(np.diagonal(lower) > 0) | ~np.isfinite(lower).all(axis=1)
            if bad.any():
                code = int(np.argmax(bad)) + 1
        if code != 0:
            lower = np.full((d, d), np.nan, dtype=a.dtype)
        out[i] = lower
        info[i] = code
    return out.reshape(a.shape), info.reshape(batch_shape)


def cholesky_shifts(a: np.ndarray, shifts: np.ndarray):
    """``(L, info)`` of ``a + shifts[j] I`` for every j: (m, d, d) and (m,)."""
    d = a.shape[-1]
    m = shifts.shape[0]
    L = np.empty((m, d, d), dtype=a.dtype)
    info = np.zeros((m,), dtype=np.int32)
    idx = np.arange(d)
    with np.errstate(over="ignore"):  # a shift beyond the dtype's range: inf, a failure
        cast = shifts.astype(a.dtype)
    for j in range(m):
        shifted = np.array(a, copy=True)
        shifted[idx, idx] += cast[j]
        L[j], info[j] = cholesky(shifted)
    return L, info


def cho_solve(L: np.ndarray, b: np.ndarray):
    """Solve ``L L^T x = b`` (b (..., d, m) or (..., d) when ``b.ndim == L.ndim - 1``; batch
    dimensions broadcast), in ``result_type(L, b, float32)``."""
    d = L.shape[-1]
    vector = b.ndim == L.ndim - 1
    dtype = np.result_type(L.dtype, b.dtype, np.float32)
    bm = b[..., None] if vector else b
    batch = np.broadcast_shapes(L.shape[:-2], bm.shape[:-2])
    Lb = np.broadcast_to(L, batch + (d, d)).reshape(-1, d, d)
    bb = np.broadcast_to(bm, batch + bm.shape[-2:]).reshape(-1, d, bm.shape[-1])
    potrs = _lapack.dpotrs if dtype == np.float64 else _lapack.spotrs
    out = np.empty(bb.shape, dtype=dtype)
    for i in range(bb.shape[0]):
        sol, code = potrs(Lb[i].astype(dtype, copy=False), bb[i].astype(dtype), lower=1)
        if code != 0:  # pragma: no cover - only for invalid arguments
            raise ValueError(f"cho_solve: LAPACK potrs failed with info={code}")
        out[i] = sol
    out = out.reshape(batch + bm.shape[-2:])
    return out[..., 0] if vector else out
