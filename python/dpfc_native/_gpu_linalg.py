"""GPU glue for the batched Cholesky kernels (csrc/cuda/cholesky.cu).

Called by :mod:`dpfc_native.ops` (and :mod:`dpfc_native.linalg`) with validated CuPy
arrays. Everything runs on the current CuPy stream of the array's device and nothing
synchronises: ``info`` stays on the device. Inputs that are not C-contiguous are copied.

Kernel choice can be steered (benchmarks, fallbacks) by the kernel knobs of
:mod:`dpfc_native._config`, passed to the native calls as arguments: ``chol_kernel``
(``DPFC_CHOL_KERNEL=mma|simt``: float64 update GEMM on the tensor cores, or the SIMT
fallback), ``chol_schedule`` (``DPFC_CHOL_SCHEDULE=auto|left|right``) and
``chol_small_max`` (``DPFC_CHOL_SMALL_MAX``: the largest d for the one-block-per-matrix
kernel, default 128). See :func:`plan`.
"""

from __future__ import annotations

import math

import numpy as np

from . import _config, _core

__all__ = ["cholesky", "cho_solve", "cholesky_shifts", "eigh", "plan", "EIGH_BATCHED_MAX_D"]

#: Largest order d whose batches go to cuSOLVER's batched Jacobi solver (``syevjBatched``,
#: through ``cupy.linalg.eigh`` of the whole stack: one launch for the batch). Above it the
#: Jacobi sweeps cost more than one divide-and-conquer ``syevd`` call per matrix (cuSOLVER
#: documents the batched Jacobi solver for small matrices), so larger batches loop.
EIGH_BATCHED_MAX_D = 32


def _cupy():
    import cupy

    return cupy


def _stream_ptr() -> int:
    return int(_cupy().cuda.get_current_stream().ptr)


def _dtype_code(dtype) -> int:
    """The DType code of csrc/cuda/runtime.cuh (float32 0, float64 1)."""
    dt = np.dtype(dtype)
    if dt == np.float64:
        return 1
    if dt == np.float32:
        return 0
    raise TypeError(f"expected float32 or float64, got {dt}")


def _options() -> dict:
    """The Cholesky kernel options of the active kernel configuration."""
    cfg = _config.get()
    return {
        "kernel": cfg.chol_kernel,
        "schedule": cfg.chol_schedule,
        "small_max": cfg.chol_small_max,
    }


def _factor(
    a_ptr: int, a_batch_stride: int, shifts_ptr: int, L, info, batch: int, d: int, dtype
) -> None:
    """One native factorisation call on the current stream, with a work space from CuPy's
    (stream-ordered) pool when the blocked path needs one."""
    cp = _cupy()
    options = _options()
    code = _dtype_code(dtype)
    nbytes = int(
        _core.cuda_cholesky_workspace_bytes(batch, d, code, small_max=options["small_max"])
    )
    ws = cp.empty((nbytes,), dtype=cp.uint8) if nbytes else None
    _core.cuda_cholesky(
        a_ptr,
        a_batch_stride,
        d,
        shifts_ptr,
        L.data.ptr,
        info.data.ptr,
        batch,
        d,
        code,
        _stream_ptr(),
        0 if ws is None else ws.data.ptr,
        nbytes,
        **options,
    )


def cholesky(a):
    """Batched Cholesky of a CuPy array ``a`` (..., d, d): returns ``(L, info)`` on the device.

    Only the lower triangle of ``a`` is read. ``info`` is int32 of shape ``a.shape[:-2]``
    (0, or the 1-based order of the first leading minor that is not positive definite);
    a failed matrix's L is all NaN. No synchronisation.
    """
    cp = _cupy()
    d = int(a.shape[-1])
    batch_shape = tuple(a.shape[:-2])
    batch = math.prod(batch_shape)
    with a.device:
        L = cp.empty((batch, d, d), dtype=a.dtype)
        info = cp.empty((batch,), dtype=cp.int32)
        if batch == 0:
            return L.reshape(a.shape), info.reshape(batch_shape)
        flat = cp.ascontiguousarray(a).reshape(batch, d, d)
        _factor(flat.data.ptr, d * d, 0, L, info, batch, d, a.dtype)
    return L.reshape(a.shape), info.reshape(batch_shape)


