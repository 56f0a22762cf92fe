"""Argument checks shared by the whole package: one rule per kind of mistake.

Every public entry point checks its arguments with these helpers, so the same mistake
raises the same exception type, with a message that starts with the argument's name,
wherever it is made. The rules follow NumPy and scikit-learn:

* **Wrong type -> TypeError; right type, wrong value -> ValueError.**
* **Real scalars** are ``int``, ``float``, NumPy integer and floating scalars, and 0-d
  NumPy arrays of those kinds (NumPy treats a 0-d array as a scalar). ``bool`` is a flag,
  not a number (TypeError), and so are strings, ``None``, complex numbers and arrays with
  ``ndim >= 1``. NaN is a ValueError; so is a value outside the allowed range (which
  excludes the infinities unless the parameter says otherwise).
* **Integers** are Python and NumPy integers and 0-d integer arrays; ``bool`` and floats
  (even ``3.0``) are TypeError, as in scikit-learn's ``check_scalar``. Below the minimum:
  ValueError.
* **Choices** (a string from a fixed set): anything else is a ValueError.
* **Flags** must be ``bool`` or ``numpy.bool_`` (TypeError).
* **Seeds** are ``None`` or an integer (TypeError).
* **Arrays**: a wrong rank or shape, an empty array, NaN/Inf and out-of-range entries are
  ValueError; an unsupported dtype is a TypeError (as NumPy's ufuncs and LAPACK wrappers
  report it), and so is a ``dtype=`` parameter naming an unsupported dtype. A 0-d array
  where an array is required has the wrong rank (ValueError). The one exception: the
  estimators' ``X`` may follow scikit-learn's ``check_array`` where scikit-learn's own
  estimator checks require it (complex data: ValueError).
* **Class indices** (integer labels in ``[0, K)``, what the ops and the data sets hold)
  are arrays like any other: a non-integer dtype is a TypeError. **Targets** (labels of
  any kind, to be mapped onto a label set, as scikit-learn's ``y``: what
  ``data.coerce_labels`` reads) follow scikit-learn instead: a kind of target that
  cannot be used (complex, NaN, a non-integral float) is a ValueError ("unknown label
  type").
* **File contents** (arrays read from a path) are values: every violation is a
  ValueError naming the file (:func:`file_contents`), since the path itself was of the
  right type.

Array checks take the array module ``xp`` (NumPy or CuPy). The finiteness scan is the
only check that reads every element: it runs once per array per public call, chunked
over rows (bounded extra memory), with one device sync on the GPU. A row view (an
object with ``_dpfc_row_view = True`` whose blocks are finite by construction) is not
scanned.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Iterator

import numpy as np

#: The floating dtypes the native kernels read and write.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def is_feature_float(dtype) -> bool:
    """float16, bfloat16, float32 or float64: the dtypes the statistics read as stored
    (longer floats are refused rather than rounded, integers rather than cast)."""
    dt = np.dtype(dtype)
    return (dt.kind == "f" and dt.itemsize in (2, 4, 8)) or dt.name == "bfloat16"


def feature_float(dtype, name: str) -> None:
    """TypeError naming ``name`` unless :func:`is_feature_float`."""
    if not is_feature_float(dtype):
        raise TypeError(
            f"{name} must hold float16, bfloat16, float32 or float64 features, got {dtype}"
        )


#: Most classes inferred from labels (``max(label) + 1``) when no label set is given,
#: unless there are more examples than that: a stray label of 1e9 would otherwise make a
#: billion classes (and O(K) arrays). Used by the data loaders and the sharded sources.
MAX_INFERRED_CLASSES = 1 << 16


def inferred_class_limit(n: int) -> int:
    """Most classes inferred from the labels of ``n`` examples: ``max(2^16, n)``."""
    return max(MAX_INFERRED_CLASSES, int(n))


# Elements per chunk of the finiteness scan: 32 MiB of float64 on the CPU; on the GPU,
# 64 MiB boolean temporaries, the verdicts kept on the device until one sync.
_CHUNK_ELEMENTS = 1 << 22
_GPU_CHUNK_ELEMENTS = 1 << 26


def _type_name(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.ndim}-d array" if value.ndim else f"0-d {value.dtype} array"
    return type(value).__name__


# --------------------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------------------


def is_scalar(value: Any) -> bool:
    """True for what :func:`real` reads as one value: Python and NumPy scalars (strings
    included, so that they reach the type check) and 0-d NumPy arrays."""
    return bool(np.isscalar(value)) or (isinstance(value, np.ndarray) and value.ndim == 0)


def real(value: Any, name: str, *, allow_nan: bool = False) -> float:
    """``value`` as a Python float: a real number (see the module rules).

    Raises
    ------
    TypeError
        Not a real number (bool, str, None, complex, an array with ndim >= 1, ...).
    ValueError
        NaN (unless ``allow_nan``).
    """
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (numbers.Real, np.integer, np.floating)
    ):
        raise TypeError(f"{name} must be a real number, got {_type_name(value)}")
    v = float(value)
    if math.isnan(v) and not allow_nan:
        raise ValueError(f"{name} must not be NaN")
    return v


def positive(value: Any, name: str, *, allow_inf: bool = False) -> float:
    """A real number > 0 (finite unless ``allow_inf``)."""
    v = real(value, name)
    if v <= 0 or (math.isinf(v) and not allow_inf):
        bound = "> 0" if allow_inf else "finite and > 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return v


def nonneg(value: Any, name: str, *, allow_inf: bool = False) -> float:
    """A real number >= 0 (finite unless ``allow_inf``)."""
    v = real(value, name)
    if v < 0 or (math.isinf(v) and not allow_inf):
        bound = ">= 0" if allow_inf else "finite and >= 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return v


def interval(value: Any, name: str, low: float, high: float, *, closed: str = "neither") -> float:
    """A real number in the interval from ``low`` to ``high``.

    ``closed`` says which ends belong to it: "neither", "left", "right" or "both".
    """
    v = real(value, name)
    lo_ok = v >= low if closed in ("left", "both") else v > low
    hi_ok = v <= high if closed in ("right", "both") else v < high
    if not (lo_ok and hi_ok):
        left = "[" if closed in ("left", "both") else "("
        right = "]" if closed in ("right", "both") else ")"
        raise ValueError(f"{name} must be in {left}{low:g}, {high:g}{right}, got {value!r}")
    return v


def share(value: Any, name: str) -> float:
    """A probability or budget share strictly between 0 and 1 (e.g. delta, a split)."""
    v = real(value, name)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    return v


def integer(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int within ``[minimum, maximum]`` (each bound optional).

    Raises
    ------
    TypeError
        Not an integer (bool and floats included, even integral ones).
    ValueError
        Out of range.
    """
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an integer, got {_type_name(value)}")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {v}")
    return v


