"""The exact reduction contract: fixed leaves, integer partials, checked coverage.

Every clipped statistic is a sum over rows. This module fixes *how* that sum is formed,
so that one process, many processes or many machines give the same bits:

1. **Leaves.** Rows are cut into fixed leaves of ``leaf_rows`` rows (default 4096),
   counted from the start of each shard, so a leaf never crosses a shard (the last leaf
   of a shard may be shorter). A :class:`LeafLayout` depends only on the shard lengths
   and ``leaf_rows``.
2. **Leaf statistic.** A leaf's statistic is computed by the public ops of
   :mod:`dpfc_native.ops` (``clipped_gram``, ``clipped_stats``, ...) in float64, on the
   leaf's rows in order: a pure function of those rows.
3. **Fixed grid.** Each float64 leaf value is converted once to an integer on a fixed
   grid; from then on every merge is integer addition, associative and commutative, so
   any merge order, partitioning, retry or worker count gives identical bits. The grid
   is set by public facts only: an output whose per-row terms are bounded by ``R``
   (``C^2`` for grams, ``C`` for class sums and gradients, ``w_max C^2`` for weighted
   grams), with ``2^(E-1) <= R < 2^E``, and the leaf size ``m``: the grid step is
   ``delta = 2^(E - F)`` with ``F = 62 - ceil(log2 m)`` fraction bits for the layout's
   longest leaf of m rows (``min(leaf_rows, longest shard)``; F = 50 for m = 4096), so a
   leaf's value ``q = rint(v / delta)``, ``|q| < m 2^F <= 2^62``, is one
   int64. Sums are kept as two int64 limbs ``hi 2^32 + lo`` (``0 <= lo < 2^32``), exact
   for up to ``2^(94 - F)`` rows (2^44 = 1.8e13 at m = 4096). Symmetric matrices (the
   grams) put only their lower triangle on the grid and are mirrored once at the finish:
   half the conversion and merge work, and a result that is exactly symmetric.
4. **Coverage.** Every :class:`Partial` carries the leaf ranges it covers. Merging two
   partials that share a leaf raises :class:`CoverageError`, and so does finishing a
   partial that misses a leaf: double counting and gaps are detected, not assumed away.
5. **Finish.** The integer total is converted back to float64 once, correctly rounded.

Rounding (the part of the sensitivity the floats add). For a statistic whose rows
have entries bounded by ``R`` (Frobenius over the whole statistic: ``||row term||_F <= R``),
n rows, leaves of m rows and d x d outputs:

* leaf float64 sums: ``sum over leaves of gamma_{m+1} m R ~= (m + 1) n u R``
  (u = 2^-53), against ``gamma_{n+1} n R ~= n^2 u R`` for one float64 pass over all rows;
* the grid: at most ``delta / 2 = 2^(E-F-1) <= 2^-F R`` per entry per leaf (8u R at
  m = 4096), ``<= sqrt(entries) (n/m + 1) 2^-F R`` in Frobenius norm over all leaves;
* the final conversion: ``u ||S||_F <= u n R``.

Total: about ``(m + 2) n u R``: 1.4e-4 C^2 at n = 3e8, m = 4096 (one float64 pass:
about 10 C^2 there). See README.md, "Floating point".
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import math
import os
import secrets
import threading
from typing import Any, Callable, Optional, Sequence

import numpy as np

# Every BLAS the ops use is loaded with this module, before any limit (a library loaded
# inside one would escape it), and no import runs inside one_blas_thread: an import
# statement may take the module's import lock, and a child forked while another thread
# held it hung there.
import scipy.linalg.blas  # noqa: F401
import scipy.special  # noqa: F401
import threadpoolctl

from . import _core, _cpu_stats, _validation, ops

__all__ = [
    "LEAF_ROWS",
    "fraction_bits",
    "CoverageError",
    "LeafLayout",
    "Partial",
    "ArraySource",
    "TransformedSource",
    "Gram",
    "Stats",
    "ClassSums",
    "ClassGrams",
    "WeightedGrams",
    "LinearGrad",
    "NewtonWeights",
    "PoissonSampling",
    "philox4x32_10",
    "leaf_partial",
    "range_partial",
    "reduce",
    "rounding_bound",
]

#: Default leaf size (rows).
LEAF_ROWS = 4096
_LIMB_BITS = 32
_LIMB = float(1 << _LIMB_BITS)
_LIMB_MASK = (1 << _LIMB_BITS) - 1


class CoverageError(ValueError):
    """Partials overlap (a leaf would be counted twice) or miss leaves at the finish."""


# --------------------------------------------------------------------------------------
# Leaves
# --------------------------------------------------------------------------------------


class LeafLayout:
    """Fixed leaves over shards: leaf boundaries at multiples of ``leaf_rows`` within each
    shard (a leaf never crosses a shard).

    Parameters
    ----------
    shard_rows : sequence of int > 0
        Rows of each shard, in order.
    leaf_rows : int >= 1

    Attributes
    ----------
    n_leaves, n_rows : int
    max_leaf_rows : int
        The longest leaf, ``min(leaf_rows, longest shard)``: it sets the grid's
        ``fraction_bits``.
    shard, start, stop : numpy.ndarray (n_leaves,), int64
        Leaf i is rows ``start[i]:stop[i]`` of shard ``shard[i]``.
    global_start : numpy.ndarray (n_leaves,), int64
        Its first row in the global (concatenated) order.
    """

    def __init__(self, shard_rows: Sequence[int], leaf_rows: int = LEAF_ROWS):
        rows = [int(r) for r in shard_rows]
        if not rows or any(r <= 0 for r in rows):
            raise ValueError(f"shard_rows must be positive integers, got {list(shard_rows)}")
        if isinstance(leaf_rows, bool) or int(leaf_rows) != leaf_rows or leaf_rows < 1:
            raise ValueError(f"leaf_rows must be an integer >= 1, got {leaf_rows!r}")
        self.leaf_rows = int(leaf_rows)
        self.shard_rows = tuple(rows)
        self.n_rows = sum(rows)
        # The grid is set by the longest leaf the layout holds (shorter than leaf_rows
        # when every shard is): a leaf_rows beyond the data must not coarsen it.
        self.max_leaf_rows = min(self.leaf_rows, max(rows))
        self.fraction_bits = fraction_bits(self.max_leaf_rows)
        # Integer totals stay below n 2^F; the hi limb (total / 2^32) must fit in int64.
        if self.n_rows >= 1 << (94 - self.fraction_bits):
            raise ValueError(
                f"{self.n_rows} rows exceed the exact reduction's range with leaves "
                f"of {self.leaf_rows} rows (2^{94 - self.fraction_bits})"
            )
        shard, start, stop, gstart = [], [], [], []
        offset = 0
        for s, r in enumerate(rows):
            for a in range(0, r, self.leaf_rows):
                shard.append(s)
                start.append(a)
                stop.append(min(r, a + self.leaf_rows))
                gstart.append(offset + a)
            offset += r
        self.shard = np.asarray(shard, np.int64)
        self.start = np.asarray(start, np.int64)
        self.stop = np.asarray(stop, np.int64)
        self.global_start = np.asarray(gstart, np.int64)
        self.n_leaves = len(shard)
        self.shard_first_leaf = np.searchsorted(self.shard, np.arange(len(rows) + 1))

    @property
    def fingerprint(self) -> str:
        """A short hash of the layout (shard lengths and leaf size)."""
        text = f"{self.leaf_rows}:{','.join(map(str, self.shard_rows))}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def tasks(self, leaves_per_task: Optional[int] = None) -> list[tuple[int, int]]:
        """Leaf ranges ``[first, stop)`` for tasks of ``leaves_per_task`` leaves each,
        never crossing a shard; None: one task per shard."""
        out = []
        for s in range(len(self.shard_rows)):
            a, b = int(self.shard_first_leaf[s]), int(self.shard_first_leaf[s + 1])
            step = (b - a) if leaves_per_task is None else int(leaves_per_task)
            if step < 1:
                raise ValueError(f"leaves_per_task must be >= 1, got {leaves_per_task!r}")
            out.extend((i, min(b, i + step)) for i in range(a, b, step))
        return out

    def __repr__(self) -> str:
        return (
            f"LeafLayout({self.n_leaves} leaves of {self.leaf_rows} rows over "
            f"{len(self.shard_rows)} shards, {self.n_rows} rows)"
        )


class ArraySource:
    """In-memory (or memory-mapped) arrays as a source for :func:`reduce`: one shard, or
    the consecutive shards of lengths ``shard_rows`` (so an array can stand in for the
    files it was cut into, with the same leaves).

    Slices are views (no copy); the leaf ops convert them to float64 a chunk at a time.
    ``rows_checked=True`` says the caller validated x (finite, a float dtype the ops take)
    and the labels (integers in ``[0, num_classes)``) once: the leaves then skip the
    public ops' argument scans.
    """

    def __init__(
        self,
        x,
        labels=None,
        num_classes: Optional[int] = None,
        shard_rows: Optional[Sequence[int]] = None,
        *,
        rows_checked: bool = False,
    ):
        if getattr(x, "ndim", None) != 2:
            raise ValueError(f"x must be 2-D (n, d), got {getattr(x, 'shape', type(x))}")
        self.x = x
        n = x.shape[0]
        if labels is None:
            self.labels = np.zeros(n, np.int64)
        else:
            self.labels = np.asarray(labels)
            if self.labels.shape != (n,) or self.labels.dtype.kind not in "iu":
                raise ValueError(f"labels must be an integer array of shape ({n},)")
        if num_classes is None:
            num_classes = int(self.labels.max()) + 1 if n else 1
        self.num_classes = int(num_classes)
        self.n_rows, self.n_features = int(n), int(x.shape[1])
        self.shard_rows = (
            (self.n_rows,) if shard_rows is None else tuple(int(r) for r in shard_rows)
        )
        if sum(self.shard_rows) != self.n_rows:
            raise ValueError(f"shard_rows sum to {sum(self.shard_rows)}, x has {self.n_rows} rows")
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)
        self.rows_checked = bool(rows_checked)

    def _base(self, i: int) -> int:
        if not 0 <= i < len(self.shard_rows):
            raise IndexError(f"shard index {i} outside [0, {len(self.shard_rows)})")
        return int(self.offsets[i])

    def read(self, i: int, start: int, stop: int):
        o = self._base(i)
        return self.x[o + start : o + stop], self.labels[o + start : o + stop]

    def take(self, i: int, rows: np.ndarray):
        o = self._base(i)
        return self.x[o + rows], self.labels[o + rows]


class TransformedSource:
    """A source whose rows pass through ``transform`` (a picklable per-row map, e.g. the
    estimators' centring, normalisation and clipping) as they are read: each leaf is
    transformed on whichever process reads it, so nothing but the leaf is ever held.

    Parameters
    ----------
    source : a source (``shard_rows``, ``n_features``, ``read``, optionally ``take``)
    transform : callable (rows, where) -> float64 rows of the same shape
        A pure function of each row; its ``fingerprint`` (when present) names it in task
        keys, so results for different transforms are never confused. ``where`` locates
        the rows in their shard for error messages: the first row's index (a slice), or
        the rows' indices (sampled rows).
    """

    def __init__(self, source, transform):
        self.source, self.transform = source, transform
        self.shard_rows = _shard_rows_of(source)
        self.n_features = int(source.n_features)
        if hasattr(source, "num_classes"):
            self.num_classes = int(source.num_classes)
        if hasattr(source, "shards"):
            self.shards = source.shards

    def manifest(self):
        """The inner source's manifest (and options) with the transform's fingerprint."""
        inner = self.source.manifest() if hasattr(self.source, "manifest") else repr(self.source)
        return [
            inner,
            repr(getattr(self.source, "_opts", "")),
            getattr(self.transform, "fingerprint", repr(self.transform)),
        ]

    def _transformed(self, x, i: int, rows):
        """``transform(x, rows)``; its errors (e.g. a NaN row, numbered within the shard)
        name the shard."""
        try:
            return self.transform(x, rows)
        except ValueError as e:
            shards = getattr(self.source, "shards", None)
            name = shards[i].path if shards is not None else f"shard {i}"
            raise ValueError(f"{name}: {e}") from e

    def read(self, i: int, start: int, stop: int):
        x, y = self.source.read(i, start, stop)
        return self._transformed(x, i, start), y

    def take(self, i: int, rows: np.ndarray):
        rows = np.asarray(rows)
        x, y = _take(
            self.source,
            i,
            rows,
            int(rows[0]) if len(rows) else 0,
            int(rows[-1]) + 1 if len(rows) else 0,
        )
        return self._transformed(x, i, rows), y


#: True while a leaf's rows come from a transform that produced them finite and clipped
#: (the estimators' preprocessing of rows validated once per fit) or from a source whose
#: caller validated them (``ArraySource(rows_checked=True)``: the ops' ``leaf_rows``
#: path): the leaf statistic then skips the public ops' argument scans.
_ROWS_CHECKED: contextvars.ContextVar = contextvars.ContextVar("dpfc_rows_checked", default=False)


def _leaf_ops():
    """The ops a leaf statistic calls: the public (checking) ops, or their unchecked
    entries when the rows were validated once for the whole fit."""
    return ops._unchecked if _ROWS_CHECKED.get() else ops


def _shard_rows_of(source) -> tuple[int, ...]:
    return tuple(int(r) for r in source.shard_rows)


def _take(source, i: int, rows: np.ndarray, start: int, stop: int):
    """Rows ``rows`` (shard-local, sorted) of shard i: only those rows where the source
    can address rows, else the leaf's slice then a selection."""
    take = getattr(source, "take", None)
    if take is not None:
        return take(i, rows)
    x, y = source.read(i, start, stop)
    return x[rows - start], y[rows - start]


# --------------------------------------------------------------------------------------
# Fixed grid and partials
# --------------------------------------------------------------------------------------


def fraction_bits(leaf_rows: int) -> int:
    """F = 62 - ceil(log2 leaf_rows): a leaf's grid integer stays below 2^62."""
    return 62 - max(0, int(leaf_rows - 1).bit_length())


#: Per-row bounds the grid takes: 2^(F - E) (F <= 62) and n x bound stay inside float64.
_BOUND_RANGE = (2.0**-900, 2.0**900)


def _grid_exponent(bound: float) -> int:
    """E with 2^(E-1) <= bound < 2^E."""
    if not (bound > 0 and math.isfinite(bound)):
        raise ValueError(f"per-row bound must be finite and > 0, got {bound!r}")
    _, e = math.frexp(bound)
    return e


def _host(v):
    """A leaf output on the host (CuPy arrays from GPU leaves are copied back)."""
    if ops.is_gpu_array(v):
        return ops._cupy().asnumpy(v)  # noqa: SLF001 - the package's CuPy accessor
    return v


def _grid_add(v, exponent: int, frac: int, rows: int, name: str, hi, lo, lower: bool = False):
    """Add one leaf's value on the grid, q = rint(v 2^(F - E)), to the limbs in place:
    (hi, lo) += q with lo kept in [0, 2^32) (native, one pass; exact integer additions).
    ``lower``: v is symmetric (..., d, d) matrices, of which only the lower triangles are
    read and added (the reduction mirrors them once, at the end)."""
    q = np.ascontiguousarray(_host(v), dtype=np.float64)
    if q.shape != hi.shape:
        raise ValueError(f"{name}: leaf statistic has shape {q.shape}, expected {hi.shape}")
    # A leaf of `rows` rows with per-row terms below 2^E stays below rows 2^F (at most 2^62):
    # beyond it the range argument (and the declared bound) would not hold.
    tri_d = int(q.shape[-1]) if lower else 0
    if lower and (q.ndim < 2 or q.shape[-2] != tri_d):
        raise ValueError(f"{name}: a symmetric statistic must be square, got shape {q.shape}")
    status = _core.cpu_grid_accumulate(q, 2.0 ** (frac - exponent), rows * 2.0**frac, hi, lo, tri_d)
    if status == 1:
        raise ValueError(f"{name}: leaf statistic has NaN or Inf")
    if status == 2:
        raise ValueError(
            f"{name}: leaf statistic exceeds its a-priori range ({rows} rows x 2^{exponent})"
        )


def _mirror_lower(v: np.ndarray) -> np.ndarray:
    """Symmetric (..., d, d) C-ordered matrices from their lower triangles, in place
    (copies, no rounding): each matrix's Fortran-order view has that triangle as its
    upper one, which ``_core.cpu_mirror_upper`` copies across."""
    if v.size == 0:
        return v
    d = v.shape[-1]
    for m in v.reshape(-1, d, d):
        _core.cpu_mirror_upper(m.T)
    return v


def _from_limbs(hi: np.ndarray, lo: np.ndarray, exponent: int, frac: int) -> np.ndarray:
    """Correctly rounded float64 of (hi 2^32 + lo) 2^(E - F), with one int64 temporary
    (a K x d x d statistic is converted with two arrays of its size, not six)."""
    out = np.empty(hi.shape, dtype=np.float64)
    tmp = np.empty(hi.shape, dtype=np.int64)
    np.right_shift(hi, 20, out=tmp)
    np.multiply(tmp, 2.0**52, out=out)  # |hi >> 20| < 2^43: exact
    np.bitwise_and(hi, (1 << 20) - 1, out=tmp)
    np.left_shift(tmp, _LIMB_BITS, out=tmp)
    np.bitwise_or(tmp, lo, out=tmp)  # < 2^52: exact as a float
    np.add(out, tmp, out=out)  # the one rounding
    return np.ldexp(out, exponent - frac, out=out)  # exact scaling


class _Accumulator:
    """In-place exact sum of leaf values (a task's leaves), then one :class:`Partial`."""

    def __init__(
        self,
        key: str,
        exps: dict,
        frac: int,
        fixed_shapes: dict,
        int_shapes: dict,
        lower: tuple = (),
    ):
        self.key, self.exps, self.frac = key, exps, frac
        self.lower = tuple(lower)
        self.hi = {k: np.zeros(sh, np.int64) for k, sh in fixed_shapes.items()}
        self.lo = {k: np.zeros(sh, np.int64) for k, sh in fixed_shapes.items()}
        self.ints = {k: np.zeros(sh, np.int64) for k, sh in int_shapes.items()}
        self.ranges: list = []

    def add(self, out: Optional[dict], rows: int, leaf: int) -> None:
        self.ranges.append((leaf, leaf + 1))
        if out is None:  # an empty (unsampled) leaf: covered, adds zero
            return
        for name, e in self.exps.items():
            lower = name in self.lower
            _grid_add(out[name], e, self.frac, rows, name, self.hi[name], self.lo[name], lower)
        for name, acc in self.ints.items():
            acc += np.asarray(_host(out[name]), np.int64).reshape(acc.shape)

    def partial(self) -> "Partial":
        fixed = {
            name: (self.hi[name], self.lo[name], self.exps[name], self.frac) for name in self.hi
        }
        return Partial(self.key, _normalise_ranges(self.ranges), fixed, self.ints, self.lower)


def _normalise_ranges(ranges) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in ranges):
        if a >= b:
            raise ValueError(f"empty leaf range [{a}, {b})")
        if out and a < out[-1][1]:
            raise CoverageError(f"leaves [{a}, {min(b, out[-1][1])}) would be counted twice")
        if out and a == out[-1][1]:
            out[-1][1] = b
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


