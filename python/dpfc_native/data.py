"""Feature data sets: loading, validation, and embedded defaults needing no download.

dpfc_native trains only the last linear layer on features that a frozen, publicly
pre-trained model has already extracted.  This module gets such features into a
validated :class:`FeatureSet`:

* :func:`load_features` / :func:`save_features` read and write ``.npz``, paired
  ``.npy`` (memory-mapped) and ``.safetensors`` files, and reject malformed files
  (missing keys, wrong shapes or dtypes, negative labels, NaN/Inf rows, truncated or
  corrupted files) with an error naming the file and the key.
* :func:`digits_features` wraps scikit-learn's bundled 8x8 digits (1797 images,
  10 classes) with a fixed, public, data-independent feature map.
* :func:`synthetic_features` / :func:`synthetic_preset` generate "pre-trained-like"
  features at the shapes of CIFAR-10, CIFAR-100 and ImageNet (power-law spectrum,
  class means in a random subspace, roughly unit-norm rows), in chunks, into RAM or a
  memory-mapped ``.npy`` file.

Privacy note: every transformation here is data-independent (fixed scalings, fixed
random maps, per-row normalisation).  Nothing is centred or standardised with
statistics of the (private) training data, which would spend privacy budget.

This module needs NumPy, SciPy (only its FFT, for the synthetic generator),
scikit-learn (only for :func:`digits_features`) and ``safetensors`` (only for
``.safetensors`` files, the ``[safetensors]`` extra). From the package it uses the
argument rules (``_validation``) and the sharded sources (:mod:`dpfc_native.shards`);
like every module of the package it is imported with the compiled extension.
"""

from __future__ import annotations

import dataclasses
import lzma
import math
import os
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple, Union

import numpy as np

from . import _validation
from ._optional import safetensors_open

