"""Selection regret over many settings: how far each selection strategy lands from the best block to tune.

For every setting (a recipe + overrides) this runs ``nc-finetune sweep`` — every block tuned alone, per seed, each
strategy's pick under each budget trained too — as its own process into ``<workdir>/<setting>/`` (a killed benchmark
reruns the same command and continues cell by cell), then pools the per-setting ``sweep.json`` files:

* per strategy and budget, ``mean_regret`` against the oracle block set with a 95% t-interval, and the paired
  differences of test accuracy ``vs_random_k`` and ``vs_last_k`` (a variant ``rule@key=value`` also ``vs_base``,
  against ``rule``); the **unit of replication is one (setting, seed) pair** (seeds resample the training,
  validation, test and probe subsets); an interval that contains zero is a tie;
* ``default_strategy``: the strategy with the lowest pooled mean regret at the one-block budget, among those that
  need no trained model (the zero-cost and probe-based rules and the baselines) and among all, counting only the
  strategies measured on every pooled (setting, seed) unit.

Shifted settings start from a model fine-tuned on the clean source (``backbone.init_from``, a full fine-tune trained
once per source into ``<workdir>/sources/``) and corrupt both splits (``data.corruption``), as surgical fine-tuning.

Examples:
    # the CPU study (resumable: rerun the same command after a kill)
    python benchmarks/selection_regret.py --workdir runs/bench-regret
    # a subset of the settings, then pool whatever has finished
    python benchmarks/selection_regret.py --settings effnet-fm minilm-rt --workdir runs/bench-regret
    python benchmarks/selection_regret.py --pool-only --workdir runs/bench-regret
    # a smoke run (a minute or two; --out and --workdir default to benchmarks/out/smoke/)
    python benchmarks/run.py selection_regret --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness
import yaml
from common import REPO_ROOT, markdown_table, start_study, write_results

from nc_finetune.sweep import floors as sweep_floors
from nc_finetune.sweep import mean_ci95, verdict

NAME = "selection_regret"
EXPERIMENT = harness.load_experiment(NAME)
RESULTS = REPO_ROOT / "benchmarks" / "results" / "cpu" / f"{NAME}.json"
#: Where each setting's resume pack is committed: the sweep's recipe, per-seed probes and picks, and every finished
#: cell's and reference run's summary.json (the weights stay in the workdir). A sweep reads a cell with a summary as
#: finished, so copying a pack into an empty workdir lets a later session continue or grow the study without
#: retraining those cells.
PACKS = REPO_ROOT / "benchmarks" / "results" / "cpu" / NAME
_PARAMS = EXPERIMENT.params
BUDGETS = _PARAMS["budgets"]
#: Every rule and its variants (``name@selection.key=value``), the rivals and the baselines.
STRATEGIES = _PARAMS["strategies"]
#: What ``--skip-trained-rules`` leaves out: rules that train before choosing (a sweep can add them later: its
#: strategies may grow on resume, every finished cell is kept).
_TRAINED_RULES = tuple(_PARAMS["trained_rules"])
#: Overrides of every sweep (the fraction budget is filled greedily past blocks that do not fit).
_COMMON = _PARAMS["common"]
#: The clean source model of a shifted setting.
_SOURCE = _PARAMS["source"]
#: Settings: ``{name: {recipe, overrides, about[, source, strategies]}}`` (experiments/selection_regret.yaml).
SETTINGS = EXPERIMENT.settings
#: The order the study runs in: one of each kind first (clean, shifted, text), so partial results cover them all.
ORDER = EXPERIMENT.default_settings
#: Strategies that train nothing before choosing (their cost is a probe or a few gradient batches at most).
_CHEAP = tuple(_PARAMS["training_free"])
#: Adapt methods trained on every block beside the cells (``sweep.references``); each pick is compared with them.
REFERENCES = list(_PARAMS.get("references", []))
#: A zero-cost rule is called stable when its pick wins at least this share of the bootstrap resamples (issue goal).
STABLE_SHARE = 0.8


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nc_finetune.cli", *args]


def _run(cmd: list[str], log) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed with status {proc.returncode}: {' '.join(cmd)} (see the log)")


def _yaml_list(items: list[str]) -> str:
    return "[" + ", ".join(f"'{x}'" for x in items) + "]"  # quoted: variants hold commas


def run_setting(name: str, workdir: Path, extra: list[str], log, budgets: str = BUDGETS,
                skip_trained: bool = False, references: list[str] | None = None, lr_grid: list[float] | None = None,
                packs: Path | None = PACKS) -> Path:
    """Run (or resume) one setting's sweep; return its directory.

    ``lr_grid`` (``sweep.lr_grid``) trains every cell and reference at each rate and keeps, per cell, the rate with
    the best mean validation accuracy; ``packs`` is where the study's resume packs live (None: none).
    """
    s = SETTINGS[name]
    overrides = list(s["overrides"])
    if "source" in s:
        src = SETTINGS[s["source"]]
        src_dir = workdir / "sources" / s["source"]
        if not (src_dir / "summary.json").exists():
            src_overrides = [o for o in src["overrides"] if not o.startswith(("data.max_train_samples",
                                                                              "train.val_fraction"))]
            _run(_cli("run", src["recipe"], *src_overrides, *_SOURCE, *extra, "--out", str(src_dir), "--quiet",
                      *(["--resume"] if (src_dir / "resolved.yaml").exists() else [])), log)
        if packs is not None:
            check_source(src_dir, packs / "sources" / f"{s['source']}.json")
        overrides.append(f"backbone.init_from={src_dir.resolve()}")
        overrides.append("selection.reference=source")  # for shift: the clean data the source model saw
    chosen = [x for x in [*STRATEGIES, *s.get("strategies", [])] if not (skip_trained and x in _TRAINED_RULES)]
    strategies = _yaml_list(chosen)
    out = workdir / name
    if packs is not None and restore_setting(packs / name, out):
        log.write(f"restored {out} from {packs / name}\n")
    refs = _yaml_list(REFERENCES if references is None else references)
    grid = [f"sweep.lr_grid=[{', '.join(f'{x:g}' for x in lr_grid)}]"] if lr_grid else []
    _run(_cli("sweep", s["recipe"], *overrides, *_COMMON, f"sweep.budgets={budgets}", f"sweep.strategies={strategies}",
              f"sweep.references={refs}", *grid, *extra, "--out", str(out), "--quiet"), log)
    return out


#: init_from.json holds the source model's digest: a pack restored beside a retrained identical source resumes.
_PACKED = ("resolved.yaml", "init_from.json", "probe.json", "picks.json", "summary.json", "sweep.json")


def packs_for(out: Path, workdir: Path) -> Path | None:
    """The resume packs of the study pooled into ``out``: ``<out without .json>/`` beside it (``selection_regret.json``
    -> ``selection_regret/``), so a second study (another ``--out``, e.g. with ``--lr-grid``) keeps its own; None
    when that is the workdir itself (the smoke run), which needs no copy of itself."""
    packs = out.parent / out.stem
    return None if packs.resolve() == workdir.resolve() else packs


def check_source(src_dir: Path, record: Path) -> None:
    """Record the source model's weights digest on first use; refuse a retrained source that differs.

    The weights of a source stay in the workdir (not committed); a later session retrains it from the same recipe and
    seed. Cells packed from the first source are comparable only if the retrained weights are identical.
    """
    from nc_finetune.runs import WEIGHTS
    from nc_finetune.utils.io import sha256_file

    digest = sha256_file(src_dir / WEIGHTS)
    if record.is_file():
        saved = json.loads(record.read_text(encoding="utf-8"))
        if saved["sha256"] != digest:
            raise RuntimeError(f"the source model in {src_dir} (sha256 {digest[:12]}) differs from the one the packed "
                               f"cells were trained from ({saved['sha256'][:12]}, {record}); its cells are not "
                               "comparable: train the source on the machine that made them or remove the packs")
        return
    summary = json.loads((src_dir / "summary.json").read_text(encoding="utf-8"))
    record.parent.mkdir(parents=True, exist_ok=True)
    write_results(record, {"sha256": digest, "test_accuracy": summary.get("test_accuracy"),
                           "recipe": summary.get("recipe")})


def pack_setting(sweep_dir: Path, dest: Path) -> int:
    """Copy a sweep's small files (see :data:`PACKS`) to ``dest``; return how many finished cells it holds."""
    import shutil

    cells = 0
    for path in sorted(sweep_dir.rglob("*")):
        rel = path.relative_to(sweep_dir)
        if not path.is_file() or path.name not in _PACKED or "checkpoint" in rel.parts:
            continue
        if rel.parts[0] in ("cells", "references") and path.name != "summary.json":
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / rel)
        cells += rel.parts[0] == "cells"
    return cells


