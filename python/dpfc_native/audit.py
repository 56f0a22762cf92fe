"""Empirical privacy audit of the Gaussian-mechanism releases (Jagielski et al. 2020;
Nasr et al. 2021, 2023).

An audit cannot prove privacy; it can only catch a violation. It plays the distinguishing
game the (epsilon, delta) guarantee bounds: a small fixed dataset ``D`` and ``D' = D + canary``
(one example added: add/remove adjacency), the mechanism run ``runs`` times on each, a
score per run, a threshold, and Clopper-Pearson confidence bounds on the true and false
positive rates. Any test satisfies ``TPR <= e^eps FPR + delta`` under an
(eps, delta)-DP mechanism, so::

    eps_lower = ln((TPR_lo - delta) / FPR_hi)

is a lower bound on the mechanism's true epsilon at the stated confidence. It must stay
at or below the claimed epsilon; a planted bug (noise std halved, clipping skipped) must
push it above.

What is audited is the implementation: the statistics are computed by the ops of
:mod:`dpfc_native.ops`, in one pass by default or, with ``leaf_rows=m``, through the exact
leaf reduction (:mod:`dpfc_native.reduction`, leaves of ``m`` rows: the summation the
estimators run), the noise is drawn by
:func:`dpfc_native.mechanisms.release_symmetric` / :func:`~dpfc_native.mechanisms.release_dense`
through a :class:`~dpfc_native.mechanisms.NoiseSource` (batched: one call releases all
``runs`` copies), and every release (name, shape, sensitivity, noise multiplier, count)
with the defaults it uses (bias, gradient clip) comes from the estimator's own release
plan (its ``noise_plan``: the code its ``fit`` runs), so the audit cannot certify a plan
the estimators no longer follow. The records of the releases made give the audit's
privacy ledger, built like a fitted estimator's ``privacy_``.

The canary
    A row along the direction least present in ``D`` (smallest eigenvector of ``X^T X``)
    with norm ``canary_norm`` (default ``4 C``: after clipping it has norm C, the worst
    case; an oversized canary also exposes a missing clip), labelled with a class that
    does not occur in ``D``.
The score
    The log-likelihood-ratio statistic of the Gaussian mean shift the canary causes,
    ``sum_r <out_r - f_r(D), f_r(D') - f_r(D)>_F / std_r^2`` over the releases ``r`` of the
    mechanism (the Frobenius inner product is the right one for the symmetric noise too:
    it equals the inner product of the vectorisations ``(G_ii, sqrt(2) G_ij)``). By
    Neyman-Pearson it is the most powerful test; the adversary knows ``D``, the canary and
    the implementation (white box). A black-box callable is scored with the plug-in
    version (means and variances estimated on the calibration runs).
The threshold
    Chosen, with the direction of the test, on a calibration quarter of the runs; the
    bounds are computed on the other runs (held out), so a single test is evaluated and the
    Clopper-Pearson bounds hold as stated (each one-sided at ``(1 - confidence) / 2``).

Seeds: ``seed=None`` draws OS entropy; an int makes the audit reproducible (that is what
the tests use, so they cannot flake).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Sequence

import numpy as np
from scipy import special as _special

from . import _validation as _v
from . import accounting, mechanisms, models, ops
from ._special import sigmoid

__all__ = [
    "AuditResult",
    "audit_mechanism",
    "audit_all",
    "MECHANISMS",
    "PLANTED_BUGS",
    "clopper_pearson",
    "register_cli",
]

#: Mechanisms that can be audited by name.
MECHANISMS = (
    "gram",  # the clipped Gram / DP-FC covariance alone, calibrated to (eps, delta)
    "class_sums",  # the clipped class sums alone
    "ls_statistics",  # DP-LS (global): Gram and class sums, the estimator's budget split
    "fc_gradient",  # one DP-FC clipped gradient sum alone
    "fc_statistics",  # DP-FC: covariance plus `steps` gradient releases (the plan)
    "newton_statistics",  # DP Newton: `steps` x (Hessians, gradients) at W = 0
    "ls_per_class_statistics",  # per-class DP-LS: class grams, Gram and class sums
    "sgd_gradients",  # full-batch DP-SGD: `steps` clipped softmax gradients at W = 0
)
#: Deliberate bugs the audit must detect.
PLANTED_BUGS = (None, "half_noise", "no_clip")
#: Per mechanism: the estimator whose release plan (its ``noise_plan``, the code its
#: ``fit`` runs) gives the releases, the one release audited alone (None: every release
#: of the plan, as a fit makes them) and the estimator's parameters besides the claim.
#: DP-SGD is audited full-batch (its default): a Poisson-subsampled release is a mixture
#: of Gaussians, which this score (the likelihood ratio of a Gaussian mean shift) does
#: not model.
_PLANS = {
    "gram": (models.DPLeastSquaresClassifier, "gram", {}),
    "class_sums": (models.DPLeastSquaresClassifier, "class_sums", {}),
    "ls_statistics": (models.DPLeastSquaresClassifier, None, {}),
    "fc_gradient": (models.DPFCClassifier, "gradient", {}),
    "fc_statistics": (models.DPFCClassifier, None, {}),
    "newton_statistics": (models.DPNewtonClassifier, None, {}),
    "ls_per_class_statistics": (models.DPLeastSquaresClassifier, None, {"variant": "per_class"}),
    "sgd_gradients": (models.DPSGDClassifier, None, {"sample_rate": 1.0}),
}
assert tuple(_PLANS) == MECHANISMS
_CALIBRATION_FRACTION = 0.25  # runs used to choose the threshold (the rest are held out)


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Outcome of one audit.

    Attributes
    ----------
    mechanism : str
    epsilon, delta : float
        The claim audited (add/remove adjacency).
    eps_lower : float
        Empirical lower bound on epsilon at ``confidence`` (0 when no test beats delta).
    tpr_lower, fpr_upper : float
        Clopper-Pearson bounds (held-out runs) at the chosen threshold.
    tpr, fpr : float
        Point estimates there.
    threshold : float
        Score threshold; ``direction`` is ``"canary_in"`` (positive: score > threshold
        means the canary is present) or ``"canary_out"`` (the reverse test).
    runs : int
        Runs per world (with and without the canary); three quarters are held out.
    confidence : float
    planted_bug : str or None
    noise_multipliers, sensitivities : tuple of float
        Per release, as calibrated and declared (before any planted bug).
    release_names, release_shapes : tuple
        Per release: its name and the shape of the released array.
    ledger : PrivacyLedger or None
        The privacy ledger of one run of the mechanism, built from the records of the
        releases as made (a planted ``half_noise`` shows as halved multipliers), by the
        code that builds a fitted estimator's ``privacy_``; None for a callable.
    canary_norm : float
    backend : str
        ``"native"`` (the mechanisms' Philox noise) or ``"numpy"`` (NumPy's generator).
    leaf_rows : int or None
        The statistics were summed through the exact leaf reduction with leaves of this
        many rows (None: the ops' one pass).
    passed : bool
        ``eps_lower <= epsilon``: no violation found.
    """

    mechanism: str
    epsilon: float
    delta: float
    eps_lower: float
    tpr_lower: float
    fpr_upper: float
    tpr: float
    fpr: float
    threshold: float
    direction: str
    runs: int
    confidence: float
    planted_bug: str | None
    noise_multipliers: tuple
    sensitivities: tuple
    canary_norm: float
    backend: str
    passed: bool
    release_names: tuple = ()
    release_shapes: tuple = ()
    ledger: accounting.PrivacyLedger | None = None
    leaf_rows: int | None = None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["ledger"] = None if self.ledger is None else self.ledger.to_dict()
        return out

    def __str__(self) -> str:
        bug = f", planted bug {self.planted_bug}" if self.planted_bug else ""
        verdict = "no violation found" if self.passed else "VIOLATION: eps_lower > claimed"
        return (
            f"audit {self.mechanism}{bug}: claimed eps={self.epsilon:g} (delta={self.delta:g}), "
            f"eps_lower={self.eps_lower:.3f} at {self.confidence:.0%} "
            f"[TPR>={self.tpr_lower:.4g}, FPR<={self.fpr_upper:.4g}, {self.runs} runs/world]: "
            f"{verdict}"
        )


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


