"""GPU (CuPy) implementations behind :mod:`dpfc_native.ops` for clipping, the clipped
statistics, the clipped linear-layer gradient and the Philox Gaussian noise.

Private: :mod:`dpfc_native.ops` validates the arguments (finite values, shapes, labels in
range, positive clip norms) and calls these with CuPy arrays. Each function launches the
native kernels of ``dpfc_native._core`` (``csrc/cuda/{stats,noise,linear_grad}.cu``) on
CuPy's current stream, with the GIL released, and returns CuPy arrays without waiting for
the device, except :func:`clipped_linear_grad`, which synchronises once to return its
clipped-row count as a Python ``int`` (and by default runs its two GEMM-shaped passes on
cuBLAS through CuPy's matmul, between native kernels).

Layout rules for ``x``: rows may have any row stride (a view such as ``x[:, :d]`` or
``x[::2]`` is used in place, without copying); the elements of a row must be contiguous.
An array whose element stride along ``d`` is not 1 (for example a transposed view) is
copied to a C-contiguous array first (one extra device copy).

Accumulation modes (``accumulate``) of the Gram family, with their error per entry of G
relative to ``A_ab = sum_i |xbar_ia xbar_ib|`` (worst case; eps32 = 2**-24):

* "float64" (default): float64 products and sums, on the FP64 tensor cores (DMMA:
  mma.sync m16n8k8 on sm_90, m8n8k4 on sm_80) by default; the kernel knob
  ``gram_kernel="mma884"`` (``DPFC_GRAM_KERNEL``, see :mod:`dpfc_native._config`) forces the
  m8n8k4 shape, ``"simt"`` the FP64 SIMT kernel. Error ~ n * 2**-53.
* "float32": xbar rounded to float32, products summed in float32 over blocks of at most
  4096 rows, block sums added in float64: error <= (4096 + 8) eps32 (typically
  sqrt(4096) eps32).
* "tf32" / "bf16" (exploration): as "float32", with xbar further rounded to TF32
  (u = 2**-11) or bfloat16 (u = 2**-8) and multiplied on the tensor cores: error
  <= 2u + u**2 + (4096 + 8) eps32, i.e. about 1.2e-3 (tf32) and 8.1e-3 (bf16).

Class sums are always accumulated in float64 (the float32 input values are exact in float64).
"""

from __future__ import annotations

import os

import numpy as np

from . import _config

__all__ = [
    "clip_rows",
    "clipped_gram",
    "clipped_class_sums",
    "clipped_stats",
    "clipped_class_grams",
    "clipped_weighted_grams",
    "sym_gaussian_noise",
    "gaussian_noise",
    "clipped_linear_grad",
]

# Element type codes of csrc/cuda/runtime.cuh (DType).
_DTYPE_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}
_FLOATS = ("float32", "float64")
_ALL_FLOATS = ("float32", "float64", "float16", "bfloat16")
_GPU_MODES = ("float64", "float32", "tf32", "bf16")


def _cupy():
    import cupy

    return cupy


def _core():
    from . import _core as core

    return core


def _stream() -> int:
    return int(_cupy().cuda.get_current_stream().ptr)


def _dtype_code(dtype, allowed, name: str) -> int:
    key = str(dtype)
    if key not in allowed:
        raise TypeError(f"{name} must have dtype in {allowed}, got {dtype}")
    return _DTYPE_CODES[key]


