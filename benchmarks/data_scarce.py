"""Evidence (d): how do NC-selected adaptation methods hold up when labelled data is scarce?

For each task, training-set size and seed, every mode runs as its own fresh process
(``python -m nc_finetune.cli run <recipe> <overrides> --out <workdir>/<task>/<size>/seed<s>/<mode> --quiet``) and its
``summary.json`` is read back. Sizes (``--sizes``) are samples per class: ``data.max_train_samples = n·K`` (a
stratified, seeded subsample), and ``full`` = the recipe's own ``data.max_train_samples`` (EfficientNet-Lite0 /
Fashion-MNIST: 10000 = 1000 per class; MiniLM / Rotten Tomatoes: 8000 = 4000 per class). The probe that drives the
NC selection is drawn from the same subsample (``probe.samples_per_class`` caps it; at 10 per class it sees those
10), so the selection never looks at data the training could not use. Modes:

* ``scl``          -- SCL-FT: the NC-selected blocks fine-tuned with an additive skip from the deepest one to the
                      head (``adapt.method=scl adapt.scl_wiring=add``).
* ``nc-finetune``  -- the NC-selected blocks fine-tuned (the recipe's strategy and budget).
* ``nc-lora``      -- LoRA on the NC-selected blocks.
* ``full``         -- every parameter trains.
* ``linear_probe`` -- head only.
* ``nc-etf``       -- ``nc-finetune`` with a fixed simplex-ETF classifier (``adapt.head=etf``) the tuned blocks
                      must collapse onto (Li et al.'s principle: induce collapse while tuning).
* ``nc-penalty``   -- ``nc-finetune`` plus ``train.nc1_penalty``: λ·NC1 of the deepest tuned block's pooled
                      features, within each mini-batch, added to the loss.

Step-matching rule (every size sees about the same number of optimizer steps, so a small set is not simply
under-trained): with ``T`` = ``--steps-target`` (default: the recipe's own step count at full size, i.e.
``ceil(N_full / batch) · epochs``: 157 · 2 = 314 for EfficientNet, 250 · 1 = 250 for MiniLM),
``steps_per_epoch = ceil(ceil(N / batch) / grad_accum)`` and

    epochs = clamp(ceil(T / steps_per_epoch), 1, max_epochs),   train.max_steps = T,

so a run makes ``min(T, epochs · steps_per_epoch)`` steps and the full size runs exactly as the recipe does. Each run
evaluates about 10 times, the last epoch included (``train.eval_every_epochs = ceil(epochs / 10)``): at 10 images
per class EfficientNet runs 157 epochs of 2 steps, and a test pass after each would cost more than the training. The
cap ``max_epochs`` (``--max-epochs``; per-task default: EfficientNet 160, never binding at 10 per class; MiniLM
40, binding only at 10 per class: 20 reviews = 1 step per epoch, so 40 of 250 steps) bounds the number of epochs;
where it binds the run makes fewer than ``T`` steps, and the table marks it. The learning-rate schedule (warm-up +
cosine) spans the run's own steps. A ``--set`` of ``train.epochs``, ``train.max_steps`` or ``train.batch_size``
changes the default ``T`` (the recipe's steps at full size); the rule's keys then replace ``data.max_train_samples``,
``train.epochs`` and ``train.max_steps``. A ``--set train.eval_every_epochs=N`` is kept (e.g. 1 for a test pass after
every epoch).

Each seed sets ``train.seed`` and ``selection.seed``; the subsample stays the same for every seed unless
``--resample-data`` (then ``data.seed`` = the seed too, which also redraws the test subsample).

Reported per task: accuracy (mean ± std over seeds) of every mode at every size, its difference from the
``--reference`` mode at the same size (default ``full`` fine-tuning; mean, 95% t-interval and a win/tie/loss verdict:
a tie when the interval holds zero) and from the same mode at full size (both paired per seed), and the PNG of
accuracy against samples per class (log x), one line per mode.

Examples:
    # the real CPU run (EfficientNet-Lite0 on Fashion-MNIST; runs kept, an interrupted run continues)
    python benchmarks/run.py data_scarce --seeds 0 1 2 --workdir runs/bench-data-scarce
    # also MiniLM on Rotten Tomatoes
    python benchmarks/run.py data_scarce --tasks effnet-fm minilm-rt --seeds 0 1 2 --workdir runs/bench-data-scarce
    # the ETF head and the NC1 penalty against the linear head, 10 and 100 per class, data resampled per seed
    python benchmarks/run.py data_scarce --modes nc-finetune nc-etf nc-penalty --reference nc-finetune \
        --sizes 10 100 --seeds 0 1 2 --resample-data --workdir runs/bench-data-scarce-heads
    # a smoke run (seconds): the experiment file's smoke preset
    python benchmarks/run.py data_scarce --smoke
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import harness
from common import accuracies, finish_figure, fmt_stat, markdown_table, mean_std, paired, start_study
from comparison import blocks_label

from nc_finetune.sweep import mean_ci95, verdict

NAME = "data_scarce"
FULL = "full"  # the size that keeps the recipe's data.max_train_samples
EVALUATIONS = 10  # about this many validation/test evaluations per run (train.eval_every_epochs), the last included
EXPERIMENT = harness.load_experiment(NAME)
TASKS = EXPERIMENT.settings
MODES = EXPERIMENT.modes
REFERENCE = EXPERIMENT.params["reference"]


# --------------------------------------------------------------------------------------------------- the plan


def parse_size(text: str) -> int | str:
    """``10`` -> 10 samples per class; ``full`` -> the recipe's size."""
    if text == FULL:
        return FULL
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is a number of samples per class or 'full'; got {text!r}") from None
    if n < 2:
        raise argparse.ArgumentTypeError(f"need at least 2 samples per class (the probe needs 2); got {n}")
    return n


