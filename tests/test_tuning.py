"""Tuning without leaking: the shared PrivacyBudget, private selection (Papernot and
Steinke 2022), the PrivacyWarning at fit, and progress without a terminal."""

from __future__ import annotations

import io
import math
import pickle
import warnings

import numpy as np
import pytest
import scipy.stats
from scipy import optimize

import dpfc_native
from dpfc_native import PrivacyWarning, accounting, mechanisms, ops, tuning
from dpfc_native._progress import progress
from dpfc_native.models import (
    DPFCClassifier,
    DPLeastSquaresClassifier,
    DPNewtonClassifier,
    DPSGDClassifier,
)
from dpfc_native.tuning import (
    PrivacyBudget,
    PrivacyBudgetExceeded,
    PrivateSelector,
    RepeatAndSelect,
)

K = 4


def _data(rng, n=300, d=6, k=K):
    means = rng.normal(size=(k, d)) * 2.0
    y = rng.integers(0, k, n)
    X = means[y] + rng.normal(size=(n, d))
    return X, y


def _gdp_eps_of(ledgers, delta):
    mu2 = sum(led.mu**2 for led in ledgers)
    return accounting.gdp_epsilon(math.sqrt(mu2), delta)


# ---------------------------------------------------------------------------------------
# PrivacyBudget
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls", [DPLeastSquaresClassifier, DPNewtonClassifier, DPFCClassifier, DPSGDClassifier]
)
def test_budget_composes_ledgers_exactly(rng, cls):
    X, y = _data(rng, n=211, d=5)
    budget = PrivacyBudget(3.0, 1e-6)
    ledgers = []
    for eps in (0.5, 1.0, 0.7):
        est = (
            cls(epsilon=eps, classes=range(K), budget=budget, steps=2).fit(X, y)
            if cls is not DPLeastSquaresClassifier
            else cls(epsilon=eps, classes=range(K), budget=budget).fit(X, y)
        )
        ledgers.append(est.privacy_)
    # Exact GDP: mu^2 of the three fits adds up, then the exact curve at the budget's delta.
    assert budget.epsilon_spent == pytest.approx(_gdp_eps_of(ledgers, 1e-6), rel=1e-12)
    # Far below the sum of the three epsilons (basic composition would say 2.2).
    assert budget.epsilon_spent < 2.2
    led = budget.ledger()
    assert led.epsilon == pytest.approx(budget.epsilon_spent, rel=1e-12)
    assert led.mu == pytest.approx(math.sqrt(sum(x.mu**2 for x in ledgers)), rel=1e-12)
    assert len(budget.fits) == 3


def test_budget_refuses_before_any_noise(rng, monkeypatch):
    X, y = _data(rng)
    budget = PrivacyBudget(1.3, 1e-5)
    DPLeastSquaresClassifier(epsilon=1.0, classes=range(K), budget=budget).fit(X, y)
    assert budget.would_spend([accounting.GaussianRelease(1 / 0.29)]) > 1.3
    spent = budget.epsilon_spent
    calls = []
    for name in ("release_symmetric", "release_dense"):
        real = getattr(mechanisms, name)
        monkeypatch.setattr(
            mechanisms, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k)
        )
    real_stats = ops.clipped_stats
    monkeypatch.setattr(
        ops, "clipped_stats", lambda *a, **k: calls.append("stats") or real_stats(*a, **k)
    )
    est = DPLeastSquaresClassifier(epsilon=1.0, classes=range(K), budget=budget)
    with pytest.raises(PrivacyBudgetExceeded, match="refused before any noise"):
        est.fit(X, y)
    assert calls == []  # no statistic computed, no noise drawn
    assert not hasattr(est, "coef_")
    assert budget.epsilon_spent == spent and len(budget.fits) == 1
    # A smaller fit still fits in the remaining budget (exact GDP composition).
    small = DPLeastSquaresClassifier(epsilon=0.3, classes=range(K), budget=budget).fit(X, y)
    assert calls  # this one did release
    assert budget.epsilon_spent <= 1.3
    assert budget.epsilon_spent == pytest.approx(
        _gdp_eps_of([small.privacy_, budget_first_ledger(X, y)], 1e-5), rel=1e-3
    )


def budget_first_ledger(X, y):
    return DPLeastSquaresClassifier(epsilon=1.0, classes=range(K)).fit(X, y).privacy_


