"""Optional dependencies: imported where a feature needs them, with an error that names
the extra to install (never a bare ``No module named ...``)."""

from __future__ import annotations

import importlib

#: The distribution's name as pip spells it in ``pip install "dpfc-native[extra]"``.
DISTRIBUTION = "dpfc-native"


def install_hint(extra: str) -> str:
    return f'pip install "{DISTRIBUTION}[{extra}]"'


def require(module: str, what: str, extra: str):
    """The module ``module`` (e.g. ``"pyarrow.parquet"``), imported; if it (or a package
    above it) is missing, ``ModuleNotFoundError`` saying that ``what`` needs it and which
    extra brings it. An installed package that fails to import (a missing shared library,
    a missing dependency of its own) raises ``ImportError`` with its own cause."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and (missing == module or module.startswith(missing + ".")):
            raise ModuleNotFoundError(
                f"{what} needs the optional package '{top}': {install_hint(extra)}", name=top
            ) from e
        raise _broken(what, top, e) from e
    except ImportError as e:  # installed, but it does not import (e.g. a missing library)
        raise _broken(what, top, e) from e


def _broken(what: str, top: str, e: ImportError) -> ImportError:
    return ImportError(
        f"{what} needs the optional package '{top}', which is installed but "
        f"does not import: {type(e).__name__}: {e}"
    )


def safetensors_open(path: str):
    """``safetensors.safe_open(path)`` for NumPy tensors (a context manager); a file it
    cannot open (truncated, corrupted, not safetensors) raises ``ValueError`` naming it."""
    module = require("safetensors", "reading .safetensors files", "safetensors")
    try:
        return module.safe_open(path, framework="numpy")
    except OSError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError (an Exception)
        raise ValueError(
            f"cannot read {path} (truncated or corrupted .safetensors file?): {e}"
        ) from e
