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

The tasks, modes and seeds are the experiment file ``experiments/layer_selection.yaml`` (``--list-tasks`` prints it).
Per-task defaults keep a run under about a minute on 2 CPU cores: 2000 training samples,
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
    python benchmarks/run.py layer_selection --seeds 0 1 2 --workdir runs/bench-layer-selection
    # one task, a tighter budget for every selecting mode
    python benchmarks/run.py layer_selection --tasks effnet-fm --set selection.max_blocks=1
    # a smoke run (seconds): the experiment file's smoke preset
    python benchmarks/run.py layer_selection --smoke
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import harness
from common import start_study
from comparison import ModeComparison

NAME = "layer_selection"
EXPERIMENT = harness.load_experiment(NAME)
TASKS = EXPERIMENT.settings
MODES = EXPERIMENT.modes
NC_MODES = tuple(EXPERIMENT.params["nc_modes"])
REFERENCE = EXPERIMENT.params["reference"]
COMPARE = ModeComparison(NC_MODES, REFERENCE)


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


def build_parser() -> argparse.ArgumentParser:
    p = harness.study_parser(
        EXPERIMENT, __doc__, settings_alias="--tasks",
        helps={"modes": f"modes, of {', '.join(MODES)} (default: all; the wins need {' or '.join(NC_MODES)}, "
                        f"Δ vs full needs {REFERENCE})",
               "set": "recipe override shared by every run, after the task defaults, repeatable "
                      "(e.g. --set selection.max_blocks=1 --set train.epochs=3)",
               "cache_prefix": "train.cache_prefix of every run (default 'recipe', i.e. auto: the frozen prefix "
                               "runs once, so s/epoch reflects how deep the selected blocks are; 'off' times the "
                               "blocks alone)",
               "workdir": "keep the run directories here (TASK/seedS/MODE); a finished identical run found there is "
                          "reused, so an interrupted benchmark continues (default: a temporary directory, deleted)"})
    return p


def main(argv: list[str] | None = None) -> int:
    args = harness.parse_args(build_parser(), EXPERIMENT, argv)
    extra = args.overrides
    shared = harness.shared_overrides(args)
    env = harness.subprocess_env(args.threads)

    plan = []
    for task in args.tasks:
        t = TASKS[task]
        for seed in args.seeds:
            for mode in args.modes:
                over = [*t["overrides"], f"train.seed={seed}", f"selection.seed={seed}", *shared, *extra,
                        *MODES[mode]]
                plan.append({"task": task, "recipe": t["recipe"], "seed": seed, "mode": mode, "overrides": over,
                             "path": f"{task}/seed{seed}/{mode}"})
    if harness.plan_only(plan, args):
        return 0

    info, cmd = start_study("Layer selection: NC-guided blocks vs other choices at a matched budget")
    runs = harness.run_plan(plan, args.workdir, env, prefix=NAME)

    tables: dict[str, list[dict[str, Any]]] = {}
    task_wins: dict[str, list[dict[str, Any]]] = {}
    identical: dict[str, list[str]] = {}
    for task in args.tasks:
        mine = [r for r in runs if r["task"] == task]
        by_mode, failed = harness.by_mode(mine, args.modes)
        failures = [f"{k}: {v}" for k, v in failed.items()]
        tables[task] = COMPARE.task_rows(by_mode)
        task_wins[task] = COMPARE.wins(by_mode)
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
        print(COMPARE.main_table(tables[task], failures))
        notes = identical_selections(by_mode)
        for note in notes:
            print(f"\n- note: {note}")
        identical[task] = notes
        print()

    print("### Wins of the NC-guided modes\n")
    print(COMPARE.wins_table(task_wins))
    print("\nΔ = accuracy of the NC-guided mode minus the other mode's, paired per seed (mean ± std over seeds); "
          "W-T-L = seeds on which the NC-guided mode was better / equal / worse. s/epoch = training seconds per "
          "epoch (no evaluation, no cache build). trainable % = trainable / all parameters (head included).\n")
    png = COMPARE.plot(tables, args.out.with_suffix(".png"), "Layer selection at a matched budget")
    harness.report(NAME, args, cmd, info, tasks={t: TASKS[t] for t in args.tasks},
                   modes={m: MODES[m] for m in args.modes}, tables=tables, wins=task_wins,
                   identical_selections=identical, figure=png, runs=runs)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
