"""Evidence (c): at a matched budget, do NC-guided blocks fine-tune better than other ways of choosing them?

For each task (an offline ``run`` recipe plus small per-task defaults) and seed, every mode runs as its own fresh
process (``python -m nc_finetune.cli run <recipe> <overrides> --out <workdir>/<task>/seed<s>/<mode> --quiet``) and its
``summary.json`` is read back. Modes:

* ``stall``        -- NC-guided: the blocks right after NC1 stops falling (``selection.strategy=stall``), fine-tuned.
* ``knee``         -- NC-guided: the blocks that fall furthest short of the equi-separation fit (``knee``).
* ``last_k``       -- baseline: the last blocks, fine-tuned.
* ``random_k``     -- baseline: random blocks (``selection.seed`` = the seed), fine-tuned.
* ``auto_rgn``     -- baseline: surgical fine-tuning's relative-gradient-norm rule (Auto-RGN), fine-tuned.
* ``lora_all``     -- LoRA on every block (``selection.strategy=all adapt.method=lora``).
* ``full``         -- every parameter trains (``adapt.method=full``).
* ``linear_probe`` -- head only.

The five block-selecting modes (``stall`` ... ``auto_rgn``) share the recipe's budget (``selection.max_blocks`` and
``selection.max_param_fraction``; override both for every task with ``--set``), so they differ only in *which*
blocks they choose; ``lora_all``, ``full`` and ``linear_probe`` are the usual references. Each seed sets
``train.seed`` and ``selection.seed``; the probe and the data subsample are the same for every seed, so ``stall`` and
``knee`` pick the same blocks each time while ``random_k`` (and, through its mini-batches, ``auto_rgn``) vary.
Mind the budget: the budget is filled greedily in each rule's ranking order, and a block larger than what is left
is skipped. EfficientNet-Lite0's recipe budget (10% of the backbone, 2 blocks) holds none of blocks.5.1 ... 6.0
(14-18% each), so every deep-first rule lands on blocks.4.x / 5.0 and may coincide with ``last_k``; the script
notes an NC-guided mode that chose exactly another mode's blocks on every seed (a tie by construction). A blocks-only
budget lets the rules differ: ``--set selection.max_param_fraction=null``.

Per-task defaults keep a run under about a minute on 2 CPU cores (see ``--list-tasks``): 2000 training samples,
1000 test samples, 100 probed samples per class, 2 epochs at 64 px for EfficientNet-Lite0, 1 epoch for MiniLM.
``--set`` overrides are applied after them (and before the mode's own keys).

Per task the table shows: mode, the selected blocks (the most common set over seeds, with how many seeds chose
it), test accuracy mean ± std over seeds, its difference from ``full`` (paired per seed), trainable parameters in %
of the model, and the mean training seconds per epoch (no evaluation, no prefix-cache build; with the default
``train.cache_prefix=auto`` a deep selection trains faster because the frozen prefix runs once). Then the wins:
each NC-guided mode against each other mode, the mean paired difference in points and on how many seeds it won
(W-T-L), per task and pooled over tasks. The PNG plots test accuracy against trainable % (one panel per task).

Examples:
    # the real CPU run: 3 tasks x 8 modes x 3 seeds, runs kept (an interrupted run continues where it stopped)
    python benchmarks/layer_selection.py --seeds 0 1 2 --workdir runs/bench-layer-selection
    # one task, a tighter budget for every selecting mode
    python benchmarks/layer_selection.py --tasks effnet-fm --set selection.max_blocks=1
    # a smoke run (seconds)
    python benchmarks/layer_selection.py --tasks effnet-fm --modes stall last_k --seeds 0 \\
        --set train.max_steps=2 --set data.max_train_samples=60 --set data.max_eval_samples=30 \\
        --set probe.samples_per_class=10 --out /tmp/ls-smoke.json
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    command_line,
    default_out,
    fmt_stat,
    machine_info,
    markdown_table,
    mean_std,
    parse_overrides,
    print_header,
    write_results,
)
from finetune_efficiency import _recipe_dict, _slim, cache_override, run_mode

NAME = "layer_selection"
_SMALL = ["data.max_train_samples=2000", "data.max_eval_samples=1000", "probe.samples_per_class=100"]
TASKS: dict[str, dict[str, Any]] = {
    "effnet-fm": {"recipe": "effnet-lite0-fashion-mnist", "overrides": [*_SMALL, "train.epochs=2"],
                  "about": "EfficientNet-Lite0 (64 px) on Fashion-MNIST"},
    "effnet-mnist": {"recipe": "effnet-lite0-fashion-mnist",
                     "overrides": ["data.name=mnist-5k", *_SMALL, "train.epochs=2"],
                     "about": "EfficientNet-Lite0 (64 px) on MNIST-5k (the Fashion-MNIST recipe, data swapped)"},
    "minilm-rt": {"recipe": "minilm-rotten-tomatoes", "overrides": [*_SMALL, "train.epochs=1"],
                  "about": "MiniLM-L6 (max_length 64, mean pooling) on Rotten Tomatoes"},
}
MODES: dict[str, list[str]] = {
    "stall": ["selection.strategy=stall", "adapt.method=finetune"],
    "knee": ["selection.strategy=knee", "adapt.method=finetune"],
    "last_k": ["selection.strategy=last_k", "adapt.method=finetune"],
    "random_k": ["selection.strategy=random_k", "adapt.method=finetune"],
    "auto_rgn": ["selection.strategy=auto_rgn", "adapt.method=finetune"],
    "lora_all": ["selection.strategy=all", "adapt.method=lora"],
    "full": ["adapt.method=full"],
    "linear_probe": ["adapt.method=linear_probe"],
}
NC_MODES = ("stall", "knee")
REFERENCE = "full"


# --------------------------------------------------------------------------------------------------- running


def validate_plan(plan: list[dict[str, Any]]) -> None:
    """Resolve every run's recipe before anything trains (a typo fails in a second, not after an hour).

    Raises:
        SystemExit: an override that the recipe schema rejects.
    """
    for item in plan:
        try:
            item["resolved"] = _recipe_dict(item["recipe"], item["overrides"])
        except Exception as e:
            raise SystemExit(f"{item['recipe']} {' '.join(item['overrides'])}: {e}") from None


def run_plan(plan: list[dict[str, Any]], workdir: Path | None, env: dict[str, str],
             prefix: str = NAME) -> list[dict[str, Any]]:
    """Run every planned ``nc-finetune run`` in a fresh process (reusing finished identical runs in ``workdir``).

    Args:
        plan: Items with ``recipe``, ``overrides`` and ``path`` (the run directory relative to the workdir), plus
            any labels (copied into the record).
        workdir: Keep the run directories here; ``None``: a temporary directory deleted at the end.
        env: Environment of the subprocesses.
        prefix: Name prefix of the temporary directory.

    Returns:
        One record per item: the labels, ``command``, ``rc``, ``wall_seconds``, ``reused`` and ``result`` (the
        summary keys the benchmarks read) or ``error``.
    """
    tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix=f"nc_{prefix}_")) if tmp else workdir
    records = []
    try:
        for i, item in enumerate(plan, 1):
            run_dir = root / item["path"]
            print(f"[{i}/{len(plan)}] {item['path']} ...", file=sys.stderr, flush=True)
            rec = run_mode(item["recipe"], item["overrides"], run_dir, env)
            wall = f"{rec['wall_seconds']:.0f} s" if rec["wall_seconds"] is not None else "reused"
            print(f"    {'ok' if 'summary' in rec else 'FAILED: ' + rec['error']} ({wall})", file=sys.stderr,
                  flush=True)
            rec |= {k: v for k, v in item.items() if k != "resolved"}
            if "summary" in rec:
                rec["result"] = _slim(rec.pop("summary"))
            records.append(rec)
    finally:
        if tmp:
            shutil.rmtree(root, ignore_errors=True)
    return records


def subprocess_env(threads: int | None) -> dict[str, str]:
    """Environment of the runs: quiet tokenizers, and ``OMP/MKL_NUM_THREADS`` when ``threads`` is given."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        import torch

        torch.set_num_threads(threads)  # so the header shows what the runs use
    return env


