"""Renyi DP of the Poisson-subsampled Gaussian mechanism (Mironov, Talwar and Zhang 2019)
and the improved RDP -> (epsilon, delta) conversion (Balle et al. 2020, Thm. 21)."""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import optimize, special

from ._checks import (
    _as_list,
    _check_count,
    _check_delta,
    _check_epsilon,
    _check_multiplier,
    _check_sample_rate,
    _real,
)
from .gdp import _log1mexp


def _default_orders() -> np.ndarray:
    # alpha - 1 on a geometric grid from 1e-2 to 1e4 with ratio ~1.07 (the
    # accountant refines between grid orders anyway).  Orders below 20 are
    # fractional; above, integers (cheap, exact finite sums).
    t = np.geomspace(1e-2, 1e4, 205)
    a = 1.0 + t
    frac = a[a < 20.0]
    ints = np.unique(np.round(a[a >= 20.0]))
    return np.concatenate([frac, ints])


#: Default Renyi orders for the RDP path (fractional below 20, integers above).
DEFAULT_RDP_ORDERS: np.ndarray = _default_orders()
DEFAULT_RDP_ORDERS.setflags(write=False)


def _lse(x: np.ndarray) -> float:
    """``log(sum(exp(x)))`` for a 1-D float array (plain NumPy; fast)."""
    m = float(np.max(x))
    if not math.isfinite(m):
        return m
    return m + math.log(float(np.sum(np.exp(x - m))))


def _signed_log_add(
    log_pos: float, log_neg: float, log_terms: np.ndarray, signs: np.ndarray
) -> tuple[float, float]:
    """Accumulate ``sum(signs * exp(log_terms))`` into separate log-sums."""
    pos = log_terms[signs > 0]
    neg = log_terms[signs < 0]
    if pos.size:
        log_pos = float(np.logaddexp(log_pos, _lse(pos)))
    if neg.size:
        log_neg = float(np.logaddexp(log_neg, _lse(neg)))
    return log_pos, log_neg


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """``log A_alpha`` for integer alpha (Mironov et al. 2019, Sec. 3.2).

    ``A_alpha = sum_{k=0}^{alpha} C(alpha,k) (1-q)^(alpha-k) q^k exp((k^2-k)/(2 sigma^2))``;
    all terms are positive, so one ``logsumexp`` is exact up to rounding (for
    which a relative allowance is added, so the result never understates it).
    """
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binom = (
        special.gammaln(alpha + 1.0) - special.gammaln(k + 1.0) - special.gammaln(alpha - k + 1.0)
    )
    log_terms = (
        log_binom
        + k * math.log(q)
        + (alpha - k) * math.log1p(-q)
        + (k * k - k) / (2.0 * sigma * sigma)
    )
    return _lse(log_terms) + 64.0 * np.finfo(float).eps


