"""``dpfc plan`` / :func:`dpfc_native.plan.noise_plans`: the noise of every release from
public facts only, checked against real fits and against sampled noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from dpfc_native import ops
from dpfc_native.cli import app
from dpfc_native.plan import PLAN_EPSILONS, noise_plans, plan_rows
from dpfc_native.report import make_estimator

runner = CliRunner()

# (method, extra parameters): every method, subsampled DP-SGD included.
CASES = [
    ("ls", {}),
    ("ls-per-class", {}),
    ("newton", {"steps": 2}),
    ("fc", {"steps": 3}),
    ("sgd", {"steps": 4}),
    ("adam", {"steps": 3}),
    ("sgd", {"steps": 5, "sample_rate": 0.3, "accountant": "rdp"}),
]


def _data(n, d, k, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    x = rng.standard_normal((k, d))[y] + 0.8 * rng.standard_normal((n, d))
    return x, y


@pytest.mark.parametrize("method,params", CASES)
def test_plan_matches_the_fit_ledger(method, params):
    # The plan is what fit executes: same multipliers, stds, sensitivities and counts as
    # the ledger of a real fit on fresh random data of that shape.
    n, d, k, eps = 157, 7, 4, 1.7
    x, y = _data(n, d, k, seed=hash(method) % 1000)
    [plan] = noise_plans(n, d, k, [eps], method=method, delta=1e-4, clip_norm=0.9, **params)
    est = make_estimator(
        method, eps, seed=3, delta=1e-4, clip_norm=0.9, classes=list(range(k)), **params
    ).fit(x, y)
    entries = est.privacy_.entries
    assert [e.name for e in entries] == [r.name for r in plan.releases]
    for e, r in zip(entries, plan.releases):
        assert e.count == r.count
        assert e.noise_multiplier == pytest.approx(r.noise_multiplier, rel=1e-12)
        assert e.sample_rate == pytest.approx(r.sample_rate)
        if e.sensitivity is not None:
            assert e.sensitivity == pytest.approx(r.sensitivity, rel=1e-12)
            assert e.noise_std == pytest.approx(r.std, rel=1e-12)
    ledger = plan.ledger()
    assert ledger.epsilon == pytest.approx(est.privacy_.epsilon, rel=1e-9)
    assert 0.998 * eps <= ledger.epsilon <= eps
    # The defaults the fit used are the plan's.
    if "reg" in plan.defaults and hasattr(est, "reg_"):
        assert est.reg_ == pytest.approx(plan.defaults["reg"][0], rel=1e-12)
    if "lr" in plan.defaults and hasattr(est, "lr_"):
        assert est.lr_ == pytest.approx(plan.defaults["lr"][0], rel=1e-12)
    if "grad_clip_norm" in plan.defaults:
        assert est.grad_clip_norm_ == pytest.approx(plan.defaults["grad_clip_norm"], rel=1e-12)


def test_plan_noise_and_signal_are_what_they_say():
    n, d, k, C = 3000, 120, 6, 1.3
    [plan] = noise_plans(n, d, k, [0.8], method="ls", delta=1e-5, clip_norm=C)
    gram, sums = plan.releases
    # Spectral norm of the symmetric noise actually drawn (native sampler), ~ sqrt(2d) std
    # for a GOE matrix (finite-d mean a little below: within 5% at d = 120).
    norms = [np.linalg.norm(ops.sym_gaussian_noise(d, gram.std, key=s), 2) for s in range(5)]
    assert np.median(norms) == pytest.approx(gram.noise, rel=0.05)
    # Frobenius norm of the i.i.d. noise on the class sums.
    draws = [np.linalg.norm(ops.gaussian_noise((k, d), sums.std, key=s)) for s in range(5)]
    assert np.median(draws) == pytest.approx(sums.noise, rel=0.05)
    # Signal: rows of norm C (normalize=True scales to 1, clip_norm C scales the clip):
    # the gram's mean eigenvalue is n C^2 / d; the class sums never exceed n C.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d))
    x *= C / np.linalg.norm(x, axis=1, keepdims=True)
    G = x.T @ x
    assert np.trace(G) / d == pytest.approx(gram.signal, rel=1e-9)
    y = rng.integers(0, k, n)
    B = np.stack([x[y == c].sum(0) for c in range(k)])
    assert np.linalg.norm(B) <= sums.signal
    aligned = np.tile(x[:1], (n, 1))  # all rows equal: the bound is attained
    assert np.linalg.norm(aligned.sum(0)) == pytest.approx(sums.signal, rel=1e-9)
    assert gram.noise_to_signal == pytest.approx(gram.noise / gram.signal)


def test_plan_grid_noise_falls_with_epsilon_and_inf_is_noiseless():
    plans = noise_plans(10_000, 64, 10, list(PLAN_EPSILONS) + [math.inf], method="fc", steps=5)
    ratios = [[r.noise_to_signal for r in p.releases] for p in plans[:-1]]
    assert np.all(np.diff(np.array(ratios), axis=0) < 0)
    assert all(r.noise_multiplier == 0 and r.noise == 0 for r in plans[-1].releases)
    assert [p.epsilon for p in plans] == list(PLAN_EPSILONS) + [math.inf]
    # delta default: the estimators' min(1e-5, 1/n).
    assert plans[0].delta == 1e-5
    assert noise_plans(500, 8, 3, [1.0], method="ls")[0].delta == pytest.approx(1e-5)
    assert noise_plans(50_000_000, 8, 3, [1.0], method="ls")[0].delta == pytest.approx(2e-8)


def test_plan_cli_table_and_json(tmp_path):
    out = tmp_path / "plan.json"
    result = runner.invoke(
        app,
        [
            "plan",
            "--n",
            "50000",
            "--dim",
            "768",
            "--num-classes",
            "10",
            "-e",
            "1",
            "-e",
            "8",
            "--method",
            "fc",
            "--steps",
            "10",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "covariance" in result.output and "gradient" in result.output
    rows = json.loads(out.read_text())["rows"]
    plans = noise_plans(50000, 768, 10, [1.0, 8.0], method="fc", steps=10)
    assert rows == json.loads(json.dumps(plan_rows(plans)))
    assert [r["release"] for r in rows] == ["covariance", "gradient"] * 2
    for r in rows:
        assert f"{r['noise_multiplier']:.3g}" in result.output
        assert 0.998 * r["epsilon"] <= r["epsilon_accounted"] <= r["epsilon"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--n", "0"], "--n must be >= 1"),
        (["--num-classes", "1"], "--num-classes must be >= 2"),
        (["--method", "svm"], "--method must be one of"),
        (["--delta", "2"], "--delta must be in"),
        (["-e", "0"], "--epsilon must be > 0"),
        (["--method", "ls", "--steps", "3"], "--steps applies to"),
        (["-p", "bogus=1"], "--param bogus: not a parameter"),
    ],
)
def test_plan_cli_errors(args, needle):
    base = {"--n": "100", "--dim": "5", "--num-classes": "3"}
    argv = ["plan"]
    for key, value in base.items():
        if key not in args:
            argv += [key, value]
    result = runner.invoke(app, argv + args)
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("key", ["random_state", "classes", "epsilon", "budget"])
def test_plan_refuses_parameters_it_sets_or_cannot_use(key):
    """-p random_state=3 gave "got multiple values for keyword argument"; -p classes=...
    disagreeing with -k was accepted silently."""
    with pytest.raises(ValueError, match=f"{key} cannot be a plan parameter"):
        noise_plans(100, 4, 2, [1.0], method="fc", **{key: 3})


def test_plan_header_shows_delta_as_given():
    res = CliRunner().invoke(
        app, ["plan", "--n", "100", "--dim", "4", "-k", "2", "-e", "1", "--delta", "0.9999999"]
    )
    assert res.exit_code == 0 and "delta=0.9999999," in res.output, res.output
