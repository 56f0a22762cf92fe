"""Argument checks of the accounting package: every error names the argument."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from .. import _validation


def _real(x, name: str) -> float:
    """``x`` as a Python float by the package's one rule for real scalars
    (:func:`dpfc_native._validation.real`: bools, strings, arrays of ndim >= 1 are
    TypeError; 0-d arrays count as scalars; NaN is ValueError)."""
    return _validation.real(x, name)


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
    """A Poisson sampling rate in (0, 1]; subnormal rates (below 2.2e-308, where
    log(q) and 1 / q lose their range) are refused as well."""
    q = _real(q, name)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {q!r}")
    if q < np.finfo(np.float64).tiny:
        raise ValueError(f"{name} must be at least 2.2e-308 (a normal float), got {q!r}")
    return q


def _check_count(n, name: str = "count") -> int:
    """A repetition count: an integer >= 1 (:func:`dpfc_native._validation.integer`:
    floats, even integral ones, are TypeError)."""
    return _validation.integer(n, name, 1)


def _as_list(x) -> list:
    if isinstance(x, (str, bytes)):
        raise TypeError("expected a number or a sequence of numbers")
    if isinstance(x, np.ndarray):
        return list(x.reshape(-1)) if x.ndim else [x.item()]
    if isinstance(x, Iterable):
        return list(x)
    return [x]
