"""The ``dpfc`` command line: ``dpfc train``, ``predict``, ``demo``, ``plan``, ``extract``
and ``audit``.

``python -m dpfc_native`` is the same program. The typer application object is
:data:`app`; the modules that own a command add it (``register_cli(app)`` of
:mod:`~dpfc_native.audit`, :mod:`~dpfc_native.plan` and :mod:`~dpfc_native.extract`).

Errors in the input (missing or malformed files, bad parameters, out of memory) print
one line, ``Error: ...``, and exit with status 2; no traceback (``dpfc --debug ...``
prints it).
"""

from __future__ import annotations

import contextvars
import functools
import math
import os
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

from ._methods import METHOD_TABLE
from ._optional import install_hint, safetensors_open
from ._progress import format_seconds

app = typer.Typer(
    name="dpfc",
    help="Differentially private image classification from features (dpfc_native).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        from . import __version__

        typer.echo(f"dpfc_native {__version__}")
        raise typer.Exit()


#: The methods of ``dpfc train``: the demo's (keys of dpfc_native.report.METHODS).
TRAIN_METHODS = tuple(METHOD_TABLE)

# Errors that mean "bad input": reported in one line, exit status 2. ArithmeticError
# covers OverflowError and ZeroDivisionError; MemoryError is an input too large.
_USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    IsADirectoryError,
    PermissionError,
    KeyError,
    RuntimeError,
    ImportError,
    OSError,
    ArithmeticError,
    MemoryError,
    zipfile.BadZipFile,
)

# Set by the --debug option: _fail also prints the traceback of the exception handled.
_DEBUG = False


