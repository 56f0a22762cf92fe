"""Tests for dpfc_native.accounting (pure Python; no compiled code needed).

dp-accounting is a test dependency for the cross-checks (skipped without it);
hypothesis drives the property tests.  All epsilons: add/remove adjacency.
"""

import dataclasses
import json
import logging
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from dpfc_native import accounting as acc

# dp_accounting logs a warning for every order its fractional series fails on.
logging.getLogger("absl").setLevel(logging.ERROR)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])

mus = st.floats(1e-3, 50.0)
deltas = st.floats(1e-15, 0.5).map(lambda d: float(d)) | st.sampled_from([1e-5, 8e-7, 1e-9])
log_deltas = st.floats(math.log(1e-15), math.log(0.5)).map(math.exp)
multipliers = st.floats(0.05, 200.0)
epsilons = st.floats(0.01, 20.0)


def _dpa():
    return pytest.importorskip("dp_accounting")


def _pld_gaussians(zs, counts, interval):
    dpa = _dpa()
    a = dpa.pld.PLDAccountant(value_discretization_interval=interval)
    for z, c in zip(zs, counts):
        a.compose(dpa.GaussianDpEvent(z), c)
    return a


def _pld_dpsgd(z, q, steps, interval):
    dpa = _dpa()
    a = dpa.pld.PLDAccountant(value_discretization_interval=interval)
    a.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps)
    return a


# ---------------------------------------------------------------------------
# Clear errors that name the argument
# ---------------------------------------------------------------------------

