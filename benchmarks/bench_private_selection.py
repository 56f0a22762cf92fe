"""Private hyper-parameter selection against tuning on a public split and the defaults.

Three ways to set DP least squares' ridge ``reg`` at a total privacy budget epsilon:

* ``defaults``: no tuning, the data-independent default ridge, one fit at epsilon.
* ``public split``: the grid swept on a PUBLIC validation split (free post-processing of
  one fit's released statistics: ``reg=[...]`` with ``X_val, y_val``), one fit at epsilon.
* ``private selection``: :class:`dpfc_native.tuning.PrivateSelector` over the same grid,
  no public data: random stopping (Papernot and Steinke 2022, logarithmic number of
  repetitions with mean ``--mean-repetitions``, shape ``--shape``), every repetition a fit
  plus a noisy score
  on the private training data, the whole search at epsilon in total.

Datasets: scikit-learn's digits and the synthetic CIFAR-10 preset (``--n`` training rows).
The public validation split is carved from the test set (the same rows are removed from the
test set of every approach). Test accuracy over ``--seeds`` seeds (min and median).

Usage::

    python benchmarks/bench_private_selection.py            # digits + cifar10, 5 seeds
    python benchmarks/bench_private_selection.py --quick    # digits only, 3 seeds

Cost: every fit of the synthetic preset (d = 768) factors a noisy 768 x 768 gram (an
eigendecomposition, ~0.2 s), and a selection makes about ``--mean-repetitions`` fits, so
the full run takes about 2.5 CPU minutes on 2 cores (151 s measured; ``--quick``: a few
seconds); the wall-clock time on a shared machine is in the JSON (``total_seconds``).

Writes ``benchmarks/results/private_selection.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import git_commit, utc_now  # noqa: E402

from dpfc_native import PrivacyWarning, data  # noqa: E402
from dpfc_native.models import DPLeastSquaresClassifier  # noqa: E402
from dpfc_native.tuning import PrivateSelector  # noqa: E402

#: Ridge grid per dataset (absolute values around the defaults, a factor ~3 apart).
GRIDS = {
    "digits": [3.0, 10.0, 30.0, 100.0, 300.0, 1000.0],
    "cifar10": [10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0],
}


def load(name: str, n: int, n_val: int):
    if name == "digits":
        train, test = data.digits_features()
    else:
        train, test = data.synthetic_preset(name, n=n, seed=0)
    rng = np.random.default_rng(1234)
    perm = rng.permutation(test.n)
    val_idx, test_idx = perm[:n_val], perm[n_val:]
    return (
        np.asarray(train.features),
        np.asarray(train.labels),
        np.asarray(test.features)[val_idx],
        np.asarray(test.labels)[val_idx],
        np.asarray(test.features)[test_idx],
        np.asarray(test.labels)[test_idx],
        train.num_classes,
    )


def run(datasets, epsilons, seeds, n, n_val, mean_reps, shape, on_cell=None):
    rows = []
    for name in datasets:
        X, y, Xv, yv, Xt, yt, k = load(name, n, n_val)
        grid = GRIDS[name]
        classes = np.arange(k)
        for eps in epsilons:
            acc = {"defaults": [], "public split": [], "private selection": []}
            extra = {
                "selection_epsilon": [],
                "repetitions": [],
                "chosen_reg": [],
                "public_reg": [],
                "seconds": {a: [] for a in acc},
            }
            for seed in range(seeds):
                with warnings.catch_warnings():
                    # Seeds make the benchmark replayable (an experiment on public data).
                    warnings.simplefilter("ignore", PrivacyWarning)
                    t = time.perf_counter()
                    est = DPLeastSquaresClassifier(
                        epsilon=eps, classes=classes, random_state=seed
                    ).fit(X, y)
                    extra["seconds"]["defaults"].append(time.perf_counter() - t)
                    acc["defaults"].append(est.score(Xt, yt))
                    t = time.perf_counter()
                    pub = DPLeastSquaresClassifier(
                        epsilon=eps, classes=classes, reg=grid, random_state=seed
                    ).fit(X, y, X_val=Xv, y_val=yv)
                    extra["seconds"]["public split"].append(time.perf_counter() - t)
                    acc["public split"].append(pub.score(Xt, yt))
                    extra["public_reg"].append(pub.reg_)
                    t = time.perf_counter()
                    sel = PrivateSelector(
                        DPLeastSquaresClassifier(classes=classes),
                        {"reg": grid},
                        epsilon=eps,
                        mean_repetitions=mean_reps,
                        shape=shape,
                        random_state=seed,
                    ).fit(X, y)
                    extra["seconds"]["private selection"].append(time.perf_counter() - t)
                acc["private selection"].append(sel.score(Xt, yt))
                assert sel.privacy_.epsilon <= eps
                extra["selection_epsilon"].append(sel.privacy_.epsilon)
                extra["repetitions"].append(sel.diagnostics_["n_repetitions"])
                extra["chosen_reg"].append(sel.best_params_["reg"])
            for approach, vals in acc.items():
                rows.append(
                    {
                        "dataset": name,
                        "n_train": int(X.shape[0]),
                        "d": int(X.shape[1]),
                        "k": k,
                        "epsilon": eps,
                        "approach": approach,
                        "seeds": seeds,
                        "min": float(np.min(vals)),
                        "median": float(np.median(vals)),
                        "max": float(np.max(vals)),
                        "accuracy": list(map(float, vals)),
                        "median_seconds": float(np.median(extra["seconds"][approach])),
                        **(
                            {
                                "repetitions": extra["repetitions"],
                                "chosen_reg": extra["chosen_reg"],
                                "ledger_epsilon": extra["selection_epsilon"],
                            }
                            if approach == "private selection"
                            else {}
                        ),
                        **(
                            {"chosen_reg": extra["public_reg"]}
                            if approach == "public split"
                            else {}
                        ),
                    }
                )
                print(
                    f"{name} eps={eps:g} {approach}: median {np.median(vals):.3f} "
                    f"(min {np.min(vals):.3f})",
                    flush=True,
                )
            if on_cell is not None:
                on_cell(rows)
    return rows


def table(rows) -> str:
    lines = [
        "| dataset | n | epsilon | approach | min acc | median acc | median s | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = ""
        if r["approach"] == "private selection":
            note = (
                f"K median {int(np.median(r['repetitions']))}, ledger eps <= "
                f"{max(r['ledger_epsilon']):.4g}"
            )
        elif r["approach"] == "public split":
            note = "free sweep of the grid on a public split"
        lines.append(
            f"| {r['dataset']} | {r['n_train']} | {r['epsilon']:g} | {r['approach']} | "
            f"{r['min']:.3f} | {r['median']:.3f} | {r['median_seconds']:.2f} | {note} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["digits", "cifar10"])
    ap.add_argument("--epsilons", nargs="+", type=float, default=[0.5, 1.0, 4.0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--n", type=int, default=5000, help="training rows of the synthetic preset")
    ap.add_argument("--n-val", type=int, default=150, help="public validation rows (from test)")
    ap.add_argument("--mean-repetitions", type=float, default=12.0)
    ap.add_argument(
        "--shape",
        type=float,
        default=0.0,
        help="eta of the truncated negative binomial (0: logarithmic, 1: geometric)",
    )
    ap.add_argument("--quick", action="store_true", help="digits only, 3 seeds")
    ap.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", "private_selection.json"
        ),
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.datasets = 3, ["digits"]
    if args.seeds < 3:
        ap.error("--seeds must be >= 3 (min and median over seeds)")
    t0, cpu0 = time.perf_counter(), time.process_time()
    load = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def write(rows, complete=False):
        # After every (dataset, epsilon) cell, so a run stopped part-way keeps its cells.
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(
                {
                    "benchmark": "private_selection",
                    "commit": git_commit(),
                    "date": utc_now(),
                    "machine": platform.platform(),
                    "cpu_count": os.cpu_count(),
                    "args": vars(args),
                    "grids": GRIDS,
                    "complete": complete,
                    "rows": rows,
                    "table": table(rows),
                    "total_seconds": time.perf_counter() - t0,
                    "cpu_seconds": time.process_time() - cpu0,
                    "load_average_at_start": load,
                },
                f,
                indent=1,
            )
        os.replace(tmp, args.out)

    rows = run(
        args.datasets,
        args.epsilons,
        args.seeds,
        args.n,
        args.n_val,
        args.mean_repetitions,
        args.shape,
        on_cell=write,
    )
    write(rows, complete=True)
    print(table(rows))
    print(
        f"wrote {args.out} ({time.perf_counter() - t0:.0f} s wall, "
        f"{time.process_time() - cpu0:.0f} s CPU)"
    )


if __name__ == "__main__":
    main()