@app.callback()
def _options(
    debug: bool = typer.Option(
        False, "--debug", help="On an error, also print the Python traceback."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
):
    """Differentially private image classification from features (dpfc_native)."""
    global _DEBUG
    _DEBUG = debug


#: The running command's options by Python parameter name (set by _user_errors).
_OPTIONS: contextvars.ContextVar = contextvars.ContextVar("dpfc_cli_options", default=())


def _option_words(text: str) -> str:
    """A Python argument named in ``text`` ("steps must be >= 1", "batch_size=0 ...") as
    the running command's option that sets it ("--steps must be >= 1"): every command
    speaks of its own options, whichever layer raised."""
    import re

    for name, flag in _OPTIONS.get():
        # Only a word that starts the message or follows a space or "(": never inside a
        # path or a value ("runs/steps=3/x.npz").
        text = re.sub(rf"(?<![^\s(]){name}(?= must| given| has|=)", flag, text)
    return text


def _fail(message: str, code: int = 2):
    if _DEBUG and sys.exc_info()[0] is not None:
        traceback.print_exc()
    typer.echo(f"Error: {_option_words(message)}", err=True)
    raise typer.Exit(code)


def _message(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, MemoryError):
        return f"out of memory{': ' + text if text else ''} (input too large for this machine?)"
    if isinstance(exc, (ValueError, TypeError, OSError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _user_errors(command):
    """Whatever user error escapes ``command`` becomes one line and exit status 2, in
    the words of the command's options (see :func:`_option_words`)."""
    import inspect

    options = {}
    for name, p in inspect.signature(command).parameters.items():
        longs = [d for d in getattr(p.default, "param_decls", None) or () if d.startswith("--")]
        # "labels" names data in every layer's messages (a shard's, y's), not --labels.
        if longs and name != "labels":
            options[name] = longs[0].split("/")[0]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        token = _OPTIONS.set(tuple(options.items()))
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except _USER_ERRORS as exc:
            _fail(_message(exc))
        finally:
            _OPTIONS.reset(token)

    return wrapper


def _writable_folder(folder: str, what: str) -> None:
    """A file can be created in ``folder`` or, where it is missing, in its nearest
    existing ancestor (the write makes the rest), or one line. Nothing is left behind: a
    command refused later (a missing input) must not leave new folders."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        if not os.path.isdir(probe):
            raise NotADirectoryError(f"{probe} is not a directory")
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".dpfc-write-test-"):
            pass
    except OSError as exc:
        _fail(f"cannot write {what}: {exc}")


def _output_path(path: Path, force: bool, suffix: str = ".npz", flag: str = "--output") -> str:
    """Check before any budget is spent (or any long run) that ``path`` can be written:
    refuse an existing file without ``force``, a directory, or a folder that cannot be
    created or written."""
    text = os.fspath(path)
    if not os.path.basename(text):
        _fail(f"{flag} must name a file, got {text!r}")
    if suffix and not text.lower().endswith(suffix):
        text += suffix
    if os.path.isdir(text):
        _fail(f"{flag} {text} is a directory")
    if os.path.exists(text) and not force:
        _fail(f"{flag} {text} exists; pass --force to overwrite it")
    from ._fileio import is_regular_or_new

    if not is_regular_or_new(text):
        return text  # a FIFO, /dev/stdout: written in place (see _fileio.atomic_write)
    # Where the write happens: beside the file a symlink points to.
    _writable_folder(os.path.dirname(os.path.realpath(text)), f"{flag} {text}")
    return text


def _output_dir(path: str, flag: str) -> None:
    """Check before any work that the directory ``path`` exists or can be made, and can
    be written."""
    if os.path.exists(path) and not os.path.isdir(path):
        _fail(f"{flag} {path} is a file, not a directory")
    _writable_folder(path, f"to {flag} {path}")


def _console():
    from rich.console import Console

    return Console(soft_wrap=True)


def _parse_param(text: str):
    """``key=value`` -> (key, value) with value as bool/None/int/float/list or str."""
    if "=" not in text:
        _fail(f"--param expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    key, raw = key.strip().replace("-", "_"), raw.strip()

    def scalar(v: str):
        low = v.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        try:
            return int(v)
        except ValueError:
            pass
        try:
            return float(v)
        except ValueError:
            return v

    if "," in raw:
        return key, [scalar(v.strip()) for v in raw.split(",") if v.strip()]
    return key, scalar(raw)


def _one_or_list(values):
    if not values:
        return None
    return values[0] if len(values) == 1 else list(values)


def _short_list(values) -> str:
    """A label set for one line: every label up to 8, else the first 3 and the last."""
    values = list(values)
    if all(isinstance(c, int) for c in values) and values == list(range(len(values))):
        return f"0..{len(values) - 1} (K={len(values)})"
    v = [str(c) for c in values]
    return "{" + ", ".join(v if len(v) <= 8 else v[:3] + ["...", v[-1]]) + f"}} (K={len(v)})"


def _load_labeled(path: Path, labels: Optional[Path], what: str, keys: tuple):
    """(features, labels as int64 or class-name strings) of one file, or a one-line error."""
    from . import data

    try:
        return data.read_labeled_arrays(
            path, labels_path=labels, features_key=keys[0], labels_key=keys[1]
        )
    except _USER_ERRORS as exc:
        _fail(f"cannot load {what} {path}: {_cli_message(_message(exc))}")


def _missing_chunks_option():
    return typer.Option(
        "error",
        "--missing-chunks",
        help="zarr shards lacking chunk files: error | fill (read them as the fill "
        "value, for stores written with write_empty_chunks=False, zarr 3's default).",
    )


def _is_shards(text: str) -> bool:
    """Whether a features argument names shards: a glob, a zarr store, a parquet file.
    An existing .npz, .npy or .safetensors file is a file, whatever its name holds
    ('test[0].npz' was read as a glob, its labels as class indices)."""
    if os.path.isfile(text) and text.lower().endswith((".npz", ".npy", ".safetensors")):
        return False
    return (
        any(c in text for c in "*?[")
        or text.rstrip("/").endswith(".zarr")
        or text.lower().endswith(".parquet")
    )


def _open_shards(pattern: str, num_classes: Optional[int], missing_chunks: str = "error"):
    """A ShardedFeatures for a glob, a directory of shards or one shard, or a one-line error."""
    from .shards import open_sharded

    target = pattern
    if os.path.isdir(pattern) and not pattern.rstrip("/").endswith(".zarr"):
        target = os.path.join(pattern, "*")
    try:
        return open_sharded(target, num_classes=num_classes, missing_chunks=missing_chunks)
    except _USER_ERRORS as exc:
        _fail(f"cannot open shards {pattern}: {_message(exc)}")


class _LeafLines:
    """Progress over leaves as plain lines on stderr: one per finished pass, and one every
    ``interval`` seconds during a long pass."""

    def __init__(self, interval: float = 5.0):
        self.interval, self.passes, self._last = float(interval), 0, time.monotonic()

    def __call__(self, done: int, total: int, what: str) -> None:
        now = time.monotonic()
        if done >= total:
            self.passes += 1
        elif now - self._last < self.interval:
            return
        self._last = now
        status = "done" if done >= total else f"{100.0 * done / total:.0f}%"
        print(
            f"pass {self.passes + (done < total)} ({what}): {done}/{total} leaves, {status}",
            file=sys.stderr,
            flush=True,
        )


def _dask_client(scheduler: Optional[str], workers: Optional[int]):
    """(client, cluster) for --scheduler / --workers, or (None, None)."""
    if scheduler is None and workers is None:
        return None, None
    if scheduler is not None and workers is not None:
        _fail("give --scheduler or --workers, not both")
    try:
        import distributed
    except ImportError:
        _fail(f"--scheduler / --workers need the Dask extra: {install_hint('distributed')}")
    if workers is not None:
        if workers < 1:
            _fail(f"--workers must be >= 1, got {workers}")
        import logging

        cluster = distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            # A task's error reaches the user as one line (below); the workers' own log
            # of it (ERROR, with the traceback) must not.
            silence_logs=logging.CRITICAL,
        )
        return distributed.Client(cluster), cluster
    try:
        return distributed.Client(scheduler, timeout="30s"), None
    except (OSError, TimeoutError) as exc:
        _fail(f"cannot connect to the Dask scheduler {scheduler}: {exc}")


def _class_set(classes: Optional[str], num_classes: Optional[int], y: np.ndarray):
    """The public label set from --classes / --num-classes, in the labels' type (or None)."""
    if classes is not None and num_classes is not None:
        _fail("give --classes or --num-classes, not both")
    numeric = y.dtype.kind != "U"
    if num_classes is not None:
        if num_classes < 2:
            _fail(f"--num-classes must be >= 2, got {num_classes}")
        if not numeric:
            _fail(
                "--num-classes names the labels 0..K-1, but the labels are class names: "
                "list them with --classes"
            )
        return list(range(num_classes))
    if classes is None:
        return None
    names = [c.strip() for c in classes.split(",") if c.strip()]
    if len(names) < 2:
        _fail(f"--classes must list at least 2 labels, comma-separated, got {classes!r}")
    if len(set(names)) != len(names):
        _fail(f"--classes has duplicates: {classes!r}")
    if not numeric:
        return names
    values = []
    for c in names:
        try:
            v = float(c)
        except ValueError:
            v = math.nan
        if not (math.isfinite(v) and v == round(v)):
            _fail(f"--classes entry {c!r} is not an integer, but the labels are integers")
        values.append(int(v))
    if len(set(values)) != len(values):
        _fail(f"--classes has duplicates: {classes!r}")
    return values


def _check_split(x, y, d: int, known, what: str, flag: str, where: str) -> None:
    """A --test / --val file that cannot be scored is an error before the fit, not after."""
    if x.shape[1] != d:
        _fail(f"{flag} {what} has {x.shape[1]} features per row but the training file has {d}")
    _check_label_set(
        y, known, f"{flag or 'the training'} labels", "the training labels", f"{where} ({what})"
    )


def _check_label_set(y, known, subject: str, kind_of: str, set_name: str) -> None:
    """``y`` (``subject``) must be labels of the kind of ``known`` (``kind_of``: integers
    or class names) and within it (``set_name``); the first stray label is named, never
    how many rows carry it (the size of a private class)."""
    kinds = ("integers", "class names")
    if (y.dtype.kind == "U") != (known.dtype.kind == "U"):
        _fail(
            f"{subject} are {kinds[y.dtype.kind == 'U']} but {kind_of} are "
            f"{kinds[known.dtype.kind == 'U']}"
        )
    unknown = ~np.isin(y, known)
    if unknown.any():
        _fail(f"{subject} include {y[np.argmax(unknown)].item()!r}, which is not in {set_name}")


#: Python names in the estimators' messages -> the CLI options that set them.
_CLI_WORDS = (
    (r"\bpass labels_path\b", "give a labels file"),
    (r"\blabels_path\b", "a separate labels file"),
    (r"fit\(\.\.\., X_val=\.\.\., y_val=\.\.\.\)", "--val"),
    (r"\bX_val and y_val\b", "--val features and labels"),
    (r"\by_val\b", "--val labels"),
    (r"\bX_val\b", "--val"),
    (
        r"(?<![\w-])(grad_clip_norm|clip_norm|epsilon|delta|reg|lr|steps)(?= must| given| has)",
        lambda m: "--" + m.group(1).replace("_", "-"),
    ),
    (r"(?<![\w-])classes must", "--classes must"),
    (r"labels not in classes_", "labels not in the label set"),
    (r"labels not in classes\b", "labels not in --classes"),
    (r"\by contains", "the training labels contain"),
    (
        r"\by has a single label and no `classes` was given",
        "the training labels have a single label and no --classes or --num-classes was given",
    ),
    (r"\bX has\b", "the features have"),
)


_CLI_PRIVACY_WORDS = (
    (r"^\w+: classes=None, so", "no --classes or --num-classes, so"),
    (r" \(np\.unique\(y\)\)", ""),
    (
        r"Pass the public label set as classes=\.",
        "Name the public label set with --classes or --num-classes.",
    ),
    (r"^\w+: random_state=(\S+) fixes", r"--seed \1 fixes"),
    (r"Use random_state=None \(fresh OS entropy\)", "Leave out --seed (fresh OS entropy)"),
    (r"^delta=(\S+) exceeds", r"--delta \1 exceeds"),
    (r"use delta well below", "use --delta well below"),
)


def _fit_showing_privacy_warnings(est, console, *args, **kwargs):
    """``est.fit`` with its PrivacyWarnings printed in the command line's words (options,
    not Python arguments) instead of Python's file:line form; other warnings pass on."""
    import re
    import warnings

    from . import PrivacyWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PrivacyWarning)
        est.fit(*args, **kwargs)
    for w in caught:
        if not issubclass(w.category, PrivacyWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        text = str(w.message)
        for pattern, repl in _CLI_PRIVACY_WORDS:
            text = re.sub(pattern, repl, text)
        console.print(f"privacy warning: {text}", highlight=False, markup=False)


def _cli_message(text: str) -> str:
    """An estimator's error in the words of the command line."""
    import re

    for pattern, repl in _CLI_WORDS:
        text = re.sub(pattern, repl, text)
    return text


@app.command()
@_user_errors
def train(
    features: Path = typer.Argument(
        ...,
        help="Private training features: .npz (features, "
        "labels), .npy (+ --labels or <stem>.labels.npy) or "
        ".safetensors; or shards: a quoted glob such as "
        '"shards/*.npy", a .zarr store or a .parquet file '
        "(see dpfc_native.shards), read a leaf at a time.",
    ),
    labels: Optional[Path] = typer.Option(
        None, "--labels", help="Labels .npy for a .npy features file."
    ),
    test: Optional[Path] = typer.Option(None, "--test", help="Test features (same formats)."),
    test_labels: Optional[Path] = typer.Option(None, "--test-labels"),
    val: Optional[Path] = typer.Option(
        None,
        "--val",
        help="PUBLIC validation features, for sweeps over --reg/--lr lists (post-processing).",
    ),
    val_labels: Optional[Path] = typer.Option(None, "--val-labels"),
    features_key: str = typer.Option(
        "features",
        "--features-key",
        help="Name of the features array in .npz / .safetensors files.",
    ),
    labels_key: str = typer.Option(
        "labels",
        "--labels-key",
        help="Name of the labels array "
        "in .npz / .safetensors files (integers, float-coded "
        "integers or class names).",
    ),
    method: str = typer.Option("fc", "--method", "-m", help=" | ".join(TRAIN_METHODS)),
    epsilon: float = typer.Option(
        1.0, "--epsilon", "-e", help="Target epsilon ('inf': non-private counterpart)."
    ),
    delta: Optional[float] = typer.Option(
        None, "--delta", help="Target delta (default min(1e-5, 1/n))."
    ),
    clip_norm: float = typer.Option(1.0, "--clip-norm", help="Feature clip C."),
    normalize: bool = typer.Option(
        True, "--normalize/--no-normalize", help="Scale every example to unit norm first (free)."
    ),
    reg: Optional[List[float]] = typer.Option(
        None, "--reg", help="Ridge; repeat for a sweep on --val."
    ),
    lr: Optional[List[float]] = typer.Option(
        None, "--lr", help="Learning rate (newton, fc, sgd); repeat for a sweep on --val."
    ),
    steps: Optional[int] = typer.Option(None, "--steps", help="Steps (newton, fc, sgd)."),
    grad_clip_norm: Optional[float] = typer.Option(
        None, "--grad-clip-norm", help="Gradient clip C_g (fc, sgd)."
    ),
    classes: Optional[str] = typer.Option(
        None,
        "--classes",
        help="The public label set, "
        "comma-separated (e.g. 1,2,3 for labels that are "
        "not 0-based, or cat,dog,ship for class names). "
        "Default: the labels that occur, which the "
        "guarantee does not cover.",
    ),
    num_classes: Optional[int] = typer.Option(
        None, "--num-classes", help="Public label set 0..K-1 (integer labels; see --classes)."
    ),
    param: Optional[List[str]] = typer.Option(
        None,
        "--param",
        "-p",
        help="Any other "
        "estimator parameter, KEY=VALUE (repeatable), "
        "e.g. -p covariance_share=0.3 -p optimizer=adam.",
    ),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="Reproducible noise (experiments only; default: OS entropy)."
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    output: Path = typer.Option(
        Path("model.npz"),
        "--output",
        "-o",
        help="Where to save the model (.npz; see dpfc_native.model_io for the format).",
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --output."),
    scheduler: Optional[str] = typer.Option(
        None,
        "--scheduler",
        help="Dask scheduler address "
        "(tcp://host:8786): the statistics are computed "
        "on that cluster; noise is added here.",
    ),
    workers: Optional[int] = typer.Option(
        None,
        "--workers",
        help="Start a local Dask cluster of N worker processes for the statistics.",
    ),
    missing_chunks: str = _missing_chunks_option(),
):
    """Train one DP classifier on a features file (or shards); print accuracy, time and the
    ledger."""
    from . import report

    if method not in TRAIN_METHODS:
        _fail(f"--method must be one of {', '.join(TRAIN_METHODS)}, got {method!r}")
    if val is None and val_labels is not None:
        _fail("--val-labels needs --val")
    if test is None and test_labels is not None:
        _fail("--test-labels needs --test")
    swept = [flag for flag, values in (("--reg", reg), ("--lr", lr)) if values and len(values) > 1]
    if swept and val is None:
        _fail(
            f"{' and '.join(swept)} given more than once is a sweep: it needs a public "
            "validation split (--val)"
        )
    # Before anything is spent: a failed write after the fit would make a rerun pay twice.
    output = _output_path(output, force)
    console = _console()
    keys = (features_key, labels_key)
    text = str(features)
    # Shards: a glob, a zarr directory, a parquet file (read only as a shard), or any path
    # with --scheduler / --workers (a directory is then read as all the shards in it).
    sharded = _is_shards(text) or scheduler is not None or workers is not None
    if sharded:
        # Shards carry class indices: --classes names them, --num-classes counts them.
        x, y = _open_shards(text, num_classes, missing_chunks), None
        names = [c.strip() for c in (classes or "").split(",") if c.strip()]
        numeric = all(c.lstrip("-").isdigit() for c in names)
        class_set = _class_set(classes, num_classes, np.zeros(0, np.int64 if numeric else "U1"))
        known = np.arange(x.num_classes) if class_set is None else np.asarray(class_set)
        if class_set is not None and len(class_set) < x.num_classes:
            _fail(
                f"the shards' labels index {x.num_classes} classes but --classes lists "
                f"{len(class_set)}"
            )
    else:
        x, y = _load_labeled(features, labels, "features", keys)
        class_set = _class_set(classes, num_classes, y)
        known = np.unique(y) if class_set is None else np.asarray(class_set)
    where = "the training labels" if class_set is None else "--classes"
    if class_set is not None and not sharded:
        _check_split(x, y, x.shape[1], known, f"{features}", "", where)
    test_set = val_set = None
    if test is not None:
        test_set = _load_labeled(test, test_labels, "--test file", keys)
        _check_split(*test_set, x.shape[1], known, f"{test}", "--test", where)
    if val is not None:
        val_set = _load_labeled(val, val_labels, "--val file", keys)
        _check_split(*val_set, x.shape[1], known, f"{val}", "--val", where)
    # Progress on stderr: a bar on a terminal, a plain line every few seconds in logs.
    overrides = {"clip_norm": clip_norm, "normalize": normalize, "device": device, "verbose": 1}
    if delta is not None:
        overrides["delta"] = delta
    if reg:
        overrides["reg"] = _one_or_list(reg)
    if lr:
        overrides["lr"] = _one_or_list(lr)
    if steps is not None:
        overrides["steps"] = steps
    if grad_clip_norm is not None:
        overrides["grad_clip_norm"] = grad_clip_norm
    if class_set is not None:
        overrides["classes"] = class_set
    options = set(overrides)  # set by their own options (named so in errors)
    for text in param or []:
        key, value = _parse_param(text)
        overrides[key] = value
        options.discard(key)
    known_params = report.make_estimator(method, epsilon).get_params()
    unknown = sorted(set(overrides) - set(known_params))
    if unknown:
        flag = (
            f"--{unknown[0].replace('_', '-')}"
            if unknown[0] in options
            else f"--param {unknown[0]}"
        )
        _fail(
            f"{flag}: not a parameter of {report.METHODS[method][0]} "
            f"(known: {', '.join(sorted(known_params))})"
        )
    try:
        est = report.make_estimator(method, epsilon, seed=seed)
        est.set_params(**overrides)
    except _USER_ERRORS as exc:
        _fail(_cli_message(_message(exc)))
    # Public facts only: n, d, dtype and the label set when it is given (never counts).
    console.print(
        f"[bold]dpfc train[/bold] {report.METHODS[method][0]} on {features.name}: "
        f"n={x.shape[0]}, d={x.shape[1]}, {x.dtype}"
        + (f", label set {_short_list(class_set)} (public)" if class_set is not None else ""),
        highlight=False,
    )
    if class_set is None:
        console.print(
            f"label set: the {len(known)} labels that occur in {features.name} (which "
            "labels occur is NOT covered by the guarantee: name them with --classes "
            "or --num-classes)",
            highlight=False,
        )
    fit_args = {} if val_set is None else {"X_val": val_set[0], "y_val": val_set[1]}
    client, cluster = _dask_client(scheduler, workers)
    if sharded:
        from . import _fitstats

        fit_args["client"] = client if client is not None else False
        where_run = (
            "this process"
            if client is None
            else f"{len(client.scheduler_info().get('workers', {}))} Dask worker(s)"
        )
        console.print(
            f"{len(x.shard_rows)} shard(s), statistics on {where_run}; noise added here",
            highlight=False,
        )
        leaf_lines = _fitstats.leaf_progress(_LeafLines())
    else:
        import contextlib

        leaf_lines = contextlib.nullcontext()
    t0 = time.perf_counter()
    try:
        with leaf_lines:
            _fit_showing_privacy_warnings(est, console, x, y, **fit_args)
    except _USER_ERRORS as exc:
        _fail(_cli_message(_message(exc)))
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    seconds = time.perf_counter() - t0
    if test_set is not None:
        try:
            acc = est.score(*test_set)
        except _USER_ERRORS as exc:
            _fail(f"--test: {_cli_message(_message(exc))}")
        console.print(f"test accuracy: [bold]{acc:.4f}[/bold] ({test_set[0].shape[0]} examples)")
    elif not sharded:
        acc = est.score(x, y)
        console.print(
            f"training accuracy: {acc:.4f} (on the private training data: this number "
            "is NOT covered by the privacy guarantee; pass --test)"
        )
    else:
        acc = None
    console.print(f"fit time: {seconds:.2f} s on {est.device_}")
    if getattr(est, "sweep_results_", None):
        console.print(
            f"sweep on the public validation split: reg_={getattr(est, 'reg_', None)}"
            f", lr_={getattr(est, 'lr_', None)}"
        )
    console.print("privacy ledger:")
    console.print(str(est.privacy_), highlight=False, markup=False)
    try:
        path = save_model(est, output, method)
    except OSError as exc:
        _fail(f"cannot write {output}: {exc}")
    console.print(f"model saved to {path}")


def save_model(est, path, method: str = "") -> str:
    """Save a fitted estimator in the model format (:func:`dpfc_native.model_io.save_model`:
    only what the guarantee covers; never the seed)."""
    from .model_io import save_model as _save

    return _save(est, path, method)


def _has_labels(text: str) -> bool:
    """Whether a features file carries labels (its own array, or a .npy's labels file)."""
    from . import data

    lower = text.lower()
    if lower.endswith(".npy"):
        sibling = data._sibling_labels_path(text)
        return sibling is not None and os.path.exists(sibling)
    if lower.endswith(".npz"):
        data._check_npz_members(text, ("features",))
        with zipfile.ZipFile(text) as zf:
            return "labels.npy" in zf.namelist()
    if lower.endswith(".safetensors"):
        with safetensors_open(text) as f:
            return "labels" in f.keys()
    return True  # an unknown format: the labelled reader names the problem


def _load_unlabelled(path: Path):
    """(features, labels or None) of a features file whose labels are optional: labels of
    every kind ``train`` reads (integers, float-coded integers, class names)."""
    from . import data

    text = os.fspath(path)
    if _has_labels(text):
        return data.read_labeled_arrays(text)
    if text.lower().endswith(".npy"):
        return data._load_npy(text, True, "features"), None
    if text.lower().endswith(".safetensors"):
        with safetensors_open(text) as f:
            if "features" not in f.keys():
                raise ValueError(f"{text} has no tensor 'features' (tensors: {sorted(f.keys())})")
            return f.get_tensor("features"), None
    with np.load(text, allow_pickle=False) as z:
        return z["features"], None


@app.command()
@_user_errors
def predict(
    model: Path = typer.Argument(..., help="A model written by dpfc train / model.save()."),
    features: Path = typer.Argument(
        ...,
        help="Features to classify: .npz ('features', optional 'labels'), .npy or "
        ".safetensors (read as a file whatever its name holds); or shards (a glob, a "
        "directory, a .zarr store, a .parquet file; their labels index the model's "
        "classes), read a block of rows at a time.",
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Write the predicted labels here (.npy)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --output."),
    missing_chunks: str = _missing_chunks_option(),
):
    """Predict labels with a saved model (and print the accuracy when labels are given)."""
    from .model_io import load_model

    out = _output_path(output, force, ".npy") if output is not None else None
    try:
        est = load_model(model)
    except _USER_ERRORS as exc:
        _fail(_message(exc))  # "cannot read model PATH: why" or "model file not found"
    if _is_shards(os.fspath(features)) or os.path.isdir(features):
        return _predict_shards(est, os.fspath(features), out, missing_chunks)
    try:
        X, y = _load_unlabelled(features)
    except _USER_ERRORS as exc:
        _fail(f"cannot load features {features}: {_cli_message(_message(exc))}")
    if X.ndim != 2:
        _fail(f"{features} must hold a 2-D array of feature rows, got shape {X.shape}")
    if X.shape[1] != est.n_features_in_:
        _fail(
            f"{features} has {X.shape[1]} features per row, the model expects {est.n_features_in_}"
        )
    if y is not None:
        classes = np.asarray(est.classes_)
        _check_label_set(
            y,
            classes,
            f"the labels of {features}",
            "the model's classes",
            f"the model's classes {_short_list(classes.tolist())}",
        )
    pred = est.predict(X)
    typer.echo(
        f"predicted {pred.shape[0]} rows with {type(est).__name__} "
        f"(epsilon = {est.privacy_.epsilon:.6g})"
    )
    if y is not None:
        typer.echo(f"accuracy: {float(np.mean(pred == y)):.4f}")
    if out is not None:
        _write_predictions(out, _label_dtype(pred, out), len(pred), [pred])
        typer.echo(f"predictions saved to {out}")


def _npy_header_bytes(dtype: np.dtype, n: int) -> bytes:
    """The .npy header of a 1-D array of ``n`` ``dtype`` items (what np.save writes)."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)}
    )
    return buf.getvalue()


def _label_dtype(classes: np.ndarray, out: str) -> np.dtype:
    """The dtype predictions of ``classes`` are written in: an object array of labels of
    one kind (a model can hold str, int, float or bool labels so) as its plain dtype,
    since a .npy holds objects only as a pickle, which np.load refuses by default."""
    if not classes.dtype.hasobject:
        return classes.dtype
    plain = np.array(classes.tolist()).dtype
    if plain.hasobject:
        _fail(f"cannot write {out}: the model's labels have no plain NumPy dtype")
    return plain


def _write_predictions(out: str, dtype: np.dtype, n: int, blocks) -> None:
    """Write the labels of ``blocks`` (an iterable of 1-D arrays, ``n`` items in all) to
    ``out`` as one .npy of ``dtype``, a block at a time, replacing ``out`` only once all
    are written."""
    from ._fileio import atomic_write

    try:
        with atomic_write(out, binary=True) as f:
            f.write(_npy_header_bytes(dtype, n))
            for block in blocks:
                # ndarray.tofile / np.save to a file do not report a short write.
                f.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
    except OSError as exc:
        _fail(f"cannot write {out}: {exc}")


def _predict_shards(est, pattern: str, out: Optional[str], missing_chunks: str) -> None:
    """``dpfc predict`` over shards: a block of rows at a time (memory bounded by the
    block, whatever the number of rows), the accuracy against the shards' labels (class
    indices into the model's classes), the labels streamed to ``out``."""
    from . import models
    from ._progress import progress

    classes = np.asarray(est.classes_)
    # Labels beyond the model's classes are refused when the shards are opened.
    sf = _open_shards(pattern, len(classes), missing_chunks)
    if sf.n_features != est.n_features_in_:
        _fail(
            f"{pattern} has {sf.n_features} features per row, the model expects "
            f"{est.n_features_in_}"
        )
    step = max(1, models._CHUNK_ELEMENTS // max(1, sf.n_features))
    correct = [0]

    def blocks(bar):
        for i, shard in enumerate(sf.shards):
            for start in range(0, shard.rows, step):
                x, y = sf.read(i, start, min(shard.rows, start + step))
                if x.dtype not in (np.float32, np.float64):
                    x = x.astype(np.float64)  # float16 / bfloat16 widen exactly
                pred = est.predict(x)
                correct[0] += int(np.count_nonzero(pred == classes[y]))
                bar.advance(n=len(y))
                yield pred

    with progress(sf.n_rows, "predict") as bar:
        try:
            if out is None:
                for _ in blocks(bar):
                    pass
            else:
                _write_predictions(out, _label_dtype(classes, out), sf.n_rows, blocks(bar))
        except _USER_ERRORS as exc:
            _fail(f"cannot predict on {pattern}: {_message(exc)}")
    typer.echo(
        f"predicted {sf.n_rows} rows of {len(sf.shards)} shard(s) with {type(est).__name__} "
        f"(epsilon = {est.privacy_.epsilon:.6g})"
    )
    typer.echo(f"accuracy: {correct[0] / max(1, sf.n_rows):.4f}")
    if out is not None:
        typer.echo(f"predictions saved to {out}")


@app.command()
@_user_errors
def demo(
    dataset: Optional[List[str]] = typer.Option(
        None,
        "--dataset",
        "-d",
        help="digits | "
        "cifar10 | cifar100 | imagenet (repeatable). "
        "Default: digits (about a minute on 2 CPU "
        "cores).",
    ),
    seeds: int = typer.Option(5, "--seeds", help="Noise seeds per cell (median reported)."),
    n: Optional[int] = typer.Option(
        None,
        "--n",
        help="Training rows of the synthetic datasets (default: the preset's) and of "
        "--features (default: all); digits is always used whole.",
    ),
    out: Path = typer.Option(Path("dpfc_demo_out"), "--out", help="Output directory."),
    epsilon: Optional[List[float]] = typer.Option(
        None, "--epsilon", "-e", help="Epsilons (repeatable; default 0.1 0.5 1 2 8 inf)."
    ),
    method: Optional[List[str]] = typer.Option(
        None,
        "--method",
        "-m",
        help="Methods: "
        f"{' | '.join(TRAIN_METHODS)} "
        "(repeatable). Default: all; from K = 50 "
        "classes on, newton, ls-per-class and adam "
        "are left out and sgd runs 30 steps.",
    ),
    features: Optional[Path] = typer.Option(
        None,
        "--features",
        help="A PUBLIC features "
        "file standing in for the private data (split "
        "75/25; --n draws that many training rows): "
        "its privacy-utility curve.",
    ),
):
    """Every method on embedded data at eps in {0.1, 0.5, 1, 2, 8} and non-private: a table
    and a privacy-utility plot (PNG + JSON + Markdown) in --out, written as the fits finish
    (a run stopped part-way keeps what finished). Nothing is downloaded."""
    from . import report
    from ._progress import progress

    datasets = list(dataset) if dataset else ([] if features is not None else ["digits"])
    # A repeated -e or -m would be pooled with its twin (one column, twice the fits).
    eps = tuple(dict.fromkeys(epsilon)) if epsilon else report.DEMO_EPSILONS
    methods = tuple(dict.fromkeys(method)) if method else None
    for ds in datasets:
        if ds not in report.DATASETS:
            _fail(f"--dataset must be one of {', '.join(report.DATASETS)}, got {ds!r}")
    for m in methods or ():
        if m not in report.METHODS:
            _fail(f"--method must be one of {', '.join(report.METHODS)}, got {m!r}")
    if seeds < 1:
        _fail(f"--seeds must be >= 1, got {seeds}")
    if n is not None and n < 10:
        _fail(f"--n must be >= 10, got {n}")
    if n is not None and features is None and all(ds == "digits" for ds in datasets):
        _fail("--n applies to the synthetic datasets and --features (digits is used whole)")
    if features is not None:
        _load_labeled(features, None, "--features", ("features", "labels"))  # fails here
        datasets.insert(0, os.fspath(features))
    for e in eps:
        if not e > 0:
            _fail(f"--epsilon must be > 0 (inf allowed), got {e}")
    out_dir = os.fspath(out)
    _output_dir(out_dir, "--out")  # before any fit: a failed write would waste the run
    console = _console()
    t0 = time.perf_counter()
    results: list = []
    console.print(f"results are written to {out_dir}/ as they are computed")
    for ds in datasets:
        size = n if ds != "digits" else None
        try:
            loaded = report.load_dataset(ds, size)
        except _USER_ERRORS as exc:
            _fail(str(exc))
        train_set = loaded[0]
        ms = methods or report.default_methods(train_set.num_classes)
        left_out = [m for m in report.METHODS if m not in ms]
        if methods is None and left_out:
            console.print(
                f"{ds}: {', '.join(left_out)} left out at K = {train_set.num_classes} "
                "(cost grows with K; see dpfc_native.report.LARGE_K); name them "
                "with -m to include them"
            )
        for m in ms:
            if report.demo_overrides(m, train_set.num_classes):
                console.print(
                    f"{ds}: {report.METHODS[m][0]} with "
                    f"{report.demo_overrides(m, train_set.num_classes)} at this K"
                )
        fits = len(ms) * len(eps) * seeds
        console.print(f"{ds}: timing pilot fits of {', '.join(ms)} for the estimate ...")
        estimate = report.estimate_seconds(
            train_set.n, train_set.d, train_set.num_classes, ms, len(eps) * seeds
        )
        console.print(
            f"{ds}: n={train_set.n}, d={train_set.d}, K={train_set.num_classes}; "
            f"{fits} fits ({', '.join(ms)}), estimated {format_seconds(estimate, sep=' ')} "
            "(rough: from two pilot fits per method)"
        )
        per_method = len(eps) * seeds
        done = [0]

        def on_result(res, done=done, per_method=per_method):
            done[0] += 1
            try:  # the plot only when a method's row is complete (it takes ~0.5 s)
                report.write_outputs(results + [res], out_dir, plot=done[0] % per_method == 0)
            except OSError as exc:
                _fail(f"cannot write to {out}: {exc}")

        with progress(fits, ds) as bar:

            def on_fit(m, e, s, dt, bar=bar):
                bar.advance(f"{report.METHODS[m][0]} eps={e:g} seed={s} ({dt:.1f} s)")

            try:
                res = report.run_demo(
                    ds,
                    seeds=seeds,
                    n=size,
                    epsilons=eps,
                    methods=ms,
                    on_fit=on_fit,
                    on_result=on_result,
                    loaded=loaded,
                )
            except (typer.Exit, typer.Abort):
                raise
            except _USER_ERRORS as exc:
                _fail(str(exc))
        results.append(res)
        console.print(report.results_table(res))
    try:
        paths = report.write_outputs(results, out_dir)
    except OSError as exc:
        _fail(f"cannot write to {out}: {exc}")
    console.print(f"privacy ledgers (per method and epsilon) and accuracies: {paths['json']}")
    console.print(f"privacy-utility plot: {paths['png']}")
    console.print(f"total time: {time.perf_counter() - t0:.1f} s")


def _register_plugins() -> None:
    import importlib

    # Commands that live in their own modules (each optional: a missing one is skipped).
    for name in ("audit", "plan", "extract"):
        try:
            module = importlib.import_module(f".{name}", __package__)
        except ImportError:
            continue
        module.register_cli(app)


_register_plugins()


def main() -> None:
    """Entry point of the ``dpfc`` script and of ``python -m dpfc_native``.

    Usage errors that the argument parser itself finds (a value that is not a number, an
    unknown option or command) are one line and exit status 2, like the commands' own
    (the parser's default is a usage block and a boxed panel)."""
    try:  # Typer >= 0.20 parses with its own copy of click; older ones with click
        from typer._click import exceptions as click_exceptions
    except ImportError:  # pragma: no cover - the older Typers
        from click import exceptions as click_exceptions
    try:
        code = app(prog_name="dpfc", standalone_mode=False)
    except click_exceptions.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # plain `dpfc`: the help, as before
            exc.show()
            sys.exit(exc.exit_code)
        typer.echo(f"Error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(2)
    except (typer.Abort, getattr(click_exceptions, "Abort", typer.Abort)):  # Ctrl-C
        typer.echo("Aborted.", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
