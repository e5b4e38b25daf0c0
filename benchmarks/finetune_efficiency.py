"""NC-selected fine-tuning vs full fine-tuning and the baselines: accuracy, trainable parameters, time, memory.

For each case (an offline ``run`` recipe) and seed, every mode runs as its own fresh process
(``python -m nc_finetune.cli run <recipe> <overrides> --out <workdir>/<case>/seed<s>/<mode> --quiet``), so the peak
memory in each ``summary.json`` belongs to that mode alone. Modes:

* ``full``         -- every parameter trains (``adapt.method=full``): the reference.
* ``nc-finetune``  -- the recipe's NC-guided selection (e.g. ``knee``), selected blocks + head train.
* ``nc-lora``      -- the same blocks, LoRA (``adapt.method=lora``).
* ``nc-scl``       -- the same blocks, SCL-FT with an additive skip to the head (``adapt.method=scl``).
* ``last_k``       -- the last blocks under the same budget (``selection.strategy=last_k``), fine-tuned.
* ``linear_probe`` -- head only.

The table reports, per mode: selected blocks, test accuracy, its difference from ``full`` in points, trainable
parameters (count and % of the model), seconds per epoch (training only; the prefix cache's build time is not in
it), the time ratio full/mode, peak memory (peak RSS on CPU, ``max_memory_allocated`` on CUDA; on CPU it covers the
whole process, probe stage included) and the memory ratio full/mode. With several ``--seeds`` (each sets
``train.seed`` and ``selection.seed``) cells show mean +- std over seeds; ratios and differences are paired per seed.

``--cache-compare`` also runs ``nc-finetune`` with ``train.cache_prefix=off`` and ``=on`` for ``--cache-epochs``
epochs and reports the speed-up of the frozen-prefix cache, its build time counted in (amortised over the epochs).

Targets printed beside the numbers (for the selective modes): accuracy within 0.5 point of full (difference >= -0.5)
at <= 10% trainable parameters and >= 3x less time per epoch; >= 5x with the prefix cache over a multi-epoch run.

Examples:
    # the real CPU benchmark, one seed (see --help of each option)
    python benchmarks/run.py finetune_efficiency --cache-compare
    # three seeds, keep the runs (an interrupted benchmark continues where it stopped)
    python benchmarks/run.py finetune_efficiency --seeds 0 1 2 --workdir runs/bench-ft
    # a smoke run (about a minute): the experiment file's smoke preset
    python benchmarks/run.py finetune_efficiency --smoke
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import harness
from common import check, fmt_stat, markdown_table, mean_std, safe_ratio, start_study

NAME = "finetune_efficiency"
EXPERIMENT = harness.load_experiment(NAME)
CASES = EXPERIMENT.recipes
MODES = EXPERIMENT.modes
REFERENCE = EXPERIMENT.params["reference"]
TARGET_ACC_POINTS = 0.5  # accuracy may be at most this many points below full
TARGET_PARAM_PCT = 10.0  # trainable parameters, % of the model
TARGET_TIME_X = 3.0  # full / mode seconds per epoch
TARGET_CACHE_X = 5.0  # full (or uncached) / cached, per epoch with the cache build amortised



# --------------------------------------------------------------------------------------------------- reporting


def _blocks_label(runs: list[dict[str, Any]]) -> str:
    method = runs[0].get("method") if runs else None
    if method == "full":
        return "all"
    if method == "linear_probe":
        return "(head only)"
    sets = []
    for r in runs:
        label = ", ".join(r["selected_blocks"]) or "(none)"
        if label not in sets:
            sets.append(label)
    return " / ".join(sets)  # a "|" would split the Markdown cell


def _paired(a: dict[int, float], b: dict[int, float], fn) -> list[float]:
    """``fn(a[s], b[s])`` for every seed present in both."""
    return [fn(a[s], b[s]) for s in sorted(a) if s in b]


def aggregate(case_runs: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-mode statistics over seeds, with differences/ratios paired with the reference run of the same seed.

    Args:
        case_runs: ``{mode: {seed: slim summary}}`` (failed runs absent).

    Returns:
        One dict per mode, in :data:`MODES` order.
    """
    ref = case_runs.get(REFERENCE, {})
    ref_acc = {s: r["test_accuracy"] for s, r in ref.items()}
    ref_spe = {s: r["seconds_per_epoch"] for s, r in ref.items()}
    ref_mem = {s: r["peak_memory_mb"] for s, r in ref.items()}
    rows = []
    for mode, runs in case_runs.items():
        if not runs:
            continue
        acc = {s: 100 * r["test_accuracy"] for s, r in runs.items()}
        spe = {s: r["seconds_per_epoch"] for s, r in runs.items()}
        mem = {s: r["peak_memory_mb"] for s, r in runs.items()}
        pct = [100 * r["trainable_params"] / r["total_params"] for r in runs.values()]
        row = {
            "mode": mode,
            "seeds": sorted(runs),
            "blocks": _blocks_label(list(runs.values())),
            "accuracy_pct": list(acc.values()),
            "delta_points": _paired(acc, {s: 100 * a for s, a in ref_acc.items()}, lambda x, y: x - y),
            "trainable_params": [r["trainable_params"] for r in runs.values()],
            "total_params": [r["total_params"] for r in runs.values()],
            "trainable_pct": pct,
            "seconds_per_epoch": list(spe.values()),
            "time_ratio": _paired(ref_spe, spe, safe_ratio),
            "peak_memory_mb": list(mem.values()),
            "memory_ratio": _paired(ref_mem, mem, safe_ratio),
        }
        if mode != REFERENCE:
            d, t = mean_std(row["delta_points"])[0], mean_std(row["time_ratio"])[0]
            row["targets"] = {
                "accuracy": None if math.isnan(d) else d >= -TARGET_ACC_POINTS,
                "params": mean_std(pct)[0] <= TARGET_PARAM_PCT,
                "time": None if math.isnan(t) else t >= TARGET_TIME_X,
            }
        rows.append(row)
    return rows


