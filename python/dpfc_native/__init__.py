"""dpfc_native: differentially private image classification from features.

A frozen, publicly pre-trained model turns private images into feature vectors; only the
last linear layer is trained on them, with a formal (epsilon, delta) guarantee. The
methods (DP least squares, DP Newton, DP-FC, DP-SGD) run on clipped sufficient
statistics computed by native kernels (:mod:`dpfc_native.ops`), privatised by the
Gaussian mechanism and accounted exactly (:mod:`dpfc_native.accounting`).
"""

from __future__ import annotations

from . import _core
from ._errors import PrivacyWarning

__version__: str = _core.__version__

__all__ = [
    "__version__",
    "build_info",
    "CudaError",
    "PrivacyWarning",
    "DPLeastSquaresClassifier",
    "DPNewtonClassifier",
    "DPFCClassifier",
    "DPSGDClassifier",
    "load_model",
]

_ESTIMATORS = ("DPLeastSquaresClassifier", "DPNewtonClassifier", "DPFCClassifier",
               "DPSGDClassifier")


def __getattr__(name: str):
    # The estimators are imported lazily: `import dpfc_native` stays light.
    if name in _ESTIMATORS:
        from . import models

        return getattr(models, name)
    if name == "load_model":
        from .model_io import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

CudaError = _core.CudaError


def build_info() -> dict:
    """Build capability and device presence, reported separately.

    Returns
    -------
    dict
        ``version`` (str), ``cuda_compiled`` (bool: the CUDA kernels were built),
        ``cuda_arches`` (list of str, e.g. ``["80-real", "90-real", "90-virtual"]``),
        ``cuda_devices`` (int: usable devices now, 0 without a driver or GPU),
        ``cuda_runtime_version`` (int or None) and ``cupy`` (str version or None).
    """
    compiled = bool(_core.cuda_compiled)
    try:
        import cupy

        cupy_version = cupy.__version__
    except Exception:
        cupy_version = None
    return {
        "version": __version__,
        "cuda_compiled": compiled,
        "cuda_arches": [a for a in str(_core.cuda_arches).split(",") if a],
        "cuda_devices": int(_core.cuda_device_count()) if compiled else 0,
        "cuda_runtime_version": int(_core.cuda_runtime_version()) if compiled else None,
        "cupy": cupy_version,
    }
