"""Type stub of the private compiled module (mirrors csrc/bindings.cpp); use dpfc_native.ops."""

import numpy as np
import numpy.typing as npt

__version__: str
cuda_compiled: bool
cuda_arches: str
clip_margin: float

class CudaError(RuntimeError): ...

def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Raw Philox4x32-10 block: four 32-bit counter words, two key words."""

def sym_gaussian_noise_cpu(out: npt.NDArray[np.floating], std: float, key_words: tuple[int, int, int, int], block0: int) -> None:
    """Fill out (batch, d, d) with symmetric Gaussian noise (diag std, off-diag std/sqrt 2)."""

def gaussian_noise_cpu(out: npt.NDArray[np.floating], std: float, key_words: tuple[int, int, int, int], block0: int) -> None:
    """Fill a contiguous array with i.i.d. N(0, std^2) from the Philox stream."""

def eval_transform(t: npt.ArrayLike, which: str) -> npt.NDArray[np.float64]:
    """Evaluate the shared log / cos(2 pi t) / sin(2 pi t) kernels (testing aid)."""

# Present only when compiled with CUDA (cuda_compiled is True):
def cuda_device_count() -> int: ...
def cuda_runtime_version() -> int: ...