def _log_a_fractional(q: float, sigma: float, alpha: float, max_terms: int = 1_000_000) -> float:
    """``log A_alpha`` for fractional alpha (Mironov et al. 2019, Sec. 3.3).

    ``A_alpha = E_{x ~ N(0, s^2)} [(1 - q + q exp((2x - 1)/(2 s^2)))^alpha]``.
    Split the integral at ``z0 = s^2 log(1/q - 1) + 1/2`` (where the two
    mixture components are equal) and expand the binomial in the convergent
    direction on each side; the Gaussian integrals over the half-lines are
    normal CDFs, giving, with ``j = alpha - k``,

    ``A = sum_k C(alpha,k) [ (1-q)^(alpha-k) q^k e^{(k^2-k)/(2s^2)} Phi((z0-k)/s)
                           + (1-q)^k q^j e^{(j^2-j)/(2s^2)} Phi((j-z0)/s) ]``.

    For ``k > alpha`` both terms equal
    ``(1-q)^alpha |C(alpha,k)| e^{-z0^2/(2s^2)} m(x)`` with
    ``m(x) = e^{x^2/2} Phi(-x)`` (decreasing) at ``x = (k-z0)/s`` resp.
    ``(z0-j)/s``, so the series is alternating with decreasing terms: the
    remainder after the last computed term is at most that term, which we add
    (soundly) once it is below ``e^-30`` of the sum or ``max_terms`` is hit.
    A relative rounding allowance is added too, so the result never
    understates ``log A``.
    Positive and negative parts are summed separately in log space.
    """
    log_q = math.log(q)
    log_1mq = math.log1p(-q)
    two_s2 = 2.0 * sigma * sigma
    z0 = sigma * sigma * (log_1mq - log_q) + 0.5
    floor_a = math.floor(alpha)
    lg_a1 = special.gammaln(alpha + 1.0)
    log_pos, log_neg = -math.inf, -math.inf
    start, chunk = 0, 256
    while True:
        k = np.arange(start, start + chunk, dtype=np.float64)
        j = alpha - k
        log_binom = lg_a1 - special.gammaln(k + 1.0) - special.gammaln(j + 1.0)
        # sign of C(alpha, k): (-1)^(number of factors alpha - i < 0, i < k)
        n_neg = np.maximum(0.0, k - 1.0 - floor_a)
        signs = np.where(np.mod(n_neg, 2.0) == 0.0, 1.0, -1.0)
        log_s0 = (
            log_binom
            + (alpha - k) * log_1mq
            + k * log_q
            + (k * k - k) / two_s2
            + special.log_ndtr((z0 - k) / sigma)
        )
        log_s1 = (
            log_binom
            + k * log_1mq
            + j * log_q
            + (j * j - j) / two_s2
            + special.log_ndtr((j - z0) / sigma)
        )
        log_t = np.logaddexp(log_s0, log_s1)
        log_pos, log_neg = _signed_log_add(log_pos, log_neg, log_t, signs)
        start += chunk
        chunk = min(2 * chunk, 65536)
        if start > alpha + 1:  # the last term is in the alternating, decreasing tail
            last = float(log_t[-1])
            if last < log_pos - 30.0 or start >= max_terms:
                log_pos = float(np.logaddexp(log_pos, last))  # remainder bound
                break
    if not log_neg < log_pos:
        raise FloatingPointError(f"RDP series lost precision (q={q}, sigma={sigma}, alpha={alpha})")
    log_a = log_pos + _log1mexp(log_neg - log_pos)
    # Pad for floating-point rounding of the sums (relative to the magnitude
    # of what was summed, which exceeds A when there was cancellation).
    rounding = 64.0 * np.finfo(float).eps * math.exp(np.logaddexp(log_pos, log_neg) - log_a)
    return log_a + rounding


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(q: float, sigma: float, orders: tuple) -> np.ndarray:
    out = np.empty(len(orders))
    for i, a in enumerate(orders):
        if math.isinf(a):
            out[i] = math.inf
        elif q == 1.0:
            out[i] = a / (2.0 * sigma * sigma)
        elif float(a).is_integer():
            out[i] = _log_a_integer(q, sigma, int(a)) / (a - 1.0)
        else:
            out[i] = _log_a_fractional(q, sigma, float(a)) / (a - 1.0)
    # RDP of the subsampled mechanism never exceeds the unsubsampled one.
    np.minimum(out, np.asarray(orders) / (2.0 * sigma * sigma), out=out)
    np.maximum(out, 0.0, out=out)
    out.setflags(write=False)
    return out


def _check_orders(orders) -> tuple:
    if orders is None:
        return tuple(float(a) for a in DEFAULT_RDP_ORDERS)
    vals = tuple(_real(a, "orders") for a in _as_list(orders))
    if not vals or any(not a > 1.0 for a in vals):
        raise ValueError("orders must be a non-empty sequence of numbers > 1")
    return vals