def size_label(size: int | str) -> str:
    return FULL if size == FULL else f"n{size}"


def available_train(resolved: dict[str, Any]) -> int:
    """Training samples the task's dataset holds (before any ``max_train_samples``)."""
    from nc_finetune.data import load_data

    d = resolved["data"]
    data = load_data(d["name"], train_split=d["train_split"], test_split=d["test_split"],
                     text_column=d["text_column"], image_column=d["image_column"], label_column=d["label_column"],
                     data_files=d["data_files"], max_train_samples=None, max_eval_samples=None, seed=d["seed"],
                     test_size=d["test_size"])
    return len(data.train)


def steps_per_epoch(n_train: int, train: dict[str, Any]) -> int:
    """Optimizer steps of one epoch over ``n_train`` samples (one process), after the validation split."""
    n = n_train - round(n_train * train["val_fraction"]) if train["val_fraction"] > 0 else n_train
    return max(1, math.ceil(math.ceil(max(1, n) / train["batch_size"]) / train["grad_accum_steps"]))


def recipe_steps(n_train: int, train: dict[str, Any]) -> int:
    """Steps the recipe itself makes at ``n_train`` samples (its epochs, capped by its max_steps)."""
    total = steps_per_epoch(n_train, train) * train["epochs"]
    return min(total, train["max_steps"]) if train["max_steps"] else total


def schedule(n_train: int, train: dict[str, Any], target: int, max_epochs: int) -> dict[str, int]:
    """The step-matching rule: ``epochs = clamp(ceil(T / steps_per_epoch), 1, max_epochs)``, ``max_steps = T``."""
    spe = steps_per_epoch(n_train, train)
    epochs = min(max_epochs, max(1, math.ceil(target / spe)))
    return {"steps_per_epoch": spe, "epochs": epochs, "max_steps": target, "steps": min(target, epochs * spe),
            "eval_every_epochs": math.ceil(epochs / EVALUATIONS)}


# --------------------------------------------------------------------------------------------------- statistics


