"""Sharded feature sources: every format reads back exactly what was written, slice by
slice; corrupt, truncated, mismatched or changed shards raise naming the shard."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest

from dpfc_native import data
from dpfc_native.shards import ShardError, open_sharded

ROWS = (37, 50, 13)  # unequal, odd
D = 7
K = 4


def _arrays(rng, dtype=np.float32):
    out = []
    for m in ROWS:
        x = (rng.standard_normal((m, D)) * 3).astype(dtype)
        y = rng.integers(0, K, size=m).astype(np.int64)
        out.append((x, y))
    return out


def _write(fmt, tmp_path, arrays):
    paths = []
    for i, (x, y) in enumerate(arrays):
        stem = tmp_path / f"part-{i:02d}"
        if fmt == "npy":
            np.save(f"{stem}.features.npy", x)
            np.save(f"{stem}.labels.npy", y)
            paths.append(f"{stem}.features.npy")
        elif fmt == "npz":
            np.savez(f"{stem}.npz", features=x, labels=y)
            paths.append(f"{stem}.npz")
        elif fmt == "npz-compressed":
            np.savez_compressed(f"{stem}.npz", features=x, labels=y)
            paths.append(f"{stem}.npz")
        elif fmt == "safetensors":
            from safetensors.numpy import save_file

            save_file({"features": x, "labels": y}, f"{stem}.safetensors")
            paths.append(f"{stem}.safetensors")
        elif fmt == "zarr":
            zarr = pytest.importorskip("zarr")
            g = zarr.open_group(f"{stem}.zarr", mode="w")
            g.create_array("features", data=x, chunks=(16, D))
            g.create_array("labels", data=y, chunks=(16,))
            paths.append(f"{stem}.zarr")
        elif fmt in ("parquet-list", "parquet-columns", "parquet-hf"):
            pa = pytest.importorskip("pyarrow")
            pq = pytest.importorskip("pyarrow.parquet")
            if fmt == "parquet-list":
                col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), D)
                table = pa.table({"features": col, "labels": y})
            elif fmt == "parquet-hf":  # variable-size list column named like HF datasets
                table = pa.table({"features": pa.array(list(x)), "label": y})
            else:
                table = pa.table({**{f"f{j}": x[:, j] for j in range(D)}, "labels": y})
            pq.write_table(table, f"{stem}.parquet", row_group_size=11)
            paths.append(f"{stem}.parquet")
    return paths


FORMATS = [
    "npy",
    "npz",
    "npz-compressed",
    "safetensors",
    "zarr",
    "parquet-list",
    "parquet-columns",
    "parquet-hf",
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_back_exact_slices(fmt, tmp_path):
    rng = np.random.default_rng(FORMATS.index(fmt) + 100)
    expect = _arrays(rng)
    paths = _write(fmt, tmp_path, expect)
    # Given in reverse order: the manifest sorts by path.
    sf = data.open_sharded(list(reversed(paths)))
    assert [s.rows for s in sf.shards] == list(ROWS)
    assert sf.n_rows == sum(ROWS) and sf.n_features == D and sf.num_classes == K
    assert sf.dtype == np.float32
    assert all(len(s.sha256) == 64 and s.size > 0 for s in sf.shards)
    for i, (x, y) in enumerate(expect):
        got_x, got_y = sf.read(i)
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, y)
        assert got_x.dtype == np.float32 and got_y.dtype == np.int64
        assert not isinstance(got_x, np.memmap)
        for lo, hi in ((0, 1), (3, 12), (x.shape[0] - 5, x.shape[0]), (4, 4)):
            sx, sy = sf.read(i, lo, hi)
            np.testing.assert_array_equal(sx, x[lo:hi])
            np.testing.assert_array_equal(sy, y[lo:hi])
    allx = np.concatenate([x for x, _ in expect])
    gx, gy = sf.read_global(30, 95)  # spans all three shards
    np.testing.assert_array_equal(gx, allx[30:95])
    # The object pickles as its manifest (small), and reads the same after a round trip.
    blob = pickle.dumps(sf)
    assert len(blob) < 8192
    sf2 = pickle.loads(blob)
    np.testing.assert_array_equal(sf2.read(1, 2, 9)[0], expect[1][0][2:9])


def test_glob_pairs_npy_and_orders_shards(tmp_path):
    rng = np.random.default_rng(1)
    expect = _arrays(rng)
    _write("npy", tmp_path, expect)
    sf = open_sharded(str(tmp_path / "*.npy"))  # matches the labels files too
    assert len(sf.shards) == 3
    assert [os.path.basename(s.path) for s in sf.shards] == [
        f"part-{i:02d}.features.npy" for i in range(3)
    ]
    assert sf.shards[0].labels_path.endswith("part-00.labels.npy")
    np.testing.assert_array_equal(sf.offsets, np.cumsum([0, *ROWS]))
    man = sf.manifest()
    assert man[2]["rows"] == ROWS[2] and man[2]["dtype"] == "float32"


def test_float16_kept_as_stored(tmp_path):
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((21, D)).astype(np.float16)
    y = rng.integers(0, K, 21)
    g = zarr.open_group(str(tmp_path / "h.zarr"), mode="w")
    g.create_array("features", data=x, chunks=(8, D))
    g.create_array("labels", data=y, chunks=(8,))
    sf = open_sharded(str(tmp_path / "h.zarr"))
    got, _ = sf.read(0, 5, 13)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, x[5:13])
    np.save(tmp_path / "h.features.npy", x)
    np.save(tmp_path / "h.labels.npy", y)
    assert open_sharded(str(tmp_path / "h.features.npy")).read(0)[0].dtype == np.float16


def test_hash_is_content_hash_and_verify_detects_change(tmp_path):
    rng = np.random.default_rng(3)
    arrays = _arrays(rng)
    paths = _write("npy", tmp_path, arrays)
    sf = open_sharded(paths)
    assert len({s.sha256 for s in sf.shards}) == 3
    sf.verify()
    # Same size, different content: only the hash sees it.
    x = arrays[1][0].copy()
    x[3, 2] += 1.0
    np.save(paths[1], x)
    with pytest.raises(ShardError, match="part-01.features.npy.*SHA-256"):
        sf.verify()
    assert open_sharded(paths).shards[1].sha256 != sf.shards[1].sha256


def test_truncated_npy_names_the_shard(tmp_path):
    rng = np.random.default_rng(4)
    paths = _write("npy", tmp_path, _arrays(rng))
    with open(paths[1], "r+b") as fh:
        fh.truncate(os.path.getsize(paths[1]) - 40)
    with pytest.raises(ShardError, match="part-01.features.npy"):
        open_sharded(paths)


def test_shard_truncated_after_opening_raises_on_read(tmp_path):
    rng = np.random.default_rng(5)
    paths = _write("npy", tmp_path, _arrays(rng))
    sf = open_sharded(paths, checksum=False)
    with open(paths[2], "r+b") as fh:
        fh.truncate(os.path.getsize(paths[2]) - 28)
    sf.read(0, 0, 5)  # other shards still read
    with pytest.raises(ShardError, match="part-02.features.npy.*changed"):
        sf.read(2, 0, 5)


@pytest.mark.parametrize("fmt", ["npz", "npz-compressed", "safetensors", "parquet-list"])
def test_corrupt_files_name_the_shard(fmt, tmp_path):
    rng = np.random.default_rng(6)
    paths = _write(fmt, tmp_path, _arrays(rng))
    size = os.path.getsize(paths[0])
    with open(paths[0], "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(ShardError, match="part-00"):
        open_sharded(paths)


def test_corrupt_zarr_chunk_names_the_shard(tmp_path):
    rng = np.random.default_rng(7)
    paths = _write("zarr", tmp_path, _arrays(rng))
    sf = open_sharded(paths, checksum=False)
    chunk = None
    for root, _, files in os.walk(os.path.join(paths[1], "features")):
        for f in files:
            if f != "zarr.json":
                chunk = os.path.join(root, f)
                break
    assert chunk is not None
    os.remove(chunk)
    with pytest.raises(ShardError, match="part-01.zarr"):
        sf.read(1)


def test_mismatches_name_the_shard(tmp_path):
    rng = np.random.default_rng(8)
    np.save(tmp_path / "a.features.npy", rng.standard_normal((9, D)))
    np.save(tmp_path / "a.labels.npy", rng.integers(0, K, 9))
    # rows of features and labels disagree
    np.save(tmp_path / "b.features.npy", rng.standard_normal((9, D)))
    np.save(tmp_path / "b.labels.npy", rng.integers(0, K, 8))
    with pytest.raises(ShardError, match="b.features.npy.*9 feature rows"):
        open_sharded(str(tmp_path / "*.npy"))
    # feature dimension disagrees
    np.save(tmp_path / "b.features.npy", rng.standard_normal((8, D + 1)))
    with pytest.raises(ShardError, match="b.features.npy.*8 features"):
        open_sharded(str(tmp_path / "*.npy"))
    # dtype disagrees
    np.save(tmp_path / "b.features.npy", rng.standard_normal((8, D)).astype(np.float32))
    with pytest.raises(ShardError, match="b.features.npy.*dtype float32"):
        open_sharded(str(tmp_path / "*.npy"))
    # float labels, negative labels, labels beyond num_classes, a missing pair
    np.save(tmp_path / "b.features.npy", rng.standard_normal((8, D)))
    np.save(tmp_path / "b.labels.npy", np.ones(8))
    with pytest.raises(ShardError, match="b.features.npy.*integers"):
        open_sharded(str(tmp_path / "*.npy"))
    np.save(tmp_path / "b.labels.npy", -np.ones(8, np.int64))
    with pytest.raises(ShardError, match="b.features.npy.*negative"):
        open_sharded(str(tmp_path / "*.npy"))
    np.save(tmp_path / "b.labels.npy", np.full(8, 9, np.int64))
    with pytest.raises(ShardError, match="b.features.npy.*num_classes=5"):
        open_sharded(str(tmp_path / "*.npy"), num_classes=5)
    os.remove(tmp_path / "b.labels.npy")
    with pytest.raises(ShardError, match="b.features.npy.*no labels file"):
        open_sharded(str(tmp_path / "*.npy"))
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        open_sharded(str(tmp_path / "nothing-here*.npy"))


def test_npz_missing_key_names_the_shard(tmp_path):
    np.savez(tmp_path / "p.npz", features=np.ones((3, 2)), targets=np.zeros(3, np.int64))
    with pytest.raises(ShardError, match="p.npz.*'labels'"):
        open_sharded(str(tmp_path / "p.npz"))


def test_uncompressed_npz_is_memory_mapped(tmp_path):
    from dpfc_native.shards import _npz_member

    x = np.random.default_rng(9).standard_normal((40, 3))
    np.savez(tmp_path / "m.npz", features=x, labels=np.zeros(40, np.int64))
    with zipfile.ZipFile(tmp_path / "m.npz") as zf:
        assert zf.getinfo("features.npy").compress_type == zipfile.ZIP_STORED
    member = _npz_member(str(tmp_path / "m.npz"), "features")
    assert isinstance(member, np.memmap)
    np.testing.assert_array_equal(member, x)


def test_to_dask_holds_no_data_in_the_graph(tmp_path):
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(10)
    expect = _arrays(rng)
    paths = _write("npy", tmp_path, expect)
    sf = open_sharded(paths)
    x, y = sf.to_dask(chunk_rows=16)
    assert x.shape == (sum(ROWS), D) and x.chunks[0] == (16, 16, 5, 16, 16, 16, 2, 13)
    import pickle as _p

    assert len(_p.dumps(dict(x.__dask_graph__()))) < 64 * 1024
    np.testing.assert_array_equal(
        x.compute(scheduler="synchronous"), np.concatenate([a for a, _ in expect])
    )
    np.testing.assert_array_equal(
        y.compute(scheduler="synchronous"), np.concatenate([b for _, b in expect])
    )
    assert isinstance(x, da.Array)


@pytest.mark.parametrize("fmt", ["npy", "zarr", "npz", "parquet-list"])
def test_take_reads_the_given_rows(fmt, tmp_path):
    rng = np.random.default_rng(11 + FORMATS.index(fmt))
    expect = _arrays(rng)
    sf = open_sharded(_write(fmt, tmp_path, expect))
    rows = np.array([0, 3, 4, 19, 36])
    x, y = sf.take(0, rows)
    np.testing.assert_array_equal(x, expect[0][0][rows])
    np.testing.assert_array_equal(y, expect[0][1][rows])
    assert sf.take(1, np.array([], np.int64))[0].shape == (0, D)
    with pytest.raises(IndexError):
        sf.take(0, np.array([3, 2]))


def test_corrupt_stored_npz_member_fails_its_crc(tmp_path):
    """A flipped byte inside an uncompressed member: memory-mapped reads would never see
    it, so opening checks the members' CRC-32 (checksum=True, the default)."""
    x = np.random.default_rng(10).standard_normal((10, 3)).astype(np.float32)
    np.savez(tmp_path / "h.npz", features=x, labels=np.arange(10) % 3)
    raw = bytearray((tmp_path / "h.npz").read_bytes())
    raw[200] ^= 0xFF  # inside the features' data
    (tmp_path / "h.npz").write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="h.npz.*CRC"):
        open_sharded(str(tmp_path / "h.npz"))
    # Without the checksum pass the bytes are not read at open (sizes only).
    assert open_sharded(str(tmp_path / "h.npz"), checksum=False).n_rows == 10


