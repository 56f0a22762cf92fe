"""What the accountant composes: frozen descriptions of Gaussian releases (the
counterpart of dp_accounting's ``DpEvent``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Union

from ._checks import _as_list, _check_count, _check_multiplier, _check_sample_rate, _real

#: The adjacency relation every epsilon of the accounting package refers to.
ADJACENCY = "add/remove one example"


@dataclasses.dataclass(frozen=True)
class GaussianRelease:
    """A Gaussian mechanism released ``count`` times (no subsampling).

    Parameters
    ----------
    noise_multiplier : float
        ``z = std / L2 sensitivity`` (not the std), ``> 0``; ``inf`` means the
        release costs nothing.
    count : int
        Number of repetitions (each with fresh noise), ``>= 1``.
    name : str
        Label for ledgers.
    sensitivity : float, optional
        L2 sensitivity under add/remove adjacency (for the ledger; the noise
        std is ``noise_multiplier * sensitivity``).
    """

    noise_multiplier: float
    count: int = 1
    name: str = ""
    sensitivity: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "noise_multiplier", _check_multiplier(self.noise_multiplier))
        object.__setattr__(self, "count", _check_count(self.count))
        if not isinstance(self.name, str):
            raise TypeError("name must be a str")
        if self.sensitivity is not None:
            s = _real(self.sensitivity, "sensitivity")
            if not (s > 0 and math.isfinite(s)):
                raise ValueError(f"sensitivity must be finite and > 0, got {s!r}")
            object.__setattr__(self, "sensitivity", s)

    @classmethod
    def from_std(
        cls, std: float, sensitivity: float, count: int = 1, name: str = ""
    ) -> "GaussianRelease":
        """Build from the noise std and the L2 sensitivity (``z = std / sensitivity``)."""
        std = _real(std, "std")
        sens = _real(sensitivity, "sensitivity")
        if not (sens > 0 and math.isfinite(sens)):
            raise ValueError(f"sensitivity must be finite and > 0, got {sens!r}")
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std!r}")
        return cls(std / sens, count=count, name=name, sensitivity=sens)

    @property
    def std(self) -> float | None:
        """Noise standard deviation, or None without a sensitivity."""
        if self.sensitivity is None:
            return None
        return self.noise_multiplier * self.sensitivity

    @property
    def mu_squared(self) -> float:
        """This release's contribution ``count / z^2`` to ``mu^2``."""
        z2 = self.noise_multiplier**2
        return self.count / z2 if z2 > 0 else math.inf  # z below ~1e-162: z^2 underflows


@dataclasses.dataclass(frozen=True)
class SubsampledGaussian:
    """``steps`` Poisson-subsampled Gaussian mechanisms (e.g. DP-SGD).

    Parameters
    ----------
    noise_multiplier : float
        std / L2 sensitivity (clipping norm), ``> 0``.
    sample_rate : float
        Poisson inclusion probability in ``(0, 1]``; 1 means no subsampling
        and is accounted exactly as ``GaussianRelease(z, count=steps)``.
    steps : int
        ``>= 1``.
    name : str
        Label for ledgers.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "noise_multiplier", _check_multiplier(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", _check_sample_rate(self.sample_rate))
        object.__setattr__(self, "steps", _check_count(self.steps, "steps"))
        if not isinstance(self.name, str):
            raise TypeError("name must be a str")

    def as_gaussian(self) -> GaussianRelease:
        """The equivalent :class:`GaussianRelease` when ``sample_rate == 1``."""
        if self.sample_rate != 1.0:
            raise ValueError("only a sample_rate of 1 is a plain Gaussian release")
        return GaussianRelease(self.noise_multiplier, count=self.steps, name=self.name)


@dataclasses.dataclass(frozen=True)
class Composition:
    """Adaptive composition of events (stored flattened as a tuple)."""

    events: tuple

    def __post_init__(self):
        flat = []
        for e in _as_list(self.events) if not isinstance(self.events, tuple) else self.events:
            if isinstance(e, Composition):
                flat.extend(e.events)
            elif isinstance(e, (GaussianRelease, SubsampledGaussian)):
                flat.append(e)
            else:
                raise TypeError(
                    "events must be GaussianRelease, SubsampledGaussian or "
                    f"Composition, got {type(e).__name__}"
                )
        object.__setattr__(self, "events", tuple(flat))


Event = Union[GaussianRelease, SubsampledGaussian, Composition]


def _flatten(event) -> list:
    if isinstance(event, Composition):
        return list(event.events)
    if isinstance(event, (GaussianRelease, SubsampledGaussian)):
        return [event]
    raise TypeError(
        "event must be GaussianRelease, SubsampledGaussian or Composition, "
        f"got {type(event).__name__}"
    )