@pytest.mark.parametrize("cls", [DPLeastSquaresClassifier, DPFCClassifier, DPSGDClassifier])
def test_budget_of_exactly_epsilon_admits_one_fit_at_epsilon(rng, cls):
    X, y = _data(rng)
    for eps in (0.3, 1.0, 4.0):
        budget = PrivacyBudget(eps, 1e-5)
        kw = {} if cls is DPLeastSquaresClassifier else {"steps": 3}
        est = cls(epsilon=eps, delta=1e-5, classes=range(K), budget=budget, **kw).fit(X, y)
        assert est.privacy_.epsilon <= eps and budget.epsilon_spent <= eps
        with pytest.raises(PrivacyBudgetExceeded):
            cls(epsilon=0.01, delta=1e-5, classes=range(K), budget=budget, **kw).fit(X, y)


@pytest.mark.parametrize("over", [1e-9, 1e-12])
def test_budget_refuses_a_fit_a_hair_above_it(rng, over):
    """A fit at epsilon (1 + 1e-9) was admitted by a budget of epsilon (a relative slack
    of 1e-9 in the check) and the budget then reported more spent than its total."""
    X, y = _data(rng)
    budget = PrivacyBudget(1.0, 1e-5)
    with pytest.raises(PrivacyBudgetExceeded):
        DPLeastSquaresClassifier(
            epsilon=1.0 + over, delta=1e-5, classes=range(K), budget=budget
        ).fit(X, y)
    assert budget.epsilon_spent == 0.0 and not budget.fits
    est = DPLeastSquaresClassifier(epsilon=1.0, delta=1e-5, classes=range(K), budget=budget)
    est.fit(X, y)
    assert budget.epsilon_spent <= 1.0 and est.privacy_.epsilon <= 1.0


def test_budget_ledger_counts_the_samplers_tail_cut_of_every_fit(rng):
    """The budget's ledger reported the idealised Gaussians' delta only: the fits' draws
    add (1 + e^eps) pairs 2^-52 at the composed epsilon, with every fit's pairs."""
    X, y = _data(rng)
    budget = PrivacyBudget(3.0, 1e-5)
    fits = [
        DPLeastSquaresClassifier(epsilon=1.0, delta=1e-5, classes=range(K), budget=budget),
        DPFCClassifier(epsilon=1.0, delta=1e-5, classes=range(K), steps=3, budget=budget),
    ]
    pairs = 0
    for est in fits:
        est.fit(X, y)
        led = est.privacy_
        p = led.sampler_delta / ((1.0 + math.exp(led.epsilon)) * 2.0**-52)
        assert led.sampler_delta > 0 and abs(p - round(p)) < 1e-6 * p
        pairs += round(p)
    led = budget.ledger()
    want = (1.0 + math.exp(led.epsilon)) * pairs * 2.0**-52
    assert led.sampler_delta == pytest.approx(want, rel=1e-12)
    assert led.sampler_delta > max(est.privacy_.sampler_delta for est in fits)
    assert led.total_delta == led.delta + led.sampler_delta


def test_budget_refuses_non_private_fit(rng):
    X, y = _data(rng)
    with pytest.raises(PrivacyBudgetExceeded, match="epsilon=inf"):
        DPLeastSquaresClassifier(
            epsilon=math.inf, classes=range(K), budget=PrivacyBudget(1.0, 1e-5)
        ).fit(X, y)
    with pytest.raises(TypeError, match="budget"):
        DPLeastSquaresClassifier(classes=range(K), budget=1.0).fit(X, y)


def test_budget_shared_by_sklearn_clones(rng):
    from sklearn.base import clone
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import GridSearchCV, cross_val_score

    X, y = _data(rng, n=400)
    budget = PrivacyBudget(8.0, 1e-5)
    est = DPLeastSquaresClassifier(epsilon=0.5, classes=range(K), budget=budget)
    assert clone(est).budget is budget
    scores = cross_val_score(est, X, y, cv=3)
    assert len(budget.fits) == 3 and np.all(scores > 1.0 / K)
    search = GridSearchCV(est, {"gram_share": [0.3, 0.5]}, cv=3).fit(X, y)
    assert len(budget.fits) == 3 + 2 * 3 + 1  # 6 candidate fits + the refit
    assert search.best_estimator_.budget is budget
    cal = CalibratedClassifierCV(est, cv=2).fit(X, y)
    assert len(budget.fits) == 10 + 2
    assert cal.predict_proba(X[:5]).shape == (5, K)
    # Twelve fits at eps = 0.5 each: exactly sqrt(12) times the mu of one.
    one = DPLeastSquaresClassifier(epsilon=0.5, classes=range(K)).fit(X[:200], y[:200]).privacy_
    expected = accounting.gdp_epsilon(math.sqrt(12) * one.mu, 1e-5)
    assert budget.epsilon_spent == pytest.approx(expected, rel=1e-9)