@dataclasses.dataclass(frozen=True)
class Partial:
    """A merged sum over some leaves, exact and order-independent.

    Attributes
    ----------
    key : str
        What is summed (statistic, its parameters, the layout, the sampling step):
        partials of different keys never merge.
    ranges : tuple of (first, stop) leaf ranges covered, sorted and disjoint.
    fixed : dict name -> (hi, lo, exponent, fraction_bits): grid outputs as int64 limbs
        (value ``(hi 2^32 + lo) 2^(exponent - fraction_bits)``, ``lo`` in [0, 2^32)).
    ints : dict name -> int64 array: integer outputs (counts).
    lower : tuple of names of ``fixed`` whose limbs hold only the lower triangles of
        symmetric (..., d, d) matrices (the rest zero): :meth:`values` mirrors them.
    """

    key: str
    ranges: tuple
    fixed: dict
    ints: dict
    lower: tuple = ()

    def merge(self, other: "Partial") -> "Partial":
        """The exact sum of two partials covering disjoint leaves.

        Raises
        ------
        CoverageError
            If a leaf is covered by both.
        ValueError
            If the partials sum different statistics (keys differ).
        """
        if other.key != self.key:
            raise ValueError(
                "cannot merge partials of different statistics, parameters, layouts or steps"
            )
        ranges = _normalise_ranges(self.ranges + other.ranges)
        fixed = {}
        for name, (hi, lo, e, f) in self.fixed.items():
            ohi, olo, oe, of = other.fixed[name]
            if (oe, of) != (e, f):
                raise ValueError(f"{name}: partials on different grids")
            s = lo + olo
            fixed[name] = (hi + ohi + (s >> _LIMB_BITS), s & _LIMB_MASK, e, f)
        ints = {name: a + other.ints[name] for name, a in self.ints.items()}
        return Partial(self.key, ranges, fixed, ints, self.lower)

    def __reduce__(self):
        # Pickled (what a worker ships) with the lower-triangle limbs packed: the other
        # half is zero by construction (a nonzero there would be a bug, so it raises).
        fixed = {}
        for name, (hi, lo, e, f) in self.fixed.items():
            if name in self.lower:
                hi, lo = _pack_lower(hi, name), _pack_lower(lo, name)
            fixed[name] = (hi, lo, e, f)
        return (_unpickle_partial, (self.key, self.ranges, fixed, self.ints, self.lower))

    @property
    def n_leaves_covered(self) -> int:
        return sum(b - a for a, b in self.ranges)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays a partial carries (what a worker ships)."""
        return sum(hi.nbytes + lo.nbytes for hi, lo, _, _ in self.fixed.values()) + sum(
            a.nbytes for a in self.ints.values()
        )

    def check_complete(self, n_leaves: int) -> None:
        """Raises :class:`CoverageError` unless exactly leaves ``[0, n_leaves)`` are covered."""
        if self.ranges != ((0, n_leaves),):
            covered = set()
            for a, b in self.ranges:
                covered.update(range(a, b))
            missing = [i for i in range(n_leaves) if i not in covered]
            extra = sorted(c for c in covered if c >= n_leaves)
            raise CoverageError(
                f"partials cover {self.n_leaves_covered} of {n_leaves} leaves: missing "
                f"{_ranges_text(missing)}"
                + (f", beyond the layout {_ranges_text(extra)}" if extra else "")
            )

    def values(self, n_leaves: int) -> dict:
        """float64 arrays of the grid outputs and int64 arrays of the integer ones,
        after :meth:`check_complete`."""
        self.check_complete(n_leaves)
        out = {name: _from_limbs(hi, lo, e, f) for name, (hi, lo, e, f) in self.fixed.items()}
        for name in self.lower:
            out[name] = _mirror_lower(out[name])
        out.update({name: a.copy() for name, a in self.ints.items()})
        return out


@functools.lru_cache(maxsize=8)
def _triangle_index(d: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of a C-order (d, d) matrix's lower triangle (with the diagonal) and of
    its strict upper triangle."""
    lower = np.tril(np.ones((d, d), bool)).ravel()
    return np.flatnonzero(lower), np.flatnonzero(~lower)


