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
import warnings
from typing import Callable, Sequence

import numpy as np

from . import _methods, data
from ._errors import PrivacyWarning
from ._fileio import atomic_write
from .models import DPFCClassifier, DPLeastSquaresClassifier, DPNewtonClassifier, DPSGDClassifier

__all__ = [
    "METHODS",
    "DEMO_EPSILONS",
    "DATASETS",
    "DemoResult",
    "default_methods",
    "estimate_seconds",
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

_CLASSES = {
    cls.__name__: cls
    for cls in (DPLeastSquaresClassifier, DPNewtonClassifier, DPFCClassifier, DPSGDClassifier)
}

#: method key -> (label, estimator class, fixed keyword arguments); the command line's
#: methods are the same (both come from ``_methods.METHOD_TABLE``).
METHODS = {
    key: (label, _CLASSES[name], fixed)
    for key, (label, name, fixed) in _methods.METHOD_TABLE.items()
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


#: From this many classes on, the demo leaves out the methods whose cost grows with K
#: times d^2 unless they are asked for: DP Newton (K Hessians, n d^2 K flops per step: 5.5
#: minutes per fit at CIFAR-100 shape, n = 20000, on 2 cores) and per-class DP-LS (K noisy
#: d x d grams, each factored and, when the noise makes it indefinite, repaired by an
#: eigendecomposition: about 3 minutes per fit there). Both are also at chance accuracy at
#: that shape: their noise is sqrt(K) (Newton) or K (per class) times larger relative to
#: the signal than DP-LS's.
#: DP-Adam is left out there too (the same per-step gradient pass as DP-SGD, which
#: stays), and DP-SGD runs :data:`LARGE_K_SGD_STEPS` full-batch steps instead of 100: each
#: step is a pass of 4 n d K flops (1 minute per 10 steps at that shape on 2 cores).
LARGE_K = 50
_LARGE_K_SKIPPED = ("newton", "ls-per-class", "adam")
LARGE_K_SGD_STEPS = 30


def default_methods(k: int) -> tuple:
    """The demo's methods for K classes: all of :data:`METHODS`, without DP Newton,
    per-class DP-LS and DP-Adam when ``K >= LARGE_K`` (name them with ``-m`` to include
    them)."""
    return tuple(m for m in METHODS if not (m in _LARGE_K_SKIPPED and k >= LARGE_K))


def demo_overrides(method: str, k: int) -> dict:
    """Estimator settings of the demo that depend on the shape: fewer DP-SGD / DP-Adam
    steps when ``K >= LARGE_K`` (the noise is calibrated to the steps actually run)."""
    if method in ("sgd", "adam") and k >= LARGE_K:
        return {"steps": LARGE_K_SGD_STEPS}
    return {}


#: Rows of the two pilot fits that measure a method's cost at the demo's shape: a fixed
#: part (validation, noise, factorisations and their repairs, every step's dispatch) and a
#: part linear in n (the passes over the rows).
PILOT_ROWS = (64, 2048)
#: A first pilot slower than this skips the second for the methods dominated by a fixed
#: cost (see :func:`estimate_seconds`).
PILOT_SKIP_SECONDS = 2.0
_FIXED_COST_METHODS = ("ls-per-class",)


def _pilot_seconds(method: str, rows: int, d: int, k: int) -> float:
    """Wall time of one fit of ``method`` with the demo's settings on ``rows`` random rows
    of dimension d in K classes."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, d))
    y = np.arange(rows) % k
    est = make_estimator(method, 1.0, seed=0, classes=list(range(k)), **demo_overrides(method, k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a seeded pilot on random rows: nothing private
        t = time.perf_counter()
        est.fit(x, y)
        return time.perf_counter() - t


def estimate_seconds(
    n: int,
    d: int,
    k: int,
    methods: Sequence[str],
    n_fits_per_method: int,
    pilots: dict | None = None,
) -> float:
    """Rough wall time of ``n_fits_per_method`` fits of every method at shape (n, d, K).

    Per method, two pilot fits on random rows of the same d and K, at ``PILOT_ROWS[0]``
    and ``min(n, PILOT_ROWS[1])`` rows (after a small warm-up fit that absorbs first-call
    costs), extrapolated linearly in n. Per-class DP-LS, whose rows cost two gram passes
    next to its K eigendecompositions (~50 s at K = 100, d = 768), skips the second pilot
    when the first takes over ``PILOT_SKIP_SECONDS``: its time is that fixed cost. The
    iterative methods always get both (their cost per row, d K per step, can dominate
    even when a small fit is slow). ``pilots`` (per method, the two times in seconds)
    replaces the measurement. A loaded machine stretches the run and the pilots alike.
    """
    small = PILOT_ROWS[0]
    large = max(small + 1, min(int(n), PILOT_ROWS[1]))
    if pilots is None:
        _pilot_seconds("ls", small, min(d, 16), min(k, 3))  # warm-up
        pilots = {}
        for m in methods:
            first = _pilot_seconds(m, small, d, k)
            fixed = m in _FIXED_COST_METHODS and first > PILOT_SKIP_SECONDS
            second = first if fixed else _pilot_seconds(m, large, d, k)
            pilots[m] = (first, second)
    total = 0.0
    for m in methods:
        t_small, t_large = pilots[m]
        slope = max(0.0, t_large - t_small) / (large - small)
        total += t_small + slope * max(0, int(n) - small)
    return total * n_fits_per_method


def load_dataset(name: str, n: int | None = None, seed: int = 0):
    """(train, test) FeatureSets for a demo dataset name (``n`` only for synthetic ones).

    ``name`` may also be a PUBLIC features file (``.npz``, paired ``.npy``,
    ``.safetensors``): a stand-in for private data of the same kind, split
    stratified 75/25 (seed ``seed``); ``n`` then draws that many training rows from the
    75% (the size of the private set, whose curve it previews).
    """
    if name.lower().endswith((".npz", ".npy", ".safetensors")):
        # Labels of every kind dpfc train reads (integers, float-coded, class names),
        # mapped onto 0..K-1 over the labels that occur (the file is public).
        x, labels = data.read_labeled_arrays(name)
        _, y = np.unique(labels, return_inverse=True)
        fs = data.FeatureSet.from_arrays(x, y.astype(np.int64), name=os.path.basename(name))
        train, test = data.train_test_split_features(fs, FEATURES_TEST_FRACTION, seed=seed)
        if n is not None:
            if n > train.n:
                raise ValueError(
                    f"--n {n} is more than the {train.n} training rows of {name} "
                    f"({1 - FEATURES_TEST_FRACTION:.0%} of it)"
                )
            keep = np.sort(np.random.default_rng(seed).choice(train.n, size=n, replace=False))
            train = data.FeatureSet(
                np.ascontiguousarray(train.features[keep]),
                train.labels[keep],
                train.num_classes,
                train.name,
            )
        return train, test
    if name == "digits":
        if n is not None:
            raise ValueError(
                "--n applies to the synthetic datasets only (digits has 1347 training images)"
            )
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
    chance: float = 0.0
    complete: bool = True

    def median(self, method: str, epsilon: float) -> float:
        """Median over seeds (nan for a cell not computed yet)."""
        vals = self.accuracy[method][epsilon]
        return float(np.median(vals)) if vals else math.nan

    def to_dict(self) -> dict:
        def key(e):
            return "inf" if math.isinf(e) else repr(float(e))

        return {
            "dataset": self.dataset,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "d": self.d,
            "k": self.k,
            "delta": self.delta,
            "seeds": self.seeds,
            "epsilons": [key(e) for e in self.epsilons],
            "methods": {m: METHODS[m][0] for m in self.methods},
            "chance_accuracy": self.chance,
            "complete": self.complete,
            "median_accuracy": {
                m: {
                    key(e): (None if math.isnan(self.median(m, e)) else self.median(m, e))
                    for e in self.epsilons
                }
                for m in self.methods
            },
            "accuracy": {
                m: {key(e): list(map(float, self.accuracy[m][e])) for e in self.epsilons}
                for m in self.methods
            },
            "fit_seconds": {
                m: {key(e): list(map(float, self.fit_seconds[m][e])) for e in self.epsilons}
                for m in self.methods
            },
            "ledgers": {
                m: {key(e): led for e, led in self.ledgers[m].items()} for m in self.methods
            },
            "total_seconds": self.total_seconds,
        }


def run_demo(
    dataset: str = "digits",
    *,
    seeds: int = 1,
    n: int | None = None,
    epsilons: Sequence[float] = DEMO_EPSILONS,
    methods: Sequence[str] | None = None,
    on_fit: Callable[[str, float, int, float], None] | None = None,
    on_result: Callable[["DemoResult"], None] | None = None,
    loaded=None,
) -> DemoResult:
    """Train every method at every epsilon for ``seeds`` noise seeds on one dataset.

    Parameters
    ----------
    dataset : one of :data:`DATASETS`
    seeds : int >= 1
        Noise seeds 0..seeds-1 (reproducible experiment; the median is reported).
    n : int, optional
        Training rows of a synthetic dataset (default: the preset's).
    epsilons : sequence of float (inf allowed)
    methods : sequence of keys of :data:`METHODS`, optional
        Default: :func:`default_methods` for the dataset's K.
    on_fit : callable(method, epsilon, seed, seconds), optional
        Called after every fit (progress bars).
    on_result : callable(DemoResult), optional
        Called after every fit with the result so far (``complete=False`` until the
        last fit): write it out, and a run stopped part-way keeps what finished.
    loaded : (train, test) FeatureSets, optional
        The dataset, if the caller loaded it already.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    for m in methods or ():
        if m not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {m!r}")
    for e in epsilons:
        if not (isinstance(e, (int, float)) and e > 0):
            raise ValueError(f"epsilons must be > 0 (inf allowed), got {e!r}")
    t0 = time.perf_counter()
    train, test = loaded if loaded is not None else load_dataset(dataset, n)
    if methods is None:
        methods = default_methods(train.num_classes)
    x, y, xt, yt = train.features, train.labels, test.features, test.labels
    classes = np.arange(train.num_classes)  # the public label set
    from .models import default_delta

    counts = np.bincount(np.asarray(yt, dtype=np.int64), minlength=train.num_classes)
    result = DemoResult(
        dataset=train.name.rsplit("-train", 1)[0],
        n_train=train.n,
        n_test=test.n,
        d=train.d,
        k=train.num_classes,
        delta=float(default_delta(train.n)),
        epsilons=tuple(epsilons),
        methods=tuple(methods),
        seeds=seeds,
        accuracy={m: {e: [] for e in epsilons} for m in methods},
        fit_seconds={m: {e: [] for e in epsilons} for m in methods},
        ledgers={m: {} for m in methods},
        chance=float(counts.max() / counts.sum()),
        complete=False,
    )
    for m in methods:
        for e in epsilons:
            for s in range(seeds):
                est = make_estimator(
                    m, e, seed=s, classes=classes, **demo_overrides(m, train.num_classes)
                )
                t = time.perf_counter()
                with warnings.catch_warnings():
                    # The demo seeds its noise on purpose (a reproducible experiment on
                    # public data); the warning is for fits on private data.
                    warnings.simplefilter("ignore", PrivacyWarning)
                    est.fit(x, y)
                dt = time.perf_counter() - t
                result.accuracy[m][e].append(est.score(xt, yt))
                result.fit_seconds[m][e].append(dt)
                result.delta = float(est.delta_)
                if s == 0:
                    result.ledgers[m][e] = est.privacy_.to_dict()
                result.total_seconds = time.perf_counter() - t0
                if on_fit is not None:
                    on_fit(m, e, s, dt)
                if on_result is not None:
                    on_result(result)
    result.complete = True
    result.total_seconds = time.perf_counter() - t0
    return result


def _eps_label(e: float) -> str:
    return "non-private" if math.isinf(e) else f"eps={e:g}"


def _best_per_column(result: DemoResult) -> dict:
    out = {}
    for e in result.epsilons:
        vals = [result.median(m, e) for m in result.methods]
        vals = [v for v in vals if not math.isnan(v)]
        out[e] = max(vals) if vals else math.nan
    return out


def _seeds_note(result: DemoResult) -> str:
    return f"median of {result.seeds} seeds" if result.seeds > 1 else "1 seed"


def results_table(result: DemoResult):
    """A rich Table: methods x epsilons, median test accuracy (best per column in bold;
    "-" for cells not computed yet)."""
    from rich.table import Table

    table = Table(
        title=f"{result.dataset}: n={result.n_train}, d={result.d}, K={result.k}, "
        f"delta={result.delta:.2g}; test accuracy ({_seeds_note(result)}; "
        f"chance {result.chance:.3f})"
    )
    table.add_column("method")
    for e in result.epsilons:
        table.add_column(_eps_label(e), justify="right")
    table.add_column("fit s", justify="right")
    best = _best_per_column(result)
    for m in result.methods:
        cells = []
        for e in result.epsilons:
            v = result.median(m, e)
            cells.append(
                "-" if math.isnan(v) else f"[bold]{v:.3f}[/bold]" if v == best[e] else f"{v:.3f}"
            )
        times = [t for e in result.epsilons for t in result.fit_seconds[m][e]]
        table.add_row(METHODS[m][0], *cells, f"{np.median(times):.2f}" if times else "-")
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
            cells.append("-" if math.isnan(v) else f"{v:.3f}{'*' if v == best[e] else ''}")
        rows.append([METHODS[m][0]] + cells)
    status = "" if result.complete else " (PARTIAL: the run is not finished)"
    lines = [
        f"{result.dataset}: n={result.n_train}, d={result.d}, K={result.k}, "
        f"delta={result.delta:.2g}, median test accuracy over {result.seeds} seed(s), "
        f"chance {result.chance:.3f}{status}",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


#: One (colour, marker, line style) per method: distinguishable in colour and in grey.
_STYLES = {
    "ls": ("#0072B2", "o", "-"),
    "ls-per-class": ("#56B4E9", "s", "--"),
    "newton": ("#009E73", "^", "-."),
    "fc": ("#D55E00", "D", "-"),
    "sgd": ("#CC79A7", "v", ":"),
    "adam": ("#E69F00", "P", "--"),
}


def plot_privacy_utility(results: Sequence[DemoResult], path: str) -> str:
    """Accuracy against epsilon, one panel per dataset. Returns the path written (PNG).

    Each method is a line through the median test accuracy over the noise seeds, with a
    band from the minimum to the maximum over seeds. The epsilon axis is logarithmic;
    the non-private accuracy (epsilon = inf) is drawn apart, right of a break, as one
    marker per method. A dotted line marks the chance level (the majority class share
    of the test set). Unfinished cells are left out.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.6), squeeze=False)
    for ax, res in zip(axes[0], results):
        finite = sorted(e for e in res.epsilons if not math.isinf(e))
        has_inf = any(math.isinf(e) for e in res.epsilons)
        top = max(finite) if finite else 1.0
        x_inf = top * 4.0  # where the non-private column sits, right of the break
        n_m = len(res.methods)
        for i, m in enumerate(res.methods):
            color, marker, style = _STYLES.get(m, (None, "o", "-"))
            xs = [e for e in finite if res.accuracy[m][e]]
            med = [res.median(m, e) for e in xs]
            lo = [min(res.accuracy[m][e]) for e in xs]
            hi = [max(res.accuracy[m][e]) for e in xs]
            ax.plot(
                xs,
                med,
                marker=marker,
                linestyle=style,
                color=color,
                label=METHODS[m][0],
                markersize=6,
            )
            if res.seeds > 1 and xs:
                ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
            if has_inf and res.accuracy[m][math.inf]:
                vals = res.accuracy[m][math.inf]
                v = float(np.median(vals))
                # Side by side inside the non-private column, so equal values stay visible.
                spread = 1.45 ** ((i - (n_m - 1) / 2.0) / max(1.0, (n_m - 1) / 2.0))
                ax.errorbar(
                    [x_inf * spread],
                    [v],
                    yerr=[[v - min(vals)], [max(vals) - v]],
                    marker=marker,
                    color=color,
                    markersize=7,
                    capsize=3,
                    linestyle="none",
                    markerfacecolor="white",
                    markeredgewidth=1.5,
                )
        ax.axhline(res.chance, color="0.4", linestyle=":", linewidth=1.2)
        ax.text(
            top if finite else x_inf,
            res.chance,
            f"chance ({res.chance:.2f}) ",
            color="0.3",
            fontsize=8,
            ha="right",
            va="bottom",
        )
        ax.set_xscale("log")
        ticks = list(finite)
        labels = [f"{e:g}" for e in finite]
        if has_inf:
            brk = top * 2.0
            ax.axvline(brk, color="0.5", linewidth=0.8)
            ax.axvspan(brk, x_inf * 2.0, color="0.92", zorder=0)
            ticks.append(x_inf)
            labels.append("non-\nprivate")
            ax.set_xlim(min(finite) / 1.6 if finite else x_inf / 2, x_inf * 2.0)
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels)
        ax.minorticks_off()
        ax.set_xlabel("epsilon (log scale)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(bottom=0.0)
        band = (
            f"line: median of {res.seeds} seeds, band: min-max"
            if res.seeds > 1
            else "1 seed per point"
        )
        partial = "" if res.complete else " [partial]"
        ax.set_title(
            f"{res.dataset} (n={res.n_train}, d={res.d}, K={res.k}, "
            f"delta={res.delta:.0e}){partial}\n{band}",
            fontsize=9,
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_write(path, binary=True) as f:  # a reader never sees a half-written file
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)
    return path


def _write_text(path: str, text: str) -> None:
    with atomic_write(path) as f:  # an interrupted run leaves the previous version
        f.write(text)


def write_outputs(results: Sequence[DemoResult], out_dir: str, *, plot: bool = True) -> dict:
    """Write ``results.json``, ``results.md`` and (``plot``) ``privacy_utility.png`` into
    out_dir; results may be partial (unfinished cells are null / "-")."""
    os.makedirs(out_dir, exist_ok=True)
    js = os.path.join(out_dir, "results.json")
    _write_text(js, json.dumps({"results": [r.to_dict() for r in results]}, indent=1))
    md = os.path.join(out_dir, "results.md")
    _write_text(md, "\n\n".join(text_table(r) for r in results) + "\n")
    png = os.path.join(out_dir, "privacy_utility.png")
    if plot:
        plot_privacy_utility(results, png)
    return {"png": png, "json": js, "markdown": md}
