"""Argument checks of the accounting package: every error names the argument."""

from __future__ import annotations

import math
import numbers
from typing import Iterable

import numpy as np


def _real(x, name: str) -> float:
    """Convert ``x`` to a Python float, rejecting bools, non-numbers and NaN."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, np.floating, np.integer)):
        # 0-d arrays are accepted too
        if isinstance(x, np.ndarray) and x.ndim == 0 and np.issubdtype(x.dtype, np.number):
            x = x.item()
        else:
            raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if math.isnan(x):
        raise ValueError(f"{name} must not be NaN")
    return x


def _check_epsilon(
    epsilon, name: str = "epsilon", *, allow_zero: bool = False, allow_inf: bool = True
) -> float:
    eps = _real(epsilon, name)
    if eps < 0 or (eps == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {eps!r}")
    if math.isinf(eps) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {eps!r}")
    return eps


def _check_delta(delta, name: str = "delta") -> float:
    d = _real(delta, name)
    if not 0.0 < d < 1.0:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {d!r}")
    return d


def _check_mu(mu, name: str = "mu") -> float:
    m = _real(mu, name)
    if m < 0:
        raise ValueError(f"{name} must be >= 0, got {m!r}")
    return m


def _check_multiplier(z, name: str = "noise_multiplier") -> float:
    z = _real(z, name)
    if not z > 0:
        raise ValueError(f"{name} must be > 0 (it is std / L2 sensitivity), got {z!r}")
    return z


def _check_sample_rate(q, name: str = "sample_rate") -> float:
    q = _real(q, name)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {q!r}")
    return q


def _check_count(n, name: str = "count") -> int:
    if isinstance(n, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    if isinstance(n, (float, np.floating)):
        if math.isnan(n):
            raise ValueError(f"{name} must not be NaN")
        if not float(n).is_integer():
            raise ValueError(f"{name} must be an integer, got {n!r}")
    elif not isinstance(n, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(n).__name__}")
    n = int(n)
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def _as_list(x) -> list:
    if isinstance(x, (str, bytes)):
        raise TypeError("expected a number or a sequence of numbers")
    if isinstance(x, np.ndarray):
        return list(x.reshape(-1)) if x.ndim else [x.item()]
    if isinstance(x, Iterable):
        return list(x)
    return [x]