def _rows(x, name: str = "x"):
    """(x, ld): x with unit element stride (copied if needed) and its row stride in elements."""
    cp = _cupy()
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(x.shape)}")
    n, d = x.shape
    item = x.itemsize
    s0, s1 = x.strides
    unit = d <= 1 or s1 == item
    rows_ok = n <= 1 or (s0 > 0 and s0 % item == 0 and s0 // item >= d)
    if not (unit and rows_ok):
        x = cp.ascontiguousarray(x)
        s0 = x.strides[0]
    ld = s0 // item if n > 1 else d
    return x, max(int(ld), d)


def _check_mode(accumulate: str) -> str:
    if accumulate not in _GPU_MODES:
        raise ValueError(f"accumulate must be one of {_GPU_MODES}, got {accumulate!r}")
    return accumulate


def _gram_kernel(kernel: str | None) -> str:
    """The float64 Gram engine: ``kernel``, or the configured one (``DPFC_GRAM_KERNEL``)."""
    return _config.get().gram_kernel if kernel is None else kernel


def _labels32(labels):
    cp = _cupy()
    return cp.ascontiguousarray(labels, dtype=cp.int32)


# --------------------------------------------------------------------------------------
# Clipping and clipped statistics
# --------------------------------------------------------------------------------------


def clip_rows(x, clip_norm: float):
    """``(x_i * s_i, s_i)`` with ``s_i = clip_scale(||x_i||, C)``; x float32/float64.

    Returns ``x_clipped`` (same dtype, C-contiguous) and ``scale`` (float64, (n,)).
    """
    cp = _cupy()
    with x.device:
        x, ld = _rows(x)
        code = _dtype_code(x.dtype, _FLOATS, "x")
        n, d = x.shape
        out = cp.empty((n, d), dtype=x.dtype)
        scale = cp.empty((n,), dtype=cp.float64)
        if n == 0:
            return out, scale
        if d == 0:
            scale.fill(1.0)
            return out, scale
        _core().cuda_clip_rows(
            x.data.ptr, code, n, d, ld, float(clip_norm), out.data.ptr, d, scale.data.ptr, _stream()
        )
        return out, scale


def _gram_into(x, clip_norm: float, accumulate: str, out, kernel: str | None = None):
    """Writes the clipped gram of x into ``out`` ((d, d) float64 C-contiguous)."""
    x, ld = _rows(x)
    code = _dtype_code(x.dtype, _ALL_FLOATS, "x")
    n, d = x.shape
    if n == 0 or d == 0:
        out.fill(0.0)
        return out
    _core().cuda_clipped_gram(
        x.data.ptr,
        code,
        n,
        d,
        ld,
        float(clip_norm),
        accumulate,
        out.data.ptr,
        _stream(),
        _gram_kernel(kernel),
    )
    return out


def clipped_gram(x, clip_norm: float, accumulate: str = "float64"):
    """``G = sum_i xbar_i xbar_i^T`` ((d, d) float64, symmetric, every element written)."""
    cp = _cupy()
    mode = _check_mode(accumulate)
    with x.device:
        d = x.shape[1]
        out = cp.empty((d, d), dtype=cp.float64)
        return _gram_into(x, clip_norm, mode, out)


def _labelled(
    launcher: str, x, labels, num_classes, clip_norm, zeroed, args, kernel=None, gram=False
):
    """``_core().<launcher>(x, dtype code, n, d, ldx, labels, K, C, *args, stream)`` on the
    rows of ``x`` and their labels, the float64 Gram engine last where ``gram``. With no
    rows or no columns nothing is launched: the arrays in ``zeroed`` are zeroed."""
    x, ld = _rows(x)
    code = _dtype_code(x.dtype, _ALL_FLOATS, "x")
    n, d = x.shape
    if n == 0 or d == 0:
        for a in zeroed:
            a.fill(0)
        return
    lab = _labels32(labels)
    tail = (_stream(), _gram_kernel(kernel)) if gram else (_stream(),)
    getattr(_core(), launcher)(
        x.data.ptr, code, n, d, ld, lab.data.ptr, int(num_classes), float(clip_norm), *args, *tail
    )


def _class_sums_into(x, labels, num_classes: int, clip_norm: float, out, counts=None):
    _labelled(
        "cuda_clipped_class_sums",
        x,
        labels,
        num_classes,
        clip_norm,
        (out,) if counts is None else (out, counts),
        (out.data.ptr, 0 if counts is None else counts.data.ptr),
    )
    return out


def clipped_class_sums(x, labels, num_classes: int, clip_norm: float):
    """``B[l] = sum_{y_i = l} xbar_i`` ((K, d) float64)."""
    cp = _cupy()
    with x.device:
        out = cp.empty((int(num_classes), x.shape[1]), dtype=cp.float64)
        return _class_sums_into(x, labels, num_classes, clip_norm, out)


def _stats_into(
    x,
    labels,
    num_classes: int,
    clip_norm: float,
    accumulate: str,
    g,
    b,
    counts,
    kernel: str | None = None,
):
    _labelled(
        "cuda_clipped_stats",
        x,
        labels,
        num_classes,
        clip_norm,
        (g, b, counts),
        (accumulate, g.data.ptr, b.data.ptr, counts.data.ptr),
        kernel,
        gram=True,
    )
    return g, b, counts


def clipped_stats(x, labels, num_classes: int, clip_norm: float, accumulate: str = "float64"):
    """``(G, B, counts)``: gram (d, d) float64, class sums (K, d) float64, counts (K,) int64."""
    cp = _cupy()
    mode = _check_mode(accumulate)
    with x.device:
        d = x.shape[1]
        k = int(num_classes)
        g = cp.empty((d, d), dtype=cp.float64)
        b = cp.empty((k, d), dtype=cp.float64)
        counts = cp.empty((k,), dtype=cp.int64)
        return _stats_into(x, labels, k, clip_norm, mode, g, b, counts)


def _class_grams_into(
    x, labels, num_classes: int, clip_norm: float, out, kernel: str | None = None
):
    _labelled(
        "cuda_clipped_class_grams",
        x,
        labels,
        num_classes,
        clip_norm,
        (out,),
        (out.data.ptr,),
        kernel,
        gram=True,
    )
    return out


def clipped_class_grams(x, labels, num_classes: int, clip_norm: float):
    """``A_l = sum_{y_i = l} xbar_i xbar_i^T`` ((K, d, d) float64)."""
    cp = _cupy()
    with x.device:
        d = x.shape[1]
        out = cp.empty((int(num_classes), d, d), dtype=cp.float64)
        return _class_grams_into(x, labels, num_classes, clip_norm, out)


def _weighted_grams_into(x, weights, clip_norm: float, out, kernel: str | None = None):
    cp = _cupy()
    x, ld = _rows(x)
    code = _dtype_code(x.dtype, _ALL_FLOATS, "x")
    n, d = x.shape
    k = weights.shape[1]
    if n == 0 or d == 0 or k == 0:
        out.fill(0.0)
        return out
    w = cp.ascontiguousarray(weights, dtype=cp.float64)
    _core().cuda_clipped_weighted_grams(
        x.data.ptr,
        code,
        n,
        d,
        ld,
        w.data.ptr,
        k,
        k,
        float(clip_norm),
        out.data.ptr,
        _stream(),
        _gram_kernel(kernel),
    )
    return out


def clipped_weighted_grams(x, weights, clip_norm: float):
    """``H_l = sum_i weights[i, l] xbar_i xbar_i^T`` ((K, d, d) float64; weights (n, K))."""
    cp = _cupy()
    with x.device:
        d = x.shape[1]
        out = cp.empty((int(weights.shape[1]), d, d), dtype=cp.float64)
        return _weighted_grams_into(x, weights, clip_norm, out)


# --------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------


def _noise_dtype(dtype) -> int:
    return _dtype_code(np.dtype(dtype), _FLOATS, "dtype")


def _key(key_words) -> list:
    words = [int(v) for v in key_words]
    if len(words) != 4 or any(not 0 <= v < 1 << 32 for v in words):
        raise ValueError("key_words must be four 32-bit unsigned integers")
    return words


def _sym_noise_into(out, std: float, key_words, block0: int):
    """Fills out ((batch, d, d) C-contiguous float32/float64) with symmetric noise."""
    batch, d = out.shape[0], out.shape[1]
    if out.size == 0:
        return out
    _core().cuda_sym_gaussian_noise(
        out.data.ptr,
        _noise_dtype(out.dtype),
        batch,
        d,
        float(std),
        _key(key_words),
        int(block0),
        _stream(),
    )
    return out


def sym_gaussian_noise(d: int, std: float, batch, key_words, block0: int, dtype):
    """Symmetric noise (batch, d, d) (or (d, d) when batch is None), bit-identical to
    ``dpfc_native._core.cpu_sym_gaussian_noise`` for the same key words and block0."""
    cp = _cupy()
    nb = 1 if batch is None else int(batch)
    out = cp.empty((nb, int(d), int(d)), dtype=np.dtype(dtype))
    _sym_noise_into(out, std, key_words, block0)
    return out[0] if batch is None else out


def _gaussian_into(out, std: float, key_words, block0: int):
    flat = out.reshape(-1)
    if flat.size == 0:
        return out
    _core().cuda_gaussian_noise(
        flat.data.ptr,
        _noise_dtype(out.dtype),
        flat.size,
        float(std),
        _key(key_words),
        int(block0),
        _stream(),
    )
    return out


def gaussian_noise(shape, std: float, key_words, block0: int, dtype):
    """I.i.d. N(0, std^2) of the given shape (C order), bit-identical to
    ``dpfc_native._core.cpu_gaussian_noise``."""
    cp = _cupy()
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(v) for v in shape)
    out = cp.empty(shape, dtype=np.dtype(dtype))
    return _gaussian_into(out, std, key_words, block0)


