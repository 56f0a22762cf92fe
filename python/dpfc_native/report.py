"""The demo: every method on embedded data over a grid of epsilons, a table and a plot.

``dpfc demo`` (and :func:`run_demo`) trains the four estimators of
:mod:`dpfc_native.models` (DP-LS in both variants) with their data-independent defaults
on embedded data (scikit-learn's digits, or synthetic pre-trained-like features at the
CIFAR-10/100 and ImageNet shapes; nothing is downloaded), at epsilon in
{0.1, 0.5, 1, 2, 8} and without privacy, for a number of noise seeds, and reports the
median test accuracy per method and epsilon, a privacy-utility plot (PNG) and JSON.

The noise seeds make the demo reproducible: a seeded key is for experiments only (see
:class:`dpfc_native.mechanisms.NoiseSource`); the estimators' default is OS entropy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Sequence

import numpy as np

from . import data
from .models import DPFCClassifier, DPLeastSquaresClassifier, DPNewtonClassifier, DPSGDClassifier

__all__ = [
    "METHODS",
    "DEMO_EPSILONS",
    "DATASETS",
    "DemoResult",
    "make_estimator",
    "load_dataset",
    "run_demo",
    "results_table",
    "text_table",
    "plot_privacy_utility",
    "write_outputs",
]

INF = float("inf")

#: The epsilons of the demo (inf = the non-private counterpart, same code path).
DEMO_EPSILONS = (0.1, 0.5, 1.0, 2.0, 8.0, INF)

#: method key -> (label, estimator class, fixed keyword arguments)
METHODS = {
    "ls": ("DP-LS", DPLeastSquaresClassifier, {}),
    "ls-per-class": ("DP-LS per class", DPLeastSquaresClassifier, {"variant": "per_class"}),
    "newton": ("DP Newton", DPNewtonClassifier, {}),
    "fc": ("DP-FC", DPFCClassifier, {}),
    "sgd": ("DP-SGD", DPSGDClassifier, {}),
    "adam": ("DP-Adam", DPSGDClassifier, {"optimizer": "adam"}),
}

#: Datasets of the demo: "digits" (real 8x8 images, sklearn's bundled copy) and the
#: synthetic presets of :data:`dpfc_native.data.SYNTHETIC_PRESETS`.
DATASETS = ("digits",) + tuple(data.SYNTHETIC_PRESETS)


def make_estimator(method: str, epsilon: float, seed: int | None = None, **overrides):
    """The estimator for a method key of :data:`METHODS`, with its defaults."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    _, cls, fixed = METHODS[method]
    return cls(epsilon=epsilon, random_state=seed, **{**fixed, **overrides})


#: Share of a public features file held out as the demo's test set.
FEATURES_TEST_FRACTION = 0.25


def load_dataset(name: str, n: int | None = None, seed: int = 0):
    """(train, test) FeatureSets for a demo dataset name (``n`` only for synthetic ones).

    ``name`` may also be a PUBLIC features file (``.npz``, paired ``.npy``,
    ``.safetensors``): a stand-in for private data of the same kind, split
    stratified 75/25 (seed ``seed``); ``n`` then draws that many training rows from the
    75% (the size of the private set, whose curve it previews).
    """
    if name.lower().endswith((".npz", ".npy", ".safetensors")):
        fs = data.load_features(name)
        train, test = data.train_test_split_features(fs, FEATURES_TEST_FRACTION, seed=seed)
        if n is not None:
            if n > train.n:
                raise ValueError(f"--n {n} is more than the {train.n} training rows of {name} "
                                 f"({1 - FEATURES_TEST_FRACTION:.0%} of it)")
            keep = np.sort(np.random.default_rng(seed).choice(train.n, size=n, replace=False))
            train = data.FeatureSet(np.ascontiguousarray(train.features[keep]),
                                    train.labels[keep], train.num_classes, train.name)
        return train, test
    if name == "digits":
        if n is not None:
            raise ValueError("--n applies to the synthetic datasets only (digits has 1347 "
                             "training images)")
        return data.digits_features()
    if name in data.SYNTHETIC_PRESETS:
        return data.synthetic_preset(name, n=n, seed=seed)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


