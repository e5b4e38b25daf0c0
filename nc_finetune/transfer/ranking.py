"""Rank correlation between transferability scores and ground-truth accuracy, ranking tables and their plot.

The benchmark statistic is the weighted Kendall τ_w (``scipy.stats.weightedtau``, hyperbolic additive weigher, as
used by ``BUserName/NCTI`` and ``TencentARC/SFDA``) next to plain Kendall τ. Candidates are models or layers. As
benchmark critiques of transferability estimation advise, a trivial size ranker (``params``) should always be
reported beside the scores: :func:`rank_table` notes when it is missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from nc_finetune.transfer.scores import NCTI_TERMS, ncti_combine
from nc_finetune.utils.io import atomic_write

#: score name → lower_is_better.
SCORE_DIRECTIONS: dict[str, bool] = {
    "nc1": True,
    "nc1_trace": True,
    "cdnv": True,
    "ncti": False,
    "logme": False,
    "hscore": False,
    "ncc_accuracy": False,
    "params": False,
    "num_params": False,  # the probe records' name for a block's parameter count (the size ranker for layers)
}
#: Scores whose panels use a log axis (when all their values are positive).
LOG_SCORES = frozenset({"nc1", "nc1_trace", "cdnv"})
_SIZE_KEYS = ("params", "num_params")
_NAN = float("nan")
_SIG_DIGITS = 10  # scores equal to this many significant digits are ties (rounding noise must not rank)


#: The probe entries a ranking compares: collapse and transferability scores and NCTI's raw terms.
SCORE_KEYS = ("nc1", "nc1_trace", "cdnv", "ncc_accuracy", "lp_accuracy", "logme", "hscore", "ncti_seli_raw",
              "ncti_ncc_raw", "ncti_vc_raw")


def candidate_row(candidate, num_params: int, result) -> dict[str, Any]:
    """One row of the backbone ranking: a probed candidate's scores at its last tap, its size and probe time.

    Args:
        candidate: The :class:`~nc_finetune.config.RankCandidate`.
        num_params: The loaded backbone's parameter count (the static size baseline).
        result: Its :class:`~nc_finetune.probe.result.ProbeResult`.
    """
    last = result.layers[-1]
    return {"name": candidate.title, "backbone": candidate.name, "pretrained": candidate.pretrained,
            "params": num_params, "probe_seconds": result.meta["seconds"],
            **{k: last[k] for k in SCORE_KEYS if k in last}}


def layer_rows(result) -> list[dict[str, Any]]:
    """Rows of one candidate's layer ranking: every probed block, sized as the model truncated after it."""
    rows, size = [], 0
    for rec in result.blocks():
        size += rec["num_params"]  # a model truncated after this block
        rows.append({"name": rec["name"], "num_params": size, **{k: rec[k] for k in SCORE_KEYS if k in rec}})
    return rows


def check_rank_recipe(recipe) -> None:
    """Refuse a ranking without candidates or without a ground truth, before anything loads.

    Raises:
        ConfigError: no ``rank.candidates`` (the section validates each one), or neither ``rank.finetune`` nor
            ``probe.linear_probe``.
    """
    from nc_finetune.errors import ConfigError

    if not recipe.rank.candidates:
        raise ConfigError("rank.candidates needs at least 2 backbone sections, e.g. "
                          "[{name: efficientnet-lite0}, {name: efficientnet-lite0, pretrained: false}]")
    if not recipe.rank.finetune and not recipe.probe.linear_probe:
        raise ConfigError("rank needs a ground truth: set rank.finetune=true or probe.linear_probe=true")


def truth_key(recipe) -> str:
    """The ground truth of the backbone ranking: fine-tuned test accuracy or the probe's linear-probe accuracy."""
    return "finetune_accuracy" if recipe.rank.finetune else "lp_accuracy"


def probe_candidate(backbone, probe_split, num_classes: int, cfg, *, dataset: str, title: str,
                    progress: bool = True):
    """Probe one candidate on every block with the transfer scorers on (NC1, trace ratio, CDNV, LogME, H-score
    and NCTI's terms from one pass).

    Args:
        backbone: The candidate's :class:`~nc_finetune.backbones.Backbone`.
        probe_split: The probe subset every candidate shares.
        num_classes: K.
        cfg: The recipe's probe section (its ``layers`` do not apply: a candidate's layers are all ranked).
        dataset: Recorded in the result's meta.
        title: The candidate's title, recorded in the result's meta.
        progress: tqdm bar.

    Returns:
        The :class:`~nc_finetune.probe.result.ProbeResult`.
    """
    import dataclasses

    from nc_finetune.probe.runner import probe
    from nc_finetune.transfer.scores import scores_from_stats

    return probe(backbone, probe_split, num_classes, cfg=dataclasses.replace(cfg, layers="all"), progress=progress,
                 scorers=(scores_from_stats,), meta={"dataset": dataset, "candidate": title})