__all__ = [
    "FeatureSet",
    "load_features",
    "save_features",
    "check_feature_arrays",
    "train_test_split_features",
    "describe",
    "digits_features",
    "synthetic_features",
    "synthetic_preset",
    "SYNTHETIC_PRESETS",
    "SYNTHETIC_PRESET_TEST_SIZES",
    "SYNTHETIC_PRESET_DIFFICULTY",
    "DIGITS_TEST_SIZE",
    "read_labeled_arrays",
    "coerce_labels",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Rows checked per block by the NaN/Inf scan (bounds the temporary memory when
#: the features are a memory map: block_rows * d bytes for the boolean mask).
_FINITE_CHECK_BLOCK_ELEMENTS = 1 << 24

#: Rows generated per chunk by :func:`synthetic_features`.  Part of the
#: reproducibility contract: each chunk draws from its own stream, keyed by
#: (seed, split, chunk index), so changing this constant changes the data.
_SYNTH_CHUNK_ROWS = 8192

#: Most classes inferred from the labels (``max(label) + 1``) when no ``num_classes`` is
#: given, unless there are more examples than that (the rule is in ``_validation``).
MAX_INFERRED_CLASSES = _validation.MAX_INFERRED_CLASSES

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


# --------------------------------------------------------------------------- #
# The container
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True, eq=False)
class FeatureSet:
    """Features of a labelled data set, as the private training data of a linear layer.

    Construct with :meth:`from_arrays` (coerces and fully validates) or let the
    loaders and generators of this module build one.  The constructor itself runs
    only the cheap structural checks (shapes, dtypes, label range), not the NaN/Inf
    scan.

    Attributes
    ----------
    features : numpy.ndarray, shape (n, d), float32 or float64
        One row per example.  May be a read-only ``numpy.memmap``.  C-contiguous.
    labels : numpy.ndarray, shape (n,), int64
        Class indices in ``0 .. num_classes - 1``.
    num_classes : int
        Number of classes K (at least ``labels.max() + 1``; a class may be empty).
    name : str
        A label for reports, e.g. ``"digits-pixels-train"`` or the file name.
    """

    features: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str = ""

    def __post_init__(self):
        x, y, k = self.features, self.labels, self.num_classes
        where = f" ({self.name})" if self.name else ""
        for key, a in (("features", x), ("labels", y)):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{key}{where} must be a NumPy array, got {_shape_str(a)}")
        _validation.ndim(x, f"features{where}", 2, "(n, d)")
        _validation.dtype_in(x, f"features{where}", _validation.FLOAT_DTYPES)
        if not x.flags.c_contiguous:
            raise ValueError(
                f"features{where} must be C-contiguous (use FeatureSet.from_arrays to copy)"
            )
        _validation.ndim(y, f"labels{where}", 1, "(n,)")
        _validation.dtype_in(y, f"labels{where}", (np.dtype(np.int64),))
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"features{where} have {x.shape[0]} rows but labels have {y.shape[0]} entries"
            )
        k = _validation.integer(k, f"num_classes{where}", 1)
        object.__setattr__(self, "num_classes", k)
        if y.size:
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= k:
                raise ValueError(
                    f"labels{where} must lie in 0..{k - 1} (num_classes={k}), "
                    f"found range {lo}..{hi}"
                )

    # Convenience -------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of examples."""
        return int(self.features.shape[0])

    @property
    def d(self) -> int:
        """Feature dimension."""
        return int(self.features.shape[1])

    @property
    def dtype(self) -> np.dtype:
        """Floating dtype of the features."""
        return self.features.dtype

    def class_counts(self) -> np.ndarray:
        """Examples per class, shape (num_classes,), int64."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"FeatureSet({describe(self, norm_sample=0)})"

    @classmethod
    def from_arrays(
        cls,
        features,
        labels,
        num_classes: Optional[int] = None,
        name: str = "",
        check_finite: bool = True,
    ) -> "FeatureSet":
        """Validate arrays and wrap them (see :func:`check_feature_arrays`)."""
        x, y, k = check_feature_arrays(
            features, labels, num_classes=num_classes, name=name, check_finite=check_finite
        )
        return cls(x, y, k, name)


def _shape_str(a) -> str:
    shape = getattr(a, "shape", None)
    if shape is None:
        return f"a {type(a).__name__}"
    return f"{len(shape)}-D array of shape {tuple(shape)}"


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #
def check_feature_arrays(
    features,
    labels,
    num_classes: Optional[int] = None,
    name: str = "",
    check_finite: bool = True,
    features_key: str = "'features'",
    labels_key: str = "'labels'",
):
    """Coerce and validate a (features, labels) pair.

    Parameters
    ----------
    features : array_like, shape (n, d)
        Floating point features.  float32 and float64 are kept as they are (a
        ``numpy.memmap`` stays a memory map); float16 is upcast to float32.
        Integer, boolean and complex features are rejected: raw pixel counts or
        token ids are almost certainly a mistake for this package.
    labels : array_like, shape (n,)
        Integer class labels (any integer dtype, converted to int64).  Floats are
        rejected, even integer-valued ones: silently truncating ``2.7`` is worse than
        asking the caller to cast.
    num_classes : int, optional
        Number of classes K.  Default ``labels.max() + 1``.  If given it must exceed
        every label.
    name : str
        Used in error messages (e.g. the file path).
    check_finite : bool
        Scan the features for NaN/Inf, block by block (a memory map is streamed,
        never loaded whole).  The error reports how many rows are bad and the first.
    features_key, labels_key : str
        How error messages name the two arrays (the loaders pass the file path and
        the key, e.g. ``/data/x.npz['labels']``).

    Returns
    -------
    features : numpy.ndarray (n, d) float32/float64, C-contiguous, native byte order
    labels : numpy.ndarray (n,) int64
    num_classes : int

    Raises
    ------
    TypeError
        Features that are not floating point, labels that are not integers, or a
        ``num_classes`` that is not an int (the message names the offending key).
    ValueError
        Any other violation (shape, range, NaN/Inf), naming ``name`` and the key.
    """
    where = f" in {name}" if name else ""
    if hasattr(features, "toarray") and not hasattr(features, "__array_interface__"):
        raise TypeError(
            f"{features_key}{where}: sparse matrices are not supported; pass a dense array"
        )
    x = features if isinstance(features, np.ndarray) else np.asarray(features)
    y = labels if isinstance(labels, np.ndarray) else np.asarray(labels)

    # Features: shape and dtype.
    _validation.nonempty(
        _validation.ndim(x, f"{features_key}{where}", 2, "(n, d)"), f"{features_key}{where}"
    )
    if x.dtype.kind != "f":
        raise TypeError(
            f"{features_key}{where} must have a floating dtype (float32 or float64), got {x.dtype}"
        )
    copied = x
    if x.dtype.itemsize < 4:
        x = x.astype(np.float32)
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    _validation.dtype_in(x, f"{features_key}{where}", _validation.FLOAT_DTYPES)
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    if x is not copied and isinstance(x, np.memmap):
        x = x.view(np.ndarray)  # an in-memory copy, not a map of the file any more

    # Labels: shape, dtype, range.
    _validation.ndim(y, f"{labels_key}{where}", 1, "(n,)")
    if y.dtype.kind not in "iu":
        raise TypeError(
            f"{labels_key}{where} must have an integer dtype, got {y.dtype}"
            " (cast explicitly, e.g. labels.astype(np.int64))"
        )
    if y.shape[0] != x.shape[0]:
        raise ValueError(
            f"shape mismatch{where}: {features_key} has {x.shape[0]} rows "
            f"but {labels_key} has {y.shape[0]} entries"
        )
    if y.dtype.kind == "u" and y.dtype.itemsize == 8 and int(y.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{labels_key}{where} has labels too large for int64")
    y = np.ascontiguousarray(y, dtype=np.int64)
    neg = np.flatnonzero(y < 0)
    if neg.size:
        raise ValueError(
            f"{labels_key}{where} has {neg.size} negative label(s); first at "
            f"index {int(neg[0])} (value {int(y[neg[0]])})"
        )
    max_label = int(y.max())
    if num_classes is None:
        k = max_label + 1
        limit = _validation.inferred_class_limit(y.shape[0])
        if k > limit:
            raise ValueError(
                f"{labels_key}{where} has label {max_label}: inferring the label "
                f"set 0..{max_label} from it would make {k} classes (at most "
                f"{limit} are inferred); pass "
                "the public label set (num_classes=, --num-classes or classes=) "
                "if that is really intended, or relabel to 0..K-1"
            )
    else:
        k = _validation.integer(num_classes, "num_classes", 1)
        if max_label >= k:
            bad = np.flatnonzero(y >= k)
            raise ValueError(
                f"{labels_key}{where} has {bad.size} label(s) >= num_classes={k}; "
                f"first at index {int(bad[0])} (value {int(y[bad[0]])})"
            )

    if check_finite:
        n_bad, first = _count_nonfinite_rows(x)
        if n_bad:
            raise ValueError(
                f"{features_key}{where} has {n_bad} row(s) containing NaN or "
                f"Inf; first at row {first}"
            )
    return x, y, k


def _count_nonfinite_rows(x: np.ndarray) -> Tuple[int, int]:
    """(number of rows with a NaN/Inf, index of the first such row or -1), streamed in
    blocks of ``_FINITE_CHECK_BLOCK_ELEMENTS`` (see ``_validation.nonfinite_rows``)."""
    return _validation.nonfinite_rows(x, block_elements=_FINITE_CHECK_BLOCK_ELEMENTS)


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #
_FEATURES_SUFFIX = ".features.npy"
_LABELS_SUFFIX = ".labels.npy"


def _sibling_labels_path(path: str) -> Optional[str]:
    """The labels file that the paired-.npy naming convention pairs with ``path``."""
    if path.endswith(_FEATURES_SUFFIX):
        return path[: -len(_FEATURES_SUFFIX)] + _LABELS_SUFFIX
    return None


class _MissingKey(Exception):
    pass


def _read_magic(path: str, nbytes: int = 8) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(nbytes)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _require_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{what} path is a directory, not a file: {path}")


#: Largest expansion ratio of a deflated zip member (deflate's limit is ~1032:1).
_DEFLATE_MAX_RATIO = 1100


#: Longest .npy header read (NumPy's own default limit for np.load).
_MAX_NPY_HEADER = 10000


def _npy_header(fp, where: str):
    """(shape, dtype, header bytes, fortran order) of the .npy stream at ``fp``'s
    position (a seekable file or zip member)."""
    try:
        version = np.lib.format.read_magic(fp)
        # NumPy reads a header of the length it declares before checking that length: a
        # member declaring 4 GiB of header (zeros, compressed to a few KB) was read
        # whole. The length is checked here first.
        start = fp.tell()
        field = fp.read(2 if version == (1, 0) else 4)
        length = int.from_bytes(field, "little")
        if len(field) < (2 if version == (1, 0) else 4) or length > _MAX_NPY_HEADER:
            raise ValueError(
                f"header length {length} is beyond {_MAX_NPY_HEADER} bytes (or cut short)"
            )
        fp.seek(start)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    except (ValueError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise ValueError(
            f"cannot read {where} (truncated or corrupted .npy header?): {_one_line(e)}"
        ) from e
    return shape, dtype, fp.tell(), fortran


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (NumPy's header errors span several)."""
    return " ".join(str(exc).split())


