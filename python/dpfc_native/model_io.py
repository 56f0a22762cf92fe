"""Saving and loading fitted models: a documented ``.npz`` format, no pickle.

``est.save(path)`` (or :func:`save_model`) writes only what the privacy guarantee covers;
:func:`load_model` reads it back into a fitted estimator that predicts exactly as the
original. ``dpfc train --output`` writes this format and ``dpfc predict`` reads it.

Format (``format = "dpfc_native.model"``, ``format_version = 1``): a NumPy ``.npz`` (a zip
of ``.npy`` members, stored uncompressed, each name once, all plain numeric or unicode
arrays, read with ``allow_pickle=False``):

========================  ===================================================================
member                    content
========================  ===================================================================
``format``                ``"dpfc_native.model"``
``format_version``        ``1``
``estimator``             class name, e.g. ``"DPFCClassifier"``
``method``                the CLI method name (``"fc"``, ...) or ``""``
``coef``                  (K, d) float64 weights
``intercept``             (K,) float64
``classes``               (K,) the label set (numbers, or unicode strings)
``center``                (d,) float64 public center, or (0,) for none
``feature_names``         (d,) unicode column names, or (0,) for none
``params``                JSON: ``get_params()`` without ``random_state`` and with
                          ``budget`` as null, plus ``"noise_seeded"`` (bool)
``fitted``                JSON: ``n_features_in_``, ``clip_norm_``, ``normalize_``,
                          ``delta_``, ``noise_seeded_`` and the chosen hyper-parameters
                          (``reg_``, ``lr_``, ``alpha_``, ``bias_``, ``grad_clip_norm_``,
                          ``noise_multiplier_``, ``n_iter_``, ``loss_``) where the
                          method has them, and ``classes_object`` (true when the
                          labels were an object array, e.g. of strings: the loaded
                          ``classes_`` and predictions are object arrays too)
``ledger``                JSON: ``privacy_.to_dict()``
========================  ===================================================================

Never written: ``n_samples_``, ``diagnostics_``, ``fit_time_`` (computed from the private
data without noise), ``random_state`` (a seed regenerates the noise), ``stats_``,
``noise_key_fingerprint_``.

Loading checks every member (types, shapes, ranges; the parameters as ``fit`` checks
them; ``classes`` and ``center`` parameters against the arrays) and the ledger's totals
against its releases: an exact-GDP ledger must state the mu of its releases and the
epsilon of that mu; a subsampled one the epsilon its accountant gives (RDP exactly; PLD
to 1e-3 when dp_accounting is installed, else only never above the RDP bound); a private
selection at least one run's; a ledger without releases must be the non-private one, and
every release must carry noise (at most 64 releases are read). A file's ledger remains a
claim: nothing in a file can show that its weights came from the stated noise.
"""

from __future__ import annotations

import json
import lzma
import math
import os
import zipfile
import zlib

import numpy as np

from ._fileio import atomic_write

__all__ = ["FORMAT", "FORMAT_VERSION", "save_model", "load_model"]

FORMAT = "dpfc_native.model"
FORMAT_VERSION = 1

#: Fitted attributes written to ``fitted`` (those an estimator has).
_FITTED_PUBLIC = (
    "n_features_in_",
    "clip_norm_",
    "normalize_",
    "delta_",
    "noise_seeded_",
    "reg_",
    "lr_",
    "alpha_",
    "bias_",
    "grad_clip_norm_",
    "noise_multiplier_",
    "n_iter_",
    "loss_",
)
_MEMBERS = (
    "format",
    "format_version",
    "estimator",
    "method",
    "coef",
    "intercept",
    "classes",
    "center",
    "feature_names",
    "params",
    "fitted",
    "ledger",
)