@dataclasses.dataclass
class DemoResult:
    """Accuracies of one dataset: ``accuracy[method][epsilon]`` is a list over seeds."""

    dataset: str
    n_train: int
    n_test: int
    d: int
    k: int
    delta: float
    epsilons: tuple
    methods: tuple
    seeds: int
    accuracy: dict
    fit_seconds: dict
    ledgers: dict
    total_seconds: float = 0.0

    def median(self, method: str, epsilon: float) -> float:
        return float(np.median(self.accuracy[method][epsilon]))

    def to_dict(self) -> dict:
        def key(e):
            return "inf" if math.isinf(e) else repr(float(e))

        return {
            "dataset": self.dataset, "n_train": self.n_train, "n_test": self.n_test,
            "d": self.d, "k": self.k, "delta": self.delta, "seeds": self.seeds,
            "epsilons": [key(e) for e in self.epsilons],
            "methods": {m: METHODS[m][0] for m in self.methods},
            "median_accuracy": {m: {key(e): self.median(m, e) for e in self.epsilons}
                                for m in self.methods},
            "accuracy": {m: {key(e): list(map(float, self.accuracy[m][e]))
                             for e in self.epsilons} for m in self.methods},
            "fit_seconds": {m: {key(e): list(map(float, self.fit_seconds[m][e]))
                                for e in self.epsilons} for m in self.methods},
            "ledgers": {m: {key(e): led for e, led in self.ledgers[m].items()}
                        for m in self.methods},
            "total_seconds": self.total_seconds,
        }