def _npz_member_info(
    zf: zipfile.ZipFile, path: str, key: str, stored_only: bool = False
) -> zipfile.ZipInfo:
    """The entry of array ``key`` in an .npz, if it can be read safely: refused (one
    ValueError naming the file) are an archive with two members of one name (zipfile
    reads the last, other tools the first), a missing member, an encrypted one, one
    compressed with another method than deflate (zipfile decompresses bzip2 and LZMA a
    read at a time with no bound on the output: 4 KB of a bzip2 member made a
    gigabyte), and with ``stored_only`` any compressed one."""
    names = zf.namelist()
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path} has duplicated members {dup}: refused (ambiguous archive)")
    if key + ".npy" not in names:
        present = sorted(n[:-4] for n in names if n.endswith(".npy"))
        raise ValueError(f"{path} has no array '{key}' (arrays present: {present})")
    info = zf.getinfo(key + ".npy")
    if info.flag_bits & 0x1:
        raise ValueError(f"{path}['{key}'] is encrypted")
    if stored_only and info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(
            f"{path}['{key}'] is compressed; this format stores its members uncompressed"
        )
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        method = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}.get(
            info.compress_type, f"method {info.compress_type}"
        )
        raise ValueError(
            f"{path}['{key}'] is compressed with {method}: only stored or deflated members "
            "(what np.savez and np.savez_compressed write) are read"
        )
    return info


def _check_npy_size(shape, dtype, data_bytes: int, where: str) -> None:
    """Refuse a header whose shape needs more bytes than the file holds (a crafted or
    corrupted header would otherwise allocate its claimed size: MemoryError)."""
    need = math.prod(int(s) for s in shape) * dtype.itemsize
    if dtype.hasobject:
        raise ValueError(f"{where} holds Python objects (pickled data is not loaded)")
    if need > data_bytes:
        raise ValueError(
            f"{where}: the header claims shape {tuple(shape)} {dtype} "
            f"({need} bytes) but the file holds at most {data_bytes} bytes of "
            "data (truncated or corrupted file?)"
        )


def _check_npy_file(path: str, key: str) -> None:
    with open(path, "rb") as f:
        shape, dtype, header, _ = _npy_header(f, f"'{key}' in {path}")
    _check_npy_size(shape, dtype, os.path.getsize(path) - header, f"'{key}' in {path}")


def _check_npz_members(path: str, keys, stored_only: bool = False) -> None:
    """Check each member's .npy header against the member's stored size before loading
    (after :func:`_npz_member_info`'s checks)."""
    try:
        with zipfile.ZipFile(path) as zf:
            for key in keys:
                info = _npz_member_info(zf, path, key, stored_only)
                with zf.open(info) as f:
                    shape, dtype, header, _ = _npy_header(f, f"{path}['{key}']")
                available = info.file_size - header
                if info.compress_type != zipfile.ZIP_STORED:
                    available = min(available, _DEFLATE_MAX_RATIO * info.compress_size)
                _check_npy_size(shape, dtype, available, f"{path}['{key}']")
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError) as e:
        raise ValueError(f"cannot read {path} (truncated or corrupted .npz?): {e}") from e


def _load_npy(path: str, mmap: bool, key: str) -> np.ndarray:
    _require_file(path, key)
    if _read_magic(path, len(_NPY_MAGIC)) != _NPY_MAGIC:
        raise ValueError(f"{path} is not a .npy file (bad magic bytes); cannot read '{key}'")
    _check_npy_file(path, key)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(
            f"cannot read '{key}' from {path} (truncated or corrupted .npy file?): {e}"
        ) from e


