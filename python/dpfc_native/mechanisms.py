"""Gaussian mechanisms on clipped statistics, with key and counter bookkeeping.

Every noisy release goes through a :class:`NoiseSource`: it owns one 128-bit Philox key
and hands out disjoint ranges of counter blocks, so a (key, counter) pair never serves
two releases, steps or calls. Each release also returns its
:class:`~dpfc_native.accounting.GaussianRelease` record (sensitivity, noise std,
multiplier) for the privacy ledger, so the guarantee reported is computed from exactly
the releases that were made.

Adjacency is add/remove one example throughout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import secrets
import threading
from typing import Any

import numpy as np

from . import ops
from .accounting import GaussianRelease


@dataclasses.dataclass(frozen=True)
class Draw:
    """One use of a key: counter blocks [first_block, first_block + blocks)."""

    name: str
    first_block: int
    blocks: int


class NoiseSource:
    """A Philox key and the counter blocks already used under it.

    Parameters
    ----------
    seed : int, None
        None (the default, and the only secure choice): a fresh 128-bit key from OS
        entropy (``secrets``). An int: a key derived from it by SHA-256, for reproducible
        experiments only. Anyone who knows the seed can regenerate and subtract the
        noise, so a seeded run carries no privacy guarantee against them.
    """

    def __init__(self, seed: int | None = None):
        if seed is None:
            self._key = secrets.randbits(128)
            self.seeded = False
        else:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                raise TypeError(f"random_state must be None or an int, got {type(seed).__name__}")
            digest = hashlib.sha256(b"dpfc_native/noise-key/" + str(int(seed)).encode()).digest()
            self._key = int.from_bytes(digest[:16], "little")
            self.seeded = True
        self._next_block = 0
        self.draws: list[Draw] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()  # draws only here: a forked copy would repeat them

    #: What :attr:`key_fingerprint` says for a seeded key instead of a hash.
    SEEDED_FINGERPRINT = "seeded"

    def __reduce_ex__(self, protocol):
        # Pickling would copy the secret key to wherever the bytes go (a Dask worker, a
        # cache file): noise is drawn only where the source was created.
        raise TypeError(
            "a NoiseSource holds a secret noise key and cannot be pickled or "
            "copied; add noise on the process that created it (the client)"
        )

    @property
    def key_fingerprint(self) -> str:
        """A short hash of an OS-entropy key, safe to log; ``"seeded"`` for a seeded key.

        For a fresh 128-bit key the 64-bit truncated SHA-256 tells two fits' keys apart
        (key reuse shows as equal fingerprints) and reveals nothing usable about the key.
        A seeded key has only as much entropy as the seed: a hash of it would let anyone
        recover a small seed by brute force in seconds, and with it the noise, so none
        is given.
        """
        if self.seeded:
            return self.SEEDED_FINGERPRINT
        return hashlib.sha256(self._key.to_bytes(16, "little")).hexdigest()[:16]

    @property
    def normal_pairs_drawn(self) -> int:
        """Gaussian pairs (Philox blocks) drawn so far under this key, all releases."""
        return self._next_block

    def _take(self, blocks: int, name: str) -> int:
        """Reserve ``blocks`` fresh blocks (arguments already checked: a call that
        fails afterwards leaves them unused, never reused)."""
        if blocks < 0:
            raise ValueError(f"a draw takes >= 0 blocks, got {blocks}")
        if os.getpid() != self._pid:
            # A child forked from the process that made this source holds the same key
            # and counter: its draws would be the parent's (and every sibling's) noise.
            # Checked before the lock, which the fork may have copied held.
            raise RuntimeError(
                "this NoiseSource was created in another process and inherited by fork: "
                "its draws would repeat that process's noise (same key, same counter); "
                "create a NoiseSource in this process"
            )
        with self._lock:
            first = self._next_block
            ops._check_counter(first, blocks)
            self._next_block += blocks
            self.draws.append(Draw(name, first, blocks))
        return first

    def sym(
        self,
        d: int,
        std: float,
        *,
        batch: int | None = None,
        dtype=np.float64,
        device: str = "cpu",
        name: str = "",
    ):
        """Symmetric noise (see :func:`dpfc_native.ops.sym_gaussian_noise`), fresh blocks."""
        blocks = ops._sym_noise_args(d, std, batch, dtype, device)[1]
        first = self._take(blocks, name)
        return ops.sym_gaussian_noise(
            d, std, batch=batch, key=self._key, counter=first, dtype=dtype, device=device
        )

    def normal(self, shape, std: float, *, dtype=np.float64, device: str = "cpu", name: str = ""):
        """I.i.d. N(0, std^2) noise of ``shape`` (see :func:`dpfc_native.ops.gaussian_noise`)."""
        first = self._take(ops._noise_args(shape, std, dtype, device)[1], name)
        return ops.gaussian_noise(
            shape, std, key=self._key, counter=first, dtype=dtype, device=device
        )


def _check_release_args(stat, sensitivity, noise_multiplier, source, *, symmetric: bool):
    if not hasattr(stat, "ndim") or not hasattr(stat, "dtype"):
        raise TypeError(f"stat must be a NumPy or CuPy array, got {type(stat).__name__}")
    if stat.dtype not in (np.float32, np.float64):
        raise TypeError(f"stat must be float32 or float64, got {stat.dtype}")
    if symmetric and (stat.ndim not in (2, 3) or stat.shape[-1] != stat.shape[-2]):
        raise ValueError(f"stat must have shape (d, d) or (batch, d, d), got {tuple(stat.shape)}")
    xp = ops.array_module(stat)
    if not bool(xp.isfinite(stat).all()):
        raise ValueError("stat contains NaN or Inf: refusing to release it")
    if not isinstance(source, NoiseSource):
        raise TypeError(f"source must be a NoiseSource, got {type(source).__name__}")
    sens = ops._check_positive(sensitivity, "sensitivity")
    z = ops._check_real(noise_multiplier, "noise_multiplier")
    if not (z >= 0.0 and math.isfinite(z)):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    return sens, z


def release_symmetric(
    stat, sensitivity: float, noise_multiplier: float, source: NoiseSource, name: str
) -> tuple[Any, GaussianRelease | None]:
    """Gaussian mechanism on a symmetric (d, d) or batched (b, d, d) statistic.

    ``std = noise_multiplier * sensitivity`` with sensitivity in Frobenius norm. A
    multiplier of 0 (epsilon = inf) releases the statistic as is and records nothing.
    """
    sensitivity, noise_multiplier = _check_release_args(
        stat, sensitivity, noise_multiplier, source, symmetric=True
    )
    xp = ops.array_module(stat)
    if not bool(xp.array_equal(stat, xp.swapaxes(stat, -1, -2))):
        # The noise is mirrored: an antisymmetric part of stat would pass through it
        # unprotected (out - out^T = stat - stat^T).
        raise ValueError(
            "stat must be exactly symmetric for release_symmetric (its noise is "
            "symmetric, so an antisymmetric part would be released without noise); "
            "use release_dense for a general matrix"
        )
    if noise_multiplier == 0.0:
        return stat, None
    std = noise_multiplier * sensitivity
    batch = None if stat.ndim == 2 else stat.shape[0]
    noise = source.sym(
        stat.shape[-1], std, batch=batch, dtype=stat.dtype, device=ops.device_of(stat), name=name
    )
    return stat + noise, GaussianRelease.from_std(std, sensitivity, name=name)


def release_dense(
    stat, sensitivity: float, noise_multiplier: float, source: NoiseSource, name: str
) -> tuple[Any, GaussianRelease | None]:
    """Gaussian mechanism with i.i.d. noise on every entry (L2 sensitivity)."""
    sensitivity, noise_multiplier = _check_release_args(
        stat, sensitivity, noise_multiplier, source, symmetric=False
    )
    if noise_multiplier == 0.0:
        return stat, None
    std = noise_multiplier * sensitivity
    noise = source.normal(
        tuple(stat.shape), std, dtype=stat.dtype, device=ops.device_of(stat), name=name
    )
    return stat + noise, GaussianRelease.from_std(std, sensitivity, name=name)