def restore_setting(pack: Path, sweep_dir: Path) -> bool:
    """Start an absent sweep directory from its committed pack; False when there is none."""
    import shutil

    if sweep_dir.exists() or not (pack / "resolved.yaml").is_file():
        return False
    shutil.copytree(pack, sweep_dir)
    return True


def floors_of(rep: dict[str, Any]) -> dict[str, Any]:
    """A sweep's hindsight floors, computed from its cells (and kept in ``rep``) when the sweep predates them."""
    if "floors" not in rep:
        rep["floors"] = sweep_floors(rep)
    return rep["floors"]


def _pool_entry(sweeps: dict[str, dict[str, Any]], budget: str, name: str, table_of) -> dict[str, Any] | None:
    """Pool one strategy (or floor) over (setting, seed): regret, paired differences, bootstrap stability.

    ``table_of(rep)`` returns a setting's ``{budget: {name: entry}}`` (``regret`` or the floors).
    """
    # a variant (``rule@key=value``) is also paired with its base rule: does the option help?
    regrets, vs = [], {"random_k": [], "last_k": [], **({name.split("@")[0]: []} if "@" in name else {})}
    vs_refs: dict[str, list[float]] = {}
    shares: list[float] = []
    per_setting = {}
    for setting, rep in sweeps.items():
        r = table_of(rep).get(budget, {}).get(name)
        if r is None:
            continue
        regrets += list(r["per_seed"].values())
        per_setting[setting] = r["mean"]
        shares += (r.get("bootstrap_stability") or {}).get("per_seed", [])
        for method, ref in (rep.get("references") or {}).items():
            for seed, acc in r["test_accuracy"].items():
                other = ref["test_accuracy"].get(seed)
                if other is not None:
                    vs_refs.setdefault(method, []).append(100.0 * (acc - other))
        for rival in vs:
            other = rep["regret"][budget].get(rival)
            if other is None or rival == name:
                continue
            for seed, acc in r["test_accuracy"].items():
                if seed in other["test_accuracy"]:
                    vs[rival].append(100.0 * (acc - other["test_accuracy"][seed]))
    if not per_setting:
        return None
    entry = {**mean_ci95(regrets), "per_setting": per_setting}
    entry["mean_regret"] = entry.pop("mean")
    for rival, diffs in vs.items():
        if rival != name and diffs:
            stat = mean_ci95(diffs)
            key = f"vs_{rival}" if rival in ("random_k", "last_k") else "vs_base"
            entry[key] = {**stat, "verdict": verdict(stat), **({"base": rival} if key == "vs_base" else {})}
    if vs_refs:
        entry["vs_references"] = {m: {**(stat := mean_ci95(d)), "verdict": verdict(stat)} for m, d in vs_refs.items()}
    if shares:
        entry["bootstrap_stability"] = {"mean": float(sum(shares) / len(shares)), "n": len(shares),
                                        f"share_at_least_{STABLE_SHARE:g}":
                                            sum(x >= STABLE_SHARE for x in shares) / len(shares)}
    return entry


