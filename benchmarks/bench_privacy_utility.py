"""Privacy-utility of every estimator x ``denoise`` choice, with defaults only (no tuning on
test data), and today's defaults against the new ones.

    python benchmarks/bench_privacy_utility.py                       # full CPU run (long)
    python benchmarks/bench_privacy_utility.py --quick               # digits only, 1 seed
    python benchmarks/bench_privacy_utility.py --datasets digits,cifar10 --seeds 3
    python benchmarks/bench_privacy_utility.py --datasets cifar100 --estimators dpfc \
        --epsilons 0.1,0.25,0.5,inf                                  # a part of the grid
    python benchmarks/bench_privacy_utility.py --from-json a.json,b.json --merged-out all.json

Datasets: scikit-learn's digits (pixels, 1,347 train / 450 test) and the synthetic
pre-trained-like presets of :func:`dpfc_native.data.synthetic_preset` at the CIFAR-10,
CIFAR-100 and ImageNet shapes (d = 768, 768, 1664; K = 10, 100, 1000), with fewer rows
than the real sets on the CPU (``--rows``; the test split is then n / 5 rows). Epsilons
0.1, 0.25, 0.5, 1, 2, 8 and inf (the non-private ceiling of each model), delta the
estimators' default ``min(1e-5, 1/n)``, ``classes`` the public label set, clip C = 1,
``random_state`` = seed (the noise seed; the data is fixed per dataset).

Configurations per estimator: ``today`` (the defaults before denoise: ``denoise="none"``
with the 2x-noise-norm ridge, and for DP-SGD and DP-LS per-class the old step count,
learning rate and alpha, passed explicitly) and ``denoise=<m>`` for each shrinker with
every other parameter at its (new) default; the row ``denoise=<default>`` is therefore
the new default. DP-SGD has no matrix to denoise: ``today`` vs ``default``.

CPU budget: the released statistics of DP-LS and DP-FC are the same for every
configuration of one (dataset, epsilon, seed) up to the noise, which is drawn from the
same seed, so the clipped (un-noised) grams are computed once per dataset and reused
(:func:`_memoised_stats`; the estimators still add their own noise and run their own
solve, exactly as in a plain fit). Newton, whose K Hessians cost n d^2 K per step, and
DP-SGD run where K d^2 n fits the CPU (see ``PLAN``); the skipped cells are listed in
the JSON's ``skipped``.

Writes JSON (every fit: accuracy, fit time; rewritten after every cell so a partial run
keeps what finished), a markdown table (median over seeds) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np
from _common import git_commit, utc_now

EPSILONS = [0.1, 0.25, 0.5, 1.0, 2.0, 8.0, math.inf]
SHRINKERS = ["psd", "soft", "spiked", "rie"]

#: dataset -> {estimator: the denoise choices run besides today's and the default}.
#: Sized for a shared 2-core CPU (other jobs running; a DP-FC fit at 20,000 x 768 took
#: about 30 s there); the cells left out are in SKIPPED.
PLAN = {
    "digits": {
        "ls_global": SHRINKERS,
        "ls_per_class": SHRINKERS,
        "newton": SHRINKERS,
        "dpfc": SHRINKERS,
        "dpsgd": [],
    },
    "cifar10": {"ls_global": SHRINKERS, "ls_per_class": [], "dpfc": []},
    "cifar100": {"ls_global": SHRINKERS, "dpfc": []},
    "imagenet": {"ls_global": []},
}
#: Rows of the training split on the CPU (None: the whole set).
ROWS = {"digits": None, "cifar10": 20_000, "cifar100": 50_000, "imagenet": 20_000}
#: Why a cell is not run on the CPU.
SKIPPED = {
    ("cifar10", "ls_per_class"): "only today and the default denoise (10 eigendecompositions "
    "of 768 x 768 per fit)",
    ("cifar10", "dpfc"): "only today and the default denoise (10 steps of n d K per fit, "
    "about 30 s a fit on the shared CPU)",
    ("cifar10", "newton"): "K Hessians: n d^2 K = 1.2e11 flops per step at 20,000 x 768, K 10",
    ("cifar10", "dpsgd"): "100+ full-batch steps of n d K per fit (minutes a fit on the "
    "shared CPU); the DP-SGD defaults are compared on digits and on "
    "the held-out tasks of tune_defaults_heldout.py",
    ("cifar100", "ls_per_class"): "100 eigendecompositions of 768 x 768 per fit",
    ("cifar100", "dpfc"): "only today and the default denoise at eps 0.1, 0.25, 0.5 and inf "
    "(run with --epsilons: 10 steps of n d K = 4e9 flops per fit)",
    ("cifar100", "newton"): "K Hessians: n d^2 K = 3e12 flops per step at 50,000 x 768, K 100",
    ("cifar100", "dpsgd"): "100+ full-batch steps of n d K at 50,000 x 768, K 100",
    ("imagenet", "ls_global"): "only today and the default denoise (20,000 rows: 20 a class)",
    ("imagenet", "ls_per_class"): "1000 eigendecompositions/Choleskys of 1664 x 1664 per fit",
    ("imagenet", "newton"): "K Hessians at K = 1000",
    ("imagenet", "dpfc"): "10 gradient steps of n d K = 3e10 flops x 38 fits",
    ("imagenet", "dpsgd"): "100+ steps of n d K = 3e10 flops",
}

# The defaults before this benchmark (passed explicitly to reproduce "today").
_OLD_SGD_STEPS = 100


def _old_sgd_lr(k: int, d: int, steps: int, clip: float = 1.0, momentum: float = 0.9) -> float:
    """DP-SGD's learning rate before the re-derivation (softmax, heavy ball)."""
    l_init = 1.0 / k
    return min((1.0 - momentum) * d / (steps * l_init), (1.0 + momentum) / l_init) / clip**2


