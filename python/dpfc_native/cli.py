"""The ``dpfc`` command line: ``dpfc train``, ``dpfc demo`` (and ``dpfc audit``).

``python -m dpfc_native`` is the same program. The typer application object is
:data:`app`; other modules add commands to it (``dpfc_native.audit.register_cli(app)``
is called here when that module is present).

Errors in the input (missing or malformed files, bad parameters, out of memory) print
one line, ``Error: ...``, and exit with status 2; no traceback (``dpfc --debug ...``
prints it).
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

app = typer.Typer(
    name="dpfc",
    help="Differentially private image classification from features (dpfc_native).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: CLI method name -> key of dpfc_native.report.METHODS
TRAIN_METHODS = ("ls", "ls-per-class", "newton", "fc", "sgd", "adam")

# Errors that mean "bad input": reported in one line, exit status 2. ArithmeticError
# covers OverflowError and ZeroDivisionError; MemoryError is an input too large.
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError,
                KeyError, RuntimeError, ImportError, OSError, ArithmeticError, MemoryError)

# Set by the --debug option: _fail also prints the traceback of the exception handled.
_DEBUG = False


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="On an error, also print "
                                        "the Python traceback.")):
    """Differentially private image classification from features (dpfc_native)."""
    global _DEBUG
    _DEBUG = debug


def _fail(message: str, code: int = 2):
    if _DEBUG and sys.exc_info()[0] is not None:
        traceback.print_exc()
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def _message(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, MemoryError):
        return f"out of memory{': ' + text if text else ''} (input too large for this machine?)"
    if isinstance(exc, (ValueError, TypeError, OSError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _user_errors(command):
    """Whatever user error escapes ``command`` becomes one line and exit status 2."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except _USER_ERRORS as exc:
            _fail(_message(exc))

    return wrapper


def _output_path(path: Path, force: bool, suffix: str = ".npz") -> str:
    """Check before any budget is spent that ``path`` can be written: refuse an existing
    file without ``force``, a directory, or a folder that cannot be created or written."""
    text = os.fspath(path)
    if suffix and not text.endswith(suffix):
        text += suffix
    if os.path.isdir(text):
        _fail(f"--output {text} is a directory")
    if os.path.exists(text) and not force:
        _fail(f"--output {text} exists; pass --force to overwrite it")
    folder = os.path.dirname(os.path.abspath(text))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dpfc-write-test-"):
            pass
    except OSError as exc:
        _fail(f"cannot write --output {text}: {exc}")
    return text


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


def _load(path: Path, labels: Optional[Path], what: str, num_classes: Optional[int] = None):
    from . import data

    try:
        return data.load_features(path, labels_path=labels, num_classes=num_classes)
    except _USER_ERRORS as exc:
        _fail(f"cannot load {what} {path}: {_message(exc)}")


def _summary(fs, num_classes: Optional[int]) -> str:
    """What the CLI prints about the private training set: public facts only."""
    labels = (f"label set 0..{num_classes - 1} (--num-classes)" if num_classes is not None
              else "label set inferred from the private labels (not covered; pass "
                   "--num-classes)")
    return f"{os.path.basename(fs.name) or 'features'}: n={fs.n}, d={fs.d}, {fs.dtype}, {labels}"


