"""Choosing epsilon before touching private data: ``dpfc plan`` and :func:`noise_plans`.

Every noise multiplier of a fit depends only on public facts: the number of examples n,
the feature dimension d, the number of classes K, the target (epsilon, delta), the method
and its parameters (steps T, budget shares, clip norms). This module asks the estimators
for the plan they would execute (:meth:`DPFCClassifier.noise_plan` and its siblings: the
same code ``fit`` runs to calibrate its noise) over a grid of epsilons, and reports for
every release:

* the noise multiplier ``z = std / sensitivity`` and the noise std;
* the expected size of the noise: the spectral norm ``sqrt(2 d) std`` of a d x d
  symmetric noise matrix (grams, covariances, Hessians), or the Frobenius norm
  ``std sqrt(size)`` of the noise on a vector statistic (class sums, gradients);
* the signal it is compared to: the mean eigenvalue of the noiseless matrix
  (``n C^2 / d`` for the gram of n rows of norm C; ``/ K`` per class gram; ``/ 4`` for a
  logistic Hessian at W = 0), or the largest norm of the noiseless sum (``n`` times the
  per-example bound, the sensitivity; ``q n`` for Poisson sampling at rate q).

A noise-to-signal ratio well below 1 means the release is mostly signal; near or above 1
the noise dominates (for matrices: the ridge that makes the noisy matrix positive
definite then swamps most directions). Nothing here reads data, so the plan itself
spends no privacy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from . import _validation

__all__ = ["PLAN_EPSILONS", "noise_plans", "plan_rows", "register_cli"]

#: The default grid of ``dpfc plan``.
PLAN_EPSILONS = (0.1, 0.5, 1.0, 2.0, 4.0, 8.0)


def noise_plans(
    n: int,
    d: int,
    num_classes: int,
    epsilons: Iterable[float] = PLAN_EPSILONS,
    method: str = "fc",
    delta: float | None = None,
    **params,
) -> list:
    """The noise plan of one method at every epsilon of a grid, from public facts only.

    Parameters
    ----------
    n, d, num_classes : int
        Number of training examples, feature dimension, number of classes K (public).
    epsilons : iterable of float
        Target epsilons (``inf``: the non-private counterpart, no noise).
    method : str
        A method key of ``dpfc train``: ``ls``, ``ls-per-class``, ``newton``, ``fc``,
        ``sgd`` or ``adam``.
    delta : float, optional
        Target delta; default ``min(1e-5, 1/n)`` (the estimators' default).
    **params
        Any other estimator parameter (``steps``, ``clip_norm``, ``grad_clip_norm``,
        ``covariance_share``, ``sample_rate``, ...).

    Returns
    -------
    list of :class:`dpfc_native.models.NoisePlan`
        One per epsilon: ``releases`` (each with ``noise_multiplier``, ``std``,
        ``noise``, ``signal``, ``noise_to_signal``), the resolved ``defaults`` (ridge,
        learning rate, gradient clip) and ``ledger()``, the accountant's (epsilon, delta)
        for exactly these releases.

    Examples
    --------
    >>> from dpfc_native.plan import noise_plans
    >>> [p.z for p in noise_plans(50_000, 768, 10, [1.0, 8.0], method="fc", steps=10)]
    ... # doctest: +SKIP
    """
    from . import report

    _validation.choice(method, "method", tuple(report.METHODS))
    # What the plan sets itself, or what a plan cannot use (no data, no noise drawn).
    taken = {
        "epsilon": "the epsilons are the plan's grid",
        "delta": "pass delta=",
        "random_state": "a plan draws no noise",
        "classes": "the plan's K is num_classes",
        "budget": "a plan spends nothing",
    }
    clash = sorted(taken.keys() & params.keys())
    if clash:
        raise ValueError(f"{clash[0]} cannot be a plan parameter ({taken[clash[0]]})")
    plans = []
    for eps in epsilons:
        est = report.make_estimator(method, eps, **params)
        if delta is not None:
            est.set_params(delta=delta)
        plans.append(est.noise_plan(n, d, num_classes))
    return plans


def plan_rows(plans: Sequence) -> list:
    """One dict per (epsilon, release): the columns ``dpfc plan`` prints (JSON-ready)."""
    rows = []
    for p in plans:
        spent = p.ledger().epsilon if not math.isinf(p.epsilon) else math.inf
        for r in p.releases:
            rows.append(
                {
                    "epsilon": p.epsilon,
                    "delta": p.delta,
                    "epsilon_accounted": spent,
                    "release": r.name,
                    "shape": list(r.shape),
                    "count": r.count,
                    "sample_rate": r.sample_rate,
                    "sensitivity": r.sensitivity,
                    "noise_multiplier": r.noise_multiplier,
                    "noise_std": r.std,
                    "noise_kind": "spectral norm" if r.symmetric else "Frobenius norm",
                    "noise": r.noise,
                    "signal": r.signal,
                    "noise_to_signal": r.noise_to_signal,
                }
            )
    return rows


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def register_cli(app) -> None:
    """Add the ``plan`` command to a typer application (``dpfc plan``)."""
    import typer

    from .cli import _user_errors

    @app.command("plan")
    @_user_errors
    def plan_command(
        n: int = typer.Option(
            ..., "--n", help="Number of private training examples (public fact)."
        ),
        dim: int = typer.Option(..., "--dim", "-d", help="Feature dimension."),
        num_classes: int = typer.Option(..., "--num-classes", "-k", help="Number of classes K."),
        epsilon: Optional[List[float]] = typer.Option(
            None, "--epsilon", "-e", help="Target epsilon (repeatable; default 0.1 0.5 1 2 4 8)."
        ),
        delta: Optional[float] = typer.Option(
            None, "--delta", help="Target delta (default min(1e-5, 1/n))."
        ),
        method: str = typer.Option(
            "fc", "--method", "-m", help="ls | ls-per-class | newton | fc | sgd | adam"
        ),
        steps: Optional[int] = typer.Option(
            None, "--steps", help="Steps T (newton, fc, sgd, adam)."
        ),
        clip_norm: float = typer.Option(1.0, "--clip-norm", help="Feature clip C."),
        param: Optional[List[str]] = typer.Option(
            None,
            "--param",
            "-p",
            help="Any other estimator parameter, KEY=VALUE (repeatable), e.g. -p sample_rate=0.01.",
        ),
        json_out: Optional[Path] = typer.Option(
            None, "--json", help="Also write the rows as JSON here."
        ),
        force: bool = typer.Option(False, "--force", help="Overwrite an existing --json file."),
    ):
        """Noise of every release for a grid of epsilons, from public facts only (n, d, K,
        delta, method, steps): multipliers, noise std and noise-to-signal ratios. Reads no
        data and spends no privacy."""
        import json

        from rich.table import Table

        from . import report
        from .cli import _USER_ERRORS, _console, _fail, _output_path, _parse_param

        if json_out is not None:
            json_out = Path(_output_path(json_out, force, suffix="", flag="--json"))
        if method not in report.METHODS:
            _fail(f"--method must be one of {', '.join(report.METHODS)}, got {method!r}")
        for value, flag in ((n, "--n"), (dim, "--dim")):
            if value < 1:
                _fail(f"{flag} must be >= 1, got {value}")
        if num_classes < 2:
            _fail(f"--num-classes must be >= 2, got {num_classes}")
        eps = list(epsilon) if epsilon else list(PLAN_EPSILONS)
        for e in eps:
            if not e > 0:
                _fail(f"--epsilon must be > 0 (inf allowed), got {e}")
        label = report.METHODS[method][0]
        params = {"clip_norm": clip_norm}
        if steps is not None:
            if method in ("ls", "ls-per-class"):
                _fail("--steps applies to newton, fc, sgd and adam (least squares has no steps)")
            params["steps"] = steps
        known = report.make_estimator(method, 1.0).get_params()
        for text in param or []:
            key, value = _parse_param(text)
            if key not in known:
                _fail(
                    f"--param {key}: not a parameter of {label} (known: {', '.join(sorted(known))})"
                )
            params[key] = value
        try:
            plans = noise_plans(n, dim, num_classes, eps, method=method, delta=delta, **params)
            rows = plan_rows(plans)
        except _USER_ERRORS as exc:
            _fail(str(exc).replace("delta must", "--delta must"))
        console = _console()
        first = plans[0]
        console.print(
            f"[bold]dpfc plan[/bold] {label}: n={n}, d={dim}, K={num_classes}, "
            f"delta={first.delta:.10g}, C={clip_norm:g}"
            + "".join(
                f", {r.name}: Poisson rate q={r.sample_rate:g}"
                for r in first.releases
                if r.sample_rate < 1
            )
        )
        from rich import box

        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for col, just in (
            ("epsilon", "right"),
            ("release", "left"),
            ("count", "right"),
            ("z", "right"),
            ("noise std", "right"),
            ("noise", "right"),
            ("signal", "right"),
            ("noise/signal", "right"),
        ):
            table.add_column(col, justify=just, no_wrap=True)
        for row in rows:
            table.add_row(
                _fmt(row["epsilon"]),
                row["release"],
                str(row["count"]),
                _fmt(row["noise_multiplier"]),
                _fmt(row["noise_std"]),
                _fmt(row["noise"]),
                _fmt(row["signal"]),
                _fmt(row["noise_to_signal"]),
            )
        console.print(table)
        console.print(
            "z: noise multiplier (std / sensitivity). noise: spectral norm of the "
            "symmetric noise on one d x d matrix (grams, covariance, Hessians), "
            "or Frobenius norm of the noise on a "
            "sum (class sums, gradients). signal: mean eigenvalue of the noiseless "
            "matrix (n C^2 / d for the gram), or the largest norm of the noiseless "
            "sum (n x sensitivity, all examples aligned: optimistic).",
            highlight=False,
        )
        if json_out is not None:
            try:
                from ._fileio import atomic_write
                from .model_io import _json_value

                doc = {"n": n, "d": dim, "num_classes": num_classes, "method": method}
                # Strict JSON: an infinite epsilon is written "inf", as in dpfc demo's.
                text = json.dumps(_json_value({**doc, "rows": rows}), indent=1, allow_nan=False)
                with atomic_write(json_out) as fh:
                    fh.write(text)
            except OSError as exc:
                _fail(f"cannot write {json_out}: {exc}")
            console.print(f"rows written to {json_out}")