def test_zarr_missing_chunks_are_an_error_unless_fill_is_asked(tmp_path):
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(11)
    x = rng.standard_normal((10, 3)).astype(np.float32)
    g = zarr.open_group(str(tmp_path / "lost.zarr"), mode="w")
    g.create_array("features", data=x, chunks=(4, 3))
    g.create_array("labels", data=np.full(10, 2), chunks=(4,))
    os.remove(tmp_path / "lost.zarr" / "features" / "c" / "1" / "0")  # an interrupted copy
    with pytest.raises(ShardError, match=r"lost.zarr: array 'features' has 1 of its 3 chunks"):
        open_sharded(str(tmp_path / "lost.zarr"))
    # zarr 3's default leaves out chunks equal to the fill value: here labels 0..3 are 0.
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    g = zarr.open_group(str(tmp_path / "sparse.zarr"), mode="w")
    g.create_array("features", data=x, chunks=(4, 3))
    g.create_array("labels", data=y, chunks=(4,))
    with pytest.raises(ShardError, match="missing_chunks='fill'"):
        open_sharded(str(tmp_path / "sparse.zarr"))
    sf = open_sharded(str(tmp_path / "sparse.zarr"), missing_chunks="fill")
    xr, yr = sf.read(0)
    np.testing.assert_array_equal(xr, x)
    np.testing.assert_array_equal(yr, y)
    with pytest.raises(ValueError, match="missing_chunks"):
        open_sharded(str(tmp_path / "sparse.zarr"), missing_chunks="zeros")


