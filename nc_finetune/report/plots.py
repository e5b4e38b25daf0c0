"""PNG plots of probe results (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from nc_finetune.probe.result import ProbeResult  # noqa: E402
from nc_finetune.utils.io import atomic_write  # noqa: E402

_LOG_METRICS = (("nc1", "NC1  tr(Σ_W Σ_B⁺)/K"), ("nc1_trace", "tr Σ_W / tr Σ_B"), ("cdnv", "CDNV"),
                ("nc2", "NC2 (class-mean ETF distance)"))


def plot_probe(result: ProbeResult, path: str | Path, title: str | None = None) -> Path:
    """Collapse metrics against depth (log scale) with NCC / linear-probe accuracy beside them.

    Args:
        result: A probe result.
        path: Destination PNG.
        title: Figure title; defaults to backbone and dataset.

    Returns:
        The written path.
    """
    fig = probe_figure(result, title)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write a figure as a PNG atomically: the one way the toolkit's reports and the benchmarks save a figure.

    Args:
        fig: The figure (a pyplot figure stays open: its creator closes it).
        path: Destination PNG.
        dpi: Resolution.

    Returns:
        The written path.
    """
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def probe_figure(result: ProbeResult, title: str | None = None) -> plt.Figure:
    """The figure :func:`plot_probe` writes: collapse metrics (log axis) left, accuracies right.

    For two classes NC2 is left out: two centred class means always form a simplex ETF, so NC2 is rounding
    noise (~1e-16) and on the shared log axis it would flatten every other curve.

    Args:
        result: A probe result.
        title: Figure title; defaults to backbone and dataset.

    Returns:
        The open figure; the caller closes it.
    """
    rows = result.layers
    x = list(range(len(rows)))
    labels = [r["name"] if r.get("is_block", True) else "output" for r in rows]
    two_classes = result.meta.get("num_classes") == 2
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1.6, 1]})
    for key, label in _LOG_METRICS:
        if key == "nc2" and two_classes:
            continue
        ys = [_num(r.get(key)) for r in rows]
        if any(math.isfinite(y) and y > 0 for y in ys):
            ax.plot(x, ys, marker="o", ms=3, label=label)
    fit = result.fit
    n_blocks = sum(1 for r in rows if r.get("is_block", True))
    if fit and math.isfinite(_num(fit.get("rho"))) and math.isfinite(_num(fit.get("intercept"))):
        xs = list(range(n_blocks))
        ax.plot(xs, [math.exp(fit["intercept"] + fit["slope"] * i) for i in xs], "k--", lw=1,
                label=f"fit: ρ = {fit['rho']:.3f}/block, R² = {fit['r2']:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("collapse metric (lower = more collapsed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    for key, label in (("ncc_accuracy", "NCC accuracy (train)"), ("lp_accuracy", "linear probe (held out)")):
        ys = [_num(r.get(key)) for r in rows]
        if any(math.isfinite(y) for y in ys):
            ax2.plot(x, ys, marker="o", ms=3, label=label)
    ax2.set_xlabel("layer (forward order)")
    ax2.set_ylabel("accuracy")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    step = max(1, len(x) // 12)
    for a in (ax, ax2):
        a.set_xticks(x[::step])
        a.set_xticklabels(labels[::step], rotation=45, ha="right", fontsize=7)
    meta = result.meta
    fig.suptitle(title or f"{meta.get('backbone', '?')} on {meta.get('dataset', '?')}: "
                 f"{meta.get('samples', '?')} training samples, K = {meta.get('num_classes', '?')}")
    if two_classes:
        ax.set_title("NC2 not shown: it is 0 for two classes", fontsize=8)
    fig.tight_layout()
    return fig


def _num(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan
