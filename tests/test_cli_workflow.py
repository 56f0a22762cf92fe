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
    result = runner.invoke(
        app,
        [
            "demo",
            "--features",
            str(tmp_path / "public.npz"),
            "--seeds",
            "1",
            "-m",
            "ls",
            "-e",
            "2",
            "-e",
            "inf",
            "--n",
            "120",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    res = json.loads((out / "results.json").read_text())
    [only] = res["results"]
    assert only["n_train"] == 120 and only["n_test"] == 100 and only["d"] == 6
    assert only["median_accuracy"]["ls"]["inf"] > 0.9  # well-separated blobs
    assert (out / "privacy_utility.png").stat().st_size > 0
    bad = runner.invoke(app, ["demo", "--features", str(tmp_path / "missing.npz")])
    assert bad.exit_code == 2 and "--features" in bad.output and "missing.npz" in bad.output
    big = runner.invoke(
        app,
        [
            "demo",
            "--features",
            str(tmp_path / "public.npz"),
            "--n",
            "1000",
            "-m",
            "ls",
            "--seeds",
            "1",
            "--out",
            str(out),
        ],
    )
    assert big.exit_code == 2 and "--n 1000" in big.output


def _train(tmp_path, *args):
    out = tmp_path / "model.npz"
    out.unlink(missing_ok=True)  # a model left by an earlier call must not pass for this one
    return runner.invoke(
        app,
        [
            "train",
            *map(str, args),
            "--method",
            "ls",
            "--epsilon",
            "4",
            "--seed",
            "0",
            "--output",
            str(out),
        ],
    ), out


def _fails_before_fit(result, out, needle):
    assert result.exit_code == 2, result.output
    assert needle in result.output, result.output
    assert "Traceback" not in result.output and "fit time" not in result.output
    assert not out.exists()


def test_train_string_labels_and_public_class_names(tmp_path):
    x, y = _blobs(1, n=330)
    x, y, xt, yt = x[:240], y[:240], x[240:], y[240:]
    names = np.array(["cat", "dog", "ship"])
    np.savez(tmp_path / "tr.npz", features=x, labels=names[y])
    np.savez(tmp_path / "te.npz", features=xt, labels=names[yt])
    result, out = _train(tmp_path, tmp_path / "tr.npz", "--test", tmp_path / "te.npz")
    assert result.exit_code == 0, result.output
    assert "label set: the 3 labels that occur" in result.output  # not public
    model = np.load(out)
    assert list(model["classes"]) == ["cat", "dog", "ship"]
    acc = float(result.output.split("test accuracy:")[1].split()[0])
    assert acc > 0.8
    # A public label set with a class absent from the data: K = 4 rows of weights.
    result, out = _train(tmp_path, tmp_path / "tr.npz", "--classes", "cat,dog,frog,ship")
    assert result.exit_code == 0, result.output
    assert list(np.load(out)["classes"]) == ["cat", "dog", "frog", "ship"]
    assert np.load(out)["coef"].shape == (4, 6)
    assert "label set: the" not in result.output
    # A training label outside --classes: an error naming it, before the fit.
    result, out = _train(tmp_path, tmp_path / "tr.npz", "--classes", "cat,dog")
    _fails_before_fit(result, out, "'ship'")
    result, out = _train(tmp_path, tmp_path / "tr.npz", "--num-classes", "3")
    _fails_before_fit(result, out, "the labels are class names: list them with --classes")


def test_train_float_coded_and_not_zero_based_labels(tmp_path):
    x, y = _blobs(2)
    np.savez(tmp_path / "f.npz", features=x, labels=y.astype(np.float64))
    result, out = _train(tmp_path, tmp_path / "f.npz", "--num-classes", "3")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(out)["classes"], [0, 1, 2])
    bad = y.astype(np.float64)
    bad[17] = 1.5
    np.savez(tmp_path / "bad.npz", features=x, labels=bad)
    result, out = _train(tmp_path, tmp_path / "bad.npz")
    _fails_before_fit(result, out, "index 17")
    # Labels 1..3 (not 0-based), float-coded, with the public set named by --classes.
    np.savez(tmp_path / "one.npz", features=x, labels=(y + 1).astype(np.float32))
    result, out = _train(tmp_path, tmp_path / "one.npz", "--classes", "1,2,3,4")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(out)["classes"], [1, 2, 3, 4])
    result, out = _train(tmp_path, tmp_path / "one.npz", "--classes", "1,2,three")
    _fails_before_fit(result, out, "--classes entry 'three' is not an integer")