NAN = float("nan")


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda: acc.gdp_epsilon(1.0, 0.0), "delta"),
        (lambda: acc.gdp_epsilon(1.0, 1.0), "delta"),
        (lambda: acc.gdp_epsilon(1.0, -1e-5), "delta"),
        (lambda: acc.gdp_epsilon(1.0, NAN), "delta"),
        (lambda: acc.gdp_epsilon(-1.0, 1e-5), "mu"),
        (lambda: acc.gdp_epsilon(NAN, 1e-5), "mu"),
        (lambda: acc.gdp_delta(1.0, -0.5), "epsilon"),
        (lambda: acc.gdp_delta(1.0, NAN), "epsilon"),
        (lambda: acc.gaussian_epsilon(0.0, 1e-5), "noise_multipliers"),
        (lambda: acc.gaussian_epsilon([1.0, -2.0], 1e-5), "noise_multipliers"),
        (lambda: acc.gaussian_epsilon([1.0, NAN], 1e-5), "noise_multipliers"),
        (lambda: acc.gaussian_epsilon([1.0, 2.0], 1e-5, counts=[1, 2, 3]), "counts"),
        (lambda: acc.gaussian_epsilon(1.0, 1e-5, counts=0), "counts"),
        (lambda: acc.gaussian_epsilon(1.0, 1.5), "delta"),
        (lambda: acc.calibrate_noise_multiplier(0.0, 1e-5), "epsilon"),
        (lambda: acc.calibrate_noise_multiplier(-1.0, 1e-5), "epsilon"),
        (lambda: acc.calibrate_noise_multiplier(NAN, 1e-5), "epsilon"),
        (lambda: acc.calibrate_noise_multiplier(1.0, 0.0), "delta"),
        (lambda: acc.calibrate_noise_multiplier(1.0, 1e-5, releases=0), "releases"),
        (lambda: acc.calibrate_mu(0.0, 1e-5), "epsilon"),
        (lambda: acc.calibrate_plan(1.0, 1e-5, [0.5, 0.0]), "shares"),
        (lambda: acc.calibrate_plan(1.0, 1e-5, [0.5, NAN]), "shares"),
        (lambda: acc.calibrate_plan(1.0, 1e-5, {"a": 1.0}, {"b": 1}), "keys"),
        (lambda: acc.calibrate_dpfc_plan(1.0, 1e-5, 10, covariance_share=1.0), "covariance_share"),
        (lambda: acc.calibrate_dpfc_plan(1.0, 1e-5, 0), "steps"),
        (lambda: acc.dpsgd_epsilon(1.0, 0.0, 100, 1e-5), "sample_rate"),
        (lambda: acc.dpsgd_epsilon(1.0, 1.5, 100, 1e-5), "sample_rate"),
        (lambda: acc.dpsgd_epsilon(1.0, NAN, 100, 1e-5), "sample_rate"),
        (lambda: acc.dpsgd_epsilon(1.0, 0.1, 0, 1e-5), "steps"),
        (lambda: acc.dpsgd_epsilon(-1.0, 0.1, 10, 1e-5), "noise_multiplier"),
        (lambda: acc.dpsgd_epsilon(1.0, 0.1, 10, 1e-5, method="magic"), "method"),
        (lambda: acc.calibrate_dpsgd_noise_multiplier(0.0, 1e-5, 0.1, 10), "epsilon"),
        (lambda: acc.calibrate_dpsgd_noise_multiplier(1.0, 1e-5, 0.1, 0), "steps"),
        (lambda: acc.paper_rdp_epsilon(1.0, 2.0), "delta"),
        (lambda: acc.paper_calibrate_noise_multiplier(0.0, 1e-5, 3), "epsilon"),
        (lambda: acc.GaussianRelease(0.0), "noise_multiplier"),
        (lambda: acc.GaussianRelease(1.0, count=0), "count"),
        (lambda: acc.GaussianRelease(1.0, sensitivity=0.0), "sensitivity"),
        (lambda: acc.GaussianRelease(1.0, sensitivity=NAN), "sensitivity"),
        (lambda: acc.GaussianRelease.from_std(0.0, 1.0), "std"),
        (lambda: acc.SubsampledGaussian(1.0, 0.0, 10), "sample_rate"),
        (lambda: acc.SubsampledGaussian(1.0, 0.5, 0), "steps"),
        (lambda: acc.PrivacyAccountant(method="exact"), "method"),
        (lambda: acc.PrivacyAccountant().get_epsilon(0.0), "delta"),
        (lambda: acc.PrivacyAccountant().get_delta(-1.0), "epsilon"),
        (lambda: acc.ledger_for([acc.GaussianRelease(1.0)], 1.0), "delta"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()


def test_type_errors():
    with pytest.raises(TypeError):
        acc.gaussian_epsilon("1.0", 1e-5)
    with pytest.raises(TypeError):
        acc.GaussianRelease(True)
    with pytest.raises(TypeError, match="count"):  # a float is not an integer (one rule)
        acc.GaussianRelease(1.0, count=1.5)
    with pytest.raises(TypeError):
        acc.PrivacyAccountant().compose("gaussian")
    with pytest.raises(TypeError):
        acc.Composition([acc.GaussianRelease(1.0), 3])


def test_infinite_epsilon_means_no_noise():
    assert acc.calibrate_noise_multiplier(math.inf, 1e-5, 3) == 0.0
    assert acc.calibrate_mu(math.inf, 1e-5) == math.inf
    assert acc.calibrate_plan(math.inf, 1e-5, [1, 2]) == [0.0, 0.0]
    assert acc.calibrate_dpsgd_noise_multiplier(math.inf, 1e-5, 0.1, 10) == 0.0
    assert acc.paper_calibrate_noise_multiplier(math.inf, 1e-5, 3) == 0.0
    assert acc.gdp_delta(1.0, math.inf) == 0.0


# ---------------------------------------------------------------------------
# Exact GDP curve: edge cases, range, monotonicity, round trips
# ---------------------------------------------------------------------------


def test_gdp_edge_cases():
    assert acc.gdp_delta(0.0, 0.0) == 0.0
    assert acc.gdp_epsilon(0.0, 1e-5) == 0.0
    assert acc.gdp_delta(math.inf, 3.0) == 1.0
    assert acc.gdp_epsilon(math.inf, 1e-5) == math.inf
    # delta at eps = 0 is the total variation distance 2 Phi(mu/2) - 1
    for mu in [1e-3, 0.3, 1.0, 5.0]:
        tv = 2 * stats.norm.cdf(mu / 2) - 1
        assert acc.gdp_delta(mu, 0.0) == pytest.approx(tv, rel=1e-10)
        # never a negative epsilon: clipped at 0 when delta >= delta(0)
        assert acc.gdp_epsilon(mu, min(0.99, tv * 1.01)) == 0.0
    assert acc.gaussian_epsilon(math.inf, 1e-5) == 0.0  # infinite noise: free


def test_gdp_matches_closed_form_where_stable():
    for mu, eps in [(0.5, 0.5), (1.0, 1.0), (2.0, 3.0), (3.0, 2.0)]:
        direct = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(
            -eps / mu - mu / 2
        )
        assert acc.gdp_delta(mu, eps) == pytest.approx(direct, rel=1e-9)


def test_gdp_finite_and_monotone_over_range():
    mu_grid = np.geomspace(1e-3, 50, 25)
    eps_grid = [0.0, 1e-3, 0.01, 0.1, 0.5, 1, 2, 5, 10, 20, 50, 100]
    table = np.array([[acc.gdp_delta(m, e) for e in eps_grid] for m in mu_grid])
    assert np.all(np.isfinite(table)) and np.all((table >= 0) & (table <= 1))
    assert np.all(np.diff(table, axis=1) <= 1e-15)  # decreasing in epsilon
    assert np.all(np.diff(table, axis=0) >= -1e-15)  # increasing in mu
    delta_grid = [0.5, 1e-2, 1e-5, 8e-7, 1e-10, 1e-15, 1e-30]
    eps_tab = np.array([[acc.gdp_epsilon(m, d) for d in delta_grid] for m in mu_grid])
    assert np.all(np.isfinite(eps_tab)) and np.all(eps_tab >= 0)
    assert np.all(np.diff(eps_tab, axis=1) >= 0)  # smaller delta, larger epsilon
    assert np.all(np.diff(eps_tab, axis=0) >= 0)  # larger mu, larger epsilon
    assert eps_tab[-1, -1] < 2000  # mu = 50: large but finite


@FAST
@given(mu=mus, delta=log_deltas)
def test_gdp_round_trip_delta_eps_delta(mu, delta):
    eps = acc.gdp_epsilon(mu, delta)
    assert eps >= 0 and math.isfinite(eps)
    if eps > 0:
        d2 = acc.gdp_delta(mu, eps)
        assert d2 <= delta  # rounded the safe way
        assert d2 == pytest.approx(delta, rel=1e-8)


@FAST
@given(mu=mus, eps=st.floats(0.0, 100.0))
def test_gdp_round_trip_eps_delta_eps(mu, eps):
    d = acc.gdp_delta(mu, eps)
    assume(1e-300 < d < 0.999)
    assert acc.gdp_epsilon(mu, d) == pytest.approx(eps, rel=1e-7, abs=1e-9)


# ---------------------------------------------------------------------------
# Non-subsampled compositions against dp_accounting
# ---------------------------------------------------------------------------

COMPOSITIONS = [
    ([1.0], [1]),
    ([0.5], [1]),
    ([20.0], [1]),
    ([5.0], [11]),  # DP-FC, T = 10, same multiplier
    ([2.0, 3.0], [1, 10]),  # DP-FC with a budget split
    ([1.0, 2.0, 4.0], [1, 3, 5]),
    ([30.0, 10.0], [2, 100]),  # DP-Newton-like
]


@pytest.mark.parametrize("zs, counts", COMPOSITIONS)
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 8e-7, 1e-9])
def test_gaussian_composition_matches_pld(zs, counts, delta):
    interval = 1e-3
    pld = _pld_gaussians(zs, counts, interval).get_epsilon(delta)
    ours = acc.gaussian_epsilon(zs, delta, counts)
    assert abs(ours - pld) <= 5e-3 * pld
    # exact is below the pessimistic PLD, by no more than its discretisation
    assert ours <= pld * (1 + 1e-9)
    assert ours >= pld - len(zs) * interval
    # and the deltas agree the other way round
    assert acc.gaussian_delta(zs, ours, counts) == pytest.approx(delta, rel=1e-6)