def pool(sweeps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Pool per-setting sweeps: per budget and strategy, regret and paired differences over (setting, seed)."""
    budgets = sorted({b for rep in sweeps.values() for b in rep["regret"]})
    out: dict[str, Any] = {}
    for budget in budgets:
        strategies = sorted({s for rep in sweeps.values() for s in rep["regret"].get(budget, {})})
        out[budget] = {s: _pool_entry(sweeps, budget, s, lambda rep: rep["regret"]) for s in strategies}
    return out


def pool_floors(sweeps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Pool the hindsight floors (:func:`nc_finetune.sweep.floors`) as :func:`pool` pools strategies."""
    out: dict[str, Any] = {}
    for budget in sorted({b for rep in sweeps.values() for b in floors_of(rep)}):
        names = sorted({n for rep in sweeps.values() for n in floors_of(rep).get(budget, {})})
        out[budget] = {n: e for n in names if (e := _pool_entry(sweeps, budget, n, floors_of)) is not None}
    return out


def default_strategy(pooled: dict[str, Any], budget: str = "1_block") -> dict[str, Any]:
    """The lowest pooled mean regret at ``budget``, overall and among the strategies that train nothing first.

    Only strategies measured on every pooled (setting, seed) unit compete: a mean over fewer settings is not
    comparable. ``same_picks`` lists the strategies with exactly the same regret as the lowest (e.g. ``lisa`` and
    ``random_k``, one seeded draw).
    """
    table = {s: r for s, r in pooled.get(budget, {}).items() if r["mean_regret"] is not None}
    if not table:
        return {}
    units = max(r["n"] for r in table.values())
    full = {s: r for s, r in table.items() if r["n"] == units}
    best = min(full, key=lambda s: (full[s]["mean_regret"], s))
    cheap = [s for s in full if s in _CHEAP]
    best_cheap = min(cheap, key=lambda s: (full[s]["mean_regret"], s)) if cheap else None
    return {"budget": budget, "units": units, "lowest_regret": best, "lowest_regret_training_free": best_cheap,
            "mean_regret": full[best]["mean_regret"], "ci95": full[best]["ci95"],
            "same_picks": sorted(s for s in full if s != best and full[s]["mean_regret"] == full[best]["mean_regret"]),
            "not_on_every_unit": sorted(set(table) - set(full))}


def _fmt_ci(stat: dict[str, Any] | None, key: str = "mean") -> str:
    if not stat or stat.get(key) is None:
        return "—"
    ci = stat.get("ci95")
    return f"{stat[key]:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")