def test_budget_gridsearch_refusal_surfaces(rng):
    from sklearn.model_selection import GridSearchCV

    X, y = _data(rng, n=300)
    budget = PrivacyBudget(2.0, 1e-5)
    est = DPLeastSquaresClassifier(epsilon=1.0, classes=range(K), budget=budget)
    with pytest.raises(PrivacyBudgetExceeded):
        GridSearchCV(est, {"gram_share": [0.3, 0.5]}, cv=3, error_score="raise").fit(X, y)
    assert budget.epsilon_spent <= 2.0


def test_budget_subsampled_uses_accountant(rng):
    X, y = _data(rng, n=500)
    budget = PrivacyBudget(4.0, 1e-5, method="rdp")
    fits = [
        DPSGDClassifier(
            epsilon=1.0,
            steps=20,
            sample_rate=0.2,
            accountant="rdp",
            classes=range(K),
            budget=budget,
        ).fit(X, y)
        for _ in range(2)
    ]
    fits.append(DPLeastSquaresClassifier(epsilon=1.0, classes=range(K), budget=budget).fit(X, y))
    acct = accounting.PrivacyAccountant(method="rdp")
    for est in fits:
        for e in est.privacy_.entries:
            if e.sample_rate < 1:
                acct.compose(
                    accounting.SubsampledGaussian(e.noise_multiplier, e.sample_rate, e.count)
                )
            else:
                acct.compose(accounting.GaussianRelease(e.noise_multiplier, count=e.count))
    assert budget.epsilon_spent == pytest.approx(acct.get_epsilon(1e-5), rel=1e-12)
    # The planned event of a subsampled fit is the very event it made.
    planned = tuning._planned_events(fits[0], 1.0, fits[0].delta_)[0]
    e = fits[0].privacy_.entries[0]
    assert (planned.noise_multiplier, planned.sample_rate, planned.steps) == (
        e.noise_multiplier,
        e.sample_rate,
        e.count,
    )


def test_budget_planned_dominates_actual(rng):
    X, y = _data(rng)
    for eps in (0.1, 1.0, 7.0):
        est = DPFCClassifier(epsilon=eps, steps=3, classes=range(K)).fit(X, y)
        planned = tuning._planned_events(est, eps, est.delta_)[0]
        assert est.privacy_.mu <= 1.0 / planned.noise_multiplier
        assert 1.0 / planned.noise_multiplier <= est.privacy_.mu * (1 + 2e-3)


def test_budget_pickled_copy_is_detached(rng):
    X, y = _data(rng)
    budget = PrivacyBudget(5.0, 1e-5)
    est = DPLeastSquaresClassifier(epsilon=1.0, classes=range(K), budget=budget).fit(X, y)
    copy = pickle.loads(pickle.dumps(est))
    assert copy.budget is not budget and copy.budget.epsilon_spent == budget.epsilon_spent
    with pytest.raises(PrivacyBudgetExceeded, match="process boundary"):
        copy.fit(X, y)
    assert len(budget.fits) == 1


def test_public_validation_sweep_is_free(rng):
    X, y = _data(rng, n=400)
    Xv, yv = _data(rng, n=100)
    budget = PrivacyBudget(5.0, 1e-5)
    single = DPLeastSquaresClassifier(epsilon=1.0, classes=range(K), reg=10.0).fit(X, y)
    swept = DPLeastSquaresClassifier(
        epsilon=1.0, classes=range(K), reg=[0.1, 10.0, 1000.0], budget=budget
    ).fit(X, y, X_val=Xv, y_val=yv)
    assert len(swept.sweep_results_) == 3
    assert swept.privacy_.mu == single.privacy_.mu
    assert budget.epsilon_spent == pytest.approx(single.privacy_.epsilon, rel=1e-12)