def _json_value(value):
    """``value`` as strict JSON data: non-finite floats as the strings "inf", "-inf" and
    "nan" (JSON has no Infinity), NumPy scalars and arrays as Python ones."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, np.ndarray):
        return [_json_value(v) for v in value.tolist()]
    if isinstance(value, (list, tuple, range)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if value is None or isinstance(value, str):
        return value
    if hasattr(value, "__array__"):  # a pandas Index or Series, a CuPy array, ...
        return _json_value(np.asarray(value))
    return str(value)


def _object_classes(classes: np.ndarray) -> np.ndarray:
    """An object label array as the typed array that loads back as the same labels
    (``astype(object)`` gives Python str, bool, int or float): all strings, all bools, all
    integers within int64, or all floats (NumPy scalars count as their Python values).
    Anything else (ints mixed with floats, ints beyond int64, other objects) would come
    back as other labels, so it is refused."""
    # NumPy scalars inside the object array (np.int64, np.float32, np.str_, np.bool_)
    # compare equal to their Python values, which is what a loaded model returns.
    values = [c.item() if isinstance(c, np.generic) else c for c in classes.tolist()]
    if all(isinstance(c, str) for c in values):
        return np.array(values, dtype=str)
    if all(isinstance(c, bool) for c in values):
        return np.array(values, dtype=bool)
    if all(
        isinstance(c, int) and not isinstance(c, bool) and -(2**63) <= c < 2**63 for c in values
    ):
        return np.array(values, dtype=np.int64)
    if all(isinstance(c, float) for c in values):
        return np.array(values, dtype=np.float64)
    kinds = sorted({type(c).__name__ for c in classes.tolist()})
    raise ValueError(
        f"cannot save labels of kinds {kinds} in one object array (or integers beyond "
        "int64): they would load back as other labels; use strings, or integers, or floats"
    )


def save_model(est, path, method: str = "") -> str:
    """Write a fitted estimator in the format above; returns the path (``.npz`` added).

    Raises
    ------
    RuntimeError
        ``est`` is not fitted.
    OSError
        The file cannot be written.
    """
    if not hasattr(est, "coef_"):
        raise RuntimeError(f"this {type(est).__name__} is not fitted yet: call fit first")
    path = os.fspath(path)
    if not os.path.basename(path):
        raise ValueError(f"the model path must name a file, got {path!r}")
    if not path.lower().endswith(".npz"):
        path += ".npz"
    # A shared PrivacyBudget is a live object of this process, not a parameter of the
    # model: it is saved as None (the loaded model is not tied to any budget).
    params = {
        key: None if key == "budget" else _json_value(value)
        for key, value in est.get_params().items()
        if key != "random_state"
    }
    params["noise_seeded"] = bool(getattr(est, "noise_seeded_", False))
    fitted = {key: _json_value(getattr(est, key)) for key in _FITTED_PUBLIC if hasattr(est, key)}
    classes = np.asarray(est.classes_)
    if classes.dtype.kind == "O":
        fitted["classes_object"] = True
        classes = _object_classes(classes)
    if classes.dtype.kind not in "biuf":
        classes = classes.astype(str)
    names = getattr(est, "feature_names_in_", None)
    names = np.zeros(0, dtype=str) if names is None else np.asarray(names).astype(str)
    center = getattr(est, "center_", None)
    members = dict(
        format=np.array(FORMAT),
        format_version=np.array(FORMAT_VERSION),
        estimator=np.array(type(est).__name__),
        method=np.array(method),
        coef=np.asarray(est.coef_, dtype=np.float64),
        intercept=np.asarray(est.intercept_, dtype=np.float64),
        classes=classes,
        center=np.zeros(0) if center is None else np.asarray(center, np.float64),
        feature_names=names,
        params=np.array(json.dumps(params)),
        fitted=np.array(json.dumps(fitted)),
        ledger=np.array(json.dumps(est.privacy_.to_dict())),
    )
    # Whole or not at all: a failure (or Ctrl-C, a full disk) leaves the previous file.
    with atomic_write(path, binary=True) as f:
        np.savez(f, **members)
    return path


def _number(value, what: str, *, lo=None, hi=None, lo_open=False, none=False, inf=False):
    """A JSON number checked for type and range (a tampered field named in the error)."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not inf):
        raise ValueError(f"{what} must be finite, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{what} must be {'>' if lo_open else '>='} {lo:g}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{what} must be <= {hi:g}, got {value!r}")
    return value