def _fmt_verdict(stat: dict[str, Any] | None) -> str:
    return _fmt_ci(stat) + (f" ({stat['verdict']})" if stat else "")


def tables(payload: dict[str, Any]) -> str:
    """Markdown: the pooled regret table per budget, then the oracle and picks per setting."""
    parts = []
    for budget, table in payload["pooled"].items():
        rows = []
        refs = sorted({m for r in table.values() for m in r.get("vs_references", {})})
        floors = [(f"floor: {n}", r) for n, r in payload.get("floors", {}).get(budget, {}).items()]
        for strategy, r in [*floors, *sorted(table.items(), key=lambda kv: kv[1]["mean_regret"] or 0.0)]:
            stab = r.get("bootstrap_stability")
            rows.append([strategy, _fmt_ci(r, "mean_regret"), r["n"],
                         *(_fmt_verdict(r.get(f"vs_{rival}")) for rival in ("random_k", "last_k")),
                         _fmt_verdict(r.get("vs_base")) if r.get("vs_base") else "—",
                         *(_fmt_verdict(r.get("vs_references", {}).get(m)) for m in refs),
                         f"{100 * stab['mean']:.0f}% ({100 * stab[f'share_at_least_{STABLE_SHARE:g}']:.0f}% ≥ "
                         f"{100 * STABLE_SHARE:.0f}%)" if stab else "—"])
        measured = {name for r in table.values() for name in r.get("per_setting", {})}
        parts.append(f"**Budget {budget}** (pooled over {len(measured)} settings; unit: (setting, seed))\n\n"
                     + markdown_table(["strategy", "regret, points [95% CI]", "n", "vs random_k", "vs last_k",
                                       "vs its base rule", *(f"vs {m}" for m in refs), "bootstrap stability"],
                                      rows, ["l", "r", "r", "r", "r", "r", *("r" for _ in refs), "r"])
                     + ("\n\nfloor: = a hindsight choice, not a rule (exhaustive_val: each seed's best block set by "
                        "validation after training them all; other_seeds: the best by the other seeds' test "
                        "accuracy): the regret a perfect rule could still show here." if floors else ""))
    grid = any(len(s.get("lr_grid") or []) > 1 for s in payload["settings"].values())

    def rate(entry: dict[str, Any] | None) -> list[str]:  # the chosen rate, a column only when a grid was searched
        return [f"{entry['lr']:g}" if entry and entry.get("lr") is not None else "—"] if grid else []

    rows = []
    for name, s in payload["settings"].items():
        for budget, o in s["oracle"].items():
            rows.append([name, budget, " + ".join(o["by_test"]["blocks"]), f"{100 * o['by_test']['mean_test']:.2f}",
                         *rate(o["by_test"]), " + ".join(o["by_val"]["blocks"]) if o.get("by_val") else "—",
                         o["searched"]])
    parts.append(markdown_table(["setting", "budget", "oracle (test)", "acc %", *(["lr"] if grid else []),
                                 "best by validation", "searched"], rows))
    rows = [[name, m, f"{r['trainable_params']:,}", f"{100 * r['mean_test']:.2f}", *rate(r)]
            for name, s in payload["settings"].items() for m, r in (s.get("references") or {}).items()
            if r.get("mean_test") is not None]
    if rows:
        parts.append(markdown_table(["setting", "reference (every block)", "trainable", "acc %",
                                     *(["lr"] if grid else [])], rows))
    if grid:
        rows = []
        for name, s in payload["settings"].items():
            chosen = [c["lr"] for c in s["cells"] if c["kind"] == "candidate"]
            rows.append([name, ", ".join(f"{x:g}" for x in s["lr_grid"]),
                         ", ".join(f"{x:g} ×{chosen.count(x)}" for x in s["lr_grid"])])
        parts.append(markdown_table(["setting", "lr grid", "rate chosen by validation (candidates)"], rows))
    return "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = harness.study_parser(
        EXPERIMENT, __doc__, flags=("settings", "seeds", "set", "workdir", "out", "smoke"),
        workdir=REPO_ROOT / "runs" / "bench-regret", out=RESULTS,
        helps={"settings": f"settings to run, in order (default: all): {', '.join(ORDER)}",
               "seeds": "sweep.seeds: integers or a YAML list (default: "
                        f"{' '.join(map(str, EXPERIMENT.seeds))})",
               "set": "extra recipe override for every setting (repeatable)",
               "out": f"pooled JSON (default {RESULTS.relative_to(REPO_ROOT)})",
               "workdir": "one sweep directory per setting (and sources/); rerunning continues cell by cell "
                          "(default runs/bench-regret)"})
    p.add_argument("--budgets", type=_sweep_key("budgets", "[{max_blocks: 1}]"), default=BUDGETS, metavar="YAML_LIST",
                   help=f"sweep.budgets (default {BUDGETS})")
    p.add_argument("--references", type=_sweep_key("references", "[full, auto_rgn]"), default=None, metavar="YAML_LIST",
                   help=f"sweep.references: adapt methods trained on every block beside the cells (default "
                        f"{_yaml_list(REFERENCES)}; '[]' for none)")
    p.add_argument("--lr-grid", type=_sweep_key("lr_grid", "[3e-4, 1e-3, 3e-3]"), default=None, metavar="YAML_LIST",
                   help="sweep.lr_grid: train every cell and reference at each rate and keep, per cell, the rate with "
                        "the best mean validation accuracy (e.g. '[3e-4, 1e-3, 3e-3]'; default: the recipe's "
                        "train.lr only). Pool it into its own --out and --workdir: the packs follow --out")
    p.add_argument("--skip-trained-rules", action="store_true",
                   help=f"leave out {', '.join(_TRAINED_RULES)} (they train every block briefly before choosing)")
    p.add_argument("--pool-only", action="store_true", help="pool the finished sweeps under --workdir, run nothing")
    p.add_argument("--pack-only", action="store_true",
                   help=f"copy each setting's resume pack (finished cells included) to <--out without .json>/ "
                        f"(default {PACKS.relative_to(REPO_ROOT)}), run nothing")
    return p