def test_parquet_pandas_index_is_not_a_feature_and_edge_row_groups(tmp_path):
    pd = pytest.importorskip("pandas")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(12)
    df = pd.DataFrame(rng.standard_normal((20, 3)).astype(np.float32), columns=list("abc"))
    df["label"] = np.arange(20) % 3
    kept = df[df.a > 0]  # a filtered frame stores its integer index as a column
    kept.to_parquet(tmp_path / "idx.parquet")
    sf = open_sharded(str(tmp_path / "idx.parquet"))
    x, y = sf.read(0)
    assert sf.n_features == 3 and x.dtype == np.float32
    np.testing.assert_array_equal(x, kept[list("abc")].to_numpy())
    np.testing.assert_array_equal(y, kept["label"].to_numpy())
    # An empty first row group, then the rows.
    schema = pa.schema([("features", pa.list_(pa.float32(), 3)), ("labels", pa.int64())])
    xs = rng.standard_normal((10, 3)).astype(np.float32)
    with pq.ParquetWriter(tmp_path / "late.parquet", schema) as w:
        w.write_table(schema.empty_table())
        w.write_table(
            pa.table(
                {
                    "features": pa.FixedSizeListArray.from_arrays(pa.array(xs.reshape(-1)), 3),
                    "labels": np.arange(10) % 2,
                },
                schema=schema,
            )
        )
    np.testing.assert_array_equal(open_sharded(str(tmp_path / "late.parquet")).read(0)[0], xs)
    # A null row in a list column is named as such when its rows are read.
    feats = pa.array([[1.0, 2.0], None, [3.0, 4.0]], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"features": feats, "labels": [0, 1, 0]}), tmp_path / "null.parquet")
    with pytest.raises(ShardError, match="null.parquet.*null rows"):
        open_sharded(str(tmp_path / "null.parquet")).read(0)


