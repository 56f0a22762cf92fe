"""Tuning without leaking: a privacy budget shared across fits, and private selection.

Fitting many times on the same private data spends the budget many times: a grid search
of 20 fits at epsilon = 1 each is not a 1-DP model. Three safe paths, from free to paid:

1. **Sweeps on a public validation split (free).** The estimators accept lists for the
   hyper-parameters they have among ``reg``, ``lr`` and ``alpha`` (DP-SGD: ``lr``;
   ``alpha``: per-class DP-LS) and a *public* ``X_val, y_val``: all candidates are
   computed from the same released statistics and the choice is post-processing, so
   ``privacy_`` is that of a single fit.
2. **A shared** :class:`PrivacyBudget`. Pass ``budget=PrivacyBudget(epsilon, delta)`` to
   the estimators: every fit (including the clones made by scikit-learn's
   ``GridSearchCV``, ``cross_val_score`` or ``CalibratedClassifierCV``, which share the
   budget by reference) composes its releases into one accountant, and a fit that would
   take the total above the budget is refused *before* any noise is drawn. This bounds
   what the fitted models reveal; the scores that those tools compute on private folds
   (and the choice of the best candidate, or a calibrator fitted on private
   predictions) are further, unaccounted uses of the private data.
3. **Private selection** (:class:`PrivateSelector`) when there is no public validation
   split: a candidate grid is searched by the random-stopping algorithm of Papernot and
   Steinke (2022), scores included, and the total cost is proven and recorded.

Adjacency is add/remove one example throughout (as everywhere in the package).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import secrets
import threading
import warnings

import numpy as np
from scipy import optimize

from . import _validation, accounting, mechanisms
from ._errors import PrivacyWarning

__all__ = [
    "PrivacyBudget",
    "PrivacyBudgetExceeded",
    "PrivateSelector",
    "RepeatAndSelect",
    "truncated_negative_binomial_pmf",
    "truncated_negative_binomial_mean",
    "truncated_negative_binomial_gamma",
    "sample_repetitions",
    "selection_rdp",
    "selection_epsilon",
    "calibrate_selection_mu",
]


class PrivacyBudgetExceeded(RuntimeError):
    """A fit was refused: its releases would take the shared budget above its total.

    Raised before any noise is drawn or any statistic computed, so the refused fit
    spent nothing.
    """


# ---------------------------------------------------------------------------------------
# RDP -> (epsilon, delta) for an arbitrary RDP curve, minimised over the order
# ---------------------------------------------------------------------------------------

# log(lambda - 1) bounds of the order search: lambda in (1 + 1e-4, 1 + 1e7).
_LOG_ORDER_RANGE = (math.log(1e-4), math.log(1e7))


def _convert(rdp: float, lam: float, log_delta: float) -> float:
    """The improved RDP -> (eps, delta) conversion (Canonne, Kamath and Steinke 2020;
    Balle et al. 2020, Thm. 21): ``eps = rdp + log((lam - 1)/lam) - (log delta + log lam)
    / (lam - 1)``, valid at every order ``lam > 1``."""
    return rdp + math.log1p(-1.0 / lam) - (log_delta + math.log(lam)) / (lam - 1.0)


def _min_over_orders(rdp_at, delta: float) -> tuple[float, float]:
    """``(epsilon, order)``: the conversion minimised over ``lambda > 1``.

    A log-spaced grid of 400 orders, then a bounded Brent refinement around the best grid
    point. Every order gives a valid bound, so the search only has to be good, not exact:
    the value returned is the bound *at the order returned*.
    """
    log_delta = math.log(delta)

    def f(t):
        lam = 1.0 + math.exp(t)
        v = _convert(rdp_at(lam), lam, log_delta)
        return v if math.isfinite(v) else math.inf

    grid = np.linspace(*_LOG_ORDER_RANGE, 400)
    vals = [f(t) for t in grid]
    i = int(np.argmin(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best_t, best = grid[i], vals[i]
    if hi > lo:
        res = optimize.minimize_scalar(
            f, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10}
        )
        if res.fun < best:
            best_t, best = float(res.x), float(res.fun)
    return max(0.0, best), 1.0 + math.exp(best_t)


# ---------------------------------------------------------------------------------------
# The truncated negative binomial distribution of the number of repetitions
# ---------------------------------------------------------------------------------------


def _check_shape(shape) -> float:
    return _validation.nonneg(shape, "shape")


def _check_gamma(gamma) -> float:
    return _validation.share(gamma, "gamma")


def _check_epsilon(epsilon) -> float:
    return _validation.positive(epsilon, "epsilon", allow_inf=True)


def _check_delta(delta) -> float:
    return _validation.share(delta, "delta")


def truncated_negative_binomial_pmf(k, shape: float, gamma: float) -> np.ndarray:
    """``P[K = k]`` of the truncated negative binomial ``D_{eta, gamma}`` (k >= 1).

    ``shape = eta > 0``: ``(1 - gamma)^k / (gamma^-eta - 1) * prod_{l<k} (l + eta)/(l + 1)``
    (a negative binomial conditioned on ``K >= 1``; ``eta = 1`` is the geometric
    distribution ``gamma (1 - gamma)^(k-1)``). ``eta = 0``: the logarithmic distribution
    ``(1 - gamma)^k / (k log(1/gamma))``. Zero for ``k < 1``.
    """
    eta, g = _check_shape(shape), _check_gamma(gamma)
    k = np.asarray(k, dtype=np.float64)
    out = np.zeros(k.shape)
    ok = k >= 1
    kk = k[ok]
    if eta == 0.0:
        logp = kk * math.log1p(-g) - np.log(kk) - math.log(-math.log(g))
    else:
        from scipy.special import gammaln

        logp = (
            kk * math.log1p(-g)
            + gammaln(kk + eta)
            - gammaln(eta)
            - gammaln(kk + 1.0)
            - math.log(math.expm1(-eta * math.log(g)))
        )
    out[ok] = np.exp(logp)
    return out


def truncated_negative_binomial_mean(shape: float, gamma: float) -> float:
    """``E[K]``: ``eta (1 - gamma) / (gamma (1 - gamma^eta))``, or
    ``(1 - gamma) / (gamma log(1/gamma))`` for ``eta = 0``."""
    eta, g = _check_shape(shape), _check_gamma(gamma)
    if eta == 0.0:
        return (1.0 - g) / (g * -math.log(g))
    return eta * (1.0 - g) / (g * -math.expm1(eta * math.log(g)))


def truncated_negative_binomial_gamma(shape: float, mean: float) -> float:
    """The ``gamma`` in (0, 1) whose distribution ``D_{shape, gamma}`` has mean ``mean``
    (> 1; the mean falls from infinity to 1 as gamma goes from 0 to 1)."""
    eta = _check_shape(shape)
    m = _validation.real(mean, "mean_repetitions")
    if not (m > 1.0 and math.isfinite(m)):
        raise ValueError(f"mean_repetitions must be finite and > 1, got {mean!r}")

    def f(log_g):
        return math.log(truncated_negative_binomial_mean(eta, math.exp(log_g))) - math.log(m)

    lo, hi = math.log(1e-15), math.log1p(-1e-12)
    return math.exp(optimize.brentq(f, lo, hi, xtol=1e-14, rtol=1e-14))


def sample_repetitions(rng: np.random.Generator, shape: float, gamma: float) -> int:
    """One draw of ``K ~ D_{shape, gamma}`` by inversion of the CDF (one uniform from
    ``rng``; the probabilities by the ratio ``p_{k+1}/p_k = (1 - gamma)(k + eta)/(k + 1)``)."""
    eta, g = _check_shape(shape), _check_gamma(gamma)
    u = float(rng.random())
    p = float(truncated_negative_binomial_pmf(1, eta, g))
    k, cum = 1, p
    while cum < u and p > 0.0:
        p *= (1.0 - g) * (k + eta) / (k + 1.0)
        k += 1
        cum += p
    return k


# ---------------------------------------------------------------------------------------
# Papernot & Steinke (2022), Theorem 2, for a mu-GDP base algorithm
# ---------------------------------------------------------------------------------------


def _min_lambda_hat(mu: float, log_inv_gamma: float) -> float:
    """``min over lambda_hat >= 1 of (1 - 1/lambda_hat) eps(lambda_hat) + log(1/gamma) /
    lambda_hat`` for ``eps(l) = l mu^2 / 2``: ``(l - 1) mu^2/2 + L/l`` is convex in l with
    its minimum at ``sqrt(2 L)/mu``: ``mu sqrt(2 L) - mu^2/2`` there, ``L`` at ``l = 1``."""
    if mu == 0.0:
        return 0.0
    root = math.sqrt(2.0 * log_inv_gamma)
    if root >= mu:
        return mu * root - 0.5 * mu * mu
    return log_inv_gamma


def selection_rdp(order: float, mu: float, mean: float, shape: float) -> float:
    """RDP at ``order`` of repeat-and-select over a ``mu``-GDP base algorithm.

    Theorem 2 of Papernot and Steinke (2022): if the base algorithm is
    ``(lambda, eps(lambda))``-RDP for every ``lambda``, running it ``K ~ D_{eta, gamma}``
    times and returning only the best output is ``(lambda, eps')``-RDP with::

        eps' = eps(lambda) + (1 + eta) (1 - 1/lambda_hat) eps(lambda_hat)
               + (1 + eta) log(1/gamma) / lambda_hat + log(E[K]) / (lambda - 1)

    for every ``lambda_hat >= 1`` (minimised in closed form here). A mu-GDP algorithm has
    ``eps(lambda) = lambda mu^2 / 2`` (the Renyi divergence of two Gaussians).
    """
    lam = _validation.real(order, "order")
    if not lam > 1.0:
        raise ValueError(f"order must be > 1, got {order!r}")
    eta = _check_shape(shape)
    return _selection_curve(mu, mean, eta)(lam)


def _selection_curve(mu: float, mean: float, eta: float):
    """``lambda -> eps'(lambda)`` of :func:`selection_rdp` (gamma solved once)."""
    gamma = truncated_negative_binomial_gamma(eta, mean)
    c = (1.0 + eta) * _min_lambda_hat(mu, -math.log(gamma))
    log_mean = math.log(mean)
    return lambda lam: lam * mu * mu / 2.0 + c + log_mean / (lam - 1.0)


@dataclasses.dataclass(frozen=True)
class RepeatAndSelect:
    """The privacy cost of one private selection: best of ``K ~ D_{shape, gamma}`` runs
    of a ``mu``-GDP base algorithm (an event a :class:`PrivacyBudget` can compose)."""

    mu: float
    mean: float
    shape: float
    name: str = "selection"

    def rdp(self, order: float) -> float:
        curve = self.__dict__.get("_curve")
        if curve is None:
            curve = _selection_curve(self.mu, self.mean, _check_shape(self.shape))
            object.__setattr__(self, "_curve", curve)
        return curve(float(order))


def selection_epsilon(
    mu: float, delta: float, mean: float, shape: float = 0.0, *, return_order: bool = False
):
    """Epsilon at ``delta`` of repeat-and-select (:func:`selection_rdp`) over a ``mu``-GDP
    base algorithm, minimised over the Renyi order (``return_order``: also the order)."""
    delta = _check_delta(delta)
    mu = _validation.nonneg(mu, "mu", allow_inf=True)
    eps, lam = _min_over_orders(_selection_curve(mu, mean, _check_shape(shape)), delta)
    return (eps, lam) if return_order else eps


def calibrate_selection_mu(epsilon: float, delta: float, mean: float, shape: float = 0.0) -> float:
    """The largest base ``mu`` (to 1e-3 relative) whose selection bound is ``<= epsilon``."""
    eps = _check_epsilon(epsilon)
    delta = _check_delta(delta)

    def f(log_mu):
        return selection_epsilon(math.exp(log_mu), delta, mean, shape) - eps

    lo, hi = math.log(1e-6), math.log(1e3)
    if f(lo) > 0:
        raise ValueError(
            f"epsilon={epsilon} is too small for this selection (mean "
            f"{mean} repetitions): the bound stays above it for every mu"
        )
    log_mu = optimize.brentq(f, lo, hi, xtol=1e-6) if f(hi) > 0 else hi
    mu = math.exp(log_mu)
    while selection_epsilon(mu, delta, mean, shape) > eps:
        mu *= 1.0 - 1e-4
    return mu


# ---------------------------------------------------------------------------------------
# The shared budget
# ---------------------------------------------------------------------------------------


def _events_of_ledger(ledger: accounting.PrivacyLedger) -> list:
    """The accountant events behind a fit's ledger (multipliers, counts, sample rates)."""
    out = []
    for e in ledger.entries:
        if e.sample_rate == 1.0:
            out.append(
                accounting.GaussianRelease(
                    e.noise_multiplier, count=e.count, name=e.name, sensitivity=e.sensitivity
                )
            )
        else:
            out.append(
                accounting.SubsampledGaussian(
                    e.noise_multiplier, e.sample_rate, e.count, name=e.name
                )
            )
    return out


def _gdp_mu_upper(epsilon: float, delta: float) -> float:
    """A mu with ``gdp_epsilon(mu, delta) >= epsilon``: every fit calibrated to
    (epsilon, delta) under exact GDP has a smaller mu (gdp_epsilon increases with mu)."""
    mu = accounting.calibrate_mu(epsilon, delta)
    grow = 1e-15  # the smallest step up that crosses: a budget of exactly epsilon fits
    while accounting.gdp_epsilon(mu, delta) < epsilon:
        mu *= 1.0 + grow
        grow *= 2.0
    return mu


def _planned_events(est, epsilon: float, delta: float) -> list:
    """Events that dominate what ``est.fit`` will release at (epsilon, delta).

    The estimators calibrate their noise to the target before drawing any: exact GDP
    (every method but Poisson-subsampled DP-SGD) gives a composition that is at most
    ``mu``-GDP with ``gdp_epsilon(mu, delta) = epsilon``; subsampled DP-SGD draws the
    multiplier of :func:`~dpfc_native.accounting.calibrate_dpsgd_noise_multiplier`,
    which is a deterministic function of (epsilon, delta, q, steps, accountant).
    """
    q = getattr(est, "sample_rate", 1.0)
    if q is not None and float(q) < 1.0:
        steps = int(est.steps)
        z = accounting.calibrate_dpsgd_noise_multiplier(
            epsilon, delta, float(q), steps, method=est.accountant
        )
        return [accounting.SubsampledGaussian(z, float(q), steps, name="gradient (planned)")]
    return [accounting.GaussianRelease(1.0 / _gdp_mu_upper(epsilon, delta), name="fit (planned)")]


@dataclasses.dataclass
class _Charge:
    label: str
    events: list
    selections: list
    settled: bool = False
    budget: "PrivacyBudget | None" = None
    normal_pairs: int = 0  # Gaussian pairs drawn (the sampler's tail cut; see ledger())


class PrivacyBudget:
    """A total (epsilon, delta) shared by many fits on the same private data.

    Pass it as ``budget=`` to any estimator (or to :class:`PrivateSelector`). Each fit,
    after checking its inputs and before computing any statistic or drawing any noise,
    asks the budget for the releases it is calibrated to make; if composing them with
    everything already spent would exceed ``epsilon`` at ``delta``, the fit raises
    :class:`PrivacyBudgetExceeded` and spends nothing. After the fit, the reservation
    is replaced by the releases actually made (read from the fit's ``privacy_``
    ledger; never more than reserved).

    Composition is of the releases themselves, not of per-fit (epsilon, delta) pairs:
    when every release is a plain Gaussian it is the exact mu-GDP composition
    (``mu^2`` adds up; ten fits at mu each cost ``sqrt(10) mu``, not ten epsilons);
    with Poisson-subsampled releases it is the RDP / PLD accountant of
    :class:`~dpfc_native.accounting.PrivacyAccountant`; private selections enter through
    their Renyi-DP curve (Papernot and Steinke 2022), converted at the best order.

    scikit-learn: ``clone`` (used by ``GridSearchCV``, ``cross_val_score``,
    ``CalibratedClassifierCV``) deep-copies parameters; a budget's deep copy is the
    budget itself, so every clone draws from the same account. It is thread-safe (a
    lock around check-and-reserve), so ``n_jobs`` with the threading backend works. A
    budget that crosses a process boundary (pickling: ``n_jobs > 1`` with the default
    process backend, or a saved model) arrives *detached*: fits that try to spend from
    it raise, because what they spend would not be seen by the original.

    What is NOT covered: scores computed on private folds, the choice of the best
    candidate from them, and calibrators fitted on private predictions are uses of the
    private data that no fit's ledger records. Use a public validation split, or
    :class:`PrivateSelector`, for those.

    Parameters
    ----------
    epsilon : float > 0
        Total epsilon for everything fitted with this budget.
    delta : float in (0, 1)
        Total delta.
    method : {"auto", "rdp", "pld"}
        Accountant for subsampled releases (see
        :class:`~dpfc_native.accounting.PrivacyAccountant`); plain Gaussian releases are
        always composed exactly.

    Examples
    --------
    >>> from sklearn.model_selection import GridSearchCV
    >>> budget = PrivacyBudget(epsilon=4.0, delta=1e-5)
    >>> est = DPLeastSquaresClassifier(epsilon=1.0, classes=range(10), budget=budget)
    >>> GridSearchCV(est, {"gram_share": [0.3, 0.5]}, cv=3).fit(X, y)  # doctest: +SKIP
    >>> budget.epsilon_spent  # doctest: +SKIP
    """

    _mu_cap = None  # the GDP cap of the budget, computed once: see _total_and_excess

    def __init__(self, epsilon: float, delta: float, *, method: str = "auto"):
        self.epsilon = _check_epsilon(epsilon)
        if math.isinf(self.epsilon):
            raise ValueError("a budget needs a finite epsilon")
        self.delta = _check_delta(delta)
        self.method = _validation.choice(method, "method", ("auto", "rdp", "pld"))
        self._charges: list[_Charge] = []
        self._lock = threading.Lock()
        self._detached = False
        self._pid = os.getpid()  # spends only here: see reserve()

    # -- sharing semantics ----------------------------------------------------------
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        state["_detached"] = True
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"PrivacyBudget(epsilon={self.epsilon:g}, delta={self.delta:g}, "
            f"spent={self.epsilon_spent:.4g}, fits={len(self._charges)}"
            f"{', detached' if self._detached else ''})"
        )

    # -- accounting -------------------------------------------------------------------
    def _total(self, charges) -> tuple[float, str]:
        return self._total_and_excess(charges)[:2]

    def _total_and_excess(self, charges) -> tuple[float, str, bool]:
        """(epsilon at ``delta``, method, whether the charges exceed the budget).

        Plain Gaussians compose to exact mu-GDP and are compared by mu against the mu
        a fit at exactly the budget's epsilon reserves (:func:`_planned_events`): a
        budget of epsilon admits that fit and refuses anything above it (the epsilon of
        the planned mu itself rounds a hair above its target). Other compositions
        compare their epsilon with the budget's, exactly.
        """
        events = [e for c in charges for e in c.events]
        selections = [s for c in charges for s in c.selections]
        if not events and not selections:
            return 0.0, "none", False
        acct = accounting.PrivacyAccountant(method=self.method)
        for e in events:
            acct.compose(e)
        if not selections:
            if acct.is_exact_gdp:  # plain Gaussians: exact whatever `method` says
                if self._mu_cap is None:  # as composed from a fit's planned release
                    cap = accounting.PrivacyAccountant()
                    cap.compose(
                        accounting.GaussianRelease(1.0 / _gdp_mu_upper(self.epsilon, self.delta))
                    )
                    self._mu_cap = cap.mu
                eps = accounting.gdp_epsilon(acct.mu, self.delta)
                return eps, "gdp", acct.mu > self._mu_cap
            eps, method = acct.get_epsilon_and_method(self.delta)
            return eps, method, eps > self.epsilon
        # Renyi DP composes by addition at every order; the plain and subsampled
        # Gaussian releases enter with their own RDP (exact for plain Gaussians).

        def rdp_at(lam):
            base = float(acct.rdp([lam])[0]) if events else 0.0
            return base + sum(s.rdp(lam) for s in selections)

        eps, _ = _min_over_orders(rdp_at, self.delta)
        return eps, "rdp", eps > self.epsilon

    @property
    def epsilon_spent(self) -> float:
        """Epsilon at the budget's delta of everything charged so far."""
        return self._total(self._charges)[0]

    @property
    def fits(self) -> list:
        """``(label, events)`` of every charge so far (reservations included)."""
        return [(c.label, list(c.events) + list(c.selections)) for c in self._charges]

    def would_spend(self, events=(), selections=()) -> float:
        """Epsilon at ``delta`` if ``events`` (and selection costs) were added now."""
        return self._total(self._charges + [_Charge("?", list(events), list(selections))])[0]

    def reserve(self, events=(), selections=(), label: str = "") -> _Charge:
        """Check and record a charge atomically; raise :class:`PrivacyBudgetExceeded`
        (recording nothing) if the total would exceed ``epsilon``."""
        # Checked before the lock, which a fork may have copied held.
        if self._detached or os.getpid() != self._pid:
            how = "pickled" if self._detached else "inherited by fork"
            raise PrivacyBudgetExceeded(
                f"this PrivacyBudget is a copy that crossed a process boundary ({how}: "
                "n_jobs > 1 with processes, multiprocessing, or a loaded model); what it "
                "spends would not be seen by the original, so it refuses every fit. Use "
                "n_jobs=1 (or the threading backend) with a shared budget."
            )
        charge = _Charge(label, list(events), list(selections), budget=self)
        with self._lock:
            # Numbered here, under the lock: two fits starting together got one number.
            charge.label = f"{label} #{len(self._charges) + 1}" if label else label
            eps, _, exceeds = self._total_and_excess(self._charges + [charge])
            if exceeds:
                spent = self._total(self._charges)[0]
                raise PrivacyBudgetExceeded(
                    f"{charge.label or 'this fit'} would take the privacy budget to epsilon = "
                    f"{eps:.4g} > {self.epsilon:g} (delta = {self.delta:g}; already spent "
                    f"{spent:.4g} in {len(self._charges)} fit(s)); refused before any noise "
                    "was drawn"
                )
            self._charges.append(charge)
        return charge

    def cancel(self, charge: _Charge) -> None:
        """Withdraw a reservation whose run raised before it returned anything (nothing
        it computed was released), e.g. a :class:`PrivateSelector` whose candidate fit
        refused its input."""
        with self._lock:
            if charge in self._charges and not charge.settled:
                self._charges.remove(charge)

    def settle(
        self, charge: _Charge, ledger: accounting.PrivacyLedger, normal_pairs: int = 0
    ) -> None:
        """Replace a fit's reservation by the releases it made (its ledger; and
        ``normal_pairs``, the Gaussian pairs its noise source drew).

        The fit was calibrated to at most the reserved releases, so the total cannot
        grow; it is checked anyway (a fit that released more than it reserved raises).
        """
        with self._lock:
            charge.events = _events_of_ledger(ledger)
            charge.normal_pairs = int(normal_pairs)
            charge.settled = True
            eps, _, exceeds = self._total_and_excess(self._charges)
        if exceeds:
            raise PrivacyBudgetExceeded(
                f"{charge.label} released more than it reserved: the budget is now at "
                f"epsilon = {eps:.6g} > {self.epsilon:g}"
            )

    def ledger(self) -> accounting.PrivacyLedger:
        """A :class:`~dpfc_native.accounting.PrivacyLedger` of every release charged so
        far (selections appear as entries without a multiplier), total at ``delta``.

        Its ``sampler_delta`` is the Gaussian sampler's tail-cut term of the composition:
        every fit's draws together are within total variation ``pairs * 2^-52`` of the
        ideal Gaussians, which adds ``(1 + e^epsilon) pairs 2^-52`` to delta at the
        budget's total epsilon (:func:`~dpfc_native.accounting.sampler_tail_delta`; not
        the sum of the fits' own terms, each at its own epsilon). The fits' draws are
        counted when they settle; a :class:`PrivateSelector`'s are not (see there).
        """
        entries = []
        for c in self._charges:
            for e in c.events:
                if isinstance(e, accounting.GaussianRelease):
                    entries.append(
                        accounting.LedgerEntry(
                            f"{c.label}: {e.name}",
                            e.sensitivity,
                            e.std,
                            e.noise_multiplier,
                            e.count,
                            1.0,
                            None,
                        )
                    )
                else:
                    entries.append(
                        accounting.LedgerEntry(
                            f"{c.label}: {e.name}",
                            None,
                            None,
                            e.noise_multiplier,
                            e.steps,
                            e.sample_rate,
                            None,
                        )
                    )
            for s in c.selections:
                entries.append(
                    accounting.LedgerEntry(
                        f"{c.label}: {s.name} (base mu={s.mu:.4g}, E[K]={s.mean:g}, "
                        f"shape={s.shape:g})",
                        None,
                        None,
                        math.inf,
                        1,
                        1.0,
                        None,
                    )
                )
        eps, method = self._total(self._charges)
        desc = {
            "gdp": "exact Gaussian DP (mu-GDP)",
            "rdp": "RDP, improved conversion",
            "pld": "PLD (dp_accounting, pessimistic)",
            "none": "no releases",
        }[method]
        mu = None
        if method == "gdp":
            acct = accounting.PrivacyAccountant()
            for c in self._charges:
                for e in c.events:
                    acct.compose(e)
            mu = acct.mu
        ledger = accounting.PrivacyLedger(
            tuple(entries), eps, self.delta, mu, f"budget of epsilon={self.epsilon:g}: {desc}"
        )
        return accounting.with_sampler_tail(ledger, sum(c.normal_pairs for c in self._charges))