@pytest.mark.parametrize("zs, counts", COMPOSITIONS[:4])
def test_gaussian_composition_vs_dp_accounting_rdp(zs, counts):
    dpa = _dpa()
    r = dpa.rdp.RdpAccountant()
    for z, c in zip(zs, counts):
        r.compose(dpa.GaussianDpEvent(z), c)
    # RDP is a valid but looser bound than the exact curve
    assert acc.gaussian_epsilon(zs, 1e-5, counts) <= r.get_epsilon(1e-5)
    # our RDP path on the same events agrees with dp_accounting's RDP
    a = acc.PrivacyAccountant(method="rdp")
    for z, c in zip(zs, counts):
        a.compose(acc.GaussianRelease(z, count=c))
    # (ours may be a little tighter: orders up to 1e4 and refined between grid points)
    assert 0.97 * r.get_epsilon(1e-5) <= a.get_epsilon(1e-5) <= r.get_epsilon(1e-5) * (1 + 1e-9)


# ---------------------------------------------------------------------------
# RDP of the sampled Gaussian
# ---------------------------------------------------------------------------


def _quad_log_a(q, s, a):
    """Independent check: log A_alpha = log E_{N(0, s^2)}[(1 - q + q e^{(2x-1)/(2s^2)})^a]
    by numerical integration (scaled by the integrand's peak to avoid overflow)."""

    def log_f(x):
        return stats.norm.logpdf(x, 0, s) + a * np.logaddexp(
            math.log1p(-q), math.log(q) + (2 * x - 1) / (2 * s * s)
        )

    lo, hi = -14 * s, a + 14 * s  # the integrand peaks near 0 and, for large a, near a
    peak = float(np.max(log_f(np.linspace(lo, hi, 20001))))
    v, _ = integrate.quad(
        lambda x: math.exp(log_f(x) - peak),
        lo,
        hi,
        epsabs=0,
        epsrel=1e-13,
        limit=500,
        points=[0.0, 0.5, 1.0, a],
    )
    return peak + math.log(v)


@pytest.mark.parametrize("z", [0.5, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("q", [1e-3, 0.01, 0.2, 0.5, 0.9])
def test_rdp_matches_numerical_integration(z, q):
    orders = [1.01, 1.1, 1.5, 2.0, 2.5, 3.0, 4.75, 8.0, 12.3]
    ours = acc.subsampled_gaussian_rdp(z, q, 1, orders)
    for a, r in zip(orders, ours):
        exact = _quad_log_a(q, z, a) / (a - 1)
        # log A is known to ~1e-13 from the quadrature; RDP = log A / (a - 1)
        tol = 1e-12 / (a - 1)
        assert r >= exact * (1 - 1e-9) - tol  # never optimistic
        assert r == pytest.approx(exact, rel=1e-7, abs=tol)


@pytest.mark.parametrize("z", [0.7, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("q", [1e-3, 0.05, 0.5])
def test_rdp_integer_orders_match_dp_accounting(z, q):
    dpa = _dpa()
    orders = [2, 3, 5, 8, 16, 32, 64, 256]
    r = dpa.rdp.RdpAccountant(orders=orders)
    r.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), 7)
    ours = acc.subsampled_gaussian_rdp(z, q, 7, orders)
    np.testing.assert_allclose(ours, r._rdp, rtol=1e-8, atol=1e-13)  # atol: rounding pad
    assert np.all(ours >= r._rdp * (1 - 1e-12))


def test_rdp_q1_is_gaussian_and_monotone_in_order():
    orders = np.array(acc.DEFAULT_RDP_ORDERS)
    np.testing.assert_allclose(acc.subsampled_gaussian_rdp(2.0, 1.0, 3), 3 * orders / 8)
    r = acc.subsampled_gaussian_rdp(1.3, 0.02, 1)
    assert np.all(np.diff(r) >= -1e-15)  # RDP is nondecreasing in the order
    assert np.all(r <= orders / (2 * 1.3**2) + 1e-15)  # subsampling never hurts


# ---------------------------------------------------------------------------
# Subsampled DP-SGD against dp_accounting
# ---------------------------------------------------------------------------

# (z, q, steps, bound on RDP / PLD): the bound is the measured ratio (for
# delta in {1e-5, 8e-7}) rounded up, as a regression test of the RDP path.
DPSGD_GRID = [
    (1.5, 0.04, 2250, 1.09),  # the Opacus example
    (1.1, 256 / 60000, 14063, 1.10),  # the TF Privacy MNIST example
    (4.0, 0.1, 1000, 1.09),
    (2.0, 0.1, 100, 1.11),
    (3.0, 0.5, 10, 1.11),
    (1.0, 0.01, 1000, 1.16),
    (10.0, 0.01, 1000, 1.13),  # small epsilon
    (0.8, 0.01, 100, 1.46),  # few steps at small q: bad for RDP
]


@pytest.mark.parametrize("z, q, steps, rdp_bound", DPSGD_GRID)
def test_dpsgd_vs_pld(z, q, steps, rdp_bound):
    dpa = _dpa()
    deltas_ = [1e-5, 8e-7]
    rdp = [acc.dpsgd_epsilon(z, q, steps, d, method="rdp") for d in deltas_]
    ref = _pld_dpsgd(z, q, steps, min(2e-4, rdp[0] / 5000))
    r = dpa.rdp.RdpAccountant()
    r.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps)
    for d, e_rdp in zip(deltas_, rdp):
        pld = ref.get_epsilon(d)
        # Default ("auto": the better of our RDP and dp_accounting's pessimistic
        # PLD): never below the reference PLD by more than 1%, within 10% above.
        auto = acc.dpsgd_epsilon(z, q, steps, d)
        assert 0.99 * pld <= auto <= 1.10 * pld
        # The dependency-free RDP path: sound (never below PLD by more than
        # 1%), looser by the measured factor.
        assert 0.99 * pld <= e_rdp <= rdp_bound * pld
        # ... and at least as tight as dp_accounting's own RDP accountant.
        assert 0.98 * r.get_epsilon(d) <= e_rdp <= r.get_epsilon(d) * (1 + 1e-6)


def test_q_equal_one_reduces_to_exact_gdp():
    for z, steps in [(1.0, 1), (5.0, 11), (20.0, 500)]:
        exact = acc.gaussian_epsilon(z, 1e-5, steps)
        for method in ("auto", "rdp", "pld"):
            assert acc.dpsgd_epsilon(z, 1.0, steps, 1e-5, method=method) == exact
        a = acc.PrivacyAccountant().compose(acc.SubsampledGaussian(z, 1.0, steps))
        assert a.is_exact_gdp and a.get_epsilon(1e-5) == exact
        assert acc.calibrate_dpsgd_noise_multiplier(
            2.0, 1e-5, 1.0, steps
        ) == acc.calibrate_noise_multiplier(2.0, 1e-5, steps)


def test_mixture_of_gdp_and_subsampled_is_sound():
    dpa = _dpa()
    a = acc.PrivacyAccountant(method="rdp")
    a.compose(acc.GaussianRelease(10.0, name="covariance"))
    a.compose(acc.SubsampledGaussian(1.0, 0.01, 1000, name="dpsgd"))
    eps = a.get_epsilon(1e-5)
    assert a.mu is None and not a.is_exact_gdp
    ref = dpa.pld.PLDAccountant(value_discretization_interval=1e-4)
    ref.compose(dpa.GaussianDpEvent(10.0))
    ref.compose(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.0)), 1000)
    assert eps >= 0.99 * ref.get_epsilon(1e-5)
    assert eps > acc.dpsgd_epsilon(1.0, 0.01, 1000, 1e-5, method="rdp")
    auto = acc.PrivacyAccountant().compose(a.events[0]).compose(a.events[1])
    assert auto.get_epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-2)
    assert auto.get_epsilon_and_method(1e-5) == (auto.get_epsilon(1e-5), "pld")