# --------------------------------------------------------------------------------------
# Clipped linear-layer gradient
# --------------------------------------------------------------------------------------


# Gradient engines (kernel knob grad_kernel, DPFC_GRAD_KERNEL): "cublas" (default) forms both
# GEMM-shaped passes with CuPy's matmul (cuBLAS, float32 or float64 without TF32) around the
# native row epilogue; the others run the whole gradient in csrc/cuda/linear_grad.cu with the
# named outer-product engine.
_LG_BLOCK = 4096  # chunk sizes are multiples of the default float32 block
_LG_Z_BYTES = 128 << 20  # logits workspace per chunk
_LG_X_BYTES = 256 << 20  # scaled-rows workspace per chunk


def _tf32_matmul() -> bool:
    """Whether CuPy would run a float32 matmul on TF32 tensor cores (CUPY_TF32=1)."""
    try:
        from cupy._core import _routines_linalg as rl

        return rl.get_compute_type(np.float32) == rl.COMPUTE_TYPE_TF32
    except Exception:
        return os.environ.get("CUPY_TF32", "0") not in ("", "0")


def _grad_engine(dtype) -> str:
    """ "cublas" or "native": where the clipped gradient of ``dtype`` features runs."""
    v = _config.get().grad_kernel
    tf32 = np.dtype(dtype) == np.float32 and _tf32_matmul()
    if v == "cublas" and tf32:
        raise ValueError(
            "DPFC_GRAD_KERNEL=cublas with CUPY_TF32=1: TF32 would round the "
            "clipped per-example terms (use the native engines)"
        )
    if v == "auto":
        return "native" if tf32 else "cublas"
    return v if v == "cublas" else "native"


