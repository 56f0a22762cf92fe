"""The ``dpfc`` command line: train, demo, friendly errors, ``python -m dpfc_native``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from dpfc_native import data, report
from dpfc_native.cli import TRAIN_METHODS, app

# The CLI tests pass --seed (replayable) and often no --num-classes on purpose; the
# PrivacyWarning itself is tested in test_tuning.py.
pytestmark = pytest.mark.filterwarnings("ignore::dpfc_native.PrivacyWarning")

runner = CliRunner()


def _write(path, seed, n=200, d=5, k=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    x = rng.standard_normal((k, d))[y] + 0.7 * rng.standard_normal((n, d))
    data.save_features(path, x.astype(np.float32), y)
    return str(path)


@pytest.fixture
def files(tmp_path):
    return {
        name: _write(tmp_path / f"{name}.npz", seed)
        for seed, name in enumerate(["train", "test", "val"])
    }


def _ok(result):
    assert result.exit_code == 0, result.output
    return result.output


def _err(result, needle):
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output and needle in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("method", TRAIN_METHODS)
def test_train_every_method(files, tmp_path, method):
    out = tmp_path / f"{method}.npz"
    args = [
        "train",
        files["train"],
        "--method",
        method,
        "--epsilon",
        "2",
        "--seed",
        "0",
        "--test",
        files["test"],
        "--output",
        str(out),
    ]
    if method not in ("ls", "ls-per-class"):
        args += ["--steps", "3"]
    text = _ok(runner.invoke(app, args))
    assert "test accuracy" in text and "fit time" in text and "total: epsilon" in text
    model = np.load(out)
    assert model["coef"].shape == (3, 5)
    np.testing.assert_array_equal(model["classes"], [0, 1, 2])
    ledger = json.loads(str(model["ledger"]))
    assert 0.998 * 2 <= ledger["epsilon"] <= 2.0
    assert json.loads(str(model["params"]))["epsilon"] == 2.0


def test_train_non_private_and_params(files, tmp_path):
    out = tmp_path / "m.npz"
    text = _ok(
        runner.invoke(
            app,
            [
                "train",
                files["train"],
                "-m",
                "sgd",
                "-e",
                "inf",
                "-p",
                "optimizer=adam",
                "-p",
                "steps=5",
                "--num-classes",
                "4",
                "-o",
                str(out),
            ],
        )
    )
    assert "NOT covered" in text  # no --test: training accuracy, flagged as not private
    model = np.load(out)
    assert model["coef"].shape == (4, 5)
    assert json.loads(str(model["ledger"]))["epsilon"] is None  # inf
    assert json.loads(str(model["params"]))["optimizer"] == "adam"


def test_train_sweep_on_public_validation_split(files, tmp_path):
    text = _ok(
        runner.invoke(
            app,
            [
                "train",
                files["train"],
                "-m",
                "ls",
                "--reg",
                "0.5",
                "--reg",
                "5",
                "--reg",
                "50",
                "--val",
                files["val"],
                "--seed",
                "1",
                "-o",
                str(tmp_path / "m.npz"),
            ],
        )
    )
    assert "sweep on the public validation split" in text


def test_train_paired_npy(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    np.save(tmp_path / "f.npy", x)
    np.save(tmp_path / "l.npy", np.arange(50) % 2)
    _ok(
        runner.invoke(
            app,
            [
                "train",
                str(tmp_path / "f.npy"),
                "--labels",
                str(tmp_path / "l.npy"),
                "-m",
                "ls",
                "-o",
                str(tmp_path / "m"),
            ],
        )
    )
    assert (tmp_path / "m.npz").exists()


def test_train_errors_are_friendly(files, tmp_path):
    out = ["-o", str(tmp_path / "m.npz")]
    _err(runner.invoke(app, ["train", str(tmp_path / "missing.npz")] + out), "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip file")
    _err(runner.invoke(app, ["train", str(bad)] + out), "bad.npz")
    _err(runner.invoke(app, ["train", files["train"], "-e", "-1"] + out), "epsilon")
    _err(runner.invoke(app, ["train", files["train"], "--delta", "2"] + out), "delta")
    _err(runner.invoke(app, ["train", files["train"], "-m", "svm"] + out), "--method")
    _err(runner.invoke(app, ["train", files["train"], "-p", "nope=1"] + out), "nope")
    _err(runner.invoke(app, ["train", files["train"], "-p", "steps"] + out), "KEY=VALUE")
    _err(
        runner.invoke(app, ["train", files["train"], "--reg", "1", "--reg", "2"] + out),
        "validation split",
    )
    wrong_d = _write(tmp_path / "wrong.npz", 5, d=7)
    _err(runner.invoke(app, ["train", files["train"], "--test", wrong_d] + out), "features")


def test_demo_small(tmp_path):
    out = tmp_path / "demo"
    text = _ok(
        runner.invoke(
            app,
            [
                "demo",
                "-d",
                "digits",
                "-d",
                "cifar10",
                "--n",
                "400",
                "-m",
                "ls",
                "-m",
                "fc",
                "-e",
                "1",
                "-e",
                "inf",
                "--out",
                str(out),
            ],
        )
    )
    assert "DP-LS" in text and "DP-FC" in text and "non-private" in text
    assert (out / "privacy_utility.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())["results"]
    assert [r["n_train"] for r in res] == [1347, 400]
    digits = res[0]
    assert set(digits["median_accuracy"]) == {"ls", "fc"}
    assert digits["median_accuracy"]["ls"]["inf"] > 0.85
    assert digits["ledgers"]["fc"]["1.0"]["epsilon"] <= 1.0
    assert (out / "results.md").read_text().startswith("digits")


def test_demo_estimate_progress_and_defaults(tmp_path):
    out = tmp_path / "demo"
    text = _ok(
        runner.invoke(
            app,
            ["demo", "-d", "cifar100", "--n", "300", "--seeds", "1", "-e", "1", "--out", str(out)],
        )
    )
    # Per-shape defaults: at K = 100 the K d^2 methods are left out, and it says so.
    assert "ls-per-class, newton, adam left out at K = 100" in text
    assert "DP-SGD with {'steps': 30}" in text
    assert "3 fits (ls, fc, sgd), estimated" in text
    # Not a TTY: plain progress lines.
    assert "cifar100: 0/3 (0%), started" in text and "cifar100: 3/3 (100%), done" in text
    res = json.loads((out / "results.json").read_text())["results"][0]
    assert res["complete"] is True and set(res["median_accuracy"]) == {"ls", "fc", "sgd"}
    assert res["chance_accuracy"] == pytest.approx(
        np.bincount(report.load_dataset("cifar100", 300)[1].labels).max() / res["n_test"]
    )


def test_demo_keeps_partial_results(tmp_path):
    """A run stopped part-way (here after the 3rd fit) leaves the finished cells on disk."""
    stop_after = 3

    count = [0]

    def on_fit(m, e, s, dt):
        count[0] += 1
        if count[0] == stop_after:
            raise KeyboardInterrupt

    def on_result(res):
        report.write_outputs([res], str(tmp_path), plot=False)

    with pytest.raises(KeyboardInterrupt):
        report.run_demo(
            "digits",
            seeds=2,
            epsilons=(1.0, math.inf),
            methods=("ls", "fc"),
            on_fit=on_fit,
            on_result=on_result,
        )
    res = json.loads((tmp_path / "results.json").read_text())["results"][0]
    assert res["complete"] is False
    done = sum(len(v) for cells in res["accuracy"].values() for v in cells.values())
    assert done == stop_after - 1  # the interrupted fit's result was not written
    assert res["median_accuracy"]["ls"]["1.0"] is not None
    assert res["median_accuracy"]["fc"]["inf"] is None
    assert "PARTIAL" in (tmp_path / "results.md").read_text()
    # The plot of a partial result draws what is there.
    partial = report.DemoResult(**{**{f: None for f in ()}, **_partial_fields()})
    assert report.plot_privacy_utility([partial], str(tmp_path / "p.png")).endswith("p.png")


def _partial_fields():
    acc = {"ls": {1.0: [0.5, 0.6], math.inf: []}, "fc": {1.0: [], math.inf: []}}
    return dict(
        dataset="x",
        n_train=10,
        n_test=5,
        d=3,
        k=2,
        delta=1e-5,
        epsilons=(1.0, math.inf),
        methods=("ls", "fc"),
        seeds=2,
        accuracy=acc,
        fit_seconds=acc,
        ledgers={"ls": {}, "fc": {}},
        chance=0.5,
        complete=False,
    )


def test_default_methods_per_shape():
    assert report.default_methods(10) == tuple(report.METHODS)
    assert "newton" not in report.default_methods(100)
    assert "ls-per-class" not in report.default_methods(100)
    assert report.demo_overrides("sgd", 100) == {"steps": report.LARGE_K_SGD_STEPS}
    assert report.demo_overrides("sgd", 10) == {}
    # Two pilot fits per method, extrapolated linearly in n.
    small, large = report.PILOT_ROWS
    pilots = {"ls": (0.25, 0.25 + 0.5), "fc": (0.5, 0.5)}
    assert report.estimate_seconds(
        small + 4 * (large - small), 64, 10, ("ls", "fc"), 3, pilots=pilots
    ) == (pytest.approx(3 * ((0.25 + 4 * 0.5) + 0.5)))
    # Measured: every method's pilots are timed, and more rows cost more.
    few = report.estimate_seconds(100, 7, 3, ("ls", "sgd"), 1)
    assert few > 0
    assert report.estimate_seconds(10**7, 7, 3, ("ls", "sgd"), 1) > few


def test_a_slow_first_pilot_skips_the_second_only_for_fixed_cost_methods(monkeypatch):
    """Per-class DP-LS, whose small pilot already takes about a minute at K = 100 (its K
    eigendecompositions), is not timed again at 2048 rows; an iterative method is, however
    slow its small fit (its cost per row, d K per step, may dominate: skipping it made the
    ImageNet-shaped DP-SGD estimate 3 s for a fit of over an hour)."""
    calls = []

    def pilot(method, rows, d, k):
        calls.append((method, rows))
        return {"ls-per-class": 3.0, "sgd": 3.0 + rows * 1e-3}.get(method, 0.0)

    monkeypatch.setattr(report, "_pilot_seconds", pilot)
    est = report.estimate_seconds(10_000, 8, 3, ("ls-per-class", "sgd"), 2)
    small, large = report.PILOT_ROWS
    assert ("ls-per-class", large) not in calls and ("sgd", large) in calls
    assert est == pytest.approx(2 * (3.0 + 3.0 + small * 1e-3 + (10_000 - small) * 1e-3))


def test_demo_errors(tmp_path):
    _err(runner.invoke(app, ["demo", "-d", "mnist", "--out", str(tmp_path)]), "--dataset")
    _err(runner.invoke(app, ["demo", "-m", "svm", "--out", str(tmp_path)]), "--method")
    _err(runner.invoke(app, ["demo", "--seeds", "0", "--out", str(tmp_path)]), "--seeds")
    _err(runner.invoke(app, ["demo", "-e", "0", "--out", str(tmp_path)]), "--epsilon")


def test_python_dash_m():
    result = subprocess.run(
        [sys.executable, "-m", "dpfc_native", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "demo" in result.stdout


def test_train_methods_are_the_demos():
    """One method list: ``dpfc train`` offers exactly the demo's methods, with the demo's
    estimators, and both commands' help lists them."""
    assert TRAIN_METHODS == tuple(report.METHODS)
    for m in TRAIN_METHODS:
        label, cls, fixed = report.METHODS[m]
        est = report.make_estimator(m, 1.0)
        assert type(est) is cls and all(est.get_params()[k] == v for k, v in fixed.items())
    import typer

    commands = typer.main.get_command(app).commands
    for command in ("train", "demo"):
        (option,) = [p for p in commands[command].params if p.name == "method"]
        assert " | ".join(TRAIN_METHODS) in option.help, option.help