def _selection_budget(own, template_budget):
    """The budget a selection pays from: its own, else its template estimator's (the
    candidates are fitted without one: the selection is charged once, as a whole)."""
    for b, name in ((own, "budget"), (template_budget, "the estimator's budget")):
        if b is not None and not isinstance(b, PrivacyBudget):
            raise TypeError(f"{name} must be a PrivacyBudget or None, got {type(b).__name__}")
    if own is not None and template_budget is not None and own is not template_budget:
        raise ValueError(
            "PrivateSelector has a budget and its estimator another one: the selection "
            "would be charged to only one of them. Pass one budget (either place)."
        )
    return own if own is not None else template_budget


def _begin_fit(est, epsilon: float, delta: float):
    """Called by the estimators' fit once (epsilon, delta) are known and before any
    statistic is computed: reserve the fit's planned releases, or raise."""
    budget = getattr(est, "budget", None)
    if budget is None:
        return None
    if not isinstance(budget, PrivacyBudget):
        raise TypeError(f"budget must be a PrivacyBudget or None, got {type(budget).__name__}")
    if math.isinf(epsilon):
        raise PrivacyBudgetExceeded(
            "epsilon=inf (a non-private fit) cannot be paid from a privacy budget"
        )
    return budget.reserve(_planned_events(est, epsilon, delta), label=type(est).__name__)


