"""Calibration: the noise multipliers that meet a target (epsilon, delta), conservative
by construction (the accounted epsilon never exceeds the target)."""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from scipy import optimize

from ._checks import _as_list, _check_count, _check_delta, _check_epsilon, _check_sample_rate, _real
from .accountant import PrivacyAccountant, dpsgd_epsilon
from .gdp import _log_gdp_delta, gaussian_epsilon, gdp_delta, gdp_epsilon

#: Largest finite target epsilon the calibrations accept. Far beyond any meaningful
#: guarantee (e^eps overflows a double from eps ~ 709 on), it keeps the root finders inside
#: the range where the GDP curve is computable; ``inf`` asks for no noise at all.
MAX_EPSILON = 1e6


def _check_target_epsilon(epsilon, name: str = "epsilon") -> float:
    eps = _check_epsilon(epsilon, name)
    if math.isfinite(eps) and eps > MAX_EPSILON:
        raise ValueError(
            f"{name}={eps!r} is too large to calibrate noise for (at most "
            f"{MAX_EPSILON:g}); use {name}=inf for the non-private counterpart"
        )
    return eps


_CALIB_RTOL = 1e-3  # calibrated epsilon lies in [(1 - 1e-3) target, target]

#: Smallest mu a calibration returns: below it the GDP curve's difference of two nearly
#: equal terms loses precision (measured against 60-digit arithmetic: 1e-6 relative at
#: mu = 1e-7, 8e-5 on the unsafe side at mu = 5e-10), and a release at such a mu is
#: noise alone (noise std > 1e6 sensitivities).
MIN_MU = 1e-6

# Release code recomputes a multiplier as std / sensitivity, which may round it down by
# an ulp or two, and the ledger evaluates the GDP curve again from it (the curve's root
# is found to a relative 1e-12, not monotone in its last bits): the calibrations verify
# their target at a multiplier this much smaller, against the target less this slack, so
# a fit's ledger never states more than its target.
_ROUND_TRIP = 1.0 - 2.0**-50
_EPS_SLACK = 1e-11


def calibrate_mu(epsilon: float, delta: float) -> float:
    """The GDP ``mu`` whose exact curve gives ``epsilon`` at ``delta``.

    Brent's method on ``log mu`` for ``log gdp_delta(mu, epsilon) = log delta``,
    then nudged down until both ``gdp_delta(mu, epsilon) <= delta`` and
    ``gdp_epsilon(mu, delta) <= epsilon`` hold: never above the target.

    Parameters
    ----------
    epsilon : float
        ``> 0``; ``inf`` returns ``inf`` (any mu; no noise needed).
    delta : float
        In ``(0, 1)``.

    Returns
    -------
    float
        mu, for add/remove adjacency.
    """
    eps = _check_target_epsilon(epsilon)
    delta = _check_delta(delta)
    if math.isinf(eps):
        return math.inf
    log_delta = math.log(delta)
    f = lambda lm: _log_gdp_delta(math.exp(lm), eps) - log_delta  # noqa: E731 (increasing)
    # Bracket the root by widening [0.5, 2] geometrically.
    lo, hi = math.log(0.5), math.log(2.0)
    while f(lo) > 0:
        lo -= 2.0
    while f(hi) < 0:
        hi += 2.0
    lm = optimize.brentq(f, lo, hi, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500)
    mu = math.exp(lm)
    if mu < MIN_MU:
        raise ValueError(
            f"epsilon={eps!r} at delta={delta!r} needs mu = {mu:.3g}-GDP, below {MIN_MU:g}, "
            "where the accountant's curve is not computed accurately (and every release "
            "would be noise alone): use a larger epsilon or delta"
        )
    shrink = 1e-14
    while gdp_delta(mu, eps) > delta or gdp_epsilon(mu, delta) > eps * (1.0 - _EPS_SLACK):
        mu *= 1.0 - shrink
        shrink *= 2.0
    return mu


def _conservative_scale(multipliers: list, counts: list, epsilon: float, delta: float) -> list:
    """Scale multipliers up by tiny factors until the exact epsilon is <= target, also
    for multipliers rounded down by the std / sensitivity round trip of the releases."""
    grow = 1e-14
    zs = list(multipliers)
    while gaussian_epsilon([z * _ROUND_TRIP for z in zs], delta, counts) > epsilon * (
        1.0 - _EPS_SLACK
    ):
        zs = [z * (1.0 + grow) for z in zs]
        grow *= 2.0
    return zs


