"""Honesty check: under an input-level shift, which blocks should be tuned, and does NC guidance find them?

Surgical fine-tuning (Lee et al., ICLR 2023) found that when a model trained on a source domain meets the same
classes with corrupted inputs (CIFAR-10-C), tuning the *first* block beats tuning the last ones or all of them.
The NC rules read where downstream collapse stalls, which is deep in the network, so this is the setting where
they are expected to lose. This script measures it:

1. **source**: full fine-tuning of EfficientNet-Lite0 on clean Fashion-MNIST (one run, ``source/``);
2. **target**: the same classes with a CIFAR-10-C corruption (``data.corruption``, both splits), starting from the
   source model (``backbone.init_from=<workdir>/source``); every mode below is a fresh ``nc-finetune run`` per seed
   at the recipe's matched budget (``selection.max_blocks``, ``selection.max_param_fraction``).

Modes: ``first_k`` (surgical fine-tuning's choice), ``stall`` and ``knee`` (NC-guided, probed on the corrupted
target data through the source model), ``last_k``, ``random_k``, ``auto_rgn`` (surgical fine-tuning's automatic
rule, used as a block ranking), ``full`` and ``linear_probe`` (the source features, a new head).

Per corruption the table shows test accuracy (mean ± std over seeds) on the corrupted test split, the paired
difference to ``full``, the trainable share and the selected blocks; then the NC modes' wins against every other
mode. Tables go to stdout (Markdown), raw results to ``--out`` (JSON) and a figure next to it.

Examples:
    # the CPU run recorded in benchmarks/README.md
    python benchmarks/run.py input_shift --corruptions gaussian_noise:5 --seeds 0 1 2 --workdir runs/bench-input-shift
    # a smoke run (a minute): the experiment file's smoke preset
    python benchmarks/run.py input_shift --smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import harness
from common import REPO_ROOT, start_study
from comparison import ModeComparison

NAME = "input_shift"
EXPERIMENT = harness.load_experiment(NAME)
RECIPE = EXPERIMENT.params["recipe"]
SOURCE = EXPERIMENT.params["source"]
TARGET = EXPERIMENT.params["target"]
MODES = EXPERIMENT.modes
COMPARE = ModeComparison(tuple(EXPERIMENT.params["nc_modes"]), EXPERIMENT.params["reference"])


def parse_corruption(text: str) -> tuple[str, int]:
    """``name`` or ``name:severity`` (default severity 5, the strongest, as in surgical fine-tuning's tables)."""
    from nc_finetune.data.corrupt import CORRUPTIONS

    name, _, sev = text.partition(":")
    if name not in CORRUPTIONS:
        raise argparse.ArgumentTypeError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    try:
        severity = int(sev) if sev else 5
    except ValueError:
        raise argparse.ArgumentTypeError(f"severity of {text!r} must be an integer 1..5") from None
    if not 1 <= severity <= 5:
        raise argparse.ArgumentTypeError(f"severity of {text!r} must be 1..5")
    return name, severity


def source_on_target(source_dir: Path, name: str, severity: int) -> dict[str, Any]:
    """The source run scored on the corrupted test split (``nc-finetune eval`` with data overrides): the same 1000
    test images, corrupted with the same seed, that every target run is tested on."""
    from nc_finetune.pipeline import eval_stage

    return eval_stage(source_dir, data_overrides=[f"data.corruption={name}", f"data.corruption_severity={severity}",
                                                  *(o for o in TARGET if o.startswith("data."))])


def task_name(name: str, severity: int) -> str:
    """``gaussian_noise-5``; ``invert`` has no severity."""
    return name if name == "invert" else f"{name}-{severity}"


def build_parser() -> argparse.ArgumentParser:
    p = harness.study_parser(
        EXPERIMENT, __doc__, settings_alias="--corruptions", settings_type=parse_corruption,
        settings_default=[parse_corruption(c) for c in EXPERIMENT.params["corruptions"]],
        flags=("settings", "modes", "seeds", "set", "workdir", "out", "smoke", "threads", "dry_run"),
        workdir=REPO_ROOT / "runs" / "bench-input-shift",
        helps={"settings": f"target shifts, NAME[:SEVERITY] (default {' '.join(EXPERIMENT.params['corruptions'])})",
               "seeds": "seeds of the target runs; each sets train.seed and selection.seed (default: "
                        f"{' '.join(map(str, EXPERIMENT.seeds))})",
               "set": "recipe override of every target run, after the defaults, repeatable",
               "workdir": "run directories (source/, CORRUPTION/seedS/MODE); finished identical runs are reused "
                          "(default runs/bench-input-shift)"})
    p.add_argument("--source-set", dest="source_overrides", action="append", type=harness.override, default=[],
                   metavar="KEY=VALUE", help="recipe override of the source run, repeatable")
    return p


def main(argv: list[str] | None = None) -> int:
    args = harness.parse_args(build_parser(), EXPERIMENT, argv)
    extra, source_extra = args.overrides, args.source_overrides
    env = harness.subprocess_env(args.threads)
    workdir = args.workdir.resolve()
    source_dir = workdir / "source"
    source = [{"task": "source", "recipe": RECIPE, "seed": 0, "mode": "full", "path": "source",
               "overrides": [*SOURCE, *source_extra]}]
    plan = []
    for name, severity in args.corruptions:
        task = task_name(name, severity)
        for seed in args.seeds:
            for mode in args.modes:
                over = [*TARGET, f"data.corruption={name}", f"data.corruption_severity={severity}",
                        f"backbone.init_from={source_dir}", f"train.seed={seed}", f"selection.seed={seed}", *extra,
                        *MODES[mode]]
                plan.append({"task": task, "recipe": RECIPE, "seed": seed, "mode": mode, "overrides": over,
                             "path": f"{task}/seed{seed}/{mode}"})
    if harness.plan_only(source + plan, args):
        return 0

    info, cmd = start_study("Input-level shift: which blocks to tune after a corruption of the inputs")
    src = harness.run_plan(source, workdir, env, prefix=NAME)[0]
    if "result" not in src:
        raise SystemExit(f"the source run failed: {src.get('error')} (log: {src.get('log')})")
    s = src["result"]
    print(f"- source: `{RECIPE} {' '.join(source[0]['overrides'])}` → clean test accuracy "
          f"{100 * s['test_accuracy']:.2f}% ({s['train_samples']} training images)\n")
    runs = harness.run_plan(plan, workdir, env, prefix=NAME)

    tables: dict[str, list[dict[str, Any]]] = {}
    task_wins: dict[str, list[dict[str, Any]]] = {}
    unadapted: dict[str, dict[str, Any]] = {}
    for name, severity in args.corruptions:
        task = task_name(name, severity)
        by_mode, failed = harness.by_mode([r for r in runs if r["task"] == task], args.modes)
        failures = [f"{k}: {v}" for k, v in failed.items()]
        tables[task], task_wins[task] = COMPARE.task_rows(by_mode), COMPARE.wins(by_mode)
        print(f"### {task} (target: corrupted Fashion-MNIST, from the source model)\n")
        print(f"- target runs: `{RECIPE} {' '.join(TARGET + extra)}`; seeds {' '.join(map(str, args.seeds))}")
        unadapted[task] = source_on_target(source_dir, name, severity)
        print(f"- the source model itself on this corrupted test split, no adaptation: "
              f"{100 * unadapted[task]['accuracy']:.2f}% (clean: {100 * s['test_accuracy']:.2f}%)\n")
        print(COMPARE.main_table(tables[task], failures))
        print()
    print("### Wins of the NC-guided modes\n")
    print(COMPARE.wins_table(task_wins))
    print()
    png = COMPARE.plot(tables, args.out.with_suffix(".png"),
                       "Input-level shift: target accuracy after adapting the source model")
    harness.report(NAME, args, cmd, info, source=src, source_unadapted=unadapted,
                   modes={m: MODES[m] for m in args.modes}, tables=tables, wins=task_wins, figure=png, runs=runs)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