def test_paths_indices_and_arguments_checked(tmp_path):
    rng = np.random.default_rng(13)
    folder = tmp_path / "run[1]"  # glob characters in a literal path
    folder.mkdir()
    x = rng.standard_normal((30, 4)).astype(np.float32)
    np.save(folder / "a.features.npy", x)
    np.save(folder / "a.labels.npy", np.arange(30) % 3)
    sf = open_sharded(str(folder / "a.features.npy"))
    np.testing.assert_array_equal(sf.read(0)[0], x)
    with pytest.raises(IndexError, match=r"shard index 1 outside \[0, 1\)"):
        sf.read(1)
    with pytest.raises(IndexError, match=r"rows \[25, 40\) outside \[0, 30\)"):
        sf.read_global(25, 40)
    with pytest.raises(IndexError, match="outside"):
        sf.read_global(-5, 3)
    with pytest.raises(ValueError, match="chunk_rows"):
        sf.to_dask(0)
    with pytest.raises(TypeError, match="num_classes"):
        open_sharded(str(folder / "a.features.npy"), num_classes=3.7)
    # A stray huge label does not become a label set of 10^12 classes.
    np.save(folder / "a.labels.npy", np.r_[np.arange(29) % 3, 10**12])
    with pytest.raises(ShardError, match="a.features.npy.*num_classes="):
        open_sharded(str(folder / "a.features.npy"))
    assert open_sharded(str(folder / "a.features.npy"), num_classes=10**12 + 1).num_classes > 0
    # Floats longer than float64 are refused, naming the shard.
    if np.dtype(np.longdouble).itemsize > 8:
        np.save(folder / "a.features.npy", x.astype(np.longdouble))
        np.save(folder / "a.labels.npy", np.arange(30) % 3)
        with pytest.raises(ShardError, match="a.features.npy.*float64"):
            open_sharded(str(folder / "a.features.npy"))