def test_without_dp_accounting_falls_back_to_rdp(monkeypatch):
    monkeypatch.setattr(acc.accountant, "_dp_accounting", lambda: None)
    a = acc.PrivacyAccountant().compose(acc.SubsampledGaussian(1.5, 0.04, 2250))
    assert a.get_epsilon(1e-5) == acc.dpsgd_epsilon(1.5, 0.04, 2250, 1e-5, method="rdp")
    assert a.get_epsilon_and_method(1e-5)[1] == "rdp"
    with pytest.raises(ImportError, match=r"dp_accounting.*dpfc-native\[accounting\]"):
        acc.dpsgd_epsilon(1.5, 0.04, 2250, 1e-5, method="pld")
    # the exact GDP path never needed it
    assert acc.gaussian_epsilon(5.0, 1e-5, 11) == pytest.approx(2.737785, abs=1e-6)


def test_per_step_composition_equals_bulk():
    # Opacus-style: one compose per step; identical events are merged.
    a = acc.PrivacyAccountant(method="rdp")
    for _ in range(500):
        a.compose(acc.SubsampledGaussian(1.2, 0.02, 1))
    b = acc.dpsgd_epsilon(1.2, 0.02, 500, 1e-5, method="rdp")
    assert a.get_epsilon(1e-5) == pytest.approx(b, rel=1e-12)


# ---------------------------------------------------------------------------
# Pinned values from the literature
# ---------------------------------------------------------------------------

# Opacus, tests/accountants_test.py (pytorch/opacus): RDPAccountant with
# noise_multiplier 1.5, sample_rate 0.04, steps int(90 / 0.04) = 2250,
# delta 1e-5 -> 7.32911117143 with its default orders
# [1 + x / 10 for x in range(1, 100)] + list(range(12, 64)) and the
# Balle et al. 2020 conversion.  Its PRV accountant gives 6.777395712150674 and
# get_noise_multiplier(eps 8, delta 1e-5, q 0.04, 90 epochs) -> 1.416 (RDP,
# bisection to 0.01) and 1.34765625 (PRV).
OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def test_pinned_opacus_rdp_value():
    rdp = acc.subsampled_gaussian_rdp(1.5, 0.04, 2250, OPACUS_ORDERS)
    assert acc.rdp_to_epsilon(OPACUS_ORDERS, rdp, 1e-5) == pytest.approx(7.32911117143, rel=1e-6)
    ours = acc.dpsgd_epsilon(1.5, 0.04, 2250, 1e-5, method="rdp")
    assert 7.30 <= ours <= 7.32911117143  # denser orders can only help
    z = acc.calibrate_dpsgd_noise_multiplier(8.0, 1e-5, 0.04, 2250, method="rdp")
    assert z == pytest.approx(1.416, abs=0.01)


def test_pinned_opacus_prv_value():
    _dpa()
    eps = acc.dpsgd_epsilon(1.5, 0.04, 2250, 1e-5)  # auto: PLD
    assert eps == pytest.approx(6.777395712150674, rel=1e-2)
    z = acc.calibrate_dpsgd_noise_multiplier(8.0, 1e-5, 0.04, 2250)
    assert z == pytest.approx(1.34765625, rel=1e-2)
    assert acc.dpsgd_epsilon(z, 0.04, 2250, 1e-5) <= 8.0


# TensorFlow Privacy README ("Computing the privacy budget" / compute_dp_sgd_privacy):
# N = 60000, batch 256, noise multiplier 1.1, 60 epochs, delta 1e-5 -> "eps = 3.01"
# with the original conversion eps = min_a rdp(a) - log(delta) / (a - 1) and
# steps = ceil(60 * 60000 / 256) = 14063.  The improved conversion gives ~2.60.
def test_pinned_tf_privacy_mnist_value():
    q, steps = 256 / 60000, 14063
    orders = np.array(OPACUS_ORDERS, dtype=float)
    rdp = acc.subsampled_gaussian_rdp(1.1, q, steps, orders)
    old_conversion = float(np.min(rdp - math.log(1e-5) / (orders - 1)))
    assert round(old_conversion, 2) == 3.01
    ours = acc.dpsgd_epsilon(1.1, q, steps, 1e-5, method="rdp")
    assert ours == pytest.approx(2.597, abs=2e-3)


# The GDP curve itself: mu = 1 at delta = 1e-5 (dp_accounting PLD: 4.377178).
def test_pinned_gdp_value():
    assert acc.gdp_epsilon(1.0, 1e-5) == pytest.approx(4.377178, abs=2e-6)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


