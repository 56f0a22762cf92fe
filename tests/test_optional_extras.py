"""A feature whose optional package is missing says which extra to install.

The packages are installed here (CI installs every extra), so their absence is simulated:
``sys.modules[name] = None`` makes ``import name`` fail as if it were not installed. Each
path below raised a bare ``No module named ...`` (or named a package, not the extra).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from dpfc_native import accounting, data, distributed, shards
from dpfc_native.cli import app

runner = CliRunner()
HINT = 'pip install "dpfc-native[{}]"'


def _blocked(monkeypatch, *modules):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def _rows(seed=0, n=40, d=5):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, 3, n)


def _zarr_shard(tmp_path):
    zarr = pytest.importorskip("zarr")
    x, y = _rows()
    g = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    g.create_array("features", data=x, chunks=(16, 5))
    g.create_array("labels", data=y, chunks=(16,))
    return str(tmp_path / "a.zarr")


def _parquet_shard(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    x, y = _rows()
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 5)
    pq.write_table(pa.table({"features": col, "labels": y}), str(tmp_path / "a.parquet"))
    return str(tmp_path / "a.parquet")


def _safetensors_file(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    x, y = _rows()
    st.save_file({"features": x, "labels": y}, str(tmp_path / "a.safetensors"))
    return str(tmp_path / "a.safetensors")


@pytest.mark.parametrize(
    "make,blocked,extra",
    [
        (_zarr_shard, ("zarr",), "distributed"),
        (_parquet_shard, ("pyarrow", "pyarrow.parquet"), "distributed"),
        (_safetensors_file, ("safetensors",), "safetensors"),
    ],
    ids=["zarr", "parquet", "safetensors"],
)
def test_sharded_formats_name_their_extra(tmp_path, monkeypatch, make, blocked, extra):
    path = make(tmp_path)
    _blocked(monkeypatch, *blocked)
    with pytest.raises(ModuleNotFoundError, match=r"needs the optional package") as err:
        shards.open_sharded(path, num_classes=3)
    assert HINT.format(extra) in str(err.value)
    # The CLI: one line, exit status 2, the same hint.
    res = runner.invoke(app, ["train", path, "-m", "ls", "--classes", "0,1,2"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("Error")]
    assert len(lines) == 1 and HINT.format(extra) in lines[0], res.output
    assert "Traceback" not in res.output


def test_safetensors_features_name_their_extra(tmp_path, monkeypatch):
    path = _safetensors_file(tmp_path)
    model = str(tmp_path / "m.npz")
    assert runner.invoke(app, ["train", path, "-m", "ls", "-o", model]).exit_code == 0
    _blocked(monkeypatch, "safetensors")
    with pytest.raises(ModuleNotFoundError, match=r"dpfc-native\[safetensors\]"):
        data.load_features(path)
    res = runner.invoke(app, ["predict", model, path])  # predict read it unguarded
    assert res.exit_code == 2 and HINT.format("safetensors") in res.output, res.output
    assert "Traceback" not in res.output


def test_to_dask_and_the_dask_backend_name_their_extra(tmp_path, monkeypatch):
    da = pytest.importorskip("dask.array")
    x, y = _rows(1)
    np.savez(tmp_path / "s.npz", features=x, labels=y)
    sf = shards.open_sharded(str(tmp_path / "s.npz"), num_classes=3)
    xd = da.from_array(x, chunks=(16, 5))
    # `distributed` missing (dask present): the backend's entry points imported it bare.
    _blocked(monkeypatch, "distributed")
    with pytest.raises(ModuleNotFoundError, match=r"dpfc-native\[distributed\]"):
        distributed.clipped_gram(xd, 1.0)
    with pytest.raises(ModuleNotFoundError, match=r"dpfc-native\[distributed\]"):
        distributed.clipped_gram(sf, 1.0)
    _blocked(monkeypatch, "dask", "dask.array")
    with pytest.raises(ModuleNotFoundError, match=r"dpfc-native\[distributed\]"):
        sf.to_dask()


def test_pld_accountant_names_its_extra(monkeypatch):
    monkeypatch.setattr(accounting.accountant, "_dp_accounting", lambda: None)
    acct = accounting.PrivacyAccountant(method="pld")
    acct.compose(accounting.SubsampledGaussian(1.0, 0.01, 10))
    with pytest.raises(ModuleNotFoundError, match=r"dpfc-native\[accounting\]"):
        acct.get_epsilon(1e-5)


def test_cli_pld_error_does_not_point_at_the_method_option(tmp_path, monkeypatch):
    """The accountant's message named its own `method=` argument, which the CLI rewrote
    into `--method` (the estimator option): the hint pointed at the wrong flag."""
    x, y = _rows(2, n=60)
    data.save_features(tmp_path / "t.npz", x, y)
    monkeypatch.setattr(accounting.accountant, "_dp_accounting", lambda: None)
    res = runner.invoke(
        app,
        ["train", str(tmp_path / "t.npz"), "-m", "sgd", "-p", "sample_rate=0.5"]
        + ["-p", "accountant=pld", "-p", "steps=3"],
    )
    assert res.exit_code == 2, res.output
    assert HINT.format("accounting") in res.output and "--method" not in res.output


def test_an_installed_package_that_does_not_import_keeps_its_cause(tmp_path, monkeypatch):
    """A package that is installed but fails to import (here: a missing shared library)
    is not reported as "install the extra": its own error is kept in the message."""
    from dpfc_native._optional import require

    pkg = tmp_path / "dpfc_broken_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "raise ImportError('libblosc2.so.4: cannot open shared object file')\n"
    )
    deeper = tmp_path / "dpfc_half_pkg"
    deeper.mkdir()
    (deeper / "__init__.py").write_text("import dpfc_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="installed but does not import.*libblosc2") as err:
        require("dpfc_broken_pkg", "reading zarr shards", "distributed")
    assert not isinstance(err.value, ModuleNotFoundError) and "pip install" not in str(err.value)
    # A dependency of the package missing: not the package itself.
    with pytest.raises(ImportError, match="does not import.*dpfc_no_such_dependency"):
        require("dpfc_half_pkg", "x", "distributed")
    # The package itself, or a parent of the module asked for, missing: the extra.
    for name in ("dpfc_no_such_pkg", "dpfc_no_such_pkg.sub"):
        with pytest.raises(ModuleNotFoundError, match=r'pip install "dpfc-native\[distributed\]"'):
            require(name, "x", "distributed")


def test_predict_on_a_corrupt_safetensors_file_is_one_line(tmp_path):
    x, y = _rows(3)
    data.save_features(tmp_path / "t.npz", x, y)
    model = str(tmp_path / "m.npz")
    assert (
        runner.invoke(app, ["train", str(tmp_path / "t.npz"), "-m", "ls", "-o", model]).exit_code
        == 0
    )
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all, just bytes")
    for args in (["predict", model, str(bad)], ["train", str(bad), "-m", "ls"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and "corrupted .safetensors" in res.output


def test_extraction_and_multi_gpu_workers_name_their_extra(monkeypatch):
    from dpfc_native import extract

    _blocked(monkeypatch, "onnxruntime")
    with pytest.raises(ModuleNotFoundError, match=r"ONNX models .*dpfc-native\[extract\]"):
        extract._OnnxModel("model.onnx", "cpu", None, 1)
    _blocked(monkeypatch, "timm")
    with pytest.raises(ImportError, match=r"dpfc-native\[timm\].*or export the model to ONNX"):
        extract._TimmModel("resnet18", "w.safetensors", "cpu")
    _blocked(monkeypatch, "dask_cuda")
    with pytest.raises(ModuleNotFoundError, match=r"dpfc-native\[multigpu\]"):
        distributed.local_cuda_cluster()
