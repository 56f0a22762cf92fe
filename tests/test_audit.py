"""The empirical privacy audit.

For the DP-LS statistics (Gram and class sums, the estimator's budget split) and the
DP-FC statistics (covariance plus gradient releases) at epsilon 1 and 4, the audit's
lower bound must stay at or below the claimed epsilon; planted bugs (noise std halved,
clipping skipped) must push it above. Seeds are fixed, so the outcomes are deterministic
(the 95% confidence statements hold over the seed, not over reruns).
Small d and vectorised runs keep the file fast.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import scipy.stats
from _reference import AUDIT_RESULTS

from dpfc_native import accounting, audit, models, ops

RUNS = 100_000
D = 4
RESULTS = AUDIT_RESULTS  # printed in pytest's terminal summary (tests/conftest.py)


def _run(mech, eps, bug=None, **kw):
    r = audit.audit_mechanism(
        mech, eps, 1e-5, runs=RUNS, d=D, steps=2, planted_bug=bug, seed=20240611, **kw
    )
    RESULTS[(mech, eps, bug, kw.get("backend", "native"))] = r.eps_lower
    return r


@pytest.mark.parametrize("eps", [1.0, 4.0])
@pytest.mark.parametrize(
    "mech", ["ls_statistics", "fc_statistics", "ls_per_class_statistics", "sgd_gradients"]
)
def test_correct_mechanisms_pass(mech, eps):
    r = _run(mech, eps)
    assert r.passed and r.eps_lower <= eps, str(r)
    assert r.mechanism == mech and r.epsilon == eps and r.planted_bug is None
    assert 0 < r.fpr_upper < 1 and 0 <= r.tpr_lower <= 1
    if eps >= 4:
        # The audit has power: it certifies a good part of the claim (not vacuous).
        assert r.eps_lower > 0.4 * eps, str(r)


@pytest.mark.parametrize(
    "mech,eps,bug",
    [
        ("ls_statistics", 1.0, "half_noise"),
        ("ls_statistics", 4.0, "half_noise"),
        ("fc_statistics", 1.0, "half_noise"),
        ("fc_statistics", 4.0, "half_noise"),
        ("ls_statistics", 1.0, "no_clip"),
        ("fc_statistics", 1.0, "no_clip"),
        ("ls_per_class_statistics", 1.0, "half_noise"),
        ("ls_per_class_statistics", 4.0, "half_noise"),
        ("ls_per_class_statistics", 1.0, "no_clip"),
        ("sgd_gradients", 1.0, "half_noise"),
        ("sgd_gradients", 4.0, "half_noise"),
        ("sgd_gradients", 1.0, "no_clip"),
    ],
)
def test_planted_bugs_are_detected(mech, eps, bug):
    r = _run(mech, eps, bug)
    assert not r.passed and r.eps_lower > eps, str(r)


@pytest.mark.parametrize("mech", audit.MECHANISMS)
def test_leaf_reduction_statistics_pass(mech, monkeypatch):
    """With leaf_rows the statistics are summed by the exact leaf reduction (leaves of 5
    rows of the 65-row audit dataset: a partial last leaf), the estimators' summation:
    every release's statistic, on D and on D', goes through it."""
    from dpfc_native import reduction

    calls = []
    real = reduction.reduce

    def spy(stat, source, **kw):
        calls.append((type(stat).__name__, kw.get("leaf_rows"), source.shard_rows))
        return real(stat, source, **kw)

    monkeypatch.setattr(reduction, "reduce", spy)
    r = audit.audit_mechanism(mech, 4.0, runs=20_000, d=3, steps=2, seed=7, leaf_rows=5)
    assert r.passed and r.leaf_rows == 5, str(r)
    assert r.to_dict()["leaf_rows"] == 5
    assert len(calls) == 2 * len(r.release_names), calls
    assert {c[1] for c in calls} == {5} and {c[2] for c in calls} == {(64,), (65,)}
    calls.clear()  # the spy stays: the one-pass audit does not reach the reduction
    one_pass = audit.audit_mechanism(mech, 4.0, runs=200, d=3, steps=2, seed=7)
    assert calls == [] and one_pass.leaf_rows is None


def test_a_bug_in_the_leaf_reduction_is_caught_only_through_it(monkeypatch):
    """A leaf that clips to sqrt(2) C (each row's Gram term still inside the grid's range,
    so the reduction does not refuse it) doubles the Gram's sensitivity: the audit through
    the leaves detects it, the one-pass audit (which does not run the leaves) does not."""
    from dpfc_native import reduction

    def leaky_leaf(self, x, y, weights):
        return {"G": ops.clipped_gram(np.asarray(x, np.float64), self.clip_norm * math.sqrt(2))}

    monkeypatch.setattr(reduction.Gram, "leaf", leaky_leaf)
    kw = dict(runs=RUNS, d=D, seed=20240611)
    through_leaves = audit.audit_mechanism("gram", 4.0, 1e-5, leaf_rows=5, **kw)
    one_pass = audit.audit_mechanism("gram", 4.0, 1e-5, **kw)
    assert not through_leaves.passed and through_leaves.eps_lower > 4.0, str(through_leaves)
    assert one_pass.passed, str(one_pass)


def test_numpy_backend_agrees_with_native():
    r = _run("gram", 4.0, backend="numpy")
    assert r.passed and r.eps_lower > 0.4 * 4.0, str(r)
    assert r.backend == "numpy"


@pytest.mark.parametrize("shape", [(4, 4), (3, 5, 5)])
def test_numpy_reference_noise_has_the_mechanisms_variances(shape):
    """The NumPy reference drew off-diagonal noise plus its transpose: variance std^2
    instead of std^2 / 2, a more private reference that hid planted bugs."""
    rel = audit._Release("gram", None, 1.0, 2.0, "sym", shape)
    out, rec = audit._noisy_runs(
        np.zeros(shape), rel, 1.0, 40000, None, "numpy", np.random.default_rng(1)
    )
    std = rec.std
    assert np.array_equal(out, np.swapaxes(out, -1, -2))
    off = out[..., 0, 1].reshape(-1)
    diag = out[..., 1, 1].reshape(-1)
    # Variance within 3% of std^2/2 and std^2 (sampling error of 40k draws is ~0.7%).
    assert abs(off.var() / (std**2 / 2) - 1) < 0.03
    assert abs(diag.var() / std**2 - 1) < 0.03


def test_black_box_callable():
    """A callable mechanism is audited with the plug-in score: the correct Gaussian
    mechanism on clipped sums passes, the same one with half the noise does not."""
    C = 1.0
    z = 1.0811618495203252  # calibrate_noise_multiplier(4, 1e-5, 1)
    rng = np.random.default_rng(5)

    def make(std_factor):
        def release(X, y, runs):
            total = ops.clip_rows(X, C)[0].sum(axis=0)
            return total + rng.standard_normal((runs, X.shape[1])) * z * C * std_factor

        return release

    good = audit.audit_mechanism(make(1.0), 4.0, runs=RUNS, d=D, seed=3)
    bad = audit.audit_mechanism(make(0.5), 4.0, runs=RUNS, d=D, seed=3)
    RESULTS[("callable", 4.0, None, "numpy")] = good.eps_lower
    RESULTS[("callable", 4.0, "half_noise", "numpy")] = bad.eps_lower
    assert good.passed, str(good)
    assert not bad.passed, str(bad)


def test_clopper_pearson_matches_beta_quantiles():
    for k, n in [(0, 10), (3, 10), (10, 10), (17, 5000), (4990, 5000)]:
        lo, hi = audit.clopper_pearson(k, n, 0.025)
        exp_lo = 0.0 if k == 0 else scipy.stats.beta.ppf(0.025, k, n - k + 1)
        exp_hi = 1.0 if k == n else scipy.stats.beta.ppf(0.975, k + 1, n - k)
        assert lo == pytest.approx(exp_lo, rel=1e-9, abs=1e-15)
        assert hi == pytest.approx(exp_hi, rel=1e-9, abs=1e-15)
        assert lo <= k / n <= hi
    # Coverage: the one-sided bounds hold for >= 97.5% of binomial draws.
    rng = np.random.default_rng(0)
    p, n = 0.01, 2000
    ks = rng.binomial(n, p, size=400)
    cover = np.mean([audit.clopper_pearson(int(k), n, 0.025)[0] <= p for k in ks])
    assert cover >= 0.95
    with pytest.raises(ValueError, match="k"):
        audit.clopper_pearson(5, 3, 0.05)
    with pytest.raises(ValueError, match="alpha"):
        audit.clopper_pearson(1, 3, 1.5)


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        ({"epsilon": 0.0}, ValueError, "epsilon"),
        ({"epsilon": -1.0}, ValueError, "epsilon"),
        ({"epsilon": math.inf}, ValueError, "epsilon"),
        ({"epsilon": float("nan")}, ValueError, "epsilon"),
        ({"epsilon": "1"}, TypeError, "epsilon"),
        ({"delta": 0.0}, ValueError, "delta"),
        ({"delta": 1.0}, ValueError, "delta"),
        ({"runs": 10}, ValueError, "runs"),
        ({"runs": 1000.5}, TypeError, "runs"),
        ({"d": 0}, ValueError, "d"),
        ({"planted_bug": "typo"}, ValueError, "planted_bug"),
        ({"confidence": 1.0}, ValueError, "confidence"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"backend": "gpu"}, ValueError, "backend"),
        ({"clip_norm": 0.0}, ValueError, "clip_norm"),
        ({"canary_norm": -1.0}, ValueError, "canary_norm"),
        ({"num_classes": 1}, ValueError, "num_classes"),
        ({"leaf_rows": 0}, ValueError, "leaf_rows"),
        ({"leaf_rows": 2.5}, TypeError, "leaf_rows"),
        ({"mechanism": lambda X, y, runs: np.zeros((runs, 1)), "leaf_rows": 4}, ValueError, "leaf"),
        ({"mechanism": "nope"}, ValueError, "mechanism"),
        ({"mechanism": 3}, TypeError, "mechanism"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, exc, word):
    args = {"mechanism": "gram", "epsilon": 1.0, "delta": 1e-5, "runs": 1000}
    args.update(kwargs)
    mech = args.pop("mechanism")
    with pytest.raises(exc, match=word):
        audit.audit_mechanism(mech, **args)


def test_result_is_frozen_and_serialisable():
    r = audit.audit_mechanism("class_sums", 2.0, runs=4000, d=3, seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.eps_lower = 0.0  # type: ignore[misc]
    payload = json.loads(json.dumps(r.to_dict()))
    assert payload["mechanism"] == "class_sums" and payload["passed"] == r.passed
    assert "eps_lower" in str(r)


def test_cli_command_registered_on_a_typer_app():
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    app = typer.Typer()

    @app.command("noop")
    def _noop():  # a second command so typer keeps sub-command names
        pass

    audit.register_cli(app)
    runner = CliRunner()
    ok = runner.invoke(
        app, ["audit", "-m", "gram", "-e", "4", "--runs", "20000", "--dim", "4", "--seed", "1"]
    )
    assert ok.exit_code == 0, ok.output
    assert "eps_lower" in ok.output
    detected = runner.invoke(
        app,
        [
            "audit",
            "-m",
            "gram",
            "-e",
            "4",
            "--runs",
            "20000",
            "--dim",
            "4",
            "--seed",
            "1",
            "--planted-bug",
            "no_clip",
        ],
    )
    assert detected.exit_code == 0 and "detected" in detected.output, detected.output
    bad = runner.invoke(app, ["audit", "-m", "nope"])
    assert bad.exit_code == 2 and "mechanism" in bad.output
    bad_eps = runner.invoke(app, ["audit", "-m", "gram", "-e", "-1", "--runs", "1000"])
    assert bad_eps.exit_code == 2 and "epsilon" in bad_eps.output
    assert bad_eps.exception is None or isinstance(bad_eps.exception, SystemExit)


def test_dpfc_cli_has_audit_command():
    cli = pytest.importorskip("dpfc_native.cli")
    from typer.testing import CliRunner

    names = {c.name or c.callback.__name__ for c in cli.app.registered_commands}
    if "audit" not in names and "audit_command" not in names:
        pytest.skip("dpfc_native.cli does not register `audit` yet (audit.register_cli(app))")
    res = CliRunner().invoke(
        cli.app,
        ["audit", "-m", "class_sums", "-e", "4", "--runs", "20000", "--dim", "4", "--seed", "2"],
    )
    assert res.exit_code == 0, res.output
    # A negative seed is named, before any run (it was "expected non-negative integer"
    # after a progress line).
    res = CliRunner().invoke(cli.app, ["audit", "-m", "class_sums", "--seed", "-1"])
    assert res.exit_code == 2 and res.output.strip() == "Error: --seed must be >= 0, got -1"


# The estimator each named mechanism follows, and the releases it audits alone (None: all).
_FITS = {
    "ls_statistics": (models.DPLeastSquaresClassifier, None, {}),
    "fc_statistics": (models.DPFCClassifier, None, {}),
    "newton_statistics": (models.DPNewtonClassifier, None, {}),
    "gram": (models.DPLeastSquaresClassifier, "gram", {}),
    "class_sums": (models.DPLeastSquaresClassifier, "class_sums", {}),
    "fc_gradient": (models.DPFCClassifier, "gradient", {}),
    "ls_per_class_statistics": (models.DPLeastSquaresClassifier, None, {"variant": "per_class"}),
    "sgd_gradients": (models.DPSGDClassifier, None, {}),
}
assert sorted(_FITS) == sorted(audit.MECHANISMS)


def _releases_made(names, shapes):
    """{name: (shape, count)} of a sequence of releases."""
    out: dict = {}
    for name, shape in zip(names, shapes):
        prev = out.get(name, (tuple(shape), 0))
        assert prev[0] == tuple(shape), name
        out[name] = (tuple(shape), prev[1] + 1)
    return out


@pytest.mark.parametrize("backend", ["native", "numpy"])
@pytest.mark.parametrize("mech", list(_FITS))
def test_audit_makes_the_estimators_releases(mech, backend):
    """The audit's mechanism makes the releases a fit makes: the same names, shapes,
    sensitivities, noise multipliers and counts, compared between the fit's ledger
    (privacy_) and the audit's (records of the releases it made), for odd sizes, a
    non-default clip norm and each method's iterations."""
    cls, alone, fixed = _FITS[mech]
    n, d, k, steps, C, eps, delta = 37, 5, 3, 3, 1.7, 1.3, 1e-4
    rng = np.random.default_rng(11)
    X = rng.standard_normal((n, d)) * 2.0
    y = rng.permutation(np.arange(n) % k)
    params = {"steps": steps, **fixed} if "steps" in cls().get_params() else dict(fixed)
    est = cls(
        epsilon=eps, delta=delta, clip_norm=C, classes=list(range(k)), keep_stats=True, **params
    ).fit(X, y)
    r = audit.audit_mechanism(
        mech,
        eps,
        delta,
        runs=200,
        d=d,
        num_classes=k,
        n=n,
        steps=steps,
        clip_norm=C,
        seed=4,
        backend=backend,
    )

    def rows(ledger):
        return [
            (e.name, e.sensitivity, e.noise_multiplier, e.count, e.sample_rate)
            for e in ledger.entries
        ]

    fit_rows = rows(est.privacy_)
    fit_made = {
        name: ((v[0] if isinstance(v, list) else v).shape, len(v) if isinstance(v, list) else 1)
        for name, v in est.stats_.items()
    }
    made = _releases_made(r.release_names, r.release_shapes)
    if alone is None:
        # Bit for bit: both ledgers come from the records of the releases as made.
        assert rows(r.ledger) == fit_rows
        assert r.ledger.epsilon == est.privacy_.epsilon
        assert made == fit_made
    else:
        # One release of the fit, alone with the whole budget: its name, shape and
        # sensitivity are the fit's; its multiplier is calibrated for it alone.
        [row] = [row for row in fit_rows if row[0] == alone]
        z = accounting.calibrate_noise_multiplier(eps, delta, 1)
        assert rows(r.ledger) == [(alone, row[1], z * row[1] / row[1], 1, 1.0)]
        assert made == {alone: (fit_made[alone][0], 1)}
    # The declared releases (what the adversary's score uses) are the ones recorded.
    declared = {
        (name, s): z for name, s, z in zip(r.release_names, r.sensitivities, r.noise_multipliers)
    }
    recorded = {(e.name, e.sensitivity): e.noise_multiplier for e in r.ledger.entries}
    assert declared.keys() == recorded.keys()
    for key, z in declared.items():  # a record holds std / sensitivity: one rounding apart
        assert z == pytest.approx(recorded[key], rel=1e-15), key
    # The claim audited is the accountant's epsilon for these releases (from below).
    assert 0.998 * eps <= r.ledger.epsilon <= eps
    json.dumps(r.to_dict(), allow_nan=False)


def test_audit_ledger_shows_a_planted_half_noise():
    ok = audit.audit_mechanism("fc_statistics", 2.0, runs=200, d=3, steps=2, seed=1)
    bad = audit.audit_mechanism(
        "fc_statistics", 2.0, runs=200, d=3, steps=2, seed=1, planted_bug="half_noise"
    )
    assert [e.noise_multiplier for e in bad.ledger.entries] == pytest.approx(
        [0.5 * e.noise_multiplier for e in ok.ledger.entries], rel=1e-15
    )
    assert bad.ledger.epsilon > 2.0 >= ok.ledger.epsilon
