"""The logistic sigmoid and its logarithm: one definition for every module.

SciPy's ``expit`` / ``log_expit`` on the CPU, CuPy's on CUDA arrays; both are
overflow-free for any finite or infinite input. A Python (or NumPy) real scalar gives a
Python float, so data-independent defaults computed from a scalar bias stay floats.
"""

from __future__ import annotations

import numbers

import numpy as np
from scipy import special as _scipy_special


def _is_cupy(z) -> bool:
    return not isinstance(z, np.ndarray) and type(z).__module__.split(".")[0] == "cupy"


def sigmoid(z, out=None):
    """``1 / (1 + exp(-z))`` elementwise (float for a real scalar, else an array; ``out``:
    a NumPy array to write it into, ``z`` itself allowed)."""
    if isinstance(z, numbers.Real):
        return float(_scipy_special.expit(float(z)))
    if _is_cupy(z):
        from cupyx.scipy.special import expit

        return expit(z)
    return _scipy_special.expit(z, out=out)


def log_sigmoid(z):
    """``log(sigmoid(z)) = -log(1 + exp(-z))`` elementwise, accurate for large ``|z|``."""
    if isinstance(z, numbers.Real):
        return float(_scipy_special.log_expit(float(z)))
    if _is_cupy(z):
        import cupy

        return -cupy.logaddexp(0.0, -z)
    return _scipy_special.log_expit(z)
