"""Sharded feature sources: many files of rows, read a slice at a time.

:func:`open_sharded` turns a list of files (or a glob) into a :class:`ShardedFeatures`:
a manifest of the shards in sorted path order (path, rows, dtype, a content hash) and a
reader per format. Nothing but the manifest is held in memory, and the object pickles
as the manifest alone, so it can be shipped to Dask workers: every read opens its shard
inside the call (``np.load(..., mmap_mode="r")``, zarr, pyarrow or safetensors slicing)
and returns an in-memory copy of the rows asked for, never a memory map.

Formats (``format=None`` picks by name):

========================  ============================================================
``*.features.npy``        paired with ``*.labels.npy`` beside it (memory-mapped slices)
``*.npz``                 arrays ``features`` and ``labels``; stored members are
                          memory-mapped, deflated ones decompressed whole per read
                          (bzip2 and LZMA members are refused)
``*.safetensors``         tensors ``features`` and ``labels`` (sliced lazily)
``*.zarr`` (directory)    a group with arrays ``features`` (chunked by rows) and
                          ``labels``; float16 kept as stored; a chunk shape declares
                          at most :data:`ZARR_MAX_CHUNK_BYTES`
``*.parquet``             a ``features`` column of (fixed-size) lists, or one numeric
                          column per feature, plus a ``labels`` (or ``label``) column
========================  ============================================================

Every shard is checked when opened (dtype, shapes, row counts agreeing between features
and labels, the same feature dimension and dtype in every shard, labels integer and
non-negative) and every read checks that the file still has the size recorded in the
manifest; any failure raises :class:`ShardError` naming the shard. Nothing is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob as _glob
import hashlib
import math
import os
import stat
import zipfile
import zlib
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from ._fileio import file_kind, open_regular
from ._optional import require
from ._optional import safetensors_open as _safe_open
from ._validation import inferred_class_limit, is_feature_float


def _zarr():
    return require("zarr", "reading zarr shards", "distributed")


def _parquet():
    return require("pyarrow.parquet", "reading parquet shards", "distributed")


__all__ = [
    "ShardError",
    "Shard",
    "ShardedFeatures",
    "open_sharded",
    "SHARD_FORMATS",
    "ZARR_MAX_CHUNK_BYTES",
]

SHARD_FORMATS = ("npy", "npz", "safetensors", "zarr", "parquet")

_FEATURES_SUFFIX = ".features.npy"
_LABELS_SUFFIX = ".labels.npy"
_HASH_BLOCK = 1 << 22
# Labels are scanned (range check) in blocks of this many rows when a shard is opened
# (zarr: whole chunks, at least one).
_LABEL_SCAN_ROWS = 1 << 20
#: The largest size one zarr chunk's shape may declare (every read decodes whole chunks;
#: a chunk file inflating beyond its declared shape is refused by zarr only once decoded).
ZARR_MAX_CHUNK_BYTES = 1 << 30


class ShardError(ValueError):
    """A shard is missing, corrupt, truncated, changed, or disagrees with the others."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """One entry of the manifest.

    Attributes
    ----------
    path : str
        The features file (a directory for zarr).
    format : str
        One of :data:`SHARD_FORMATS`.
    rows : int
    dtype : str
        The features' dtype as stored (e.g. ``"float16"``).
    sha256 : str
        SHA-256 of the shard's bytes (features and labels files; for a zarr directory,
        every file in it with its relative path); ``""`` when opened with
        ``checksum=False``.
    size : int
        Total bytes of the shard's files, re-checked by every read.
    labels_path : str or None
        The labels file of an ``.npy`` pair.
    label_max : int
        The largest label in the shard (-1 if it has no rows).
    """

    path: str
    format: str
    rows: int
    dtype: str
    sha256: str
    size: int
    labels_path: Optional[str] = None
    label_max: int = -1


def _files_of(shard_path: str, fmt: str, labels_path: Optional[str]) -> list[str]:
    """The files of a shard (for zarr every file in the store, linked folders followed
    once), each checked to be a regular file (see :func:`_require_regular`)."""
    if fmt == "zarr":
        if not os.path.isdir(shard_path):
            raise ShardError(f"shard {shard_path}: a zarr store must be a directory")
        out, seen = [], set()
        for root, dirs, files in os.walk(shard_path, followlinks=True):
            real = os.path.realpath(root)
            if real in seen:  # a link back into the store: walked once
                dirs[:] = []
                continue
            seen.add(real)
            dirs.sort()
            out.extend(os.path.join(root, f) for f in sorted(files))
    else:
        out = [shard_path] + ([labels_path] if labels_path else [])
    for f in out:
        _require_regular(shard_path, f)
    return out


def _require_regular(shard_path: str, f: str) -> None:
    """A shard's file must be a regular file (links followed): hashing or reading a FIFO
    or a device such as /dev/zero would block or never reach its end. A missing file is
    left to the reader, which names what it expected."""
    try:
        mode = os.stat(f).st_mode
    except FileNotFoundError:
        if os.path.islink(f):
            raise ShardError(f"shard {shard_path}: {f} is a link to nothing") from None
        return
    if not stat.S_ISREG(mode):
        raise ShardError(
            f"shard {shard_path}: {f} is not a regular file ({file_kind(mode)}); a shard "
            "holds only regular files"
        )


def _size_of(files: Sequence[str]) -> int:
    return sum(os.path.getsize(f) for f in files)


def _sha256_of(files: Sequence[str], base: str, shard_path: str) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.relpath(f, base).encode() + b"\0")
        # A file swapped for a FIFO or a device after the listing must not block or read
        # without end: open_regular checks the opened descriptor again.
        try:
            fh = open_regular(f)
        except OSError as e:
            raise ShardError(f"shard {shard_path}: {f}: {e}") from e
        with fh:
            while True:
                block = fh.read(_HASH_BLOCK)
                if not block:
                    break
                h.update(block)
    return h.hexdigest()


def _format_of(path: str) -> str:
    low = path.lower().rstrip("/")
    if low.endswith(".npy"):
        return "npy"
    for fmt in ("npz", "safetensors", "zarr", "parquet"):
        if low.endswith("." + fmt):
            return fmt
    if os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "zarr.json"))
        or os.path.exists(os.path.join(path, ".zgroup"))
    ):
        return "zarr"
    raise ShardError(
        f"shard {path}: unknown format (expected .features.npy, .npz, .safetensors, "
        ".zarr or .parquet)"
    )


# --------------------------------------------------------------------------------------
# Readers: each opens the shard inside the call and returns in-memory copies.
# --------------------------------------------------------------------------------------


def _npy_open(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)


# What zipfile and the decompressors raise for a damaged or unsupported member.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    OSError,
    EOFError,
    ValueError,
    zlib.error,
    RuntimeError,  # an encrypted member (refused before, in _zip_member)
    NotImplementedError,  # an unsupported compression method (likewise)
)


def _zip_member(zf: zipfile.ZipFile, path: str, key: str) -> zipfile.ZipInfo:
    """The entry of array ``key`` in an .npz shard, refused as
    :func:`data._npz_member_info` refuses it (a name twice, missing, encrypted, bzip2 or
    LZMA: zipfile inflates those without bound before their size can be checked)."""
    from . import data as _data

    try:
        return _data._npz_member_info(zf, path, key)
    except ValueError as e:
        raise ShardError(f"shard {e}") from None


def _npz_member(path: str, key: str):
    """The member ``key`` of an .npz: a memory map if stored uncompressed, else an array.

    The member's .npy header is checked before anything is allocated or mapped: a
    compressed member may declare at most what its compressed size can inflate to (the
    rule of :func:`data._check_npz_members`), a stored one must lie within its own bytes
    (a map running into the next member, or past the end, is refused)."""
    from . import data as _data

    where = f"shard {path}: array '{key}'"
    try:
        with zipfile.ZipFile(path) as zf:
            info = _zip_member(zf, path, key)
            if info.compress_type != zipfile.ZIP_STORED:
                _data._check_npz_members(path, (key,))
                with zf.open(info) as fh:
                    return np.lib.format.read_array(fh, allow_pickle=False)
        with open(path, "rb") as fh:
            fh.seek(info.header_offset)
            local = fh.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise ShardError(f"shard {path}: corrupt zip local header for '{key}'")
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
            name = fh.read(name_len).decode("utf-8" if info.flag_bits & 0x800 else "cp437")
            if name != info.orig_filename:
                raise ShardError(
                    f"shard {path}: zip local header names {name!r}, the directory "
                    f"{info.orig_filename!r}"
                )
            start = info.header_offset + 30 + name_len + extra_len
            end = start + info.file_size
            if info.compress_size != info.file_size or end > os.path.getsize(path):
                raise ShardError(
                    f"{where} is truncated (its stored bytes end at {end}, the file at "
                    f"{os.path.getsize(path)})"
                )
            fh.seek(start)
            shape, dtype, data_offset, fortran = _data._npy_header(fh, where)  # bounded
        # The map must end within the member's own bytes.
        _data._check_npy_size(shape, dtype, end - data_offset, where)
    except ShardError:
        raise
    except _ZIP_ERRORS as e:
        raise ShardError(f"{where}: cannot read it ({type(e).__name__}: {e})") from e
    return np.memmap(
        path, dtype=dtype, mode="r", offset=data_offset, shape=shape, order="F" if fortran else "C"
    )


def _check_npz_crc(path: str, keys: Sequence[str]) -> None:
    """Reads the members ``keys`` of an .npz through zipfile, which checks each one's
    CRC-32 at its end: the memory-mapped reads of stored members never do. A damaged
    deflate stream is reported the same way."""
    try:
        with zipfile.ZipFile(path) as zf:
            for key in keys:
                with zf.open(_zip_member(zf, path, key)) as fh:
                    while fh.read(_HASH_BLOCK):
                        pass
    except ShardError:
        raise
    except _ZIP_ERRORS as e:
        raise ShardError(f"shard {path}: corrupt .npz ({type(e).__name__}: {e})") from e


def _check_zarr_chunks(path: str, keys: Sequence[str], missing_chunks: str, n_files: int) -> None:
    """Every chunk of the arrays ``keys`` must be stored unless ``missing_chunks="fill"``:
    zarr reads an absent chunk as the fill value, so a store that lost chunk files (an
    interrupted copy) would otherwise train on zeros. ``n_files``, the number of files in
    the store, bounds the chunk files it can hold: a shape needing more is refused
    before zarr lists its chunk keys one by one."""
    if missing_chunks == "fill":
        return
    advice = (
        "(an incomplete copy?). zarr leaves out chunks equal to the fill "
        "value when written with write_empty_chunks=False (zarr 3's default): if "
        "that is why, open it with missing_chunks='fill', or rewrite the store "
        "with config={'write_empty_chunks': True}"
    )
    zarr = _zarr()
    g = zarr.open_group(path, mode="r")
    for key in keys:
        a = g[key]
        per_file = getattr(a, "shards", None) or a.chunks
        files_needed = math.prod(-(-int(n) // int(c)) for n, c in zip(a.shape, per_file))
        if files_needed > n_files:
            raise ShardError(
                f"shard {path}: array '{key}' of shape {tuple(a.shape)} needs "
                f"{files_needed} chunk files, the store holds {n_files} files in all {advice}"
            )
        stored, total = int(a.nchunks_initialized), int(a.nchunks)
        if stored < total:
            raise ShardError(
                f"shard {path}: array '{key}' has {total - stored} of its {total} chunks "
                f"missing {advice}"
            )


def _parquet_layout(pf, path: str, labels_column: Optional[str], features_column: str):
    """(labels column, features column or list of per-feature columns) of a parquet file."""
    names = pf.schema_arrow.names
    if labels_column is None:
        labels_column = next((c for c in ("labels", "label") if c in names), None)
        if labels_column is None:
            raise ShardError(f"shard {path}: no 'labels' or 'label' column (columns: {names})")
    elif labels_column not in names:
        raise ShardError(f"shard {path}: no column '{labels_column}' (columns: {names})")
    if features_column in names:
        return labels_column, features_column
    index = set()
    meta = pf.schema_arrow.pandas_metadata or {}
    for entry in meta.get("index_columns", []):  # a stored pandas index is not a feature
        if isinstance(entry, str):
            index.add(entry)
    cols = [c for c in names if c != labels_column and c not in index]
    if not cols:
        raise ShardError(f"shard {path}: no feature columns (columns: {names})")
    return labels_column, cols


def _parquet_to_numpy(table, path: str, labels_column: str, feat) -> tuple[np.ndarray, np.ndarray]:
    pa = require("pyarrow", "reading parquet shards", "distributed")

    y = table.column(labels_column).to_numpy()
    if isinstance(feat, str):
        col = table.column(feat).combine_chunks()
        if col.null_count:
            raise ShardError(f"shard {path}: column '{feat}' has null rows")
        if pa.types.is_fixed_size_list(col.type):
            width = col.type.list_size
        elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            lengths = col.value_lengths().to_numpy(zero_copy_only=False)
            if len(lengths) and (lengths.min() != lengths.max()):
                raise ShardError(
                    f"shard {path}: rows of column '{feat}' have different "
                    f"lengths ({lengths.min()}..{lengths.max()})"
                )
            width = int(lengths[0]) if len(lengths) else 0
        else:
            raise ShardError(
                f"shard {path}: column '{feat}' must be a list of floats, got {col.type}"
            )
        values = col.flatten().to_numpy(zero_copy_only=False)
        x = values.reshape(len(col), width)
    else:
        arrays = [table.column(c).to_numpy() for c in feat]
        x = np.stack(arrays, axis=1) if arrays else np.empty((table.num_rows, 0))
    return np.ascontiguousarray(x), np.asarray(y)


@dataclasses.dataclass(frozen=True)
class _Options:
    features_key: str = "features"
    labels_key: str = "labels"
    labels_column: Optional[str] = None


def _read_slice(shard: Shard, opts: _Options, start: int, stop: int):
    """Rows [start, stop) of one shard: (features as stored, labels). The features of the
    memory-mappable formats (.npy, uncompressed .npz) are a read-only view of the mapping:
    each leaf statistic reads its rows once (it makes its own float64 copy), where an
    in-memory copy first would move every byte twice and fault a fresh block of pages."""
    path, fmt = shard.path, shard.format
    if fmt == "npy":
        x = np.asarray(_npy_open(path)[start:stop])
        y = np.array(_npy_open(shard.labels_path)[start:stop])
    elif fmt == "npz":
        x = np.asarray(_npz_member(path, opts.features_key)[start:stop])
        y = np.array(_npz_member(path, opts.labels_key)[start:stop])
    elif fmt == "safetensors":
        with _safe_open(path) as f:
            x = np.asarray(f.get_slice(opts.features_key)[start:stop])
            y = np.asarray(f.get_slice(opts.labels_key)[start:stop])
    elif fmt == "zarr":
        g = _zarr().open_group(path, mode="r")
        x = np.asarray(g[opts.features_key][start:stop])
        y = np.asarray(g[opts.labels_key][start:stop])
    elif fmt == "parquet":
        x, y = _read_parquet_rows(shard, opts, start, stop)
    else:  # pragma: no cover - validated at open
        raise ShardError(f"shard {path}: unknown format {fmt!r}")
    return x, y


def _read_parquet_rows(shard: Shard, opts: _Options, start: int, stop: int):
    pa, pq = require("pyarrow", "reading parquet shards", "distributed"), _parquet()

    pf = pq.ParquetFile(shard.path)
    labels_column, feat = _parquet_layout(pf, shard.path, opts.labels_column, opts.features_key)
    columns = [labels_column] + ([feat] if isinstance(feat, str) else list(feat))
    groups, first = [], None
    offset = 0
    for g in range(pf.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        if offset + rows > start and offset < stop:
            groups.append(g)
            first = offset if first is None else first
        offset += rows
    if not groups:
        table = pf.schema_arrow.empty_table().select(columns)
        first = start
    else:
        table = pf.read_row_groups(groups, columns=columns)
    table = table.slice(start - first, stop - start)
    if not isinstance(table, pa.Table):  # pragma: no cover
        table = pa.table(table)
    return _parquet_to_numpy(table, shard.path, labels_column, feat)


# --------------------------------------------------------------------------------------
# Opening a shard: shapes, dtypes, labels, size and hash
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _named(path: str, what: str):
    """Any reader's own error type inside becomes a :class:`ShardError` naming the shard
    (a missing optional package stays an ImportError)."""
    try:
        yield
    except (ShardError, ImportError):
        raise
    except Exception as e:  # zarr, pyarrow, numpy: each raises its own types
        raise ShardError(f"shard {path}: {what}: {type(e).__name__}: {e}") from e


def _blocks_of(y, step: int):
    """The labels reader of an array-like ``y``: its rows in blocks of ``step``."""

    def blocks():
        for s in range(0, int(y.shape[0]), step):
            yield np.asarray(y[s : s + step])

    return blocks


def _check_zarr_chunk_size(path: str, key: str, a) -> None:
    """Every read decodes whole chunks: a chunk must be non-empty and decode to at most
    :data:`ZARR_MAX_CHUNK_BYTES` (a store of a few KB whose one chunk inflates to
    gigabytes would cost that on every read)."""
    chunks = tuple(int(c) for c in a.chunks)
    if len(chunks) != len(a.shape) or any(c < 1 for c in chunks):
        raise ShardError(f"shard {path}: array '{key}' has chunk shape {chunks}")
    nbytes = math.prod(chunks) * np.dtype(a.dtype).itemsize
    if nbytes > ZARR_MAX_CHUNK_BYTES:
        row = nbytes // chunks[0]
        raise ShardError(
            f"shard {path}: array '{key}' has chunks of shape {chunks}, {nbytes} bytes "
            f"decoded, over the {ZARR_MAX_CHUNK_BYTES}-byte limit (every read decodes "
            f"whole chunks): rechunk it, at most {max(1, ZARR_MAX_CHUNK_BYTES // row)} "
            "rows per chunk"
        )


def _parquet_labels(pf, labels_column: str):
    """The labels reader of a parquet file: it decodes the labels column alone, at most
    :data:`_LABEL_SCAN_ROWS` rows at a time (never a whole row group, nor the whole
    column)."""
    pa = require("pyarrow", "reading parquet shards", "distributed")

    def batches():
        for batch in pf.iter_batches(batch_size=_LABEL_SCAN_ROWS, columns=[labels_column]):
            yield pa.Table.from_batches([batch]).column(labels_column).to_numpy()

    return batches


def _inspect(path: str, fmt: str, labels_path: Optional[str], opts: _Options):
    """(rows, dim, dtype, labels dtype, labels shape, labels reader) of a shard, validating
    what can be seen cheaply. The reader yields the labels in blocks of bounded size."""
    if fmt == "npy":
        if labels_path is None or not os.path.exists(labels_path):
            raise ShardError(
                f"shard {path}: no labels file {labels_path} beside it "
                f"(name pairs '<stem>{_FEATURES_SUFFIX}' + '<stem>{_LABELS_SUFFIX}')"
            )
        x, y = _npy_open(path), _npy_open(labels_path)
        step = _LABEL_SCAN_ROWS
    elif fmt == "npz":
        x, y = _npz_member(path, opts.features_key), _npz_member(path, opts.labels_key)
        step = _LABEL_SCAN_ROWS
    elif fmt == "safetensors":
        with _safe_open(path) as f:
            keys = set(f.keys())
            for key in (opts.features_key, opts.labels_key):
                if key not in keys:
                    raise ShardError(f"shard {path}: no tensor '{key}' (tensors: {sorted(keys)})")
            xs, ys = f.get_slice(opts.features_key), f.get_slice(opts.labels_key)
            xshape, yshape = tuple(xs.get_shape()), tuple(ys.get_shape())
            xdt = np.asarray(xs[0:1]).dtype if xshape and xshape[0] else None
            y = np.asarray(f.get_tensor(opts.labels_key))
        if len(xshape) != 2:
            raise ShardError(f"shard {path}: features must be 2-D, got shape {xshape}")
        return xshape[0], xshape[1], xdt, y.dtype, yshape, _blocks_of(y, _LABEL_SCAN_ROWS)
    elif fmt == "zarr":
        g = _zarr().open_group(path, mode="r")
        for key in (opts.features_key, opts.labels_key):
            if key not in g:
                raise ShardError(
                    f"shard {path}: no array '{key}' (arrays: {sorted(g.array_keys())})"
                )
        x, y = g[opts.features_key], g[opts.labels_key]
        _check_zarr_chunk_size(path, opts.features_key, x)
        _check_zarr_chunk_size(path, opts.labels_key, y)
        # Blocks of whole chunks: each chunk of labels is decoded once.
        c = int(y.chunks[0]) if len(y.chunks) else 1
        step = c * max(1, _LABEL_SCAN_ROWS // c)
    elif fmt == "parquet":
        pa = require("pyarrow", "reading parquet shards", "distributed")
        pf = _parquet().ParquetFile(path)
        labels_column, feat = _parquet_layout(pf, path, opts.labels_column, opts.features_key)
        rows = pf.metadata.num_rows
        if rows == 0:
            raise ShardError(f"shard {path}: has no rows")
        columns = [labels_column] + ([feat] if isinstance(feat, str) else list(feat))
        # The dimension and dtype from the first row, decoded alone.
        first = pa.Table.from_batches([next(pf.iter_batches(batch_size=1, columns=columns))])
        x0, y0 = _parquet_to_numpy(first.slice(0, 1), path, labels_column, feat)
        blocks = _parquet_labels(pf, labels_column)
        return rows, x0.shape[1], x0.dtype, y0.dtype, (rows,), blocks
    else:  # pragma: no cover
        raise ShardError(f"shard {path}: unknown format {fmt!r}")
    if len(x.shape) != 2:
        raise ShardError(f"shard {path}: features must be 2-D, got shape {tuple(x.shape)}")
    return (
        x.shape[0],
        x.shape[1],
        np.dtype(x.dtype),
        np.dtype(y.dtype),
        tuple(y.shape),
        _blocks_of(y, step),
    )


def _open_one(
    path: str,
    fmt: str,
    labels_path: Optional[str],
    opts: _Options,
    checksum: bool,
    missing_chunks: str = "error",
) -> tuple[Shard, int]:
    files = _files_of(path, fmt, labels_path)  # regular files only, before any is read
    with _named(path, f"cannot read it (truncated or corrupt {fmt} file?)"):
        rows, dim, dtype, ydt, yshape, label_blocks = _inspect(path, fmt, labels_path, opts)
    if rows == 0:
        raise ShardError(f"shard {path}: has no rows")
    if dtype is None or not is_feature_float(dtype):
        raise ShardError(
            f"shard {path}: features must be float16, bfloat16, float32 or float64, got {dtype}"
        )
    if yshape != (rows,):
        raise ShardError(f"shard {path}: {rows} feature rows but labels have shape {yshape}")
    if np.dtype(ydt).kind not in "iu":
        raise ShardError(f"shard {path}: labels must be integers, got {ydt}")
    if fmt == "zarr":
        with _named(path, "cannot read its zarr metadata"):
            _check_zarr_chunks(
                path, (opts.features_key, opts.labels_key), missing_chunks, len(files)
            )
    if fmt == "npz" and checksum:
        _check_npz_crc(path, (opts.features_key, opts.labels_key))
    label_min, label_max = None, -1
    with _named(path, "cannot read its labels (truncated or corrupt?)"):
        for block in label_blocks():
            if block.dtype.kind not in "iu":  # parquet: nulls in a later block
                raise ShardError(f"shard {path}: labels must be integers, got {block.dtype}")
            if not block.size:
                continue
            lo, hi = int(block.min()), int(block.max())
            label_min = lo if label_min is None else min(label_min, lo)
            label_max = max(label_max, hi)
    if label_min is not None and label_min < 0:
        raise ShardError(f"shard {path}: negative label {label_min}")
    base = path if fmt == "zarr" else os.path.dirname(path)
    shard = Shard(
        path=path,
        format=fmt,
        rows=int(rows),
        dtype=np.dtype(dtype).name,
        sha256=_sha256_of(files, base, path) if checksum else "",
        size=_size_of(files),
        labels_path=labels_path,
        label_max=label_max,
    )
    return shard, int(dim)


def _expand(paths_or_glob: Union[str, os.PathLike, Iterable]) -> list[str]:
    items = (
        [paths_or_glob] if isinstance(paths_or_glob, (str, os.PathLike)) else list(paths_or_glob)
    )
    out: list[str] = []
    for item in items:
        item = os.fspath(item)
        if _glob.has_magic(item) and not os.path.exists(item):
            matched = _glob.glob(item)
            if not matched:
                raise FileNotFoundError(f"no shard matches {item!r}")
            out.extend(matched)
        else:
            if not os.path.exists(item):
                raise FileNotFoundError(f"shard {item} does not exist")
            out.append(item)
    # A glob such as "shards/*.npy" matches the labels halves of the pairs too.
    out = [p for p in out if not p.lower().endswith(_LABELS_SUFFIX)]
    out = sorted(set(os.path.abspath(p).rstrip("/") for p in out))
    if not out:
        raise FileNotFoundError(f"no shards in {paths_or_glob!r}")
    return out


class ShardedFeatures:
    """A manifest of feature shards and row-slice readers; see :func:`open_sharded`.

    Attributes
    ----------
    shards : tuple of :class:`Shard`, in sorted path order.
    offsets : numpy.ndarray (len(shards) + 1,), int64: shard i holds global rows
        ``offsets[i]:offsets[i + 1]``.
    n_rows, n_features : int
    dtype : numpy.dtype, the features' dtype as stored (the same in every shard).
    num_classes : int
    """

    def __init__(
        self, shards: Sequence[Shard], n_features: int, num_classes: int, options: _Options
    ):
        self.shards = tuple(shards)
        self.n_features = int(n_features)
        self.num_classes = int(num_classes)
        self._opts = options
        self.offsets = np.concatenate([[0], np.cumsum([s.rows for s in self.shards])]).astype(
            np.int64
        )
        self.n_rows = int(self.offsets[-1])

    @property
    def dtype(self) -> np.dtype:
        return _np_dtype(self.shards[0].dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_features)

    @property
    def shard_rows(self) -> tuple[int, ...]:
        return tuple(s.rows for s in self.shards)

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return (
            f"ShardedFeatures({len(self.shards)} shards, {self.n_rows} x {self.n_features} "
            f"{self.dtype}, {self.num_classes} classes)"
        )

    def manifest(self) -> list[dict]:
        """The manifest as JSON-able dicts (one per shard, in order)."""
        return [dataclasses.asdict(s) for s in self.shards]

    def _check_unchanged(self, i: int) -> Shard:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"shard index must be an integer, got {type(i).__name__}")
        if not 0 <= i < len(self.shards):
            raise IndexError(f"shard index {i} outside [0, {len(self.shards)})")
        shard = self.shards[int(i)]
        try:
            size = _size_of(_files_of(shard.path, shard.format, shard.labels_path))
        except OSError as e:
            raise ShardError(f"shard {shard.path}: no longer readable: {e}") from e
        if size != shard.size:
            raise ShardError(
                f"shard {shard.path}: changed since it was opened ({size} bytes, "
                f"{shard.size} in the manifest)"
            )
        return shard

    def read(self, i: int, start: int = 0, stop: Optional[int] = None):
        """Rows ``[start, stop)`` of shard ``i`` (shard-local indices).

        Returns
        -------
        x : numpy.ndarray (stop - start, n_features), the stored dtype (float16 stays
            float16); treat it as read-only: for .npy and uncompressed .npz shards it
            is a view of the file's memory map (copy it to modify it).
        y : numpy.ndarray (stop - start,), int64.

        Raises
        ------
        ShardError
            The shard changed size since it was opened, or cannot be read, or the slice
            read back has the wrong shape or out-of-range labels.
        """
        shard = self._check_unchanged(i)
        stop = shard.rows if stop is None else int(stop)
        start = int(start)
        if not 0 <= start <= stop <= shard.rows:
            raise IndexError(
                f"shard {shard.path}: rows [{start}, {stop}) outside [0, {shard.rows})"
            )
        if start == stop:
            return np.empty((0, self.n_features), self.dtype), np.empty(0, np.int64)
        try:
            x, y = _read_slice(shard, self._opts, start, stop)
        except ShardError:
            raise
        except Exception as e:
            raise ShardError(
                f"shard {shard.path}: cannot read rows [{start}, {stop}) (truncated or "
                f"corrupt?): {type(e).__name__}: {e}"
            ) from e
        return self._checked(shard, x, y, stop - start, f"rows [{start}, {stop})")

    def _checked(self, shard: Shard, x, y, m: int, where: str):
        if x.shape != (m, self.n_features) or y.shape != (m,):
            raise ShardError(
                f"shard {shard.path}: {where} read back as shapes {x.shape} / {y.shape}"
            )
        y = y.astype(np.int64, copy=False)
        if m and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ShardError(
                f"shard {shard.path}: labels outside [0, {self.num_classes}) in {where}"
            )
        return x, y

    def take(self, i: int, rows):
        """Rows ``rows`` (shard-local, increasing) of shard ``i``, as :meth:`read` returns
        them. ``.npy`` and zarr shards read only those rows (row-addressable); the other
        formats read the covering slice and select."""
        shard = self._check_unchanged(i)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (
            rows.size and (rows[0] < 0 or rows[-1] >= shard.rows or np.any(np.diff(rows) <= 0))
        ):
            raise IndexError(
                f"shard {shard.path}: rows must be increasing indices in [0, {shard.rows})"
            )
        if rows.size == 0:
            return np.empty((0, self.n_features), self.dtype), np.empty(0, np.int64)
        try:
            if shard.format == "npy":
                x = np.asarray(_npy_open(shard.path)[rows])
                y = np.asarray(_npy_open(shard.labels_path)[rows])
            elif shard.format == "zarr":
                g = _zarr().open_group(shard.path, mode="r")
                x = np.asarray(g[self._opts.features_key].oindex[rows, :])
                y = np.asarray(g[self._opts.labels_key].oindex[rows])
            else:
                x = y = None
        except Exception as e:
            raise ShardError(
                f"shard {shard.path}: cannot read {rows.size} rows in "
                f"[{rows[0]}, {rows[-1]}] (truncated or corrupt?): "
                f"{type(e).__name__}: {e}"
            ) from e
        if x is None:
            lo = int(rows[0])
            x, y = self.read(i, lo, int(rows[-1]) + 1)
            return x[rows - lo], y[rows - lo]
        return self._checked(shard, x, y, rows.size, f"{rows.size} rows in [{rows[0]}, {rows[-1]}]")

    def read_global(self, start: int, stop: int):
        """Global rows ``[start, stop)`` (may span shards), concatenated."""
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {self.n_rows})")
        xs, ys = [], []
        for i in range(len(self.shards)):
            lo, hi = max(start, self.offsets[i]), min(stop, self.offsets[i + 1])
            if lo < hi:
                x, y = self.read(i, lo - self.offsets[i], hi - self.offsets[i])
                xs.append(x)
                ys.append(y)
        if not xs:
            return np.empty((0, self.n_features), self.dtype), np.empty(0, np.int64)
        return np.concatenate(xs), np.concatenate(ys)

    def verify(self) -> None:
        """Recompute every shard's SHA-256 and compare it with the manifest.

        Raises
        ------
        ShardError
            Naming the first shard whose content changed.
        """
        for shard in self.shards:
            if not shard.sha256:
                raise ShardError(
                    f"shard {shard.path}: opened with checksum=False, nothing to verify"
                )
            files = _files_of(shard.path, shard.format, shard.labels_path)
            base = shard.path if shard.format == "zarr" else os.path.dirname(shard.path)
            if _sha256_of(files, base, shard.path) != shard.sha256:
                raise ShardError(
                    f"shard {shard.path}: content changed (SHA-256 differs from the manifest)"
                )

    def to_dask(self, chunk_rows: int = 65536):
        """The features and labels as dask arrays (chunks never cross a shard).

        Each chunk's task reads its slice inside the task; the graph holds only this
        manifest and the slice bounds, never data.
        """
        dask = require("dask", "ShardedFeatures.to_dask", "distributed")
        da = require("dask.array", "ShardedFeatures.to_dask", "distributed")

        from ._validation import integer

        chunk_rows = integer(chunk_rows, "chunk_rows", 1)
        xs, ys = [], []
        for i, shard in enumerate(self.shards):
            for s in range(0, shard.rows, chunk_rows):
                e = min(shard.rows, s + chunk_rows)
                part = dask.delayed(self.read, pure=True)(i, s, e)
                xs.append(da.from_delayed(part[0], (e - s, self.n_features), dtype=self.dtype))
                ys.append(da.from_delayed(part[1], (e - s,), dtype=np.int64))
        return da.concatenate(xs), da.concatenate(ys)


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # type: ignore

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def open_sharded(
    paths_or_glob,
    *,
    format: Optional[str] = None,
    num_classes: Optional[int] = None,
    features_key: str = "features",
    labels_key: str = "labels",
    labels_column: Optional[str] = None,
    checksum: bool = True,
    missing_chunks: str = "error",
) -> ShardedFeatures:
    """Open feature shards as one :class:`ShardedFeatures`.

    Parameters
    ----------
    paths_or_glob : str, path, or a sequence of them
        Files (zarr: directories) or glob patterns. Shards are ordered by their sorted
        absolute paths, whatever the order given. For ``.npy`` pairs, name the
        ``*.features.npy`` files (a glob such as ``"shards/*.npy"`` is fine: the
        ``*.labels.npy`` halves are paired, not counted as shards).
    format : {"npy", "npz", "safetensors", "zarr", "parquet"} or None
        None: from each file's name.
    num_classes : int or None
        Default: the largest label in any shard plus one (refused beyond
        ``max(2^16, rows)`` classes: a stray huge label is not a label set).
    features_key, labels_key : str
        Array / tensor names (npz, safetensors, zarr); for parquet ``features_key`` names
        the list column (if absent, every column but the labels one is a feature).
    labels_column : str or None
        Parquet labels column; default ``"labels"``, else ``"label"`` (Hugging Face).
    checksum : bool
        Hash every shard's bytes with SHA-256 into the manifest (reads all data once).
        False records only sizes (every read still checks the size). With True the
        members of ``.npz`` shards are also read through ``zipfile``, which checks their
        CRC-32 (memory-mapped reads never do).
    missing_chunks : {"error", "fill"}
        zarr shards: "error" (default) refuses a store whose arrays lack chunk files (an
        incomplete copy reads as zeros otherwise); "fill" reads absent chunks as the fill
        value, for stores written with ``write_empty_chunks=False`` (zarr 3's default),
        which leaves out chunks equal to it.

    Raises
    ------
    FileNotFoundError
        A path or a glob matches nothing.
    ShardError
        A shard is unreadable, truncated or corrupt, or disagrees with the others
        (feature dimension, dtype), or labels are out of range; the message names it.
    """
    from . import _validation

    if format is not None and format not in SHARD_FORMATS:
        raise ValueError(f"format must be one of {SHARD_FORMATS} or None, got {format!r}")
    _validation.choice(missing_chunks, "missing_chunks", ("error", "fill"))
    if num_classes is not None:
        num_classes = _validation.integer(num_classes, "num_classes", 1)
    opts = _Options(features_key=features_key, labels_key=labels_key, labels_column=labels_column)
    shards, dim = [], None
    for path in _expand(paths_or_glob):
        fmt = format or _format_of(path)
        labels_path = None
        if fmt == "npy":
            if not path.endswith(_FEATURES_SUFFIX):
                raise ShardError(
                    f"shard {path}: .npy shards must be named '<stem>{_FEATURES_SUFFIX}' "
                    f"with labels in '<stem>{_LABELS_SUFFIX}'"
                )
            labels_path = path[: -len(_FEATURES_SUFFIX)] + _LABELS_SUFFIX
        shard, d = _open_one(path, fmt, labels_path, opts, checksum, missing_chunks)
        if dim is None:
            dim = d
        elif d != dim:
            raise ShardError(f"shard {path}: has {d} features, the shards before it {dim}")
        if shards and shard.dtype != shards[0].dtype:
            raise ShardError(
                f"shard {path}: dtype {shard.dtype}, the shards before it {shards[0].dtype}"
            )
        shards.append(shard)
    k_seen = max(s.label_max for s in shards) + 1
    if num_classes is None:
        limit = inferred_class_limit(sum(s.rows for s in shards))
        if k_seen > limit:
            worst = max(shards, key=lambda s: s.label_max)
            raise ShardError(
                f"shard {worst.path}: has label {worst.label_max}: inferring the label set "
                f"0..{worst.label_max} would make {k_seen} classes (at most {limit} are "
                "inferred); pass num_classes= (--num-classes) if that is really intended, "
                "or relabel to 0..K-1"
            )
        num_classes = k_seen
    elif num_classes < k_seen:
        worst = max(shards, key=lambda s: s.label_max)
        raise ShardError(
            f"shard {worst.path}: label {worst.label_max} >= num_classes={num_classes}"
        )
    return ShardedFeatures(shards, dim, num_classes, opts)