def _pack_lower(a: np.ndarray, name: str) -> np.ndarray:
    """The lower triangles of (..., d, d) limbs as (..., d (d + 1) / 2)."""
    d = a.shape[-1]
    low, up = _triangle_index(d)
    flat = a.reshape(a.shape[:-2] + (d * d,))
    if np.take(flat, up, axis=-1).any():
        raise ValueError(f"{name}: limbs above the diagonal of a symmetric statistic")
    return np.take(flat, low, axis=-1)


def _unpickle_partial(key, ranges, fixed, ints, lower) -> Partial:
    out = {}
    for name, (hi, lo, e, f) in fixed.items():
        if name in lower:
            d = (math.isqrt(8 * hi.shape[-1] + 1) - 1) // 2
            low, _ = _triangle_index(d)
            full = []
            for packed in (hi, lo):
                a = np.zeros(packed.shape[:-1] + (d * d,), np.int64)
                a[..., low] = packed
                full.append(a.reshape(packed.shape[:-1] + (d, d)))
            hi, lo = full
        out[name] = (hi, lo, e, f)
    return Partial(key, ranges, out, ints, lower)


def _ranges_text(idx: list) -> str:
    if not idx:
        return "none"
    parts, a = [], idx[0]
    for p, q in zip(idx, idx[1:] + [None]):
        if q != p + 1:
            parts.append(f"[{a}, {p + 1})")
            a = q
    return " ".join(parts[:5]) + (" ..." if len(parts) > 5 else "")