# ---------------------------------------------------------------------------------------
# Private selection: the bound, the distribution of K, replay
# ---------------------------------------------------------------------------------------


def _gamma_by_sum(shape, mean):
    """gamma from E[K] computed by summing k P[K = k] from the raw pmf (independent of
    the closed form used by the package)."""

    def pmf(k, g):
        k = np.arange(1, k + 1, dtype=float)
        if shape == 0:
            return (1 - g) ** k / (k * math.log(1 / g))
        logc = (
            scipy.special.gammaln(k + shape)
            - scipy.special.gammaln(shape)
            - scipy.special.gammaln(k + 1)
        )
        return (1 - g) ** k * np.exp(logc) / (g**-shape - 1)

    def f(lg):
        g = math.exp(lg)
        kmax = int(60 / g) + 100
        p = pmf(kmax, g)
        return float(np.sum(np.arange(1, kmax + 1) * p)) - mean

    return math.exp(optimize.brentq(f, math.log(1e-3), math.log(0.999), xtol=1e-13))


def _theorem2_inner(mu, shape, gamma):
    """Theorem 2's lambda_hat terms, minimised on a fine grid of lambda_hat >= 1."""
    lam_hats = np.concatenate([[1.0], np.geomspace(1.0 + 1e-6, 1e5, 200001)])
    eps_hat = lam_hats * mu * mu / 2
    return float(
        np.min(
            (1 + shape) * (1 - 1 / lam_hats) * eps_hat
            + (1 + shape) * math.log(1 / gamma) / lam_hats
        )
    )


def _theorem2_eps(mu, delta, mean, lam, inner):
    """Theorem 2 of Papernot & Steinke (2022) written out for eps(lambda) = lambda mu^2/2,
    then the RDP -> (eps, delta) conversion at ``lam``."""
    rdp = lam * mu * mu / 2 + inner + math.log(mean) / (lam - 1)
    return rdp + math.log((lam - 1) / lam) - (math.log(delta) + math.log(lam)) / (lam - 1)


@pytest.mark.parametrize(
    "mu,mean,shape,delta",
    [(0.3, 10.0, 0.0, 1e-5), (1.0, 5.0, 1.0, 1e-6), (0.05, 30.0, 0.5, 1e-5), (2.0, 3.0, 2.0, 1e-3)],
)
def test_selection_bound_is_theorem2(mu, mean, shape, delta):
    gamma = _gamma_by_sum(shape, mean)
    assert tuning.truncated_negative_binomial_gamma(shape, mean) == pytest.approx(gamma, rel=1e-7)
    eps, lam = tuning.selection_epsilon(mu, delta, mean, shape, return_order=True)
    # Exactly the theorem's expression at the order reported ...
    inner = _theorem2_inner(mu, shape, gamma)
    assert eps == pytest.approx(_theorem2_eps(mu, delta, mean, lam, inner), rel=1e-6)
    # ... and that order is the best one (a brute-force grid never does better).
    grid = 1.0 + np.geomspace(1e-3, 1e5, 4000)
    brute = min(_theorem2_eps(mu, delta, mean, a, inner) for a in grid)
    assert eps <= brute + 1e-9
    assert eps >= brute * (1 - 5e-3)


@pytest.mark.parametrize("mu,mean,shape", [(0.3, 10.0, 0.0), (1.0, 5.0, 1.0), (0.5, 20.0, 2.0)])
def test_selection_bound_matches_dp_accounting(mu, mean, shape):
    dpa = pytest.importorskip("dp_accounting")
    acc = dpa.rdp.RdpAccountant()
    acc.compose(dpa.dp_event.RepeatAndSelectDpEvent(dpa.GaussianDpEvent(1.0 / mu), mean, shape))
    theirs = acc.get_epsilon(1e-5)
    ours = tuning.selection_epsilon(mu, 1e-5, mean, shape)
    # Theirs minimises over a fixed grid of orders; ours over a continuum: never larger,
    # and close.
    assert ours <= theirs * (1 + 1e-6)
    assert ours >= theirs * 0.95


