"""Exact Gaussian differential privacy (mu-GDP): the privacy curve of composed,
non-subsampled Gaussian releases, evaluated in log space."""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special

from ._checks import (
    _as_list,
    _check_count,
    _check_delta,
    _check_epsilon,
    _check_mu,
    _check_multiplier,
)


def _log1mexp(x: float) -> float:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate everywhere (Maechler 2012)."""
    if x > 0:
        raise ValueError("log1mexp needs x <= 0")
    if x == 0:
        return -math.inf
    if x > -math.log(2.0):
        return math.log(-math.expm1(x))
    return math.log1p(-math.exp(x))


#: Below this mu the exponent of :func:`_log_gdp_delta` is integrated (see there).
_SMALL_MU = 0.1
#: Gauss-Legendre rule for that integral (12 nodes: exact to rounding for mu < 0.1).
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(12)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
#: Added to every log delta: the evaluation's relative error, measured against 60-digit
#: arithmetic (mpmath) for mu in [1e-6, 50], delta down to 1e-30 and epsilon around the
#: curve's, is below 7e-12; with this margin the curve is never understated there.
_LOG_DELTA_MARGIN = 2e-11


def _log_gdp_delta(mu: float, epsilon: float) -> float:
    """``log delta(epsilon)`` of mu-GDP, for ``0 < mu < inf`` and finite ``epsilon``,
    rounded up by :data:`_LOG_DELTA_MARGIN`.

    ``delta = Phi(a) - e^eps Phi(b)`` with ``a = -eps/mu + mu/2``, ``b = a - mu``;
    written as ``log Phi(a) + log1mexp(x)``, ``x = eps + log Phi(b) - log Phi(a)``, so
    that neither term under- or overflows (``scipy.special.log_ndtr`` is accurate far
    into the tails). For small mu, x is a difference of nearly equal numbers (relative
    error 1e-7 at mu = 1e-6); there it is computed as the integral it equals,
    ``x = -int_b^a (t + phi(t)/Phi(t)) dt`` (since ``eps = -int_b^a t dt``), by
    Gauss-Legendre over the interval of width mu.
    """
    a = -epsilon / mu + mu / 2.0
    la = float(special.log_ndtr(a))
    if mu < _SMALL_MU:
        t = (a - mu / 2.0) + (mu / 2.0) * _GL_NODES
        mills = np.exp(-0.5 * t * t - _LOG_SQRT_2PI - special.log_ndtr(t))
        x = -(mu / 2.0) * float(np.dot(_GL_WEIGHTS, t + mills))
    else:
        x = epsilon + float(special.log_ndtr(a - mu)) - la
    # Mathematically x < 0 for mu > 0; guard against rounding at the 1e-16 level.
    x = min(x, 0.0)
    return la + _log1mexp(x) + _LOG_DELTA_MARGIN


def gdp_delta(mu: float, epsilon: float) -> float:
    """Exact delta of mu-Gaussian DP at ``epsilon``.

    ``delta(eps) = Phi(-eps/mu + mu/2) - exp(eps) Phi(-eps/mu - mu/2)``
    (Balle and Wang 2018; Dong, Roth and Su 2019), evaluated in log space so it
    is accurate for ``mu`` from 1e-6 to 50 and ``epsilon`` up to 100 and beyond, and
    rounded up: above the exact value by a relative 2e-11 at most (the evaluation's
    measured error is below 7e-12), never below it.

    Parameters
    ----------
    mu : float
        GDP parameter, ``>= 0`` (``inf`` allowed: no privacy). For Gaussian
        releases ``mu = sqrt(sum_j count_j / z_j**2)`` with ``z_j`` the noise
        multipliers (std / L2 sensitivity).
    epsilon : float
        ``>= 0``; ``inf`` gives ``delta = 0``.

    Returns
    -------
    float
        delta in ``[0, 1]``, for add/remove adjacency.
    """
    mu = _check_mu(mu)
    eps = _check_epsilon(epsilon, allow_zero=True)
    if mu == 0.0 or math.isinf(eps):
        return 0.0
    if math.isinf(mu):
        return 1.0
    return min(1.0, max(0.0, math.exp(_log_gdp_delta(mu, eps))))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of mu-Gaussian DP at ``delta`` (inverse of :func:`gdp_delta`).

    Root of ``log gdp_delta(mu, eps) = log delta`` found by Brent's method on
    ``[0, mu**2/2 + mu * Phi^{-1}(1 - delta)]`` (at the upper end the first term
    of the curve alone equals delta).  The result is rounded up, never down:
    ``gdp_delta(mu, result) <= delta``, and :func:`gdp_delta` is itself an upper bound
    of the exact curve (see there), so the exact delta at the result is at most delta
    (checked against 60-digit arithmetic for mu from 1e-6 to 20, delta down to 1e-30).
    It is accurate to a relative 1e-10 (the curve's margin and the rounding of its
    evaluation near the root), so two values of ``mu`` one ulp apart may come back in
    either order within that accuracy.  Never negative: when
    ``delta >= gdp_delta(mu, 0)`` the answer is 0.

    Parameters
    ----------
    mu : float
        GDP parameter, ``>= 0`` (``inf`` allowed: returns ``inf``).
    delta : float
        In ``(0, 1)``.

    Returns
    -------
    float
        epsilon ``>= 0`` for add/remove adjacency.
    """
    mu = _check_mu(mu)
    delta = _check_delta(delta)
    if mu == 0.0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    log_delta = math.log(delta)
    if _log_gdp_delta(mu, 0.0) <= log_delta:
        return 0.0
    hi = mu * mu / 2.0 + mu * float(-special.ndtri(delta))
    if not math.isfinite(hi):  # mu beyond ~1e154: epsilon beyond the float range
        return math.inf
    f = lambda e: _log_gdp_delta(mu, e) - log_delta  # noqa: E731 (decreasing)
    while f(hi) > 0:  # defensive; the bound above is already valid
        hi *= 2.0
    # xtol relative to the bracket: an absolute 1e-14 was 3e-9 of eps at mu = 1e-6.
    eps = optimize.brentq(
        f, 0.0, hi, xtol=max(1e-300, 1e-15 * hi), rtol=4 * np.finfo(float).eps, maxiter=500
    )
    # Round up until the curve certifies it (typically zero or one step).
    step = max(abs(eps), 1e-12) * 1e-13
    while f(eps) > 0:
        eps += step
        step *= 2.0
    return max(0.0, float(eps))


