"""Privacy accounting for the Gaussian releases of dpfc_native.

Everything here is pure Python (NumPy and SciPy).  The optional
``dp_accounting`` package, when installed, adds a tighter PLD estimate for
*subsampled* releases (see "Methods"); nothing else depends on it.

Conventions
-----------
Adjacency
    Every epsilon and delta in this module is for **add/remove adjacency**: two
    datasets are neighbours when one is obtained from the other by adding or
    removing one example.  (Under replace-one adjacency sensitivities differ;
    that is the caller's business, this module only sees noise multipliers.)
Noise multiplier
    ``z = std / sensitivity``: the standard deviation of the Gaussian noise
    divided by the L2 sensitivity of the released statistic.  It is *not* the
    standard deviation itself.  A release with multiplier ``z`` is ``1/z``-GDP.
mu
    The parameter of mu-Gaussian differential privacy (Dong, Roth and Su 2019).
Subsampling
    "Subsampled" means Poisson sampling (each example independently with
    probability ``q``).  Shuffled fixed-size batches are a different mechanism
    and are not covered.

Methods
-------
Non-subsampled Gaussian releases (exact)
    ``k`` Gaussian releases with multipliers ``z_j`` repeated ``count_j`` times
    compose exactly to mu-GDP with ``mu = sqrt(sum_j count_j / z_j**2)``, and the
    privacy profile of mu-GDP is exactly (Balle and Wang 2018)::

        delta(eps) = Phi(-eps/mu + mu/2) - exp(eps) * Phi(-eps/mu - mu/2).

    :func:`gdp_delta` and :func:`gdp_epsilon` evaluate this curve in log space.
    This is what DP-LS, DP-Newton, DP-FC and full-batch DP-SGD use.
Poisson-subsampled Gaussian: RDP (sound upper bound, no dependency)
    Renyi DP of the sampled Gaussian mechanism (Mironov, Talwar and Zhang 2019),
    at integer and fractional orders, computed in log space; RDP composes by
    addition and is converted to (eps, delta) with the conversion of Balle et
    al. 2020 (Thm. 21) / Canonne, Kamath and Steinke 2020::

        eps = rdp(a) + log((a - 1) / a) - (log(delta) + log(a)) / (a - 1),

    minimised over the orders :data:`DEFAULT_RDP_ORDERS` and then refined
    between grid orders.  Never optimistic; but looser than PLD: measured on a
    grid (z 0.6-8, q 1e-3-0.5, 10-10^4 steps, delta 1e-5 and 8e-7) the median
    ratio RDP / PLD is 1.13 and 35% of the grid is within 10%; it is worst when
    the total privacy loss is tiny (q = 1e-3 with 10-100 steps: up to 30x,
    i.e. 0.24 instead of 0.008).
Poisson-subsampled Gaussian: PLD (optional)
    ``dp_accounting.pld.PLDAccountant`` (pessimistic connect-the-dots
    discretisation; an upper bound too).  ``method="auto"`` (the default)
    reports the smaller of the RDP and PLD bounds when ``dp_accounting`` is
    importable -- within 0.5% of a fine-grid PLD over the grid above -- and the
    RDP bound otherwise.  ``method="rdp"`` is reproducible without it.
Mixtures
    When subsampled and non-subsampled releases are composed, the Gaussian part
    enters RDP exactly (``rdp(a) = a * mu**2 / 2``, which *is* the Renyi
    divergence of two Gaussians) and the PLD as one Gaussian of parameter mu;
    the result is sound but looser than the exact GDP curve of the Gaussian
    part alone.

A sampling rate of 1 is not subsampling: it is routed to the exact GDP path.

Layout (pure math apart from the objects that use it, as in dp_accounting and Opacus):

``gdp``
    the exact mu-GDP curve of composed plain Gaussian releases;
``rdp``
    Renyi DP of the sampled Gaussian mechanism and the RDP -> (epsilon, delta) conversion;
``paper``
    the paper code's loose conversion (comparison only);
``events``
    :class:`GaussianRelease`, :class:`SubsampledGaussian`, :class:`Composition`;
``accountant``
    :class:`PrivacyAccountant` (``supports``, ``compose``, side-effect-free getters) and
    :func:`dpsgd_epsilon`;
``calibration``
    noise multipliers from a target (epsilon, delta);
``ledger``
    :class:`PrivacyLedger` and the sampler's tail-cut delta.

Every public name is importable from ``dpfc_native.accounting`` itself.
"""

from __future__ import annotations

# The argument checks other modules of dpfc_native share (errors name the argument).
from ._checks import _check_delta, _check_epsilon, _check_mu, _real  # noqa: F401
from .accountant import PrivacyAccountant, dpsgd_epsilon
from .calibration import (
    MAX_EPSILON,
    calibrate_dpfc_plan,
    calibrate_dpsgd_noise_multiplier,
    calibrate_mu,
    calibrate_noise_multiplier,
    calibrate_plan,
)
from .events import ADJACENCY, Composition, Event, GaussianRelease, SubsampledGaussian
from .gdp import gaussian_delta, gaussian_epsilon, gaussian_mu, gdp_delta, gdp_epsilon
from .ledger import (
    SAMPLER_TAIL_PROBABILITY,
    LedgerEntry,
    PrivacyLedger,
    ledger_for,
    sampler_tail_delta,
    with_sampler_tail,
)
from .paper import paper_calibrate_noise_multiplier, paper_rdp_epsilon
from .rdp import DEFAULT_RDP_ORDERS, rdp_to_delta, rdp_to_epsilon, subsampled_gaussian_rdp

__all__ = [
    "ADJACENCY",
    "DEFAULT_RDP_ORDERS",
    # exact Gaussian DP
    "gdp_delta",
    "gdp_epsilon",
    "gaussian_mu",
    "gaussian_epsilon",
    "gaussian_delta",
    # RDP
    "subsampled_gaussian_rdp",
    "rdp_to_epsilon",
    "rdp_to_delta",
    "dpsgd_epsilon",
    # the paper's loose conversion
    "paper_rdp_epsilon",
    "paper_calibrate_noise_multiplier",
    # value objects and accountant
    "GaussianRelease",
    "SubsampledGaussian",
    "Composition",
    "Event",
    "PrivacyAccountant",
    # calibration
    "calibrate_mu",
    "calibrate_noise_multiplier",
    "calibrate_plan",
    "calibrate_dpfc_plan",
    "calibrate_dpsgd_noise_multiplier",
    # ledger
    "LedgerEntry",
    "PrivacyLedger",
    "ledger_for",
    "sampler_tail_delta",
    "with_sampler_tail",
    "SAMPLER_TAIL_PROBABILITY",
    "MAX_EPSILON",
]
