"""How the re-derived DP-SGD and DP-LS per-class defaults were chosen: a held-out synthetic
task (20,000 x 128, K = 20, seed 101; not a preset or digits, which the benchmark reports),
test accuracy of the held-out task, mean over seeds.

    python benchmarks/tune_defaults_heldout.py [sgd|per_class]
"""

from __future__ import annotations

import itertools
import sys

import numpy as np

from dpfc_native import DPLeastSquaresClassifier, DPSGDClassifier, data

EPS = [float("inf"), 0.25, 1.0]


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "sgd"
    train, test = data.synthetic_features(20_000, 128, 20, seed=101, test_size=5000, workers=1)
    x, y, xt, yt = train.features, train.labels, test.features, test.labels
    if which == "sgd":
        grid = [dict(steps=t, lr=lr) for t, lr in itertools.product([100, 300], [None, "cap"])]
    else:
        grid = [dict(variant="per_class", alpha=a, gram_share=g)
                for a, g in itertools.product([1.0, 4.0, 20.0], [0.5, 0.3])]
    for kw in grid:
        accs = []
        for eps in EPS:
            a = []
            for seed in range(2 if eps != float("inf") else 1):
                kw2 = dict(kw)
                if kw2.get("lr") == "cap":
                    kw2["lr"] = 1.9 * 20  # (1 + momentum) / L_init, L_init = 1/K
                cls = DPSGDClassifier if which == "sgd" else DPLeastSquaresClassifier
                a.append(cls(epsilon=eps, random_state=seed, **kw2).fit(x, y).score(xt, yt))
            accs.append(np.mean(a))
        print(kw, " ".join(f"{e}:{v:.4f}" for e, v in zip(EPS, accs)), flush=True)


if __name__ == "__main__":
    main()