def calibrate_noise_multiplier(epsilon: float, delta: float, releases: int = 1) -> float:
    """One noise multiplier shared by ``releases`` Gaussian releases (exact GDP).

    ``z = sqrt(releases) / mu`` with ``mu = calibrate_mu(epsilon, delta)``.  The
    resulting epsilon is ``<= epsilon`` and within 0.1% of it.

    Parameters
    ----------
    epsilon : float
        Target ``> 0``. ``inf`` returns ``0.0``: no noise is needed.
    delta : float
        In ``(0, 1)``.
    releases : int
        Number of non-subsampled Gaussian releases sharing the multiplier.

    Returns
    -------
    float
        Noise multiplier ``z = std / L2 sensitivity`` (add/remove adjacency).
    """
    eps = _check_target_epsilon(epsilon)
    delta = _check_delta(delta)
    releases = _check_count(releases, "releases")
    if math.isinf(eps):
        return 0.0
    z = math.sqrt(releases) / calibrate_mu(eps, delta)
    return _conservative_scale([z], [releases], eps, delta)[0]


def calibrate_plan(epsilon: float, delta: float, shares, counts=None):
    """Noise multipliers for a plan of Gaussian releases with budget shares.

    The total ``mu`` is calibrated exactly (:func:`calibrate_mu`); release ``j``
    (repeated ``count_j`` times) gets the share ``s_j`` of ``mu^2``:
    ``count_j / z_j^2 = s_j mu^2``, i.e. ``z_j = sqrt(count_j / (s_j mu^2))``.
    Shares are normalised to sum to 1.  The final multipliers are verified (and
    scaled up by a hair if rounding requires): the plan's epsilon is
    ``<= epsilon`` and within 0.1% of it.

    Parameters
    ----------
    epsilon : float
        Target ``> 0``; ``inf`` gives multipliers 0.0 (no noise).
    delta : float
        In ``(0, 1)``.
    shares : dict[str, float] or sequence of float
        Relative shares of ``mu^2`` (positive; normalised).
    counts : dict[str, int] or sequence of int, optional
        Repetitions of each release (same keys / length as ``shares``;
        default 1 each).

    Returns
    -------
    dict[str, float] or list[float]
        Noise multipliers (std / L2 sensitivity), same shape as ``shares``.

    Examples
    --------
    DP-FC with T = 10 gradient steps, the covariance getting 20% of mu^2:

    >>> z = calibrate_plan(1.0, 1e-5, {"covariance": 0.2, "gradient": 0.8},
    ...                    {"covariance": 1, "gradient": 10})
    """
    is_dict = isinstance(shares, Mapping)
    if is_dict:
        keys = list(shares.keys())
        s = [_real(shares[k], f"shares[{k!r}]") for k in keys]
        if counts is None:
            c = [1] * len(keys)
        elif isinstance(counts, Mapping):
            missing = set(keys) ^ set(counts.keys())
            if missing:
                raise ValueError(
                    f"counts and shares have different keys: {sorted(map(str, missing))}"
                )
            c = [_check_count(counts[k], f"counts[{k!r}]") for k in keys]
        else:
            raise TypeError("counts must be a dict when shares is a dict")
    else:
        s = [_real(x, "shares") for x in _as_list(shares)]
        c = (
            [1] * len(s)
            if counts is None
            else [_check_count(x, "counts") for x in _as_list(counts)]
        )
        if len(c) != len(s):
            raise ValueError(f"counts has length {len(c)} but shares has {len(s)}")
    if not s:
        raise ValueError("shares must not be empty")
    if any(not (x > 0 and math.isfinite(x)) for x in s):
        raise ValueError("shares must be finite and > 0")
    eps = _check_target_epsilon(epsilon)
    delta = _check_delta(delta)
    if math.isinf(eps):
        zs = [0.0] * len(s)
    else:
        total = math.fsum(s)
        mu2 = calibrate_mu(eps, delta) ** 2
        zs = [math.sqrt(cj / ((sj / total) * mu2)) for sj, cj in zip(s, c)]
        zs = _conservative_scale(zs, c, eps, delta)
    return dict(zip(keys, zs)) if is_dict else zs


