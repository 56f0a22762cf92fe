"""The README's worked example, end to end: the commands of its code block (public images
-> `dpfc extract` -> `dpfc plan` -> `dpfc train` -> `dpfc predict`), each run as written
through the CLI (typer's CliRunner) in a temporary folder, on the generated data. The
shell script that produced examples/worked_example_transcript.txt runs the same list."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("PIL.Image")

from dpfc_native.cli import app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _readme_commands():
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md is not part of this checkout")
    text = readme.read_text()
    section = text.split("\n## Worked example", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = []
    for line in block.splitlines():
        line = line.split("  #", 1)[0].strip()  # drop the trailing comments
        if line:
            commands.append(shlex.split(line))
    return commands


def _script_commands():
    script = ROOT / "examples" / "worked_example.sh"
    return [
        shlex.split(ln[len("run ") :])
        for ln in script.read_text().splitlines()
        if ln.startswith("run ")
    ]


def test_readme_worked_example_runs_end_to_end(tmp_path, monkeypatch):
    commands = _readme_commands()
    if not (ROOT / "examples" / "worked_example_data.py").exists():
        pytest.skip("examples/ is not part of this checkout")
    # The transcript's script runs exactly the README's commands (after the install line).
    assert commands[0][:2] == ["pip", "install"]
    assert _script_commands() == commands[1:]
    assert [c[1] for c in commands if c[0] == "dpfc"] == [
        "extract",
        "extract",
        "plan",
        "train",
        "predict",
    ]
    monkeypatch.chdir(tmp_path)
    outputs = {}
    for cmd in commands[1:]:
        if cmd[0] == "python":
            assert cmd[1] == "examples/worked_example_data.py"
            spec = importlib.util.spec_from_file_location("worked_example_data", ROOT / cmd[1])
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.write_images(cmd[2])
            module.write_model(f"{cmd[2]}/pixels.onnx")
            continue
        assert cmd[0] == "dpfc"
        result = runner.invoke(app, cmd[1:])
        assert result.exit_code == 0, (cmd, result.output)
        outputs.setdefault(cmd[1], []).append(result.output)
    extract_train, extract_test = outputs["extract"]
    assert "1347 images -> features (1347, 64) float32, 10 classes, 0 skipped" in extract_train
    assert "450 images -> features (450, 64) float32, 10 classes, 0 skipped" in extract_test
    train = np.load(tmp_path / "work" / "train.npz")
    assert train["features"].shape == (1347, 64) and train["features"].dtype == np.float32
    assert np.array_equal(np.bincount(train["labels"], minlength=10) > 0, np.ones(10, bool))
    # The plan: the gram's noise-to-signal falls with epsilon, crossing 1 between 2 and 8
    # (what the README's reading of the plan says).
    ratios = [
        float(m)
        for m in re.findall(r"^\s+[\d.]+\s+gram\s+.*\s([\d.e+-]+)\s*$", outputs["plan"][0], re.M)
    ]
    assert len(ratios) == 4 and ratios == sorted(ratios, reverse=True)
    assert ratios[2] > 1 > ratios[3]
    acc = float(re.search(r"test accuracy: ([\d.]+)", outputs["train"][0]).group(1))
    assert acc > 0.7  # epsilon 2 on digits: about 0.88 (chance: 0.1); OS-entropy noise
    assert "total: epsilon = 2, delta = 1e-05" in outputs["train"][0]
    # predict reloads the saved model: the same predictions, so the same accuracy.
    predict = outputs["predict"][0]
    assert "predicted 450 rows with DPLeastSquaresClassifier (epsilon = 2)" in predict
    assert f"accuracy: {acc:.4f}" in predict