@FAST
@given(z1=multipliers, z2=multipliers, count=st.integers(1, 1000), delta=deltas)
def test_epsilon_decreases_in_multiplier(z1, z2, count, delta):
    lo, hi = sorted([z1, z2])
    # Monotone to gdp_epsilon's stated accuracy (a relative 1e-12: multipliers one ulp
    # apart, e.g. 0.05 and 0.05000000000000001, may come back in either order).
    e_lo, e_hi = acc.gaussian_epsilon(lo, delta, count), acc.gaussian_epsilon(hi, delta, count)
    assert e_lo >= e_hi * (1 - 1e-12)


@FAST
@given(z=multipliers, c1=st.integers(1, 10_000), c2=st.integers(1, 10_000), delta=deltas)
def test_epsilon_increases_in_count(z, c1, c2, delta):
    lo, hi = sorted([c1, c2])
    assert acc.gaussian_epsilon(z, delta, lo) <= acc.gaussian_epsilon(z, delta, hi)


@SLOW
@given(
    z=st.floats(0.6, 20.0),
    q1=st.floats(1e-4, 0.9),
    q2=st.floats(1e-4, 0.9),
    s1=st.integers(1, 3000),
    s2=st.integers(1, 3000),
)
def test_dpsgd_epsilon_monotone(z, q1, q2, s1, s2):
    d = 1e-5
    (qa, qb), (sa, sb) = sorted([q1, q2]), sorted([s1, s2])
    e = acc.dpsgd_epsilon
    assert e(z, qa, sa, d, method="rdp") <= e(z, qb, sa, d, method="rdp") * (1 + 1e-9)
    assert e(z, qa, sa, d, method="rdp") <= e(z, qa, sb, d, method="rdp") * (1 + 1e-9)
    assert e(z, qa, sa, d, method="rdp") >= e(z * 1.1, qa, sa, d, method="rdp") * (1 - 1e-9)
    assert e(z, qb, sb, d, method="rdp") <= e(z, 1.0, sb, d) * (1 + 1e-9)  # subsampling helps


@FAST
@given(eps=epsilons, delta=deltas, releases=st.integers(1, 200))
def test_calibration_is_conservative_and_tight(eps, delta, releases):
    z = acc.calibrate_noise_multiplier(eps, delta, releases)
    got = acc.gaussian_epsilon(z, delta, releases)
    assert 0.999 * eps <= got <= eps
    mu = acc.calibrate_mu(eps, delta)
    assert 0.999 * eps <= acc.gdp_epsilon(mu, delta) <= eps
    assert acc.gdp_delta(mu, eps) <= delta


@FAST
@given(
    eps=epsilons,
    delta=deltas,
    shares=st.lists(st.floats(0.01, 10.0), min_size=1, max_size=5),
    data=st.data(),
)
def test_calibrate_plan_is_conservative_and_respects_shares(eps, delta, shares, data):
    counts = data.draw(st.lists(st.integers(1, 100), min_size=len(shares), max_size=len(shares)))
    zs = acc.calibrate_plan(eps, delta, shares, counts)
    got = acc.gaussian_epsilon(zs, delta, counts)
    assert 0.999 * eps <= got <= eps
    mu2 = [c / z**2 for z, c in zip(zs, counts)]
    np.testing.assert_allclose(np.array(mu2) / sum(mu2), np.array(shares) / sum(shares), rtol=1e-9)


@FAST
@given(mu=st.floats(0.01, 20.0), delta=deltas)
def test_paper_conversion_is_looser_than_exact(mu, delta):
    assert acc.paper_rdp_epsilon(mu, delta) >= acc.gdp_epsilon(mu, delta)


@SLOW
@given(z=st.floats(0.8, 8.0), q=st.floats(1e-3, 0.3), steps=st.integers(10, 2000), delta=deltas)
def test_rdp_accountant_round_trip(z, q, steps, delta):
    a = acc.PrivacyAccountant(method="rdp").compose(acc.SubsampledGaussian(z, q, steps))
    eps = a.get_epsilon(delta)
    assume(eps > 1e-6)
    assert a.get_delta(eps) == pytest.approx(delta, rel=1e-3)
    assert a.get_delta(eps) <= delta * (1 + 1e-6)


@pytest.mark.parametrize("eps, q, steps", [(1.0, 0.01, 1000), (8.0, 0.1, 300), (0.3, 0.05, 50)])
def test_dpsgd_calibration_is_conservative(eps, q, steps):
    z = acc.calibrate_dpsgd_noise_multiplier(eps, 1e-5, q, steps, method="rdp")
    got = acc.dpsgd_epsilon(z, q, steps, 1e-5, method="rdp")
    assert 0.999 * eps <= got <= eps


def test_large_epsilon_and_little_noise_do_not_crash():
    # opacus #601/#604: crashes at large epsilon; #585: negative epsilon
    assert math.isfinite(acc.dpsgd_epsilon(0.3, 0.5, 1000, 1e-5, method="rdp"))
    assert acc.dpsgd_epsilon(1e4, 1e-3, 10, 1e-5, method="rdp") >= 0.0
    assert acc.dpsgd_epsilon(1e4, 1e-3, 10, 1e-5) >= 0.0
    z = acc.calibrate_noise_multiplier(100.0, 1e-5, 10)
    assert 99.9 <= acc.gaussian_epsilon(z, 1e-5, 10) <= 100.0
    z = acc.calibrate_dpsgd_noise_multiplier(50.0, 1e-5, 0.2, 100, method="rdp")
    assert acc.dpsgd_epsilon(z, 0.2, 100, 1e-5, method="rdp") <= 50.0


# ---------------------------------------------------------------------------
# DP-FC plan and the paper comparison
# ---------------------------------------------------------------------------


def test_dpfc_plan_same_multiplier_and_split():
    same = acc.calibrate_dpfc_plan(1.0, 1e-5, 10)
    assert same["covariance"] == pytest.approx(same["gradient"], rel=1e-12)
    assert same["covariance"] == pytest.approx(
        acc.calibrate_noise_multiplier(1.0, 1e-5, 11), rel=1e-9
    )
    split = acc.calibrate_dpfc_plan(1.0, 1e-5, 10, covariance_share=0.5)
    # half of mu^2 for one release: much less covariance noise than 1/11
    assert split["covariance"] < same["covariance"] / 2
    eps = acc.gaussian_epsilon([split["covariance"], split["gradient"]], 1e-5, [1, 10])
    assert 0.999 <= eps <= 1.0


