"""Privacy accounting for the Gaussian releases of dpfc_native (being split into modules)."""

from .accountant import *  # noqa: F401,F403
from .accountant import (  # noqa: F401
    __all__, Event, SAMPLER_TAIL_PROBABILITY, _MIN_DPSGD_MULTIPLIER, _PLD_MAX_POINTS,
    _check_delta, _check_epsilon, _check_mu, _dp_accounting, _pld_loss_width, _real)