def test_calibrate_selection_mu():
    for eps, mean, shape in [(1.0, 10.0, 0.0), (0.5, 20.0, 1.0), (8.0, 5.0, 0.0)]:
        mu = tuning.calibrate_selection_mu(eps, 1e-5, mean, shape)
        assert tuning.selection_epsilon(mu, 1e-5, mean, shape) <= eps
        assert tuning.selection_epsilon(mu * 1.002, 1e-5, mean, shape) > eps * 0.999
        # Selection costs more than one fit at the same epsilon.
        assert mu < accounting.calibrate_mu(eps, 1e-5)


@pytest.mark.parametrize("shape,mean", [(0.0, 6.0), (1.0, 4.0), (2.5, 8.0)])
def test_repetitions_follow_truncated_negative_binomial(shape, mean):
    gamma = tuning.truncated_negative_binomial_gamma(shape, mean)
    rng = np.random.default_rng(12345 + int(10 * shape))
    n = 20000
    ks = np.array([tuning.sample_repetitions(rng, shape, gamma) for _ in range(n)])
    assert ks.min() >= 1
    # pmf sums to one and has the requested mean
    kk = np.arange(1, 20000)
    p = tuning.truncated_negative_binomial_pmf(kk, shape, gamma)
    assert p.sum() == pytest.approx(1.0, abs=1e-9)
    assert float(np.sum(kk * p)) == pytest.approx(mean, rel=1e-7)
    # chi-square goodness of fit over bins 1..m-1 and a tail bin
    m = int(np.searchsorted(np.cumsum(p), 0.99)) + 1
    observed = np.array([np.sum(ks == k) for k in range(1, m)] + [np.sum(ks >= m)])
    expected = n * np.concatenate([p[: m - 1], [1.0 - p[: m - 1].sum()]])
    assert expected.min() > 5
    stat, pval = scipy.stats.chisquare(observed, expected)
    assert pval > 1e-3, (stat, pval)
    assert ks.mean() == pytest.approx(mean, rel=0.05)


def test_geometric_is_a_special_case():
    gamma = tuning.truncated_negative_binomial_gamma(1.0, 5.0)
    assert gamma == pytest.approx(0.2, rel=1e-10)
    k = np.arange(1, 30)
    np.testing.assert_allclose(
        tuning.truncated_negative_binomial_pmf(k, 1.0, 0.2), 0.2 * 0.8 ** (k - 1), rtol=1e-12
    )


def _digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return X[:1200], y[:1200], X[1200:], y[1200:]


def test_selector_ledger_and_cost():
    X, y, Xt, yt = _digits()
    sel = PrivateSelector(
        DPLeastSquaresClassifier(classes=range(10)),
        {"gram_share": [0.3, 0.5], "reg": [1.0, 30.0]},
        epsilon=2.0,
        delta=1e-5,
        mean_repetitions=8,
        shape=0.0,
    )
    sel.fit(X, y)
    led = sel.privacy_
    assert led.epsilon <= 2.0
    assert led.epsilon == pytest.approx(
        tuning.selection_epsilon(sel.mu_, 1e-5, 8.0, 0.0), rel=1e-12
    )
    assert "Papernot & Steinke" in led.method
    # Each candidate fit spent at most its share of mu^2 (exact GDP).
    share = 0.05
    assert sel.best_estimator_.fit_privacy_.mu <= math.sqrt(1 - share) * sel.mu_ * (1 + 1e-9)
    assert sel.best_estimator_.privacy_ is led
    assert sel.best_params_ in sel.candidates_
    assert sel.score(Xt, yt) > 0.5
    assert sel.diagnostics_["n_repetitions"] == len(sel.diagnostics_["history"]) >= 1


def test_selector_replay_with_seed():
    X, y, _, _ = _digits()
    make = lambda seed: PrivateSelector(  # noqa: E731
        DPLeastSquaresClassifier(classes=range(10)),
        {"reg": [0.3, 3.0, 30.0]},
        epsilon=1.0,
        mean_repetitions=6,
        random_state=seed,
    )
    with pytest.warns(PrivacyWarning, match="random_state"):
        a = make(7).fit(X, y)
    with pytest.warns(PrivacyWarning):
        b = make(7).fit(X, y)
    with pytest.warns(PrivacyWarning):
        c = make(8).fit(X, y)
    assert a.diagnostics_ == b.diagnostics_
    assert a.best_params_ == b.best_params_ and a.best_score_ == b.best_score_
    np.testing.assert_array_equal(a.best_estimator_.coef_, b.best_estimator_.coef_)
    assert a.diagnostics_["history"] != c.diagnostics_["history"]