@pytest.mark.parametrize(
    "delta, eps, lo, hi",
    [
        # The paper's conversion needs 13% (eps 8) to 44% (eps 0.1) more noise
        (8e-7, 8.0, 1.12, 1.15),
        (8e-7, 0.1, 1.42, 1.46),
        (1e-5, 1.0, 1.25, 1.40),
    ],
)
def test_noise_saved_against_paper_conversion(delta, eps, lo, hi):
    ours = acc.calibrate_noise_multiplier(eps, delta, 11)
    paper = acc.paper_calibrate_noise_multiplier(eps, delta, 11)
    assert lo <= paper / ours <= hi
    # the paper's multiplier does meet its own (loose) bound exactly
    assert acc.paper_rdp_epsilon(math.sqrt(11) / paper, delta) == pytest.approx(eps, rel=1e-12)


# ---------------------------------------------------------------------------
# Value objects, accountant, ledger
# ---------------------------------------------------------------------------


def test_value_objects_are_frozen_and_hashable():
    g = acc.GaussianRelease(2.0, count=3, name="g", sensitivity=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.noise_multiplier = 1.0
    assert g == acc.GaussianRelease(2.0, 3, "g", 0.5) and len({g, g}) == 1
    assert g.std == 1.0 and g.mu_squared == pytest.approx(0.75)
    assert acc.GaussianRelease.from_std(3.0, 1.5).noise_multiplier == 2.0
    s = acc.SubsampledGaussian(1.0, 0.1, 100, name="sgd")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 3
    c = acc.Composition([g, acc.Composition([s, g])])
    assert c.events == (g, s, g) and hash(c) == hash(acc.Composition((g, s, g)))


def test_accountant_compose_chains_and_matches_functions():
    a = acc.PrivacyAccountant()
    assert a.get_epsilon(1e-5) == 0.0 and a.get_delta(1.0) == 0.0
    assert a.compose(acc.GaussianRelease(4.0)) is a
    a.compose(acc.Composition([acc.GaussianRelease(4.0, count=10)]))
    assert a.is_exact_gdp and a.mu == pytest.approx(math.sqrt(11) / 4)
    assert a.get_epsilon(1e-5) == acc.gaussian_epsilon(4.0, 1e-5, 11)
    assert a.get_delta(2.0) == acc.gaussian_delta(4.0, 2.0, 11)
    assert a.get_epsilon_and_method(1e-5)[1] == "gdp"
    b = acc.PrivacyAccountant().compose(acc.GaussianRelease(4.0), count=11)
    assert b.get_epsilon(1e-5) == a.get_epsilon(1e-5)


def test_ledger_table_and_dict():
    releases = [
        acc.GaussianRelease.from_std(20.0, 4.0, name="covariance"),  # z = 5
        acc.GaussianRelease(5.0, count=10, name="gradient", sensitivity=0.5),
    ]
    ledger = acc.ledger_for(releases, 1e-5)
    assert ledger.epsilon == acc.gaussian_epsilon(5.0, 1e-5, 11)
    d = ledger.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["adjacency"] == acc.ADJACENCY == "add/remove one example"
    assert [r["name"] for r in d["releases"]] == ["covariance", "gradient"]
    assert d["releases"][0]["noise_std"] == 20.0 and d["releases"][1]["noise_std"] == 2.5
    assert sum(r["share"] for r in d["releases"]) == pytest.approx(1.0)
    assert d["releases"][0]["share"] == pytest.approx(1 / 11)
    text = str(ledger)
    for word in [
        "covariance",
        "gradient",
        "noise std",
        "multiplier",
        "share",
        "epsilon",
        "add/remove",
    ]:
        assert word in text
    mixed = acc.ledger_for(
        releases + [acc.SubsampledGaussian(2.0, 0.01, 100, name="sgd")], 1e-5, method="rdp"
    )
    assert mixed.mu is None and "sgd" in str(mixed)
    json.dumps(mixed.to_dict(), allow_nan=False)


# --------------------------------------------------------------------------------------
# The package layout: old names, supports(), side-effect-free getters
# --------------------------------------------------------------------------------------

#: Every public name of ``dpfc_native.accounting`` when it was a single module.
_OLD_PUBLIC_NAMES = (
    "ADJACENCY",
    "Composition",
    "DEFAULT_RDP_ORDERS",
    "Event",
    "GaussianRelease",
    "LedgerEntry",
    "MAX_EPSILON",
    "PrivacyAccountant",
    "PrivacyLedger",
    "SAMPLER_TAIL_PROBABILITY",
    "SubsampledGaussian",
    "calibrate_dpfc_plan",
    "calibrate_dpsgd_noise_multiplier",
    "calibrate_mu",
    "calibrate_noise_multiplier",
    "calibrate_plan",
    "dpsgd_epsilon",
    "gaussian_delta",
    "gaussian_epsilon",
    "gaussian_mu",
    "gdp_delta",
    "gdp_epsilon",
    "ledger_for",
    "paper_calibrate_noise_multiplier",
    "paper_rdp_epsilon",
    "rdp_to_delta",
    "rdp_to_epsilon",
    "sampler_tail_delta",
    "subsampled_gaussian_rdp",
    "with_sampler_tail",
)
#: Its ``__all__``.
_OLD_ALL = (
    "ADJACENCY",
    "DEFAULT_RDP_ORDERS",
    "gdp_delta",
    "gdp_epsilon",
    "gaussian_mu",
    "gaussian_epsilon",
    "gaussian_delta",
    "subsampled_gaussian_rdp",
    "rdp_to_epsilon",
    "rdp_to_delta",
    "dpsgd_epsilon",
    "paper_rdp_epsilon",
    "paper_calibrate_noise_multiplier",
    "GaussianRelease",
    "SubsampledGaussian",
    "Composition",
    "PrivacyAccountant",
    "calibrate_mu",
    "calibrate_noise_multiplier",
    "calibrate_plan",
    "calibrate_dpfc_plan",
    "calibrate_dpsgd_noise_multiplier",
    "LedgerEntry",
    "PrivacyLedger",
    "ledger_for",
    "sampler_tail_delta",
    "with_sampler_tail",
    "MAX_EPSILON",
)


@pytest.mark.parametrize("name", _OLD_PUBLIC_NAMES)
def test_old_public_names_import_from_the_package(name):
    namespace: dict = {}
    exec(f"from dpfc_native.accounting import {name}", namespace)
    obj = namespace[name]
    # One object, defined once in a submodule (no copies that could drift).
    owners = [
        m
        for m in ("gdp", "rdp", "paper", "events", "accountant", "calibration", "ledger")
        if getattr(getattr(acc, m), name, None) is obj and name in vars(getattr(acc, m))
    ]
    assert owners, name


def test_old_star_import_list_is_kept():
    assert set(_OLD_ALL) <= set(acc.__all__)
    namespace: dict = {}
    exec("from dpfc_native.accounting import *", namespace)
    assert set(_OLD_ALL) <= set(namespace)


def test_supports_matches_what_compose_accepts():
    g = acc.GaussianRelease(3.0, name="g")
    s = acc.SubsampledGaussian(1.0, 0.1, 5, name="s")
    for event in (g, s, acc.Composition([g, s]), acc.Composition(())):
        assert acc.PrivacyAccountant.supports(event) is True
        acc.PrivacyAccountant().compose(event)
    for event in (3.0, "gaussian", None, (g,), [g], {"z": 3.0}):
        assert acc.PrivacyAccountant().supports(event) is False
        with pytest.raises(TypeError, match="event"):
            acc.PrivacyAccountant().compose(event)


def _state(a) -> dict:
    return {
        k: (v.tolist() if isinstance(v, np.ndarray) else list(v) if isinstance(v, list) else v)
        for k, v in vars(a).items()
    }


@pytest.mark.parametrize("method", ["auto", "rdp"])
@pytest.mark.parametrize("subsampled", [False, True])
def test_getters_have_no_side_effects(method, subsampled):
    a = acc.PrivacyAccountant(method=method).compose(acc.GaussianRelease(3.0), count=2)
    if subsampled:
        a.compose(acc.SubsampledGaussian(1.2, 0.05, 40))
    before = _state(a)
    e1, m1 = a.get_epsilon_and_method(1e-5)
    d1, n1 = a.get_delta_and_method(e1)
    answers = (a.get_epsilon(1e-6), a.get_delta(0.5), a.mu, a.is_exact_gdp, a.rdp()[:3].tolist())
    # Same state, and the same answers whatever was asked in between.
    assert _state(a) == before and not hasattr(a, "effective_method")
    assert a.get_epsilon_and_method(1e-5) == (e1, m1) and a.get_epsilon(1e-5) == e1
    assert a.get_delta_and_method(e1) == (d1, n1) and a.get_delta(e1) == d1
    assert (
        a.get_epsilon(1e-6),
        a.get_delta(0.5),
        a.mu,
        a.is_exact_gdp,
        a.rdp()[:3].tolist(),
    ) == answers
    assert _state(a) == before
    expected = (
        "gdp"
        if method == "auto" and not subsampled
        else ("rdp", "pld")
        if method == "auto"
        else "rdp"
    )
    assert m1 in expected and n1 in expected


# ---------------------------------------------------------------------------------------
# Ledgers never state more than their target
# ---------------------------------------------------------------------------------------


def test_full_batch_sgd_ledger_is_exact_gdp_whatever_the_accountant():
    """Full-batch DP-SGD is calibrated with exact GDP; its ledger (and its plan's) must
    not restate it through RDP or PLD, which are looser (1.09 at a target of 1)."""
    import warnings

    from dpfc_native import DPSGDClassifier, PrivacyWarning
    from dpfc_native.plan import noise_plans

    rng = np.random.default_rng(21)
    x, y = rng.standard_normal((300, 5)), np.arange(300) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivacyWarning)
        ledgers = {
            a: DPSGDClassifier(epsilon=1.0, steps=10, accountant=a, classes=range(3))
            .fit(x, y)
            .privacy_
            for a in ("auto", "rdp", "pld")
        }
    for a, ledger in ledgers.items():
        assert ledger.epsilon <= 1.0 and ledger.epsilon == pytest.approx(1.0, rel=1e-3), a
        assert ledger.epsilon == ledgers["auto"].epsilon and "exact" in ledger.method, a
    for a in ("rdp", "pld"):
        plan = noise_plans(300, 5, 3, [0.5], method="sgd", steps=10, accountant=a)[0]
        assert plan.ledger().epsilon <= 0.5