def _int_stat(values: list[int]) -> str:
    return fmt_stat(values, ",.0f")


def main_table(rows: list[dict[str, Any]], failures: dict[str, str]) -> str:
    out = []
    for r in rows:
        if r["mode"] == REFERENCE:
            delta, tr, mr, tg = "(ref)", "1.00x", "1.00x", "(ref)"
        else:
            delta = fmt_stat(r["delta_points"], "+.2f")
            tr, mr = fmt_stat(r["time_ratio"], ".2f", "x"), fmt_stat(r["memory_ratio"], ".2f", "x")
            t = r["targets"]
            tg = "/".join(check(t[k]) for k in ("accuracy", "params", "time"))
        out.append([r["mode"], r["blocks"], fmt_stat(r["accuracy_pct"], ".2f"), delta,
                    _int_stat(r["trainable_params"]), fmt_stat(r["trainable_pct"], ".3g"),
                    fmt_stat(r["seconds_per_epoch"], ".1f"), tr, fmt_stat(r["peak_memory_mb"], ".0f"), mr, tg])
    for mode, err in failures.items():
        out.append([mode, f"FAILED: {err[:80]}"] + [""] * 9)
    headers = ["mode", "blocks", "test acc %", "Δ vs full (pts)", "trainable params", "params %", "s/epoch",
               "time full/mode", "peak MB", "mem full/mode",
               f"targets: Δ>=-{TARGET_ACC_POINTS}/<={TARGET_PARAM_PCT:.0f}%/>={TARGET_TIME_X:.0f}x"]
    return markdown_table(headers, out, align=["l", "l"] + ["r"] * 9)