def _load_npz(path: str, keys=("features", "labels")):
    """The two arrays ``keys`` of an .npz, headers checked against the file before loading."""
    _require_file(path, "features")
    if _read_magic(path, 4) not in _ZIP_MAGICS:
        raise ValueError(f"{path} is not a .npz (zip) file (bad magic bytes)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [key for key in keys if key not in z.files]
            if missing:
                raise _MissingKey(
                    f"{path} has no array '{missing[0]}' (arrays present: {sorted(z.files)})"
                )
            # A header claiming more than the file holds fails before any allocation.
            _check_npz_members(path, keys)
            # Accessing a member decompresses and CRC-checks it.
            x = z[keys[0]]
            y = z[keys[1]]
    except _MissingKey as e:
        raise ValueError(str(e)) from None
    except (
        ValueError,
        OSError,
        EOFError,
        KeyError,
        zipfile.BadZipFile,
        zlib.error,
        lzma.LZMAError,
        NotImplementedError,
        RuntimeError,  # an encrypted member
    ) as e:
        raise ValueError(
            f"cannot read {path} (truncated or corrupted .npz file, or object arrays?): "
            f"{_one_line(e)}"
        ) from e
    return x, y


def _load_safetensors(path: str, keys=("features", "labels")):
    """The two tensors ``keys`` of a .safetensors file, as NumPy arrays."""
    _require_file(path, "features")
    opened = safetensors_open(path)  # its own errors: a missing package, an unreadable file
    try:
        with opened as f:
            present = set(f.keys())
            missing = [key for key in keys if key not in present]
            if missing:
                raise _MissingKey(
                    f"{path} has no tensor '{missing[0]}' (tensors present: {sorted(present)})"
                )
            x = f.get_tensor(keys[0])
            y = f.get_tensor(keys[1])
    except _MissingKey as e:
        raise ValueError(str(e)) from None
    except Exception as e:  # safetensors raises its own SafetensorError (an Exception)
        raise ValueError(
            f"cannot read {path} (truncated or corrupted .safetensors file?): {e}"
        ) from e
    return x, y


def _read_pair(path: str, labels_path, mmap: bool, keys=("features", "labels")):
    """``(x, y, x_name, y_name)``: a feature file's features and labels as stored (arrays
    ``keys`` of a .npz / .safetensors; a .npy and its labels .npy), with the names the
    error messages use. The one format dispatch of :func:`load_features` and
    :func:`read_labeled_arrays`."""
    lower = path.lower()
    if labels_path is not None and not lower.endswith(".npy"):
        raise ValueError(f"labels_path is only used with .npy features, not {path}")
    if lower.endswith(".npy"):
        if labels_path is None:
            labels_path = _sibling_labels_path(path)
            if labels_path is None:
                raise ValueError(
                    f"no labels for {path}: pass labels_path, or name the pair "
                    f"'<stem>{_FEATURES_SUFFIX}' + '<stem>{_LABELS_SUFFIX}'"
                )
        labels_path = os.fspath(labels_path)
        x = _load_npy(path, mmap, "features")
        y = _load_npy(labels_path, False, "labels")
        return x, y, f"features ({path})", f"labels ({labels_path})"
    if lower.endswith(".npz"):
        x, y = _load_npz(path, keys)
    elif lower.endswith(".safetensors"):
        x, y = _load_safetensors(path, keys)
    else:
        raise ValueError(
            f"unknown feature file format: {path} (expected .npz, .npy or .safetensors)"
        )
    return x, y, f"{path}['{keys[0]}']", f"{path}['{keys[1]}']"


def load_features(
    path: PathLike,
    labels_path: Optional[PathLike] = None,
    mmap: bool = True,
    num_classes: Optional[int] = None,
    check_finite: bool = True,
    name: Optional[str] = None,
) -> FeatureSet:
    """Load features and labels from disk into a validated :class:`FeatureSet`.

    Formats, chosen by the file name:

    ``*.npz``
        Arrays ``features`` (n, d) and ``labels`` (n,).  Loaded into memory
        (``mmap`` has no effect; zip members cannot be memory-mapped).
    ``*.npy``
        The features; the labels come from ``labels_path``, or, if that is None and
        the name ends in ``.features.npy``, from the sibling ``<stem>.labels.npy``
        (``foo.features.npy`` pairs with ``foo.labels.npy``; this is also what
        :func:`synthetic_features` writes).  With ``mmap=True`` the features are a
        read-only ``numpy.memmap`` (``mmap_mode="r"``), so 8 GB ImageNet features do
        not need 8 GB of RAM.
    ``*.safetensors``
        Tensors ``features`` and ``labels``; needs the ``safetensors`` package.

    Parameters
    ----------
    path : str or os.PathLike
        The features file.
    labels_path : str or os.PathLike, optional
        A ``.npy`` file of labels, for the ``.npy`` format only.
    mmap : bool
        Memory-map ``.npy`` features (default True).
    num_classes : int, optional
        Number of classes; default ``max(labels) + 1``.
    check_finite : bool
        Scan for NaN/Inf rows (streamed in blocks; reads the whole file once).
    name : str, optional
        Name of the returned set; default the file name.

    Raises
    ------
    FileNotFoundError
        The features or labels file does not exist (the message names it).
    ValueError
        Unknown extension; unreadable, truncated or corrupted file; missing array;
        features not 2-D floating; labels not 1-D integer; row-count mismatch;
        negative labels or labels >= num_classes; NaN/Inf rows.
    ImportError
        A ``.safetensors`` file without the ``safetensors`` package.
    """
    path = os.fspath(path)
    set_name = os.path.basename(path) if name is None else name
    x, y, x_key, y_key = _read_pair(path, labels_path, mmap)
    if num_classes is not None:
        _validation.integer(num_classes, "num_classes", 1)  # an argument, not the file's
    elif path.lower().endswith(".npz"):
        num_classes = _stored_num_classes(path)  # written by save_features(FeatureSet)
    with _validation.file_contents():
        x, y, k = check_feature_arrays(
            x,
            y,
            num_classes=num_classes,
            check_finite=check_finite,
            features_key=x_key,
            labels_key=y_key,
        )
    return FeatureSet(x, y, k, set_name)


def _stored_num_classes(path: str) -> Optional[int]:
    """The ``num_classes`` a ``.npz`` written from a FeatureSet stores, or None."""
    with np.load(path, allow_pickle=False) as z:
        if "num_classes" not in z.files:
            return None
        # Checked like the other members before it is read (a crafted header declared
        # 2^45 entries: MemoryError; or gigabytes of zeros in a few KB).
        _check_npz_members(path, ("num_classes",))
        k = z["num_classes"]
    if k.shape != () or k.dtype.kind not in "iu":
        raise ValueError(f"{path}['num_classes'] must be one integer, got {k!r}")
    return int(k)


def save_features(path: PathLike, features, labels=None, compress: bool = False) -> str:
    """Write features and labels to a ``.npz`` file readable by :func:`load_features`.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; must end in ``.npz``.
    features : array_like (n, d) floating, or a FeatureSet (then ``labels`` is ignored
        and may be left out; its ``num_classes`` is stored, so a set whose last
        classes have no rows loads back with the same K)
    labels : array_like (n,) integer
    compress : bool
        Use ``numpy.savez_compressed`` (smaller, slower to load).

    Returns
    -------
    str
        The path written.

    The arrays are validated first (same rules as loading, including the NaN/Inf
    scan), so a file written here always loads.
    """
    path = os.fspath(path)
    if not path.lower().endswith(".npz"):
        raise ValueError(f"save_features writes .npz files; got {path}")
    extra = {}
    if isinstance(features, FeatureSet):
        extra["num_classes"] = np.array(features.num_classes, dtype=np.int64)
        features, labels = features.features, features.labels
    elif labels is None:
        raise TypeError("save_features needs labels (or a FeatureSet as features)")
    x, y, _ = check_feature_arrays(
        features, labels, num_classes=extra.get("num_classes"), name=path
    )
    (np.savez_compressed if compress else np.savez)(path, features=x, labels=y, **extra)
    return path


# --------------------------------------------------------------------------- #
# Splitting and describing
# --------------------------------------------------------------------------- #
def _stratified_test_indices(
    labels: np.ndarray, num_classes: int, n_test: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of a stratified test set of exactly ``n_test`` rows (sorted)."""
    n = labels.shape[0]
    counts = np.bincount(labels, minlength=num_classes)
    quota = counts * (n_test / n)
    take = np.floor(quota).astype(np.int64)
    short = n_test - int(take.sum())
    if short > 0:  # largest remainders first; ties broken by the seeded rng
        rem = quota - take
        order = np.lexsort((rng.random(num_classes), -rem))
        order = order[counts[order] > take[order]]
        take[order[:short]] += 1
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    picked = []
    for c in range(num_classes):
        if take[c]:
            members = order[starts[c] : starts[c] + counts[c]]
            picked.append(rng.choice(members, size=int(take[c]), replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, np.int64)


def train_test_split_features(
    fs: FeatureSet, test_fraction: Union[float, int] = 0.25, seed: int = 0, stratify: bool = True
) -> Tuple[FeatureSet, FeatureSet]:
    """Split a FeatureSet into (train, test), deterministically given ``seed``.

    Parameters
    ----------
    fs : FeatureSet
    test_fraction : float in (0, 1), or int
        Share of rows for the test set (rounded to the nearest row), or an exact
        number of test rows if an int.
    seed : int
        Seed of the split (reproducibility only; the split is not a privacy
        mechanism).
    stratify : bool
        Keep class proportions (each class contributes ``count * fraction`` rows,
        rounded by largest remainder so the total is exact).

    Returns
    -------
    (train, test) : tuple of FeatureSet
        In-memory copies, rows in their original order; names get ``-train`` /
        ``-test`` suffixes.
    """
    n = fs.n
    seed = _validation.integer(seed, "seed", 0)
    if isinstance(test_fraction, (int, np.integer)) and not isinstance(test_fraction, bool):
        n_test = _validation.integer(test_fraction, "test_fraction")
    else:
        f = _validation.real(test_fraction, "test_fraction")
        if not 0.0 < f < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1) or an int, got {test_fraction}")
        n_test = int(round(n * f))
    if not 0 < n_test < n:
        raise ValueError(f"test set of {n_test} rows out of {n} leaves an empty split")
    rng = np.random.default_rng(seed)
    if stratify:
        test_idx = _stratified_test_indices(fs.labels, fs.num_classes, n_test, rng)
    else:
        test_idx = np.sort(rng.choice(n, size=n_test, replace=False))
    mask = np.ones(n, dtype=bool)
    mask[test_idx] = False
    train_idx = np.flatnonzero(mask)
    base = fs.name or "data"
    train = FeatureSet(
        np.ascontiguousarray(fs.features[train_idx]),
        fs.labels[train_idx],
        fs.num_classes,
        base + "-train",
    )
    test = FeatureSet(
        np.ascontiguousarray(fs.features[test_idx]),
        fs.labels[test_idx],
        fs.num_classes,
        base + "-test",
    )
    return train, test


def describe(fs: FeatureSet, norm_sample: int = 4096) -> str:
    """One line about a FeatureSet: size, dtype, classes, storage, row norms.

    Row-norm statistics come from the first ``norm_sample`` rows only, so this stays
    cheap on a memory-mapped ImageNet-sized file (0 disables them).  Printing them
    is for the user's eyes: choosing the clipping norm from private data is not free.
    No per-class counts: they are private (and O(K) to compute).
    """
    storage = "memmap" if isinstance(fs.features, np.memmap) else "in-memory"
    parts = [
        f"{fs.name or 'unnamed'}: n={fs.n} d={fs.d} {fs.features.dtype}",
        f"K={fs.num_classes}",
        storage,
    ]
    if norm_sample and fs.n:
        head = np.asarray(fs.features[: min(fs.n, norm_sample)], dtype=np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", head, head))
        with np.errstate(invalid="ignore"):
            parts.append(
                f"row norm mean {norms.mean():.3g} (min {norms.min():.3g}, "
                f"max {norms.max():.3g}, first {head.shape[0]} rows)"
            )
    return ", ".join(parts)


# --------------------------------------------------------------------------- #
# Embedded default: scikit-learn's digits
# --------------------------------------------------------------------------- #
#: Default size of the digits test split (the remaining 1347 rows train).
DIGITS_TEST_SIZE = 450


def _random_fourier_map(
    x: np.ndarray, num_features: int, gamma: float, seed: int, dtype
) -> np.ndarray:
    """sqrt(2/D) cos(x W + b), W ~ N(0, gamma) entrywise, b ~ U[0, 2 pi).

    A fixed, public, data-independent map (it approximates the kernel
    exp(-gamma ||x - x'||^2 / 2)); rows have norm close to 1.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0xD161, 1)))
    w = rng.standard_normal((x.shape[1], num_features)) * math.sqrt(gamma)
    b = rng.uniform(0.0, 2.0 * math.pi, size=num_features)
    z = np.cos(x.astype(np.float64) @ w + b) * math.sqrt(2.0 / num_features)
    return np.ascontiguousarray(z, dtype=dtype)


def digits_features(
    feature_map: str = "pixels",
    seed: int = 0,
    *,
    test_size: int = DIGITS_TEST_SIZE,
    split_seed: int = 0,
    num_features: int = 512,
    gamma: Optional[float] = None,
    dtype=np.float32,
) -> Tuple[FeatureSet, FeatureSet]:
    """scikit-learn's bundled digits (1797 8x8 images, 10 classes) as (train, test).

    No download: the data ships with scikit-learn.  The split is stratified and
    fixed by ``split_seed`` (default: 1347 train / 450 test rows), the same for
    every feature map so that maps can be compared.

    Parameters
    ----------
    feature_map : {"pixels", "random_fourier"}
        ``"pixels"``: the 64 pixel intensities divided by 16 (their public maximum),
        so in [0, 1]; row norms are about 3 to 6.
        ``"random_fourier"``: ``sqrt(2/D) cos(W x + b)`` of those pixels, with
        ``W ~ N(0, gamma)`` (D x 64) and ``b ~ U[0, 2 pi)`` drawn once from ``seed``:
        a fixed public map standing in for a frozen pre-trained embedding; rows have
        norm close to 1.
    seed : int
        Seed of the random Fourier map (unused for ``"pixels"``).
    test_size : int
        Rows in the test split.
    split_seed : int
        Seed of the stratified split.
    num_features : int
        D for ``"random_fourier"``.
    gamma : float, optional
        Kernel width for ``"random_fourier"``; default ``4 / 64`` (4 / input
        dimension), fixed from the input range rather than from the data.
    dtype : numpy dtype
        float32 (default) or float64.

    Returns
    -------
    (train, test) : tuple of FeatureSet
        Named ``"digits-<feature_map>-train"`` / ``"-test"``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("digits_features needs scikit-learn (pip install scikit-learn)") from e
    dtype = _validation.float_dtype(dtype, "dtype")
    seed = _validation.integer(seed, "seed", 0)
    _validation.choice(feature_map, "feature_map", ("pixels", "random_fourier"))
    bunch = load_digits()
    pixels = np.asarray(bunch.data, dtype=np.float64) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    if feature_map == "pixels":
        x = pixels.astype(dtype)
    else:
        num_features = _validation.integer(num_features, "num_features", 1)
        g = 4.0 / pixels.shape[1] if gamma is None else _validation.positive(gamma, "gamma")
        x = _random_fourier_map(pixels, num_features, g, seed, dtype)
    full = FeatureSet(x, labels, 10, f"digits-{feature_map}")
    test_size = _validation.integer(test_size, "test_size", 1)
    split_seed = _validation.integer(split_seed, "split_seed", 0)
    return train_test_split_features(full, test_size, seed=split_seed, stratify=True)


# --------------------------------------------------------------------------- #
# Synthetic "pre-trained-like" features
# --------------------------------------------------------------------------- #
#: name -> (n_train, d, num_classes), the shapes of the paper's benchmarks
#: (ViT-B-like d=768 for CIFAR, ViT-G/14-like d=1664 for ImageNet).
SYNTHETIC_PRESETS = {
    "cifar10": (50_000, 768, 10),
    "cifar100": (50_000, 768, 100),
    "imagenet": (1_281_167, 1664, 1000),
}

#: name -> test rows (the real test / validation set sizes).
SYNTHETIC_PRESET_TEST_SIZES = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 50_000}

#: name -> default difficulty of :func:`synthetic_preset`.  With 1000 classes the
#: accuracy falls off faster with difficulty, so ImageNet gets a lower default: at
#: full size, non-private ridge reaches ~89% at 0.4 (and ~99.9% at 0.25).
SYNTHETIC_PRESET_DIFFICULTY = {"cifar10": 0.5, "cifar100": 0.5, "imagenet": 0.4}

# Shape of the generative model (see synthetic_features).  Shares of E||x||^2
# before the final per-row normalisation:
_OFFSET_SHARE = 0.4  # common non-negative direction (features are "positive-ish")
_WITHIN_SHARE = 0.6  # within-class noise with the power-law spectrum
# Class separation: a signal-to-noise ratio that falls geometrically from _SNR_EASY
# (difficulty 0) to _SNR_HARD (difficulty 1).  The class means have two parts: one in
# the top eigen-directions of the within-class covariance, _TOP_ALIGNED_RATIO times
# stronger, which survives noise on the covariance; one in random directions, which
# only a well-whitened (non-private or high-epsilon) solver can exploit.  Calibrated
# with a DP least-squares sketch (see synthetic_features) so that at difficulty 0.5
# the cifar10 preset gives ~90% non-private and ~80% at eps = 1, cifar100 ~75% and
# ~25%: a visible privacy-utility trade-off, far above chance.
_SNR_EASY = 4.0
_SNR_HARD = 0.25
_TOP_ALIGNED_RATIO = 3.0


def _separation(difficulty: float) -> float:
    return _SNR_EASY * (_SNR_HARD / _SNR_EASY) ** difficulty


# Random streams of the generator, all derived from the user's seed by SeedSequence
# spawn keys: (_SYNTH_KEY, 0) the model; (_SYNTH_KEY, split, 0) the labels of a split
# (1 = train, 2 = test); (_SYNTH_KEY, split, 1, chunk) the rows of one chunk.
_SYNTH_KEY = 0x5E7


@dataclasses.dataclass(frozen=True)
class _SynthModel:
    sqrt_var: np.ndarray  # (d,): sqrt(_WITHIN_SHARE * lambda_j), eigen-coordinates
    signs: np.ndarray  # (3, d): +-1, the D_i of the structured rotation
    class_table: np.ndarray  # (K, d): offset + class mean
    norm_spread: float
    dtype: np.dtype


def _rotate(u: np.ndarray, signs: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Apply the structured random rotation R = D3 C D2 C D1 to each row of ``u``.

    C is the orthonormal DCT-II and D_i are diagonal random signs: an orthogonal
    map, dense (every basis vector spreads over all coordinates), costing
    O(d log d) per row instead of the d^2 of a dense Haar rotation -- the trick of
    structured orthogonal random features (Yu et al. 2016, "HD1 HD2 HD3").  ``u`` is
    overwritten.
    """
    from scipy import fft as _fft

    u *= signs[0]
    u = _fft.dct(u, type=2, norm="ortho", axis=-1, overwrite_x=True, workers=1)
    u *= signs[1]
    u = _fft.dct(u, type=2, norm="ortho", axis=-1, overwrite_x=True, workers=1)
    return np.multiply(u, signs[2], out=out)


def _synth_model(
    d: int,
    num_classes: int,
    difficulty: float,
    spectrum_decay: float,
    seed: int,
    class_dim: int,
    norm_spread: float,
    dtype,
) -> _SynthModel:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SYNTH_KEY, 0)))
    # Within-class covariance: R diag(0.6 lambda) R^T, lambda_j ~ j^-decay, sum 1.
    signs = np.where(rng.random((3, d)) < 0.5, -1.0, 1.0)
    lam = np.arange(1, d + 1, dtype=np.float64) ** (-float(spectrum_decay))
    lam *= _WITHIN_SHARE / lam.sum()
    # Common offset: a non-negative direction.
    offset = np.abs(rng.standard_normal(d))
    offset *= math.sqrt(_OFFSET_SHARE) / np.linalg.norm(offset)
    # Class means, in units of the within-class standard deviation along the
    # directions they use (coordinates ~ N(0, 1/class_dim), so ||coords|| ~ 1):
    #  - top-aligned: in span(q_1..q_r) (q_j = R e_j), coordinate j scaled by
    #    sqrt(lambda_j);
    #  - random: in a random r-dim subspace, where the within-class variance along a
    #    direction is _WITHIN_SHARE / d on average.
    snr = _separation(difficulty)
    coords_top = rng.standard_normal((num_classes, class_dim)) / math.sqrt(class_dim)
    coords_top *= np.sqrt(lam[:class_dim])[None, :]
    eig_coords = np.zeros((num_classes, d))
    eig_coords[:, :class_dim] = coords_top * (_TOP_ALIGNED_RATIO * snr)
    means = _rotate(eig_coords, signs)
    basis, _ = np.linalg.qr(rng.standard_normal((d, class_dim)))
    coords = rng.standard_normal((num_classes, class_dim)) / math.sqrt(class_dim)
    means += (coords @ basis.T) * (snr * math.sqrt(_WITHIN_SHARE / d))
    table = offset[None, :] + means
    return _SynthModel(
        np.sqrt(lam).astype(dtype),
        signs.astype(dtype),
        np.ascontiguousarray(table, dtype=dtype),
        float(norm_spread),
        np.dtype(dtype),
    )


def _chunk_rng(seed: int, split: int, chunk: int) -> np.random.Generator:
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(_SYNTH_KEY, split, 1, chunk)))
    )


