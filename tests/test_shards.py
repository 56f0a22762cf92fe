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