def test_fortran_ordered_npz_member_reads_back(tmp_path):
    x = np.asfortranarray(np.random.default_rng(14).standard_normal((25, 6)))
    np.savez(tmp_path / "f.npz", features=x, labels=np.arange(25) % 4)
    sf = open_sharded(str(tmp_path / "f.npz"))
    np.testing.assert_array_equal(sf.read(0, 3, 17)[0], x[3:17])
    np.testing.assert_array_equal(sf.take(0, np.array([0, 5, 24]))[0], x[[0, 5, 24]])


@pytest.mark.parametrize("fmt", ["npy", "zarr", "parquet-list", "npy-float16"])
def test_cli_predict_streams_over_shards(fmt, tmp_path, monkeypatch):
    """``dpfc predict MODEL SHARDS``: a block of rows at a time (here 3 rows, so blocks
    cross no shard and shards end mid-block), every prediction written to one .npy, the
    accuracy against the shards' labels (indices into the model's classes)."""
    import warnings

    from typer.testing import CliRunner

    from dpfc_native import PrivacyWarning, load_model, models
    from dpfc_native.cli import app

    rng = np.random.default_rng(FORMATS.index(fmt.replace("-float16", "")) + 500)
    names = np.array(["ant", "bee", "cat", "dog"])
    centers = rng.standard_normal((K, D)) * 3
    y_train = rng.integers(0, K, 400)
    x_train = centers[y_train] + rng.standard_normal((400, D))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivacyWarning)
        est = models.DPFCClassifier(epsilon=2.0, classes=names, steps=3, random_state=1)
        est.fit(x_train, names[y_train])
    model = tmp_path / "out" / "model.npz"
    est.save(model)
    dtype = np.float16 if fmt.endswith("float16") else np.float32
    arrays = []
    for m in ROWS:
        y = rng.integers(0, K, m)
        arrays.append(((centers[y] + rng.standard_normal((m, D))).astype(dtype), y))
    paths = _write(fmt.replace("-float16", ""), tmp_path, arrays)
    pattern = paths[0] if len(paths) == 1 else os.path.join(tmp_path, "part-*")
    if fmt.startswith("npy"):
        pattern = os.path.join(tmp_path, "*.npy")
    monkeypatch.setattr(models, "_CHUNK_ELEMENTS", 3 * D)
    runner = CliRunner()
    out = tmp_path / "out" / "pred.npy"
    fill = ["--missing-chunks", "fill"] if fmt == "zarr" else []  # all-0 label chunks
    res = runner.invoke(app, ["predict", str(model), pattern, "-o", str(out), *fill])
    assert res.exit_code == 0, res.output
    x_all = np.concatenate([x for x, _ in arrays]).astype(np.float64)
    y_all = np.concatenate([y for _, y in arrays])
    expected = load_model(model).predict(x_all)  # float16 widens exactly
    got = np.load(out, allow_pickle=False)
    assert got.dtype == expected.dtype and got.shape == (sum(ROWS),)
    np.testing.assert_array_equal(got, expected)
    assert f"predicted {sum(ROWS)} rows of 3 shard(s)" in res.output
    assert f"accuracy: {np.mean(expected == names[y_all]):.4f}" in res.output
    assert np.mean(expected == names[y_all]) > 0.5  # the model learned; labels line up
    # Without -o: the same accuracy, nothing written; an existing -o needs --force.
    res = runner.invoke(app, ["predict", str(model), pattern, *fill])
    assert res.exit_code == 0 and f"accuracy: {np.mean(expected == names[y_all]):.4f}" in (
        res.output
    )
    res = runner.invoke(app, ["predict", str(model), pattern, "-o", str(out), *fill])
    assert res.exit_code == 2 and "--force" in res.output