def calibrate_dpfc_plan(
    epsilon: float, delta: float, steps: int, covariance_share: float | None = None
) -> dict:
    """Noise multipliers for DP-FC: one covariance release plus ``steps`` gradients.

    ``mu^2 = 1 / z_G^2 + steps / z_g^2``.

    Parameters
    ----------
    epsilon, delta : float
        Target (add/remove adjacency); ``epsilon > 0``, ``delta`` in (0, 1).
    steps : int
        Number of noisy full-batch gradient releases ``T``.
    covariance_share : float, optional
        Share of ``mu^2`` given to the covariance, in (0, 1).  ``None`` (the
        paper's choice) gives every one of the ``T + 1`` releases the same
        multiplier, i.e. share ``1 / (T + 1)``.

    Returns
    -------
    dict
        ``{"covariance": z_G, "gradient": z_g}`` (std / L2 sensitivity).
    """
    steps = _check_count(steps, "steps")
    if covariance_share is None:
        share = 1.0 / (steps + 1)
    else:
        share = _real(covariance_share, "covariance_share")
        if not 0.0 < share < 1.0:
            raise ValueError(f"covariance_share must be in (0, 1), got {share!r}")
    return calibrate_plan(
        epsilon,
        delta,
        {"covariance": share, "gradient": 1.0 - share},
        {"covariance": 1, "gradient": steps},
    )


#: Smallest noise multiplier the DP-SGD calibration searches (see the bracket below).
_MIN_DPSGD_MULTIPLIER = 0.05


def calibrate_dpsgd_noise_multiplier(
    epsilon: float, delta: float, sample_rate: float, steps: int, method: str = "auto", orders=None
) -> float:
    """Noise multiplier for Poisson-subsampled DP-SGD hitting ``epsilon`` from below.

    Brent's method on ``log z`` aims at 99.95% of the target; the result is
    then verified (and ``z`` raised in small steps if needed) so that its
    epsilon is ``<= epsilon`` and ``>= 0.999 epsilon``: the returned multiplier
    never overshoots the target.  ``sample_rate = 1`` uses the exact GDP
    calibration.

    Parameters
    ----------
    epsilon : float
        Target ``> 0`` (``inf`` returns 0.0: no noise).
    delta : float
        In ``(0, 1)``.
    sample_rate : float
        Poisson sampling probability in ``(0, 1]``.
    steps : int
        Number of steps ``>= 1``.
    method : {"auto", "rdp", "pld"}
        Accounting method (see :func:`dpsgd_epsilon`).
    orders : sequence of float, optional
        RDP orders.

    Returns
    -------
    float
        Noise multiplier (std / clipping norm), add/remove adjacency.
    """
    eps = _check_target_epsilon(epsilon)
    delta = _check_delta(delta)
    q = _check_sample_rate(sample_rate)
    steps = _check_count(steps, "steps")
    if method not in PrivacyAccountant._METHODS:
        raise ValueError(f"method must be one of {PrivacyAccountant._METHODS}, got {method!r}")
    if math.isinf(eps):
        return 0.0
    if q == 1.0:
        return calibrate_noise_multiplier(eps, delta, steps)

    def eps_of(z):
        return dpsgd_epsilon(z, q, steps, delta, method=method, orders=orders)

    aim = math.log(eps * (1.0 - _CALIB_RTOL / 2.0))

    def f(log_z):  # decreasing in log_z
        return math.log(max(eps_of(math.exp(log_z)), 1e-300)) - aim

    # Bracket, starting from the non-subsampled multiplier scaled by q.
    lo = hi = math.log(max(calibrate_noise_multiplier(eps, delta, steps) * q, 0.1))
    while f(hi) > 0:
        lo, hi = hi, hi + 1.0
        if hi > math.log(1e7):
            raise ValueError("epsilon is too small to reach with a finite noise multiplier")
    floor = math.log(_MIN_DPSGD_MULTIPLIER)
    while f(lo) < 0:
        if lo <= floor:
            # 0.05 C_g already meets the target. Searching further down costs minutes
            # (the loss range grows as 1 / z^2) and buys nothing: below it the noise is
            # negligible next to one clipped gradient.
            return _MIN_DPSGD_MULTIPLIER
        # Down by e, but not past the floor (stepping past it returned the bracket's
        # upper end: z = 0.1 for a target that z = 0.085 meets, 25% of epsilon unspent).
        hi, lo = lo, max(lo - 1.0, floor)
    z = math.exp(optimize.brentq(f, lo, hi, xtol=2e-5, rtol=1e-9))
    # Verify; never return a multiplier whose epsilon exceeds the target.
    step = 1e-5
    while eps_of(z) > eps:
        z *= 1.0 + step
        step *= 2.0
    return z