# --------------------------------------------------------------------------------------
# Poisson sampling from a keyed counter-based generator
# --------------------------------------------------------------------------------------

_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on arrays of counter words (the generator of ``csrc/common/philox.hpp``,
    vectorised in NumPy; bit-identical to ``dpfc_native._core.philox4x32_10``).

    Returns the four output words as uint64 arrays holding 32-bit values.
    """
    c = [np.asarray(w, dtype=np.uint64) & _M32 for w in (c0, c1, c2, c3)]
    k0, k1 = int(k0) & 0xFFFFFFFF, int(k1) & 0xFFFFFFFF
    m0, m1 = np.uint64(_PHILOX_M0), np.uint64(_PHILOX_M1)
    for rnd in range(10):
        if rnd:
            k0 = (k0 + _PHILOX_W0) & 0xFFFFFFFF
            k1 = (k1 + _PHILOX_W1) & 0xFFFFFFFF
        p0 = m0 * c[0]
        p1 = m1 * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0),
            p1 & _M32,
            (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1),
            p0 & _M32,
        ]
    return c


#: Counter layout of the sampling masks: block = step * 2^ROW_BITS + row // 2.
_ROW_BITS = 40


@dataclasses.dataclass(frozen=True)
class PoissonSampling:
    """Poisson subsampling: row i is in step t's batch with probability ``rate``,
    independently, decided by Philox keyed by a secret sampling key with counter
    (step, row block).

    The decision for a row depends only on (key, step, global row index), never on how
    rows are partitioned into tasks, so a retried task redraws the same batch and every
    partitioning samples the same rows. Block ``t 2^40 + floor(i / 2)`` of the key's
    Philox stream (the 128-bit key spread over Philox's key and upper counter words as
    for the noise) gives two 52-bit uniforms ``u = (k + 1/2) 2^-52``: words 0-1 for the
    even row, 2-3 for the odd one; the row is sampled iff ``u < rate``. Steps below 2^24,
    rows below 2^41.

    Parameters
    ----------
    rate : float in (0, 1]
    key : int
        128-bit sampling key, distinct from every noise key. Keep it secret: the
        amplification by subsampling assumes nobody knows which rows were drawn.
    step : int >= 0
    """

    rate: float
    key: int = dataclasses.field(repr=False)
    step: int = 0

    def __post_init__(self):
        if not (0.0 < float(self.rate) <= 1.0):
            raise ValueError(f"rate must be in (0, 1], got {self.rate!r}")
        if (
            isinstance(self.key, bool)
            or not isinstance(self.key, (int, np.integer))
            or not 0 <= int(self.key) < 1 << 128
        ):
            raise ValueError("key must be an int in [0, 2**128)")
        if not 0 <= int(self.step) < 1 << 24:
            raise ValueError(f"step must be in [0, 2**24), got {self.step!r}")

    @classmethod
    def new(cls, rate: float, seed: Optional[int] = None) -> "PoissonSampling":
        """A fresh secret key from OS entropy (seed None), or one derived from ``seed`` by
        SHA-256 for reproducible experiments (anyone knowing the seed knows the batches)."""
        if seed is None:
            key = secrets.randbits(128)
        else:
            digest = hashlib.sha256(b"dpfc_native/sampling-key/" + str(int(seed)).encode()).digest()
            key = int.from_bytes(digest[:16], "little")
        return cls(float(rate), key, 0)

    def at_step(self, step: int) -> "PoissonSampling":
        return dataclasses.replace(self, step=int(step))

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(int(self.key).to_bytes(16, "little")).hexdigest()[:16]

    def mask(self, start: int, stop: int) -> np.ndarray:
        """Inclusion of global rows ``[start, stop)`` at this step (bool array)."""
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= 1 << (_ROW_BITS + 1):
            raise ValueError(f"rows [{start}, {stop}) outside [0, 2^{_ROW_BITS + 1})")
        if start == stop:
            return np.zeros(0, dtype=bool)
        key = int(self.key)
        words = [(key >> (32 * j)) & 0xFFFFFFFF for j in range(4)]
        pairs = np.arange(start >> 1, ((stop - 1) >> 1) + 1, dtype=np.uint64)
        block = (np.uint64(int(self.step)) << np.uint64(_ROW_BITS)) + pairs
        v = philox4x32_10(
            block & _M32,
            block >> np.uint64(32),
            np.full_like(block, words[2]),
            np.full_like(block, words[3]),
            words[0],
            words[1],
        )
        u_even = _uniform52(v[0], v[1])
        u_odd = _uniform52(v[2], v[3])
        u = np.empty(2 * len(pairs), dtype=np.float64)
        u[0::2], u[1::2] = u_even, u_odd
        first = start - 2 * (start >> 1)
        return u[first : first + (stop - start)] < float(self.rate)


def _uniform52(hi, lo) -> np.ndarray:
    k = ((hi << np.uint64(32)) | lo) >> np.uint64(12)
    return (k.astype(np.float64) + 0.5) * 2.0**-52


# --------------------------------------------------------------------------------------
# Statistics: what a leaf computes (through the public ops), and the finish
# --------------------------------------------------------------------------------------


def _hash_arrays(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float64))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _aligned(a):
    """``a`` in aligned, C-contiguous memory (a copy only when it is not). Arrays that
    arrive through Dask may sit at any byte offset of a message frame; NumPy then
    multiplies them without BLAS, in another summation order (measured: a worker's
    gradient leaf differed from the client's in its last bits, with W at offset 19)."""
    if not isinstance(a, np.ndarray):
        return a
    return np.require(a, requirements=["C", "A"])


def _on_device_of(x, a):
    """``a`` (a parameter or the labels) on the device of the rows ``x``: GPU leaves (CuPy
    rows, e.g. on a dask_cuda worker) take their parameters as CuPy arrays."""
    if ops.is_gpu_array(x) and isinstance(a, np.ndarray):
        return ops._cupy().asarray(a)  # noqa: SLF001
    return a


def _as_ops_float(x):
    """Leaf rows as ops accept them: half precision widened exactly to float32. Other
    dtypes are refused (integers would round in float32; a transform, such as the
    estimators' preprocessing, widens them exactly to float64 before the leaf)."""
    if not ops.is_gpu_array(x):
        x = np.asarray(x)
    _validation.feature_float(x.dtype, "x")
    return x if x.dtype.itemsize in (4, 8) else x.astype(np.float32)


class _Statistic:
    """Base of the statistic specs (frozen dataclasses below)."""

    needs_weights = False

    def key(self) -> str:
        raise NotImplementedError

    def bounds(self, d: int) -> dict:
        raise NotImplementedError

    def int_shapes(self, d: int) -> dict:
        return {}

    def fixed_shapes(self, d: int) -> dict:
        raise NotImplementedError

    #: Names of the outputs that are symmetric (..., d, d) matrices: only their lower
    #: triangles are put on the grid (half the conversion and merge work) and mirrored
    #: once at the end, so the result is exactly symmetric.
    symmetric: tuple = ()

    def leaf(self, x, y, weights):
        raise NotImplementedError

    def finish(self, values: dict):
        raise NotImplementedError


def _classes_count(obj, name: str = "num_classes") -> None:
    """Checks the integer field ``name`` (>= 1) of a frozen statistic, stored as an int."""
    from ._validation import integer

    object.__setattr__(obj, name, integer(getattr(obj, name), name, 1))


@dataclasses.dataclass(frozen=True)
class Gram(_Statistic):
    """``G = sum_i xbar_i xbar_i^T`` (:func:`dpfc_native.ops.clipped_gram`)."""

    clip_norm: float
    symmetric = ("G",)

    def __post_init__(self):
        _validation.positive(self.clip_norm, "clip_norm")

    def key(self):
        return f"gram:{self.clip_norm!r}"

    def bounds(self, d):
        return {"G": self.clip_norm**2}

    def fixed_shapes(self, d):
        return {"G": (d, d)}

    def leaf(self, x, y, weights):
        x = x if x.dtype == np.float16 else _as_ops_float(x)
        return {"G": _leaf_ops().clipped_gram(x, self.clip_norm)}

    def finish(self, v):
        return v["G"]


@dataclasses.dataclass(frozen=True)
class Stats(_Statistic):
    """Gram, class sums and counts (:func:`dpfc_native.ops.clipped_stats`)."""

    clip_norm: float
    num_classes: int
    symmetric = ("G",)

    def __post_init__(self):
        _validation.positive(self.clip_norm, "clip_norm")
        _classes_count(self)

    def key(self):
        return f"stats:{self.clip_norm!r}:{self.num_classes}"

    def bounds(self, d):
        return {"G": self.clip_norm**2, "B": self.clip_norm}

    def fixed_shapes(self, d):
        return {"G": (d, d), "B": (self.num_classes, d)}

    def int_shapes(self, d):
        return {"counts": (self.num_classes,)}

    def leaf(self, x, y, weights):
        x = x if x.dtype == np.float16 else _as_ops_float(x)
        g, b, counts = _leaf_ops().clipped_stats(x, y, self.num_classes, self.clip_norm)
        return {"G": g, "B": b, "counts": np.asarray(_host(counts), np.int64)}

    def finish(self, v):
        return v["G"], v["B"], v["counts"]


@dataclasses.dataclass(frozen=True)
class ClassSums(_Statistic):
    """``B[l] = sum_{y_i = l} xbar_i`` (:func:`dpfc_native.ops.clipped_class_sums`)."""

    clip_norm: float
    num_classes: int

    def __post_init__(self):
        _validation.positive(self.clip_norm, "clip_norm")
        _classes_count(self)

    def key(self):
        return f"class_sums:{self.clip_norm!r}:{self.num_classes}"

    def bounds(self, d):
        return {"B": self.clip_norm}

    def fixed_shapes(self, d):
        return {"B": (self.num_classes, d)}

    def leaf(self, x, y, weights):
        return {
            "B": _leaf_ops().clipped_class_sums(
                _as_ops_float(x), y, self.num_classes, self.clip_norm
            )
        }

    def finish(self, v):
        return v["B"]


def _class_range(classes, num_classes):
    lo, hi = (0, num_classes) if classes is None else (int(classes[0]), int(classes[1]))
    if not 0 <= lo < hi <= num_classes:
        raise ValueError(f"classes must be a range within [0, {num_classes}), got {classes!r}")
    return lo, hi


@dataclasses.dataclass(frozen=True)
class ClassGrams(_Statistic):
    """Per-class grams ``A_l`` (:func:`dpfc_native.ops.clipped_class_grams`), for the
    classes ``[lo, hi)`` of ``classes`` (None: all): K x d x d statistics are split into
    class blocks, each its own reduction."""

    clip_norm: float
    num_classes: int
    classes: Optional[tuple] = None
    symmetric = ("A",)

    def __post_init__(self):
        _validation.positive(self.clip_norm, "clip_norm")
        _classes_count(self)
        _class_range(self.classes, self.num_classes)

    def key(self):
        classes = _class_range(self.classes, self.num_classes)
        return f"class_grams:{self.clip_norm!r}:{self.num_classes}:{classes}"

    def bounds(self, d):
        return {"A": self.clip_norm**2}

    def fixed_shapes(self, d):
        lo, hi = _class_range(self.classes, self.num_classes)
        return {"A": (hi - lo, d, d)}

    def leaf(self, x, y, weights):
        lo, hi = _class_range(self.classes, self.num_classes)
        d = x.shape[1]
        if (lo, hi) != (0, self.num_classes):
            sel = (y >= lo) & (y < hi)
            x, y = x[sel], y[sel] - lo
        if x.shape[0] == 0:
            return {"A": np.zeros((hi - lo, d, d))}
        return {"A": _leaf_ops().clipped_class_grams(_as_ops_float(x), y, hi - lo, self.clip_norm)}

    def finish(self, v):
        return v["A"]


@dataclasses.dataclass(frozen=True)
class WeightedGrams(_Statistic):
    """Per-class weighted grams ``H_l = sum_i w_il xbar_i xbar_i^T``
    (:func:`dpfc_native.ops.clipped_weighted_grams`).

    Parameters
    ----------
    clip_norm : float
    num_weights : int
        K, the weight columns.
    weight_bound : float
        A public bound on every weight (Newton: 1/4); sets the grid. A larger weight
        raises.
    weight_fn : callable (x_rows, labels) -> (m, K) weights, or None
        Computes the weights from the rows (e.g. sigmoid' of the current logits), on the
        worker; None: weights are given per row to :func:`reduce`.
    classes : (lo, hi) or None
        Weight columns of this block only.
    """

    clip_norm: float
    num_weights: int
    weight_bound: float = 0.25
    weight_fn: Optional[Callable] = dataclasses.field(default=None, compare=False)
    classes: Optional[tuple] = None
    weight_fn_id: str = ""
    symmetric = ("H",)

    def __post_init__(self):
        _validation.positive(self.clip_norm, "clip_norm")
        _validation.positive(self.weight_bound, "weight_bound")
        _classes_count(self, "num_weights")
        _class_range(self.classes, self.num_weights)

    @property
    def needs_weights(self):
        return self.weight_fn is None

    def key(self):
        rng = _class_range(self.classes, self.num_weights)
        fn_id = self.weight_fn_id or getattr(self.weight_fn, "fingerprint", "")
        if self.weight_fn is not None and not fn_id:
            raise ValueError(
                "a weight_fn needs a weight_fn_id (or a .fingerprint) naming its "
                "parameters, so partials of different weights never merge"
            )
        return (
            f"weighted_grams:{self.clip_norm!r}:{self.num_weights}:{self.weight_bound!r}:"
            f"{rng}:{fn_id}"
        )

    def bounds(self, d):
        return {"H": self.weight_bound * self.clip_norm**2}

    def fixed_shapes(self, d):
        lo, hi = _class_range(self.classes, self.num_weights)
        return {"H": (hi - lo, d, d)}

    def leaf(self, x, y, weights):
        if self.weight_fn is not None:
            weights = self.weight_fn(x, y)
        xp = ops.array_module(x)
        w = xp.asarray(weights, dtype=xp.float64)
        if w.shape != (x.shape[0], self.num_weights):
            raise ValueError(
                f"weights must have shape ({x.shape[0]}, {self.num_weights}), got {w.shape}"
            )
        if w.size and float(w.max()) > self.weight_bound:
            raise ValueError(
                f"a weight ({float(w.max())!r}) exceeds weight_bound={self.weight_bound!r}"
            )
        lo, hi = _class_range(self.classes, self.num_weights)
        return {
            "H": _leaf_ops().clipped_weighted_grams(
                _as_ops_float(x), xp.ascontiguousarray(w[:, lo:hi]), self.clip_norm
            )
        }

    def finish(self, v):
        return v["H"]


@dataclasses.dataclass(frozen=True, eq=False)
class NewtonWeights:
    """Newton's per-row weights ``p (1 - p)`` with ``p = sigmoid(W xbar + b)`` on the
    rows clipped to ``clip_norm`` (at most 1/4): a picklable ``weight_fn`` for
    :class:`WeightedGrams`, computed on the workers from the rows they read."""

    w: np.ndarray
    bias: Any
    clip_norm: float

    def __post_init__(self):
        object.__setattr__(self, "w", np.asarray(self.w, dtype=np.float64))
        object.__setattr__(
            self,
            "bias",
            np.broadcast_to(np.asarray(self.bias, np.float64), (self.w.shape[0],)).copy(),
        )

    @property
    def fingerprint(self) -> str:
        return f"newton:{self.clip_norm!r}:{_hash_arrays(self.w, self.bias)}"

    def __call__(self, x, y):
        xp = ops.array_module(x)
        xc, _ = _leaf_ops().clip_rows(xp.asarray(x, dtype=xp.float64), self.clip_norm)
        w, bias = _on_device_of(x, _aligned(self.w)), _on_device_of(x, _aligned(self.bias))
        from ._special import sigmoid

        p = sigmoid(xc @ w.T + bias)
        return p * (1.0 - p)


@dataclasses.dataclass(frozen=True, eq=False)
class LinearGrad(_Statistic):
    """Clipped per-example gradient sum of a linear classifier
    (:func:`dpfc_native.ops.clipped_linear_grad`) at weights ``w`` and ``bias``."""

    clip_norm: float
    w: np.ndarray
    bias: Any = 0.0
    loss: str = "sigmoid"
    feature_clip: Optional[float] = None

    def __post_init__(self):
        _validation.positive(self.clip_norm, "clip_norm")
        object.__setattr__(self, "w", np.asarray(self.w))
        if self.w.ndim != 2:
            raise ValueError(f"w must be 2-D (K, d), got shape {self.w.shape}")

    def key(self):
        bias = np.broadcast_to(np.asarray(self.bias, np.float64), (self.w.shape[0],))
        return (
            f"linear_grad:{self.clip_norm!r}:{self.loss}:{self.feature_clip!r}:"
            f"{_hash_arrays(self.w, bias)}:{self.w.dtype}"
        )

    def bounds(self, d):
        return {"grad": self.clip_norm}

    def fixed_shapes(self, d):
        return {"grad": self.w.shape}

    def int_shapes(self, d):
        return {"n_clipped": ()}

    def leaf(self, x, y, weights):
        grad, n_clipped = _leaf_ops().clipped_linear_grad(
            _as_ops_float(x),
            y,
            _on_device_of(x, _aligned(self.w)),
            _on_device_of(x, _aligned(self.bias)),
            self.clip_norm,
            loss=self.loss,
            feature_clip=self.feature_clip,
        )
        return {"grad": grad, "n_clipped": np.asarray(n_clipped, np.int64)}

    def finish(self, v):
        return v["grad"], int(v["n_clipped"])


# --------------------------------------------------------------------------------------
# Computing partials and the local reduction
# --------------------------------------------------------------------------------------


def _partial_key(
    stat: _Statistic, layout: LeafLayout, sampling: Optional[PoissonSampling], d: int
) -> str:
    samp = "" if sampling is None else f"{sampling.rate!r}:{sampling.step}:{sampling.fingerprint}"
    return f"{stat.key()}|d={d}|{layout.fingerprint}|{samp}"


def _accumulator(stat, layout: LeafLayout, sampling, d: int) -> _Accumulator:
    try:
        bounds = stat.bounds(d)
    except OverflowError:  # clip_norm ** 2 of a Python float beyond the float64 range
        bounds = {"?": math.inf}
    if not all(_BOUND_RANGE[0] <= b <= _BOUND_RANGE[1] for b in bounds.values()):
        raise ValueError(
            f"{type(stat).__name__} ({stat.key()}): its per-row bound (clip_norm, squared "
            "for grams, times weight_bound for weighted grams) must be within 2^-900 .. "
            "2^900 (about 1e-271 .. 1e271) for the exact leaf reduction's grid (its scale "
            "2^(F - E) and the sums must stay inside float64); rescale the features and "
            "clip_norm"
        )
    exps = {name: _grid_exponent(bound) for name, bound in bounds.items()}
    return _Accumulator(
        _partial_key(stat, layout, sampling, d),
        exps,
        layout.fraction_bits,
        stat.fixed_shapes(d),
        stat.int_shapes(d),
        stat.symmetric,
    )


def _leaf_values(stat, source, layout: LeafLayout, leaf: int, sampling, weights):
    """(the leaf's statistic as ops return it, its row count); (None, 0) if no row of
    the leaf is sampled."""
    s, a, b = int(layout.shard[leaf]), int(layout.start[leaf]), int(layout.stop[leaf])
    g0 = int(layout.global_start[leaf])
    if sampling is not None:
        mask = sampling.mask(g0, g0 + (b - a))
        rows = a + np.flatnonzero(mask)
        if rows.size == 0:
            return None, 0
        x, y = _take(source, s, rows, a, b)
    else:
        mask = None
        x, y = source.read(s, a, b)
    w = None
    if stat.needs_weights:
        if weights is None:
            raise ValueError("this statistic needs per-row weights (or a weight_fn)")
        w = weights.leaf_weights(leaf) if hasattr(weights, "leaf_weights") else np.asarray(weights)
        if mask is not None:
            w = w[mask]
    if ops.is_gpu_array(x):  # a GPU leaf: labels and weights join it on the device
        y, w = (
            _on_device_of(x, np.asarray(_host(y))),
            (None if w is None else _on_device_of(x, np.asarray(w))),
        )
    else:
        x, y = _aligned(np.asarray(x)), _aligned(np.asarray(y))
        if w is not None:
            w = _aligned(np.asarray(w))
    token = _ROWS_CHECKED.set(
        bool(getattr(source, "rows_checked", False))
        or bool(getattr(getattr(source, "transform", None), "rows_checked", False))
    )
    try:
        return stat.leaf(x, y, w), int(x.shape[0])
    except ValueError as e:
        where = getattr(source, "shards", None)
        name = where[s].path if where is not None else f"shard {s}"
        raise ValueError(f"{name}: rows [{a}, {b}) (leaf {leaf}): {e}") from e
    finally:
        _ROWS_CHECKED.reset(token)


_BLAS_LOCK = threading.Lock()
_BLAS_USERS = 0
_BLAS_LIMIT: Any = None
_BLAS_DEPTH = threading.local()  # blocks open on this thread (what survives a fork)


@contextlib.contextmanager
def one_blas_thread():
    """A context in which BLAS runs on one thread, as a leaf must be computed.

    OpenBLAS's float64 products round differently with another thread count (measured: a
    1808 x 512 gradient leaf differed between one and two threads), so a leaf is a pure
    function of its rows only at a fixed count: one, which is also what a Dask worker's
    nanny sets. Parallelism comes from computing leaves side by side instead (threads in
    :func:`reduce`, processes on a cluster). Every BLAS the ops use is loaded before the
    limit is set: a library loaded inside the block would escape it.

    The thread count is a process-wide setting, so the blocks are counted across threads:
    the first one in sets the limit and the last one out restores the count it found
    (two reductions on two Python threads each saving and restoring it interleaved: one
    restored two threads while the other was still computing leaves, changing their
    bits, and the other left BLAS on one thread for the rest of the process). Nested
    blocks are harmless.
    """
    global _BLAS_USERS, _BLAS_LIMIT
    with _BLAS_LOCK:
        if _BLAS_USERS == 0:
            _take_blas_control()  # this thread sets the limit, and keeps control
            _BLAS_LIMIT = threadpoolctl.threadpool_limits(1, user_api="blas")
        _BLAS_USERS += 1
    _BLAS_DEPTH.n = getattr(_BLAS_DEPTH, "n", 0) + 1
    try:
        yield
    finally:
        _BLAS_DEPTH.n -= 1
        with _BLAS_LOCK:
            _BLAS_USERS -= 1
            if _BLAS_USERS == 0:
                _take_blas_control()  # the last one out may be another thread
                try:
                    _BLAS_LIMIT.restore_original_limits()
                finally:
                    _release_blas_control()
                    _BLAS_LIMIT = None


def _blas_shared_state():
    """threadpoolctl's record of which thread controls OpenBLAS (``controlling_thread``
    and the ``lock`` around it; threadpoolctl >= 3.8), or None."""
    controller = getattr(threadpoolctl, "OpenBLASController", None)
    state = getattr(controller, "_SHARED_STATE", None)
    if state is None or not hasattr(state, "lock") or not hasattr(state, "controlling_thread"):
        return None
    return state


def _take_blas_control() -> None:
    """Make this thread threadpoolctl's controlling thread of OpenBLAS, in one step under
    its lock (clearing it first and letting the limit take it left a gap in which
    another thread's ``threadpool_limits`` took control: the limit of one then did
    nothing, and whole reductions ran their leaves on two BLAS threads). Without that
    record (threadpoolctl < 3.8, or another layout): :func:`_release_blas_control`."""
    state = _blas_shared_state()
    if state is None:
        _release_blas_control()
        return
    with state.lock:
        state.controlling_thread = threading.current_thread()


def _after_fork_in_child() -> None:
    """A forked child has only the forking thread: blocks that other threads held are
    gone with them. A fresh lock (it may have been copied held: every fit in the child
    then hung) and the count of the forking thread's own open blocks; with none, BLAS
    back to the count the blocks found (the child stayed on one thread for good), with
    some, the limit kept for them and this thread in control."""
    global _BLAS_LOCK, _BLAS_USERS, _BLAS_LIMIT
    _BLAS_LOCK = threading.Lock()
    mine = getattr(_BLAS_DEPTH, "n", 0)
    state = _blas_shared_state()
    if state is not None:
        # threadpoolctl's lock is held, if at all, by a thread that no longer exists
        # here (this one is not inside it now): a fresh one, whether or not a limit is
        # set (a child forked while another thread took control hung on it).
        state.lock = threading.Lock()
    if _BLAS_LIMIT is None:
        return
    if state is not None:
        state.controlling_thread = threading.current_thread()
    _BLAS_USERS = mine
    if mine:
        return  # this thread's blocks go on; the last one out restores
    limit, _BLAS_LIMIT = _BLAS_LIMIT, None
    try:
        limit.restore_original_limits()
    finally:
        if state is not None:
            state.controlling_thread = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _release_blas_control() -> None:
    """Clear threadpoolctl's "controlling thread" of OpenBLAS.

    threadpoolctl >= 3.8 lets only one thread change a pthreads OpenBLAS's process-wide
    count: the first to set one, until a ``with threadpool_limits`` block of its own ends;
    calls from other threads do nothing, silently. So the first block in takes control
    (:func:`_take_blas_control`) and sets the limit, holding control until the last block
    is out (other threads' ``threadpool_limits`` cannot change the count under the leaves
    meanwhile, unless the first thread, out of its own block, sets a limit itself, or
    ends), and the last block out, whichever thread it runs on, takes control to restore
    the count and then clears it here, leaving no thread in control. The limit is set
    from the first thread in, not from a thread of its own: with an OpenMP-built
    OpenBLAS the count is per thread (threadpoolctl calls ``omp_set_num_threads``), and
    the calling thread is the one computing leaves.
    (Without the clearing, a reduction on a second Python thread computed its leaves on
    every BLAS thread, other bits, and a restore from the last thread out was ignored,
    leaving BLAS on one thread.) Older threadpoolctl: nothing to clear."""
    controller = getattr(threadpoolctl, "OpenBLASController", None)
    clear = getattr(controller, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


def leaf_partial(
    stat: _Statistic,
    source,
    layout: LeafLayout,
    leaf: int,
    *,
    sampling: Optional[PoissonSampling] = None,
    weights=None,
) -> Partial:
    """The partial of one leaf: read its rows (only the sampled ones under ``sampling``),
    compute the statistic with the ops in float64, convert it once to the grid.

    ``weights`` (for :class:`WeightedGrams` without ``weight_fn``): the (rows, K) weights
    of this leaf's rows, or an object with a ``leaf_weights(leaf)`` method.
    """
    acc = _accumulator(stat, layout, sampling, int(source.n_features))
    with one_blas_thread(), _cpu_stats.leaf_outputs():
        out, m = _leaf_values(stat, source, layout, leaf, sampling, weights)
        acc.add(out, m, leaf)
    return acc.partial()


def _check_weight_rows(weights, n_rows: int) -> None:
    """Per-row weights must have one row per example (extra rows are not ignored)."""
    if getattr(weights, "shape", (None,))[0] != n_rows:
        raise ValueError(
            f"weights must have one row per example ({n_rows}), got shape "
            f"{getattr(weights, 'shape', type(weights))}"
        )


class _SlicedWeights:
    def __init__(self, weights, layout: LeafLayout, first_global: int = 0):
        self.weights, self.layout, self.first = weights, layout, int(first_global)

    def leaf_weights(self, leaf: int):
        g0 = int(self.layout.global_start[leaf]) - self.first
        m = int(self.layout.stop[leaf] - self.layout.start[leaf])
        return np.asarray(self.weights[g0 : g0 + m])


def range_partial(
    stat: _Statistic,
    source,
    layout: LeafLayout,
    first: int,
    stop: int,
    *,
    sampling: Optional[PoissonSampling] = None,
    weights=None,
    cancel: Optional[threading.Event] = None,
) -> Partial:
    """The exact sum of the partials of leaves ``[first, stop)``.

    ``weights``: global (n, K) weights (sliced per leaf), or an object with
    ``leaf_weights(leaf)``. ``cancel``: when set (checked before each leaf), stop and
    raise :class:`ReductionCancelled`.
    """
    if not 0 <= first < stop <= layout.n_leaves:
        raise ValueError(f"leaf range [{first}, {stop}) outside [0, {layout.n_leaves})")
    if weights is not None and not hasattr(weights, "leaf_weights"):
        _check_weight_rows(weights, layout.n_rows)
        weights = _SlicedWeights(weights, layout)
    acc = _accumulator(stat, layout, sampling, int(source.n_features))
    # Each leaf's value is on the grid before the next leaf is computed, so the CPU
    # statistics may reuse one set of output buffers for the whole range (and leave the
    # symmetric outputs' upper triangles, which the grid does not read, unmirrored).
    with one_blas_thread(), _cpu_stats.leaf_outputs():
        for leaf in range(first, stop):
            if cancel is not None and cancel.is_set():
                raise ReductionCancelled(f"cancelled before leaf {leaf}")
            out, m = _leaf_values(stat, source, layout, leaf, sampling, weights)
            acc.add(out, m, leaf)
    return acc.partial()


class ReductionCancelled(RuntimeError):
    """A leaf range stopped early because another part of its reduction failed (or was
    interrupted); never seen by callers of :func:`reduce`, which raise that error."""


def _as_source(x, labels=None, num_classes=None, shard_rows=None):
    if hasattr(x, "shard_rows") and hasattr(x, "read"):
        return x
    return ArraySource(x, labels, num_classes, shard_rows)


def reduce(
    stat: _Statistic,
    x,
    labels=None,
    *,
    leaf_rows: int = LEAF_ROWS,
    sampling: Optional[PoissonSampling] = None,
    weights=None,
    shard_rows=None,
    return_partial: bool = False,
    threads: Optional[int] = None,
):
    """The statistic over all rows by the exact reduction, in this process (the local
    path): the same leaves, grid and finish as the distributed backend, hence the same
    bits.

    Parameters
    ----------
    stat : Gram, Stats, ClassSums, ClassGrams, WeightedGrams or LinearGrad
    x : array (n, d) (NumPy or a memory map), or a :class:`~dpfc_native.shards.ShardedFeatures`
    labels : int array (n,) for arrays (ignored for sharded sources)
    leaf_rows : int
    sampling : PoissonSampling or None
        Sum only the rows Poisson-sampled at ``sampling.step``.
    weights : array (n, K) for :class:`WeightedGrams` without a ``weight_fn``
    shard_rows : sequence of int or None
        For arrays: cut them into these shards (the leaves then match those of the same
        rows stored as shards of these lengths). None: one shard.
    return_partial : bool
        Also return the complete :class:`Partial` (its coverage record).
    threads : int or None
        Threads computing leaves side by side (each leaf on one BLAS thread; the result
        does not depend on it). None: ``DPFC_REDUCE_THREADS`` or the CPU count.

    Returns
    -------
    What the matching op returns (e.g. ``G`` for Gram; ``(G, B, counts)`` for Stats;
    ``(grad, n_clipped)`` for LinearGrad); with ``return_partial``, ``(result, partial)``.
    """
    source = _as_source(x, labels, shard_rows=shard_rows)
    layout = LeafLayout(_shard_rows_of(source), leaf_rows)
    threads = min(_local_threads(threads), layout.n_leaves)
    if threads <= 1:
        total = range_partial(
            stat, source, layout, 0, layout.n_leaves, sampling=sampling, weights=weights
        )
    else:
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        cuts = np.linspace(0, layout.n_leaves, threads + 1).round().astype(int)
        ranges = [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        cancel = threading.Event()
        # One limit held around the pool: the workers' own (nested) limits then restore
        # one thread, never the process's default, while another leaf is computing.
        with one_blas_thread(), ThreadPoolExecutor(threads) as pool:
            futures = [
                pool.submit(
                    range_partial,
                    stat,
                    source,
                    layout,
                    a,
                    b,
                    sampling=sampling,
                    weights=weights,
                    cancel=cancel,
                )
                for a, b in ranges
            ]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # Ctrl-C: the other ranges stop at their next leaf
                cancel.set()
                raise
            failed = [f for f in futures if f in done and f.exception() is not None]
            if failed:
                # The first error (in range order) is raised once the other ranges stop
                # at their next leaf; they waited for the whole pass before.
                cancel.set()
                raise failed[0].exception()
            parts = [f.result() for f in futures]
        total = parts[0]
        for part in parts[1:]:
            total = total.merge(part)
    result = stat.finish(total.values(layout.n_leaves))
    return (result, total) if return_partial else result


def _local_threads(threads: Optional[int]) -> int:
    if threads is None:
        env = os.environ.get("DPFC_REDUCE_THREADS", "").strip()
        if not env:
            return os.cpu_count() or 1
        # isascii: str.isdigit accepts '²', which int() refuses.
        if not (env.isascii() and env.isdigit()) or int(env) < 1:
            raise ValueError(f"DPFC_REDUCE_THREADS must be an integer >= 1, got {env!r}")
        return int(env)
    return _validation.integer(threads, "threads", 1)


def rounding_bound(n: int, leaf_rows: int, per_row_bound: float, entries: int) -> float:
    """A-priori bound on ``||reduce(...) - exact||_F`` (see the module docstring):
    leaf float64 sums, grid rounding and the final conversion, for a statistic of
    ``entries`` elements whose per-row terms have Frobenius norm at most ``per_row_bound``."""
    u = 2.0**-53
    m = min(int(leaf_rows), int(n))
    leaves = -(-int(n) // int(leaf_rows))
    gamma = (m + 1) * u / (1 - (m + 1) * u)
    grid = 2.0 ** (_grid_exponent(per_row_bound) - fraction_bits(m) - 1)
    return gamma * n * per_row_bound + math.sqrt(entries) * leaves * grid + u * n * per_row_bound