def test_train_other_array_names(tmp_path):
    x, y = _blobs(3)
    np.savez(tmp_path / "k.npz", X=x, y=y)
    result, out = _train(tmp_path, tmp_path / "k.npz")
    _fails_before_fit(result, out, "has no array 'features'")
    assert "['X', 'y']" in result.output
    result, out = _train(
        tmp_path,
        tmp_path / "k.npz",
        "--features-key",
        "X",
        "--labels-key",
        "y",
        "--num-classes",
        "3",
    )
    assert result.exit_code == 0, result.output
    assert np.load(out)["coef"].shape == (3, 6)


def test_train_checks_the_test_file_before_the_fit(tmp_path):
    x, y = _blobs(4)
    data.save_features(tmp_path / "tr.npz", x, y)
    data.save_features(tmp_path / "wide.npz", np.ones((20, 9), np.float32), np.zeros(20, np.int64))
    result, out = _train(tmp_path, tmp_path / "tr.npz", "--test", tmp_path / "wide.npz")
    _fails_before_fit(result, out, "wide.npz has 9 features per row but the training file has 6")
    assert "--test" in result.output
    data.save_features(tmp_path / "k7.npz", x[:30], np.arange(30) % 8)
    result, out = _train(tmp_path, tmp_path / "tr.npz", "--test", tmp_path / "k7.npz")
    _fails_before_fit(result, out, "--test labels include 3")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 truncated")
    result, out = _train(tmp_path, tmp_path / "tr.npz", "--test", tmp_path / "junk.npz")
    _fails_before_fit(result, out, "cannot load --test file")
    np.savez(tmp_path / "names.npz", features=x[:10], labels=np.array(["a"] * 10))
    result, out = _train(tmp_path, tmp_path / "tr.npz", "--val", tmp_path / "names.npz")
    _fails_before_fit(
        result, out, "--val labels are class names but the training labels are integers"
    )


def test_train_messages_name_cli_options(tmp_path):
    x, y = _blobs(5)
    data.save_features(tmp_path / "tr.npz", x, y)
    result, out = _train(tmp_path, tmp_path / "tr.npz", "--reg", "0.1", "--reg", "1")
    _fails_before_fit(result, out, "--reg given more than once is a sweep")
    assert "--val" in result.output and "X_val" not in result.output
    result, out = _train(tmp_path, tmp_path / "tr.npz", "--delta", "2")
    _fails_before_fit(result, out, "--delta must")
    result, out = _train(tmp_path, tmp_path / "tr.npz", "--clip-norm", "-1")
    _fails_before_fit(result, out, "--clip-norm must")
    result, out = _train(tmp_path, tmp_path / "tr.npz", "-p", "nonsense=1")
    _fails_before_fit(result, out, "--param nonsense: not a parameter of DP-LS")
    result, out = _train(tmp_path, tmp_path / "tr.npz", "--test-labels", tmp_path / "x.npy")
    _fails_before_fit(result, out, "--test-labels needs --test")
    from dpfc_native.cli import _cli_message

    assert (
        _cli_message("X_val and y_val must be given together")
        == "--val features and labels must be given together"
    )
    assert (
        _cli_message("y_val contains labels not in classes_, e.g. 4")
        == "--val labels contains labels not in the label set, e.g. 4"
    )
    assert (
        _cli_message("grad_clip_norm must be finite and > 0, got -1")
        == "--grad-clip-norm must be finite and > 0, got -1"
    )