def _fill_chunk(
    out: np.ndarray, labels: np.ndarray, model: _SynthModel, seed: int, split: int, chunk: int
) -> None:
    start = chunk * _SYNTH_CHUNK_ROWS
    stop = min(start + _SYNTH_CHUNK_ROWS, out.shape[0])
    rng = _chunk_rng(seed, split, chunk)
    # Always float32 normals, so float64 output is the same data up to rounding.
    z = rng.standard_normal((stop - start, out.shape[1]), dtype=np.float32)
    if z.dtype != model.dtype:
        z = z.astype(model.dtype)
    log_norm = rng.standard_normal(stop - start)
    z *= model.sqrt_var
    block = out[start:stop]
    _rotate(z, model.signs, out=block)
    del z
    block += model.class_table[labels[start:stop]]
    # Per-row normalisation to norm exp(norm_spread * N(0,1)): data-independent,
    # mimics L2-normalised embeddings with a mild spread around 1.
    sq = np.einsum("ij,ij->i", block, block).astype(np.float64)
    scale = np.exp(model.norm_spread * log_norm) / np.sqrt(np.maximum(sq, 1e-300))
    block *= scale.astype(model.dtype)[:, None]


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 16))


def _fill_split(
    out: np.ndarray, labels: np.ndarray, model: _SynthModel, seed: int, split: int, workers: int
) -> None:
    """Generate the rows of one split into ``out``, chunk by chunk.

    Each chunk is an independent task (draw normals, rotate, add means, normalise
    rows) with its own random stream, so the output does not depend on the number
    of workers.  NumPy's generators, SciPy's FFTs and the ufuncs release the GIL,
    so threads run in parallel.
    """
    chunks = range((out.shape[0] + _SYNTH_CHUNK_ROWS - 1) // _SYNTH_CHUNK_ROWS)
    if workers <= 1 or len(chunks) <= 1:
        for c in chunks:
            _fill_chunk(out, labels, model, seed, split, c)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        for f in [pool.submit(_fill_chunk, out, labels, model, seed, split, c) for c in chunks]:
            f.result()


def _balanced_labels(n: int, num_classes: int, seed: int, split: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SYNTH_KEY, split, 0)))
    return (rng.permutation(n) % num_classes).astype(np.int64)


