"""The privacy accountant: composes events and answers (epsilon, delta) queries."""

from __future__ import annotations

import math

import numpy as np

from .._optional import install_hint
from ._checks import _check_count, _check_delta, _check_epsilon, _real
from .events import Composition, Event, GaussianRelease, SubsampledGaussian, _flatten
from .gdp import gaussian_epsilon, gdp_delta, gdp_epsilon
from .rdp import _check_orders, _refine_over_orders, subsampled_gaussian_rdp


def _dp_accounting():
    """The optional ``dp_accounting`` module, or None."""
    try:
        import dp_accounting
    except ImportError:
        return None
    return dp_accounting


#: Most discretisation points of one step's privacy-loss range in the PLD (bounds its work).
_PLD_MAX_POINTS = 2e4
#: Most subsampled steps the PLD composes: its time grows with the composed loss range
#: (10^6 steps: about a second; 10^7: half a minute; 10^8: minutes, or memory exhausted),
#: while RDP answers at once and is as tight there. "auto" uses RDP alone beyond it.
_PLD_MAX_STEPS = 10**6
#: Most grid points of the composed loss range, estimated as the sum of the steps' ranges
#: (an overestimate: 10^6 steps of q = 1e-5, z = 1.5 count 2e8 and compose in a second).
_PLD_MAX_COMPOSED_POINTS = 1e9
#: Smallest subsampled noise multiplier the PLD composes: below it dp_accounting's
#: construction of one step runs for seconds (z = 1e-3: 3 s) to minutes (1e-5), for an
#: epsilon in the thousands at least, which RDP states as well. "auto" uses RDP there.
_PLD_MIN_MULTIPLIER = 1e-2
#: Tail (in standard deviations) of the Gaussian kept by the PLD's loss range estimate.
_PLD_TAIL_SIGMAS = 10.0


def _pld_loss_width(z: float, q: float) -> float:
    """Width of the privacy-loss range of one Poisson-subsampled Gaussian step.

    The loss of the mixture ``(1 - q) N(0, z^2) + q N(1, z^2)`` against ``N(0, z^2)`` at
    ``t`` standard deviations is ``log(1 + q (exp((2 t z + 1) / (2 z^2)) - 1))``; ``t``
    is taken at :data:`_PLD_TAIL_SIGMAS` on both sides. An estimate of the grid's extent
    (the interval only needs the right order of magnitude), never used as a bound.
    """

    def loss(t: float) -> float:
        a = (2.0 * t * z + 1.0) / (2.0 * z * z)
        if a > 700.0:
            return a + math.log(q)
        return math.log1p(q * math.expm1(a))

    return loss(_PLD_TAIL_SIGMAS) - loss(-_PLD_TAIL_SIGMAS)