def _lg_chunk_rows(n: int, k: int, d: int, item: int) -> int:
    """Rows per chunk of the cuBLAS path: the configured ``lg_chunk``, else what fits the
    logits and scaled-rows budgets (a multiple of the float32 block when possible)."""
    nc = _config.get().lg_chunk
    if nc is not None:
        return min(nc, n)
    nc = min(_LG_Z_BYTES // (k * item), _LG_X_BYTES // (d * item))
    nc = (nc // _LG_BLOCK) * _LG_BLOCK if nc >= _LG_BLOCK else max(128, nc)
    return min(nc, n)


def _native_chunk_rows(n: int, k: int, item: int) -> int:
    """Rows per chunk of the native path: the configured ``lg_chunk``, else what fits the
    logits budget (a multiple of 128 rows, at least 128)."""
    nc = _config.get().lg_chunk
    if nc is None:
        nc = max(128, (_LG_Z_BYTES // (k * item) // 128) * 128)
    return min(nc, n)


def _linear_grad_cublas(x, ld, code, lab, wc, b, clip_norm, loss, feature_clip, grad, n_clipped):
    """Per chunk: Z = X W^T (cuBLAS), the native epilogue (Z <- r_i / ||r_i||, f_i =
    s_i c_i ||r_i||), X' = f X (native, product in double), grad += Z^T X' (cuBLAS; float32
    in blocks of ``lg_block`` rows (``DPFC_LG_BLOCK``, 4096), whose sums are added in
    float64)."""
    cp = _cupy()
    core = _core()
    st = _stream()
    n, d = x.shape
    k = wc.shape[0]
    item = x.itemsize
    norms = cp.empty(n, dtype=cp.float64)
    fs = None if feature_clip is None else cp.empty(n, dtype=cp.float64)
    core.cuda_row_norms(
        x.data.ptr,
        code,
        n,
        d,
        ld,
        0.0 if fs is None else float(feature_clip),
        norms.data.ptr,
        0 if fs is None else fs.data.ptr,
        st,
    )
    nc = _lg_chunk_rows(n, k, d, item)
    blk = _config.get().lg_block
    zbuf = cp.empty((nc, k), dtype=x.dtype)
    xbuf = cp.empty((nc, d), dtype=x.dtype)
    fbuf = cp.empty(nc, dtype=cp.float64)
    grad.fill(0.0)
    n_clipped.fill(0)
    wt = wc.T
    for c0 in range(0, n, nc):
        rows = min(nc, n - c0)
        xc = x[c0 : c0 + rows]
        z, xs = zbuf[:rows], xbuf[:rows]
        cp.matmul(xc, wt, out=z)
        core.cuda_residual_clip(
            z.data.ptr,
            code,
            rows,
            k,
            lab.data.ptr + 4 * c0,
            norms.data.ptr + 8 * c0,
            0 if fs is None else fs.data.ptr + 8 * c0,
            0 if b is None else b.data.ptr,
            float(clip_norm),
            str(loss),
            fbuf.data.ptr,
            n_clipped.data.ptr,
            st,
        )
        core.cuda_scale_rows(xc.data.ptr, code, rows, d, ld, fbuf.data.ptr, xs.data.ptr, d, st)
        if x.dtype == cp.float64:
            grad += z.T @ xs
            continue
        nb = rows // blk
        if nb:
            m = nb * blk
            part = cp.matmul(
                z[:m].reshape(nb, blk, k).transpose(0, 2, 1), xs[:m].reshape(nb, blk, d)
            )
            grad += part.sum(axis=0, dtype=cp.float64)
        if rows % blk:
            m = nb * blk
            grad += (z[m:].T @ xs[m:]).astype(cp.float64)


def _linear_grad_into(x, labels, w, bias, clip_norm, loss, feature_clip, grad, n_clipped):
    cp = _cupy()
    x, ld = _rows(x)
    code = _dtype_code(x.dtype, _FLOATS, "x")
    if loss not in ("sigmoid", "softmax"):
        raise ValueError(f"loss must be 'sigmoid' or 'softmax', got {loss!r}")
    n, d = x.shape
    k = w.shape[0]
    if n == 0 or d == 0:
        grad.fill(0.0)
        n_clipped.fill(0)
        return grad, n_clipped
    # W is used in x's precision (float32 logits for float32 features), contiguous.
    wc = cp.ascontiguousarray(w, dtype=x.dtype)
    b = None if bias is None else cp.ascontiguousarray(bias, dtype=cp.float64)
    lab = _labels32(labels)
    if _grad_engine(x.dtype) == "cublas":
        _linear_grad_cublas(x, ld, code, lab, wc, b, clip_norm, loss, feature_clip, grad, n_clipped)
        return grad, n_clipped
    engine = _config.get().grad_kernel  # a native engine name, or "auto"
    _core().cuda_clipped_linear_grad(
        x.data.ptr,
        code,
        n,
        d,
        ld,
        lab.data.ptr,
        wc.data.ptr,
        d,
        0 if b is None else b.data.ptr,
        k,
        float(clip_norm),
        str(loss),
        -1.0 if feature_clip is None else float(feature_clip),
        grad.data.ptr,
        n_clipped.data.ptr,
        _stream(),
        engine,
        _native_chunk_rows(n, k, x.itemsize),
    )
    return grad, n_clipped


def clipped_linear_grad(x, labels, w, bias, clip_norm, loss, feature_clip):
    """``(grad, n_clipped)``: grad (K, d) float64 on the device, n_clipped a Python int.

    The logits are computed in x's precision (float32 for float32 features, never TF32);
    the clipped gradient is accumulated in float64 (float32 features: float32 products
    summed over blocks of at most 4096 rows, block sums added in float64). Reading
    n_clipped synchronises the current stream once.

    By default both GEMM-shaped passes run on cuBLAS through CuPy's matmul and the native
    kernels do the rest: row norms, the fused residual / clip-factor epilogue and the row
    scaling (kernel knob ``grad_kernel="cublas"``, ``DPFC_GRAD_KERNEL``; see
    :mod:`dpfc_native._config`). ``grad_kernel="simt32" | "mma" | "mma884" | "simt"`` runs
    the whole gradient in the native kernels instead, as does the default when CuPy runs
    float32 matmuls on TF32 (``CUPY_TF32=1``). ``lg_chunk`` sets the rows per chunk,
    ``lg_block`` the rows per float32 product block (cuBLAS path).
    """
    cp = _cupy()
    with x.device:
        k, d = int(w.shape[0]), int(x.shape[1])
        grad = cp.empty((k, d), dtype=cp.float64)
        n_clipped = cp.empty((), dtype=cp.int64)
        _linear_grad_into(x, labels, w, bias, clip_norm, loss, feature_clip, grad, n_clipped)
        return grad, int(n_clipped.get())
