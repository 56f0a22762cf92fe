"""The privacy ledger: a readable account of every release and the total guarantee,
plus the delta the native Gaussian sampler's tail cut adds."""

from __future__ import annotations

import dataclasses
import decimal
import math
from typing import Sequence

import numpy as np

from ._checks import _check_count, _check_delta, _check_epsilon
from .accountant import PrivacyAccountant
from .events import ADJACENCY, GaussianRelease, _flatten


def _rounded_up(x: float, digits: int) -> str:
    """``x`` to ``digits`` significant digits, rounded up: a printed privacy claim
    (epsilon, delta) is never smaller than the one accounted (".3g" printed
    delta = 1.2345e-6 as 1.23e-06)."""
    near = f"{x:.{digits}g}"
    if not math.isfinite(x) or float(near) >= x:  # the usual rounding does not understate
        return near
    exact = decimal.Decimal(x)
    step = decimal.Decimal(1).scaleb(exact.adjusted() - digits + 1)
    return f"{float(exact.quantize(step, rounding=decimal.ROUND_CEILING)):.{digits}g}"


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """One line of a :class:`PrivacyLedger`.

    ``share`` is this release's fraction of ``mu^2`` (None for subsampled
    events, which have no mu).
    """

    name: str
    sensitivity: float | None
    noise_std: float | None
    noise_multiplier: float
    count: int
    sample_rate: float
    share: float | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PrivacyLedger:
    """A readable account of every release and the total (epsilon, delta).

    ``str(ledger)`` prints a table; :meth:`to_dict` gives a JSON-serialisable
    dict.  Build one with :func:`ledger_for`.
    """

    entries: tuple
    epsilon: float
    delta: float
    mu: float | None
    method: str
    adjacency: str = ADJACENCY
    #: Delta added by the Gaussian sampler's tail cut (see :func:`sampler_tail_delta`);
    #: ``delta`` is the accountant's, for the idealised Gaussian mechanism.
    sampler_delta: float = 0.0

    @property
    def total_delta(self) -> float:
        """``delta + sampler_delta``: delta with the sampler's tail cut accounted (for a
        sampler exact but for that cut; the floating-point sampler itself is not covered
        by any delta, see README "Floating point")."""
        return min(1.0, self.delta + self.sampler_delta)

    def to_dict(self) -> dict:
        def num(x):
            return None if x is None or not math.isfinite(x) else float(x)

        return {
            "adjacency": self.adjacency,
            "method": self.method,
            "epsilon": num(self.epsilon),
            "delta": float(self.delta),
            "sampler_delta": float(self.sampler_delta),
            "total_delta": float(self.total_delta),
            "mu": num(self.mu),
            "releases": [
                {
                    "name": e.name,
                    "sensitivity": num(e.sensitivity),
                    "noise_std": num(e.noise_std),
                    "noise_multiplier": num(e.noise_multiplier),
                    "count": int(e.count),
                    "sample_rate": float(e.sample_rate),
                    "share": num(e.share),
                }
                for e in self.entries
            ],
        }

    def __str__(self) -> str:
        def fmt(x, spec="{:.6g}"):
            return "-" if x is None else spec.format(x)

        head = [
            "release",
            "sensitivity",
            "noise std",
            "multiplier",
            "count",
            "sample rate",
            "share of mu^2",
        ]
        rows = [
            [
                e.name or f"#{i}",
                fmt(e.sensitivity),
                fmt(e.noise_std),
                fmt(e.noise_multiplier),
                str(e.count),
                fmt(e.sample_rate, "{:g}"),
                fmt(e.share, "{:.2%}"),
            ]
            for i, e in enumerate(self.entries)
        ]
        widths = [
            max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
        ]

        def line(cells):
            return "  ".join(
                c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )

        out = [line(head), line(["-" * w for w in widths])]
        out += [line(r) for r in rows]
        mu = "" if self.mu is None else f", mu = {_rounded_up(self.mu, 6)}"
        out.append(
            f"total: epsilon = {_rounded_up(self.epsilon, 6)}, "
            f"delta = {_rounded_up(self.delta, 4)}{mu}"
        )
        if self.sampler_delta:
            out.append(
                f"sampler tail cut: + {_rounded_up(self.sampler_delta, 3)} to delta (delta "
                f"with the tail cut: {_rounded_up(self.total_delta, 6)})"
            )
        out.append(f"({self.method}; adjacency: {self.adjacency})")
        return "\n".join(out)


