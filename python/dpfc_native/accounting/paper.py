"""The paper code's (loose) RDP conversion, kept for comparison only."""

from __future__ import annotations

import math

from ._checks import _check_count, _check_delta, _check_mu
from .calibration import _check_target_epsilon


def paper_rdp_epsilon(mu: float, delta: float) -> float:
    """Epsilon by the paper code's loose RDP conversion, for comparison only.

    ``eps = min_{a > 1}  a mu^2 / 2 + log(1/delta) / (a - 1)``, minimised in
    closed form over real ``a``: ``eps = mu^2/2 + mu sqrt(2 log(1/delta))``.
    (Minimising over all real orders is the most favourable reading of the
    paper's conversion, so the savings we report are not overstated.)  It is a
    valid but loose bound; :func:`gdp_epsilon` is exact.

    Parameters
    ----------
    mu : float
        GDP parameter ``>= 0`` (``sqrt(sum count_j / z_j^2)``).
    delta : float
        In ``(0, 1)``.
    """
    mu = _check_mu(mu)
    delta = _check_delta(delta)
    if math.isinf(mu):
        return math.inf
    return mu * mu / 2.0 + mu * math.sqrt(2.0 * math.log(1.0 / delta))


def paper_calibrate_noise_multiplier(epsilon: float, delta: float, releases: int = 1) -> float:
    """Shared noise multiplier by the paper code's loose conversion.

    Solves ``paper_rdp_epsilon(sqrt(releases) / z, delta) = epsilon`` for ``z``
    (``mu = sqrt(2L + 2 eps) - sqrt(2L)``, ``L = log(1/delta)``).

    Parameters
    ----------
    epsilon : float
        Target epsilon ``> 0`` (``inf`` returns 0.0: no noise).
    delta : float
        In ``(0, 1)``.
    releases : int
        Number of Gaussian releases sharing the multiplier.

    Returns
    -------
    float
        Noise multiplier (std / L2 sensitivity), add/remove adjacency.
    """
    eps = _check_target_epsilon(epsilon)
    delta = _check_delta(delta)
    releases = _check_count(releases, "releases")
    if math.isinf(eps):
        return 0.0
    two_l = 2.0 * math.log(1.0 / delta)
    # mu = sqrt(2L + 2eps) - sqrt(2L), written without cancellation
    mu = 2.0 * eps / (math.sqrt(two_l + 2.0 * eps) + math.sqrt(two_l))
    return math.sqrt(releases) / mu
