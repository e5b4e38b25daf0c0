"""The benchmark harness (``benchmarks/harness.py``, ``benchmarks/run.py``): every study's command line answers
``--help`` and ``--list-settings``, every experiment file parses and every run it describes is a valid recipe, and the
shared flags (``--seeds``, ``--set``, ``--smoke``) behave the same in every study. Nothing here trains or probes."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
_SHARED = ("common", "harness", "comparison", "run")


@pytest.fixture()
def bench(monkeypatch):
    """The benchmarks folder on ``sys.path`` (as when a study runs as a script); its modules forgotten afterwards."""
    monkeypatch.syspath_prepend(str(BENCH))
    harness = importlib.import_module("harness")
    yield harness
    for name in (*_SHARED, *harness.STUDIES):
        sys.modules.pop(name, None)


def _studies() -> list[str]:
    sys.path.insert(0, str(BENCH))
    try:
        return list(importlib.import_module("harness").STUDIES)
    finally:
        sys.path.remove(str(BENCH))
        sys.modules.pop("harness", None)
        sys.modules.pop("common", None)


STUDIES = _studies()


def test_every_study_script_is_registered(bench) -> None:
    scripts = {p.stem for p in BENCH.glob("*.py")} - set(_SHARED)
    assert scripts == set(bench.STUDIES)
    assert {p.stem for p in bench.EXPERIMENTS_DIR.glob("*.yaml")} == set(bench.STUDIES)


@pytest.mark.parametrize("study", STUDIES)
def test_help_and_listing(bench, study, capsys) -> None:
    run = importlib.import_module("run")
    with pytest.raises(SystemExit) as e:
        run.main([study, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"python benchmarks/run.py {study}" in out and "--settings" in out and "--smoke" in out
    with pytest.raises(SystemExit) as e:
        importlib.import_module(study).main(["--list-settings"])
    assert e.value.code == 0
    assert f"settings of {study}" in capsys.readouterr().out


def test_runner_lists_studies_and_refuses_an_unknown_one(bench, capsys) -> None:
    run = importlib.import_module("run")
    assert run.main([]) == 0
    out = capsys.readouterr().out
    assert all(s in out for s in bench.STUDIES)
    assert run.main(["nope"]) == 2
    assert "unknown study 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("study", STUDIES)
def test_experiment_file_is_valid(bench, study) -> None:
    """Every setting x mode of the file resolves to a valid recipe, and the smoke preset parses."""
    exp = bench.load_experiment(study)
    modes = list(exp.modes.values()) or [[]]
    recipes = exp.recipes
    if study == "input_shift":  # one recipe; the settings are corruptions given on the command line
        recipes = {"target": exp.params["recipe"]}
    for name, recipe in recipes.items():
        setting = exp.settings.get(name, {"overrides": exp.params.get("target", [])})
        for mode in modes:
            bench.resolve_recipe(recipe, [*setting.get("overrides", []), *mode])
    module = importlib.import_module(study)
    args = bench.parse_args(module.build_parser(), exp, ["--smoke"])
    assert args.smoke and Path(args.out).parent == bench.SMOKE_DIR


def test_selection_regret_settings_and_sources_resolve(bench) -> None:
    exp = bench.load_experiment("selection_regret")
    assert exp.default_settings and set(exp.default_settings) == set(exp.settings)
    for name, s in exp.settings.items():
        bench.resolve_recipe(s["recipe"], [*s["overrides"], *exp.params["common"]])
        if "source" in s:
            source = exp.settings[s["source"]]
            assert "source" not in source, f"{name}: a source is a clean setting"
            bench.resolve_recipe(source["recipe"], [*source["overrides"], *exp.params["source"]])


def test_progressive_collapse_default_grid_resolves(bench) -> None:
    from nc_finetune.config import load_recipe

    pc = importlib.import_module("progressive_collapse")
    args = bench.parse_args(pc.build_parser(), pc.EXPERIMENT, [])
    assert len(pc.DEFAULT_PAIRS) == 11 and args.pairs == pc.DEFAULT_PAIRS
    for pair in pc.DEFAULT_PAIRS:
        load_recipe(None, pc.pair_overrides(*pc.parse_pair(pair), args))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("text", "message"), [
    ("settings: {a: {about: x}}\nmodez: {}\n", "unknown key(s) ['modez']"),
    ("settings: {a: {recipe: r}}\n", "settings.a.about"),
    ("settings: {a: {about: x, overrides: [train.lr]}}\n", "expected KEY=VALUE; got 'train.lr'"),
    ("modes: {m: adapt.method=full}\n", "modes.m: expected a list"),
    ("settings: {a: {about: x}}\ndefault_settings: [b]\n", "default_settings must list defined settings"),
    ("seeds: [0, one]\n", "seeds must be a list of integers"),
])
def test_bad_experiment_file_is_refused_in_one_line(bench, tmp_path, text, message) -> None:
    with pytest.raises(bench.ExperimentError) as e:
        bench.load_experiment("study", _write(tmp_path, text))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_nested_override_lists_flatten_in_order(bench, tmp_path) -> None:
    exp = bench.load_experiment("study", _write(tmp_path, (
        "anchors: {small: &small [data.max_train_samples=10, train.epochs=1]}\n"
        "settings: {a: {about: x, overrides: [data.name=digits, *small, train.lr=0.1]}}\n"
        "modes: {m: [[adapt.method=full], selection.seed=1]}\n")))
    assert exp.settings["a"]["overrides"] == ["data.name=digits", "data.max_train_samples=10", "train.epochs=1",
                                              "train.lr=0.1"]
    assert exp.modes["m"] == ["adapt.method=full", "selection.seed=1"]
    assert exp.default_settings == ["a"]


def _parser(bench, tmp_path):
    exp = bench.load_experiment("study", _write(tmp_path, (
        "settings: {a: {about: x, recipe: r}, b: {about: y, recipe: r}}\n"
        "modes: {m1: [adapt.method=full], m2: [adapt.method=linear_probe]}\n"
        "seeds: [0, 1, 2]\n"
        "smoke: {tasks: [b], seeds: [0], modes: [m2], overrides: [train.max_steps=2]}\n")))
    return bench.study_parser(exp, "A study.\n\nExamples:\n    run it\n", settings_alias="--tasks"), exp


def test_shared_flags_parse_the_same_everywhere(bench, tmp_path) -> None:
    parser, exp = _parser(bench, tmp_path)
    args = bench.parse_args(parser, exp, [])
    assert args.tasks == ["a", "b"] and args.modes == ["m1", "m2"] and args.seeds == [0, 1, 2]
    assert args.overrides == [] and args.workdir is None and args.out == bench.default_out("study")
    # --seeds takes integers or a YAML list (selection_regret's form); repeats are dropped, order kept
    assert bench.parse_args(parser, exp, ["--seeds", "[3, 1, 3]"]).seeds == [3, 1]
    assert bench.parse_args(parser, exp, ["--seeds", "2", "0", "2"]).seeds == [2, 0]
    assert bench.parse_args(parser, exp, ["--settings", "b", "a", "b"]).tasks == ["b", "a"]
    for bad in (["--seeds", "x"], ["--seeds", "[1, x]"], ["--set", "train.lr"], ["--tasks", "c"]):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(parser, exp, bad)
        assert e.value.code == 2


def test_smoke_preset_is_the_default_and_given_flags_win(bench, tmp_path) -> None:
    parser, exp = _parser(bench, tmp_path)
    args = bench.parse_args(parser, exp, ["--smoke"])
    assert (args.tasks, args.seeds, args.modes) == (["b"], [0], ["m2"])
    assert args.overrides == ["train.max_steps=2"]
    assert args.out == bench.SMOKE_DIR / "study.json" and args.workdir == bench.SMOKE_DIR / "study"
    args = bench.parse_args(parser, exp, ["--smoke", "--tasks", "a", "--set", "train.max_steps=5", "--out",
                                          str(tmp_path / "x.json"), "--workdir", str(tmp_path / "w")])
    assert args.tasks == ["a"] and args.seeds == [0]
    assert args.overrides == ["train.max_steps=2", "train.max_steps=5"]  # the given one last: it wins
    assert args.out == tmp_path / "x.json" and args.workdir == tmp_path / "w"


def test_report_writes_the_common_fields_first(bench, tmp_path, capsys) -> None:
    import json

    parser, exp = _parser(bench, tmp_path)
    args = bench.parse_args(parser, exp, ["--out", str(tmp_path / "r.json")])
    png = tmp_path / "r.png"
    path = bench.report("study", args, "cmd", {"cpu": "x"}, tables={"a": 1}, figure=png, runs=[])
    payload = json.loads(path.read_text())
    assert list(payload) == ["benchmark", "command", "machine", "args", "tables", "figure", "runs"]
    assert payload["figure"] == str(png) and payload["args"]["out"] == str(tmp_path / "r.json")
    assert f"raw results: {path}; figure: {png}" in capsys.readouterr().out


def _quoted_commands() -> list[str]:
    """Study command lines quoted in the READMEs and recorded in the committed results."""
    import json
    import re

    root = BENCH.parent
    text = " ".join((root / f).read_text(encoding="utf-8").replace("\n", " ")
                    for f in ("README.md", "benchmarks/README.md"))
    cmds = re.findall(r"`(python3? benchmarks/\w+\.py[^`]*)`", text)
    for path in sorted((BENCH / "results").rglob("*.json")):
        payload = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(payload, dict) and "benchmarks/" in str(payload.get("command", "")):
            cmds.append(payload["command"])
    return cmds


def test_quoted_and_recorded_command_lines_still_parse(bench) -> None:
    import shlex

    checked = 0
    for cmd in _quoted_commands():
        argv = shlex.split(cmd)
        i = next(i for i, a in enumerate(argv) if a.startswith("benchmarks/"))
        study = Path(argv[i]).stem
        if study == "run":
            study, i = argv[i + 1], i + 1
        if study not in bench.STUDIES:  # a placeholder such as STUDY
            continue
        module = importlib.import_module(study)
        bench.parse_args(module.build_parser(), module.EXPERIMENT, argv[i + 1:])
        checked += 1
    assert checked >= 20


def test_selection_regret_strategies_and_references_parse_as_a_sweep_section(bench) -> None:
    import yaml

    from nc_finetune.config import SweepConfig, from_dict
    from nc_finetune.sweep import parse_strategy

    sr = importlib.import_module("selection_regret")
    strategies = yaml.safe_load(sr._yaml_list(sr.STRATEGIES))
    assert strategies == sr.STRATEGIES  # variants with commas survive the YAML list
    for spec in strategies:
        parse_strategy(spec)
    from_dict(SweepConfig, {"strategies": strategies, "references": sr.REFERENCES}, "sweep")


def test_selection_regret_lr_grid_reaches_the_sweep_and_packs_follow_out(bench, tmp_path, monkeypatch) -> None:
    sr = importlib.import_module("selection_regret")
    args = sr.build_parser().parse_args(["--lr-grid", "[3e-4, 0.001, 3e-3]"])
    assert args.lr_grid == [3e-4, 1e-3, 3e-3]
    for flag, bad in [*(("--lr-grid", x) for x in ("[]", "3e-4", "[0.001, -1]", "[true]", "[a]", "[0.001", "null")),
                      ("--references", "[full, ful]"), ("--references", "full"), ("--references", "[full, full]"),
                      ("--budgets", "[{max_blocks: 1}, {max_blocks: 1}]"), ("--budgets", "[{max_blok: 1}]"),
                      ("--budgets", "[]")]:
        with pytest.raises(SystemExit) as e:
            sr.build_parser().parse_args([flag, bad])
        assert e.value.code == 2, (flag, bad)
    good = sr.build_parser().parse_args(["--references", "[]", "--budgets", "[{max_param_fraction: 0.1}]"])
    assert good.references == [] and good.budgets == "[{max_param_fraction: 0.1}]"
    assert sr.build_parser().parse_args([]).budgets == sr.BUDGETS and sr.build_parser().parse_args([]).lr_grid is None
    # the default study packs beside its JSON; another --out keeps its own packs; the smoke run none
    assert sr.packs_for(sr.RESULTS, tmp_path) == sr.PACKS
    assert sr.packs_for(tmp_path / "lr.json", tmp_path / "work") == tmp_path / "lr"
    assert sr.packs_for(tmp_path / "study.json", tmp_path / "study") is None
    # the grid goes into the sweep command, before --set overrides (which may replace it)
    calls = []
    monkeypatch.setattr(sr, "_run", lambda cmd, log: calls.append(cmd))
    sr.run_setting("effnet-fm", tmp_path / "work", ["x.y=1"], None, lr_grid=[3e-4, 1e-3], packs=None)
    cmd = calls[-1]
    assert cmd[3] == "sweep" and "sweep.lr_grid=[0.0003, 0.001]" in cmd
    assert cmd.index("sweep.lr_grid=[0.0003, 0.001]") < cmd.index("x.y=1")
    sr.run_setting("effnet-fm", tmp_path / "work", [], None, packs=None)
    assert not any(a.startswith("sweep.lr_grid") for a in calls[-1])


def test_selection_regret_tables_show_the_chosen_rates_only_for_a_grid(bench) -> None:
    sr = importlib.import_module("selection_regret")
    setting = {"lr_grid": [1e-3, 3e-3],
               "oracle": {"1_block": {"by_test": {"blocks": ["b1"], "mean_test": 0.9, "lr": 3e-3}, "by_val": None,
                                      "searched": 2}},
               "references": {"full": {"trainable_params": 10, "mean_test": 0.8, "lr": 1e-3}},
               "cells": [{"kind": "candidate", "lr": 3e-3}, {"kind": "candidate", "lr": 1e-3},
                         {"kind": "candidate", "lr": 3e-3}, {"kind": "pick", "lr": 1e-3}]}
    text = " ".join(sr.tables({"pooled": {}, "settings": {"s": setting}}).split())  # columns are padded
    assert "| s | 1_block | b1 | 90.00 | 0.003 |" in text and "| s | full | 10 | 80.00 | 0.001 |" in text
    assert "0.001 ×1, 0.003 ×2" in text  # candidates only, not the picks
    one_rate = " ".join(sr.tables({"pooled": {}, "settings": {"s": {**setting, "lr_grid": [1e-3]}}}).split())
    assert "| lr |" not in one_rate and "rate chosen" not in one_rate


def test_selection_regret_pools_references_and_bootstrap_stability_per_setting_seed(bench) -> None:
    sr = importlib.import_module("selection_regret")

    def sweep(rule_acc, rand_acc, full_acc, shares):
        seeds = [str(s) for s in range(len(rule_acc))]
        return {"regret": {"1_block": {
            "rule": {"per_seed": dict(zip(seeds, [1.0] * len(seeds), strict=True)), "mean": 1.0,
                     "test_accuracy": dict(zip(seeds, rule_acc, strict=True)),
                     "bootstrap_stability": {"per_seed": shares, "mean": sum(shares) / len(shares)}},
            "random_k": {"per_seed": dict(zip(seeds, [2.0] * len(seeds), strict=True)), "mean": 2.0,
                         "test_accuracy": dict(zip(seeds, rand_acc, strict=True))}}},
            "references": {"full": {"test_accuracy": dict(zip(seeds, full_acc, strict=True))}}}

    pooled = sr.pool({"a": sweep([0.80, 0.70], [0.75, 0.70], [0.90, 0.60], [1.0, 0.5]),
                      "b": sweep([0.60], [0.50], [0.65], [0.9])})["1_block"]["rule"]
    diffs_full = [100 * (0.80 - 0.90), 100 * (0.70 - 0.60), 100 * (0.60 - 0.65)]
    assert pooled["vs_references"]["full"]["mean"] == pytest.approx(sum(diffs_full) / 3)
    assert pooled["vs_references"]["full"]["n"] == 3
    assert pooled["vs_random_k"]["mean"] == pytest.approx(100 * (0.05 + 0.0 + 0.10) / 3)
    stab = pooled["bootstrap_stability"]
    assert stab["mean"] == pytest.approx((1.0 + 0.5 + 0.9) / 3) and stab["n"] == 3
    assert stab["share_at_least_0.8"] == pytest.approx(2 / 3)
    text = sr.tables({"pooled": sr.pool({"a": sweep([0.8], [0.7], [0.9], [1.0])}), "settings": {}})
    assert "vs full" in text and "bootstrap stability" in text


def test_selection_regret_pairs_a_variant_with_its_base_rule(bench) -> None:
    sr = importlib.import_module("selection_regret")

    def entry(acc: dict[str, float]) -> dict:
        return {"per_seed": {k: 1.0 for k in acc}, "mean": 1.0, "test_accuracy": acc}

    sweeps = {"a": {"regret": {"1_block": {"knee": entry({"0": 0.80, "1": 0.70}),
                                           "knee@bootstrap=50": entry({"0": 0.75, "1": 0.72})}}},
              "b": {"regret": {"1_block": {"knee": entry({"0": 0.60}), "knee@bootstrap=50": entry({"0": 0.64})}}}}
    pooled = sr.pool(sweeps)["1_block"]
    base = pooled["knee@bootstrap=50"]["vs_base"]
    assert base["base"] == "knee" and base["n"] == 3
    assert base["mean"] == pytest.approx(100 * (-0.05 + 0.02 + 0.04) / 3)  # the variant's accuracy minus its base's
    assert "vs_base" not in pooled["knee"]
    assert "vs its base rule" in sr.tables({"pooled": {"1_block": pooled}, "settings": {}})


def test_selection_regret_default_counts_only_strategies_measured_on_every_unit(bench) -> None:
    sr = importlib.import_module("selection_regret")

    def entry(per_seed: dict[str, float], acc: dict[str, float]) -> dict:
        return {"per_seed": per_seed, "mean": sum(per_seed.values()) / len(per_seed), "test_accuracy": acc}

    two = {"0": 0.8, "1": 0.7}
    sweeps = {
        "a": {"regret": {"1_block": {"knee": entry({"0": 2.0, "1": 2.0}, two),
                                     "random_k": entry({"0": 1.0, "1": 3.0}, two),
                                     "lisa": entry({"0": 1.0, "1": 3.0}, two),
                                     "trial": entry({"0": 0.0, "1": 0.0}, two)}},
              "floors": {"1_block": {"other_seeds": entry({"0": 0.5, "1": 0.0}, {"0": 0.9, "1": 0.8})}}},
        "b": {"regret": {"1_block": {"knee": entry({"0": 4.0}, {"0": 0.5}), "random_k": entry({"0": 1.0}, {"0": 0.6}),
                                     "lisa": entry({"0": 1.0}, {"0": 0.6})}},
              "floors": {"1_block": {"other_seeds": entry({"0": 1.0}, {"0": 0.7})}}},
    }
    pooled = sr.pool(sweeps)
    best = sr.default_strategy(pooled)
    # trial has the lowest mean (0.0) but only on setting a's two seeds: it does not compete with the 3-unit means
    assert best["units"] == 3 and best["not_on_every_unit"] == ["trial"]
    assert best["lowest_regret"] == "lisa" and best["same_picks"] == ["random_k"]  # 5/3 each, ties go by name
    assert best["mean_regret"] == pytest.approx(5 / 3)
    floors = sr.pool_floors(sweeps)["1_block"]["other_seeds"]
    assert floors["mean_regret"] == pytest.approx(0.5) and floors["n"] == 3
    assert floors["vs_random_k"]["mean"] == pytest.approx(100 * (0.1 + 0.1 + 0.1) / 3)
    assert "floor: other_seeds" in sr.tables({"pooled": pooled, "floors": sr.pool_floors(sweeps),
                                             "settings": {}})


def test_data_scarce_compares_every_mode_with_the_reference_mode_paired_per_seed(bench) -> None:
    from scipy import stats

    ds = importlib.import_module("data_scarce")

    def run(acc: float) -> dict:
        return {"test_accuracy": acc, "steps": 4, "epochs_run": 2, "train_samples": 20, "trainable_params": 1,
                "total_params": 10, "train_seconds": 1.0, "selected_blocks": ["b"]}

    runs_by = {(10, "linear"): {0: run(0.70), 1: run(0.80), 2: run(0.75)},
               (10, "etf"): {0: run(0.72), 1: run(0.81), 2: run(0.79)}}
    info = {10: {"n_train": 20, "per_class": 10.0, "epochs": 2, "steps": 4}}
    rows = {r["mode"]: r for r in ds.size_rows(runs_by, [10], ["linear", "etf"], info, reference="linear")}
    diffs = [2.0, 1.0, 4.0]  # points, seed by seed
    assert rows["etf"]["delta_vs_reference_points"] == pytest.approx(diffs)
    half = stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / np.sqrt(3)
    d = rows["etf"]["delta_vs_reference"]
    assert d["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half]) and d["verdict"] == "tie"  # the interval holds 0
    assert rows["linear"]["delta_vs_reference"] is None  # the reference itself
    assert "+2.33 [" in ds.detail_table(list(rows.values()), [], 4, reference="linear")


def test_data_scarce_keeps_a_users_eval_every_epochs(bench, monkeypatch) -> None:
    ds = importlib.import_module("data_scarce")
    monkeypatch.setattr(ds, "available_train", lambda resolved: 60000)  # no dataset read
    plans = []
    monkeypatch.setattr(ds.harness, "print_plan", lambda plan: plans.append(plan))

    def evals(*extra: str) -> set[str]:
        assert ds.main(["--dry-run", "--tasks", "effnet-fm", "--sizes", "10", "--seeds", "0", "--modes", "linear_probe",
                        *extra]) == 0
        return {o for p in plans[-1] for o in p["overrides"] if o.startswith("train.eval_every_epochs=")}

    # 10 per class: 100 images, 2 steps per epoch -> 157 epochs, a test pass every 16th (about 10 in all)
    assert evals() == {"train.eval_every_epochs=16"}
    assert evals("--set", "train.eval_every_epochs=1") == {"train.eval_every_epochs=1"}


def test_selection_regret_packs_small_files_and_restores_only_into_an_absent_sweep(bench, tmp_path) -> None:
    sr = importlib.import_module("selection_regret")
    sweep, pack = tmp_path / "sweep", tmp_path / "pack"
    files = {"resolved.yaml": "a", "init_from.json": "{}", "sweep.json": "{}", "seeds/seed0/probe.json": "{}",
             "seeds/seed0/picks.json": "{}", "cells/b0/seed0/lr0.001/summary.json": "{}",
             "references/full/seed0/lr0.001/summary.json": "{}"}
    left_out = ["cells/b0/seed0/lr0.001/resolved.yaml", "cells/b0/seed0/lr0.001/trainable.safetensors",
                "cells/b1/seed0/lr0.001/checkpoint/summary.json", "sweep.png"]
    for rel in [*files, *left_out]:
        (sweep / rel).parent.mkdir(parents=True, exist_ok=True)
        (sweep / rel).write_text(files.get(rel, "x"))
    assert sr.pack_setting(sweep, pack) == 1  # one finished cell
    assert sorted(str(p.relative_to(pack)) for p in pack.rglob("*") if p.is_file()) == sorted(files)
    assert not sr.restore_setting(pack, sweep)  # a sweep there already: untouched
    assert sr.restore_setting(pack, tmp_path / "fresh")
    assert (tmp_path / "fresh" / "init_from.json").is_file()
    assert not sr.restore_setting(tmp_path / "no-pack", tmp_path / "other")