def _load(name: str, rows):
    from dpfc_native import data

    if name == "digits":
        return data.digits_features()
    return data.synthetic_preset(name, n=rows, workers=1)


def _memoised_stats():
    """Cache the un-noised clipped statistics by a fingerprint of the preprocessed rows.

    Every configuration of one dataset preprocesses the same rows to the same array, so
    the statistics are identical; the estimators add the noise themselves afterwards.
    """
    from dpfc_native import ops

    cache: dict = {}

    def key(name, X, *rest):
        # Sums over all rows and a strided sample of squares: distinct arrays differ. On
        # the CPU the estimators pass a lazy view of the preprocessed rows (the raw rows
        # and the per-example preprocessing arguments): fingerprint those.
        args = ()
        if getattr(X, "_dpfc_row_view", False):
            args = tuple(
                a if a is None or np.isscalar(a) else float(np.asarray(a).sum()) for a in X._args
            )
            X = np.asarray(X.base)
        return (
            name,
            X.shape,
            str(X.dtype),
            float(X.sum(dtype=np.float64)),
            float((X[::97].astype(np.float64) ** 2).sum()),
            args,
            *[r if np.isscalar(r) else float(np.asarray(r).sum()) for r in rest],
        )

    def wrap(name, fn):
        def inner(X, *args, **kw):
            k = key(name, X, *args, *kw.values())
            if k not in cache:
                cache[k] = fn(X, *args, **kw)
            out = cache[k]
            return (
                tuple(o.copy() if hasattr(o, "copy") else o for o in out)
                if isinstance(out, tuple)
                else out.copy()
            )

        return inner

    for name in ("clipped_stats", "clipped_class_grams", "clipped_gram"):
        setattr(ops, name, wrap(name, getattr(ops, name)))
    return cache


def _configs(est: str, k: int, d: int, n: int, shrinkers):
    """[(config name, estimator class, kwargs)] for one estimator."""
    from dpfc_native import (
        DPFCClassifier,
        DPLeastSquaresClassifier,
        DPNewtonClassifier,
        DPSGDClassifier,
    )
    from dpfc_native.models import DENOISE_DEFAULT, _resolve_denoise

    if est == "dpsgd":
        return [
            (
                "today",
                DPSGDClassifier,
                {"steps": _OLD_SGD_STEPS, "lr": _old_sgd_lr(k, d, _OLD_SGD_STEPS)},
            ),
            ("default", DPSGDClassifier, {}),
        ]
    cls, base, today = {
        "ls_global": (DPLeastSquaresClassifier, {}, {"gram_share": 0.5}),
        "ls_per_class": (
            DPLeastSquaresClassifier,
            {"variant": "per_class"},
            {"alpha": 1.0, "gram_share": 0.5},
        ),
        "newton": (DPNewtonClassifier, {}, {}),
        "dpfc": (DPFCClassifier, {}, {}),
    }[est]
    out = [("today", cls, {**base, **today, "denoise": "none"})]
    # "auto" resolves per shape (a public rule): its row is the shrinker it picks here.
    default = _resolve_denoise(DENOISE_DEFAULT, k if est == "ls_per_class" else 1, d, n)
    for m in dict.fromkeys([default] + list(shrinkers)):
        out.append((f"denoise={m}", cls, {**base, "denoise": m}))
    return out