def test_calibrated_releases_rebuilt_from_their_std_stay_within_target():
    """Fits release std = z * sensitivity and their ledgers rebuild z = std / sensitivity
    (an ulp lower) and evaluate the curve again: still <= the target, for any
    sensitivity (2.000000000000177 at a target of 2 before)."""
    rng = np.random.default_rng(22)
    worst = 0.0
    for eps in (0.1, 0.5, 1.0, 2.0, 3.0, 8.0):
        for count in (1, 3, 10, 50):
            z = acc.calibrate_noise_multiplier(eps, 1e-5, count)
            for sens in rng.uniform(0.01, 100.0, size=20).tolist() + [math.sqrt(2 / 3)]:
                r = acc.GaussianRelease.from_std(z * sens, sens, count=count)
                worst = max(worst, acc.ledger_for([r], 1e-5).epsilon / eps - 1.0)
            zs = acc.calibrate_plan(eps, 1e-5, [0.2, 0.8], [1, count])
            rel = [
                acc.GaussianRelease.from_std(zj * 0.7, 0.7, count=c)
                for zj, c in zip(zs, [1, count])
            ]
            worst = max(worst, acc.ledger_for(rel, 1e-5).epsilon / eps - 1.0)
    assert worst <= 0.0, worst


def test_calibration_refuses_targets_below_the_accurate_curve():
    with pytest.raises(ValueError, match=r"epsilon=1e-12 at delta=1e-30 needs mu"):
        acc.calibrate_noise_multiplier(1e-12, 1e-30)
    with pytest.raises(ValueError, match="below 1e-06"):
        acc.calibrate_mu(1e-9, 1e-100)
    # Small but accurate targets still calibrate, within the documented 0.1%.
    for eps, delta in ((1e-3, 1e-5), (1e-4, 1e-10), (1e-5, 1e-30)):
        mu = acc.calibrate_mu(eps, delta)
        assert mu >= acc.calibration.MIN_MU
        assert (1 - 1e-3) * eps <= acc.gdp_epsilon(mu, delta) <= eps