def test_selector_with_budget_and_errors():
    X, y, _, _ = _digits()
    budget = PrivacyBudget(3.0, 1e-5)
    sel = PrivateSelector(
        DPLeastSquaresClassifier(classes=range(10)),
        {"reg": [1.0, 10.0]},
        epsilon=2.0,
        delta=1e-5,
        budget=budget,
        mean_repetitions=4,
    ).fit(X, y)
    assert budget.epsilon_spent == pytest.approx(sel.privacy_.epsilon, rel=1e-6)
    with pytest.raises(PrivacyBudgetExceeded):
        PrivateSelector(
            DPLeastSquaresClassifier(classes=range(10)),
            {"reg": [1.0]},
            epsilon=2.0,
            delta=1e-5,
            budget=budget,
            mean_repetitions=4,
        ).fit(X, y)
    # A plain fit composes with the selection through RDP.
    DPLeastSquaresClassifier(epsilon=0.2, classes=range(10), budget=budget).fit(X, y)
    assert sel.privacy_.epsilon < budget.epsilon_spent <= 3.0
    assert isinstance(budget.fits[0][1][0], RepeatAndSelect)
    with pytest.raises(ValueError, match="must not set"):
        PrivateSelector(DPLeastSquaresClassifier(), {"epsilon": [1.0, 2.0]}).fit(X, y)
    with pytest.raises(ValueError, match="sample_rate"):
        PrivateSelector(DPSGDClassifier(sample_rate=0.1), {"steps": [5]}).fit(X, y)


def test_selector_charges_the_template_estimators_budget():
    """A budget set on the template (not on the selector) pays for the selection: the
    candidates are fitted without it, so it must not be dropped (it was: nothing
    recorded)."""
    X, y, _, _ = _digits()
    budget = PrivacyBudget(3.0, 1e-5)
    template = DPLeastSquaresClassifier(classes=range(10), budget=budget)
    sel = PrivateSelector(
        template, {"reg": [1.0, 10.0]}, epsilon=1.0, delta=1e-5, mean_repetitions=3
    ).fit(X, y)
    assert len(budget.fits) == 1 and isinstance(budget.fits[0][1][0], RepeatAndSelect)
    assert budget.epsilon_spent == pytest.approx(sel.privacy_.epsilon, rel=1e-6)
    # The same budget in both places is one budget; two different ones are refused
    # before anything is fitted or charged.
    PrivateSelector(
        template, {"reg": [1.0]}, epsilon=0.5, delta=1e-5, mean_repetitions=3, budget=budget
    ).fit(X, y)
    assert len(budget.fits) == 2
    other = PrivacyBudget(3.0, 1e-5)
    with pytest.raises(ValueError, match="one budget"):
        PrivateSelector(template, {"reg": [1.0]}, epsilon=0.5, delta=1e-5, budget=other).fit(X, y)
    assert len(budget.fits) == 2 and other.fits == []
    with pytest.raises(TypeError, match="estimator's budget"):
        PrivateSelector(
            DPLeastSquaresClassifier(classes=range(10), budget=1.0), {"reg": [1.0]}
        ).fit(X, y)


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_budget_composes_plain_gaussians_exactly_for_every_method(rng, method):
    """``method`` concerns subsampled releases only: fits of plain Gaussians compose by
    exact GDP (with "rdp" one fit at the budget's epsilon was charged 1.092 > 1 and
    refused)."""
    X, y = _data(rng)
    budget = PrivacyBudget(1.0, 1e-5, method=method)
    est = DPLeastSquaresClassifier(epsilon=1.0, delta=1e-5, classes=range(K), budget=budget)
    est.fit(X, y)
    assert budget.epsilon_spent == pytest.approx(est.privacy_.epsilon, rel=1e-9)
    assert budget.ledger().mu == pytest.approx(est.privacy_.mu, rel=1e-12)