def subsampled_gaussian_rdp(
    noise_multiplier: float, sample_rate: float, steps: int = 1, orders=None
) -> np.ndarray:
    """RDP of ``steps`` Poisson-subsampled Gaussian mechanisms.

    Mironov, Talwar and Zhang 2019, "Renyi differential privacy of the sampled
    Gaussian mechanism": each example is included independently with
    probability ``sample_rate``; the sum of clipped contributions gets
    ``N(0, (noise_multiplier * C)^2)`` noise.  For add/remove adjacency the RDP at
    order ``a`` is ``log(A_a) / (a - 1)`` (the larger of the two directions).
    Composition over ``steps`` multiplies by ``steps``.

    Parameters
    ----------
    noise_multiplier : float
        std / L2 sensitivity (clipping norm), ``> 0``.
    sample_rate : float
        Poisson sampling probability ``q`` in ``(0, 1]``; ``q = 1`` gives the
        Gaussian RDP ``a / (2 z^2)``.
    steps : int
        Number of steps, ``>= 1``.
    orders : sequence of float, optional
        Renyi orders ``> 1`` (integers use the finite sum, others the series).
        Default :data:`DEFAULT_RDP_ORDERS`.

    Returns
    -------
    numpy.ndarray
        RDP epsilon at each order (add/remove adjacency).
    """
    z = _check_multiplier(noise_multiplier)
    q = _check_sample_rate(sample_rate)
    steps = _check_count(steps, "steps")
    if math.isinf(z):
        return np.zeros(len(_check_orders(orders)))
    return steps * _rdp_one_step(q, z, _check_orders(orders))


def rdp_to_epsilon(orders, rdp, delta: float) -> float:
    """Convert an RDP curve to epsilon at ``delta`` (the improved conversion).

    ``eps = min_a  rdp(a) + log((a-1)/a) - (log(delta) + log(a)) / (a-1)``
    (Balle et al. 2020, Thm. 21; Canonne, Kamath and Steinke 2020). Sound for
    any RDP curve; clipped at 0.

    Parameters
    ----------
    orders : sequence of float
        Renyi orders ``> 1``.
    rdp : sequence of float
        RDP at those orders (``inf`` allowed).
    delta : float
        In ``(0, 1)``.

    Returns
    -------
    float
    """
    delta = _check_delta(delta)
    a = np.asarray(_check_orders(orders), dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64).reshape(-1)
    if r.shape != a.shape:
        raise ValueError("orders and rdp must have the same length")
    if np.isnan(r).any():
        raise ValueError("rdp must not contain NaN")
    eps = r + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    return float(max(0.0, np.min(eps)))


def rdp_to_delta(orders, rdp, epsilon: float) -> float:
    """Convert an RDP curve to delta at ``epsilon`` (inverse of :func:`rdp_to_epsilon`).

    ``delta = min_a exp((a-1)(rdp(a) - eps + log(1 - 1/a)) - log a)``, capped at 1.
    """
    eps = _check_epsilon(epsilon, allow_zero=True)
    a = np.asarray(_check_orders(orders), dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64).reshape(-1)
    if r.shape != a.shape:
        raise ValueError("orders and rdp must have the same length")
    if math.isinf(eps):
        return 0.0 if np.isfinite(r).any() else 1.0
    log_d = (a - 1.0) * (r - eps + np.log1p(-1.0 / a)) - np.log(a)
    return float(min(1.0, math.exp(min(0.0, float(np.min(log_d))))))


def _refine_over_orders(rdp_at, orders: np.ndarray, rdp: np.ndarray, objective) -> float:
    """Minimise ``objective(a, rdp(a))`` over the grid, then locally between the
    neighbours of the best grid order (bounded Brent).  Any order is a valid
    bound, so taking the minimum of both is sound; the refinement removes the
    (small) loss from the grid spacing."""
    vals = np.array([objective(a, r) for a, r in zip(orders, rdp)])
    vals[np.isnan(vals)] = np.inf
    i = int(np.argmin(vals))
    best = float(vals[i])
    if not math.isfinite(best):
        return best
    lo = float(orders[i - 1]) if i > 0 else float(orders[i])
    hi = float(orders[i + 1]) if i + 1 < len(orders) else float(orders[i])
    if hi - lo <= 1e-9 * hi:
        return best

    def f(a):
        v = objective(a, rdp_at(a))
        return v if math.isfinite(v) else 1e300

    res = optimize.minimize_scalar(
        f, bounds=(lo, hi), method="bounded", options={"xatol": 1e-5 * lo, "maxiter": 40}
    )
    return min(best, float(res.fun))