def test_cli_predict_on_shards_checks_width_and_labels(tmp_path):
    from typer.testing import CliRunner

    from dpfc_native import models
    from dpfc_native.cli import app

    rng = np.random.default_rng(77)
    x = rng.standard_normal((60, D))
    y = np.arange(60) % 3
    est = models.DPLeastSquaresClassifier(float("inf"), classes=[0, 1, 2]).fit(x, y)
    est.save(tmp_path / "m.npz")
    runner = CliRunner()
    for name, xs, ys, needle in (
        ("w", x[:, :5], y, "has 5 features per row, the model expects 7"),
        ("k", x, np.where(y == 2, 3, y), "label 3 >= num_classes=3"),
    ):
        np.save(tmp_path / f"{name}.features.npy", xs)
        np.save(tmp_path / f"{name}.labels.npy", ys)
        res = runner.invoke(
            app, ["predict", str(tmp_path / "m.npz"), str(tmp_path / f"{name}.*.npy")]
        )
        assert res.exit_code == 2 and needle in res.output, res.output
        assert res.output.count("\n") == 1 and "Traceback" not in res.output


def _npy_bytes(a) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _zip(path, members, method=zipfile.ZIP_STORED):
    """A zip of (name, bytes) members, in order (duplicate names kept)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of a duplicate name
        with zipfile.ZipFile(path, "w", method) as zf:
            for name, raw in members:
                zf.writestr(name, raw)
    return str(path)


def _set_flag(path, member: str, bit: int):
    """Sets a general-purpose flag bit of ``member`` in its local and central headers."""
    import struct

    raw = bytearray(open(path, "rb").read())
    for sig, flag_at, len_at, name_at in ((b"PK\x03\x04", 6, 26, 30), (b"PK\x01\x02", 8, 28, 46)):
        i = 0
        while (i := raw.find(sig, i)) >= 0:
            n = struct.unpack_from("<H", raw, i + len_at)[0]
            if bytes(raw[i + name_at : i + name_at + n]) == member.encode():
                struct.pack_into("<H", raw, i + flag_at, raw[i + flag_at] | bit)
            i += 4
    open(path, "wb").write(bytes(raw))


def test_compressed_npz_member_header_is_checked_before_decompressing(tmp_path, monkeypatch):
    """A deflated member whose header claims far more than its compressed bytes can hold
    is refused from the header alone (nothing of the claimed size is allocated); a bzip2
    or LZMA member is refused before zipfile inflates anything (it inflates those without
    bound: 1.3 KB of bzip2 became 1 GB)."""
    x = np.zeros((20, 4), np.float32)
    y = np.zeros(20, np.int64)
    header = np.lib.format.header_data_from_array_1_0(x)
    header["shape"] = (10**7, 4)
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    bomb = _zip(
        tmp_path / "bomb.npz",
        [("features.npy", buf.getvalue() + x.tobytes()), ("labels.npy", _npy_bytes(y))],
        zipfile.ZIP_DEFLATED,
    )

    def no_decompression(*a, **k):
        raise AssertionError("decompressed a member whose header was not checked")

    monkeypatch.setattr(np.lib.format, "read_array", no_decompression)
    with pytest.raises(ShardError, match=r"bomb.npz.*'features'.*claims shape \(10000000, 4\)"):
        open_sharded(bomb)
    monkeypatch.undo()
    for method, name in ((zipfile.ZIP_BZIP2, "bzip2"), (zipfile.ZIP_LZMA, "LZMA")):
        p = _zip(
            tmp_path / f"{name}.npz",
            [("features.npy", _npy_bytes(x)), ("labels.npy", _npy_bytes(y))],
            method,
        )
        with pytest.raises(ShardError, match=f"{name}.npz.*features.*{name}"):
            open_sharded(p)
    ok = _zip(
        tmp_path / "ok.npz",
        [("features.npy", _npy_bytes(x)), ("labels.npy", _npy_bytes(y))],
        zipfile.ZIP_DEFLATED,
    )
    assert open_sharded(ok).n_rows == 20


def test_stored_npz_member_map_stays_inside_the_member(tmp_path):
    """A stored member whose header claims one more row than it holds: the map would
    run into the next member's bytes (the labels), inside the file."""
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    raw = _npy_bytes(x)
    assert b"(4, 3)" in raw
    raw = raw.replace(b"(4, 3)", b"(5, 3)")  # same length: the CRC is of these bytes
    p = _zip(
        tmp_path / "over.npz",
        [("features.npy", raw), ("labels.npy", _npy_bytes(np.zeros(64, np.int64)))],
    )
    for checksum in (True, False):
        with pytest.raises(ShardError, match=r"over.npz.*'features'.*claims shape \(5, 3\)"):
            open_sharded(p, checksum=checksum)