@app.command()
@_user_errors
def train(
    features: Path = typer.Argument(..., help="Private training features: .npz (features, "
                                    "labels), .npy (+ --labels or <stem>.labels.npy) or "
                                    ".safetensors."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels .npy for a .npy "
                                          "features file."),
    test: Optional[Path] = typer.Option(None, "--test", help="Test features (same formats)."),
    test_labels: Optional[Path] = typer.Option(None, "--test-labels"),
    val: Optional[Path] = typer.Option(None, "--val", help="PUBLIC validation features, for "
                                       "sweeps over --reg/--lr lists (post-processing)."),
    val_labels: Optional[Path] = typer.Option(None, "--val-labels"),
    method: str = typer.Option("fc", "--method", "-m",
                               help="ls | ls-per-class | newton | fc | sgd | adam"),
    epsilon: float = typer.Option(1.0, "--epsilon", "-e", help="Target epsilon ('inf': "
                                  "non-private counterpart)."),
    delta: Optional[float] = typer.Option(None, "--delta", help="Target delta (default "
                                          "min(1e-5, 1/n))."),
    clip_norm: float = typer.Option(1.0, "--clip-norm", help="Feature clip C."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize",
                                   help="Scale every example to unit norm first (free)."),
    reg: Optional[List[float]] = typer.Option(None, "--reg", help="Ridge; repeat for a sweep "
                                              "on --val."),
    lr: Optional[List[float]] = typer.Option(None, "--lr", help="Learning rate (newton, fc, "
                                             "sgd); repeat for a sweep on --val."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Steps (newton, fc, sgd)."),
    grad_clip_norm: Optional[float] = typer.Option(None, "--grad-clip-norm",
                                                   help="Gradient clip C_g (fc, sgd)."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Public label set "
                                              "0..K-1 (default: the labels that occur, which "
                                              "the guarantee does not cover)."),
    param: Optional[List[str]] = typer.Option(None, "--param", "-p", help="Any other "
                                              "estimator parameter, KEY=VALUE (repeatable), "
                                              "e.g. -p covariance_share=0.3 -p optimizer=adam."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Reproducible noise (experiments "
                                       "only; default: OS entropy)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    output: Path = typer.Option(Path("model.npz"), "--output", "-o", help="Where to save the "
                                "model (.npz; see dpfc_native.model_io for the format)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --output."),
):
    """Train one DP classifier on a features file; print accuracy, time and the ledger."""
    from . import report

    if method not in TRAIN_METHODS:
        _fail(f"--method must be one of {', '.join(TRAIN_METHODS)}, got {method!r}")
    if val is None and val_labels is not None:
        _fail("--val-labels needs --val")
    # Before anything is spent: a failed write after the fit would make a rerun pay twice.
    output = _output_path(output, force)
    console = _console()
    train_set = _load(features, labels, "features", num_classes)
    test_set = _load(test, test_labels, "test features") if test is not None else None
    val_set = _load(val, val_labels, "validation features") if val is not None else None
    iterative = method not in ("ls", "ls-per-class")
    overrides = {"clip_norm": clip_norm, "normalize": normalize, "device": device,
                 "verbose": int(iterative)}  # iterative methods show a bar over their steps
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
    if num_classes is not None:
        overrides["classes"] = list(range(num_classes))
    for text in param or []:
        key, value = _parse_param(text)
        overrides[key] = value
    try:
        est = report.make_estimator(method, epsilon, seed=seed)
        est.set_params(**overrides)
    except _USER_ERRORS as exc:
        _fail(str(exc))
    console.print(f"[bold]dpfc train[/bold] {report.METHODS[method][0]} on "
                  f"{_summary(train_set, num_classes)}", highlight=False)
    fit_args = {} if val_set is None else {"X_val": val_set.features, "y_val": val_set.labels}
    t0 = time.perf_counter()
    try:
        if iterative:
            est.fit(train_set.features, train_set.labels, **fit_args)
        else:
            with console.status("statistics, noise, solve ..."):
                est.fit(train_set.features, train_set.labels, **fit_args)
    except _USER_ERRORS as exc:
        _fail(str(exc))
    seconds = time.perf_counter() - t0
    if test_set is not None:
        try:
            acc = est.score(test_set.features, test_set.labels)
        except _USER_ERRORS as exc:
            _fail(f"test set: {exc}")
        console.print(f"test accuracy: [bold]{acc:.4f}[/bold] ({test_set.n} examples)")
    else:
        acc = est.score(train_set.features, train_set.labels)
        console.print(f"training accuracy: {acc:.4f} (on the private training data: this number "
                      "is NOT covered by the privacy guarantee; pass --test)")
    console.print(f"fit time: {seconds:.2f} s on {est.device_}")
    if getattr(est, "sweep_results_", None):
        console.print(f"sweep on the public validation split: reg_={getattr(est, 'reg_', None)}"
                      f", lr_={getattr(est, 'lr_', None)}")
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


def _load_unlabelled(path: Path):
    """(features, labels or None) of a features file whose labels are optional."""
    from . import data

    text = os.fspath(path)
    lower = text.lower()
    try:
        return data.load_features(text), True
    except FileNotFoundError:
        raise
    except ValueError:
        if not lower.endswith((".npy", ".npz")):
            raise
    # No (valid) labels: the features alone.
    if lower.endswith(".npy"):
        return data._load_npy(text, True, "features"), False
    data._check_npz_members(text, ("features",))
    with np.load(text, allow_pickle=False) as z:
        if "features" not in z.files:
            raise ValueError(f"{text} has no array 'features' (arrays present: {sorted(z.files)})")
        return z["features"], False


@app.command()
@_user_errors
def predict(
    model: Path = typer.Argument(..., help="A model written by dpfc train / model.save()."),
    features: Path = typer.Argument(..., help="Features to classify: .npz ('features', "
                                    "optional 'labels'), .npy or .safetensors."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the predicted "
                                          "labels here (.npy)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --output."),
):
    """Predict labels with a saved model (and print the accuracy when labels are given)."""
    from .model_io import load_model

    out = _output_path(output, force, ".npy") if output is not None else None
    try:
        est = load_model(model)
    except _USER_ERRORS as exc:
        _fail(f"cannot load model {model}: {_message(exc)}")
    try:
        loaded, labelled = _load_unlabelled(features)
    except _USER_ERRORS as exc:
        _fail(f"cannot load features {features}: {_message(exc)}")
    X = loaded.features if labelled else loaded
    pred = est.predict(X)
    typer.echo(f"predicted {pred.shape[0]} rows with {type(est).__name__} "
               f"(epsilon = {est.privacy_.epsilon:.6g})")
    if labelled:
        typer.echo(f"accuracy: {float(np.mean(pred == loaded.labels)):.4f}")
    if out is not None:
        np.save(out, pred)
        typer.echo(f"predictions saved to {out}")


@app.command()
@_user_errors
def demo(
    dataset: Optional[List[str]] = typer.Option(None, "--dataset", "-d", help="digits | "
                                                "cifar10 | cifar100 | imagenet (repeatable). "
                                                "Default: digits (well under 3 minutes on 2 "
                                                "CPU cores)."),
    seeds: int = typer.Option(5, "--seeds", help="Noise seeds per cell (median reported)."),
    n: Optional[int] = typer.Option(None, "--n", help="Training rows of the synthetic "
                                    "datasets (default: the preset's)."),
    out: Path = typer.Option(Path("dpfc_demo_out"), "--out", help="Output directory."),
    epsilon: Optional[List[float]] = typer.Option(None, "--epsilon", "-e", help="Epsilons "
                                                  "(repeatable; default 0.1 0.5 1 2 8 inf)."),
    method: Optional[List[str]] = typer.Option(None, "--method", "-m", help="Methods "
                                               "(repeatable; default all)."),
):
    """Every method on embedded data at eps in {0.1, 0.5, 1, 2, 8} and non-private: a table
    and a privacy-utility plot (PNG + JSON) in --out. Nothing is downloaded."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import report

    datasets = list(dataset) if dataset else ["digits"]
    eps = tuple(epsilon) if epsilon else report.DEMO_EPSILONS
    methods = tuple(method) if method else tuple(report.METHODS)
    for ds in datasets:
        if ds not in report.DATASETS:
            _fail(f"--dataset must be one of {', '.join(report.DATASETS)}, got {ds!r}")
    for m in methods:
        if m not in report.METHODS:
            _fail(f"--method must be one of {', '.join(report.METHODS)}, got {m!r}")
    if seeds < 1:
        _fail(f"--seeds must be >= 1, got {seeds}")
    if n is not None and n < 10:
        _fail(f"--n must be >= 10, got {n}")
    for e in eps:
        if not e > 0:
            _fail(f"--epsilon must be > 0 (inf allowed), got {e}")
    console = _console()
    t0 = time.perf_counter()
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        for ds in datasets:
            size = n if ds != "digits" else None
            task = progress.add_task(f"{ds}: loading", total=len(methods) * len(eps) * seeds)

            def on_fit(m, e, s, dt, task=task, ds=ds):
                progress.update(task, advance=1, description=f"{ds}: {report.METHODS[m][0]} "
                                f"eps={e:g} seed={s}")

            try:
                res = report.run_demo(ds, seeds=seeds, n=size, epsilons=eps, methods=methods,
                                      on_fit=on_fit)
            except _USER_ERRORS as exc:
                _fail(str(exc))
            results.append(res)
            progress.remove_task(task)
            console.print(report.results_table(res))
    try:
        paths = report.write_outputs(results, os.fspath(out))
    except OSError as exc:
        _fail(f"cannot write to {out}: {exc}")
    console.print(f"privacy ledgers (per method and epsilon) and accuracies: {paths['json']}")
    console.print(f"privacy-utility plot: {paths['png']}")
    console.print(f"total time: {time.perf_counter() - t0:.1f} s")


def _register_plugins() -> None:
    try:
        from .audit import register_cli
    except ImportError:  # the audit module is optional
        return
    register_cli(app)


_register_plugins()


def main() -> None:
    """Entry point of the ``dpfc`` script and of ``python -m dpfc_native``."""
    app(prog_name="dpfc")


if __name__ == "__main__":  # pragma: no cover
    main()
