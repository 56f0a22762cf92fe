"""Type stub of the private compiled module (mirrors csrc/bindings.cpp and csrc/cuda/*_bind.cpp);
use dpfc_native.ops.

Naming (see the comment at the top of csrc/bindings.cpp): ``cpu_<op>`` runs on the host on
NumPy arrays; ``cuda_<op>`` takes device pointers, extents and strides in elements, a dtype
code (0 float32, 1 float64, 2 float16, 3 bfloat16) and a stream, all as ints, enqueues work
and never synchronises; other names are backend-neutral helpers.
"""

import numpy as np
import numpy.typing as npt

__version__: str
cuda_compiled: bool
cuda_arches: str
clip_margin: float

class CudaError(RuntimeError): ...

# Device pointers and CUDA streams travel as Python ints (CuPy's .data.ptr, stream .ptr).
_Ptr = int
_Stream = int
_KeyWords = tuple[int, int, int, int] | list[int]

def philox4x32_10(
    counter: tuple[int, int, int, int], key: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Raw Philox4x32-10 block: four 32-bit counter words, two key words."""

def cpu_sym_gaussian_noise(
    out: npt.NDArray[np.floating], std: float, key_words: _KeyWords, block0: int
) -> None:
    """Fill out (batch, d, d) with symmetric Gaussian noise (diag std, off-diag std/sqrt 2)."""

def cpu_gaussian_noise(
    out: npt.NDArray[np.floating], std: float, key_words: _KeyWords, block0: int
) -> None:
    """Fill a contiguous array with i.i.d. N(0, std^2) from the Philox stream."""

def cpu_grid_accumulate(
    v: npt.NDArray[np.float64],
    scale: float,
    limit: float,
    hi: npt.NDArray[np.int64],
    lo: npt.NDArray[np.int64],
    tri_d: int = 0,
) -> int:
    """Exact two-limb fixed-grid accumulation of float64 values (with tri_d = d, only the
    lower triangles of d x d matrices); returns a status code."""

def cpu_mirror_upper(a: npt.NDArray[np.float64]) -> None:
    """Copy the upper triangle of a Fortran-ordered float64 (d, d) matrix to its lower."""

def cpu_syrk_upper(
    fn: object,
    a: npt.NDArray[np.floating],
    c: npt.NDArray[np.floating],
    alpha: float,
    beta: float,
) -> None:
    """c = alpha a a^T + beta c (upper triangle) through a ?syrk capsule, without the GIL."""

def cpu_preprocess_rows(
    x: npt.NDArray[np.floating],
    out: npt.NDArray[np.float64],
    center: npt.NDArray[np.float64] | None,
    normalize: bool,
    clip: float,
) -> int:
    """Centre, normalise and clip rows into float64 out; the first non-finite row or -1."""

def cpu_clip_rows(
    x: npt.NDArray[np.floating],
    out: npt.NDArray[np.float64],
    scales: npt.NDArray[np.float64],
    clip: float,
) -> None:
    """Clip rows into float64 out (the shared clip factor) and their scales."""

def eval_transform(t: npt.ArrayLike, which: str) -> npt.NDArray[np.float64]:
    """Evaluate the shared log / cos(2 pi t) / sin(2 pi t) kernels (testing aid)."""

# ---- Present only when compiled with CUDA (cuda_compiled is True) ------------------------

def cuda_devices() -> list[tuple[int, str, int, int]]:
    """(index, name, major, minor) of each visible CUDA device; empty without a driver."""

def cuda_runtime_version() -> int:
    """CUDA runtime version compiled in."""

# Row operations and clipped statistics (csrc/cuda/stats_bind.cpp).
def cuda_clip_rows(
    x: _Ptr,
    dtype: int,
    n: int,
    d: int,
    ldx: int,
    clip_norm: float,
    out: _Ptr,
    ldo: int,
    scale: _Ptr,
    stream: _Stream,
) -> None: ...
def cuda_scale_rows(
    x: _Ptr,
    dtype: int,
    n: int,
    d: int,
    ldx: int,
    scales: _Ptr,
    out: _Ptr,
    ldo: int,
    stream: _Stream,
) -> None: ...
def cuda_row_norms(
    x: _Ptr,
    dtype: int,
    n: int,
    d: int,
    ldx: int,
    clip_norm: float,
    norms: _Ptr,
    scales: _Ptr,
    stream: _Stream,
) -> None: ...
def cuda_clipped_gram(
    x: _Ptr,
    dtype: int,
    n: int,
    d: int,
    ldx: int,
    clip_norm: float,
    accumulate: str,
    out: _Ptr,
    stream: _Stream,
    kernel: str = "auto",
) -> None: ...
def cuda_clipped_class_sums(
    x: _Ptr,
    dtype: int,
    n: int,
    d: int,
    ldx: int,
    labels: _Ptr,
    num_classes: int,
    clip_norm: float,
    out: _Ptr,
    counts: _Ptr,
    stream: _Stream,
) -> None: ...
def cuda_clipped_stats(
    x: _Ptr,
    dtype: int,
    n: int,
    d: int,
    ldx: int,
    labels: _Ptr,
    num_classes: int,
    clip_norm: float,
    accumulate: str,
    out_gram: _Ptr,
    out_sums: _Ptr,
    out_counts: _Ptr,
    stream: _Stream,
    kernel: str = "auto",
) -> None: ...
def cuda_clipped_class_grams(
    x: _Ptr,
    dtype: int,
    n: int,
    d: int,
    ldx: int,
    labels: _Ptr,
    num_classes: int,
    clip_norm: float,
    out: _Ptr,
    stream: _Stream,
    kernel: str = "auto",
) -> None: ...
def cuda_clipped_weighted_grams(
    x: _Ptr,
    dtype: int,
    n: int,
    d: int,
    ldx: int,
    weights: _Ptr,
    ldw: int,
    num_classes: int,
    clip_norm: float,
    out: _Ptr,
    stream: _Stream,
    kernel: str = "auto",
) -> None: ...
def cuda_workspace_probe(bytes: int, stream: _Stream) -> None: ...

# Gaussian noise (csrc/cuda/noise_bind.cpp).
def cuda_sym_gaussian_noise(
    out: _Ptr,
    dtype: int,
    batch: int,
    d: int,
    std: float,
    key_words: _KeyWords,
    block0: int,
    stream: _Stream,
) -> None: ...
def cuda_gaussian_noise(
    out: _Ptr,
    dtype: int,
    count: int,
    std: float,
    key_words: _KeyWords,
    block0: int,
    stream: _Stream,
) -> None: ...

# Clipped linear-layer gradient (csrc/cuda/linear_grad_bind.cpp).
def cuda_clipped_linear_grad(
    x: _Ptr,
    dtype: int,
    n: int,
    d: int,
    ldx: int,
    labels: _Ptr,
    w: _Ptr,
    ldw: int,
    bias: _Ptr,
    num_classes: int,
    clip_norm: float,
    loss: str,
    feature_clip: float,
    grad: _Ptr,
    n_clipped: _Ptr,
    stream: _Stream,
    engine: str,
    chunk_rows: int,
) -> None: ...
def cuda_residual_clip(
    z: _Ptr,
    dtype: int,
    rows: int,
    num_classes: int,
    labels: _Ptr,
    norms: _Ptr,
    fscale: _Ptr,
    bias: _Ptr,
    clip_norm: float,
    loss: str,
    bscale: _Ptr,
    n_clipped: _Ptr,
    stream: _Stream,
) -> None: ...

# Batched Cholesky (csrc/cuda/cholesky_bind.cpp); dtype 0 (float32) or 1 (float64).
def cuda_cholesky(
    a: _Ptr,
    a_batch_stride: int,
    lda: int,
    shifts: _Ptr,
    l: _Ptr,
    info: _Ptr,
    batch: int,
    d: int,
    dtype: int,
    stream: _Stream,
    workspace: _Ptr = 0,
    workspace_bytes: int = 0,
    kernel: str = "mma",
    schedule: str = "auto",
    small_max: int = 128,
) -> None: ...
def cuda_cholesky_workspace_bytes(batch: int, d: int, dtype: int, small_max: int = 128) -> int: ...
def cuda_cho_solve(
    l: _Ptr,
    l_batch_stride: int,
    b: _Ptr,
    b_batch_stride: int,
    ldb: int,
    x: _Ptr,
    batch: int,
    d: int,
    m: int,
    dtype: int,
    stream: _Stream,
) -> None: ...
def cuda_cholesky_plan(
    batch: int,
    d: int,
    dtype: int,
    kernel: str = "mma",
    schedule: str = "auto",
    small_max: int = 128,
) -> str: ...