def _close(a: float, b: float, rel: float = 1e-9) -> bool:
    """Both finite and within ``rel`` (an infinite side is never close: inf - inf passed
    every comparison, so a release of noise multiplier 1e-200 matched any stated mu)."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    return abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-300


def _ledger_from_dict(d):
    """The ledger a model file states, every field checked for type and range, and its
    totals against its releases: an exact-GDP ledger (``mu`` given) must have the mu of
    its releases and the epsilon of that mu at its delta; a subsampled one an epsilon
    no larger than the releases' RDP bound; a ledger without releases must be the
    non-private one. (A file's ledger is still only a claim: it cannot show that the
    weights came from the stated noise.)"""
    from . import accounting
    from .accounting import LedgerEntry, PrivacyLedger

    if not isinstance(d, dict) or not isinstance(d.get("releases"), list):
        raise ValueError("'ledger' must be a JSON object with a list of releases")
    if len(d["releases"]) > _MAX_RELEASES:
        # Each is composed to check the totals (a PLD takes ~0.1 s): a crafted list
        # of thousands took minutes to load.
        raise ValueError(
            f"the ledger lists {len(d['releases'])} releases, more than any fit makes "
            f"(at most {_MAX_RELEASES} are read)"
        )
    entries, events = [], []
    for i, r in enumerate(d["releases"]):
        where = f"ledger release {i}"
        if not isinstance(r, dict) or not isinstance(r.get("name"), str):
            raise ValueError(f"{where} must be an object with a name")
        sens = _number(r.get("sensitivity"), f"{where} sensitivity", lo=0, lo_open=True, none=True)
        std = _number(r.get("noise_std"), f"{where} noise_std", lo=0, none=True)
        z = _number(
            r.get("noise_multiplier"),
            f"{where} noise_multiplier",
            lo=0,
            lo_open=True,
            none=True,
            inf=True,
        )
        if z is None or math.isinf(z):
            # A release without noise: no fit makes one (its statistic would be public);
            # left out of the totals, it would hide whatever it released.
            raise ValueError(f"{where} has no noise (no finite noise multiplier)")
        count = r.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{where} count must be an integer >= 1, got {count!r}")
        q = _number(r.get("sample_rate"), f"{where} sample_rate", lo=0, lo_open=True, hi=1)
        share = _number(r.get("share"), f"{where} share", lo=0, hi=1 + 1e-9, none=True)
        if sens is not None and std is not None and not _close(std, sens * z):
            raise ValueError(f"{where}: noise_std {std!r} is not sensitivity x multiplier")
        entries.append(LedgerEntry(r["name"], sens, std, z, count, q, share))
        events.append(
            accounting.GaussianRelease(z, count=count)
            if q == 1.0
            else accounting.SubsampledGaussian(z, q, steps=count)
        )
    epsilon = _number(d.get("epsilon"), "ledger epsilon", lo=0, none=True, inf=True)
    epsilon = math.inf if epsilon is None else epsilon
    delta = _number(d.get("delta"), "ledger delta", lo=0, hi=1)
    if delta >= 1:
        raise ValueError(f"ledger delta must be < 1, got {delta!r}")
    mu = _number(d.get("mu"), "ledger mu", lo=0, none=True, inf=True)
    sampler = _number(d.get("sampler_delta", 0.0), "ledger sampler_delta", lo=0, hi=1)
    method, adjacency = d.get("method"), d.get("adjacency")
    if not isinstance(method, str) or adjacency != accounting.ADJACENCY:
        raise ValueError(f"ledger method must be text and adjacency {accounting.ADJACENCY!r}")
    if not events:
        if math.isfinite(epsilon):
            raise ValueError(f"the ledger states epsilon = {epsilon!r} but no noisy release")
        mu = math.inf  # the non-private ledger: to_dict writes its infinite mu as null
    elif delta == 0:
        raise ValueError("the ledger of a private model must have delta > 0")
    else:
        acct = accounting.PrivacyAccountant(method="rdp")
        for e in events:
            acct.compose(e)
        if acct.mu is not None and not math.isfinite(acct.mu):
            raise ValueError("the ledger's releases carry too little noise to account")
        if mu is not None:  # exact Gaussian DP: the totals follow from the releases
            if not acct.is_exact_gdp or not _close(mu, acct.mu):
                raise ValueError(f"the ledger's mu {mu!r} is not that of its releases")
            if not _close(epsilon, accounting.gdp_epsilon(acct.mu, delta)):
                raise ValueError(
                    f"the ledger's epsilon {epsilon!r} is not that of its releases "
                    f"({accounting.gdp_epsilon(acct.mu, delta)!r} at delta {delta!r})"
                )
        elif acct.is_exact_gdp:  # a selection over such runs: at least one run's cost
            if not method.startswith("private selection"):
                raise ValueError(
                    f"the ledger's method {method!r} gives no mu for Gaussian releases"
                )
            if epsilon < accounting.gdp_epsilon(acct.mu, delta) * (1 - 1e-9):
                raise ValueError(f"the ledger's epsilon {epsilon!r} is below its releases'")
        else:
            _check_subsampled_epsilon(events, epsilon, delta, method, acct)
    return PrivacyLedger(tuple(entries), epsilon, delta, mu, method, adjacency, sampler)


def _check_subsampled_epsilon(events, epsilon: float, delta: float, method: str, rdp) -> None:
    """A subsampled ledger's epsilon recomputed by the accountant its method names (RDP:
    to 1e-9; PLD: to 1e-3, as another dp_accounting version may round its grid
    otherwise), and never above the RDP bound; any other method is refused. Without
    dp_accounting a PLD ledger is held to the RDP bound only (an upper bound: an
    understated epsilon is then not detected)."""
    from . import accounting

    if not method.startswith(("RDP", "PLD")):
        raise ValueError(f"the ledger's method {method!r} is not an accountant of this package")
    bound = rdp.get_epsilon_and_method(delta)[0]
    if not math.isfinite(bound):
        raise ValueError("the ledger's releases carry too little noise to account")
    # 0 is possible: a PLD at a delta above the releases' total variation.
    if not 0 <= epsilon <= bound * (1 + 1e-9):
        raise ValueError(
            f"the ledger's epsilon {epsilon!r} is not within [0, {bound!r}], the RDP bound "
            "of its releases"
        )
    if method.startswith("RDP"):
        want, rel = bound, 1e-9
    elif accounting.accountant._dp_accounting() is not None:
        pld = accounting.PrivacyAccountant(method="pld")
        for e in events:
            pld.compose(e)
        want, rel = pld.get_epsilon_and_method(delta)[0], 1e-3
    else:
        return
    if not _close(epsilon, want, rel):
        raise ValueError(
            f"the ledger's epsilon {epsilon!r} is not that of its releases ({want!r} by "
            f"{method.split(' ')[0]})"
        )


def _json(member, name: str):
    """A JSON member, refusing duplicated keys (which value would a reader take?)."""

    def pairs(items):
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise ValueError(f"'{name}' repeats a key")
        return dict(items)

    try:
        return json.loads(_scalar_text(member, name), object_pairs_hook=pairs)
    except RecursionError:
        raise ValueError(f"'{name}' is nested too deeply") from None


#: Most releases a model's ledger may list (a fit makes a handful).
_MAX_RELEASES = 64

#: Ranges of the fitted numbers a model stores: (lower bound, open?, integer?).
_FITTED_NUMBERS = {
    "n_features_in_": (1, False, True),
    "delta_": (0, True, False),
    "reg_": (0, False, False),
    "lr_": (0, True, False),
    "alpha_": (0, False, False),
    "bias_": (None, False, False),
    "grad_clip_norm_": (0, True, False),
    "noise_multiplier_": (0, False, False),  # 0: DP-SGD without noise (epsilon = inf)
    "n_iter_": (0, False, True),
}


def _check_fitted_numbers(fitted: dict, ledger) -> None:
    for key, (lo, lo_open, integer) in _FITTED_NUMBERS.items():
        if key not in fitted:
            continue
        value = fitted[key]
        _number(value, f"'fitted' {key}", lo=lo, lo_open=lo_open)
        if integer and not isinstance(value, int):
            raise ValueError(f"'fitted' {key} must be an integer, got {value!r}")
    if "delta_" in fitted and not _close(float(fitted["delta_"]), ledger.delta):
        raise ValueError("'fitted' delta_ differs from the ledger's delta")
    if not isinstance(fitted.get("noise_seeded_", False), bool):
        raise ValueError("'fitted' noise_seeded_ must be true or false")


def _same_labels(given, classes: np.ndarray) -> bool:
    """Whether the ``classes`` parameter names the same labels as ``classes_``."""
    try:
        return sorted(set(np.asarray(given).tolist()), key=repr) == sorted(
            set(classes.tolist()), key=repr
        )
    except TypeError:
        return False


def _param_value(value):
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    return value


def _scalar_text(a, member: str) -> str:
    if a.ndim != 0 or a.dtype.kind != "U":
        raise ValueError(f"'{member}' must be a text scalar")
    return str(a)


def _checked_model(path: str, arrays: dict, models):
    """The estimator the members describe, every member checked (a tampered file raises
    ValueError here, not an AttributeError or a wrong answer at predict time)."""
    if _scalar_text(arrays["format"], "format") != FORMAT:
        raise ValueError(f"not a dpfc_native model (format {arrays['format']!s})")
    version = arrays["format_version"]
    if version.ndim != 0 or version.dtype.kind not in "iu":
        raise ValueError("'format_version' must be an integer scalar")
    if int(version) != FORMAT_VERSION:
        raise ValueError(
            f"model format version {int(version)}; this dpfc_native reads version {FORMAT_VERSION}"
        )
    name = _scalar_text(arrays["estimator"], "estimator")
    cls = getattr(models, name, None)
    if name not in models.__all__ or not (
        isinstance(cls, type) and issubclass(cls, models._DPClassifierBase)
    ):
        raise ValueError(f"unknown estimator {name!r}")
    params = _json(arrays["params"], "params")
    fitted = _json(arrays["fitted"], "fitted")
    if not isinstance(params, dict) or not isinstance(fitted, dict):
        raise ValueError("'params' and 'fitted' must be JSON objects")
    ledger = _ledger_from_dict(_json(arrays["ledger"], "ledger"))
    params.pop("noise_seeded", None)
    params.pop("random_state", None)  # never written: a loaded model has no seed
    valid = set(cls._get_param_names())
    for key in ("classes", "center"):
        if isinstance(params.get(key), str):
            # An earlier writer saved array-likes (a pandas Index or Series) as their
            # text: the arrays themselves say what they were.
            params[key] = None if key == "center" and not arrays[key].size else arrays[key]
    est = cls().set_params(**{k: _param_value(v) for k, v in params.items() if k in valid})
    try:  # the estimator's own checks of its parameters, as fit runs them
        est._common_params()
        est._method_params()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"'params' has a value fit refuses: {exc}") from exc
    _check_fitted_numbers(fitted, ledger)

    coef, intercept = arrays["coef"], arrays["intercept"]
    classes, center, names = arrays["classes"], arrays["center"], arrays["feature_names"]
    if coef.ndim != 2 or coef.dtype.kind != "f" or 0 in coef.shape:
        raise ValueError(f"'coef' must be a non-empty (K, d) float array, got {coef.shape}")
    k, d = coef.shape
    if intercept.shape != (k,) or intercept.dtype.kind != "f":
        raise ValueError(f"'intercept' must be a ({k},) float array")
    if not (np.isfinite(coef).all() and np.isfinite(intercept).all()):
        raise ValueError("'coef' and 'intercept' must be finite")
    if classes.shape != (k,):
        raise ValueError(f"'classes' must hold the {k} labels of 'coef'")
    if classes.dtype.kind not in "biufU" or np.unique(classes).size != classes.size:
        raise ValueError("'classes' must be distinct numbers or strings")
    if classes.dtype.kind == "f" and not np.isfinite(classes).all():
        raise ValueError("'classes' must be finite numbers (NaN is no label)")
    as_object = fitted.pop("classes_object", False)
    if not isinstance(as_object, bool):
        raise ValueError("'fitted' gives classes_object other than true or false")
    if as_object:
        classes = classes.astype(object)
    if center.ndim != 1 or center.shape[0] not in (0, d) or center.dtype.kind != "f":
        raise ValueError(f"'center' must be a ({d},) float array or empty")
    if not np.isfinite(center).all():
        raise ValueError("'center' must be finite")
    if names.ndim != 1 or names.shape[0] not in (0, d) or (names.size and names.dtype.kind != "U"):
        raise ValueError(f"'feature_names' must be {d} strings or empty")

    if est.classes is not None and not _same_labels(est.classes, classes):
        raise ValueError("'params' gives classes other than the model's 'classes'")
    given_center = getattr(est, "center", None)
    if given_center is not None and not (
        center.size and np.array_equal(np.asarray(given_center, dtype=np.float64), center)
    ):
        raise ValueError("'params' gives a center other than the model's 'center'")
    if fitted.get("n_features_in_", d) != d:
        raise ValueError(f"'fitted' n_features_in_ differs from the {d} columns of 'coef'")
    est.coef_ = np.asarray(coef, dtype=np.float64)
    est.intercept_ = np.asarray(intercept, dtype=np.float64)
    est.classes_ = classes
    est.center_ = np.asarray(center, np.float64) if center.size else None
    if names.size:
        est.feature_names_in_ = names.astype(object)
    for key, value in fitted.items():
        if key in _FITTED_PUBLIC:
            setattr(est, key, _param_value(value))
    if "loss" in valid and not hasattr(est, "loss_"):  # written before loss_ was
        est.loss_ = est.loss
    if getattr(est, "loss_", "softmax") not in ("softmax", "sigmoid"):
        raise ValueError("'fitted' gives an unknown loss_")
    clip = getattr(est, "clip_norm_", None)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < math.inf:
        raise ValueError("'fitted' must give clip_norm_ as a finite number > 0")
    if not isinstance(getattr(est, "normalize_", None), bool):
        raise ValueError("'fitted' must give normalize_ as true or false")
    est.n_features_in_ = d
    est.privacy_ = ledger
    est.device_ = "cpu"
    return est


def load_model(path):
    """Read a model written by :func:`save_model` (``est.save``, ``dpfc train``).

    Returns a fitted estimator of the saved class: ``predict``, ``decision_function``,
    ``score``, ``classes_``, ``coef_``, ``privacy_`` and the saved hyper-parameters
    (``random_state`` is None). No pickle is read.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        Not a model file of this format, or a corrupted or tampered one (every member
        is checked: types, shapes, finite weights, distinct classes).
    """
    from . import models
    from .data import _check_npz_members, _one_line

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    if not os.path.isfile(path):  # a directory, a device, a FIFO (which would block)
        raise ValueError(f"{path} is not a dpfc_native model (not a regular file)")
    if not zipfile.is_zipfile(path):
        # np.load would take any other file for a pickle and advise loading it unsafely.
        raise ValueError(f"{path} is not a dpfc_native model (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [m for m in _MEMBERS if m not in z.files]
            if missing:
                raise ValueError(f"not a dpfc_native model (missing {missing})")
            # Headers against sizes before allocating; members stored uncompressed, as
            # save_model writes them (no declared size can exceed the file), and no
            # member name twice.
            _check_npz_members(path, _MEMBERS, stored_only=True)
            arrays = {m: z[m] for m in _MEMBERS}
        return _checked_model(path, arrays, models)
    except (
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        OSError,
        EOFError,
        NotImplementedError,
        SyntaxError,
        MemoryError,
        ArithmeticError,  # OverflowError, FloatingPointError (the accountant's)
        zipfile.BadZipFile,
        zlib.error,
        lzma.LZMAError,
        RuntimeError,  # an encrypted member
    ) as exc:
        raise ValueError(f"cannot read model {path}: {_one_line(exc)}") from exc