def size_rows(runs_by: dict[tuple[Any, str], dict[int, dict[str, Any]]], sizes: list[Any], modes: list[str],
              plan_info: dict[Any, dict[str, Any]], reference: str = REFERENCE) -> list[dict[str, Any]]:
    """Per (size, mode): accuracy over seeds and the paired differences to the reference mode and the full size.

    Args:
        runs_by: ``{(size, mode): {seed: slim summary}}`` of one task (failed runs absent).
        sizes: Sizes in the order to report.
        modes: Modes in the order to report.
        plan_info: Per size the planned ``n_train``, ``per_class``, ``epochs``, ``steps`` ...
        reference: The mode every other one is compared with, paired per seed at the same size.
    """
    rows = []
    for size in sizes:
        ref = accuracies(runs_by.get((size, reference), {}))
        for mode in modes:
            runs = runs_by.get((size, mode), {})
            if not runs:
                continue
            acc = accuracies(runs)
            at_full = accuracies(runs_by.get((FULL, mode), {}))
            delta = paired(acc, ref) if mode != reference else []
            stat = mean_ci95(delta)
            rows.append({
                "size": size, "mode": mode, **plan_info[size],
                "seeds": sorted(runs),
                "blocks": blocks_label(list(runs.values())),
                "accuracy_pct": [acc[s] for s in sorted(acc)],
                "delta_vs_reference_points": delta,
                "delta_vs_reference": {**stat, "verdict": verdict(stat)} if delta else None,
                "delta_vs_full_data_points": paired(acc, at_full) if size != FULL and at_full else [],
                "steps_run": [r["steps"] for r in runs.values()],
                "epochs_run": [r["epochs_run"] for r in runs.values()],
                "train_samples": [r["train_samples"] for r in runs.values()],
                "trainable_pct": [100 * r["trainable_params"] / r["total_params"] for r in runs.values()],
                "train_seconds": [r.get("train_seconds") for r in runs.values()],
            })
    return rows


# --------------------------------------------------------------------------------------------------- reporting


def _size_name(size: Any, info: dict[str, Any]) -> str:
    return f"full ({info['per_class']:g}/class)" if size == FULL else f"{size}/class"


def pivot_table(rows: list[dict[str, Any]], sizes: list[Any], modes: list[str],
                plan_info: dict[Any, dict[str, Any]]) -> str:
    """Modes x sizes: test accuracy mean ± std."""
    cell = {(r["size"], r["mode"]): fmt_stat(r["accuracy_pct"], ".2f") for r in rows}
    headers = ["mode"] + [_size_name(s, plan_info[s]) for s in sizes]
    out = [[m] + [cell.get((s, m), "n/a") for s in sizes] for m in modes]
    return markdown_table(headers, out)


def detail_table(rows: list[dict[str, Any]], failures: list[str], target: int, reference: str = REFERENCE) -> str:
    out = []
    for r in rows:
        steps = fmt_stat(r["steps_run"], ".0f")
        if mean_std(r["steps_run"])[0] < target:
            steps += " (cap)"
        d_ref = "(ref)" if r["mode"] == reference else _fmt_delta(r["delta_vs_reference"])
        d_data = "(ref)" if r["size"] == FULL else fmt_stat(r["delta_vs_full_data_points"], "+.2f")
        out.append([_size_name(r["size"], r), str(r["n_train"]), r["mode"], r["blocks"],
                    fmt_stat(r["epochs_run"], ".0f"), steps, fmt_stat(r["accuracy_pct"], ".2f"), d_ref, d_data,
                    fmt_stat(r["trainable_pct"], ".3g")])
    for f in failures:
        out.append(["", "", f"FAILED {f[:100]}"] + [""] * 7)
    headers = ["size", "N train", "mode", "blocks", "epochs", "steps", "test acc %",
               f"Δ vs {reference} (pts, 95% CI)", "Δ vs full data (pts)", "trainable %"]
    return markdown_table(headers, out, align=["l", "r", "l", "l"] + ["r"] * 6)