def test_npz_duplicate_or_encrypted_members_and_bad_streams_name_the_shard(tmp_path):
    x = np.ones((6, 2), np.float32)
    y = np.arange(6) % 2
    # Two members of one name: zipfile reads the last, other readers the first.
    dup = _zip(
        tmp_path / "dup.npz",
        [
            ("features.npy", _npy_bytes(x)),
            ("labels.npy", _npy_bytes(y)),
            ("features.npy", _npy_bytes(np.zeros_like(x))),
        ],
    )
    with pytest.raises(ShardError, match=r"dup.npz.*duplicated members \['features.npy'\]"):
        open_sharded(dup)
    # The "encrypted" flag (zipfile raises RuntimeError opening such a member).
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        enc = _zip(
            tmp_path / f"enc{method}.npz",
            [("features.npy", _npy_bytes(x)), ("labels.npy", _npy_bytes(y))],
            method,
        )
        _set_flag(enc, "labels.npy", 0x1)
        with pytest.raises(ShardError, match=rf"enc{method}.npz.*\['labels'\] is encrypted"):
            open_sharded(enc)
    # A damaged deflate stream is a ShardError naming the shard wherever it is read.
    from dpfc_native.shards import _check_npz_crc

    p = _zip(
        tmp_path / "z.npz",
        [("features.npy", _npy_bytes(x)), ("labels.npy", _npy_bytes(y))],
        zipfile.ZIP_DEFLATED,
    )
    raw = bytearray(open(p, "rb").read())
    with zipfile.ZipFile(p) as zf:
        info = zf.getinfo("features.npy")
    start = info.header_offset + 30 + len("features.npy")
    raw[start] = 0xFF  # an invalid deflate block type
    open(p, "wb").write(bytes(raw))
    with pytest.raises(ShardError, match="z.npz"):
        _check_npz_crc(p, ("features", "labels"))
    with pytest.raises(ShardError, match="z.npz"):
        open_sharded(p)


