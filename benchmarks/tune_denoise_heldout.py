"""How the data-independent ``denoise`` and ridge defaults were chosen: held-out synthetic
tasks (NOT the presets or digits that bench_privacy_utility.py reports), DP-LS statistics
released once per (task, epsilon, seed), then solved with every shrinker and a grid of
ridge factors ``f`` in ``reg = f sqrt(2 d) s + 1e-3 n C^2 / d`` (post-processing: one
release serves every solve). Prints mean test accuracy of the held-out task per cell.

    python benchmarks/tune_denoise_heldout.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from dpfc_native import accounting, data, linalg, mechanisms, ops
from dpfc_native.models import _preprocess

TASKS = [  # (n, d, K, seed): shapes unlike the benchmark presets
    (20_000, 128, 20, 101),
    (20_000, 384, 50, 102),
]
EPS = [0.25, 0.5, 1.0, 2.0]
FACTORS = [0.25, 0.5, 1.0, 2.0, 4.0]
METHODS = ["none", "psd", "soft", "spiked", "rie"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for n, d, k, tseed in TASKS:
        train, test = data.synthetic_features(n, d, k, seed=tseed, test_size=5000, workers=1)
        X = _preprocess(np.asarray(train.features), np, 1.0, None, True)
        Xt = _preprocess(np.asarray(test.features), np, 1.0, None, True)
        G0, B0, _ = ops.clipped_stats(X, np.asarray(train.labels), k, 1.0)
        for eps in EPS:
            z = accounting.calibrate_plan(eps, 1e-5, {"gram": 0.5, "class_sums": 0.5})
            s = z["gram"]
            for seed in range(args.seeds):
                src = mechanisms.NoiseSource(1000 * tseed + seed)
                G, _ = mechanisms.release_symmetric(G0, 1.0, z["gram"], src, "gram")
                B, _ = mechanisms.release_dense(B0, 1.0, z["class_sums"], src, "class_sums")
                for m in METHODS:
                    eig = None if m == "none" else linalg.denoise_eigh(G, s, m)
                    for f in FACTORS:
                        reg = f * math.sqrt(2 * d) * s + 1e-3 * n / d
                        if eig is None:
                            W = linalg.solve_spd(G + reg * np.eye(d), B.T, repair="eig")[0].T
                        else:
                            W = linalg.eigh_solve(eig[0], eig[1], reg, B.T).T
                        acc = float((np.argmax(Xt @ W.T, 1) == test.labels).mean())
                        rows.append(
                            dict(
                                task=f"{n}x{d}/K{k}",
                                eps=eps,
                                seed=seed,
                                method=m,
                                factor=f,
                                acc=acc,
                            )
                        )
    print(f"{'task':>14} {'eps':>5} {'method':>7} " + " ".join(f"f={f:<5}" for f in FACTORS))
    for task in dict.fromkeys(r["task"] for r in rows):
        for eps in EPS:
            for m in METHODS:
                accs = [
                    np.mean(
                        [
                            r["acc"]
                            for r in rows
                            if r["task"] == task
                            and r["eps"] == eps
                            and r["method"] == m
                            and r["factor"] == f
                        ]
                    )
                    for f in FACTORS
                ]
                print(f"{task:>14} {eps:>5} {m:>7} " + " ".join(f"{a:.4f} " for a in accs))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