def test_plan_json_is_strict_json_with_an_infinite_epsilon(tmp_path):
    """-e inf wrote bare Infinity, which no strict JSON reader accepts."""
    out = tmp_path / "p.json"
    res = runner.invoke(
        app,
        [
            "plan",
            "--n",
            "1000",
            "--dim",
            "8",
            "-k",
            "3",
            "-e",
            "1",
            "-e",
            "inf",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    rows = json.loads(out.read_text(), parse_constant=refuse)["rows"]
    assert {r["epsilon"] for r in rows} == {1.0, "inf"}


def test_demo_n_without_a_synthetic_dataset_fails_and_repeats_are_merged(tmp_path):
    res = runner.invoke(app, ["demo", "--n", "50", "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "digits is used whole" in res.output
    # -m ls -m ls -e 1 -e 1: one row, one column, one fit (they were pooled: 2 fits
    # shown as the median of "1 seed").
    res = runner.invoke(
        app,
        [
            "demo",
            "-m",
            "ls",
            "-m",
            "ls",
            "-e",
            "1",
            "-e",
            "1",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert res.exit_code == 0, res.output
    (result,) = json.loads((tmp_path / "b" / "results.json").read_text())["results"]
    assert result["epsilons"] == ["1.0"] and list(result["methods"]) == ["ls"]
    assert len(result["accuracy"]["ls"]["1.0"]) == 1, result["accuracy"]


@pytest.mark.parametrize(
    "args,word",
    [
        (["plan", "--n", "10", "--dim", "2", "-k", "2", "-e", "abc"], "'--epsilon'"),
        (["plan", "--n", "10", "--dim", "2", "-k", "2", "-e", "1,2"], "'--epsilon'"),
        (["nosuch"], "No such command 'nosuch'"),
        # click words it "No such option: --bogus" or "No such option '--bogus'."
        (["plan", "--bogus"], "--bogus"),
    ],
)
def test_parser_errors_are_one_line_from_the_script(args, word):
    """The parser's own errors (not a number, unknown option or command) printed a usage
    block and a boxed panel; the README promises one line and exit status 2."""
    r = subprocess.run(
        [sys.executable, "-m", "dpfc_native", *args], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, r.stderr
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and word in lines[0], lines
    if word == "--bogus":
        assert "No such option" in lines[0], lines