def test_printed_ledger_never_understates_epsilon_or_delta():
    """str(ledger) printed delta with ".3g": 1.2345e-6 as 1.23e-06, a smaller delta than
    the one accounted; values the usual rounding prints exactly stay as they were."""
    from dpfc_native.accounting.ledger import _rounded_up

    led = acc.ledger_for([acc.GaussianRelease(5.0, sensitivity=1.0)], 1.2345e-6)
    total = str(led).splitlines()[-2]
    assert "delta = 1.235e-06" in total
    eps_text = total.split("epsilon = ")[1].split(",")[0]
    assert float(eps_text) >= led.epsilon
    rng = np.random.default_rng(4)
    for x in np.concatenate([10.0 ** rng.uniform(-300, 300, 2000), [1e-5, 1.0, 8.0, 0.5]]):
        for digits in (3, 4, 6):
            assert float(_rounded_up(float(x), digits)) >= x
    assert _rounded_up(1e-5, 4) == "1e-05" and _rounded_up(8.0, 6) == "8"


def test_extreme_multipliers_give_infinite_epsilon_not_an_exception():
    """z = 1e-170: z * z underflowed to 0 (ZeroDivisionError); mu = 1e160: the root
    finder met NaN ("The function value at x=inf is NaN")."""
    assert acc.gaussian_epsilon(1e-170, 1e-5) == math.inf
    assert acc.gdp_epsilon(1e160, 1e-5) == math.inf
    assert acc.ledger_for([acc.GaussianRelease(1e-170)], 1e-5).epsilon == math.inf
    composed = acc.PrivacyAccountant()
    composed.compose(acc.GaussianRelease(1e-170))
    assert composed.get_epsilon(1e-5) == math.inf


def test_pld_work_is_bounded_for_huge_step_counts(monkeypatch):
    """10^7 .. 10^8 subsampled steps: "auto" took minutes (or exhausted memory) in the
    PLD where RDP answers at once; now "auto" uses RDP alone there and "pld" refuses."""
    pytest.importorskip("dp_accounting")
    calls = []

    def pld(self, eps_scale):  # would run for minutes: recorded, not run
        calls.append(eps_scale)
        raise AssertionError("the PLD was asked")

    real = acc.PrivacyAccountant._pld
    monkeypatch.setattr(acc.PrivacyAccountant, "_pld", pld)
    # The last two: one step of a tiny noise multiplier (z = 1e-3: 3 s in the PLD;
    # 1e-5: minutes), an epsilon in the hundreds of thousands either way.
    for z, q, steps in (
        (1.0, 1e-6, 10**8),
        (1.5, 1e-5, 10**7),
        (1.0, 0.99, 10**6),
        (1e-3, 0.5, 1),
        (1e-5, 1e-3, 1),
    ):
        e = acc.dpsgd_epsilon(z, q, steps, 1e-5)
        assert e == acc.dpsgd_epsilon(z, q, steps, 1e-5, method="rdp")
    assert calls == []
    monkeypatch.setattr(acc.PrivacyAccountant, "_pld", real)
    with pytest.raises(ValueError, match='method="pld" would take minutes'):
        acc.dpsgd_epsilon(1.5, 1e-5, 10**7, 1e-5, method="pld")
    with pytest.raises(ValueError, match="noise multiplier of 1e-05"):
        acc.dpsgd_epsilon(1e-5, 0.5, 1, 1e-5, method="pld")
    # Within the bounds "auto" still takes the smaller of RDP and PLD.
    assert acc.dpsgd_epsilon(1.0, 0.01, 1000, 1e-5) < acc.dpsgd_epsilon(
        1.0, 0.01, 1000, 1e-5, method="rdp"
    )


def test_dpsgd_calibration_searches_down_to_the_floor():
    """The bracket stepped down by e past the 0.05 floor and returned its upper end:
    z = 0.1 (epsilon 75) for a target of 100 that z = 0.085 meets."""
    z = acc.calibrate_dpsgd_noise_multiplier(100.0, 1e-5, 0.01, 1, method="rdp")
    eps = acc.dpsgd_epsilon(z, 0.01, 1, 1e-5, method="rdp")
    assert 0.999 * 100.0 <= eps <= 100.0 and z < 0.1
    # Never below the floor, never over the target.
    z = acc.calibrate_dpsgd_noise_multiplier(1.0, 1e-5, 1e-9, 5)
    assert z >= 0.05 and acc.dpsgd_epsilon(z, 1e-9, 5, 1e-5) <= 1.0


@pytest.mark.parametrize("mu", [1e-6, 1e-4, 1e-3, 0.03, 0.0999, 0.1, 0.5, 2.0, 20.0])
def test_gdp_curve_is_never_understated_against_60_digit_arithmetic(mu):
    """gdp_epsilon(mu, delta) certifies gdp_delta <= delta, but the double-precision curve
    understated the true delta by up to 1.4e-7 (relative) at mu = 1e-6, where
    eps + log Phi(b) - log Phi(a) cancels: the exact curve is now always at or below the
    returned epsilon's delta, and within 1e-10 of it."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60

    def true_delta(m, e):
        m, e = mpmath.mpf(m), mpmath.mpf(e)
        return mpmath.ncdf(-e / m + m / 2) - mpmath.exp(e) * mpmath.ncdf(-e / m - m / 2)

    for delta in (1e-3, 1e-5, 1e-10, 1e-15, 1e-30):
        eps = acc.gdp_epsilon(mu, delta)
        if eps == 0.0:
            continue
        ratio = float(true_delta(mu, eps) / delta)
        assert 1.0 - 1e-9 < ratio <= 1.0, (mu, delta, eps, ratio)
        for e in (0.5 * eps, eps, 1.5 * eps):
            got = acc.gdp_delta(mu, e)
            exact = float(true_delta(mu, e))
            assert exact <= got <= exact * (1.0 + 1e-10), (mu, e, got, exact)