def test_version():
    result = runner.invoke(app, ["--version"])
    assert (
        result.exit_code == 0 and result.output.strip() == f"dpfc_native {dpfc_native.__version__}"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dpfc_native", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and dpfc_native.__version__ in proc.stdout


def test_coerce_labels_and_read_labeled_arrays(tmp_path):
    from dpfc_native.data import coerce_labels, read_labeled_arrays

    np.testing.assert_array_equal(coerce_labels(np.array([3.0, -1.0, 7.0])), [3, -1, 7])
    assert coerce_labels(np.array([3.0])).dtype == np.int64
    assert list(coerce_labels(np.array([b"a", b"b"]))) == ["a", "b"]
    np.testing.assert_array_equal(coerce_labels(np.array([True, False])), [1, 0])
    for bad, needle in (
        (np.array([1.0, np.nan]), "index 1"),
        (np.array([[1, 2]]), "1-D"),
        (np.array([1 + 2j]), "dtype complex"),
    ):
        with pytest.raises(ValueError, match=needle):
            coerce_labels(bad)
    # Paired .npy with class-name labels; every row read back.
    x, y = _blobs(6, n=37)
    names = np.array(["x", "yy", "zzz"])[y]
    np.save(tmp_path / "s.features.npy", x)
    np.save(tmp_path / "s.labels.npy", names)
    fx, fy = read_labeled_arrays(tmp_path / "s.features.npy")
    np.testing.assert_array_equal(fx, x)
    np.testing.assert_array_equal(fy, names)
    with pytest.raises(ValueError, match="10 entries"):
        np.savez(tmp_path / "m.npz", features=x, labels=y[:10])
        read_labeled_arrays(tmp_path / "m.npz")


def _one_error(result, needle):
    """Exit 2 with exactly one ``Error:`` line containing ``needle``, no traceback."""
    errors = [line for line in result.output.splitlines() if "Error" in line]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and needle in errors[0], result.output
    assert "Traceback" not in result.output


def test_demo_checks_out_first_and_reads_every_label_kind(tmp_path):
    (tmp_path / "afile").write_text("")
    res = runner.invoke(
        app, ["demo", "-m", "ls", "-e", "1", "--seeds", "1", "--out", str(tmp_path / "afile")]
    )
    _one_error(res, "is a file, not a directory")
    x, y = _blobs(3, n=400)
    np.savez(tmp_path / "names.npz", features=x, labels=np.array(["cat", "dog", "ship"])[y])
    res = runner.invoke(
        app,
        [
            "demo",
            "--features",
            str(tmp_path / "names.npz"),
            "-m",
            "ls",
            "-e",
            "1",
            "--seeds",
            "1",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "o" / "results.json").read_text())
    assert "names.npz" in json.dumps(out)


def test_every_command_speaks_of_its_options(tmp_path):
    x, y = _blobs(4)
    data.save_features(tmp_path / "t.npz", x, y)
    for args, needle in (
        (["train", str(tmp_path / "t.npz"), "--device", "gpu"], "--device must be one of"),
        (["train", str(tmp_path / "t.npz"), "-m", "ls", "--lr", "0.5"], "--lr: not a parameter"),
        (["plan", "--n", "10", "--dim", "5", "-k", "3", "--steps", "0"], "--steps must be >= 1"),
        (["plan", "--n", "10", "--dim", "5", "-k", "3", "--clip-norm", "0"], "--clip-norm must"),
        (["audit", "--dim", "0"], "--dim must be >= 1"),
        (["audit", "--runs", "10"], "--runs must be >= 200"),
        (["audit", "--backend", "x"], "--backend must be one of"),
        (["audit", "--leaf-rows", "0"], "--leaf-rows must be >= 1"),
        (["predict", str(tmp_path / "t.npz"), str(tmp_path / "t.npz")], "not a dpfc_native model"),
    ):
        _one_error(runner.invoke(app, args), needle)
    (tmp_path / "notes.txt").write_text("hello\n")
    res = runner.invoke(app, ["predict", str(tmp_path / "notes.txt"), str(tmp_path / "t.npz")])
    _one_error(res, "not an .npz archive")
    assert "allow_pickle" not in res.output


def test_json_reports_are_checked_before_the_work_and_not_overwritten(tmp_path):
    (tmp_path / "afile").write_text("")
    for target in (tmp_path, tmp_path / "afile" / "a.json"):  # a directory; under a file
        res = runner.invoke(app, ["audit", "--runs", "1000", "--json", str(target)])
        _one_error(res, "--json")
        assert "audit:" not in res.output  # refused before any mechanism ran
    (tmp_path / "p.json").write_text("{}")
    res = runner.invoke(
        app, ["plan", "--n", "100", "--dim", "5", "-k", "3", "--json", str(tmp_path / "p.json")]
    )
    _one_error(res, "pass --force")
    assert (tmp_path / "p.json").read_text() == "{}"
    res = runner.invoke(
        app,
        [
            "plan",
            "--n",
            "100",
            "--dim",
            "5",
            "-k",
            "3",
            "--json",
            str(tmp_path / "p.json"),
            "--force",
        ],
    )
    assert res.exit_code == 0 and json.loads((tmp_path / "p.json").read_text())["rows"]


def test_option_words_leave_paths_alone_and_zarr_fill_from_the_cli(tmp_path):
    res = runner.invoke(app, ["train", str(tmp_path / "runs/method=fc,epsilon=1/t.npz")])
    _one_error(res, "runs/method=fc,epsilon=1/t.npz")
    assert "--method=" not in res.output and "--epsilon=" not in res.output
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(5)
    y = np.sort(rng.integers(0, 3, 100))  # class 0 first: zarr 3 stores no all-zero chunk
    g = zarr.open_group(str(tmp_path / "sorted.zarr"), mode="w")
    g.create_array("features", data=rng.standard_normal((100, 4)).astype("f4"), chunks=(10, 4))
    g.create_array("labels", data=y, chunks=(10,))
    args = ["train", str(tmp_path / "sorted.zarr"), "--num-classes", "3", "-m", "ls"]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "a.npz")])
    _one_error(res, "--missing-chunks='fill'")
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "b.npz"), "--missing-chunks", "fill"])
    assert res.exit_code == 0, res.output