def run_demo(dataset: str = "digits", *, seeds: int = 1, n: int | None = None,
             epsilons: Sequence[float] = DEMO_EPSILONS, methods: Sequence[str] = tuple(METHODS),
             on_fit: Callable[[str, float, int, float], None] | None = None) -> DemoResult:
    """Train every method at every epsilon for ``seeds`` noise seeds on one dataset.

    Parameters
    ----------
    dataset : one of :data:`DATASETS`
    seeds : int >= 1
        Noise seeds 0..seeds-1 (reproducible experiment; the median is reported).
    n : int, optional
        Training rows of a synthetic dataset (default: the preset's).
    epsilons : sequence of float (inf allowed)
    methods : sequence of keys of :data:`METHODS`
    on_fit : callable(method, epsilon, seed, seconds), optional
        Called after every fit (progress bars).
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {m!r}")
    for e in epsilons:
        if not (isinstance(e, (int, float)) and e > 0):
            raise ValueError(f"epsilons must be > 0 (inf allowed), got {e!r}")
    t0 = time.perf_counter()
    train, test = load_dataset(dataset, n)
    x, y, xt, yt = train.features, train.labels, test.features, test.labels
    classes = np.arange(train.num_classes)  # the public label set
    accuracy = {m: {e: [] for e in epsilons} for m in methods}
    seconds = {m: {e: [] for e in epsilons} for m in methods}
    ledgers: dict = {m: {} for m in methods}
    delta = None
    for m in methods:
        for e in epsilons:
            for s in range(seeds):
                est = make_estimator(m, e, seed=s, classes=classes)
                t = time.perf_counter()
                est.fit(x, y)
                dt = time.perf_counter() - t
                accuracy[m][e].append(est.score(xt, yt))
                seconds[m][e].append(dt)
                delta = est.delta_
                if s == 0:
                    ledgers[m][e] = est.privacy_.to_dict()
                if on_fit is not None:
                    on_fit(m, e, s, dt)
    return DemoResult(dataset=train.name.rsplit("-train", 1)[0], n_train=train.n, n_test=test.n,
                      d=train.d, k=train.num_classes, delta=float(delta), epsilons=tuple(epsilons),
                      methods=tuple(methods), seeds=seeds, accuracy=accuracy,
                      fit_seconds=seconds, ledgers=ledgers,
                      total_seconds=time.perf_counter() - t0)


def _eps_label(e: float) -> str:
    return "non-private" if math.isinf(e) else f"eps={e:g}"


def _best_per_column(result: DemoResult) -> dict:
    return {e: max(result.median(m, e) for m in result.methods) for e in result.epsilons}


def results_table(result: DemoResult):
    """A rich Table: methods x epsilons, median test accuracy (best per column in bold)."""
    from rich.table import Table

    seeds = f"median of {result.seeds} seeds" if result.seeds > 1 else "1 seed"
    table = Table(title=f"{result.dataset}: n={result.n_train}, d={result.d}, K={result.k}, "
                        f"delta={result.delta:.2g}; test accuracy ({seeds})")
    table.add_column("method")
    for e in result.epsilons:
        table.add_column(_eps_label(e), justify="right")
    table.add_column("fit s", justify="right")
    best = _best_per_column(result)
    for m in result.methods:
        cells = []
        for e in result.epsilons:
            v = result.median(m, e)
            cells.append(f"[bold]{v:.3f}[/bold]" if v == best[e] else f"{v:.3f}")
        fit = np.median([t for e in result.epsilons for t in result.fit_seconds[m][e]])
        table.add_row(METHODS[m][0], *cells, f"{fit:.2f}")
    return table


def text_table(result: DemoResult) -> str:
    """The same table as plain Markdown text (best per column marked with *)."""
    best = _best_per_column(result)
    head = ["method"] + [_eps_label(e) for e in result.epsilons]
    rows = []
    for m in result.methods:
        cells = []
        for e in result.epsilons:
            v = result.median(m, e)
            cells.append(f"{v:.3f}{'*' if v == best[e] else ''}")
        rows.append([METHODS[m][0]] + cells)
    lines = [f"{result.dataset}: n={result.n_train}, d={result.d}, K={result.k}, "
             f"delta={result.delta:.2g}, median test accuracy over {result.seeds} seed(s)",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plot_privacy_utility(results: Sequence[DemoResult], path: str) -> str:
    """Accuracy against epsilon (log axis), one panel per dataset; the non-private
    accuracy is drawn at the right end. Returns the path written (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results):
        finite = [e for e in res.epsilons if not math.isinf(e)]
        right = max(finite) * 4 if finite else 1.0
        xs = [right if math.isinf(e) else e for e in res.epsilons]
        for m in res.methods:
            med = [res.median(m, e) for e in res.epsilons]
            lo = [min(res.accuracy[m][e]) for e in res.epsilons]
            hi = [max(res.accuracy[m][e]) for e in res.epsilons]
            line, = ax.plot(xs, med, marker="o", label=METHODS[m][0])
            if res.seeds > 1:
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_xscale("log")
        ticks = finite + ([right] if any(math.isinf(e) for e in res.epsilons) else [])
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{e:g}" for e in finite] + (["non-\nprivate"] if len(ticks) >
                                                          len(finite) else []))
        ax.minorticks_off()
        ax.set_xlabel("epsilon")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{res.dataset} (n={res.n_train}, d={res.d}, K={res.k}, "
                     f"delta={res.delta:.0e})", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(results: Sequence[DemoResult], out_dir: str) -> dict:
    """Write ``privacy_utility.png``, ``results.json`` and ``results.md`` into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    png = plot_privacy_utility(results, os.path.join(out_dir, "privacy_utility.png"))
    js = os.path.join(out_dir, "results.json")
    with open(js, "w") as f:
        json.dump({"results": [r.to_dict() for r in results]}, f, indent=1)
    md = os.path.join(out_dir, "results.md")
    with open(md, "w") as f:
        f.write("\n\n".join(text_table(r) for r in results) + "\n")
    return {"png": png, "json": js, "markdown": md}