def test_selector_failures_spend_nothing_and_scoring_data_checked(rng):
    """A selection that raises (here at its first candidate's fit, on bad input) returned
    nothing, so its reservation is withdrawn; mismatched scoring data is refused before
    any fit; the template's PrivacyWarnings are raised once."""
    X, y = _data(rng)
    budget = PrivacyBudget(5.0, 1e-5)
    template = DPLeastSquaresClassifier(classes=range(K))
    X_nan = X.copy()
    X_nan[3, 1] = np.nan
    for bad_x, bad_y, grid in (
        (X_nan, y, {"reg": [1.0, 10.0]}),
        (X, y[:-1], {"reg": [1.0, 10.0]}),
        (X, y + K, {"reg": [1.0, 10.0]}),
        (X, y, {"reg": [-1.0]}),
    ):
        with pytest.raises(ValueError):
            PrivateSelector(template, grid, epsilon=1.0, budget=budget).fit(bad_x, bad_y)
        assert budget.epsilon_spent == 0.0 and budget.fits == []
    sel = PrivateSelector(template, {"reg": [1.0]}, epsilon=1.0, budget=budget, mean_repetitions=2)
    with pytest.raises(ValueError, match="y_score must have one label per row"):
        sel.fit(X, y, X_score=X[:100], y_score=y[:1])
    with pytest.raises(ValueError, match="X_score must have the 6 features"):
        sel.fit(X, y, X_score=X[:, :3], y_score=y)
    assert budget.fits == []
    sel.fit(X, y)
    assert 0.9 < budget.epsilon_spent <= 1.0 + 1e-9 and len(budget.fits) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PrivateSelector(
            DPLeastSquaresClassifier(), {"reg": [1.0]}, epsilon=1.0, delta=0.1, mean_repetitions=2
        ).fit(X, y)
    texts = [str(w.message) for w in caught if issubclass(w.category, PrivacyWarning)]
    assert len(texts) == 2, texts
    assert any("classes=None" in t for t in texts) and any("exceeds 1/n" in t for t in texts)


def test_selector_interrupted_after_a_repetition_keeps_its_charge(rng):
    """Once a repetition has run (and, with verbose, shown its noisy score), a selection
    that stops keeps its reservation: Ctrl-C, or a later candidate's error, is no free
    rerun."""

    class Flaky(DPLeastSquaresClassifier):
        fits = 0

        def fit(self, X, y=None, **kw):
            type(self).fits += 1
            if type(self).fits == 2:
                raise KeyboardInterrupt
            if type(self).fits == 4:
                raise ValueError("a later candidate refused")
            return super().fit(X, y, **kw)

    X, y = _data(rng)
    budget = PrivacyBudget(5.0, 1e-5)
    for _ in range(2):
        # A seed whose number of repetitions reaches the failing fits (unseeded, a short
        # selection could end before them).
        sel = PrivateSelector(
            Flaky(classes=range(K)),
            {"reg": [1.0]},
            epsilon=1.0,
            budget=budget,
            mean_repetitions=50,
            random_state=7,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrivacyWarning)  # the fixed seed's warning
            with pytest.raises((KeyboardInterrupt, ValueError)):
                sel.fit(X, y)
    assert len(budget.fits) == 2 and budget.epsilon_spent > 1.0


# ---------------------------------------------------------------------------------------
# PrivacyWarning at fit
# ---------------------------------------------------------------------------------------


def test_privacy_warnings_at_fit(rng):
    X, y = _data(rng)
    with pytest.warns(PrivacyWarning, match="classes=None") as rec:
        DPLeastSquaresClassifier(epsilon=1.0).fit(X, y)
    assert len(rec) == 1
    with pytest.warns(PrivacyWarning, match="random_state=3 fixes the noise key") as rec:
        DPFCClassifier(epsilon=1.0, steps=1, classes=range(K), random_state=3).fit(X, y)
    assert len(rec) == 1 and "subtract" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrivacyWarning)
        DPLeastSquaresClassifier(epsilon=1.0, classes=range(K)).fit(X, y)  # the safe setting
        DPLeastSquaresClassifier(epsilon=math.inf, random_state=0).fit(X, y)  # non-private
        with pytest.raises(PrivacyWarning):
            DPLeastSquaresClassifier(epsilon=1.0).fit(X, y)
    assert issubclass(dpfc_native.PrivacyWarning, UserWarning)