def _small_zarr(path, rows=10, chunk=4, features_chunk=None):
    zarr = pytest.importorskip("zarr")
    x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    g = zarr.open_group(str(path), mode="w")
    g.create_array("features", data=x, chunks=(features_chunk or chunk, 3))
    g.create_array("labels", data=np.arange(rows) % 3, chunks=(chunk,))
    return str(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_shard_file_that_is_not_a_regular_file_is_refused(tmp_path, fifo_alarm):
    """A FIFO (or a link to /dev/zero) would block hashing or reading forever."""
    fifo = str(tmp_path / "pipe")
    os.mkfifo(fifo)
    fifo_alarm.append(fifo)
    store = _small_zarr(tmp_path / "s.zarr")
    os.symlink(fifo, os.path.join(store, "README"))
    for checksum in (True, False):
        with pytest.raises(ShardError, match=r"s.zarr: .*README is not a regular file \(a FIFO\)"):
            open_sharded(store, checksum=checksum)
    os.remove(os.path.join(store, "README"))
    os.remove(os.path.join(store, "features", "c", "0", "0"))
    os.symlink(str(tmp_path / "gone"), os.path.join(store, "features", "c", "0", "0"))
    with pytest.raises(ShardError, match=r"s.zarr: .*features/c/0/0 is a link to nothing"):
        open_sharded(store)
    # A FIFO named like a file shard, or in place of an .npy pair's labels.
    os.mkfifo(tmp_path / "f.npz")
    fifo_alarm.append(str(tmp_path / "f.npz"))
    with pytest.raises(ShardError, match=r"f.npz: .*f.npz is not a regular file \(a FIFO\)"):
        open_sharded(str(tmp_path / "f.npz"))
    np.save(tmp_path / "p.features.npy", np.ones((3, 2), np.float32))
    os.mkfifo(tmp_path / "p.labels.npy")
    fifo_alarm.append(str(tmp_path / "p.labels.npy"))
    with pytest.raises(ShardError, match=r"p.features.npy: .*p.labels.npy is not a regular"):
        open_sharded(str(tmp_path / "p.features.npy"))
    # Swapped in after opening: reads and verify() refuse it too.
    store = _small_zarr(tmp_path / "t.zarr")
    sf = open_sharded(store)
    os.symlink(fifo, os.path.join(store, "notes"))
    with pytest.raises(ShardError, match="notes is not a regular file"):
        sf.read(0)
    with pytest.raises(ShardError, match="notes is not a regular file"):
        sf.verify()


def test_zarr_bad_chunk_metadata_names_the_shard(tmp_path):
    """A zero chunk shape (ZeroDivisionError) or a shape of 2^62 rows (MemoryError listing
    the chunk grid) escaped open_sharded as other exception types."""
    import json

    def edit(store, key, **entries):
        meta_path = os.path.join(store, key, "zarr.json")
        meta = json.load(open(meta_path))
        meta.update(entries)
        json.dump(meta, open(meta_path, "w"))

    store = _small_zarr(tmp_path / "zero.zarr")
    grid = {"name": "regular", "configuration": {"chunk_shape": [0, 3]}}
    edit(store, "features", chunk_grid=grid)
    with pytest.raises(ShardError, match=r"zero.zarr: array 'features' has chunk shape \(0, 3\)"):
        open_sharded(store)
    store = _small_zarr(tmp_path / "huge.zarr")
    edit(store, "features", shape=[2**62, 3])
    edit(store, "labels", shape=[2**62])
    with pytest.raises(ShardError, match=r"huge.zarr: array 'features' .* needs \d+ chunk files"):
        open_sharded(store)


def test_zarr_chunk_size_is_capped_and_labels_scanned_chunk_by_chunk(tmp_path, monkeypatch):
    """Every read decodes whole chunks, so a chunk over ZARR_MAX_CHUNK_BYTES is refused
    (a 75 KB store held one 1 GB chunk); the label scan at open reads whole chunks, each
    once (blocks cutting a chunk decoded it again for every block: N^2)."""
    zarr = pytest.importorskip("zarr")
    from dpfc_native import shards

    store = _small_zarr(tmp_path / "big.zarr", rows=64, chunk=32, features_chunk=8)
    monkeypatch.setattr(shards, "ZARR_MAX_CHUNK_BYTES", 32 * 8 - 1, raising=False)
    with pytest.raises(ShardError, match=r"big.zarr: array 'labels' .*256 bytes.*rechunk"):
        open_sharded(store)
    monkeypatch.setattr(shards, "ZARR_MAX_CHUNK_BYTES", 32 * 8)
    assert open_sharded(store).n_rows == 64
    monkeypatch.undo()
    store = _small_zarr(tmp_path / "scan.zarr", rows=100, chunk=16)
    monkeypatch.setattr(shards, "_LABEL_SCAN_ROWS", 5)  # smaller than a chunk
    reads = []
    real = zarr.Array.__getitem__

    def spy(self, selection):
        if self.basename == "labels":
            reads.append(selection)
        return real(self, selection)

    monkeypatch.setattr(zarr.Array, "__getitem__", spy)
    sf = open_sharded(store)
    assert sf.n_rows == 100 and sf.num_classes == 3
    assert [(s.start, s.stop) for s in reads] == [(s, s + 16) for s in range(0, 100, 16)]


def test_parquet_labels_are_scanned_in_bounded_batches(tmp_path, monkeypatch):
    """Opening decodes the labels column a batch at a time and the features of one row,
    never a whole row group or the whole column (a 506 KB file took 1.6 GB)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from dpfc_native import shards

    n = 300
    x = np.ones((n, 4), np.float32)
    y = np.arange(n) % 3
    y[150] = 40  # the largest label, in the middle of the one row group

    def write(name, labels):
        col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)
        pq.write_table(pa.table({"features": col, "labels": labels}), tmp_path / name)
        return str(tmp_path / name)

    def whole(*a, **k):
        raise AssertionError("decoded a whole row group or column")

    for method in ("read", "read_row_group", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, method, whole)
    monkeypatch.setattr(shards, "_LABEL_SCAN_ROWS", 64)
    sf = open_sharded(write("ok.parquet", y))
    assert sf.n_rows == n and sf.num_classes == 41 and sf.n_features == 4
    y[-1] = -1  # in the last batch
    with pytest.raises(ShardError, match="neg.parquet: negative label -1"):
        open_sharded(write("neg.parquet", y))
    nulls = pa.array([None if i == n - 2 else 0 for i in range(n)], pa.int64())
    with pytest.raises(ShardError, match="nulls.parquet: labels must be integers"):
        open_sharded(write("nulls.parquet", nulls))
    monkeypatch.undo()
    x_read, y_read = open_sharded(str(tmp_path / "ok.parquet")).read(0)
    np.testing.assert_array_equal(x_read, x)