def _cp_lower(k, n, alpha):
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(all="ignore"):
        lo = _special.betaincinv(np.maximum(k, 1e-300), n - k + 1, alpha)
    return np.where(k > 0, lo, 0.0)


def _cp_upper(k, n, alpha):
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(all="ignore"):
        hi = _special.betaincinv(k + 1, np.maximum(n - k, 1e-300), 1.0 - alpha)
    return np.where(k < n, hi, 1.0)


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided Clopper-Pearson bounds ``(lower, upper)`` on a binomial proportion
    ``k / n``, each holding with probability at least ``1 - alpha``."""
    if isinstance(k, bool) or isinstance(n, bool) or not 0 <= int(k) <= int(n) or int(n) < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k!r}, n={n!r}")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(_cp_lower(k, n, alpha)), float(_cp_upper(k, n, alpha))


def _eps_from_bounds(tpr_lo, fpr_hi, delta):
    """``max(0, ln((TPR_lo - delta) / FPR_hi))`` elementwise (0 where TPR_lo <= delta)."""
    tpr_lo, fpr_hi = np.asarray(tpr_lo, dtype=np.float64), np.asarray(fpr_hi, dtype=np.float64)
    with np.errstate(all="ignore"):
        eps = np.log((tpr_lo - delta) / fpr_hi)
    return np.where((tpr_lo > delta) & (fpr_hi > 0), np.maximum(eps, 0.0), 0.0)


def _counts_above(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return sorted_scores.size - np.searchsorted(sorted_scores, thresholds, side="right")


def _candidate_thresholds(pooled: np.ndarray) -> np.ndarray:
    # Dense in the tails, where the largest TPR/FPR ratios live.
    tail = np.logspace(-6, np.log10(0.5), 300)
    probs = np.unique(np.concatenate([tail, 1.0 - tail, np.linspace(0, 1, 201)]))
    return np.unique(np.quantile(pooled, probs))


def _rates(s0, s1, thresholds):
    """(k_tp, n_tp, k_fp, n_fp) for both test directions, per threshold."""
    a0, a1 = np.sort(s0), np.sort(s1)
    c0, c1 = _counts_above(a0, thresholds), _counts_above(a1, thresholds)
    n0, n1 = s0.size, s1.size
    # canary_in: positives are runs on D' scoring above t; false positives the runs on D.
    # canary_out: the reverse test (the other direction of the privacy loss).
    return {"canary_in": (c1, n1, c0, n0), "canary_out": (n0 - c0, n0, n1 - c1, n1)}


def _best_threshold(s0: np.ndarray, s1: np.ndarray, delta: float, alpha: float, holdout: int):
    """(threshold, direction) maximising the eps bound that the rates seen on the
    calibration runs (s0, s1) would give on ``holdout`` held-out runs per world."""
    cands = _candidate_thresholds(np.concatenate([s0, s1]))
    best = (-1.0, float(cands[0]), "canary_in")
    for direction, (k_tp, n_tp, k_fp, n_fp) in _rates(s0, s1, cands).items():
        # Project the calibration rates onto the held-out size (a pessimistic +1 on the
        # false positives keeps thresholds with no calibration false positive honest).
        tp = np.floor(k_tp / n_tp * holdout)
        fp = np.minimum(np.ceil((k_fp + 1) / n_fp * holdout), holdout)
        eps = _eps_from_bounds(_cp_lower(tp, holdout, alpha), _cp_upper(fp, holdout, alpha), delta)
        i = int(np.argmax(eps))
        if eps[i] > best[0]:
            best = (float(eps[i]), float(cands[i]), direction)
    return best[1], best[2]


def _evaluate(s0, s1, threshold, direction, delta, alpha):
    k_tp, n_tp, k_fp, n_fp = (
        int(np.asarray(v).reshape(-1)[0]) for v in _rates(s0, s1, np.array([threshold]))[direction]
    )
    tpr_lo = float(_cp_lower(k_tp, n_tp, alpha))
    fpr_hi = float(_cp_upper(k_fp, n_fp, alpha))
    eps = float(_eps_from_bounds(tpr_lo, fpr_hi, delta))
    return eps, tpr_lo, fpr_hi, k_tp / n_tp, k_fp / n_fp


# --------------------------------------------------------------------------------------
# The mechanisms under audit
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Release:
    name: str
    stat: Callable[[np.ndarray, np.ndarray], np.ndarray]
    sensitivity: float
    noise_multiplier: float
    kind: str  # "sym" or "dense"
    shape: tuple


def _unclipped_gram(X):
    x = np.asarray(X, dtype=np.float64)
    return x.T @ x


def _unclipped_sums(X, y, k):
    out = np.zeros((k, X.shape[1]))
    np.add.at(out, y, np.asarray(X, dtype=np.float64))
    return out


def _unclipped_class_grams(X, y, k):
    x = np.asarray(X, dtype=np.float64)
    return np.stack([x[y == c].T @ x[y == c] for c in range(k)])


def _statistic(name: str, defaults: dict, k: int, C: float, no_clip: bool, loss: str, leaf_rows):
    """The statistic a fit releases under ``name``, at ``W = 0`` (the first step), with
    the plan's bias and gradient clip and the estimator's loss; ``no_clip``: every clip
    skipped (a planted bug); ``leaf_rows``: summed by the ops through the exact leaf
    reduction (None: one pass)."""
    bias = float(defaults.get("bias", 0.0))
    lr = {"leaf_rows": leaf_rows}
    if name in ("gram", "covariance"):
        return (
            (lambda X, y: _unclipped_gram(X))
            if no_clip
            else (lambda X, y: ops.clipped_gram(X, C, **lr))
        )
    if name == "class_sums":
        return (
            (lambda X, y: _unclipped_sums(X, y, k))
            if no_clip
            else (lambda X, y: ops.clipped_class_sums(X, y, k, C, **lr))
        )
    if name == "class_grams":  # per-class DP-LS
        return (
            (lambda X, y: _unclipped_class_grams(X, y, k))
            if no_clip
            else (lambda X, y: ops.clipped_class_grams(X, y, k, C, **lr))
        )
    if name == "hessians":  # DP Newton's per-class weighted grams, weights sigmoid'(bias)
        s = float(sigmoid(bias))
        w = min(s * (1.0 - s), 0.25)

        def hessians(X, y):
            weights = np.full((X.shape[0], k), w)
            if no_clip:
                x = np.asarray(X, dtype=np.float64)
                return np.stack([x.T @ (x * weights[:, [c]]) for c in range(k)])
            return ops.clipped_weighted_grams(X, weights, C, **lr)

        return hessians
    if name in ("gradient", "gradients"):
        cg = float(defaults["grad_clip_norm"])
        # DP-FC and DP-SGD clip the rows to C inside the gradient; DP Newton's rows are
        # already clipped and it releases K times the K-averaged loss's gradient.
        feature_clip, scale = (C, 1.0) if name == "gradient" else (None, float(k))

        def gradient(X, y):
            w = np.zeros((k, X.shape[1]))
            if no_clip:  # neither the feature clip nor the gradient clip
                g, _ = ops.clipped_linear_grad(X, y, w, bias, 1e300, loss=loss, **lr)
            else:
                g, _ = ops.clipped_linear_grad(
                    X, y, w, bias, cg, loss=loss, feature_clip=feature_clip, **lr
                )
            return g * scale if scale != 1.0 else g

        return gradient
    raise AssertionError(f"no audit statistic for the release {name!r}")  # pragma: no cover


def _releases(
    mechanism: str,
    epsilon: float,
    delta: float,
    n: int,
    d: int,
    k: int,
    C: float,
    steps: int,
    bug: str | None,
    leaf_rows: int | None = None,
) -> list[_Release]:
    """The mechanism's releases in the order a fit makes them, from the estimator's plan.

    Names, shapes, sensitivities, multipliers, counts, the bias and the gradient clip all
    come from the plan; only the statistics are computed here (by :mod:`dpfc_native.ops`).
    """
    if mechanism not in _PLANS:
        raise ValueError(f"mechanism must be one of {MECHANISMS} or a callable, got {mechanism!r}")
    cls, alone, fixed = _PLANS[mechanism]
    params = {"epsilon": epsilon, "delta": delta, "clip_norm": C, **fixed}
    defaults = cls().get_params()
    if "steps" in defaults:
        params["steps"] = steps
    loss = str(defaults.get("loss", "sigmoid"))  # DP-SGD's default is softmax
    plan = cls(**params).noise_plan(n, d, k)
    planned = list(plan.releases)
    if alone is not None:
        # One release spending the whole budget alone.
        planned = [
            dataclasses.replace(
                r,
                count=1,
                noise_multiplier=(accounting.calibrate_noise_multiplier(epsilon, delta, 1)),
            )
            for r in planned
            if r.name == alone
        ]
    made = {
        r.name: _Release(
            r.name,
            _statistic(r.name, plan.defaults, k, C, bug == "no_clip", loss, leaf_rows),
            r.sensitivity,
            r.noise_multiplier,
            "sym" if r.symmetric else "dense",
            r.shape,
        )
        for r in planned
    }
    # A fit makes its one-off releases first, then the per-step ones step by step.
    steps_made = max(r.count for r in planned)
    return [made[r.name] for r in planned if r.count == 1] + [
        made[r.name] for t in range(steps_made) for r in planned if t < r.count > 1
    ]


def _audit_dataset(n: int, d: int, k: int, C: float, canary_norm: float):
    """A fixed public dataset D (rows of norm around C, classes 0..k-2) and the canary."""
    rng = np.random.default_rng(20231113)
    X = rng.standard_normal((n, d)) * (C / math.sqrt(d)) * rng.uniform(0.5, 2.0, size=(n, 1))
    y = rng.integers(0, max(1, k - 1), size=n)
    _, vecs = np.linalg.eigh(X.T @ X)
    canary = vecs[:, 0] * canary_norm
    canary_label = k - 1  # a class that never occurs in D
    return X, y.astype(np.int64), canary, canary_label


def _noisy_runs(
    stat: np.ndarray, release: _Release, std_factor: float, runs: int, source, backend: str, rng
):
    """`runs` noisy copies of `stat` through the mechanism's release path, and the ledger
    record of one copy."""
    stacked = np.broadcast_to(stat, (runs,) + stat.shape).copy()
    z = release.noise_multiplier * std_factor
    if backend == "native":
        fn = mechanisms.release_symmetric if release.kind == "sym" else mechanisms.release_dense
        # A (runs, ...) statistic is released as a batch: every copy gets fresh noise
        # from disjoint counter blocks of the source's key.
        flat = stacked.reshape((-1,) + stat.shape[-2:]) if release.kind == "sym" else stacked
        noisy, record = fn(flat, release.sensitivity, z, source, release.name)
        return noisy.reshape(stacked.shape), record
    std = z * release.sensitivity
    record = accounting.GaussianRelease.from_std(std, release.sensitivity, name=release.name)
    if release.kind == "sym":
        d = stat.shape[-1]
        # One draw per off-diagonal pair, mirrored: variance std^2/2 (adding the draws'
        # transpose summed two draws, std^2: a reference more private than the mechanism)
        lower = np.tril(rng.standard_normal(stacked.shape) * (std / math.sqrt(2.0)), -1)
        noise = lower + np.swapaxes(lower, -1, -2)
        idx = np.arange(d)
        # ... diagonal std^2 (every matrix of a batch: (runs, d) or (runs, K, d) draws)
        noise[..., idx, idx] = rng.standard_normal(stacked.shape[:-1]) * std
        return stacked + noise, record
    return stacked + rng.standard_normal(stacked.shape) * std, record


# --------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------


def _check_args(
    epsilon,
    delta,
    runs,
    d,
    n,
    confidence,
    planted_bug,
    seed,
    backend,
    steps,
    k,
    clip_norm,
    canary_norm,
    leaf_rows,
):
    """The audit's arguments by the package's one set of rules (:mod:`._validation`)."""
    eps = _v.positive(epsilon, "epsilon")
    dl = _v.share(delta, "delta")
    runs = _v.integer(runs, "runs", 200)
    d, n, steps = _v.integer(d, "d", 1), _v.integer(n, "n", 1), _v.integer(steps, "steps", 1)
    k = _v.integer(k, "num_classes", 2)
    conf = _v.interval(confidence, "confidence", 0.5, 1.0, closed="left")
    _v.choice(planted_bug, "planted_bug", PLANTED_BUGS)
    _v.seed(seed, "seed")
    _v.choice(backend, "backend", ("native", "numpy"))
    c = _v.positive(clip_norm, "clip_norm")
    cn = 4.0 * c if canary_norm is None else _v.positive(canary_norm, "canary_norm")
    leaf = None if leaf_rows is None else _v.integer(leaf_rows, "leaf_rows", 1)
    return eps, dl, runs, d, n, conf, steps, k, c, cn, leaf


def audit_mechanism(
    mechanism: str | Callable[..., Any],
    epsilon: float,
    delta: float = 1e-5,
    *,
    runs: int = 100_000,
    d: int = 8,
    num_classes: int = 4,
    n: int = 64,
    steps: int = 3,
    clip_norm: float = 1.0,
    canary_norm: float | None = None,
    planted_bug: str | None = None,
    confidence: float = 0.95,
    seed: int | None = None,
    backend: str = "native",
    leaf_rows: int | None = None,
) -> AuditResult:
    """Empirical lower bound on the epsilon of one mechanism's releases.

    Parameters
    ----------
    mechanism : str or callable
        A name from :data:`MECHANISMS` (calibrated to ``(epsilon, delta)`` exactly as the
        estimators calibrate it), or a callable ``release(X, y, runs) -> array (runs, ...)``
        returning ``runs`` independent noisy releases of a black-box mechanism on the
        dataset ``(X, y)`` (``X`` float64 (n', d), ``y`` int64 labels in ``0..num_classes-1``).
    epsilon : float > 0
        The claimed epsilon (add/remove adjacency).
    delta : float in (0, 1)
    runs : int >= 200
        Runs per world (with and without the canary); a quarter calibrate the threshold,
        the rest are held out for the bounds.
    d, num_classes, n : int
        Shape of the fixed audit dataset D (n rows).
    steps : int
        Releases of the iterative mechanisms (``fc_statistics``, ``newton_statistics``).
    clip_norm : float > 0
        C.
    canary_norm : float or None
        Norm of the canary row (default ``4 C``).
    planted_bug : {None, "half_noise", "no_clip"}
        Audit a deliberately broken variant: the noise std halved with the claim
        unchanged, or the statistics computed without clipping.
    confidence : float in [0.5, 1)
        Confidence of the bound (95% by default).
    seed : int or None
        None: OS entropy (noise key and threshold split). An int: reproducible.
    backend : {"native", "numpy"}
        "native": noise through :mod:`dpfc_native.mechanisms` (the implementation under
        audit); "numpy": NumPy's generator (a reference for the audit itself).
    leaf_rows : int >= 1 or None
        Sum the statistics through the exact leaf reduction, leaves of this many rows
        (the estimators' summation); None: the ops' one pass. Named mechanisms only.

    Returns
    -------
    AuditResult
    """
    eps, dl, runs, d, n, conf, steps, k, C, cn, leaf = _check_args(
        epsilon,
        delta,
        runs,
        d,
        n,
        confidence,
        planted_bug,
        seed,
        backend,
        steps,
        num_classes,
        clip_norm,
        canary_norm,
        leaf_rows,
    )
    alpha = (1.0 - conf) / 2.0  # two one-sided bounds (TPR below, FPR above)
    X, y, canary, canary_label = _audit_dataset(n, d, k, C, cn)
    X1 = np.concatenate([X, canary[None, :]])
    y1 = np.concatenate([y, [canary_label]]).astype(np.int64)
    source = mechanisms.NoiseSource(seed)
    cal = max(1, int(round(runs * _CALIBRATION_FRACTION)))
    rng = np.random.default_rng(None if seed is None else [int(seed), 0xA0D1])

    if callable(mechanism):
        if planted_bug is not None or leaf is not None:
            raise ValueError("planted_bug and leaf_rows apply to named mechanisms only")
        name = getattr(mechanism, "__name__", "callable")
        out0 = np.asarray(mechanism(X, y, runs), dtype=np.float64).reshape(runs, -1)
        out1 = np.asarray(mechanism(X1, y1, runs), dtype=np.float64).reshape(runs, -1)
        if not (np.isfinite(out0).all() and np.isfinite(out1).all()):
            raise ValueError("the mechanism returned NaN or Inf")
        # Plug-in score, estimated on the calibration runs only.
        m0, m1 = out0[:cal].mean(axis=0), out1[:cal].mean(axis=0)
        var = 0.5 * (out0[:cal].var(axis=0) + out1[:cal].var(axis=0))
        w = (m1 - m0) / np.where(var > 0, var, 1.0)
        s0, s1 = (out0 - m0) @ w, (out1 - m0) @ w
        zs, sens, names, shapes, ledger = (), (), (), (), None
    else:
        if not isinstance(mechanism, str):
            raise TypeError(
                f"mechanism must be a name or a callable, got {type(mechanism).__name__}"
            )
        name = mechanism
        rels = _releases(mechanism, eps, dl, n, d, k, C, steps, planted_bug, leaf)
        std_factor = 0.5 if planted_bug == "half_noise" else 1.0
        s0 = np.zeros(runs)
        s1 = np.zeros(runs)
        records = []
        for rel in rels:
            f0 = np.asarray(rel.stat(X, y), dtype=np.float64)
            f1 = np.asarray(rel.stat(X1, y1), dtype=np.float64)
            shift = f1 - f0
            # The adversary's score uses the declared noise: a planted bug is not known to it.
            std2 = (rel.noise_multiplier * rel.sensitivity) ** 2
            axes = tuple(range(1, f0.ndim + 1))
            for f, s in ((f0, s0), (f1, s1)):
                noisy, record = _noisy_runs(f, rel, std_factor, runs, source, backend, rng)
                s += np.sum((noisy - f0) * shift, axis=axes) / std2
            records.append(record)  # one record per release of one run (either world)
        zs = tuple(float(r.noise_multiplier) for r in rels)
        sens = tuple(float(r.sensitivity) for r in rels)
        names = tuple(r.name for r in rels)
        shapes = tuple(r.shape for r in rels)
        ledger = models._ledger(records, dl, eps)

    # Threshold and direction on the first quarter of the (i.i.d.) runs, bounds on the
    # rest (held out): one test is evaluated, on data it was not chosen on.
    cal0, hold0 = s0[:cal], s0[cal:]
    cal1, hold1 = s1[:cal], s1[cal:]
    threshold, direction = _best_threshold(cal0, cal1, dl, alpha, hold0.size)
    eps_lower, tpr_lo, fpr_hi, tpr, fpr = _evaluate(hold0, hold1, threshold, direction, dl, alpha)
    return AuditResult(
        mechanism=name,
        epsilon=eps,
        delta=dl,
        eps_lower=float(eps_lower),
        tpr_lower=float(tpr_lo),
        fpr_upper=float(fpr_hi),
        tpr=float(tpr),
        fpr=float(fpr),
        threshold=float(threshold),
        direction=direction,
        runs=runs,
        confidence=conf,
        planted_bug=planted_bug,
        noise_multipliers=zs,
        sensitivities=sens,
        canary_norm=float(cn),
        backend=backend,
        passed=bool(eps_lower <= eps),
        release_names=names,
        release_shapes=shapes,
        ledger=ledger,
        leaf_rows=leaf,
    )


def audit_all(
    epsilons: Sequence[float] = (1.0, 4.0),
    delta: float = 1e-5,
    *,
    mechanism_names: Sequence[str] = MECHANISMS,
    planted_bugs: Sequence[str | None] = PLANTED_BUGS,
    **kwargs,
) -> list[AuditResult]:
    """Every (mechanism, epsilon, planted bug) combination; keyword arguments go to
    :func:`audit_mechanism`."""
    out = []
    for mech in mechanism_names:
        for eps in epsilons:
            for bug in planted_bugs:
                out.append(audit_mechanism(mech, eps, delta, planted_bug=bug, **kwargs))
    return out


# --------------------------------------------------------------------------------------
# CLI: `dpfc audit`
# --------------------------------------------------------------------------------------


def _expected(result: AuditResult) -> bool:
    """A correct mechanism must pass; a planted bug must be detected."""
    return result.passed if result.planted_bug is None else not result.passed


def register_cli(app) -> None:
    """Add the ``audit`` command to a typer application (``dpfc audit``)."""
    import typer

    from .cli import _user_errors

    @app.command("audit")
    @_user_errors
    def audit_command(
        mechanism: str = typer.Option(
            "ls_statistics", "--mechanism", "-m", help=f"One of {', '.join(MECHANISMS)}, or 'all'."
        ),
        epsilon: list[float] = typer.Option(
            [1.0, 4.0], "--epsilon", "-e", help="Claimed epsilon (repeatable)."
        ),
        delta: float = typer.Option(1e-5, "--delta", help="Claimed delta, in (0, 1)."),
        runs: int = typer.Option(100_000, "--runs", help="Runs per world (with/without canary)."),
        d: int = typer.Option(8, "--dim", "-d", help="Feature dimension of the audit dataset."),
        steps: int = typer.Option(3, "--steps", help="Releases of the iterative mechanisms."),
        planted_bug: str = typer.Option(
            "none",
            "--planted-bug",
            help="none, half_noise, no_clip, or all (audit the broken variants too).",
        ),
        seed: int = typer.Option(None, "--seed", help="Reproducible audit (default: OS entropy)."),
        backend: str = typer.Option("native", "--backend", help="native or numpy noise."),
        leaf_rows: int = typer.Option(
            None,
            "--leaf-rows",
            help="Sum the statistics through the exact leaf reduction, leaves of this many "
            "rows (the estimators' summation; default: one pass).",
        ),
        json_out: str = typer.Option(None, "--json", help="Write the results as JSON here."),
        force: bool = typer.Option(False, "--force", help="Overwrite an existing --json file."),
    ):
        """Empirical privacy audit: canary, Clopper-Pearson bounds, eps_lower per mechanism.

        Exit status 0 when every correct mechanism passes (eps_lower <= claimed) and every
        planted bug is detected; 1 otherwise; 2 for bad arguments.
        """
        mechs = list(MECHANISMS) if mechanism == "all" else [mechanism]
        for m in mechs:
            if m not in MECHANISMS:
                typer.echo(
                    f"Error: --mechanism must be one of {', '.join(MECHANISMS)} or "
                    f"'all', got {m!r}",
                    err=True,
                )
                raise typer.Exit(2)
        bug_names = {
            "none": [None],
            "half_noise": ["half_noise"],
            "no_clip": ["no_clip"],
            "all": list(PLANTED_BUGS),
        }
        if planted_bug not in bug_names:
            typer.echo(
                "Error: --planted-bug must be none, half_noise, no_clip or all, got "
                f"{planted_bug!r}",
                err=True,
            )
            raise typer.Exit(2)
        from ._progress import progress
        from .cli import _fail, _output_path

        if seed is not None and seed < 0:
            _fail(f"--seed must be >= 0, got {seed}")
        if leaf_rows is not None and leaf_rows < 1:
            _fail(f"--leaf-rows must be >= 1, got {leaf_rows}")
        if json_out is not None:  # checked before the audit runs (minutes), not after
            json_out = _output_path(json_out, force, suffix="", flag="--json")
        results = []
        try:
            with progress(len(mechs) * len(epsilon) * len(bug_names[planted_bug]), "audit") as bar:
                for m in mechs:
                    for eps in epsilon:
                        for bug in bug_names[planted_bug]:
                            results.append(
                                audit_mechanism(
                                    m,
                                    eps,
                                    delta,
                                    runs=runs,
                                    d=d,
                                    steps=steps,
                                    planted_bug=bug,
                                    seed=seed,
                                    backend=backend,
                                    leaf_rows=leaf_rows,
                                )
                            )
                            bar.advance(f"{m} eps={eps:g} bug={bug or 'none'}")
        except (TypeError, ValueError) as exc:
            _fail(str(exc))
        try:
            from rich.console import Console
            from rich.table import Table

            table = Table(
                title=f"dpfc audit (delta={delta:g}, {runs} runs per world, 95% Clopper-Pearson)"
            )
            for col in (
                "mechanism",
                "planted bug",
                "claimed eps",
                "eps_lower",
                "TPR >=",
                "FPR <=",
                "verdict",
            ):
                table.add_column(col)
            for r in results:
                verdict = (
                    ("ok" if r.passed else "VIOLATION")
                    if r.planted_bug is None
                    else ("detected" if not r.passed else "NOT detected")
                )
                table.add_row(
                    r.mechanism,
                    r.planted_bug or "-",
                    f"{r.epsilon:g}",
                    f"{r.eps_lower:.3f}",
                    f"{r.tpr_lower:.4g}",
                    f"{r.fpr_upper:.4g}",
                    verdict,
                )
            Console().print(table)
        except ImportError:  # pragma: no cover - rich is a dependency
            for r in results:
                typer.echo(str(r))
        if json_out:
            from ._fileio import atomic_write

            try:
                with atomic_write(json_out) as fh:
                    json.dump([r.to_dict() for r in results], fh, indent=2)
            except OSError as exc:
                _fail(f"cannot write {json_out}: {exc}")
        if not all(_expected(r) for r in results):
            raise typer.Exit(1)