def cholesky_shifts(a, shifts):
    """Factor ``a + shifts[j] I`` for every j in one launch sequence.

    Parameters
    ----------
    a : CuPy array (d, d), float32 or float64 (lower triangle read)
    shifts : CuPy array (m,), any real dtype (cast to ``a.dtype``)

    Returns
    -------
    L : (m, d, d), info : int32 (m,), both on the device (no synchronisation).
    """
    cp = _cupy()
    d = int(a.shape[-1])
    m = int(shifts.shape[0])
    with a.device:
        L = cp.empty((m, d, d), dtype=a.dtype)
        info = cp.empty((m,), dtype=cp.int32)
        if m == 0:
            return L, info
        src = cp.ascontiguousarray(a)
        sh = cp.ascontiguousarray(shifts, dtype=a.dtype)
        _factor(src.data.ptr, 0, sh.data.ptr, L, info, m, d, a.dtype)
    return L, info


def _batch_operand(x, batch_shape, tail, dtype):
    """x broadcast to batch_shape + tail as a contiguous array and its batch stride.

    Returns (array, stride) where stride is 0 when one block serves the whole batch
    (no copy of the broadcast), else the element count of one block.
    """
    cp = _cupy()
    block = math.prod(tail)
    own = tuple(x.shape[: x.ndim - len(tail)])
    if math.prod(own) == 1:
        return cp.ascontiguousarray(x.reshape(tail), dtype=dtype), 0
    if own != tuple(batch_shape):
        x = cp.broadcast_to(x, tuple(batch_shape) + tuple(tail))
    return cp.ascontiguousarray(x, dtype=dtype), block


def cho_solve(L, b):
    """Solve ``L L^T x = b`` with CuPy arrays (validated by :func:`dpfc_native.ops.cho_solve`).

    ``L`` (..., d, d) lower; ``b`` (..., d, m) or (..., d) (when ``b.ndim == L.ndim - 1``);
    batch dimensions broadcast. Returns x in ``result_type(L, b, float32)``.
    """
    cp = _cupy()
    d = int(L.shape[-1])
    vector = b.ndim == L.ndim - 1
    bm = b[..., None] if vector else b
    m = int(bm.shape[-1])
    dtype = np.result_type(L.dtype, b.dtype, np.float32)
    batch_shape = tuple(np.broadcast_shapes(tuple(L.shape[:-2]), tuple(bm.shape[:-2])))
    batch = math.prod(batch_shape)
    with L.device:
        x = cp.empty((batch, d, m), dtype=dtype)
        if batch > 0 and m > 0:
            Lc, l_stride = _batch_operand(L, batch_shape, (d, d), dtype)
            bc, b_stride = _batch_operand(bm, batch_shape, (d, m), dtype)
            _core.cuda_cho_solve(
                Lc.data.ptr,
                l_stride,
                bc.data.ptr,
                b_stride,
                m,
                x.data.ptr,
                batch,
                d,
                m,
                _dtype_code(dtype),
                _stream_ptr(),
            )
    x = x.reshape(batch_shape + (d, m))
    return x[..., 0] if vector else x


def eigh(a):
    """Symmetric eigendecomposition of a CuPy batch ``a`` (b, d, d): ``(w (b, d), v (b, d, d))``.

    Only the lower triangle is read; eigenvalues ascending, eigenvectors in the columns,
    in ``a``'s dtype, on the current stream (no synchronisation beyond cuSOLVER's own).
    ``d <= EIGH_BATCHED_MAX_D`` with several matrices: one batched Jacobi call
    (``syevjBatched``); otherwise one ``syevd`` (divide and conquer) per matrix.
    """
    cp = _cupy()
    b, d = int(a.shape[0]), int(a.shape[-1])
    with a.device:
        if b > 1 and d <= EIGH_BATCHED_MAX_D:
            return cp.linalg.eigh(a, UPLO="L")
        w = cp.empty((b, d), dtype=a.dtype)
        v = cp.empty((b, d, d), dtype=a.dtype)
        for i in range(b):
            w[i], v[i] = cp.linalg.eigh(a[i], UPLO="L")
    return w, v


def plan(batch: int, d: int, dtype="float64") -> str:
    """The kernels :func:`cholesky` would use for ``batch`` matrices of order ``d`` (with the
    active kernel configuration)."""
    return str(_core.cuda_cholesky_plan(int(batch), int(d), _dtype_code(dtype), **_options()))