def _sweep_key(key: str, example: str):
    """An argparse type for ``sweep.<key>``: the YAML value parsed and checked by the recipe schema itself
    (:class:`~nc_finetune.config.SweepConfig`), so a typo gives one line before any setting runs."""
    from nc_finetune.config import SweepConfig, from_dict
    from nc_finetune.errors import ConfigError

    def parse(text: str) -> Any:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text  # refused by the schema as not a list, in one line
        if value is None:
            raise argparse.ArgumentTypeError(f"a YAML list, e.g. {example!r}; got {text!r}")
        try:
            parsed = getattr(from_dict(SweepConfig, {key: value}, "sweep"), key)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(f"{e} (e.g. {example!r})") from None
        if key == "budgets":
            return text  # travels to the sweep as given (and is recorded so in the pooled JSON)
        return [float(x) for x in parsed] if key == "lr_grid" else parsed

    parse.__name__ = f"sweep.{key}"  # argparse names the type in its error line
    return parse


def main(argv: list[str] | None = None) -> int:
    args = harness.parse_args(build_parser(), EXPERIMENT, argv)
    extra = [f"sweep.seeds=[{', '.join(map(str, args.seeds))}]", *args.overrides]
    info, cmd = start_study("Selection regret: each strategy's pick against the best block set")
    args.workdir.mkdir(parents=True, exist_ok=True)
    packs = packs_for(args.out, args.workdir)
    if args.pack_only:
        if packs is None:
            print("--pack-only: the packs would be the workdir itself; give another --out")
            return 2
        for name in args.settings:
            if (args.workdir / name / "resolved.yaml").is_file():
                print(f"{name}: {pack_setting(args.workdir / name, packs / name)} finished cells packed")
        return 0
    sweeps: dict[str, dict[str, Any]] = {}
    with open(args.workdir / "benchmark.log", "a", encoding="utf-8") as log:
        for name in args.settings:
            out = args.workdir / name
            if not args.pool_only:
                start = time.perf_counter()
                print(f"[{name}] {SETTINGS[name]['about']} ...", flush=True)
                try:
                    run_setting(name, args.workdir, extra, log, args.budgets, args.skip_trained_rules,
                                args.references, args.lr_grid, packs)
                except RuntimeError as e:
                    print(f"    failed: {e}", flush=True)
                    continue
                packed = pack_setting(out, packs / name) if packs is not None else 0
                print(f"    done in {time.perf_counter() - start:.0f} s; {packed} cells packed", flush=True)
            if (out / "sweep.json").exists():
                sweeps[name] = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
            if sweeps:
                _write(args, sweeps, info, cmd)
    if not sweeps:
        print("no finished sweep to pool")
        return 1
    payload = _write(args, sweeps, info, cmd)
    print(tables(payload))
    return 0