def synthetic_features(
    n: int,
    d: int,
    num_classes: int,
    difficulty: float = 0.5,
    spectrum_decay: float = 1.0,
    seed: int = 0,
    dtype=np.float32,
    test_size: Optional[int] = None,
    *,
    class_dim: Optional[int] = None,
    norm_spread: float = 0.1,
    out: Optional[PathLike] = None,
    name: str = "synthetic",
    workers: Optional[int] = None,
) -> Tuple[FeatureSet, FeatureSet]:
    """Generate "pre-trained-like" features: (train, test), deterministic given seed.

    The model, for a row x with label y (balanced classes, shuffled):

    ``x_raw = o + m_y + sum_j sqrt(0.6 lambda_j) z_j q_j``,  ``z ~ N(0, I_d)``,

    * ``lambda_j`` proportional to ``j ** -spectrum_decay`` (j = 1..d), summing to 1,
      in a random orthonormal basis ``q_j = R e_j``: the decaying eigen-spectrum of
      real embeddings.  ``R = D3 C D2 C D1`` (C the orthonormal DCT-II, D_i random
      sign flips) is a structured random rotation: dense like a Haar rotation,
      but O(d log d) per row instead of a d x d GEMM;
    * ``o``: a fixed non-negative direction carrying 40% of ``E||x||^2`` (real
      embeddings share a large common component, so coordinates are mostly
      positive and the uncentred Gram has one dominant eigenvalue);
    * ``m_y``: class means, ``snr * (3 * sum_{j<=r} sqrt(lambda'_j) a_yj q_j +
      sqrt(0.6 / d) U c_y)`` with ``a_y, c_y ~ N(0, I_r / r)``, ``r = class_dim``,
      ``lambda' = 0.6 lambda`` and ``U`` a random orthonormal d x r basis.  The
      first part lies in the top-r eigen-directions (as in real embeddings, the
      leading principal components carry class information) and survives noise on
      the feature covariance; the second lies in random directions, where the
      within-class variance is small (0.6 / d on average), so only a well-whitened
      solver (non-private, or high epsilon) can use it.  Both parts are measured in
      within-class standard deviations; ``snr`` falls geometrically from 4 at
      ``difficulty=0`` to 0.25 at ``difficulty=1``;
    * finally each row is rescaled to norm ``exp(norm_spread * N(0, 1))``: roughly
      unit norm like L2-normalised ViT embeddings, with a spread so that clipping at
      C = 1 is active for about half the rows (``norm_spread=0`` gives unit rows).

    Calibration (defaults: difficulty 0.5, spectrum_decay 1; mean over seeds 0-2).
    Non-private ridge test accuracy: cifar10 preset ~90% (88-92%), cifar100 ~75%.
    DP least squares sketch (clip C = 1; Gram and class sums released with equal
    noise multipliers from the exact Gaussian-DP curve, delta = 1e-5; PSD
    projection; lambda = z sqrt(d) C^2, z the noise multiplier): cifar10 ~85% /
    80% / 75% at eps = 8 / 1 / 0.1; cifar100 ~60% / 25% / 3%.  The trade-off is
    steeper for larger ``spectrum_decay``, more classes, or fewer rows per class.

    All randomness is data-independent, and nothing is centred or standardised.

    Parameters
    ----------
    n : int
        Training rows.
    d : int
        Feature dimension.
    num_classes : int
        K >= 2.
    difficulty : float in [0, 1]
        0 easy (near 100% non-private accuracy), 1 hard (close to chance).
        Default 0.5: the cifar10 preset gives ~89% with a non-private ridge
        classifier.
    spectrum_decay : float >= 0
        Power-law exponent of the within-class eigen-spectrum (0 = isotropic).
    seed : int
        Reproducibility seed.  Everything (basis, means, labels, rows) derives from
        it; each chunk of rows has its own stream keyed by (seed, split, chunk), so
        the output does not depend on threading.  Bit-identical across runs on one
        machine; across BLAS builds only up to float rounding.  Not a privacy seed.
    dtype : numpy dtype
        float32 (default) or float64.  Generation stays in this dtype: no float64
        n x d temporary is ever created for float32 output.
    test_size : int, optional
        Test rows, drawn from the same distribution; default ``min(10_000,
        max(1, n // 5))``.
    class_dim : int, optional
        Dimension of the class-mean subspace; default ``min(num_classes, max(1, d // 4))``.
    norm_spread : float >= 0
        Log-normal spread of the row norms around 1.
    out : str or os.PathLike, optional
        If given, write to memory-mapped files ``<out>.train.features.npy``,
        ``<out>.train.labels.npy``, ``<out>.test.features.npy``,
        ``<out>.test.labels.npy`` (loadable with :func:`load_features`) and return
        FeatureSets backed by them; otherwise allocate in RAM
        (n * d * 4 bytes for float32: 8.5 GB at the ImageNet shape).
    name : str
        Base name of the sets (``-train`` / ``-test`` appended).
    workers : int, optional
        Threads generating chunks in parallel; default the usable CPU count (at most
        16).  Does not change the output.

    Returns
    -------
    (train, test) : tuple of FeatureSet

    Notes
    -----
    Memory: the output plus about ``workers * 2 * 8192 * d * itemsize`` bytes of
    chunk temporaries (never an n x d temporary, never float64 for float32 output).
    Time: dominated by the n * d normal draws and two FFTs per row; the ImageNet
    shape (1.33 M x 1664 float32, 8.9 GB with its test split) takes about 70
    CPU-seconds, i.e. ~35 s on 2 idle cores.
    """
    n, d = _validation.integer(n, "n", 1), _validation.integer(d, "d", 1)
    num_classes = _validation.integer(num_classes, "num_classes", 2)
    seed = _validation.integer(seed, "seed", 0)
    difficulty = _validation.interval(difficulty, "difficulty", 0.0, 1.0, closed="both")
    spectrum_decay = _validation.nonneg(spectrum_decay, "spectrum_decay")
    norm_spread = _validation.nonneg(norm_spread, "norm_spread")
    dtype = _validation.float_dtype(dtype, "dtype")
    workers = _default_workers() if workers is None else _validation.integer(workers, "workers", 1)
    if test_size is None:
        test_size = min(10_000, max(1, n // 5))
    test_size = _validation.integer(test_size, "test_size", 1)
    if class_dim is None:
        class_dim = min(num_classes, max(1, d // 4))
    class_dim = _validation.integer(class_dim, "class_dim", 1, d)

    model = _synth_model(
        d, num_classes, difficulty, spectrum_decay, seed, class_dim, norm_spread, dtype
    )
    result = []
    for split, (part, rows) in enumerate((("train", n), ("test", test_size)), start=1):
        labels = _balanced_labels(rows, num_classes, seed, split)
        if out is None:
            feats = np.empty((rows, d), dtype=dtype)
        else:
            stem = f"{os.fspath(out)}.{part}"
            feats = np.lib.format.open_memmap(
                stem + _FEATURES_SUFFIX, mode="w+", dtype=dtype, shape=(rows, d)
            )
            np.save(stem + _LABELS_SUFFIX, labels)
        _fill_split(feats, labels, model, seed, split, workers)
        if out is not None:
            feats.flush()
            del feats
            feats = np.load(f"{os.fspath(out)}.{part}{_FEATURES_SUFFIX}", mmap_mode="r")
        result.append(FeatureSet(feats, labels, num_classes, f"{name}-{part}"))
    return result[0], result[1]


def synthetic_preset(
    name: str, difficulty: Optional[float] = None, seed: int = 0, n: Optional[int] = None, **kwargs
) -> Tuple[FeatureSet, FeatureSet]:
    """:func:`synthetic_features` at the shape of a benchmark in :data:`SYNTHETIC_PRESETS`.

    Parameters
    ----------
    name : {"cifar10", "cifar100", "imagenet"}
    difficulty : float in [0, 1], optional
        Default :data:`SYNTHETIC_PRESET_DIFFICULTY` ``[name]`` (0.5, 0.5, 0.4).
        Measured with delta = 1e-5 (CIFAR) / 8e-7 (ImageNet), clip C = 1, DP least
        squares at eps = 8 / 1 / 0.1 versus non-private ridge (test accuracy):
        cifar10 ~85 / 80 / 75% vs ~90%; cifar100 ~60 / 25 / 3% vs ~75%;
        imagenet ~78 / 19 / 0.4% vs ~89%.
    seed : int
        As in :func:`synthetic_features`.
    n : int, optional
        Override the number of training rows (e.g. small n for fast tests); the test
        size is then ``min(preset test size, max(1, n // 5))``.  Fewer rows per class
        means lower accuracy at the same difficulty.
    **kwargs :
        Passed on (``spectrum_decay``, ``dtype``, ``test_size``, ``out``, ...).
    """
    if not isinstance(name, str) or name not in SYNTHETIC_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(SYNTHETIC_PRESETS)}")
    n_preset, d, k = SYNTHETIC_PRESETS[name]
    test_size = SYNTHETIC_PRESET_TEST_SIZES[name]
    if n is not None:
        n = _validation.integer(n, "n", 1)
        test_size = min(test_size, max(1, n // 5))
    else:
        n = n_preset
    kwargs.setdefault("test_size", test_size)
    kwargs.setdefault("name", f"synthetic-{name}")
    if difficulty is None:
        difficulty = SYNTHETIC_PRESET_DIFFICULTY[name]
    return synthetic_features(n, d, k, difficulty=difficulty, seed=seed, **kwargs)


# --------------------------------------------------------------------------- #
# Labelled arrays as users have them (any array names, labels of any kind)
# --------------------------------------------------------------------------- #
def read_labeled_arrays(
    path: PathLike,
    labels_path: Optional[PathLike] = None,
    *,
    features_key: str = "features",
    labels_key: str = "labels",
    mmap: bool = True,
    check_finite: bool = True,
):
    """Features and labels as stored, under any array names, labels of any kind.

    Unlike :func:`load_features` (integer labels ``0..K-1`` under fixed names), the
    labels are returned as :func:`coerce_labels` makes them: integers, or class names
    (strings), for the estimators to map onto a label set.

    Parameters
    ----------
    path : str or os.PathLike
        ``.npz``, ``.npy`` (labels from ``labels_path`` or the ``<stem>.labels.npy``
        sibling) or ``.safetensors``.
    labels_path : path, optional
        Labels ``.npy`` for ``.npy`` features.
    features_key, labels_key : str
        Array names inside a ``.npz`` / ``.safetensors`` file.
    mmap : bool
        Memory-map ``.npy`` features.
    check_finite : bool
        Scan the features for NaN/Inf rows.

    Returns
    -------
    features : numpy.ndarray (n, d) float32/float64
    labels : numpy.ndarray (n,) int64 or str
    """
    path = os.fspath(path)
    x, y, x_key, y_key = _read_pair(path, labels_path, mmap, (features_key, labels_key))
    with _validation.file_contents():
        y = coerce_labels(y, y_key)
        # Features: the same checks as load_features (labels are checked above).
        x, _, _ = check_feature_arrays(
            x,
            np.zeros(np.shape(x)[0] if np.ndim(x) else 0, np.int64),
            check_finite=check_finite,
            features_key=x_key,
            labels_key=y_key,
        )
    if y.shape[0] != x.shape[0]:
        raise ValueError(
            f"shape mismatch: {x_key} has {x.shape[0]} rows but {y_key} has {y.shape[0]} entries"
        )
    return x, y


def coerce_labels(labels, name: str = "labels") -> np.ndarray:
    """Labels as integers (int64) or class names (str), from how files store them.

    Integer and boolean labels become int64; floating labels must be integer-valued
    (``3.0`` -> 3; ``2.5``, NaN or Inf are errors naming the first such index); byte and
    unicode strings become ``str`` class names.

    Raises
    ------
    ValueError
        Not 1-D, non-integer floats, or another dtype (complex, object, ...): as
        scikit-learn's targets, labels of an unsupported kind are a wrong value.
    """
    y = _validation.ndim(np.asarray(labels), name, 1, "(n,)")
    kind = y.dtype.kind
    if kind in "iub":
        if kind == "u" and y.dtype.itemsize == 8 and y.size and int(y.max()) > 2**63 - 1:
            # int64 would wrap them to negative labels (other classes than stored).
            raise ValueError(f"{name} has labels beyond the int64 range (max {int(y.max())})")
        return y.astype(np.int64)
    if kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if bad.size:
            raise ValueError(
                f"{name} has {bad.size} label(s) that are not integers; first at "
                f"index {int(bad[0])} (value {y[bad[0]]!r}); labels must be "
                "integers (float-coded integers are fine) or class names"
            )
        if y.size and np.abs(y).max() >= 2.0**53:
            raise ValueError(f"{name} has labels too large to be exact integers")
        return y.astype(np.int64)
    if kind == "S":
        return np.char.decode(y, "utf-8").astype(str)
    if kind == "U":
        return y.astype(str)
    # Targets of an unsupported kind are a ValueError (scikit-learn's "unknown label type").
    raise ValueError(f"{name} must hold integers or class names (strings), got dtype {y.dtype}")


# Sharded sources (many files, read a slice at a time) live in their own module.
from .shards import ShardedFeatures, ShardError, open_sharded  # noqa: E402,F401  (sharded sources)