def run(args):
    from dpfc_native.models import DENOISE_AUTO, DENOISE_DEFAULT

    _memoised_stats()
    result = {
        "benchmark": "privacy_utility",
        "date": utc_now(),
        "commit": git_commit(),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''} "
        f"({os.cpu_count()} CPUs, shared)".strip(),
        # The shrinker the default picks at every shape run here ("auto" -> soft).
        "denoise_default": DENOISE_AUTO if DENOISE_DEFAULT == "auto" else DENOISE_DEFAULT,
        "denoise_param_default": DENOISE_DEFAULT,
        "epsilons": [e if math.isfinite(e) else "inf" for e in EPSILONS],
        "seeds": args.seeds,
        "rows": {},
        "skipped": [],
        "fits": [],
    }

    def save():
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)

    for name in args.datasets:
        plan = PLAN[name]
        rows = args.rows.get(name, ROWS[name])
        t0 = time.perf_counter()
        train, test = _load(name, rows)
        x, y, xt, yt = train.features, train.labels, test.features, test.labels
        n, d = x.shape
        k = int(train.num_classes)
        result["rows"][name] = {"n": n, "d": d, "k": k, "test": int(xt.shape[0])}
        print(
            f"{name}: {n} x {d}, K {k}, test {xt.shape[0]} (loaded in "
            f"{time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        for est, shrinkers in plan.items():
            if args.estimators and est not in args.estimators:
                continue
            for cfg, cls, kw in _configs(est, k, d, n, shrinkers):
                for eps in args.epsilons:
                    for seed in range(args.seeds if math.isfinite(eps) else 1):
                        t1 = time.perf_counter()
                        model = cls(
                            epsilon=eps, classes=np.arange(k), random_state=seed, device="cpu", **kw
                        ).fit(x, y)
                        fit_s = time.perf_counter() - t1
                        acc = float(model.score(xt, yt))
                        result["fits"].append(
                            {
                                "dataset": name,
                                "estimator": est,
                                "config": cfg,
                                "epsilon": eps if math.isfinite(eps) else "inf",
                                "seed": seed,
                                "accuracy": acc,
                                "fit_s": fit_s,
                                "reg": float(getattr(model, "reg_", float("nan"))),
                            }
                        )
                    accs = [
                        f["accuracy"]
                        for f in result["fits"]
                        if (f["dataset"], f["estimator"], f["config"], f["epsilon"])
                        == (name, est, cfg, eps if math.isfinite(eps) else "inf")
                    ]
                    print(
                        f"  {est:>12} {cfg:>15} eps {eps:>5}: {np.median(accs):.4f} "
                        f"({fit_s:.1f} s/fit)",
                        flush=True,
                    )
                    save()
        for (ds, est), why in SKIPPED.items():
            if ds == name:
                result["skipped"].append({"dataset": ds, "estimator": est, "why": why})
        save()
    return result


def _fit_key(f):
    return (f["dataset"], f["estimator"], f["config"], f["epsilon"], f["seed"])


def _median_table(fits):
    """{(dataset, estimator, config): {eps: median accuracy}}."""
    cells: dict = {}
    for f in fits:
        cells.setdefault((f["dataset"], f["estimator"], f["config"]), {}).setdefault(
            f["epsilon"], []
        ).append(f["accuracy"])
    return {key: {e: float(np.median(v)) for e, v in by.items()} for key, by in cells.items()}


def _eps_key(e):
    return math.inf if e == "inf" else float(e)


def table(result) -> str:
    med = _median_table(result["fits"])
    eps = [e for e in result["epsilons"]]
    head = "| dataset | estimator | config | " + " | ".join(f"eps {e}" for e in eps) + " |"
    lines = [head, "|" + " --- |" * (3 + len(eps))]
    for (ds, est, cfg), by in med.items():
        cells = [f"{by[e]:.3f}" if e in by else "" for e in eps]
        lines.append(f"| {ds} | {est} | {cfg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_table(result) -> str:
    """Today's defaults against the new ones, one pair of rows per (dataset, estimator):
    the README's privacy-utility table."""
    med = _median_table(result["fits"])
    eps = result["epsilons"]
    new_cfg = f"denoise={result['denoise_default']}"
    lines = [
        "| data (n x d, K) | estimator | defaults | "
        + " | ".join("non-private" if e == "inf" else f"eps {e}" for e in eps)
        + " |",
        "|" + " --- |" * (3 + len(eps)),
    ]
    order = {name: i for i, name in enumerate(PLAN)}
    ests = ["ls_global", "ls_per_class", "newton", "dpfc", "dpsgd"]
    for (ds, est, cfg), by in sorted(
        med.items(), key=lambda kv: (order.get(kv[0][0], 99), ests.index(kv[0][1]))
    ):
        if cfg != "today":
            continue
        new = med.get((ds, est, new_cfg)) or med.get((ds, est, "default"))
        r = result["rows"][ds]
        name = f"{ds} ({r['n']} x {r['d']}, {r['k']})"
        for label, row in (("today", by), ("new", new)):
            if row is None:
                continue
            lines.append(
                f"| {name} | {est} | {label} | "
                + " | ".join(f"{100 * row[e]:.1f}" if e in row else "" for e in eps)
                + " |"
            )
    return "\n".join(lines)


def choose_default(result) -> str:
    """The shrinker with the best mean gain over today's solve (median over seeds) across
    every (dataset, estimator, finite epsilon) where all were run."""
    med = _median_table(result["fits"])
    gains: dict = {}
    for (ds, est, cfg), by in med.items():
        if not cfg.startswith("denoise=") or (ds, est, "today") not in med:
            continue
        today = med[(ds, est, "today")]
        for e, acc in by.items():
            if e != "inf" and e in today:
                gains.setdefault(cfg[8:], {})[(ds, est, e)] = acc - today[e]
    common = set.intersection(*(set(g) for g in gains.values())) if gains else set()
    lines = [
        "| denoise | mean gain over today (points) | worst cell | cells |",
        "| --- | --- | --- | --- |",
    ]
    best, best_gain = "none", 0.0
    for m, g in gains.items():
        vals = np.array([g[c] for c in common]) * 100
        if vals.size == 0:
            continue
        lines.append(f"| {m} | {vals.mean():+.2f} | {vals.min():+.2f} | {vals.size} |")
        if vals.mean() > best_gain:
            best, best_gain = m, vals.mean()
    print("\n".join(lines))
    return best


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = _median_table(result["fits"])
    datasets = list(dict.fromkeys(k[0] for k in med))
    if not datasets:
        return
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
    default = f"denoise={result['denoise_default']}"
    # One colour per estimator in every panel; dashed: today's defaults, solid: new.
    colors = dict(
        zip(
            ["ls_global", "ls_per_class", "newton", "dpfc", "dpsgd"], ["C0", "C1", "C2", "C3", "C4"]
        )
    )
    for ax, ds in zip(axes[0], datasets):
        for (d2, est, cfg), by in med.items():
            if d2 != ds or cfg not in ("today", default, "default"):
                continue
            es = sorted((e for e in by if e != "inf"), key=_eps_key)
            xs = [_eps_key(e) for e in es]
            ax.plot(
                xs,
                [by[e] for e in es],
                marker="o",
                ms=3,
                color=colors[est],
                ls="--" if cfg == "today" else "-",
                label=f"{est} ({'today' if cfg == 'today' else 'new default'})",
            )
        ax.set_xscale("log")
        ax.set_title(
            f"{ds} {result['rows'][ds]['n']}x{result['rows'][ds]['d']}, "
            f"K {result['rows'][ds]['k']}",
            fontsize=9,
        )
        ax.set_xlabel("epsilon")
        ax.set_ylabel("test accuracy (median of seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="digits,cifar10,cifar100,imagenet")
    ap.add_argument("--estimators", default="", help="comma list (default: the PLAN's)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epsilons", default="", help="comma list (default: all, inf included)")
    ap.add_argument("--rows", default="", help="e.g. cifar10=20000,imagenet=100000")
    ap.add_argument("--quick", action="store_true", help="digits, 1 seed")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--from-json",
        default=None,
        help="only print the table and plot (comma list: merge the runs)",
    )
    ap.add_argument("--merged-out", default=None, help="where --from-json writes the merge")
    args = ap.parse_args()
    args.datasets = ["digits"] if args.quick else [s for s in args.datasets.split(",") if s]
    args.estimators = [s for s in args.estimators.split(",") if s]
    args.epsilons = [float(e) for e in args.epsilons.split(",") if e] or EPSILONS
    args.rows = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in args.rows.split(",") if kv}
    if args.quick:
        args.seeds = 1
    stem = f"privacy_utility_cpu_{utc_now()[:10]}"
    args.out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", stem + ".json"
    )
    if args.from_json:
        # One or more runs (comma-separated), merged: e.g. runs of different estimators.
        paths = args.from_json.split(",")
        result = None
        for path in paths:
            with open(path) as fh:
                part = json.load(fh)
            if result is None:
                result = part
                continue
            seen = {_fit_key(f) for f in result["fits"]}
            # A cell run twice (an interrupted run repeated) counts once.
            result["fits"] += [f for f in part["fits"] if _fit_key(f) not in seen]
            result["rows"].update(part["rows"])
            result["skipped"] += [s for s in part["skipped"] if s not in result["skipped"]]
            result["commit"] = " ".join(dict.fromkeys([result["commit"], part["commit"]]))
        args.out = args.merged_out or paths[0]
        if len(paths) > 1:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)
    else:
        result = run(args)
    print(table(result))
    print("\nREADME table (test accuracy %, median over seeds):\n" + readme_table(result))
    print(
        f"\nbest denoise by mean gain over today's solve: {choose_default(result)} "
        f"(the estimators' default: {result['denoise_default']})"
    )
    try:
        plot(result, os.path.splitext(args.out)[0] + ".png")
    except ImportError:  # pragma: no cover - matplotlib is optional
        print("matplotlib not installed: no PNG", file=sys.stderr)


if __name__ == "__main__":
    main()