def _write(args, sweeps: dict[str, dict[str, Any]], info: dict[str, Any], cmd: str) -> dict[str, Any]:
    pooled = pool(sweeps)
    settings = {}
    for name, rep in sweeps.items():
        settings[name] = {
            "about": SETTINGS[name]["about"], "recipe": SETTINGS[name]["recipe"],
            "overrides": SETTINGS[name]["overrides"], "sweep_dir": str(args.workdir / name),
            "seeds": rep["seeds"], "lr_grid": rep["lr_grid"], "train_samples": rep.get("train_samples"),
            "test_samples": rep.get("test_samples"), "oracle": rep["oracle"], "regret": rep["regret"],
            "floors": floors_of(rep),
            "cells": [{k: c[k] for k in ("names", "kind", "block_params", "lr", "mean_test", "sd_test", "mean_val",
                                         "test_accuracy", "val_accuracy")} for c in rep["cells"]],
            "probe": rep.get("probe"), "unpicked": rep.get("unpicked"),
            "references": {m: {k: r[k] for k in ("lr", "trainable_params", "mean_test", "sd_test", "test_accuracy")}
                           for m, r in (rep.get("references") or {}).items()},
        }
    payload = {"benchmark": NAME, "command": cmd, "machine": info, "budgets": args.budgets,
               "unit_of_replication": "(setting, seed) pair: regret and paired differences per seed, pooled over "
                                      "settings; a 95% t-interval that contains 0 is a tie",
               "settings": settings, "pooled": pooled, "floors": pool_floors(sweeps),
               "default_strategy": default_strategy(pooled)}
    write_results(args.out, payload)
    return payload


if __name__ == "__main__":
    sys.exit(main())