def test_cli_train_states_privacy_warnings_in_option_words(rng, tmp_path):
    from typer.testing import CliRunner

    from dpfc_native.cli import app

    X, y = _data(rng)
    np.savez(tmp_path / "t.npz", features=X.astype(np.float32), labels=y)
    args = ["train", str(tmp_path / "t.npz"), "-m", "ls", "-e", "1"]
    res = CliRunner().invoke(
        app, args + ["--delta", "0.5", "--seed", "3", "-o", str(tmp_path / "a.npz")]
    )
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("privacy warning: ")]
    assert len(lines) == 3, res.output
    assert lines[0].startswith("privacy warning: no --classes or --num-classes, so the label")
    assert lines[0].endswith("Name the public label set with --classes or --num-classes.")
    assert lines[1].startswith("privacy warning: --seed 3 fixes the noise key")
    assert "Leave out --seed" in lines[1]
    assert lines[2].startswith(f"privacy warning: --delta 0.5 exceeds 1/n = {1 / X.shape[0]:.3g}")
    assert "random_state" not in res.output and "classes=" not in res.output
    assert "PrivacyWarning" not in res.output  # not Python's file:line form
    res = CliRunner().invoke(app, args + ["--num-classes", str(K), "-o", str(tmp_path / "b.npz")])
    assert res.exit_code == 0, res.output
    assert "privacy warning" not in res.output


# ---------------------------------------------------------------------------------------
# Progress without a terminal
# ---------------------------------------------------------------------------------------


def test_progress_plain_lines():
    buf = io.StringIO()
    with progress(3, "work", stream=buf, interval=0.0) as bar:
        for i in range(3):
            bar.advance(f"item {i}")
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("work: 0/3 (0%), started")
    assert lines[1].startswith("work: 1/3 (33%)") and "[item 0]" in lines[1] and "left" in lines[1]
    assert lines[-1].startswith("work: 3/3 (100%), done")
    buf = io.StringIO()
    with progress(100, "quiet", stream=buf, interval=3600.0) as bar:
        for _ in range(100):
            bar.advance()
    assert len(buf.getvalue().splitlines()) == 2  # started, done: nothing in between
    buf = io.StringIO()
    with progress(5, "off", stream=buf, enabled=False) as bar:
        bar.advance()
    assert buf.getvalue() == ""


def test_verbose_fit_reports_without_tty(rng, capsys):
    X, y = _data(rng)
    DPFCClassifier(epsilon=1.0, steps=3, classes=range(K), verbose=1).fit(X, y)
    err = capsys.readouterr().err
    assert "DP-FC: 0/3 (0%), started" in err
    assert "DP-FC: 3/3 (100%), done" in err


def _in_forked_child(fn) -> int:
    """Exit status of ``fn()`` run in a forked child (0 when it returns True)."""
    import os
    import signal

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(30)
            code = 0 if fn() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_budget_inherited_by_fork_refuses_to_spend(rng):
    """A budget that reached a child by fork (multiprocessing's default on Linux, a
    Process(target=est.fit)) was not detached: every child spent the whole total."""
    X, y = _data(rng)
    budget = PrivacyBudget(1.0, 1e-5)
    est = DPLeastSquaresClassifier(epsilon=0.8, classes=range(K), budget=budget)

    def child():
        try:
            est.fit(X, y)
        except PrivacyBudgetExceeded as e:
            return "inherited by fork" in str(e) and budget.epsilon_spent == 0.0
        return False

    assert _in_forked_child(child) == 0
    assert budget.epsilon_spent == 0.0 and not budget.fits
    est.fit(X, y)  # the parent still spends
    assert 0 < budget.epsilon_spent <= 0.8


def test_concurrent_fits_get_distinct_budget_labels(rng):
    """The label's number was counted outside the budget's lock: two fits starting
    together got the same number."""
    import threading
    import time

    X, y = _data(rng)
    budget = PrivacyBudget(8.0, 1e-5)
    gate = threading.Barrier(6)
    reserve = budget.reserve

    def slow_reserve(*args, **kwargs):  # every fit has its label before any reserves
        time.sleep(0.2)
        return reserve(*args, **kwargs)

    budget.reserve = slow_reserve

    def fit():
        est = DPLeastSquaresClassifier(epsilon=0.5, classes=range(K), budget=budget)
        gate.wait(20)
        est.fit(X, y)

    threads = [threading.Thread(target=fit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    labels = [label for label, _ in budget.fits]
    assert sorted(labels) == [f"DPLeastSquaresClassifier #{i}" for i in range(1, 7)], labels