def cache_rows(off: dict[int, dict[str, Any]], on: dict[int, dict[str, Any]],
               full: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Cache on vs off (and vs full) for one case; times per epoch with the cache build amortised."""

    def amortised(r: dict[str, Any]) -> float:
        pc = r.get("prefix_cache") or {}
        build = pc.get("build_seconds", 0.0) if pc.get("enabled") else 0.0
        return (r["train_seconds"] + build) / max(1, r["epochs_run"])

    res: dict[str, Any] = {"off": {}, "on": {}}
    for name, runs in (("off", off), ("on", on)):
        res[name] = {
            "seconds_per_epoch": [r["seconds_per_epoch"] for r in runs.values()],
            "amortised_seconds_per_epoch": [amortised(r) for r in runs.values()],
            "cache_build_seconds": [(r.get("prefix_cache") or {}).get("build_seconds", 0.0) for r in runs.values()],
            "cache_enabled": [bool((r.get("prefix_cache") or {}).get("enabled")) for r in runs.values()],
            "cache_reason": [(r.get("prefix_cache") or {}).get("reason") for r in runs.values()],
            "cache_megabytes": [(r.get("prefix_cache") or {}).get("megabytes") for r in runs.values()],
            "accuracy_pct": [100 * r["test_accuracy"] for r in runs.values()],
            "epochs_run": [r["epochs_run"] for r in runs.values()],
        }
    off_a = {s: amortised(r) for s, r in off.items()}
    on_a = {s: amortised(r) for s, r in on.items()}
    res["speedup_off_over_on"] = _paired(off_a, on_a, safe_ratio)
    res["speedup_full_over_on"] = _paired({s: r["seconds_per_epoch"] for s, r in full.items()}, on_a, safe_ratio)
    return res


def cache_table(case_results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for case, c in case_results.items():
        if "error" in c:
            rows.append([case, f"FAILED: {c['error'][:80]}"] + [""] * 8)
            continue
        for name in ("off", "on"):
            r = c[name]
            enabled = "yes" if all(r["cache_enabled"]) else ("no" if not any(r["cache_enabled"]) else "mixed")
            if name == "on" and enabled != "yes":
                enabled += f" ({next((x for x in r['cache_reason'] if x), '')})"
            speed = fmt_stat(c["speedup_off_over_on"], ".2f", "x") if name == "on" else ""
            vs_full = fmt_stat(c["speedup_full_over_on"], ".2f", "x") if name == "on" else ""
            target = ""
            if name == "on":
                best = c["speedup_full_over_on"] or c["speedup_off_over_on"]
                target = check(mean_std(best)[0] >= TARGET_CACHE_X) if best else "?"
            build = fmt_stat(r["cache_build_seconds"], ".1f") if name == "on" else "-"
            rows.append([case, f"cache_prefix={name}", enabled, fmt_stat(r["epochs_run"], ".0f"),
                         fmt_stat(r["seconds_per_epoch"], ".1f"), build,
                         fmt_stat(r["amortised_seconds_per_epoch"], ".1f"), speed, vs_full, target])
    headers = ["case", "nc-finetune run", "cache used", "epochs", "s/epoch (train)", "cache build s",
               "s/epoch incl. build", "speed-up off/on", "speed-up full/on", f"target >={TARGET_CACHE_X:.0f}x"]
    return markdown_table(headers, rows, align=["l", "l", "l"] + ["r"] * 7)


# --------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = harness.study_parser(
        EXPERIMENT, __doc__, settings_alias="--cases", settings_choices=False, cache_prefix="off",
        helps={"settings": f"cases: {', '.join(f'{k} ({v})' for k, v in CASES.items())}; a recipe name or path is "
                           "accepted too (default: all)",
               "modes": f"modes to run, of {', '.join(MODES)} (default: all; '{REFERENCE}' is the reference of the "
                        "differences and ratios)",
               "seeds": "seeds (each sets train.seed and selection.seed); >1 seed gives mean ± std (default: "
                        f"{' '.join(map(str, EXPERIMENT.seeds))})",
               "set": "recipe override shared by every run, repeatable (e.g. --set train.max_steps=5 "
                      "--set data.max_train_samples=200 for a smoke run)",
               "cache_prefix": "train.cache_prefix of the mode table (default off: the per-epoch times measure the "
                               "block selection alone; the cache is measured by --cache-compare; 'recipe' keeps the "
                               "recipe's)",
               "out": "JSON file for the raw results (default "
                      f"{harness.default_out(NAME).relative_to(harness.REPO_ROOT)})"})
    p.add_argument("--epochs", type=int, default=None,
                   help="train.epochs for every mode (default: the recipe's: minilm 1, effnet 2)")
    p.add_argument("--cache-compare", action="store_true",
                   help="also run nc-finetune with train.cache_prefix=off vs on over --cache-epochs epochs")
    p.add_argument("--cache-epochs", type=int, default=3, help="epochs of the --cache-compare runs (default 3)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = harness.parse_args(build_parser(), EXPERIMENT, argv)
    extra = args.overrides
    shared = [f"train.epochs={args.epochs}"] if args.epochs is not None else []
    shared += harness.device_overrides(args.device)
    env = harness.subprocess_env(args.threads)

    # Every run's overrides, validated up front (a typo fails in a second, not after an hour).
    plan: list[dict[str, Any]] = []
    for case in args.cases:
        recipe = CASES.get(case, case)
        for seed in args.seeds:
            seeded = shared + [f"train.seed={seed}", f"selection.seed={seed}"]
            cache = [] if args.cache_prefix == "recipe" else [harness.cache_override(args.cache_prefix)]
            runs = {mode: seeded + cache + extra + MODES[mode] for mode in args.modes}
            if args.cache_compare:
                for c in ("off", "on"):
                    runs[f"cache-{c}"] = (seeded + [f"train.epochs={args.cache_epochs}"] + extra + MODES["nc-finetune"]
                                          + [harness.cache_override(c)])
            plan += [{"case": case, "recipe": recipe, "seed": seed, "mode": mode, "overrides": over,
                      "path": f"{case}/seed{seed}/{mode}"} for mode, over in runs.items()]
    if harness.plan_only(plan, args):
        return 0

    info, cmd = start_study("Fine-tuning efficiency: NC-selected blocks vs full fine-tuning and baselines")
    runs = harness.run_plan(plan, args.workdir, env, prefix=NAME, keep_summary=True)

    tables: dict[str, Any] = {}
    cache_results: dict[str, dict[str, Any]] = {}
    for case in args.cases:
        mine = [r for r in runs if r["case"] == case]
        by_mode, failures = harness.by_mode(mine, [*args.modes, "cache-off", "cache-on"])
        rows = aggregate({m: by_mode[m] for m in args.modes})
        tables[case] = rows
        ref = next((r for r in mine if "result" in r), None)
        print(f"### {case}: {mine[0]['recipe']}\n")
        if ref:
            s = ref["summary"]
            sel = s["recipe"]["selection"]
            print(f"- {s.get('backbone')} on {s.get('dataset')}: {s['train_samples']} training samples, "
                  f"{s['test_samples']} test samples, device {s['device']}; NC selection {sel['strategy']} "
                  f"(max_blocks {sel['max_blocks']}, max_param_fraction {sel['max_param_fraction']})")
        print(f"- shared overrides: `{' '.join(shared + extra) or '(none)'}`; "
              f"train.cache_prefix={args.cache_prefix}; seeds {' '.join(map(str, args.seeds))}\n")
        print(main_table(rows, {k: v for k, v in failures.items() if not k.startswith("cache-")}))
        print()
        if args.cache_compare:
            off, on = by_mode["cache-off"], by_mode["cache-on"]
            errs = [v for k, v in failures.items() if k.startswith("cache-")]
            cache_results[case] = {"error": errs[0]} if errs or not off or not on else \
                cache_rows(off, on, by_mode.get(REFERENCE, {}))

    print(f"s/epoch = training time per epoch (no evaluation, no cache build); time/mem full/mode = how many times "
          f"less than full fine-tuning (paired per seed); peak MB = "
          f"{'peak RSS of the whole run (probe stage included)' if info['gpu'] is None else 'max_memory_allocated'}."
          f"\ntargets (selective modes): within {TARGET_ACC_POINTS} point of full, <= {TARGET_PARAM_PCT:.0f}% "
          f"trainable parameters, >= {TARGET_TIME_X:.0f}x less time per epoch.\n")
    if args.cache_compare:
        print(f"### Prefix cache: nc-finetune over {args.cache_epochs} epochs\n")
        print(cache_table(cache_results))
        print(f"\nspeed-up = uncached (or full, from the {REFERENCE} runs above, per epoch) / cached per epoch with "
              f"the cache build (train + test prefix outputs) amortised over the epochs; target >= "
              f"{TARGET_CACHE_X:.0f}x (checked against full when it ran).\n")

    targets = {"accuracy_points_below_full_max": TARGET_ACC_POINTS, "trainable_param_pct_max": TARGET_PARAM_PCT,
               "time_ratio_min": TARGET_TIME_X, "cache_speedup_min": TARGET_CACHE_X}
    harness.report(NAME, args, cmd, info, targets=targets, tables=tables, cache_compare=cache_results or None,
                   runs=runs)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
