"""How the re-derived DP-SGD and DP-LS per-class defaults were chosen, on held-out synthetic
tasks (NOT the presets or digits that bench_privacy_utility.py reports):
A = 20,000 x 128, K = 20 (seed 101) and B = 20,000 x 384, K = 50 (seed 102), test
accuracy on each task's own test split.

    python benchmarks/tune_defaults_heldout.py sgd [--out sgd.json]
    python benchmarks/tune_defaults_heldout.py sgd_rule [--out sgd_rule.json]
    python benchmarks/tune_defaults_heldout.py per_class [--out per_class.json]
    python benchmarks/tune_defaults_heldout.py per_class --eps 0.1 --seeds 3

"sgd": full-batch DP-GD with heavy-ball momentum 0.9 on the softmax loss, exactly the
estimator's update (rows preprocessed once, the same clip ``sqrt(1 - 1/K) C``, the same
noise calibration ``calibrate_dpsgd_noise_multiplier``), for step counts T and learning
rates given as fractions of ``(1 + momentum) K / C^2`` (half of heavy ball's stability
limit at the softmax curvature ``1/K`` of W = 0), and the previous default
``0.1 d K / T``. "per_class": the estimator itself for a grid of ``alpha`` (the weight of
the global gram), against the global variant.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dpfc_native import DPLeastSquaresClassifier, accounting, data, ops
from dpfc_native.models import _default_grad_clip, _preprocess

INF = float("inf")
TASKS = [(20_000, 128, 20, 101), (20_000, 384, 50, 102)]


def _task(n, d, k, seed):
    train, test = data.synthetic_features(n, d, k, seed=seed, test_size=5000, workers=1)
    x = _preprocess(np.asarray(train.features), np, 1.0, None, True)[0:n]
    xt = _preprocess(np.asarray(test.features), np, 1.0, None, True)[0 : test.features.shape[0]]
    return train, test, x, xt


def dp_gd(x, y, k, eps, steps, lr, seed, momentum=0.9):
    """The estimator's full-batch softmax DP-SGD update on preprocessed rows x."""
    n, d = x.shape
    delta = min(1e-5, 1.0 / n)
    z = accounting.calibrate_dpsgd_noise_multiplier(eps, delta, 1.0, steps) if eps != INF else 0.0
    cg = _default_grad_clip(k, 0.0, "softmax", 1.0)
    rng = np.random.default_rng(seed)
    W = np.zeros((k, d))
    m = np.zeros_like(W)
    for _ in range(steps):
        g, _ = ops.clipped_linear_grad(x, y, W, 0.0, cg, loss="softmax")
        if z > 0:
            g = g + rng.standard_normal(g.shape) * (z * cg)
        m = momentum * m + g / n
        W = W - lr * m
    return W


def sgd(out):
    rows = []
    for n, d, k, tseed in TASKS:
        train, test, x, xt = _task(n, d, k, tseed)
        cap = 1.9 * k
        grid = [(100, "old", 0.1 * d * k / 100)]
        grid += [
            (100, f"cap/{int(1 / f)}" if f < 1 else "cap", f * cap) for f in (1 / 4, 1 / 2, 1.0)
        ]
        grid += [(300, "cap/2", cap / 2)]
        for steps, name, lr in grid:
            accs = []
            for eps in (0.25, 1.0, INF):
                W = dp_gd(x, train.labels, k, eps, steps, lr, seed=0)
                accs.append(float((np.argmax(xt @ W.T, 1) == test.labels).mean()))
                rows.append(
                    dict(
                        task=f"{n}x{d}/K{k}",
                        steps=steps,
                        lr_name=name,
                        lr=lr,
                        eps=eps,
                        acc=accs[-1],
                    )
                )
            print(
                f"{n}x{d}/K{k} T={steps:<4} lr={name:>7} ({lr:8.2f}) eps .25/1/inf: "
                + " ".join(f"{a:.4f}" for a in accs),
                flush=True,
            )
    return rows


