"""Saving and loading fitted models: a documented ``.npz`` format, no pickle.

``est.save(path)`` (or :func:`save_model`) writes only what the privacy guarantee covers;
:func:`load_model` reads it back into a fitted estimator that predicts exactly as the
original. ``dpfc train --output`` writes this format and ``dpfc predict`` reads it.

Format (``format = "dpfc_native.model"``, ``format_version = 1``): a NumPy ``.npz`` (a zip
of ``.npy`` members, all plain numeric or unicode arrays, read with
``allow_pickle=False``):

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
                          ``noise_multiplier_``, ``n_iter_``) where the method has them
``ledger``                JSON: ``privacy_.to_dict()``
========================  ===================================================================

Never written: ``n_samples_``, ``diagnostics_``, ``fit_time_`` (computed from the private
data without noise), ``random_state`` (a seed regenerates the noise), ``stats_``,
``noise_key_fingerprint_``.
"""

from __future__ import annotations

import json
import math
import os
import zipfile

import numpy as np

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
    if value is None or isinstance(value, str):
        return value
    return str(value)


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
    if not path.endswith(".npz"):
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
    if classes.dtype.kind not in "biuf":
        classes = classes.astype(str)
    names = getattr(est, "feature_names_in_", None)
    names = np.zeros(0, dtype=str) if names is None else np.asarray(names).astype(str)
    center = getattr(est, "center_", None)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(
            f,
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
    return path


def _ledger_from_dict(d: dict):
    from .accounting import LedgerEntry, PrivacyLedger

    def num(x, missing=math.inf):
        return missing if x is None else float(x)

    entries = tuple(
        LedgerEntry(
            r["name"],
            r["sensitivity"],
            r["noise_std"],
            num(r["noise_multiplier"]),
            int(r["count"]),
            float(r["sample_rate"]),
            r["share"],
        )
        for r in d["releases"]
    )
    return PrivacyLedger(
        entries,
        num(d["epsilon"]),
        float(d["delta"]),
        d["mu"],
        d["method"],
        d["adjacency"],
        float(d.get("sampler_delta", 0.0)),
    )


def _param_value(value):
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    return value


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
        Not a model file of this format (or a corrupted one).
    """
    from . import models

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        # np.load would take any other file for a pickle and advise loading it unsafely.
        raise ValueError(f"{path} is not a dpfc_native model (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [m for m in _MEMBERS if m not in z.files]
            if missing:
                raise ValueError(f"{path} is not a dpfc_native model (missing {missing})")
            arrays = {m: z[m] for m in _MEMBERS}
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"cannot read model {path}: {exc}") from exc
    if str(arrays["format"]) != FORMAT:
        raise ValueError(f"{path} is not a dpfc_native model (format {arrays['format']!s})")
    version = int(arrays["format_version"])
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has model format version {version}; this dpfc_native "
            f"reads version {FORMAT_VERSION}"
        )
    name = str(arrays["estimator"])
    cls = getattr(models, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, models._DPClassifierBase):
        raise ValueError(f"{path}: unknown estimator {name!r}")
    try:
        params = json.loads(str(arrays["params"]))
        fitted = json.loads(str(arrays["fitted"]))
        ledger = _ledger_from_dict(json.loads(str(arrays["ledger"])))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read model {path}: corrupted metadata ({exc})") from exc
    params.pop("noise_seeded", None)
    valid = set(cls._get_param_names())
    est = cls().set_params(**{k: _param_value(v) for k, v in params.items() if k in valid})
    coef = np.asarray(arrays["coef"], dtype=np.float64)
    if (
        coef.ndim != 2
        or arrays["intercept"].shape != (coef.shape[0],)
        or arrays["classes"].shape != (coef.shape[0],)
    ):
        raise ValueError(f"cannot read model {path}: inconsistent shapes")
    est.coef_ = coef
    est.intercept_ = np.asarray(arrays["intercept"], dtype=np.float64)
    est.classes_ = arrays["classes"]
    est.center_ = arrays["center"] if arrays["center"].size else None
    if arrays["feature_names"].size:
        est.feature_names_in_ = arrays["feature_names"].astype(object)
    for key, value in fitted.items():
        if key in _FITTED_PUBLIC:
            setattr(est, key, _param_value(value))
    est.n_features_in_ = coef.shape[1]
    est.privacy_ = ledger
    est.device_ = "cpu"
    return est