# --------------------------------------------------------------------------------------------------- statistics


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


def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """``a[s] - b[s]`` for every seed in both."""
    return [a[s] - b[s] for s in sorted(a) if s in b]


def wtl(diffs: list[float], tol: float = 1e-9) -> str:
    """Wins-ties-losses of paired differences, e.g. ``2-0-1``."""
    w = sum(d > tol for d in diffs)
    t = sum(abs(d) <= tol for d in diffs)
    return f"{w}-{t}-{len(diffs) - w - t}"


def accuracies(runs: dict[int, dict[str, Any]]) -> dict[int, float]:
    """Test accuracy in % per seed."""
    return {s: 100 * r["test_accuracy"] for s, r in runs.items()}


def task_rows(by_mode: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-mode statistics of one task, in :data:`MODES` order.

    Args:
        by_mode: ``{mode: {seed: slim summary}}`` (failed runs absent).
    """
    ref = accuracies(by_mode.get(REFERENCE, {}))
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
            "delta_vs_full_points": paired(acc, ref) if mode != REFERENCE else [],
            "trainable_pct": [100 * r["trainable_params"] / r["total_params"] for r in runs.values()],
            "trainable_params": [r["trainable_params"] for r in runs.values()],
            "seconds_per_epoch": [r["seconds_per_epoch"] for r in runs.values()],
            "steps": [r["steps"] for r in runs.values()],
        })
    return rows


def wins(by_mode: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every NC-guided mode against every other mode: paired accuracy differences (points) per seed."""
    out = []
    for nc in NC_MODES:
        if not by_mode.get(nc):
            continue
        mine = accuracies(by_mode[nc])
        for other, runs in by_mode.items():
            if other in NC_MODES or not runs:
                continue
            d = paired(mine, accuracies(runs))
            if d:
                out.append({"nc_mode": nc, "baseline": other, "diff_points": d,
                            "seeds": [s for s in sorted(mine) if s in runs]})
    return out


def identical_selections(by_mode: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """Notes on NC-guided modes that chose exactly the blocks of another selecting mode on every common seed (their
    runs are then the same run, so the comparison is a tie by construction, not evidence)."""
    selecting = [m for m, keys in MODES.items() if "adapt.method=finetune" in keys]
    notes = []
    for nc in NC_MODES:
        for other in selecting:
            if other == nc or (other in NC_MODES and NC_MODES.index(other) < NC_MODES.index(nc)):
                continue
            a, b = by_mode.get(nc, {}), by_mode.get(other, {})
            seeds = [s for s in a if s in b]
            if seeds and all(a[s]["selected_blocks"] == b[s]["selected_blocks"] for s in seeds):
                notes.append(f"{nc} and {other} chose the same blocks on all {len(seeds)} seed(s) "
                             f"({', '.join(a[seeds[0]]['selected_blocks'])}): identical runs, a tie by construction")
    return notes


# --------------------------------------------------------------------------------------------------- reporting


def main_table(rows: list[dict[str, Any]], failures: list[str]) -> str:
    out = []
    for r in rows:
        delta = "(ref)" if r["mode"] == REFERENCE else fmt_stat(r["delta_vs_full_points"], "+.2f")
        spe = mean_std(r["seconds_per_epoch"])[0]
        mode = r["mode"] + (" (NC)" if r["mode"] in NC_MODES else "")
        out.append([mode, r["blocks"], fmt_stat(r["accuracy_pct"], ".2f"), delta,
                    fmt_stat(r["trainable_pct"], ".3g"), "n/a" if math.isnan(spe) else f"{spe:.1f}",
                    str(len(r["seeds"]))])
    for f in failures:
        out.append([f"FAILED {f[:100]}", "", "", "", "", "", ""])
    headers = ["mode", "selected blocks (most common)", "test acc %", "Δ vs full (pts)", "trainable %",
               "s/epoch", "seeds"]
    return markdown_table(headers, out, align=["l", "l"] + ["r"] * 5)


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


def plot_tasks(tables: dict[str, list[dict[str, Any]]], path: Path,
               title: str = "Layer selection at a matched budget") -> Path | None:
    """Test accuracy per mode (mean ± std over seeds, trainable % annotated), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nc_finetune.utils.io import atomic_write

    tasks = [t for t, rows in tables.items() if rows]
    if not tasks:
        return None
    n_modes = max(len(tables[t]) for t in tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6.5, 5.0 * len(tasks)), 1.2 + 0.45 * n_modes),
                             squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = tables[task]
        stats = [mean_std(r["accuracy_pct"]) for r in rows]
        ys = list(range(len(rows)))[::-1]
        colors = ["tab:red" if r["mode"] in NC_MODES else "tab:gray" for r in rows]
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
                            (m + (s if math.isfinite(s) else 0.0), y), textcoords="offset points", xytext=(5, -3),
                            fontsize=7)
        ax.set_xlabel("test accuracy % (mean ± std over seeds)")
        ax.set_title(task, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"{title} (red = NC-guided)", fontsize=11)
    fig.tight_layout()

    def _save(tmp: str) -> None:
        fig.savefig(tmp, dpi=110, format="png")

    try:
        return atomic_write(path, _save)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------------- main


def task_listing() -> str:
    lines = ["tasks (recipe + per-task defaults; --set is applied after them):"]
    for name, t in TASKS.items():
        lines.append(f"  {name:<13} {t['about']}\n  {'':<13} {t['recipe']} {' '.join(t['overrides'])}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/layer_selection.py",
        description=__doc__[:__doc__.index("Examples:")].rstrip(),
        epilog=task_listing() + "\n\n" + __doc__[__doc__.index("Examples:"):],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), metavar="TASK",
                   help=f"tasks, of {', '.join(TASKS)} (default: all)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), metavar="MODE",
                   help=f"modes, of {', '.join(MODES)} (default: all; the wins need {' or '.join(NC_MODES)}, "
                        f"Δ vs full needs {REFERENCE})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED",
                   help="seeds; each sets train.seed and selection.seed (default: 0 1 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override shared by every run, after the task defaults, repeatable "
                        "(e.g. --set selection.max_blocks=1 --set train.epochs=3)")
    p.add_argument("--cache-prefix", choices=["off", "auto", "on", "recipe"], default="recipe",
                   help="train.cache_prefix of every run (default 'recipe', i.e. auto: the frozen prefix runs once, "
                        "so s/epoch reflects how deep the selected blocks are; 'off' times the blocks alone)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="sets train.device and probe.device (default: the recipe's, i.e. auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP/MKL threads of each run (default: unset, torch uses all cores)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the run directories here (TASK/seedS/MODE); a finished identical run found there is "
                        "reused, so an interrupted benchmark continues (default: a temporary directory, deleted)")
    p.add_argument("--out", type=Path, default=default_out(NAME),
                   help=f"JSON of the raw results (default {default_out(NAME).relative_to(REPO_ROOT)}); the figure "
                        "goes next to it with the suffix .png")
    p.add_argument("--list-tasks", action="store_true", help="print the tasks and their defaults, then exit")
    p.add_argument("--dry-run", action="store_true",
                   help="validate every run's recipe, print the runs (and the step schedule) and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_tasks:
        print(task_listing())
        return 0
    args.tasks, args.modes, args.seeds = (list(dict.fromkeys(x)) for x in (args.tasks, args.modes, args.seeds))
    extra = parse_overrides(args.overrides)
    shared: list[str] = []
    if args.device is not None:
        shared += [f"train.device={args.device}", f"probe.device={args.device}"]
    if args.cache_prefix != "recipe":
        shared.append(cache_override(args.cache_prefix))
    env = subprocess_env(args.threads)

    plan = []
    for task in args.tasks:
        t = TASKS[task]
        for seed in args.seeds:
            for mode in args.modes:
                over = [*t["overrides"], f"train.seed={seed}", f"selection.seed={seed}", *shared, *extra,
                        *MODES[mode]]
                plan.append({"task": task, "recipe": t["recipe"], "seed": seed, "mode": mode, "overrides": over,
                             "path": f"{task}/seed{seed}/{mode}"})
    validate_plan(plan)
    if args.dry_run:
        for item in plan:
            print(f"{item['path']}: {item['recipe']} {' '.join(item['overrides'])}")
        return 0

    info = machine_info()
    cmd = command_line()
    print_header("Layer selection: NC-guided blocks vs other choices at a matched budget", info, cmd)
    runs = run_plan(plan, args.workdir, env)

    tables: dict[str, list[dict[str, Any]]] = {}
    task_wins: dict[str, list[dict[str, Any]]] = {}
    identical: dict[str, list[str]] = {}
    for task in args.tasks:
        mine = [r for r in runs if r["task"] == task]
        by_mode: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in args.modes}
        failures = []
        for r in mine:
            if "result" in r:
                by_mode[r["mode"]][r["seed"]] = r["result"]
            else:
                failures.append(f"{r['mode']} (seed {r['seed']}): {r['error']}")
        tables[task] = task_rows(by_mode)
        task_wins[task] = wins(by_mode)
        resolved = next(p["resolved"] for p in plan if p["task"] == task)
        sel, d, tr = resolved["selection"], resolved["data"], resolved["train"]
        ok = next((r["result"] for r in mine if "result" in r), None)
        print(f"### {task}: {TASKS[task]['about']}\n")
        print(f"- recipe `{TASKS[task]['recipe']}` + `{' '.join(TASKS[task]['overrides'] + shared + extra)}`")
        sizes = f"{ok['train_samples']} training / {ok['test_samples']} test samples" if ok else \
            f"data.max_train_samples={d['max_train_samples']}"
        cap = f" (max_steps {tr['max_steps']})" if tr["max_steps"] else ""
        print(f"- {d['name']}: {sizes}; {tr['epochs']} epoch(s){cap}, batch {tr['batch_size']}, "
              f"lr {tr['lr']:g} (head {tr['head_lr'] if tr['head_lr'] is not None else tr['lr']:g}); "
              f"probe {resolved['probe']['samples_per_class']}/class; seeds {' '.join(map(str, args.seeds))}")
        print(f"- matched budget of every selecting mode: selection.max_blocks={sel['max_blocks']}, "
              f"max_param_fraction={sel['max_param_fraction']}\n")
        print(main_table(tables[task], failures))
        notes = identical_selections(by_mode)
        for note in notes:
            print(f"\n- note: {note}")
        identical[task] = notes
        print()

    print("### Wins of the NC-guided modes\n")
    print(wins_table(task_wins))
    print("\nΔ = accuracy of the NC-guided mode minus the other mode's, paired per seed (mean ± std over seeds); "
          "W-T-L = seeds on which the NC-guided mode was better / equal / worse. s/epoch = training seconds per "
          "epoch (no evaluation, no cache build). trainable % = trainable / all parameters (head included).\n")
    png = plot_tasks(tables, args.out.with_suffix(".png"))
    payload = {"benchmark": NAME, "command": cmd, "machine": info,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "tasks": {t: TASKS[t] for t in args.tasks}, "modes": {m: MODES[m] for m in args.modes},
               "tables": tables, "wins": task_wins, "identical_selections": identical,
               "figure": str(png) if png else None, "runs": runs}
    path = write_results(args.out, payload)
    print(f"raw results: {path}" + (f"; figure: {png}" if png else ""))
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
