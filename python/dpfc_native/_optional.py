"""Optional dependencies: imported where a feature needs them, with an error that names
the extra to install (never a bare ``No module named ...``)."""

from __future__ import annotations

import importlib

#: The distribution's name as pip spells it in ``pip install "dpfc-native[extra]"``.
DISTRIBUTION = "dpfc-native"


def install_hint(extra: str) -> str:
    return f'pip install "{DISTRIBUTION}[{extra}]"'


def require(module: str, what: str, extra: str):
    """The module ``module`` (e.g. ``"pyarrow.parquet"``), imported; if it is missing,
    ``ModuleNotFoundError`` saying that ``what`` needs it and which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ModuleNotFoundError(
            f"{what} needs the optional package '{top}': {install_hint(extra)}", name=top
        ) from e


def safetensors_open(path: str):
    """``safetensors.safe_open(path)`` for NumPy tensors (a context manager)."""
    module = require("safetensors", "reading .safetensors files", "safetensors")
    return module.safe_open(path, framework="numpy")