#: Probability that one Box-Muller pair of the native sampler lands in its tail cut: the
#: first uniform is the midpoint of one of 2^52 cells, so the cell [0, 2^-52), whose ideal
#: radii exceed sqrt(-2 log 2^-52) ~ 8.5 standard deviations, gives one radius (8.57).
SAMPLER_TAIL_PROBABILITY = 2.0**-52


def sampler_tail_delta(epsilon: float, normal_pairs: int) -> float:
    """Delta added to an (epsilon, delta) guarantee by the sampler's tail cut.

    The native sampler's output differs from the ideal Gaussian's only when a pair falls
    in the cut tail: with ``normal_pairs`` pairs drawn, the two output distributions are
    within total variation ``eta = normal_pairs * 2^-52`` (union bound over every pair
    of every release). If the ideal mechanism is (epsilon, delta)-DP, one within TV eta of
    it on every input is (epsilon, delta + (1 + e^epsilon) eta)-DP. Returns that added
    term, capped at 1 (0 for no draws).
    """
    pairs = _check_count(normal_pairs, "normal_pairs") if normal_pairs else 0
    if pairs == 0:
        return 0.0
    eps = _check_epsilon(epsilon, allow_zero=True)
    if math.isinf(eps):
        return 1.0
    log_d = float(np.logaddexp(0.0, eps)) + math.log(pairs) + math.log(SAMPLER_TAIL_PROBABILITY)
    return 1.0 if log_d >= 0.0 else math.exp(log_d)


def with_sampler_tail(ledger: "PrivacyLedger", normal_pairs: int) -> "PrivacyLedger":
    """``ledger`` with :attr:`PrivacyLedger.sampler_delta` set for ``normal_pairs`` draws."""
    return dataclasses.replace(
        ledger, sampler_delta=sampler_tail_delta(ledger.epsilon, normal_pairs)
    )


def ledger_for(releases: Sequence, delta: float, method: str = "auto") -> PrivacyLedger:
    """Build a :class:`PrivacyLedger` for a list of releases.

    Parameters
    ----------
    releases : sequence of GaussianRelease or SubsampledGaussian
        Each GaussianRelease should carry its ``sensitivity`` (so the ledger
        can show the noise std); Compositions are flattened.
    delta : float
        In ``(0, 1)``.
    method : {"auto", "rdp", "pld"}
        Accountant method (see :class:`PrivacyAccountant`).

    Returns
    -------
    PrivacyLedger
        Totals for add/remove adjacency.
    """
    delta = _check_delta(delta)
    acct = PrivacyAccountant(method=method)
    flat = []
    for r in releases:
        flat.extend(_flatten(r))
    for r in flat:
        acct.compose(r)
    mu = acct.mu
    mu2 = None if mu is None else mu * mu
    entries = []
    for r in flat:
        if isinstance(r, GaussianRelease) or r.sample_rate == 1.0:
            g = r if isinstance(r, GaussianRelease) else r.as_gaussian()
            share = (g.mu_squared / mu2) if mu2 else None
            entries.append(
                LedgerEntry(g.name, g.sensitivity, g.std, g.noise_multiplier, g.count, 1.0, share)
            )
        else:
            entries.append(
                LedgerEntry(r.name, None, None, r.noise_multiplier, r.steps, r.sample_rate, None)
            )
    epsilon, used = acct.get_epsilon_and_method(delta)
    desc = {
        "gdp": "exact Gaussian DP (mu-GDP)",
        "rdp": "RDP (sampled Gaussian, Mironov et al. 2019), improved conversion",
        "pld": "PLD (dp_accounting, pessimistic)",
        "none": "no releases",
    }[used]
    return PrivacyLedger(tuple(entries), epsilon, delta, mu, desc)