def test_predict_on_unlabelled_safetensors(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    x, y = _blobs(6)
    data.save_features(tmp_path / "t.npz", x, y)
    res, model = _train(tmp_path, tmp_path / "t.npz", "--num-classes", 3)
    assert res.exit_code == 0, res.output
    safetensors_numpy.save_file({"features": x[:20]}, str(tmp_path / "nolab.safetensors"))
    res = runner.invoke(app, ["predict", str(model), str(tmp_path / "nolab.safetensors")])
    assert res.exit_code == 0 and "predicted 20 rows" in res.output and "accuracy" not in res.output


def _run_with_file_size_limit(args, limit, cwd):
    """``python -m dpfc_native ARGS`` in a process that cannot write files larger than
    ``limit`` bytes (a full disk, as far as the writes are concerned)."""
    import resource
    import signal

    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "dpfc_native", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        preexec_fn=cap,
    )


@pytest.mark.parametrize("command", ["plan", "audit", "predict"])
def test_a_failed_write_leaves_the_previous_output(tmp_path, command):
    """plan --json, audit --json and predict -o wrote straight to the final path: a write
    that failed part-way (here: a file-size cap standing in for a full disk) left a
    truncated file, and with --force it had first destroyed the good one."""
    previous = "previous output, kept whole\n"
    if command == "plan":
        target = tmp_path / "plan.json"
        args = ["plan", "--n", "10000", "--dim", "64", "-k", "10", "--json", str(target)]
        limit = 300
    elif command == "audit":
        target = tmp_path / "audit.json"
        args = ["audit", "-m", "gram", "-e", "2", "--runs", "200", "--json", str(target)]
        limit = 200
    else:
        x, y = _blobs(6)
        data.save_features(tmp_path / "t.npz", x, y)
        assert (
            runner.invoke(
                app, ["train", str(tmp_path / "t.npz"), "-m", "ls", "-o", str(tmp_path / "m.npz")]
            ).exit_code
            == 0
        )
        target = tmp_path / "pred.npy"
        args = ["predict", str(tmp_path / "m.npz"), str(tmp_path / "t.npz"), "-o", str(target)]
        limit = 200
    target.write_text(previous)
    res = _run_with_file_size_limit([*args, "--force"], limit, tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"Error: cannot write {target}" in res.stderr, res.stderr
    assert target.read_text() == previous
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")) == []
    # Without the cap the same command replaces it whole.
    res = subprocess.run(
        [sys.executable, "-m", "dpfc_native", *args, "--force"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    if command == "predict":
        assert np.load(target).shape == (len(_blobs(6)[1]),)
    else:
        json.loads(target.read_text())


def test_a_refused_command_makes_no_output_folders(tmp_path):
    """The output path is checked before any work, without creating its folders: a
    command refused later (here: a missing input) left them behind."""
    res = runner.invoke(
        app, ["train", str(tmp_path / "missing.npz"), "-o", str(tmp_path / "a" / "b" / "m.npz")]
    )
    assert res.exit_code == 2
    assert not (tmp_path / "a").exists()
    (tmp_path / "afile").write_text("")
    res = runner.invoke(
        app, ["train", str(tmp_path / "missing.npz"), "-o", str(tmp_path / "afile" / "m.npz")]
    )
    _one_error(res, "not a directory")


def test_atomic_write_takes_long_names_and_special_files(tmp_path):
    """The temporary name no longer embeds the target's (a 246-character name failed with
    ENAMETOOLONG only at write time, after the work); a FIFO or /dev/stdout is written in
    place (it was replaced by a regular file, or the write failed in /proc)."""
    import os
    import threading

    from dpfc_native._fileio import atomic_write

    long = tmp_path / ("p" * 246 + ".npy")
    with atomic_write(long, binary=True) as f:
        f.write(b"abc")
    assert long.read_bytes() == b"abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == [long.name]
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    with atomic_write(fifo) as f:
        f.write('{"rows": []}')
    reader.join(20)
    assert got == ['{"rows": []}'] and not fifo.is_file() and fifo.exists()
    res = subprocess.run(
        [sys.executable, "-m", "dpfc_native", "plan", "--n", "1000", "--dim", "8", "-k", "3"]
        + ["--json", "/dev/stdout", "--force"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert '"num_classes": 3' in res.stdout
    # stdout redirected to a file (>>): /dev/stdout is written through the descriptor, so
    # neither the earlier contents nor the later output are lost (opening /dev/stdout anew
    # truncated the file; renaming over it detached the stream).
    log = tmp_path / "log.txt"
    log.write_text("previous log\n")
    with open(log, "a") as out:
        res = subprocess.run(
            [sys.executable, "-m", "dpfc_native", "plan", "--n", "1000", "--dim", "8", "-k", "3"]
            + ["--json", "/dev/stdout", "--force"],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert res.returncode == 0, res.stderr
    text = log.read_text()
    assert text.startswith("previous log\n") and '"num_classes": 3' in text
    assert "rows written to /dev/stdout" in text


def test_atomic_write_dev_shm_files_and_own_descriptors(tmp_path, monkeypatch):
    """A regular file under /dev/shm is replaced whole like any other (a '/dev/' prefix
    rule wrote it in place: a failure left half a file); a descriptor of this process is
    written through, even with sys.stdout gone, and binary output in one piece (a zip
    written through an O_APPEND descriptor was corrupt: its writer seeks back)."""
    import os
    import shutil

    from dpfc_native._fileio import atomic_write

    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        root = f"/dev/shm/dpfc-test-{os.getpid()}"
        target = f"{root}/new/x.json"
        try:
            with atomic_write(target) as f:  # its folders are made
                f.write("good")
            with pytest.raises(RuntimeError), atomic_write(target) as f:
                f.write("half")
                raise RuntimeError("interrupted")
            with open(target) as f:
                assert f.read() == "good"
        finally:
            shutil.rmtree(root, ignore_errors=True)
    target = tmp_path / "out.npz"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        monkeypatch.setattr(sys, "stdout", None)
        with atomic_write(f"/dev/fd/{fd}", binary=True) as f:
            np.savez(f, a=np.arange(5))
        monkeypatch.undo()
    finally:
        os.close(fd)
    np.testing.assert_array_equal(np.load(target)["a"], np.arange(5))


def test_atomic_write_recognises_stdout_by_any_path(tmp_path):
    """Another spelling of /dev/stdout (a symlink to it, /proc/<pid>/fd/1, /dev/./stdout)
    with stdout redirected to a file was renamed over (the log and all later output lost);
    a block that raises writes nothing to the descriptor."""
    import os

    link = tmp_path / "to_stdout"
    os.symlink("/dev/stdout", link)
    script = (
        "import sys, os\n"
        "from dpfc_native._fileio import atomic_write\n"
        "print('before', flush=True)\n"
        "path = sys.argv[1].replace('PID', str(os.getpid()))\n"
        "with atomic_write(path) as f:\n"
        "    f.write('PAYLOAD\\n')\n"
        "try:\n"
        "    with atomic_write(path) as f:\n"
        "        f.write('HALF')\n"
        "        raise RuntimeError\n"
        "except RuntimeError:\n"
        "    pass\n"
        "print('after', flush=True)\n"
    )
    for path in (str(link), "/proc/PID/fd/1", "/dev/./stdout", "/proc/thread-self/fd/1"):
        log = tmp_path / "log.txt"
        log.write_text("previous\n")
        with open(log, "a") as out:
            res = subprocess.run(
                [sys.executable, "-c", script, path],
                stdout=out,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        assert res.returncode == 0, res.stderr
        assert log.read_text() == "previous\nbefore\nPAYLOAD\nafter\n", (path, log.read_text())
