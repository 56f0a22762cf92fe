"""The training methods of the demo and the command line: one table.

Light on purpose (class names, not classes): the command line lists the methods in its
help without importing the estimators (and scikit-learn); :data:`dpfc_native.report.METHODS`
resolves the names.
"""

from __future__ import annotations

#: method key -> (label, estimator class name in dpfc_native.models, fixed parameters)
METHOD_TABLE = {
    "ls": ("DP-LS", "DPLeastSquaresClassifier", {}),
    "ls-per-class": ("DP-LS per class", "DPLeastSquaresClassifier", {"variant": "per_class"}),
    "newton": ("DP Newton", "DPNewtonClassifier", {}),
    "fc": ("DP-FC", "DPFCClassifier", {}),
    "sgd": ("DP-SGD", "DPSGDClassifier", {}),
    "adam": ("DP-Adam", "DPSGDClassifier", {"optimizer": "adam"}),
}
