"""Array-generic linear algebra for the estimators: shift batches, repaired Cholesky, SPD solves.

Every function takes NumPy arrays (CPU: LAPACK) or CuPy arrays (GPU: the native batched
kernels) and returns arrays of the same kind; all factorisations and solves go through
:mod:`dpfc_native.ops`.

Privacy: these functions only ever see *released* (already noised) statistics, e.g.
``G~ + lambda I``. Whatever they do with them (which matrices to repair, by how much,
which shifts to try) depends on the released matrices alone, so it is post-processing
and costs no privacy budget. Never call them on un-noised private statistics and then
release the result.

Numerics: a noisy Gram matrix is often indefinite. Rather than projecting every matrix
to the PSD cone with an eigendecomposition (about 10x a Cholesky), :func:`cholesky_repair`
factors the whole batch, then repairs only the matrices whose factorisation failed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import numpy as np

from . import _validation

__all__ = [
    "RepairReport",
    "cholesky_shifts",
    "cholesky_repair",
    "solve_spd",
    "DENOISE_METHODS",
    "bulk_edge",
    "shrink_eigenvalues",
    "denoise_eigh",
    "eigh_solve",
    "batched_eigh",
    "denoise",
    "SHIFT_REL",
    "EIG_FLOOR_REL",
]

#: First diagonal shift of method "shift", relative to mean |a_ii| (x10 per retry).
SHIFT_REL: float = 1e-6
#: Default eigenvalue floor of method "eig", relative to max |eigenvalue| (x10 per retry).
EIG_FLOOR_REL: float = 1e-6
#: Shift or floor used for an all-zero matrix (absolute; nothing else gives a scale).
_ZERO_MATRIX_FLOOR: float = 1e-12


def _ix(xp, idx: np.ndarray):
    """A host index array as an index for arrays of module xp."""
    return idx if xp is np else xp.asarray(idx)


def _to_host(x) -> np.ndarray:
    """A NumPy copy of x (one device sync for CuPy arrays)."""
    if isinstance(x, np.ndarray):
        return x
    get = getattr(x, "get", None)
    return np.asarray(get() if get is not None else x)


def _as_array(a, name: str):
    from . import ops

    xp = ops.array_module(a)
    if xp is np and not isinstance(a, np.ndarray):
        a = np.asarray(a)
    elif xp is not np:
        a = xp.asarray(a)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} must have shape (..., d, d), got {tuple(a.shape)}")
    if a.shape[-1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(a.shape)}")
    if a.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    return a, xp


@dataclasses.dataclass(frozen=True)
class RepairReport:
    """What :func:`cholesky_repair` changed. Everything is host data (tuples of Python scalars).

    Attributes
    ----------
    method : "shift" or "eig"
    batch_shape : the batch shape of the input (``a.shape[:-2]``)
    indices : flat (C-order) batch indices of the repaired matrices, increasing
    info : the failed factorisation's info (1-based failing pivot) of each repaired matrix
    shifts : method "shift": the diagonal shift ``tau`` finally added to each repaired
        matrix (same units as ``a``); empty for "eig"
    min_eigenvalues : method "eig": each repaired matrix's smallest eigenvalue before
        clamping; empty for "shift"
    floors : method "eig": the eigenvalue floor finally used per repaired matrix
    tries : factorisation attempts per repaired matrix after the first failure
    """

    method: str
    batch_shape: Tuple[int, ...]
    indices: Tuple[int, ...] = ()
    info: Tuple[int, ...] = ()
    shifts: Tuple[float, ...] = ()
    min_eigenvalues: Tuple[float, ...] = ()
    floors: Tuple[float, ...] = ()
    tries: Tuple[int, ...] = ()

    @property
    def n_repaired(self) -> int:
        return len(self.indices)

    @property
    def repaired(self) -> bool:
        return bool(self.indices)

    def multi_indices(self) -> Tuple[Tuple[int, ...], ...]:
        """The repaired matrices' indices in the input's batch shape."""
        if not self.batch_shape:
            return tuple(() for _ in self.indices)
        return tuple(
            tuple(int(v) for v in np.unravel_index(i, self.batch_shape)) for i in self.indices
        )

    def __str__(self) -> str:
        total = math.prod(self.batch_shape) if self.batch_shape else 1
        head = (
            f"RepairReport(method={self.method!r}): {self.n_repaired} of {total} matrices repaired"
        )
        if not self.indices:
            return head
        parts = []
        for k, i in enumerate(self.indices[:10]):
            if self.method == "shift":
                what = f"shift {self.shifts[k]:.3g}"
            else:
                what = (
                    f"min eigenvalue {self.min_eigenvalues[k]:.3g} clamped at {self.floors[k]:.3g}"
                )
            parts.append(f"#{i} (info {self.info[k]}, {what}, {self.tries[k]} tries)")
        more = f", ... {self.n_repaired - 10} more" if self.n_repaired > 10 else ""
        return head + ": " + ", ".join(parts) + more


def cholesky_shifts(a, shifts):
    """Factor ``a + shifts[j] I`` for every shift: a regularisation sweep in one call.

    Parameters
    ----------
    a : array (d, d), float32 or float64 (NumPy or CuPy). Only the lower triangle is read.
    shifts : array-like (m,) of finite reals (cast to ``a.dtype``), e.g. candidate lambdas.

    Returns
    -------
    L : array (m, d, d), same dtype and device as ``a``; all NaN where the factorisation
        failed.
    info : int32 array (m,): 0, or the failing pivot's 1-based index (as :func:`ops.cholesky`).

    On the GPU this is one batched native call reading ``a`` once per tile (no stacked
    copy); on the CPU one LAPACK call per shift. No device synchronisation.
    Post-processing: depends only on the released matrix.
    """
    from . import ops

    a, xp = _as_array(a, "a")
    if a.ndim != 2:
        raise ValueError(f"a must have shape (d, d), got {tuple(a.shape)}")
    return ops.cholesky_shifts(a, np.asarray(shifts) if xp is np else xp.asarray(shifts))


def _lower_finite(xp, mats):
    """Per matrix of mats (f, d, d): True if its lower triangle is finite."""
    low = xp.tril(mats)
    return xp.isfinite(low).reshape(mats.shape[0], -1).all(axis=1)


def _symmetric_from_lower(xp, mats):
    low = xp.tril(mats)
    return low + xp.swapaxes(xp.tril(mats, -1), -1, -2)


def _shift_scales(xp, mats) -> np.ndarray:
    """tau_0 per matrix (host float64): SHIFT_REL x mean|a_ii|, else x max|a_ij| (lower
    triangle) when the diagonal is all zero, else the absolute _ZERO_MATRIX_FLOOR."""
    diag = xp.abs(xp.diagonal(mats, axis1=-2, axis2=-1)).astype(xp.float64)
    mean_diag = _to_host(diag.mean(axis=-1))
    max_low = _to_host(
        xp.abs(xp.tril(mats)).reshape(mats.shape[0], -1).max(axis=1).astype(xp.float64)
    )
    tau = SHIFT_REL * mean_diag
    tau = np.where(tau > 0, tau, SHIFT_REL * max_low)
    return np.where(tau > 0, tau, _ZERO_MATRIX_FLOOR)


def _gershgorin_shift(xp, mats) -> np.ndarray:
    """Per matrix (host float64): a shift making the symmetric matrix strictly diagonally
    dominant, hence positive definite: max_i (sum_{j != i} |a_ij| - a_ii), floored at 0."""
    sym = _symmetric_from_lower(xp, mats).astype(xp.float64)
    absd = xp.abs(sym)
    diag = xp.diagonal(sym, axis1=-2, axis2=-1)
    radius = absd.sum(axis=-1) - xp.abs(diag)
    return np.maximum(_to_host((radius - diag).max(axis=-1)), 0.0)


def cholesky_repair(a, *, method: str = "shift", floor: Optional[float] = None, max_tries: int = 8):
    """Cholesky of a batch of (noisy, possibly indefinite) symmetric matrices, repairing
    only the matrices whose factorisation fails.

    Post-processing: the repair depends only on the released matrix ``a`` (e.g. a noised
    Gram matrix plus regularisation), so it costs no privacy budget.

    Parameters
    ----------
    a : array (..., d, d), float32 or float64, NumPy or CuPy. Only the lower triangle is
        read (it defines the symmetric matrix).
    method : "shift" or "eig"
        "shift": factor ``a + tau I`` with ``tau_0 = 1e-6 * mean|a_ii|`` (``1e-6 * max|a_ij|``
        of the lower triangle if the diagonal is all zero, ``1e-12`` for an all-zero
        matrix), multiplied by 10 on every retry; the last retry uses at least the
        Gershgorin shift ``max_i (sum_{j != i} |a_ij| - a_ii)`` (plus ``tau_0``), which makes
        the matrix strictly diagonally dominant, so finite input always gets repaired.
        The report holds the final ``tau`` per matrix.
        "eig": symmetric eigendecomposition ``a = V diag(w) V^T``, eigenvalues clamped at
        ``floor`` (``max(w, floor)``), rebuilt and factored again; the floor is multiplied
        by 10 on a retry (a float32 rebuild can fail for a floor near rounding).
        Costs about 10 Cholesky factorisations per repaired matrix.
    floor : float > 0 or None
        "eig" only: absolute eigenvalue floor (same units as ``a``). Default
        ``1e-6 * max|w|`` per matrix (``1e-12`` for an all-zero matrix): relative to the
        matrix's own spectral scale, so the repaired matrix has condition number at most
        about 1e6 and the factor stays accurate in float64 and float32.
    max_tries : int >= 1
        Repair attempts per matrix.

    Returns
    -------
    L : array shaped like ``a``: lower Cholesky factors, never NaN (repaired matrices get
        the factor of the repaired matrix).
    report : RepairReport

    Raises
    ------
    ValueError
        If ``a`` has NaN or Inf in the lower triangle of a matrix whose factorisation
        failed (such a matrix cannot be repaired), naming the batch indices; or if a
        matrix still fails after ``max_tries`` attempts.

    Notes
    -----
    On the GPU this synchronises the device once to read ``info`` (and again per retry
    when matrices fail). The un-failed matrices' factors are exactly :func:`ops.cholesky`'s.
    """
    from . import ops

    a, xp = _as_array(a, "a")
    if method not in ("shift", "eig"):
        raise ValueError(f"method must be 'shift' or 'eig', got {method!r}")
    if isinstance(max_tries, bool) or not isinstance(max_tries, (int, np.integer)) or max_tries < 1:
        raise ValueError(f"max_tries must be an integer >= 1, got {max_tries!r}")
    if floor is not None:
        if method != "eig":
            raise ValueError("floor applies to method='eig' only")
        floor = float(floor)
        if not math.isfinite(floor) or floor <= 0:
            raise ValueError(f"floor must be finite and > 0, got {floor!r}")

    d = a.shape[-1]
    batch_shape = tuple(a.shape[:-2])
    flat = a.reshape(-1, d, d)
    L, info = ops.cholesky(flat)
    info_h = _to_host(info).reshape(-1)
    failed = np.flatnonzero(info_h != 0)
    report_base = dict(method=method, batch_shape=batch_shape)
    if failed.size == 0:
        return L.reshape(a.shape), RepairReport(**report_base)

    fidx = _ix(xp, failed)
    mats = flat[fidx]
    finite = _to_host(_lower_finite(xp, mats))
    if not finite.all():
        bad = [int(i) for i in failed[~finite]]
        raise ValueError(
            f"a: matrices at batch indices {bad} contain NaN or Inf in their lower triangle "
            "and cannot be repaired"
        )

    if method == "shift":
        new_L, extra = _repair_shift(xp, ops, mats, max_tries)
    else:
        new_L, extra = _repair_eig(xp, ops, mats, floor, max_tries)
    bad = [int(failed[k]) for k in np.flatnonzero(~extra["ok"])]
    if bad:
        raise ValueError(
            f"a: matrices at batch indices {bad} could not be repaired in {max_tries} tries "
            f"(method {method!r})"
        )
    L[fidx] = new_L
    report = RepairReport(
        indices=tuple(int(i) for i in failed),
        info=tuple(int(info_h[i]) for i in failed),
        shifts=tuple(float(v) for v in extra.get("shifts", ())),
        min_eigenvalues=tuple(float(v) for v in extra.get("min_eigenvalues", ())),
        floors=tuple(float(v) for v in extra.get("floors", ())),
        tries=tuple(int(v) for v in extra["tries"]),
        **report_base,
    )
    return L.reshape(a.shape), report


def _keep_factored(xp, ops, trial, todo, out, ok, tries):
    """Factor ``trial`` (the candidate repairs of matrices ``todo``), store the factors
    that succeeded into ``out``, count the try; return the success mask over ``todo``."""
    L, info = ops.cholesky(trial)
    good = _to_host(info).reshape(-1) == 0
    tries[todo] += 1
    if good.any():
        out[_ix(xp, todo[good])] = L[_ix(xp, np.flatnonzero(good))]
        ok[todo[good]] = True
    return good


def _repair_shift(xp, ops, mats, max_tries: int):
    """Shift retries for the failed matrices mats (f, d, d); returns (L (f, d, d), extra)."""
    f, d = mats.shape[0], mats.shape[-1]
    tau0 = _shift_scales(xp, mats)
    gersh = _gershgorin_shift(xp, mats)
    out = xp.empty_like(mats)
    ok = np.zeros(f, dtype=bool)
    tries = np.zeros(f, dtype=np.int64)
    shifts = np.zeros(f, dtype=np.float64)
    idx = xp.arange(d)
    todo = np.arange(f)
    for attempt in range(max_tries):
        tau = tau0[todo] * (10.0**attempt)
        if attempt == max_tries - 1:
            # Last try: at least the Gershgorin shift (strictly diagonally dominant).
            tau = np.maximum(tau, gersh[todo] * (1.0 + 1e-3) + tau0[todo])
        trial = mats[_ix(xp, todo)].copy()
        with np.errstate(over="ignore"):  # a shift beyond float32's range: inf, then refused
            tau_cast = tau.astype(mats.dtype)
        trial[:, idx, idx] += xp.asarray(tau_cast)[:, None]
        good = _keep_factored(xp, ops, trial, todo, out, ok, tries)
        shifts[todo[good]] = tau_cast[good].astype(np.float64)
        todo = todo[~good]
        if todo.size == 0:
            break
    return out, {"ok": ok, "tries": tries, "shifts": shifts}


def _repair_eig(xp, ops, mats, floor: Optional[float], max_tries: int):
    """Eigenvalue clamping for the failed matrices mats (f, d, d) (eigh in float64)."""
    f = mats.shape[0]
    sym = _symmetric_from_lower(xp, mats).astype(xp.float64)
    w, v = xp.linalg.eigh(sym)
    w_h = _to_host(w)
    scale = np.abs(w_h).max(axis=-1)
    if floor is None:
        base = EIG_FLOOR_REL * scale
        base = np.where(base > 0, base, _ZERO_MATRIX_FLOOR)
    else:
        base = np.full(f, floor)
    out = xp.empty_like(mats)
    ok = np.zeros(f, dtype=bool)
    tries = np.zeros(f, dtype=np.int64)
    floors = np.zeros(f, dtype=np.float64)
    todo = np.arange(f)
    for attempt in range(max_tries):
        fl = base[todo] * (10.0**attempt)
        sel = _ix(xp, todo)
        wc = xp.maximum(w[sel], xp.asarray(fl)[:, None])
        vs = v[sel]
        rebuilt = (vs * wc[:, None, :]) @ xp.swapaxes(vs, -1, -2)
        rebuilt = 0.5 * (rebuilt + xp.swapaxes(rebuilt, -1, -2))
        good = _keep_factored(xp, ops, rebuilt.astype(mats.dtype), todo, out, ok, tries)
        floors[todo[good]] = fl[good]
        todo = todo[~good]
        if todo.size == 0:
            break
    return out, {"ok": ok, "tries": tries, "min_eigenvalues": w_h.min(axis=-1), "floors": floors}


def solve_spd(a, b, *, repair: Optional[str] = "shift"):
    """Solve ``a x = b`` for symmetric positive definite ``a`` via a (repaired) Cholesky.

    Parameters
    ----------
    a : array (..., d, d), lower triangle read (e.g. a released ``G~ + lambda I``)
    b : array (..., d, m) or (..., d), broadcast as in :func:`dpfc_native.ops.cho_solve`
    repair : "shift", "eig" or None
        Passed to :func:`cholesky_repair` as ``method``; None: no repair, and a matrix
        that is not positive definite raises ``numpy.linalg.LinAlgError``.

    Returns
    -------
    x : array, dtype ``result_type(a, b, float32)``
    report : RepairReport (empty for ``repair=None``)

    Post-processing when ``a`` and ``b`` are released statistics.
    """
    from . import ops

    if repair is None:
        a, xp = _as_array(a, "a")
        L, info = ops.cholesky(a)
        info_h = _to_host(info).reshape(-1)
        if (info_h != 0).any():
            bad = [int(i) for i in np.flatnonzero(info_h)]
            raise np.linalg.LinAlgError(
                f"a: matrices at batch indices {bad} are not positive definite"
            )
        report = RepairReport(method="none", batch_shape=tuple(a.shape[:-2]))
    else:
        L, report = cholesky_repair(a, method=repair)
    return ops.cho_solve(L, b), report


# ---------------------------------------------------------------------------------------
# Noise-aware eigenvalue shrinkage of released symmetric matrices (post-processing)
# ---------------------------------------------------------------------------------------

#: Choices of ``denoise``: "none" (factor the released matrix as is), "psd" (clamp the
#: negative eigenvalues to zero), "soft" (soft threshold at the noise bulk edge),
#: "spiked" (the spiked-Wigner Frobenius-optimal shrinker), "rie" (the rotationally
#: invariant estimator for additive noise).
DENOISE_METHODS: Tuple[str, ...] = ("none", "psd", "soft", "spiked", "rie")

# Rows of the (rows, d) difference block of the RIE's Stieltjes sums: bounded temporaries.
_RIE_BLOCK_ELEMENTS = 1 << 22


def bulk_edge(d: int, noise_std) -> "np.ndarray | float":
    """Right edge ``s sqrt(2 d)`` of the eigenvalue bulk of d x d symmetric Gaussian noise.

    The noise of a released symmetric statistic has std ``s`` on the diagonal and
    ``s / sqrt(2)`` off it (a scaled GOE matrix); its eigenvalues fill a semicircle of
    radius ``2 sqrt(d) s / sqrt(2) = s sqrt(2 d)`` (Wigner 1958).
    """
    return np.sqrt(2.0 * d) * np.asarray(noise_std, dtype=np.float64)


def _noise_std(noise_std) -> np.ndarray:
    """The public noise std(s) as float64 on the host: real, finite and >= 0."""
    if isinstance(noise_std, (str, bytes, bool, np.bool_)) or noise_std is None:
        raise TypeError(f"noise_std must be a real number or an array, got {noise_std!r}")
    s = np.asarray(_to_host(noise_std) if not np.isscalar(noise_std) else noise_std)
    if s.dtype.kind not in "iuf":
        raise TypeError(f"noise_std must be real, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not (np.isfinite(s).all() and (s >= 0).all()):
        raise ValueError(f"noise_std must be finite and >= 0, got {noise_std!r}")
    return s


def _check_noise_std(noise_std, batch: int) -> np.ndarray:
    """One noise std per matrix of a batch of ``batch`` (a scalar is shared)."""
    s = _noise_std(noise_std).reshape(-1)
    if s.size == 1:
        s = np.full(batch, float(s[0]))
    if s.size != batch:
        raise ValueError(
            f"noise_std must be a scalar or hold one value per matrix ({batch}), got {s.size}"
        )
    return s


def shrink_eigenvalues(w, noise_std, d: int, method: str = "rie"):
    """Shrink the eigenvalues of released matrices ``M + Z`` toward those of ``M``.

    ``M`` is positive semidefinite (a gram, a Hessian sum, a covariance) and ``Z`` is
    symmetric Gaussian noise with std ``noise_std`` on the diagonal and
    ``noise_std / sqrt(2)`` off it. Every method returns non-negative values and is the
    identity on the non-negative eigenvalues when ``noise_std = 0``.

    Parameters
    ----------
    w : array (..., d), float64 (NumPy or CuPy)
        Eigenvalues of the released matrices, ascending along the last axis (as from
        ``eigh``).
    noise_std : float or array broadcastable to ``w.shape[:-1]``
        The public diagonal noise std of each matrix (from the privacy ledger).
    d : int
        Order of the matrices (the bulk edge is ``noise_std * sqrt(2 d)``).
    method : {"psd", "soft", "spiked", "rie"}
        "psd": ``max(w, 0)``, the projection to the PSD cone.
        "soft": ``max(w - edge, 0)``, soft thresholding at the bulk edge: eigenvalues
        inside the noise bulk are set to zero and the ones outside are pulled in by the
        edge (Donoho, Gavish and Johnstone 2018 discuss it as a simple near-optimal rule).
        "spiked": ``sqrt(max(w^2 - edge^2, 0))`` for ``w > 0``: the Frobenius-optimal
        shrinker of a low-rank signal under Wigner noise. A signal eigenvalue ``t`` above
        the detection threshold ``edge / 2`` shows up at ``t + edge^2 / (4 t)`` with
        squared overlap ``1 - edge^2 / (4 t^2)`` with its eigenvector (Benaych-Georges and
        Nadakuditi 2011); the optimal value ``t * overlap`` simplifies to this formula
        (Donoho, Gavish and Johnstone 2018).
        "rie": the rotationally invariant estimator under additive noise,
        ``w_i - 2 sigma^2 Re g(w_i + i eta)``, with ``sigma^2 = d s^2 / 2`` the noise
        variance per unit of normalised spectrum and ``g`` the Stieltjes transform of the
        empirical spectrum, smoothed at ``eta = edge / sqrt(d)``, then clamped at zero
        (Bun, Allez, Bouchaud and Potters 2016). It needs no low-rank assumption: for a
        full-rank signal with a decaying spectrum it shrinks each eigenvalue by the
        amount the noise moved it on average.

    Returns
    -------
    array shaped like ``w`` (same module), float64, >= 0.

    Post-processing: depends only on the released eigenvalues and the public noise std.
    """
    if method not in DENOISE_METHODS or method == "none":
        raise ValueError(f"method must be one of {DENOISE_METHODS[1:]}, got {method!r}")
    from . import ops

    xp = ops.array_module(w)
    d = _validation.integer(d, "d", minimum=1)
    if w.ndim < 1 or w.shape[-1] != d:
        raise ValueError(f"d must be the length of w's last axis, got d={d} for shape {w.shape}")
    w = w.astype(xp.float64)
    batch_shape = tuple(w.shape[:-1])
    s = np.broadcast_to(_noise_std(noise_std), batch_shape)
    if method == "psd" or not s.any():  # no noise: exactly the PSD projection
        return xp.maximum(w, 0.0)
    # Every shrinker is homogeneous (f(c w, c s) = c f(w, s)): each matrix is computed
    # in units of a power of two near its largest |w| or s, exactly, so that neither the
    # edge sqrt(2 d) s nor w + edge overflows for any finite input.
    big = np.maximum(_to_host(xp.abs(w).max(axis=-1)), s)
    unit = np.ldexp(1.0, np.frexp(np.where(big > 0, big, 1.0))[1] - 1)  # big / unit in [1, 2)
    w_in, w = w, w / xp.asarray(unit)[..., None]
    edge_h = np.sqrt(2.0 * d) * (s / unit)
    edge = xp.asarray(edge_h)[..., None]
    unit_d = xp.asarray(unit)[..., None]
    if method == "soft":
        return _noiseless_exact(xp, xp.maximum(w - edge, 0.0) * unit_d, w_in, s)
    if method == "spiked":
        # sqrt(w^2 - edge^2) as sqrt(w - edge) sqrt(w + edge): no square of a matrix's
        # eigenvalue, which overflows (or underflows) for clip norms far from 1.
        pos = xp.maximum(w, 0.0)
        shrunk = xp.sqrt(xp.maximum(pos - edge, 0.0)) * xp.sqrt(pos + edge)
        return _noiseless_exact(xp, shrunk * unit_d, w_in, s)
    # "rie": w - 2 sigma^2 Re g(w + i eta) with sigma^2 = edge^2 / 4, eta = edge / sqrt(d),
    # computed in units of the edge (u = w / edge): w - (edge / 2) R(u) with
    # R(u_i) = mean_j (u_i - u_j) / ((u_i - u_j)^2 + 1 / d), so no eigenvalue is squared
    # (clip norms far from 1 overflowed or gave 0/0); row blocks bound the (rows, d) work.
    # An edge so far below w that u overflows: those terms are 1 / (u_i - u_j) -> 0
    # (NaN from inf - inf set to 0), and |R| <= sqrt(d) / 2 keeps the shift finite.
    flat = w.reshape(-1, d)
    edge_f = edge_h.reshape(-1)
    out = xp.empty_like(flat)
    rows = max(1, _RIE_BLOCK_ELEMENTS // max(1, d))
    for b in range(flat.shape[0]):
        e = float(edge_f[b])
        if e == 0.0:
            out[b] = xp.maximum(flat[b], 0.0)
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            u = flat[b] / e
            for start in range(0, d, rows):
                diff = u[start : start + rows, None] - u[None, :]
                term = diff / (diff * diff + 1.0 / d)
                r = xp.where(xp.isnan(term), 0.0, term).sum(axis=1) / d
                out[b, start : start + rows] = flat[b, start : start + rows] - (0.5 * e) * r
    return _noiseless_exact(xp, xp.maximum(out, 0.0).reshape(w.shape) * unit_d, w_in, s)


def _noiseless_exact(xp, shrunk, w, s):
    """The matrices without noise (s = 0) exactly as max(w, 0): their eigenvalues far
    below the largest lost bits to the power-of-two units (w / unit underflowed)."""
    if s.all():
        return shrunk
    none = xp.asarray(s == 0)[..., None]
    return xp.where(none, xp.maximum(w, 0.0), shrunk)


def denoise_eigh(a, noise_std, method: str = "rie"):
    """Batched eigendecomposition of released symmetric matrices with shrunk eigenvalues.

    Parameters
    ----------
    a : array (..., d, d), float32 or float64, NumPy or CuPy. Only the lower triangle is
        read (it defines the symmetric matrix), as for :func:`cholesky_repair`.
    noise_std : float or array of shape ``a.shape[:-2]``
        The public diagonal noise std of each released matrix (0: no noise).
    method : one of :data:`DENOISE_METHODS` except "none"

    Returns
    -------
    w : float64 array (..., d): shrunk eigenvalues (>= 0), ascending order of the raw ones
    v : float64 array (..., d, d): eigenvectors (columns), same module as ``a``

    The eigendecomposition is :func:`batched_eigh` in float64: LAPACK ``syevd`` on the
    CPU, cuSOLVER on the GPU (the batched Jacobi ``syevjBatched`` for d <= 32, else one
    ``syevd`` per matrix). Post-processing: reads only the released matrix and the public std.
    """
    a, xp = _as_array(a, "a")
    d = a.shape[-1]
    batch_shape = tuple(a.shape[:-2])
    s = _check_noise_std(noise_std, math.prod(batch_shape)).reshape(batch_shape)
    if math.prod(batch_shape) == 0:  # an empty batch: nothing to decompose
        return xp.zeros(batch_shape + (d,)), xp.zeros(batch_shape + (d, d))
    lower = a.reshape(-1, d, d)
    if not bool(_to_host(_lower_finite(xp, lower)).all()):
        raise ValueError("a contains NaN or Inf in its lower triangle")
    w, v = batched_eigh(lower.astype(xp.float64))
    w = shrink_eigenvalues(w.reshape(batch_shape + (d,)), s, d, method)
    return w, v.reshape(batch_shape + (d, d))


def batched_eigh(a):
    """Eigendecomposition of a batch of symmetric matrices (lower triangle read).

    Parameters
    ----------
    a : array (b, d, d), NumPy or CuPy

    Returns
    -------
    w : (b, d) ascending eigenvalues; v : (b, d, d) eigenvectors (columns); a's dtype.

    CPU: NumPy's LAPACK ``syevd``, looped over the batch in C. GPU:
    :func:`dpfc_native._gpu_linalg.eigh` (cuSOLVER's batched Jacobi solver for small
    matrices, one divide-and-conquer call per matrix above).
    """
    from . import ops

    xp = ops.array_module(a)
    if xp is np:
        return np.linalg.eigh(a, UPLO="L")
    from . import _gpu_linalg

    return _gpu_linalg.eigh(a)


def eigh_solve(w, v, reg, b):
    """Solve ``(V diag(w) V^T + reg I) x = b`` from an eigendecomposition.

    Parameters
    ----------
    w : array (..., d) of eigenvalues >= 0 (e.g. from :func:`denoise_eigh`)
    v : array (..., d, d) of orthonormal eigenvectors
    reg : float >= 0, the ridge
    b : array (..., d, m) or (..., d) (when ``b.ndim == v.ndim - 1``); batch axes broadcast

    Returns
    -------
    x : float64 array shaped like ``b`` broadcast against the batch.

    Every denominator ``w + reg`` is floored at ``1e-6 x`` the largest one of its matrix
    (``1e-12`` for an all-zero matrix with ``reg = 0``), as :func:`cholesky_repair`'s
    "eig" floor: rank-deficient matrices without a ridge still give finite solutions.
    With ``reg > 0`` the floor is at most ``reg``, so for ``w >= 0`` the ridge alone
    bounds the denominators, as in a Cholesky solve of ``M + reg I`` (a small ridge on
    an ill-conditioned matrix is the user's choice, not overridden).
    """
    from . import ops

    xp = ops.array_module(v)
    reg = float(reg)
    if not math.isfinite(reg) or reg < 0:
        raise ValueError(f"reg must be finite and >= 0, got {reg!r}")
    den = w.astype(xp.float64) + reg
    floor = EIG_FLOOR_REL * den.max(axis=-1, keepdims=True)
    floor = xp.where(floor > 0, floor, _ZERO_MATRIX_FLOOR)
    if reg > 0:
        floor = xp.minimum(floor, reg)
    den = xp.maximum(den, floor)
    vector = b.ndim == v.ndim - 1
    bm = (b[..., None] if vector else b).astype(xp.float64)
    proj = xp.swapaxes(v, -1, -2) @ bm
    x = v @ (proj / den[..., :, None])
    return x[..., 0] if vector else x


def denoise(a, noise_std, method: str = "rie"):
    """The denoised matrices ``V diag(shrunk w) V^T`` (float64, symmetric, PSD).

    See :func:`denoise_eigh`; ``method="none"`` returns the symmetrised input in float64.
    """
    if method == "none":
        a, xp = _as_array(a, "a")
        return (
            _symmetric_from_lower(xp, a.reshape(-1, a.shape[-1], a.shape[-1]))
            .astype(xp.float64)
            .reshape(a.shape)
        )
    w, v = denoise_eigh(a, noise_std, method)
    from . import ops

    xp = ops.array_module(v)
    out = (v * w[..., None, :]) @ xp.swapaxes(v, -1, -2)
    return 0.5 * (out + xp.swapaxes(out, -1, -2))