def candidate_layers(result, linear_probe: bool) -> dict[str, Any]:
    """One candidate's layer ranking: its :func:`layer_rows` and their :func:`rank_table` (against the
    linear-probe accuracy when the probe fitted one)."""
    rows = layer_rows(result)
    return {"rows": rows, **rank_table(rows, "lp_accuracy" if linear_probe else None)}


def rank_report(rows: Sequence[Mapping[str, Any]], layers: Mapping[str, Any], truth: str, *, dataset: str,
                num_classes: int, probe_samples: int, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The content of ``rank.json``: the backbone ranking against ``truth``, each candidate's layer ranking and
    the provenance (recipe, library versions)."""
    from nc_finetune.utils.env import library_versions

    return {"dataset": dataset, "num_classes": num_classes, "probe_samples": probe_samples,
            **rank_table(rows, truth), "truth_key": truth, "rows": list(rows), "layers": dict(layers),
            "recipe": dict(recipe), "versions": library_versions()}


def _num(v: Any) -> float:
    try:
        return float(v) if v is not None else _NAN
    except (TypeError, ValueError):
        return _NAN


def _values(values: Sequence[Any]) -> np.ndarray:
    """float64 array rounded to ``_SIG_DIGITS`` significant digits (non-numbers become NaN)."""
    return np.array([float(f"{_num(v):.{_SIG_DIGITS}g}") for v in values], dtype=np.float64)


def correlations(scores: Sequence[float], truth: Sequence[float], lower_is_better: bool) -> dict[str, float]:
    """Kendall τ and weighted τ between a score and the ground truth (higher truth = better candidate).

    Scores where lower is better are negated first, so a perfect score gives τ = τ_w = 1 in either direction.
    Pairs with a non-finite score or truth are dropped. Values are rounded to 10 significant digits first, so that
    rounding noise on a saturated score (e.g. an H-score of exactly K − 1 when N ≤ D) counts as a tie, not a ranking.

    Args:
        scores: One score per candidate.
        truth: Ground-truth accuracy per candidate.
        lower_is_better: Direction of the score (see :data:`SCORE_DIRECTIONS`).

    Returns:
        ``kendall_tau``, ``weighted_tau`` (``scipy.stats.weightedtau``, default hyperbolic weigher) and ``n`` (the
        number of pairs used); the correlations are NaN with fewer than 3 usable pairs or when an input is constant.

    Raises:
        ValueError: ``scores`` and ``truth`` differ in length.
    """
    s, t = _values(scores), _values(truth)
    if s.shape != t.shape:
        raise ValueError(f"scores and truth differ in length: {s.size} vs {t.size}")
    ok = np.isfinite(s) & np.isfinite(t)
    s, t = s[ok], t[ok]
    out = {"kendall_tau": _NAN, "weighted_tau": _NAN, "n": int(ok.sum())}
    if s.size < 3 or np.ptp(s) == 0 or np.ptp(t) == 0:
        return out
    if lower_is_better:
        s = -s
    out["kendall_tau"] = float(sps.kendalltau(s, t).statistic)
    out["weighted_tau"] = float(sps.weightedtau(s, t).statistic)
    return out


def _order(values: Sequence[float], lower_is_better: bool) -> list[int]:
    """Indices best → worst; NaN last; ties (to 10 significant digits) keep the input order."""
    v = _values(values)
    key = np.where(np.isfinite(v), v if lower_is_better else -v, np.inf)
    return [int(i) for i in np.argsort(key, kind="stable")]


def rank_table(
    rows: Sequence[Mapping[str, Any]],
    truth_key: str | None,
    directions: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    """Rank the candidates by every score they carry and correlate each ranking with the ground truth.

    Args:
        rows: One mapping per candidate with ``name``, score keys (any of :data:`SCORE_DIRECTIONS`, or of
            ``directions``), optionally the NCTI raw terms (:data:`~nc_finetune.transfer.scores.NCTI_TERMS`) and the
            ground truth under ``truth_key``. Rows are not modified.
        truth_key: Key of the ground-truth accuracy (higher = better); None when there is none.
        directions: Extra or overriding score directions (name → lower_is_better).

    Returns:
        ``names``; ``scores`` (score → per-row values, in row order; an ``ncti`` column is added from the raw terms
        via :func:`~nc_finetune.transfer.scores.ncti_combine` when every row carries them); ``directions`` (the
        lower_is_better flag of each score); ``rankings`` (score → names best → worst, NaN last); ``correlations``
        (score → :func:`correlations` result; empty without ground truth); ``truth`` (per-row values or None);
        ``truth_ranking``; ``ncti`` (per-row NCTI or None); ``notes`` (e.g. a missing size ranker).
    """
    dirs = {**SCORE_DIRECTIONS, **(directions or {})}
    names = [str(r.get("name", i)) for i, r in enumerate(rows)]
    ncti = None
    if rows and all(all(k in r for k in NCTI_TERMS) for r in rows):
        ncti = ncti_combine(rows)
    scores: dict[str, list[float]] = {}
    for key in dirs:
        if key == "ncti" and ncti is not None:
            scores["ncti"] = ncti
        elif key != truth_key and any(key in r for r in rows):
            scores[key] = [_num(r.get(key)) for r in rows]
    truth = [_num(r.get(truth_key)) for r in rows] if truth_key is not None else None
    notes = []
    if not any(k in scores for k in _SIZE_KEYS):
        notes.append("no 'params' column: the trivial size ranker is missing from this table")
    return {
        "names": names,
        "scores": scores,
        "directions": {k: dirs[k] for k in scores},
        "rankings": {k: [names[i] for i in _order(v, dirs[k])] for k, v in scores.items()},
        "correlations": {k: correlations(v, truth, dirs[k]) for k, v in scores.items()} if truth is not None else {},
        "truth": truth,
        "truth_ranking": [names[i] for i in _order(truth, False)] if truth is not None else None,
        "ncti": ncti,
        "notes": notes,
    }


def _fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.2f}"


def plot_rank(
    rows: Sequence[Mapping[str, Any]],
    truth_key: str | None,
    path: str | Path,
    title: str | None = None,
    directions: Mapping[str, bool] | None = None,
) -> Path:
    """One panel per score: the score against ground-truth accuracy, or a bar chart per candidate without truth.

    With ground truth, each panel plots the candidates' score (x; log scale for nc1 / nc1_trace / cdnv when all
    positive) against their accuracy (y), labels the points with the candidate names and shows τ and τ_w in its
    title. Without ground truth (``truth_key`` None or all values missing), each panel is a bar chart of the score.

    Args:
        rows: As for :func:`rank_table`.
        truth_key: Ground-truth key or None.
        path: Destination PNG (written atomically).
        title: Figure title.
        directions: Extra or overriding score directions.

    Returns:
        The written path.

    Raises:
        ValueError: No row carries any known score.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = rank_table(rows, truth_key, directions)
    keys = list(table["scores"])
    if not keys:
        raise ValueError("plot_rank: the rows carry no known score (see SCORE_DIRECTIONS)")
    truth = table["truth"]
    have_truth = truth is not None and any(math.isfinite(v) for v in truth)
    names = table["names"]
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        vals = table["scores"][key]
        lower = table["directions"][key]
        finite = [v for v in vals if math.isfinite(v)]
        log = key in LOG_SCORES and bool(finite) and min(finite) > 0
        arrow = "lower is better" if lower else "higher is better"
        if have_truth:
            ax.scatter(vals, truth, s=22)
            for x, y, name in zip(vals, truth, names, strict=True):
                if math.isfinite(x) and math.isfinite(y):
                    ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            corr = table["correlations"][key]
            ax.set_title(f"{key} ({arrow})\nτ = {_fmt(corr['kendall_tau'])}, τ_w = {_fmt(corr['weighted_tau'])}",
                         fontsize=9)
            ax.set_xlabel(key)
            ax.set_ylabel(truth_key)
            if log:
                from matplotlib.ticker import NullFormatter

                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels (2×10⁰, 3×10⁰ ...) collide
        else:
            pos = np.arange(len(vals))
            ax.bar(pos, [v if math.isfinite(v) else 0.0 for v in vals])
            ax.set_xticks(pos)
            ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{key} ({arrow})", fontsize=9)
            if log:
                ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()

    def _save(tmp: str) -> None:
        fig.savefig(tmp, dpi=100, format="png")

    try:
        return atomic_write(path, _save)
    finally:
        plt.close(fig)