def sgd_rule(out):
    """The re-derived default (``_default_sgd_lr``) at noise horizons 0.75, 1.5 and 3."""
    from dpfc_native import models

    rows = []
    cases = [
        (0, 1.5, (0.25, 0.5, 1.0, 2.0)),
        (0, 0.75, (0.25, 1.0)),
        (0, 3.0, (0.25, 1.0)),
        (1, 1.5, (1.0, INF)),
        (1, "old", (1.0,)),
    ]
    tasks = {}
    for ti, c, eps_list in cases:
        n, d, k, tseed = TASKS[ti]
        if ti not in tasks:
            tasks[ti] = _task(n, d, k, tseed)
        train, test, x, xt = tasks[ti]
        for eps in eps_list:
            delta = min(1e-5, 1.0 / n)
            z = (
                accounting.calibrate_dpsgd_noise_multiplier(eps, delta, 1.0, 100)
                if eps != INF
                else 0.0
            )
            if c == "old":
                lr = 0.1 * d * k / 100
            else:
                models.SGD_NOISE_HORIZON = c
                lr = models._default_sgd_lr(
                    "sgd",
                    0.9,
                    "softmax",
                    k,
                    d,
                    100,
                    0.0,
                    1.0,
                    n=n,
                    z=z,
                    grad_clip=_default_grad_clip(k, 0.0, "softmax", 1.0),
                )
            W = dp_gd(x, train.labels, k, eps, 100, lr, seed=0)
            acc = float((np.argmax(xt @ W.T, 1) == test.labels).mean())
            rows.append(dict(task=f"{n}x{d}/K{k}", horizon=c, eps=eps, lr=lr, acc=acc))
            print(f"{n}x{d}/K{k} horizon {c} eps {eps}: lr {lr:.3f} acc {acc:.4f}", flush=True)
    return rows


def per_class(out, eps_list=None, seeds=2):
    rows = []
    eps_list = eps_list or [0.25, 0.5, 1.0, 2.0, INF]
    for n, d, k, tseed in TASKS:
        train, test = data.synthetic_features(n, d, k, seed=tseed, test_size=5000, workers=1)
        grid = [(f"alpha={a}", dict(variant="per_class", alpha=a)) for a in (1.0, 3.0, 10.0, 30.0)]
        grid += [
            ("today", dict(variant="per_class", alpha=1.0, denoise="none")),
            ("default", dict(variant="per_class")),
            ("global today", dict(denoise="none")),
            ("global", {}),
        ]
        for name, kw in grid:
            accs = []
            for eps in eps_list:
                n_seeds = seeds if eps != INF else 1
                accs.append(
                    float(
                        np.mean(
                            [
                                DPLeastSquaresClassifier(
                                    epsilon=eps, random_state=s, classes=np.arange(k), **kw
                                )
                                .fit(train.features, train.labels)
                                .score(test.features, test.labels)
                                for s in range(n_seeds)
                            ]
                        )
                    )
                )
                rows.append(dict(task=f"{n}x{d}/K{k}", config=name, eps=eps, acc=accs[-1]))
            print(
                f"{n}x{d}/K{k} {name:>12} eps {'/'.join(map(str, eps_list))}: "
                + " ".join(f"{a:.4f}" for a in accs),
                flush=True,
            )
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["sgd", "sgd_rule", "per_class"])
    ap.add_argument("--out")
    ap.add_argument("--eps", default="", help="per_class: comma list of epsilons")
    ap.add_argument("--seeds", type=int, default=2, help="per_class: noise seeds")
    args = ap.parse_args()
    if args.which == "per_class":
        eps = [float(e) for e in args.eps.split(",") if e] or None
        rows = per_class(args.out, eps, args.seeds)
    else:
        rows = {"sgd": sgd, "sgd_rule": sgd_rule}[args.which](args.out)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(
                [{k: (v if v != INF else "inf") for k, v in r.items()} for r in rows], fh, indent=1
            )


if __name__ == "__main__":
    main()