class PrivacyAccountant:
    """Composes Gaussian events and reports (epsilon, delta), add/remove adjacency.

    Parameters
    ----------
    method : {"auto", "rdp", "pld"}
        ``"auto"`` (default): exact mu-GDP when no event is subsampled
        (``sample_rate < 1``).  With subsampled events: RDP (no dependency;
        Gaussian parts enter RDP exactly as ``a mu^2 / 2``) and, when
        ``dp_accounting`` is importable, also its pessimistic PLD estimate;
        the smaller of the two valid upper bounds is reported (PLD is
        typically 7-30% tighter).  :meth:`get_epsilon_and_method` says which
        was used.
        ``"rdp"``: RDP only, for everything (no dependency, reproducible).
        ``"pld"``: ``dp_accounting``'s PLD accountant only (ImportError if it
        is missing).
    orders : sequence of float, optional
        Renyi orders for the RDP path (default :data:`DEFAULT_RDP_ORDERS`);
        the conversion is refined between grid orders.
    pld_discretization : float, optional
        ``value_discretization_interval`` for the PLD; default: adaptive,
        ``epsilon_rdp / 3000`` clipped to ``[1e-6, 5e-4]`` (PLD is pessimistic
        at any interval; finer is tighter and slower).

    Examples
    --------
    >>> acct = PrivacyAccountant()
    >>> acct.compose(GaussianRelease(5.0, name="covariance")).compose(
    ...     GaussianRelease(5.0, count=10, name="gradient"))  # doctest: +ELLIPSIS
    PrivacyAccountant(...)
    >>> round(acct.mu, 6)
    0.663325
    """

    _METHODS = ("auto", "rdp", "pld")

    def __init__(self, method: str = "auto", orders=None, pld_discretization=None):
        if method not in self._METHODS:
            raise ValueError(f"method must be one of {self._METHODS}, got {method!r}")
        self.method = method
        self.orders = np.asarray(_check_orders(orders))
        if pld_discretization is not None:
            d = _real(pld_discretization, "pld_discretization")
            if not (d > 0 and math.isfinite(d)):
                raise ValueError(f"pld_discretization must be finite and > 0, got {d!r}")
            pld_discretization = d
        self.pld_discretization = pld_discretization
        self._events: list = []

    def __repr__(self) -> str:
        return f"PrivacyAccountant(method={self.method!r}, events={len(self._events)})"

    @property
    def events(self) -> tuple:
        """The composed events, flattened, in order."""
        return tuple(self._events)

    @staticmethod
    def supports(event) -> bool:
        """Whether :meth:`compose` accepts ``event``: a :class:`GaussianRelease`, a
        :class:`SubsampledGaussian` or a :class:`Composition` of them (every
        :class:`Composition` holds only those)."""
        return isinstance(event, (GaussianRelease, SubsampledGaussian, Composition))

    def compose(self, event: Event, count: int = 1) -> "PrivacyAccountant":
        """Add ``event`` (``count`` times, adaptively composed); returns ``self``.

        Raises TypeError for an event :meth:`supports` rejects.
        """
        count = _check_count(count)
        flat = _flatten(event)
        self._events.extend(flat * count)
        return self

    # -- internal views --------------------------------------------------
    def _mu2_and_subsampled(self):
        """``(mu^2 of all non-subsampled releases, {(z, q): total steps})``.

        Composition is commutative, so identical subsampled events are merged.
        """
        mu2 = []
        sub: dict = {}
        for e in self._events:
            if isinstance(e, GaussianRelease):
                mu2.append(e.mu_squared)
            elif e.sample_rate == 1.0:
                mu2.append(e.as_gaussian().mu_squared)
            else:
                key = (e.noise_multiplier, e.sample_rate)
                sub[key] = sub.get(key, 0) + e.steps
        return math.fsum(mu2), sub

    @property
    def is_exact_gdp(self) -> bool:
        """True when no event is subsampled: the exact GDP curve applies."""
        return not self._mu2_and_subsampled()[1]

    @property
    def mu(self) -> float | None:
        """GDP parameter of the composition (None if something is subsampled)."""
        mu2, sub = self._mu2_and_subsampled()
        return None if sub else math.sqrt(mu2)

    def rdp(self, orders=None) -> np.ndarray:
        """Total RDP at ``orders`` (default: the accountant's orders)."""
        orders = self.orders if orders is None else np.asarray(_check_orders(orders))
        mu2, sub = self._mu2_and_subsampled()
        total = orders * mu2 / 2.0
        for (z, q), steps in sub.items():
            total = total + subsampled_gaussian_rdp(z, q, steps, orders)
        return total

    def _rdp_at(self, alpha: float) -> float:
        return float(self.rdp([alpha])[0])

    def _rdp_epsilon(self, delta: float) -> float:
        log_delta = math.log(delta)

        def objective(a, r):  # the improved RDP -> (eps, delta) conversion
            return r + math.log1p(-1.0 / a) - (log_delta + math.log(a)) / (a - 1.0)

        return max(0.0, _refine_over_orders(self._rdp_at, self.orders, self.rdp(), objective))

    def _rdp_delta(self, eps: float) -> float:
        if math.isinf(eps):
            return 0.0

        def objective(a, r):  # log delta of the same conversion
            return (a - 1.0) * (r - eps + math.log1p(-1.0 / a)) - math.log(a)

        log_d = _refine_over_orders(self._rdp_at, self.orders, self.rdp(), objective)
        return float(min(1.0, math.exp(min(0.0, log_d))))

    def _pld_interval(self, eps_scale: float) -> float:
        """The PLD's discretisation interval: the requested (or adaptive) one, coarsened
        so that one step's loss range has at most _PLD_MAX_POINTS points."""
        interval = self.pld_discretization
        if interval is None:
            interval = min(5e-4, max(1e-6, eps_scale / 3000.0))
        # The PLD's work grows with its privacy-loss range over the interval; for a tiny
        # noise multiplier that range is huge (~1 / (2 z^2)) and the PLD ran for minutes.
        width = max([_pld_loss_width(z, q) for (z, q) in self._mu2_and_subsampled()[1]] + [0.0])
        return max(interval, width / _PLD_MAX_POINTS)

    def _pld_too_large(self, eps_scale: float) -> str:
        """Why the PLD would take minutes or exhaust memory here ("" if it would not):
        more than _PLD_MAX_STEPS subsampled steps, a subsampled noise multiplier below
        _PLD_MIN_MULTIPLIER, or a composed loss range (the sum of the steps' ranges) of
        more than _PLD_MAX_COMPOSED_POINTS grid points."""
        sub = self._mu2_and_subsampled()[1]
        steps = sum(sub.values())
        if steps > _PLD_MAX_STEPS:
            return f"{steps:,} subsampled steps (at most {_PLD_MAX_STEPS:,})"
        z_min = min((z for z, _ in sub), default=math.inf)
        if z_min < _PLD_MIN_MULTIPLIER:
            return f"a noise multiplier of {z_min:.3g} (at least {_PLD_MIN_MULTIPLIER:g})"
        total = sum(n * _pld_loss_width(z, q) for (z, q), n in sub.items())
        points = total / self._pld_interval(eps_scale)
        if points > _PLD_MAX_COMPOSED_POINTS:
            return f"a composed loss range of {points:.3g} grid points"
        return ""

    def _pld_feasible(self, eps_scale: float) -> bool:
        """Whether "auto" also asks the PLD (installed, and not too large)."""
        return _dp_accounting() is not None and not self._pld_too_large(eps_scale)

    def _pld(self, eps_scale: float):
        dpa = _dp_accounting()
        if dpa is None:
            raise ModuleNotFoundError(
                "the PLD accountant (\"pld\") needs the optional package 'dp_accounting': "
                f"{install_hint('accounting')}",
                name="dp_accounting",
            )
        # A coarser interval than the default is still pessimistic (an upper bound), only
        # looser (and "auto" reports the smaller of it and RDP): bounded time for any (z, q).
        interval = self._pld_interval(eps_scale)
        mu2, sub = self._mu2_and_subsampled()
        too_large = self._pld_too_large(eps_scale)
        if too_large:
            raise ValueError(
                f'method="pld" would take minutes or exhaust memory here ({too_large}); '
                'use method="rdp" or "auto" (RDP alone there)'
            )
        acc = dpa.pld.PLDAccountant(value_discretization_interval=interval)
        if mu2 > 0:
            acc.compose(dpa.GaussianDpEvent(1.0 / math.sqrt(mu2)))
        for (z, q), steps in sub.items():
            acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps)
        return acc

    # -- answers (no side effects: the same query gives the same answer) ---------
    def get_epsilon_and_method(self, delta: float) -> tuple[float, str]:
        """Epsilon at ``delta`` and the method that gave it.

        The method is ``"gdp"`` (exact curve), ``"rdp"``, ``"pld"`` or ``"none"`` (no
        events); with ``method="auto"`` and subsampled events it is whichever of the RDP
        and PLD bounds was smaller at this ``delta``. Add/remove adjacency.
        """
        delta = _check_delta(delta)
        if not self._events:
            return 0.0, "none"
        exact = self.is_exact_gdp
        if self.method == "auto" and exact:
            return gdp_epsilon(self.mu, delta), "gdp"
        if self.method == "pld":
            scale = gdp_epsilon(self.mu, delta) if exact else self._rdp_epsilon(delta)
            return max(0.0, float(self._pld(scale).get_epsilon(delta))), "pld"
        eps = self._rdp_epsilon(delta)
        if self.method == "auto" and eps > 0 and self._pld_feasible(eps):
            eps_pld = max(0.0, float(self._pld(eps).get_epsilon(delta)))
            if eps_pld < eps:
                return eps_pld, "pld"
        return eps, "rdp"

    def get_delta_and_method(self, epsilon: float) -> tuple[float, str]:
        """Delta at ``epsilon`` (``>= 0``) and the method that gave it (see
        :meth:`get_epsilon_and_method`)."""
        eps = _check_epsilon(epsilon, allow_zero=True)
        if not self._events:
            return 0.0, "none"
        exact = self.is_exact_gdp
        if self.method == "auto" and exact:
            return gdp_delta(self.mu, eps), "gdp"
        scale = max(eps, 1e-3) if math.isfinite(eps) else 1.0
        if self.method == "pld":
            return min(1.0, max(0.0, float(self._pld(scale).get_delta(eps)))), "pld"
        d = self._rdp_delta(eps)
        if self.method == "auto" and math.isfinite(eps) and self._pld_feasible(scale):
            d_pld = min(1.0, max(0.0, float(self._pld(scale).get_delta(eps))))
            if d_pld < d:
                return d_pld, "pld"
        return d, "rdp"

    def get_epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` (in ``(0, 1)``) for the composed events.

        Add/remove adjacency; see the class docstring for the method used
        (:meth:`get_epsilon_and_method` also says which).
        """
        return self.get_epsilon_and_method(delta)[0]

    def get_delta(self, epsilon: float) -> float:
        """Delta at ``epsilon`` (``>= 0``) for the composed events (add/remove)."""
        return self.get_delta_and_method(epsilon)[0]


def dpsgd_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    method: str = "auto",
    orders=None,
) -> float:
    """Epsilon of DP-SGD with Poisson subsampling.

    Parameters
    ----------
    noise_multiplier : float
        std of the noise on the summed clipped gradients divided by the clipping
        norm (the L2 sensitivity), ``> 0``.
    sample_rate : float
        Poisson sampling probability ``q`` in ``(0, 1]``. ``q = 1`` (full
        batch) is ``steps`` non-subsampled Gaussian releases, accounted exactly
        as GDP whatever ``method`` says.  (Shuffled fixed-size batches are not
        Poisson sampling; this accounting does not apply to them.)
    steps : int
        Number of noisy steps, ``>= 1``.
    delta : float
        In ``(0, 1)``.
    method : {"auto", "rdp", "pld"}
        ``"rdp"``: Renyi DP (no dependency, sound upper bound).  ``"pld"``:
        ``dp_accounting``'s pessimistic PLD.  ``"auto"`` (default): the smaller
        of the two when ``dp_accounting`` is installed, else RDP.  See
        :class:`PrivacyAccountant`.
    orders : sequence of float, optional
        RDP orders.

    Returns
    -------
    float
        epsilon for add/remove adjacency.
    """
    acct = PrivacyAccountant(method=method, orders=orders)
    event = SubsampledGaussian(noise_multiplier, sample_rate, steps)
    if event.sample_rate == 1.0:
        return gaussian_epsilon(event.noise_multiplier, delta, event.steps)
    return acct.compose(event).get_epsilon(delta)
