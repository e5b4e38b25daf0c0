"""Modes compared at a matched budget: per-mode statistics, the wins of the NC-guided modes, their tables and figure.

Shared by the studies that run several ways of choosing blocks on the same task and seeds (``layer_selection``,
``input_shift``); ``blocks_label`` also by ``data_scarce``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import accuracies, finish_figure, fmt_stat, markdown_table, mean_std, paired, wtl


def blocks_label(runs: list[dict[str, Any]]) -> str:
    """The most common selected-block set over seeds (``(k/n seeds)`` when not unanimous)."""
    if not runs:
        return ""
    method, strategy = runs[0].get("method"), runs[0].get("selection_strategy")
    if method == "full":
        return "all (full)"
    if method == "linear_probe":
        return "(head only)"
    if strategy == "all":
        return f"all {len(runs[0]['selected_blocks'])} blocks ({method})"
    counts = Counter(", ".join(r["selected_blocks"]) or "(none)" for r in runs)
    label, k = counts.most_common(1)[0]
    return label if k == len(runs) else f"{label} ({k}/{len(runs)} seeds; {len(counts)} sets)"


@dataclass(frozen=True)
class ModeComparison:
    """How one study compares its modes.

    Attributes:
        nc_modes: The NC-guided modes (compared against every other mode).
        reference: The mode the accuracy differences are taken against (full fine-tuning).
    """

    nc_modes: tuple[str, ...]
    reference: str = "full"

    def task_rows(self, by_mode: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Per-mode statistics of one task, in the order of ``by_mode``.

        Args:
            by_mode: ``{mode: {seed: slim summary}}`` (failed runs absent).
        """
        ref = accuracies(by_mode.get(self.reference, {}))
        rows = []
        for mode, runs in by_mode.items():
            if not runs:
                continue
            acc = accuracies(runs)
            rows.append({
                "mode": mode,
                "seeds": sorted(runs),
                "blocks": blocks_label(list(runs.values())),
                "selected_blocks": {s: r["selected_blocks"] for s, r in runs.items()},
                "accuracy_pct": [acc[s] for s in sorted(acc)],
                "delta_vs_full_points": paired(acc, ref) if mode != self.reference else [],
                "trainable_pct": [100 * r["trainable_params"] / r["total_params"] for r in runs.values()],
                "trainable_params": [r["trainable_params"] for r in runs.values()],
                "seconds_per_epoch": [r["seconds_per_epoch"] for r in runs.values()],
                "steps": [r["steps"] for r in runs.values()],
            })
        return rows

    def wins(self, by_mode: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Every NC-guided mode against every other mode: paired accuracy differences (points) per seed."""
        out = []
        for nc in self.nc_modes:
            if not by_mode.get(nc):
                continue
            mine = accuracies(by_mode[nc])
            for other, runs in by_mode.items():
                if other in self.nc_modes or not runs:
                    continue
                d = paired(mine, accuracies(runs))
                if d:
                    out.append({"nc_mode": nc, "baseline": other, "diff_points": d,
                                "seeds": [s for s in sorted(mine) if s in runs]})
        return out

    def main_table(self, rows: list[dict[str, Any]], failures: Sequence[str]) -> str:
        """Mode, blocks, accuracy, difference from the reference, trainable %, s/epoch, seeds (Markdown)."""
        out = []
        for r in rows:
            delta = "(ref)" if r["mode"] == self.reference else fmt_stat(r["delta_vs_full_points"], "+.2f")
            spe = mean_std(r["seconds_per_epoch"])[0]
            mode = r["mode"] + (" (NC)" if r["mode"] in self.nc_modes else "")
            out.append([mode, r["blocks"], fmt_stat(r["accuracy_pct"], ".2f"), delta,
                        fmt_stat(r["trainable_pct"], ".3g"), "n/a" if math.isnan(spe) else f"{spe:.1f}",
                        str(len(r["seeds"]))])
        for f in failures:
            out.append([f"FAILED {f[:100]}", "", "", "", "", "", ""])
        headers = ["mode", "selected blocks (most common)", "test acc %", "Δ vs full (pts)", "trainable %",
                   "s/epoch", "seeds"]
        return markdown_table(headers, out, align=["l", "l"] + ["r"] * 5)

    @staticmethod
    def wins_table(task_wins: dict[str, list[dict[str, Any]]]) -> str:
        """Per task and pooled over tasks: mean paired difference and W-T-L per (NC mode, baseline)."""
        pooled: dict[tuple[str, str], list[float]] = {}
        rows = []
        for task, ws in task_wins.items():
            for w in ws:
                pooled.setdefault((w["nc_mode"], w["baseline"]), []).extend(w["diff_points"])
                rows.append([task, w["nc_mode"], w["baseline"], fmt_stat(w["diff_points"], "+.2f"),
                             wtl(w["diff_points"])])
        if len(task_wins) > 1:
            for (nc, base), d in pooled.items():
                rows.append(["(all tasks)", nc, base, fmt_stat(d, "+.2f"), wtl(d)])
        headers = ["task", "NC mode", "vs", "Δ acc (pts, NC − other)", "seeds W-T-L"]
        return markdown_table(headers, rows, align=["l", "l", "l", "r", "r"])

    def plot(self, tables: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path | None:
        """Test accuracy per mode (mean ± std over seeds, trainable % annotated), one panel per task."""
        from matplotlib.figure import Figure

        tasks = [t for t, rows in tables.items() if rows]
        if not tasks:
            return None
        n_modes = max(len(tables[t]) for t in tasks)
        fig = Figure(figsize=(max(6.5, 5.0 * len(tasks)), 1.2 + 0.45 * n_modes))
        axes = fig.subplots(1, len(tasks), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            rows = tables[task]
            stats = [mean_std(r["accuracy_pct"]) for r in rows]
            ys = list(range(len(rows)))[::-1]
            colors = ["tab:red" if r["mode"] in self.nc_modes else "tab:gray" for r in rows]
            ax.barh(ys, [m for m, _ in stats], xerr=[0 if math.isnan(s) else s for _, s in stats], color=colors,
                    capsize=3, height=0.6)
            ax.set_yticks(ys)
            ax.set_yticklabels([r["mode"] for r in rows], fontsize=8)
            finite = [m for m, _ in stats if math.isfinite(m)]
            lo, hi = (min(finite), max(finite)) if finite else (0.0, 100.0)
            ax.set_xlim(max(0.0, lo - max(2.0, 0.15 * (hi - lo))), min(100.0, hi + max(3.0, 0.45 * (hi - lo))))
            for y, (m, s), r in zip(ys, stats, rows, strict=True):
                if math.isfinite(m):  # the label starts right of the error bar, so the two never overlap
                    ax.annotate(f"{m:.1f}%  ({mean_std(r['trainable_pct'])[0]:.3g}% params)",
                                (m + (s if math.isfinite(s) else 0.0), y), textcoords="offset points",
                                xytext=(5, -3), fontsize=7)
            ax.set_xlabel("test accuracy % (mean ± std over seeds)")
            ax.set_title(task, fontsize=10)
            ax.grid(True, axis="x", alpha=0.3)
        return finish_figure(fig, f"{title} (red = NC-guided)", path)