def _end_fit(charge, ledger, normal_pairs: int = 0) -> None:
    """Called by the estimators' fit with its ledger (and how many Gaussian pairs its
    noise source drew): settle the reservation."""
    if charge is not None:
        charge.budget.settle(charge, ledger, normal_pairs)


# ---------------------------------------------------------------------------------------
# Private selection
# ---------------------------------------------------------------------------------------


def _expand_grid(param_grid) -> list[dict]:
    grids = [param_grid] if isinstance(param_grid, dict) else list(param_grid)
    out = []
    for g in grids:
        if not isinstance(g, dict):
            raise TypeError("param_grid must be a dict of lists or a list of such dicts")
        keys = sorted(g)
        values = []
        for k in keys:
            v = g[k]
            if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
                raise TypeError(f"param_grid[{k!r}] must be a list of values")
            v = list(v)
            if not v:
                raise ValueError(f"param_grid[{k!r}] is empty")
            values.append(v)
        out += [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    if not out:
        raise ValueError("param_grid holds no candidate")
    return out


class PrivateSelector:
    """Differentially private hyper-parameter selection without a public validation split.

    The random-stopping algorithm of Papernot and Steinke (2022, "Hyperparameter tuning
    with Renyi differential privacy", ICLR), with a truncated negative binomial number of
    repetitions. The base algorithm Q, run ``K`` times:

    1. pick a candidate uniformly at random from ``param_grid`` (public randomness);
    2. fit it on the private data with noise calibrated so that the fit is
       ``mu_fit``-GDP, ``mu_fit^2 = (1 - score_share) mu^2``;
    3. release a noisy score: the number of correct predictions on the private scoring
       data plus ``N(0, 1/mu_score^2)`` (sensitivity 1 under add/remove; ``mu_score^2 =
       score_share mu^2``), divided by the (public) number of scoring examples.

    Q is ``mu``-GDP by exact composition of the two Gaussian mechanisms, for any scoring
    data (the training data itself by default, or a separate private split): given the
    fitted model the count has sensitivity 1, and the model's own cost is ``mu_fit``.
    With several candidates Q is a uniform mixture of ``mu``-GDP algorithms, which is
    ``mu``-GDP (Renyi divergence is jointly quasi-convex).

    **Guarantee.** ``K ~ D_{eta, gamma}`` (truncated negative binomial, ``eta = shape``,
    ``gamma`` set by ``mean_repetitions``), and only the candidate with the best noisy
    score is returned. By Theorem 2 of Papernot and Steinke (2022) the result is
    ``(lambda, eps'(lambda))``-RDP for every ``lambda > 1`` with::

        eps'(lambda) = lambda mu^2 / 2 + (1 + eta) min_{lambda_hat >= 1} [
                         (lambda_hat - 1) mu^2 / 2 + log(1/gamma) / lambda_hat ]
                       + log(E[K]) / (lambda - 1)

    (the inner minimum is ``mu sqrt(2 log(1/gamma)) - mu^2/2`` when
    ``sqrt(2 log(1/gamma)) >= mu``, else ``log(1/gamma)``), and hence
    ``(epsilon, delta)``-DP with::

        epsilon = min_{lambda > 1} eps'(lambda) + log((lambda - 1)/lambda)
                                  - (log(delta) + log(lambda)) / (lambda - 1)

    (the RDP conversion of Canonne, Kamath and Steinke 2020). ``mu`` is the largest
    value for which this is at most the requested ``epsilon``; ``privacy_`` records it,
    with the order lambda that attains it. Its delta is that of the idealised Gaussian
    mechanisms: unlike a fit's ledger it adds no term for the sampler's tail cut
    (``privacy_.sampler_delta`` is 0), whose bound here would need the draws of every
    candidate, run or not, times ``E[K]``; each candidate's term is of the order of a
    fit's (``best_estimator_.fit_privacy_.sampler_delta``, about 1e-10).

    The guarantee covers the returned model and its noisy score only. ``K``, the other
    candidates and their scores (``diagnostics_``, the progress lines of ``verbose``)
    are NOT covered: publishing them voids the analysis (the number of repetitions must
    stay secret). A fixed ``random_state`` fixes ``K``, the candidate order and every
    noise key: experiments only.

    Parameters
    ----------
    estimator : a dpfc_native estimator
        The template; its ``epsilon``, ``random_state`` and ``budget`` are set by the
        selector. Candidates must make plain Gaussian releases only (every method
        except DP-SGD with ``sample_rate < 1``).
    param_grid : dict of lists, or list of such dicts
        The candidates (as in scikit-learn's ``GridSearchCV``).
    epsilon : float > 0
        Total epsilon of the whole selection (all repetitions and scores).
    delta : float or None
        Total delta (default ``min(1e-5, 1/n)``). Each fit gets the same delta as its
        calibration parameter; only ``mu`` matters for the composition.
    mean_repetitions : float > 1, default 10
        ``E[K]``. Choose it a few times the number of candidates so that each is likely
        tried; the cost grows only with ``log E[K]``.
    shape : float >= 0, default 0
        ``eta``: 0 is the logarithmic distribution (cheapest), 1 the geometric one.
    score_share : float in (0, 1), default 0.05
        Share of ``mu^2`` for the noisy score (a count of sensitivity 1 on thousands of
        examples needs little).
    random_state : int or None
        None (default): OS entropy for K, the candidates and every noise key.
    budget : PrivacyBudget or None
        Charged with the selection's RDP curve before anything is fitted. None: the
        template estimator's ``budget``, if it has one (two different budgets raise).
    verbose : int
        1: a progress line per repetition (reveals K; see above).

    Attributes
    ----------
    best_estimator_ : the chosen fitted estimator; its ``privacy_`` is the selection's
        ledger (the single fit's own is in ``fit_privacy_``).
    best_params_ : dict
    best_score_ : float, the noisy score of the chosen candidate (covered).
    privacy_ : PrivacyLedger of the whole selection.
    mu_ : float, the base algorithm's GDP parameter.
    diagnostics_ : dict, ``n_repetitions``, ``history`` (candidate, noisy score): NOT
        covered by the guarantee, for debugging only.
    """

    def __init__(
        self,
        estimator,
        param_grid,
        epsilon: float = 1.0,
        delta=None,
        *,
        mean_repetitions: float = 10.0,
        shape: float = 0.0,
        score_share: float = 0.05,
        random_state=None,
        budget=None,
        verbose: int = 0,
    ):
        self.estimator = estimator
        self.param_grid = param_grid
        self.epsilon = epsilon
        self.delta = delta
        self.mean_repetitions = mean_repetitions
        self.shape = shape
        self.score_share = score_share
        self.random_state = random_state
        self.budget = budget
        self.verbose = verbose

    def get_params(self, deep: bool = True) -> dict:
        return {
            k: getattr(self, k)
            for k in (
                "estimator",
                "param_grid",
                "epsilon",
                "delta",
                "mean_repetitions",
                "shape",
                "score_share",
                "random_state",
                "budget",
                "verbose",
            )
        }

    def set_params(self, **params):
        for k, v in params.items():
            if k not in self.get_params():
                raise ValueError(f"invalid parameter {k!r} for PrivateSelector")
            setattr(self, k, v)
        return self

    def fit(self, X, y, *, X_score=None, y_score=None):
        """Select and fit on private ``(X, y)``; score on ``(X_score, y_score)`` (private
        too; default: ``(X, y)`` itself). Returns self."""
        from ._progress import progress
        from .models import default_delta

        eps = _check_epsilon(self.epsilon)
        if math.isinf(eps):
            raise ValueError("PrivateSelector needs a finite epsilon")
        n = int(np.shape(X)[0])
        delta = default_delta(n) if self.delta is None else _check_delta(self.delta)
        mean = _validation.real(self.mean_repetitions, "mean_repetitions")
        shape = _check_shape(self.shape)
        share = _validation.share(self.score_share, "score_share")
        candidates = _expand_grid(self.param_grid)
        template = self.estimator.get_params()
        budget = _selection_budget(self.budget, template.get("budget"))
        for c in candidates:
            bad = {"epsilon", "delta", "random_state", "budget"} & set(c)
            if bad:
                raise ValueError(f"param_grid must not set {sorted(bad)}: the selector sets them")
            unknown = set(c) - set(template)
            if unknown:
                raise ValueError(
                    f"param_grid has parameters unknown to "
                    f"{type(self.estimator).__name__}: {sorted(unknown)}"
                )
            q = c.get("sample_rate", template.get("sample_rate", 1.0))
            if q is not None and float(q) < 1.0:
                raise ValueError(
                    "PrivateSelector needs plain Gaussian candidates: DP-SGD with "
                    "sample_rate < 1 is not supported"
                )
        if (X_score is None) != (y_score is None):
            raise ValueError("X_score and y_score must be given together")
        if X_score is None:
            X_score, y_score = X, y
        y_score = np.asarray(y_score)
        n_score = int(np.shape(X_score)[0])
        if y_score.shape != (n_score,):
            raise ValueError(
                f"y_score must have one label per row of X_score: shape ({n_score},), "
                f"got {y_score.shape}"
            )
        if len(np.shape(X_score)) != 2 or np.shape(X_score)[1] != np.shape(X)[1]:
            raise ValueError(
                f"X_score must have the {np.shape(X)[1]} features of X, got shape "
                f"{np.shape(X_score)}"
            )
        if n_score == 0:
            raise ValueError("the scoring data is empty")
        # The template's own warnings, once: the candidates' fits do not repeat them.
        from .models import _warn_large_delta

        if getattr(self.estimator, "classes", None) is None:
            warnings.warn(
                f"PrivateSelector: the {type(self.estimator).__name__} has classes=None, so "
                "the label set is read from the private labels: which classes occur is "
                "revealed and not covered by the guarantee. Pass the public label set as "
                "classes= to the estimator.",
                PrivacyWarning,
                stacklevel=2,
            )
        _warn_large_delta(delta, n, eps)
        seeded = self.random_state is not None
        if seeded:
            warnings.warn(
                f"random_state={self.random_state!r} fixes the number of repetitions, the "
                "candidates and every noise key of the selection: anyone who knows it can "
                "remove the noise, so the result has no privacy guarantee against them. Use "
                "random_state=None on private data.",
                PrivacyWarning,
                stacklevel=2,
            )
            rng = np.random.default_rng([int(self.random_state), 0x5E1EC7])
        else:
            rng = np.random.default_rng(secrets.randbits(128))

        mu = calibrate_selection_mu(eps, delta, mean, shape)
        total_eps, order = selection_epsilon(mu, delta, mean, shape, return_order=True)
        event = RepeatAndSelect(mu, mean, shape, name="private selection")
        charge = None
        if budget is not None:
            charge = budget.reserve(selections=[event], label="PrivateSelector")
        mu_fit = math.sqrt(1.0 - share) * mu
        mu_score = math.sqrt(share) * mu
        # Each fit's epsilon at its own delta: its calibration then gives mu <= mu_fit.
        n_fit = n
        fit_delta = template.get("delta") or default_delta(n_fit)
        fit_eps = accounting.gdp_epsilon(mu_fit, fit_delta)
        gamma = truncated_negative_binomial_gamma(shape, mean)
        k_reps = sample_repetitions(rng, shape, gamma)
        score_source = mechanisms.NoiseSource(None if not seeded else int(rng.integers(0, 2**62)))
        best = None
        history = []
        try:
            with progress(None, "private selection", enabled=self.verbose > 0) as bar:
                for rep in range(k_reps):
                    idx = int(rng.integers(len(candidates)))
                    params = {
                        **template,
                        **candidates[idx],
                        "epsilon": fit_eps,
                        "delta": fit_delta,
                        "budget": None,
                        "verbose": 0,
                        "random_state": int(rng.integers(0, 2**62)) if seeded else None,
                    }
                    est = type(self.estimator)(
                        **{k: copy.deepcopy(v) if k != "budget" else v for k, v in params.items()}
                    )
                    with warnings.catch_warnings():
                        # The selector warned once (fixed seed, label set, delta) above;
                        # every candidate would repeat it.
                        warnings.simplefilter("ignore", PrivacyWarning)
                        est.fit(X, y)
                    fit_mu = est.privacy_.mu
                    if fit_mu is None or fit_mu > mu_fit * (1.0 + 1e-9):
                        raise RuntimeError(
                            f"candidate fit spent mu={fit_mu}, above its share "
                            f"{mu_fit:.6g}: the selection bound would not hold"
                        )
                    correct = float(np.sum(est.predict(X_score) == y_score))
                    noisy, _rec = mechanisms.release_dense(
                        np.array([correct]), 1.0, 1.0 / mu_score, score_source, "score"
                    )
                    score = float(noisy[0]) / n_score
                    history.append({"candidate": candidates[idx], "noisy_score": score})
                    if best is None or score > best[0]:
                        best = (score, idx, est)
                    bar.advance(f"repetition {rep + 1}: {candidates[idx]} score {score:.4f}")
        except (ValueError, TypeError):
            # A candidate refused its input before any repetition finished (bad X, y or
            # parameters, as a plain fit refuses them): no score was computed or shown,
            # so the reservation is withdrawn. Anything later, or any other exception
            # (Ctrl-C included), keeps the charge: a rerun must not come for free.
            if charge is not None and not history:
                budget.cancel(charge)
            raise
        score, idx, est = best
        self.mu_ = mu
        self.privacy_ = accounting.PrivacyLedger(
            (
                accounting.LedgerEntry(
                    "candidate fit (each repetition)", None, None, 1.0 / mu_fit, 1, 1.0, 1.0 - share
                ),
                accounting.LedgerEntry(
                    "noisy score (each repetition)",
                    1.0,
                    1.0 / mu_score,
                    1.0 / mu_score,
                    1,
                    1.0,
                    share,
                ),
            ),
            total_eps,
            delta,
            None,
            f"private selection: Papernot & Steinke 2022 Thm 2, truncated negative binomial "
            f"(shape={shape:g}, gamma={gamma:.6g}, E[K]={mean:g}) over a mu={mu:.6g}-GDP base "
            f"algorithm, RDP order {order:.6g}, improved conversion",
        )
        est.fit_privacy_ = est.privacy_
        est.privacy_ = self.privacy_
        self.best_estimator_ = est
        self.best_params_ = dict(candidates[idx])
        self.best_score_ = score
        self.candidates_ = candidates
        self.diagnostics_ = {"n_repetitions": k_reps, "history": history}
        if charge is not None:
            charge.settled = True
        return self

    def _check_fitted(self):
        if not hasattr(self, "best_estimator_"):
            raise RuntimeError("this PrivateSelector is not fitted yet: call fit first")

    def predict(self, X):
        self._check_fitted()
        return self.best_estimator_.predict(X)

    def decision_function(self, X):
        self._check_fitted()
        return self.best_estimator_.decision_function(X)

    def score(self, X, y) -> float:
        self._check_fitted()
        return self.best_estimator_.score(X, y)
