"""Kernel knobs of the GPU paths: one frozen configuration, read from the environment once.

The native launchers read nothing from the environment: the GPU glue
(:mod:`dpfc_native._gpu_stats`, :mod:`dpfc_native._gpu_linalg`) takes the active
:class:`KernelConfig` from :func:`get` and passes engine, chunk and schedule to the bindings
as arguments. The knobs are for benchmarking and fallbacks; the defaults are the tuned
choices and do not change results beyond the documented rounding of each engine.

========================  ===========================  ========================================
Variable                  Field (default)              Meaning
========================  ===========================  ========================================
``DPFC_GRAM_KERNEL``      ``gram_kernel`` ("auto")     float64 Gram engine: auto (= mma) |
                                                       mma | mma884 | simt
``DPFC_GRAD_KERNEL``      ``grad_kernel`` ("auto")     clipped gradient: auto | cublas |
                                                       simt32 | mma | mma884 | simt
``DPFC_LG_CHUNK``         ``lg_chunk`` (None)          rows per chunk of the clipped gradient
                                                       (None: sized from a workspace budget)
``DPFC_LG_BLOCK``         ``lg_block`` (4096)          rows per float32 product block of the
                                                       clipped gradient's cuBLAS path
``DPFC_CHOL_KERNEL``      ``chol_kernel`` ("mma")      float64 Cholesky update GEMM: mma | simt
``DPFC_CHOL_SCHEDULE``    ``chol_schedule`` ("auto")   blocked Cholesky: auto | left | right
``DPFC_CHOL_SMALL_MAX``   ``chol_small_max`` (128)     largest d of the one-block Cholesky
                                                       kernel, 0..128 (0: all sizes blocked)
========================  ===========================  ========================================

The environment is read at the first :func:`get` of the process (an empty variable means
the default). To change the knobs afterwards:

* for a block of code (a test, one benchmark row), ``with override(gram_kernel="simt"):``,
  which applies to the current thread or task only (a :mod:`contextvars` variable);
* after changing ``os.environ`` (a benchmark's ``env_vars``, pytest's ``monkeypatch``),
  :func:`reload`: the environment is read again at the next :func:`get`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from typing import Iterator, Mapping

__all__ = ["KernelConfig", "get", "override", "reload", "ENV_VARS"]

GRAM_KERNELS = ("auto", "mma", "mma884", "simt")
GRAD_KERNELS = ("auto", "cublas", "simt32", "mma", "mma884", "simt")
CHOL_KERNELS = ("mma", "simt")
CHOL_SCHEDULES = ("auto", "left", "right")

#: Environment variable of each field.
ENV_VARS = {
    "gram_kernel": "DPFC_GRAM_KERNEL",
    "grad_kernel": "DPFC_GRAD_KERNEL",
    "lg_chunk": "DPFC_LG_CHUNK",
    "lg_block": "DPFC_LG_BLOCK",
    "chol_kernel": "DPFC_CHOL_KERNEL",
    "chol_schedule": "DPFC_CHOL_SCHEDULE",
    "chol_small_max": "DPFC_CHOL_SMALL_MAX",
}


def _choice(field: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{ENV_VARS[field]} ({field}) must be one of {allowed}, got {value!r}")


def _positive_int(field: str, value, minimum: int, maximum: int | None = None) -> None:
    bad = isinstance(value, bool) or not isinstance(value, int) or value < minimum
    if not bad and maximum is not None and value > maximum:
        bad = True
    if bad:
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{ENV_VARS[field]} ({field}) must be an integer {bound}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """The GPU kernel knobs (see the module docstring for each field's variable and values).

    Validated on construction: a bad value raises ValueError naming its variable.
    """

    gram_kernel: str = "auto"
    grad_kernel: str = "auto"
    lg_chunk: int | None = None
    lg_block: int = 4096
    chol_kernel: str = "mma"
    chol_schedule: str = "auto"
    chol_small_max: int = 128

    def __post_init__(self) -> None:
        _choice("gram_kernel", self.gram_kernel, GRAM_KERNELS)
        _choice("grad_kernel", self.grad_kernel, GRAD_KERNELS)
        if self.lg_chunk is not None:
            _positive_int("lg_chunk", self.lg_chunk, 1)
        _positive_int("lg_block", self.lg_block, 1)
        _choice("chol_kernel", self.chol_kernel, CHOL_KERNELS)
        _choice("chol_schedule", self.chol_schedule, CHOL_SCHEDULES)
        _positive_int("chol_small_max", self.chol_small_max, 0, 128)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KernelConfig:
        """The configuration given by ``environ`` (default ``os.environ``); unset or empty
        variables keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict = {}
        for field, var in ENV_VARS.items():
            raw = env.get(var, "")
            if raw == "":
                continue
            if field in ("lg_chunk", "lg_block", "chol_small_max"):
                try:
                    values[field] = int(raw)
                except ValueError:
                    raise ValueError(f"{var} ({field}) must be an integer, got {raw!r}") from None
            else:
                values[field] = raw
        return cls(**values)


_process_config: KernelConfig | None = None
_override: contextvars.ContextVar[KernelConfig | None] = contextvars.ContextVar(
    "dpfc_kernel_config", default=None
)


def get() -> KernelConfig:
    """The active configuration: the innermost :func:`override`, else the process's (read
    from the environment at the first call after import or :func:`reload`)."""
    global _process_config
    active = _override.get()
    if active is not None:
        return active
    if _process_config is None:
        _process_config = KernelConfig.from_env()
    return _process_config


def reload() -> None:
    """Forget the process configuration: the environment is read again at the next :func:`get`."""
    global _process_config
    _process_config = None


@contextlib.contextmanager
def override(**changes) -> Iterator[KernelConfig]:
    """Run a block with some knobs changed (``override(chol_schedule="left")``); yields the
    configuration in effect. Field names as in :class:`KernelConfig`."""
    config = dataclasses.replace(get(), **changes)
    token = _override.set(config)
    try:
        yield config
    finally:
        _override.reset(token)