def choice(value: Any, name: str, options: tuple) -> Any:
    """``value`` if it is one of ``options``, else ValueError listing them."""
    try:
        ok = value in options
    except Exception:  # e.g. an array compared element-wise
        ok = False
    if not ok or isinstance(value, np.ndarray):
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def boolean(value: Any, name: str) -> bool:
    """A flag: ``bool`` or ``numpy.bool_`` (TypeError otherwise)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {_type_name(value)}")
    return bool(value)


def seed(value: Any, name: str = "random_state") -> int | None:
    """None or an integer seed (TypeError otherwise)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be None or an int, got {_type_name(value)}")
    return int(value)


def float_dtype(dtype: Any, name: str = "dtype", allowed: tuple = FLOAT_DTYPES) -> np.dtype:
    """A ``dtype=`` parameter that must name one of ``allowed`` (TypeError otherwise)."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{name} must be one of ({_names(allowed)}), got {dtype!r}") from exc
    if dt not in allowed:
        raise TypeError(f"{name} must be one of ({_names(allowed)}), got {dt}")
    return dt


def _names(dtypes) -> str:
    return ", ".join(str(d) for d in dtypes)


# --------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------


def ndim(a: Any, name: str, expected: int, shape: str) -> Any:
    """ValueError unless ``a.ndim == expected``; ``shape`` describes it, e.g. "(n, d)"."""
    if a.ndim != expected:
        raise ValueError(f"{name} must be {expected}-D {shape}, got shape {tuple(a.shape)}")
    return a


def nonempty(a: Any, name: str) -> Any:
    """ValueError if any dimension of ``a`` is 0."""
    if 0 in tuple(a.shape):
        raise ValueError(f"{name} is empty: shape {tuple(a.shape)}")
    return a


def dtype_in(a: Any, name: str, allowed: tuple) -> Any:
    """TypeError unless ``a.dtype`` is one of ``allowed``."""
    if a.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in ({_names(allowed)}), got {a.dtype}")
    return a


def real_dtype(a: Any, name: str) -> Any:
    """TypeError unless ``a`` holds integers or floats (bool, complex, str, object: no)."""
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real array, got dtype {a.dtype}")
    return a


def finite(a: Any, name: str, xp: Any = np) -> Any:
    """ValueError if any element of ``a`` is NaN or Inf.

    The one full scan of an array's values: chunked over rows (the CPU reports the first
    bad row), with one device sync on the GPU. Row views are finite by
    construction and are not scanned.
    """
    if getattr(a, "_dpfc_row_view", False):
        return a
    if xp is np:
        if a.ndim == 0:
            if not np.isfinite(a):
                raise ValueError(f"{name} contains NaN or Inf; {name} must be finite")
            return a
        _, bad = nonfinite_rows(a, first_only=True)
        if bad >= 0:
            raise ValueError(
                f"{name} contains NaN or Inf (first at row {bad}); {name} must be finite"
            )
    else:
        # Chunks bound the boolean temporaries; the verdicts stay on the device until
        # one sync at the end.
        step = _GPU_CHUNK_ELEMENTS // max(1, int(np.prod(a.shape[1:], dtype=np.int64)))
        if a.ndim == 0 or a.shape[0] <= step:
            ok = xp.isfinite(a).all()
        else:
            ok = xp.stack(
                [xp.isfinite(a[i : i + step]).all() for i in range(0, a.shape[0], max(1, step))]
            ).all()
        if not bool(ok):
            raise ValueError(f"{name} contains NaN or Inf; {name} must be finite")
    return a


def nonfinite_rows(
    a: np.ndarray, *, block_elements: int | None = None, first_only: bool = False
) -> tuple[int, int]:
    """``(rows holding a NaN or Inf, index of the first such row or -1)`` of a CPU array.

    Streams ``a`` in blocks of rows (a memory map is never loaded whole, nothing is
    converted to float64). Per block, the sum is finite iff every entry is, unless the
    sum overflows: only blocks whose sum is not finite get the exact element-wise scan.
    ``first_only`` stops at the first bad block (its count is then partial).
    """
    width = int(np.prod(a.shape[1:], dtype=np.int64))
    step = block_elements if block_elements is not None else _CHUNK_ELEMENTS
    rows = max(1, step // max(width, 1))
    n_bad, first = 0, -1
    for start in range(0, a.shape[0], rows):
        block = np.asarray(a[start : start + rows])
        try:  # half precision sums in float64 (no overflow, no float64 copy)
            with np.errstate(over="ignore", invalid="ignore"):
                total = np.add.reduce(
                    block, axis=None, dtype=np.float64 if block.dtype.itemsize < 4 else None
                )
            if np.isfinite(total):
                continue
        except TypeError:  # a dtype without a sum: the exact scan decides
            pass
        bad = np.flatnonzero(~np.isfinite(block).reshape(block.shape[0], -1).all(axis=1))
        if bad.size:
            if first < 0:
                first = start + int(bad[0])
            n_bad += int(bad.size)
            if first_only:
                break
    return n_bad, first


def labels(y: Any, name: str, n: int, num_classes: int) -> Any:
    """Integer class indices of shape (n,) in ``[0, num_classes)``.

    ValueError for a wrong shape or an out-of-range label, TypeError for a non-integer
    dtype (bool included). Reads the labels once (min and max).
    """
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(y.shape)}")
    if y.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype, got {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"{name} must lie in [0, num_classes={num_classes}), got range [{lo}, {hi}]"
        )
    return y


# --------------------------------------------------------------------------------------
# File contents
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def file_contents() -> Iterator[None]:
    """Checks of arrays read from a file: a TypeError (wrong dtype) becomes a ValueError.

    The caller's argument was a path of the right type; what is wrong is the value stored
    in the file, so every violation is a ValueError (the message, naming the file and
    the key, is kept).
    """
    try:
        yield
    except TypeError as exc:
        raise ValueError(str(exc)) from exc