def _fmt_delta(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "n/a"
    if stat["ci95"] is None:
        return f"{stat['mean']:+.2f}"
    lo, hi = stat["ci95"]
    return f"{stat['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}] {stat['verdict']}"


def plot_tasks(tables: dict[str, list[dict[str, Any]]], modes: list[str], path: Path) -> Path | None:
    """Accuracy (mean ± std over seeds) against samples per class (log x), one line per mode, a panel per task."""
    from matplotlib.figure import Figure

    tasks = [t for t, rows in tables.items() if rows]
    if not tasks:
        return None
    fig = Figure(figsize=(max(6.5, 5.4 * len(tasks)), 4.3))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    styles = {"scl": ("tab:red", "*"), "nc-finetune": ("tab:orange", "o"), "nc-lora": ("tab:purple", "s"),
              "full": ("black", "D"), "linear_probe": ("tab:gray", "v"), "nc-etf": ("tab:green", "^"),
              "nc-penalty": ("tab:blue", "P")}
    for ax, task in zip(axes[0], tasks, strict=True):
        for mode in modes:
            pts = sorted((r["per_class"], *mean_std(r["accuracy_pct"])) for r in tables[task] if r["mode"] == mode)
            if not pts:
                continue
            color, marker = styles.get(mode, (None, "o"))
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[0 if math.isnan(p[2]) else p[2] for p in pts],
                        marker=marker, ms=7 if marker == "*" else 5, capsize=3, lw=1.4, color=color, label=mode)
        ax.set_xscale("log")
        ticks = sorted({r["per_class"] for r in tables[task]})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{x:g}" for x in ticks])
        ax.minorticks_off()
        ax.set_xlabel("training samples per class (log)")
        ax.set_ylabel("test accuracy % (mean ± std over seeds)")
        ax.set_title(task, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return finish_figure(fig, "Data-scarce fine-tuning: accuracy vs training-set size (step-matched)", path)


# --------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = harness.study_parser(
        EXPERIMENT, __doc__, settings_alias="--tasks",
        helps={"modes": f"modes, of {', '.join(MODES)} (default: all; Δ needs the --reference mode)",
               "set": "recipe override shared by every run, after the task defaults, repeatable "
                      "(e.g. --set data.max_eval_samples=500)",
               "cache_prefix": "train.cache_prefix of every run (default 'recipe', i.e. auto)",
               "workdir": "keep the run directories here (TASK/SIZE/seedS/MODE); a finished identical run found "
                          "there is reused, so an interrupted benchmark continues (default: a temporary directory, "
                          "deleted)"})
    p.add_argument("--sizes", nargs="+", type=parse_size, default=EXPERIMENT.params["sizes"], metavar="N",
                   help="training samples per class, or 'full' for the recipe's data.max_train_samples "
                        f"(default: {' '.join(map(str, EXPERIMENT.params['sizes']))})")
    p.add_argument("--reference", choices=list(MODES), default=REFERENCE,
                   help=f"the mode every other one is compared with, paired per seed (default: {REFERENCE})")
    p.add_argument("--resample-data", action="store_true",
                   help="also set data.seed to the seed: each seed draws its own training (and test) subsample")
    p.add_argument("--steps-target", type=int, default=None,
                   help="T of the step-matching rule (default: the recipe's own steps at full size)")
    caps = ", ".join(f"{name} {task['max_epochs']}" for name, task in TASKS.items())
    p.add_argument("--max-epochs", type=int, default=None, help=f"cap of the rule's epochs (default per task: {caps})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = harness.parse_args(build_parser(), EXPERIMENT, argv)
    args.sizes = list(dict.fromkeys(args.sizes))
    extra = args.overrides
    shared = harness.shared_overrides(args)
    env = harness.subprocess_env(args.threads)

    plan: list[dict[str, Any]] = []
    schedules: dict[str, dict[Any, dict[str, Any]]] = {}
    targets: dict[str, int] = {}
    for task in args.tasks:
        t = TASKS[task]
        base_over = [*t["overrides"], *shared, *extra]
        try:
            base = harness.resolve_recipe(t["recipe"], base_over)
        except Exception as e:
            raise SystemExit(f"{t['recipe']} {' '.join(base_over)}: {e}") from None
        available = available_train(base)
        k = t["num_classes"]
        full_n = min(base["data"]["max_train_samples"] or available, available)
        target = args.steps_target or recipe_steps(full_n, base["train"])
        max_epochs = args.max_epochs or t["max_epochs"]
        targets[task] = target
        schedules[task] = {}
        for size in args.sizes:
            n_train = full_n if size == FULL else min(size * k, available)
            sch = schedule(n_train, base["train"], target, max_epochs)
            schedules[task][size] = {"n_train": n_train, "per_class": n_train / k, **sch}
            size_over = [f"data.max_train_samples={n_train}", f"train.epochs={sch['epochs']}",
                         f"train.max_steps={target}", f"data.num_classes={k}"]
            if not any(o.startswith("train.eval_every_epochs=") for o in extra):  # a user's choice stays
                size_over.append(f"train.eval_every_epochs={sch['eval_every_epochs']}")
            for seed in args.seeds:
                seeded = [f"train.seed={seed}", f"selection.seed={seed}"]
                if args.resample_data:
                    seeded.append(f"data.seed={seed}")
                for mode in args.modes:
                    plan.append({"task": task, "recipe": t["recipe"], "size": size, "seed": seed, "mode": mode,
                                 "overrides": [*t["overrides"], *seeded, *shared, *extra, *size_over, *MODES[mode]],
                                 "path": f"{task}/{size_label(size)}/seed{seed}/{mode}"})
    harness.validate_plan(plan)
    if args.dry_run:
        for task, by_size in schedules.items():
            for size, v in by_size.items():
                print(f"{task} {_size_name(size, v)}: N={v['n_train']}, {v['steps_per_epoch']} steps/epoch -> "
                      f"{v['epochs']} epochs, {v['steps']} of T={targets[task]} steps")
        harness.print_plan(plan)
        return 0

    info, cmd = start_study("Data-scarce fine-tuning: NC-selected adaptation vs full fine-tuning and the linear probe")
    runs = harness.run_plan(plan, args.workdir, env, prefix=NAME)

    tables: dict[str, list[dict[str, Any]]] = {}
    for task in args.tasks:
        mine = [r for r in runs if r["task"] == task]
        runs_by, failed = harness.by_mode(mine, [], key=lambda r: (r["size"], r["mode"]),
                                          label=lambda r: f"{size_label(r['size'])} {r['mode']} (seed {r['seed']})")
        failures = [f"{k}: {v}" for k, v in failed.items()]
        tables[task] = size_rows(runs_by, args.sizes, args.modes, schedules[task], args.reference)
        resolved = next(p["resolved"] for p in plan if p["task"] == task)
        sel = resolved["selection"]
        print(f"### {task}: {TASKS[task]['about']}\n")
        print(f"- recipe `{TASKS[task]['recipe']}` + `{' '.join(TASKS[task]['overrides'] + shared + extra)}`; NC "
              f"selection {sel['strategy']} (max_blocks {sel['max_blocks']}, max_param_fraction "
              f"{sel['max_param_fraction']}); probe.samples_per_class {resolved['probe']['samples_per_class']} "
              f"(capped by the subsample); batch {resolved['train']['batch_size']}; seeds "
              f"{' '.join(map(str, args.seeds))}{' (data resampled per seed)' if args.resample_data else ''}")
        sched = "; ".join(f"{_size_name(s, v)}: N={v['n_train']}, {v['steps_per_epoch']} steps/epoch -> "
                          f"{v['epochs']} epochs, {v['steps']} steps" for s, v in schedules[task].items())
        print(f"- step matching, T = {targets[task]}: {sched}\n")
        print(pivot_table(tables[task], args.sizes, args.modes, schedules[task]))
        print()
        print(detail_table(tables[task], failures, targets[task], args.reference))
        print()

    print(f"Δ vs {args.reference} = accuracy minus {args.reference}'s at the same size, paired per seed (mean, 95% "
          "t-interval, verdict: a tie when the interval holds zero); Δ vs full data = accuracy minus the same mode's "
          "at full size, paired per seed (mean ± std). steps (cap) = the max_epochs cap held the run below T steps.\n")
    png = plot_tasks(tables, args.modes, args.out.with_suffix(".png"))
    harness.report(NAME, args, cmd, info, tasks={t: TASKS[t] for t in args.tasks},
                   modes={m: MODES[m] for m in args.modes}, reference=args.reference,
                   rule="epochs = clamp(ceil(T / steps_per_epoch), 1, max_epochs); train.max_steps = T",
                   steps_target=targets,
                   schedules={t: {size_label(s): v for s, v in d.items()} for t, d in schedules.items()},
                   tables=tables, figure=png, runs=runs)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
