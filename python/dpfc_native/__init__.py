"""dpfc_native: differentially private image classification from features.

A frozen, publicly pre-trained model turns private images into feature vectors; only the
last linear layer is trained on them, with a formal (epsilon, delta) guarantee. The
methods (DP least squares, DP Newton, DP-FC, DP-SGD) run on clipped sufficient
statistics computed by native kernels (:mod:`dpfc_native.ops`), privatised by the
Gaussian mechanism and accounted exactly (:mod:`dpfc_native.accounting`).
"""

from __future__ import annotations

import re

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
    "PrivacyBudget",
    "PrivacyBudgetExceeded",
    "PrivateSelector",
    "load_model",
]

_ESTIMATORS = (
    "DPLeastSquaresClassifier",
    "DPNewtonClassifier",
    "DPFCClassifier",
    "DPSGDClassifier",
)
_TUNING = ("PrivacyBudget", "PrivacyBudgetExceeded", "PrivateSelector")


def __getattr__(name: str):
    # The estimators are imported lazily: `import dpfc_native` stays light.
    if name in _ESTIMATORS:
        from . import models

        return getattr(models, name)
    if name in _TUNING:
        from . import tuning

        return getattr(tuning, name)
    if name == "load_model":
        from .model_io import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


CudaError = _core.CudaError


# The kernels' floor: cholesky.cu uses cp.async (sm_80), so no build targets older GPUs.
_MIN_COMPUTE_CAPABILITY = (8, 0)
_ARCH_RE = re.compile(r"^(\d+)([af]?)(?:-(real|virtual))?$")


def _device_unsupported_reason(arches: list[str], major: int, minor: int) -> str | None:
    """Why a GPU of compute capability ``major.minor`` cannot run this build's kernels.

    Parameters
    ----------
    arches : list of str
        The compiled CMake CUDA architectures (``"80-real"``, ``"90-virtual"``, ``"90"``
        for both, ``"90a-real"`` for arch-specific code).
    major, minor : int
        The device's compute capability.

    Returns
    -------
    str or None
        None when the device has a kernel image: a cubin of the same major version and
        an equal or lower minor (``"a"`` cubins: the exact capability only), or PTX of an
        equal or lower capability that the driver JIT-compiles. Otherwise the reason.
    """
    cc = (major, minor)
    if cc < _MIN_COMPUTE_CAPABILITY:
        return (
            f"compute capability {major}.{minor} is below {_MIN_COMPUTE_CAPABILITY[0]}."
            f"{_MIN_COMPUTE_CAPABILITY[1]}, the oldest GPU dpfc_native's kernels support"
        )
    parsed = [_ARCH_RE.match(a) for a in arches]
    if not arches or not all(parsed):
        # A symbolic list ("native", "all") cannot be checked here: trust the floor.
        return None
    for m in parsed:
        number, suffix, kind = int(m.group(1)), m.group(2), m.group(3)
        arch = (number // 10, number % 10)
        if kind in (None, "real"):
            if suffix == "a" and arch == cc:
                return None
            if suffix != "a" and arch[0] == major and arch[1] <= minor:
                return None
        if kind in (None, "virtual"):
            # Arch- and family-specific PTX does not carry forward to newer GPUs.
            if suffix == "" and arch <= cc:
                return None
            if suffix == "a" and arch == cc:
                return None
            if suffix == "f" and arch[0] == major and arch[1] <= minor:
                return None
    return (
        f"no kernel image for compute capability {major}.{minor} in this build "
        f"(compiled for {', '.join(arches)})"
    )


def _device_report(
    arches: list[str], devices: list[tuple[int, str, int, int]]
) -> tuple[int, list[str]]:
    """Count the devices this build can run on; say why each other one is skipped."""
    usable, skipped = 0, []
    for index, name, major, minor in devices:
        reason = _device_unsupported_reason(arches, major, minor)
        if reason is None:
            usable += 1
        else:
            skipped.append(f"device {index} ({name}): {reason}")
    return usable, skipped


def build_info() -> dict:
    """Build capability and device presence, reported separately.

    Returns
    -------
    dict
        ``version`` (str), ``cuda_compiled`` (bool: the CUDA kernels were built),
        ``cuda_arches`` (list of str, e.g. ``["80-real", "90-real", "90-virtual"]``),
        ``cuda_devices`` (int: devices this build can run on now, 0 without a driver or
        GPU; a GPU older than sm_80, or one the compiled architectures do not cover, is
        not counted), ``cuda_devices_skipped`` (list of str: each visible device not
        counted, and why), ``cuda_runtime_version`` (int or None) and ``cupy`` (str
        version or None).
    """
    compiled = bool(_core.cuda_compiled)
    try:
        import cupy

        cupy_version = cupy.__version__
    except Exception:
        cupy_version = None
    arches = [a for a in str(_core.cuda_arches).split(",") if a]
    usable, skipped = _device_report(arches, _core.cuda_devices()) if compiled else (0, [])
    return {
        "version": __version__,
        "cuda_compiled": compiled,
        "cuda_arches": arches,
        "cuda_devices": usable,
        "cuda_devices_skipped": skipped,
        "cuda_runtime_version": int(_core.cuda_runtime_version()) if compiled else None,
        "cupy": cupy_version,
    }
