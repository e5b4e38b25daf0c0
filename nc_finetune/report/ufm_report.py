"""The unconstrained feature model as a demonstration: train it, compare with the closed form, write a report.

:func:`run_ufm` checks the regime of the closed form (:func:`nc_finetune.ufm.ufm_optimum`) before anything is trained,
trains the UFM with :func:`nc_finetune.ufm.train_ufm` and writes ``ufm.json`` (parameters, closed-form optimum, reached
values, per-iteration history) and ``ufm.png`` (NC1/NC2/NC3 and the objective gap f − f* against the L-BFGS iteration).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from nc_finetune.errors import UserError
from nc_finetune.ufm import train_ufm, ufm_optimum
from nc_finetune.utils.env import library_versions
from nc_finetune.utils.io import write_json_atomic


def run_ufm(
    out: Path,
    num_classes: int = 4,
    n_per_class: int = 5,
    dim: int = 8,
    lambda_w: float = 5e-3,
    lambda_h: float = 5e-3,
    lambda_b: float = 1e-3,
    seed: int = 0,
    max_iter: int = 2000,
) -> dict[str, Any]:
    """Train the UFM to its global optimum and write ``ufm.json`` and ``ufm.png`` into ``out``.

    The defaults are the test oracle of the UFM tests (K=4, n=5, d=8, λ_W=λ_H=5e-3, λ_b=1e-3), whose optimum has
    ‖w_k‖² = 7.478779, f* = 0.1836919957 and ‖W‖_F/‖M̄‖_F = √5.

    Args:
        out: Output directory (created if needed).
        num_classes: K >= 2.
        n_per_class: n >= 1, samples per class.
        dim: Feature dimension d >= K − 1 (the closed form needs it).
        lambda_w: λ_W > 0.
        lambda_h: λ_H > 0.
        lambda_b: λ_b >= 0.
        seed: Seed of the random initialisation.
        max_iter: Maximum number of L-BFGS iterations (>= 1).

    Returns:
        The summary written to ``ufm.json``: ``parameters``, ``closed_form`` (``w_norm_sq``, ``f_star``,
        ``weight_to_mean_ratio``, ``c``), ``reached`` (the same quantities measured on the trained model, the gaps
        to the closed form, NC1–NC3, iterations, gradient norm, convergence), ``history`` (one record per
        iteration: ``step``, ``loss``, ``grad_norm``, ``nc1``, ``nc2``, ``nc3``) and ``versions``.

    Raises:
        UserError: Invalid arguments, K·√(nλ_Wλ_H) >= 1, where the optimum is W = H = 0, or d < K − 1, where the
            closed form does not hold (nothing is trained).
    """
    # The regime check comes first: in the collapse-to-zero regime nothing is trained or written.
    optimum = ufm_optimum(num_classes, n_per_class, lambda_w, lambda_h)
    if dim < 1 or lambda_b < 0:
        raise UserError(f"UFM needs dim >= 1 and lambda_b >= 0, got {dim} and {lambda_b}")
    if dim < num_classes - 1:
        raise UserError(f"UFM closed form needs dim >= K-1 = {num_classes - 1} (a simplex ETF of K classes spans K-1 "
                        f"dimensions), got dim {dim}; below it the optimum is not the closed form")
    if max_iter < 1:
        raise UserError(f"UFM needs max_iter >= 1, got {max_iter}")
    res = train_ufm(num_classes, n_per_class, dim, lambda_w, lambda_h, lambda_b, seed=seed, max_iter=max_iter)

    w, h, b, labels = res.W, res.H, res.b, res.labels
    w_norm_sq = w.square().sum(1)  # (K,)
    class_means = torch.stack([h[labels == k].mean(0) for k in range(num_classes)])  # (K, D)
    mbar = class_means - h.mean(0)  # (K, D), rows μ_k − μ_G
    ratio = float(w.norm() / mbar.norm()) if float(mbar.norm()) > 0 else math.nan
    last = res.history[-1] if res.history else {}
    reached = {
        "w_norm_sq": [float(v) for v in w_norm_sq],
        "w_norm_sq_mean": float(w_norm_sq.mean()),
        "w_norm_sq_max_error": float((w_norm_sq - optimum["w_norm_sq"]).abs().max()),
        "loss": res.loss,
        "objective_gap": res.loss - optimum["f_star"],
        "weight_to_mean_ratio": ratio,
        "bias_max_abs": float(b.abs().max()),
        "nc1": last.get("nc1", math.nan),
        "nc2": last.get("nc2", math.nan),
        "nc3": last.get("nc3", math.nan),
        "iterations": len(res.history),
        "grad_norm": res.grad_norm,
        "converged": res.converged,
    }
    summary: dict[str, Any] = {
        "parameters": {
            "num_classes": num_classes,
            "n_per_class": n_per_class,
            "dim": dim,
            "lambda_w": lambda_w,
            "lambda_h": lambda_h,
            "lambda_b": lambda_b,
            "seed": seed,
            "max_iter": max_iter,
            "regime": num_classes * math.sqrt(n_per_class * lambda_w * lambda_h),
        },
        "closed_form": dict(optimum),
        "reached": reached,
        "history": [dict(r) for r in res.history],
        "versions": library_versions(),
    }
    out = Path(out)
    write_json_atomic(out / "ufm.json", summary)
    plot_ufm(summary, out / "ufm.png")
    return summary


def plot_ufm(summary: Mapping[str, Any], path: str | Path) -> Path:
    """NC1/NC2/NC3 and the objective gap f − f* against the L-BFGS iteration (both log scale).

    Non-positive values (exact zeros, or a gap below rounding) cannot be drawn on a log axis and are left out.

    Args:
        summary: The dict returned by :func:`run_ufm` (or read from ``ufm.json``).
        path: Destination PNG (written atomically).

    Returns:
        The written path.
    """
    history = summary.get("history") or []
    cf = summary.get("closed_form", {})
    p = summary.get("parameters", {})
    steps = [r.get("step", i + 1) for i, r in enumerate(history)]
    fig = Figure(figsize=(11, 4.2))
    ax, ax2 = fig.subplots(1, 2)
    for key, label in (("nc1", "NC1  tr(Σ_W Σ_B⁺)/K"), ("nc2", "NC2 (classifier ETF distance)"),
                       ("nc3", "NC3 (W–M̄ self-duality)")):
        ys = [_positive(r.get(key)) for r in history]
        if any(math.isfinite(y) for y in ys):
            ax.plot(steps, ys, marker="o", ms=2, lw=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("L-BFGS iteration")
    ax.set_ylabel("collapse metric (0 at the optimum)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    f_star = _num(cf.get("f_star"))
    gaps = [_positive(_num(r.get("loss")) - f_star) for r in history]
    if any(math.isfinite(y) for y in gaps):
        ax2.plot(steps, gaps, color="k", marker="o", ms=2, lw=1, label="f − f*")
        ax2.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set_xlabel("L-BFGS iteration")
    ax2.set_ylabel("objective gap f − f*")
    ax2.grid(True, which="both", alpha=0.3)
    fig.suptitle(
        f"UFM K={p.get('num_classes', '?')}, n={p.get('n_per_class', '?')}, d={p.get('dim', '?')}, "
        f"λ_W={p.get('lambda_w', '?')}, λ_H={p.get('lambda_h', '?')}, λ_b={p.get('lambda_b', '?')}\n"
        f"closed form: ‖w_k‖² = {_fmt(cf.get('w_norm_sq'), '.6f')}, f* = {_fmt(cf.get('f_star'), '.10f')}, "
        f"‖W‖_F/‖M̄‖_F = {_fmt(cf.get('weight_to_mean_ratio'), '.6f')}, NC1 = NC2 = NC3 = 0",
        fontsize=10,
    )
    fig.tight_layout()
    from nc_finetune.report.plots import save_figure  # pyplot only when a figure is written

    return save_figure(fig, path)


def format_ufm(summary: Mapping[str, Any]) -> str:
    """A few lines for the terminal: the closed-form optimum next to what training reached.

    Args:
        summary: The dict returned by :func:`run_ufm` (or read from ``ufm.json``).

    Returns:
        Plain text, no trailing newline.
    """
    p, cf, r = summary.get("parameters", {}), summary.get("closed_form", {}), summary.get("reached", {})
    rows = [
        ("", "closed form", "reached"),
        ("|w_k|^2", _fmt(cf.get("w_norm_sq"), ".6f"),
         f"{_fmt(r.get('w_norm_sq_mean'), '.6f')} (max error {_fmt(r.get('w_norm_sq_max_error'), '.2g')})"),
        ("objective f", _fmt(cf.get("f_star"), ".10f"),
         f"{_fmt(r.get('loss'), '.10f')} (f - f* = {_fmt(r.get('objective_gap'), '.2g')})"),
        ("|W|_F/|M|_F", _fmt(cf.get("weight_to_mean_ratio"), ".6f"), _fmt(r.get("weight_to_mean_ratio"), ".6f")),
        ("NC1 / NC2 / NC3", "0 / 0 / 0", " / ".join(_fmt(r.get(k), ".2g") for k in ("nc1", "nc2", "nc3"))),
    ]
    w0, w1 = (max(len(row[i]) for row in rows) for i in range(2))
    lines = [
        f"UFM K={p.get('num_classes')} n={p.get('n_per_class')} d={p.get('dim')} lambda_W={p.get('lambda_w')} "
        f"lambda_H={p.get('lambda_h')} lambda_b={p.get('lambda_b')} seed={p.get('seed')}: "
        f"K*sqrt(n*lambda_W*lambda_H) = {_fmt(p.get('regime'), '.4g')} < 1",
        *(f"  {a.ljust(w0)}  {b.ljust(w1)}  {c}".rstrip() for a, b, c in rows),
        f"  L-BFGS: {r.get('iterations')} iterations, gradient norm {_fmt(r.get('grad_norm'), '.2g')}, "
        + ("converged" if r.get("converged") else "NOT converged (raise max_iter)"),
    ]
    return "\n".join(lines)


def _num(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _positive(v: object) -> float:
    x = _num(v)
    return x if math.isfinite(x) and x > 0 else math.nan


def _fmt(v: object, spec: str) -> str:
    x = _num(v)
    return "nan" if math.isnan(x) else format(x, spec)