def gaussian_mu(noise_multipliers, counts=None) -> float:
    """GDP parameter of composed, non-subsampled Gaussian releases.

    ``mu = sqrt(sum_j count_j / z_j**2)``.

    Parameters
    ----------
    noise_multipliers : float or sequence of float
        ``z_j = std_j / L2 sensitivity_j``, each ``> 0`` (``inf`` means no
        release).
    counts : int or sequence of int, optional
        How many times each release is repeated (default 1 each).

    Returns
    -------
    float
    """
    zs = [_check_multiplier(z, "noise_multipliers") for z in _as_list(noise_multipliers)]
    if not zs:
        raise ValueError("noise_multipliers must not be empty")
    if counts is None:
        cs = [1] * len(zs)
    else:
        cs = [_check_count(c, "counts") for c in _as_list(counts)]
        if len(cs) == 1 and len(zs) > 1:
            cs = cs * len(zs)
        if len(cs) != len(zs):
            raise ValueError(f"counts has length {len(cs)} but noise_multipliers has {len(zs)}")
    # z * z underflows to 0 for z below ~1e-162: mu = inf then (epsilon = inf), not a
    # ZeroDivisionError.
    return math.sqrt(math.fsum(c / (z * z) if z * z > 0 else math.inf for z, c in zip(zs, cs)))


def gaussian_epsilon(noise_multipliers, delta: float, counts=None) -> float:
    """Exact epsilon of a composition of non-subsampled Gaussian releases.

    Parameters
    ----------
    noise_multipliers : float or sequence of float
        Noise multipliers ``z_j = std_j / L2 sensitivity_j`` (not stds), ``> 0``.
    delta : float
        In ``(0, 1)``.
    counts : int or sequence of int, optional
        Repetitions of each release (default 1 each).

    Returns
    -------
    float
        epsilon for add/remove adjacency, via the exact mu-GDP curve.
    """
    return gdp_epsilon(gaussian_mu(noise_multipliers, counts), delta)


def gaussian_delta(noise_multipliers, epsilon: float, counts=None) -> float:
    """Exact delta at ``epsilon`` of composed non-subsampled Gaussian releases.

    See :func:`gaussian_epsilon` for the parameters (add/remove adjacency).
    """
    return gdp_delta(gaussian_mu(noise_multipliers, counts), epsilon)
