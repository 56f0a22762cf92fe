"""Progress without a terminal: a plain line when a run starts, one every few seconds (also
while a single long step runs) and one at the end, from `dpfc demo`, `train` and `audit`
(typer's CliRunner is not a TTY) and from ``verbose`` in the Python API. `dpfc extract`
is covered in tests/test_extract.py (it needs the [extract] extra)."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from dpfc_native import _progress
from dpfc_native._progress import progress
from dpfc_native.cli import app
from dpfc_native.models import DPLeastSquaresClassifier, DPSGDClassifier

runner = CliRunner()


@pytest.fixture
def every_advance(monkeypatch):
    """A line at every advance (the default interval, 5 s, is longer than these runs)."""
    monkeypatch.setattr(_progress, "DEFAULT_INTERVAL", 0.0)


def _lines(text, description):
    return [ln for ln in text.splitlines() if ln.startswith(f"{description}: ")]


def _write(path, rng, n=157, d=9, k=3):
    y = rng.integers(0, k, n)
    x = rng.standard_normal((n, d)).astype(np.float32) + y[:, None]
    np.savez(path, features=x, labels=y)
    return str(path)


def test_heartbeat_while_a_step_runs():
    # No advance for 0.4 s: the background thread still writes about one line per interval.
    buf = io.StringIO()
    with progress(None, "solve", stream=buf, interval=0.05):
        time.sleep(0.4)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "solve: started, 0s elapsed"
    assert lines[-1] == "solve: done, 0s elapsed"
    beats = lines[1:-1]
    assert len(beats) >= 2, lines
    assert all(re.fullmatch(r"solve: running, \d+s elapsed", ln) for ln in beats), beats


def test_heartbeat_does_not_add_lines_when_advances_print():
    buf = io.StringIO()
    interval = 0.1
    t0 = time.monotonic()
    with progress(200, "work", stream=buf, interval=interval) as bar:
        for i in range(200):
            time.sleep(0.003)
            bar.advance(f"item {i}")
    elapsed = time.monotonic() - t0
    lines = buf.getvalue().splitlines()
    # started + done + at most one line per interval (advance and heartbeat share the clock).
    assert 3 <= len(lines) <= elapsed / interval + 3, (len(lines), elapsed)
    assert lines[-1].startswith("work: 200/200 (100%), done")
    middle = lines[1:-1]
    assert all(re.match(r"work: \d+/200 \(\d+%\), \d+s elapsed", ln) for ln in middle), middle


def test_update_sets_count_and_total():
    buf = io.StringIO()
    with progress(None, "read", stream=buf, interval=0.0) as bar:
        bar.update(4, total=10, status="1 skipped")
        bar.update(10)
    lines = buf.getvalue().splitlines()
    assert lines == [
        "read: started, 0s elapsed",
        "read: 4/10 (40%), 0s elapsed, ~0s left, [1 skipped]",
        "read: 10/10 (100%), 0s elapsed, [1 skipped]",
        "read: 10/10 (100%), done, 0s elapsed, [1 skipped]",
    ]


def test_error_is_reported_and_thread_stops():
    buf = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress(3, "job", stream=buf, interval=0.01) as bar:
            bar.advance()
            raise RuntimeError("boom")
    assert buf.getvalue().splitlines()[-1].startswith("job: 1/3 (33%), stopped (error)")
    assert bar._thread is None


def test_verbose_python_api_one_pass_and_steps(rng, capsys, every_advance):
    x = rng.standard_normal((83, 6))
    y = rng.integers(0, 3, 83)
    DPLeastSquaresClassifier(epsilon=1.0, classes=range(3), verbose=1).fit(x, y)
    err = _lines(capsys.readouterr().err, "DP-LS")
    assert err[0].startswith("DP-LS: started") and err[-1].startswith("DP-LS: done")
    DPSGDClassifier(epsilon=1.0, classes=range(3), steps=4, verbose=1).fit(x, y)
    err = _lines(capsys.readouterr().err, "DP-SGD")
    assert [ln.split(",")[0] for ln in err] == [
        "DP-SGD: 0/4 (0%)",
        "DP-SGD: 1/4 (25%)",
        "DP-SGD: 2/4 (50%)",
        "DP-SGD: 3/4 (75%)",
        "DP-SGD: 4/4 (100%)",
        "DP-SGD: 4/4 (100%)",
    ]
    assert err[-1].startswith("DP-SGD: 4/4 (100%), done")
    DPSGDClassifier(epsilon=1.0, classes=range(3), steps=4).fit(x, y)  # verbose=0: silent
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "method,description,steps",
    [
        ("ls", "DP-LS", None),
        ("ls-per-class", "DP-LS", None),
        ("fc", "DP-FC", 3),
        ("newton", "DP Newton", 2),
        ("sgd", "DP-SGD", 5),
    ],
)
def test_cli_train_plain_lines(tmp_path, rng, every_advance, method, description, steps):
    f = _write(tmp_path / "train.npz", rng)
    args = [
        "train",
        f,
        "-m",
        method,
        "-e",
        "1",
        "--num-classes",
        "3",
        "-o",
        str(tmp_path / "m.npz"),
    ]
    if steps is not None:
        args += ["--steps", str(steps)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = _lines(result.output, description)
    assert (
        "started" in lines[0] and lines[-1].startswith(f"{description}: ") and "done" in lines[-1]
    ), lines
    if steps is not None:
        for i in range(1, steps + 1):
            assert any(ln.startswith(f"{description}: {i}/{steps} (") for ln in lines), lines
    assert "\x1b[" not in result.output  # no terminal control sequences in a log


def test_cli_demo_plain_lines(tmp_path, every_advance):
    result = runner.invoke(
        app,
        [
            "demo",
            "-d",
            "digits",
            "-m",
            "ls",
            "-e",
            "1",
            "--seeds",
            "2",
            "--out",
            str(tmp_path / "demo"),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [ln for ln in _lines(result.output, "digits") if re.match(r"digits: \d+/", ln)]
    assert lines[0].startswith("digits: 0/2 (0%), started")
    assert lines[1].startswith("digits: 1/2 (50%)") and "[DP-LS eps=1 seed=0" in lines[1]
    assert lines[-1].startswith("digits: 2/2 (100%), done")


def test_cli_audit_plain_lines(every_advance):
    result = runner.invoke(
        app, ["audit", "-m", "ls_statistics", "-e", "1", "-e", "4", "--runs", "2000", "--seed", "0"]
    )
    assert result.exit_code in (0, 1), result.output
    lines = _lines(result.output, "audit")
    assert lines[0].startswith("audit: 0/2 (0%), started")
    assert lines[1].startswith("audit: 1/2 (50%)") and "[ls_statistics eps=1 bug=none]" in lines[1]
    assert lines[-1].startswith("audit: 2/2 (100%), done")
