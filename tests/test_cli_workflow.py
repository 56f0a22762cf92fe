"""The CLI as a user drives it: ``dpfc demo --features``, ``dpfc train`` with string and
float-coded labels, other array keys, a public label set, CLI-worded errors, ``--version``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import dpfc_native
from dpfc_native import data
from dpfc_native.cli import app

runner = CliRunner()


def _blobs(seed, n=240, d=6, k=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    x = rng.standard_normal((k, d))[y] * 2.0 + 0.6 * rng.standard_normal((n, d))
    return x.astype(np.float32), y


def test_demo_on_a_public_features_file(tmp_path):
    x, y = _blobs(0, n=400)
    data.save_features(tmp_path / "public.npz", x, y)
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--features", str(tmp_path / "public.npz"), "--seeds",
                                 "1", "-m", "ls", "-e", "2", "-e", "inf", "--n", "120",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    [only] = res["results"]
    assert only["n_train"] == 120 and only["n_test"] == 100 and only["d"] == 6
    assert only["median_accuracy"]["ls"]["inf"] > 0.9  # well-separated blobs
    assert (out / "privacy_utility.png").stat().st_size > 0
    bad = runner.invoke(app, ["demo", "--features", str(tmp_path / "missing.npz")])
    assert bad.exit_code == 2 and "--features" in bad.output and "missing.npz" in bad.output
    big = runner.invoke(app, ["demo", "--features", str(tmp_path / "public.npz"), "--n",
                              "1000", "-m", "ls", "--seeds", "1", "--out", str(out)])
    assert big.exit_code == 2 and "--n 1000" in big.output
