"""nc-finetune sweep: candidates, the regret arithmetic against hand computations, end to end with resume, and
bad input refused before any data or weights load."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from nc_finetune import runs
from nc_finetune.cli import main
from nc_finetune.config import SweepBudget, load_recipe
from nc_finetune.errors import ConfigError
from nc_finetune.sweep import (
    cells_to_train,
    choose_lr,
    floors,
    mean_ci95,
    reference_recipe,
    resolve_candidates,
    summarize,
    verdict,
)
from tests.conftest import recipe_overrides, tree_bytes

BLOCKS = [SimpleNamespace(index=i, name=f"layer.{i}", num_params=p) for i, p in enumerate([10, 20, 30, 40])]


def test_candidates_blocks_pairs_and_lists() -> None:
    assert resolve_candidates("blocks", BLOCKS) == [(0,), (1,), (2,), (3,)]
    assert resolve_candidates("pairs", BLOCKS) == [(0, 1), (1, 2), (2, 3)]
    assert resolve_candidates([[3, "layer.1"], [-1]], BLOCKS) == [(1, 3), (3,)]
    with pytest.raises(ConfigError, match="unknown block 7"):
        resolve_candidates([[7]], BLOCKS)
    with pytest.raises(ConfigError, match="twice"):
        resolve_candidates([[1], ["layer.1"]], BLOCKS)
    with pytest.raises(ConfigError, match="blocks, pairs"):
        resolve_candidates("triples", BLOCKS)


def test_mean_ci95_is_the_student_t_interval() -> None:
    v = [1.0, 2.0, 4.0, 7.0]
    r = mean_ci95(v)
    half = stats.t.ppf(0.975, 3) * np.std(v, ddof=1) / 2.0
    assert r["mean"] == pytest.approx(3.5) and r["ci95"] == pytest.approx([3.5 - half, 3.5 + half])
    assert mean_ci95([2.0]) == {"mean": 2.0, "ci95": None, "n": 1}
    assert verdict({"mean": 1.0, "ci95": [0.1, 2.0]}) == "win"
    assert verdict({"mean": -1.0, "ci95": [-2.0, -0.1]}) == "loss"
    assert verdict({"mean": 1.0, "ci95": [-0.1, 2.0]}) == "tie"


def test_learning_rate_is_chosen_on_validation_never_on_test() -> None:
    per_lr = {1e-3: {"val": {0: 0.9, 1: 0.8}, "test": {0: 0.1, 1: 0.1}},
              1e-2: {"val": {0: 0.7, 1: 0.7}, "test": {0: 0.99, 1: 0.99}}}
    assert choose_lr(per_lr) == 1e-3
    assert choose_lr({5e-4: per_lr[1e-2]}) == 5e-4


def test_the_grid_tunes_the_head_of_a_linear_probe_and_the_blocks_of_the_rest() -> None:
    recipe = load_recipe(None, ["train.lr=1e-3", "train.head_lr=3e-3"])
    for method in ("full", "auto_rgn", "linear_probe"):
        r = reference_recipe(recipe, 0, ["layer.0"], 1e-2, method)
        assert r.train.lr == 1e-2 and r.adapt.method == method
        # the linear probe trains only its head: the grid moves the head's rate (x10 here), the others keep it
        assert r.train.head_lr == pytest.approx(3e-2 if method == "linear_probe" else 3e-3)
    same = load_recipe(None, ["train.lr=1e-3", "train.head_lr=null"])
    assert reference_recipe(same, 0, ["layer.0"], 1e-2, "linear_probe").train.head_lr is None  # head at lr already


def test_only_the_picks_of_the_budgets_and_strategies_asked_for_are_trained() -> None:
    # a sweep resumed with fewer budgets (or strategies) keeps the old picks but trains none of their block sets
    picks = [{"1_block": {"knee": [2]}, "10pct": {"knee": [3, 1], "stall": [0, 2]}},
             {"1_block": {"knee": [1]}, "10pct": {"knee": [1, 3], "lisa": [0, 3]}}]
    candidates = [(0,), (1,), (2,), (3,)]
    singles = [(c, "candidate") for c in candidates]
    assert cells_to_train(candidates, picks, ["knee", "stall"], ["1_block"]) == singles
    assert cells_to_train(candidates, picks, ["knee", "stall"], ["1_block", "10pct"]) == [
        *singles, ((0, 2), "pick"), ((1, 3), "pick")]  # sorted, once each, lisa's not asked for
    assert cells_to_train(candidates, picks, ["knee"], ["10pct"]) == [*singles, ((1, 3), "pick")]


def _cell(indices, test, val=None, kind="candidate"):
    seeds = sorted(test)
    return {"indices": list(indices), "names": [f"layer.{i}" for i in indices], "kind": kind,
            "block_params": sum(BLOCKS[i].num_params for i in indices), "trainable_params": None,
            "per_lr": {1e-3: {"test": test, "val": val or {s: None for s in seeds}}}}


def test_oracle_scores_each_cell_at_the_rate_validation_chose() -> None:
    # block 1 is best on test at lr 1e-2, but validation prefers 1e-3 for it: the oracle sees only 1e-3's accuracy
    def cell(i, by_rate):
        return {**_cell((i,), {0: 0.0}), "per_lr": {lr: {"val": {0: v}, "test": {0: t}} for lr, (v, t) in
                                                    by_rate.items()}}

    cells = [cell(0, {1e-3: (0.80, 0.80), 1e-2: (0.70, 0.70)}), cell(1, {1e-3: (0.90, 0.75), 1e-2: (0.85, 0.99)})]
    rep = summarize(cells, {0: {"1_block": {"rule": [1]}}}, {}, [SweepBudget(max_blocks=1)], [0], backbone_params=100)
    assert [c["lr"] for c in rep["cells"]] == [1e-3, 1e-3]
    oracle = rep["oracle"]["1_block"]
    assert oracle["by_test"] == {"blocks": ["layer.0"], "indices": [0], "mean_test": 0.80, "lr": 1e-3}
    assert oracle["by_val"]["blocks"] == ["layer.1"] and oracle["by_val"]["lr"] == 1e-3
    assert rep["regret"]["1_block"]["rule"]["mean"] == pytest.approx(100 * (0.80 - 0.75))


def test_regret_is_paired_per_seed_against_the_oracle() -> None:
    # per-block test accuracy for seeds 0, 1, 2; block 2 is the oracle (mean 0.90)
    acc = {0: [0.70, 0.75, 0.72], 1: [0.80, 0.78, 0.82], 2: [0.91, 0.88, 0.91], 3: [0.85, 0.86, 0.81]}
    cells = [_cell((i,), dict(enumerate(a))) for i, a in acc.items()]
    cells.append(_cell((2, 3), {0: 0.93, 1: 0.92, 2: 0.94}, kind="pick"))
    picks = {0: {"1_block": {"rule": [2], "last_k": [3]}, "70pct": {"rule": [2, 3]}},
             1: {"1_block": {"rule": [1], "last_k": [3]}, "70pct": {"rule": [2, 3]}},
             2: {"1_block": {"rule": [2], "last_k": [3]}, "70pct": {"rule": [2, 3]}}}
    scores = {s: {"rule": {0: 0.0, 1: 1.0, 2: 3.0, 3: 2.0}, "last_k": {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}}
              for s in range(3)}
    budgets = [SweepBudget(max_blocks=1), SweepBudget(max_blocks=None, max_param_fraction=0.7)]
    rep = summarize(cells, picks, scores, budgets, [0, 1, 2], backbone_params=100)

    assert rep["oracle"]["1_block"]["by_test"]["blocks"] == ["layer.2"]
    assert rep["oracle"]["1_block"]["searched"] == 4
    rule = rep["regret"]["1_block"]["rule"]
    per_seed = [100 * (0.91 - 0.91), 100 * (0.88 - 0.78), 100 * (0.91 - 0.91)]
    assert [rule["per_seed"][str(s)] for s in range(3)] == pytest.approx(per_seed)
    assert rule["mean"] == pytest.approx(np.mean(per_seed))
    last = rep["regret"]["1_block"]["last_k"]
    assert last["mean"] == pytest.approx(100 * np.mean([0.91 - 0.85, 0.88 - 0.86, 0.91 - 0.81]))
    diffs = [100 * (0.91 - 0.85), 100 * (0.78 - 0.86), 100 * (0.91 - 0.81)]
    assert rule["vs_last_k"]["mean"] == pytest.approx(np.mean(diffs))
    assert rule["vs_last_k"]["verdict"] == "tie"
    # the scores rank blocks 2 > 3 > 1 > 0 exactly like the mean accuracy: tau = 1; last_k's order is off by one swap
    assert rule["kendall_tau"] == pytest.approx(1.0)
    assert last["kendall_tau"] == pytest.approx(stats.kendalltau([1, 2, 3, 4], [0.7233, 0.8, 0.9, 0.84]).statistic)
    # the 70% budget (blocks 2+3 = 70 params) admits the pair, which is then the oracle: zero regret
    assert rep["oracle"]["70pct"]["by_test"]["indices"] == [2, 3]
    assert rep["regret"]["70pct"]["rule"]["mean"] == pytest.approx(0.0)



def test_the_oracle_is_searched_among_block_sets_trained_on_every_seed() -> None:
    """A pick trained for one seed only (a lucky 0.99) cannot be the oracle: its other seeds' regret is undefined."""
    cells = [_cell((0,), {0: 0.70, 1: 0.72}), _cell((1,), {0: 0.80, 1: 0.78}),
             _cell((0, 1), {0: 0.99}, kind="pick")]
    picks = {0: {"50pct": {"rule": [0, 1]}}, 1: {"50pct": {"rule": [1]}}}
    rep = summarize(cells, picks, {}, [SweepBudget(max_blocks=None, max_param_fraction=0.5)], [0, 1],
                    backbone_params=100)
    assert rep["oracle"]["50pct"]["by_test"]["indices"] == [1] and rep["oracle"]["50pct"]["searched"] == 2
    assert rep["regret"]["50pct"]["rule"]["per_seed"] == pytest.approx({"0": 100 * (0.80 - 0.99), "1": 0.0})


def test_floors_are_the_hindsight_choices_computed_by_hand() -> None:
    """exhaustive_val keeps each seed's best block by that seed's validation accuracy; other_seeds the best mean test
    accuracy of the other seeds; both are scored like a strategy, also from a sweep.json read back (string seeds)."""
    test = {0: {0: 0.70, 1: 0.75, 2: 0.72}, 1: {0: 0.80, 1: 0.78, 2: 0.82},
            2: {0: 0.91, 1: 0.88, 2: 0.91}, 3: {0: 0.85, 1: 0.86, 2: 0.81}}
    val = {0: {0: 0.9, 1: 0.1, 2: 0.1}, 1: {0: 0.1, 1: 0.1, 2: 0.9},   # seed 0 -> block 0, seed 2 -> block 1
           2: {0: 0.5, 1: 0.5, 2: 0.5}, 3: {0: 0.1, 1: 0.9, 2: 0.1}}   # seed 1 -> block 3
    cells = [_cell((i,), test[i], val[i]) for i in range(4)]
    picks = {s: {"1_block": {"random_k": [0], "last_k": [3]}} for s in range(3)}
    rep = summarize(cells, picks, {}, [SweepBudget(max_blocks=1)], [0, 1, 2], backbone_params=100)
    rep.update({"budgets": [{"max_blocks": 1, "max_param_fraction": None, "label": "1_block"}],
                "backbone_params": 100, "seeds": [0, 1, 2]})
    got = floors(rep)["1_block"]
    oracle = test[2]  # block 2: best mean test accuracy
    ev = got["exhaustive_val"]
    assert ev["picks"] == {"0": ["layer.0"], "1": ["layer.3"], "2": ["layer.1"]}
    hand = [100 * (oracle[0] - 0.70), 100 * (oracle[1] - 0.86), 100 * (oracle[2] - 0.82)]
    assert [ev["per_seed"][str(s)] for s in range(3)] == pytest.approx(hand)
    assert ev["mean"] == pytest.approx(np.mean(hand))
    half = stats.t.ppf(0.975, 2) * np.std(hand, ddof=1) / np.sqrt(3)
    assert ev["ci95"] == pytest.approx([np.mean(hand) - half, np.mean(hand) + half])
    assert ev["vs_last_k"]["mean"] == pytest.approx(100 * np.mean([0.70 - 0.85, 0.86 - 0.86, 0.82 - 0.81]))
    # other seeds: for seed 0, blocks' means over seeds 1, 2 are 0.735, 0.80, 0.895, 0.835 -> block 2, and so on
    other = got["other_seeds"]
    assert other["picks"] == {str(s): ["layer.2"] for s in range(3)} and other["mean"] == pytest.approx(0.0)
    assert other["vs_random_k"]["mean"] == pytest.approx(100 * np.mean([0.91 - 0.70, 0.88 - 0.75, 0.91 - 0.72]))
    assert other["vs_random_k"]["verdict"] == "win"
    # the same from the JSON a finished sweep wrote (seeds become strings)
    again = floors(json.loads(json.dumps(rep)))["1_block"]
    for name in ("exhaustive_val", "other_seeds"):
        assert again[name]["picks"] == got[name]["picks"]
        assert again[name]["mean"] == pytest.approx(got[name]["mean"])
        assert again[name]["vs_last_k"]["ci95"] == pytest.approx(got[name]["vs_last_k"]["ci95"])


def test_references_are_compared_paired_per_seed_after_choosing_their_rate_on_validation() -> None:
    cells = [_cell((0,), {0: 0.70, 1: 0.80}), _cell((1,), {0: 0.90, 1: 0.84})]
    picks = {s: {"1_block": {"rule": [1]}} for s in (0, 1)}
    full = {"trainable_params": 1000, "per_lr": {
        0.1: {"val": {0: 0.99, 1: 0.99}, "test": {0: 0.10, 1: 0.10}},  # best on validation: chosen
        0.01: {"val": {0: 0.50, 1: 0.50}, "test": {0: 0.99, 1: 0.99}}}}
    rep = summarize(cells, picks, {}, [SweepBudget(max_blocks=1)], [0, 1], backbone_params=100,
                    references={"full": full})
    assert rep["references"]["full"]["lr"] == 0.1 and rep["references"]["full"]["mean_test"] == pytest.approx(0.10)
    vs = rep["regret"]["1_block"]["rule"]["vs_references"]["full"]
    assert vs["mean"] == pytest.approx(100 * np.mean([0.90 - 0.10, 0.84 - 0.10]))
    assert vs["verdict"] == "win"


def test_sweep_end_to_end_resumes_and_writes_run_directories(tmp_path, bert_dir, text_csv, monkeypatch) -> None:
    import nc_finetune.pipeline as pipeline
    from nc_finetune.pipeline import eval_stage
    from nc_finetune.sweep import sweep_stage

    overrides = recipe_overrides(bert_dir, text_csv, **{
        "train.val_fraction": 0.25, "train.epochs": 1, "sweep.seeds": "[0, 1]", "sweep.lr_grid": "[0.01, 0.001]",
        "sweep.strategies": "[knee, stall, 'stall@stall_reference=min', last_k, random_k, first_k]",
        "sweep.budgets": "[{max_blocks: 1}, {max_blocks: 2}]"})
    recipe = load_recipe(None, overrides)
    out = tmp_path / "sweep"
    real_run_stage, calls = pipeline.run_pipeline, []

    def killed_after_three(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 4:
            raise KeyboardInterrupt  # a kill in the middle of the fourth cell
        return real_run_stage(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_pipeline", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        sweep_stage(recipe, out, progress=False, echo=lambda line: None)
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **k: (calls.append(a[1]), real_run_stage(*a, **k))[1])
    lines: list[str] = []
    report = sweep_stage(recipe, out, progress=False, echo=lines.append)

    n_cells = len(report["cells"])
    total = n_cells * 2 * 2
    assert len(lines) == total and lines[-1].startswith(f"[{total}/{total}]")
    assert len(calls) == 3 + 1 + (total - 3)  # the three finished cells were not trained again
    saved = json.loads((out / runs.SWEEP).read_text())
    assert saved["oracle"] == json.loads(json.dumps(report["oracle"]))
    assert set(saved["floors"]["1_block"]) == {"exhaustive_val", "other_seeds"}
    assert (out / runs.SWEEP_PLOT).stat().st_size > 0
    singles = [c for c in report["cells"] if c["kind"] == "candidate"]
    assert [c["names"] for c in singles] == [["hf.encoder.layer.0"], ["hf.encoder.layer.1"], ["hf.encoder.layer.2"]]
    for c in report["cells"]:
        assert set(c["test_accuracy"]) == {0, 1} and all(0.0 <= v <= 1.0 for v in c["test_accuracy"].values())
        assert all(v is not None for v in c["val_accuracy"].values())  # chosen on validation
        assert c["lr"] in (0.01, 0.001)
    best = max(report["cells"], key=lambda c: (c["mean_test"], -c["block_params"]))
    assert report["oracle"]["2_blocks"]["by_test"]["indices"] == best["indices"]
    for strategy in ("knee", "stall", "stall@stall_reference=min", "last_k", "random_k", "first_k"):
        r = report["regret"]["1_block"][strategy]
        assert r["mean"] >= 0.0 and set(r["picks"]) == {"0", "1"}
    assert report["regret"]["1_block"]["last_k"]["picks"]["0"] == ["hf.encoder.layer.2"]
    assert report["regret"]["1_block"]["first_k"]["picks"]["0"] == ["hf.encoder.layer.0"]
    # the probe subset is resampled per seed
    p0, p1 = (json.loads((out / "seeds" / f"seed{s}" / runs.PROBE).read_text()) for s in (0, 1))
    assert [r["nc1"] for r in p0["layers"]] != [r["nc1"] for r in p1["layers"]]
    # each cell is an ordinary run directory: eval rebuilds it and reproduces its test accuracy
    cell = out / "cells" / "hf.encoder.layer.1" / "seed1" / "lr0.01"
    summary = json.loads((cell / runs.SUMMARY).read_text())
    assert summary["recipe"]["train"]["seed"] == 1 and summary["recipe"]["data"]["seed"] == 1
    assert eval_stage(cell)["accuracy"] == pytest.approx(summary["test_accuracy"])
    # a finished sweep reruns from its cells alone
    before = len(calls)
    again = sweep_stage(recipe, out, progress=False, echo=lambda line: None)
    assert len(calls) == before and again["regret"] == report["regret"]
    # a sweep may grow (another strategy): finished cells and picks are kept, only new pick cells train
    grown = load_recipe(None, [*overrides, "sweep.strategies=[knee, stall, 'stall@stall_reference=min', last_k, "
                                            "random_k, first_k, lisa]"])
    bigger = sweep_stage(grown, out, progress=False, echo=lambda line: None)
    new_cells = len(bigger["cells"]) - n_cells
    assert len(calls) == before + 2 * 2 * new_cells
    assert {k: v for k, v in bigger["regret"]["1_block"].items() if k != "lisa"} == report["regret"]["1_block"]
    assert "lisa" in bigger["regret"]["1_block"]
    # ... or references (methods trained on every block): only they train; each pick is compared with them
    with_refs = load_recipe(None, [*overrides, "sweep.strategies=[knee, stall, 'stall@stall_reference=min', last_k, "
                                               "random_k, first_k, lisa]", "sweep.references=[linear_probe, full]"])
    before = len(calls)
    refd = sweep_stage(with_refs, out, progress=False, echo=lambda line: None)
    assert len(calls) == before + 2 * 2 * 2
    full = refd["references"]["full"]
    ref_run = json.loads((out / "references" / "full" / "seed0" / f"lr{full['lr']:g}" / runs.SUMMARY).read_text())
    assert ref_run["method"] == "full" and ref_run["trainable_params"] == full["trainable_params"]
    assert refd["references"]["linear_probe"]["trainable_params"] < full["trainable_params"]
    knee = refd["regret"]["1_block"]["knee"]
    diffs = [100 * (knee["test_accuracy"][str(s)] - full["test_accuracy"][s]) for s in (0, 1)]
    assert knee["vs_references"]["full"]["mean"] == pytest.approx(np.mean(diffs))
    # a bootstrap variant records how often the resampled probes chose its pick
    boot = load_recipe(None, [*overrides, "sweep.strategies=[knee, 'knee@bootstrap=4']"])
    stab = sweep_stage(boot, out, progress=False, echo=lambda line: None)["regret"]["1_block"]["knee@bootstrap=4"]
    shares = stab["bootstrap_stability"]["per_seed"]
    assert len(shares) == 2 and all(0.25 <= x <= 1.0 for x in shares)
    assert stab["bootstrap_stability"]["mean"] == pytest.approx(np.mean(shares))
    picks0 = json.loads((out / "seeds" / "seed0" / "picks.json").read_text())
    assert picks0["stability"]["1_block"]["knee@bootstrap=4"] == shares[0]


@pytest.mark.parametrize(("override", "needle"), [
    ("sweep.candidates=triples", "sweep.candidates"),
    ("sweep.candidates=[[7]]", "unknown block 7"),
    ("sweep.lr_grid=[0.01, 0.001]", "train.val_fraction"),
    ("sweep.seeds=[]", "at least one seed"),
    ("sweep.strategies=[knee, nc_magic]", "nc_magic"),
    ("sweep.strategies=['stall@stall_reference=median']", "stall_reference"),
    ("sweep.budgets=[]", "at least one budget"),
    ("sweep.references=[lora]", "sweep.references"),
])
def test_bad_sweep_input_is_one_line_before_any_data_loads(capsys, tmp_path, bert_dir, text_csv, monkeypatch,
                                                           override, needle) -> None:
    import nc_finetune.pipeline as pipeline

    monkeypatch.setattr(pipeline, "prepare_data", lambda *a, **k: pytest.fail("data loaded before the refusal"))
    out = tmp_path / "sweep"
    argv = ["sweep", "-", *recipe_overrides(bert_dir, text_csv), override, "--out", str(out), "--quiet"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("adapt:\n  method: finetune\n", encoding="utf-8")
    argv[1] = str(recipe)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_a_directory_with_another_sweep_is_refused(tmp_path, bert_dir, text_csv) -> None:
    from nc_finetune.errors import UserError
    from nc_finetune.sweep import sweep_stage

    out = tmp_path / "sweep"
    out.mkdir()
    recipe = load_recipe(None, recipe_overrides(bert_dir, text_csv, **{"sweep.seeds": "[0]"}))
    other = load_recipe(None, recipe_overrides(bert_dir, text_csv, **{"sweep.seeds": "[0]", "train.epochs": 3}))
    runs.RunDir(out).write_recipe(other)
    before = tree_bytes(out)
    with pytest.raises(UserError, match=r"another recipe \(train.epochs"):
        sweep_stage(recipe, out, progress=False)
    assert tree_bytes(out) == before


def test_report_renders_a_sweep(tmp_path) -> None:
    from nc_finetune.report.render import render_report
    from nc_finetune.sweep import plot_sweep

    acc = {0: [0.70, 0.75], 1: [0.80, 0.78], 2: [0.91, 0.88], 3: [0.85, 0.86]}
    cells = [_cell((i,), dict(enumerate(a))) for i, a in acc.items()]
    picks = {s: {"1_block": {"knee": [2], "last_k": [3]}} for s in (0, 1)}
    scores = {s: {"knee": {0: 0.0, 1: 1.0, 2: 3.0, 3: 2.0}, "last_k": {i: float(i) for i in range(4)}} for s in (0, 1)}
    rep = summarize(cells, picks, scores, [SweepBudget(max_blocks=1)], [0, 1], backbone_params=100)
    rep.update({"backbone": "tiny", "dataset": "toy", "seeds": [0, 1], "lr_grid": [1e-3], "backbone_params": 100,
                "budgets": [{"max_blocks": 1, "max_param_fraction": None, "label": "1_block"}],
                "blocks": [{"index": b.index, "name": b.name, "num_params": b.num_params} for b in BLOCKS],
                "probe": {"0": [{"index": i, "name": f"layer.{i}", "nc1": 4.0 / (i + 1), "nc1_trace": 1.0,
                                 "cdnv": 0.5} for i in range(4)]}})
    out = tmp_path / "sweep"
    out.mkdir()
    rep["floors"] = floors(rep)
    (out / runs.SWEEP).write_text(json.dumps(rep))
    plot_sweep(rep, out / runs.SWEEP_PLOT)
    text = render_report(out).read_text()
    assert "- kind: sweep" in text and "![per-block accuracy and collapse](sweep.png)" in text
    assert "oracle (best mean test accuracy of 4 block sets): `layer.2`" in text
    assert "| knee | +0.00 |" in text and "| last_k | +4.00 |" in text
    # block 2 is best on both seeds, so the other seeds' choice is the oracle: regret 0, 4 points over last_k
    assert "| other_seeds | +0.00 | [+0.00, +0.00] | — | +4.00 (tie) |" in text  # no random_k in this sweep
    assert "| exhaustive_val |" not in text  # no validation accuracy, so no such floor


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["minilm-rotten-tomatoes", "effnet-lite0-fashion-mnist"])
def test_sweep_on_the_default_recipes_with_a_handful_of_steps(tmp_path, recipe) -> None:
    """The two shipped recipes, real offline models and data, two seeds, a lr grid chosen on validation."""
    out = tmp_path / "sweep"
    argv = ["sweep", recipe, "data.max_train_samples=120", "data.max_eval_samples=60", "probe.samples_per_class=6",
            "train.max_steps=3", "train.val_fraction=0.2", "sweep.seeds=[0, 1]", "sweep.lr_grid=[1.0e-4, 1.0e-3]",
            "sweep.candidates=[[0], [-1]]", "sweep.strategies=[knee, stall, last_k, first_k, random_k]",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    report = json.loads((out / runs.SWEEP).read_text())
    assert len(report["seeds"]) == 2 and report["lr_grid"] == [1.0e-4, 1.0e-3]
    assert {tuple(c["indices"]) for c in report["cells"] if c["kind"] == "candidate"} == {
        (0,), (len(report["blocks"]) - 1,)}
    assert report["regret"]["1_block"]["last_k"]["mean"] is not None
    assert (out / runs.SWEEP_PLOT).stat().st_size > 0


def test_a_sweep_recorded_before_a_new_config_field_resumes_without_redoing_anything(tmp_path, bert_dir, text_csv,
                                                                                        monkeypatch) -> None:
    import yaml

    import nc_finetune.pipeline as pipeline
    from nc_finetune.sweep import sweep_stage

    recipe = load_recipe(None, recipe_overrides(bert_dir, text_csv, **{
        "train.epochs": 1, "sweep.seeds": "[0]", "sweep.strategies": "[knee, last_k]"}))
    out = tmp_path / "sweep"
    first = sweep_stage(recipe, out, progress=False, echo=lambda line: None)
    # as if written by an earlier version: a selection and a data field it did not have yet
    resolved = yaml.safe_load((out / runs.RESOLVED).read_text())
    del resolved["selection"]["rgn_batch_size"], resolved["data"]["streaming"]
    (out / runs.RESOLVED).write_text(yaml.safe_dump(resolved))
    picks_path = out / "seeds" / "seed0" / "picks.json"
    picks = json.loads(picks_path.read_text())
    del picks["selection"]["rgn_batch_size"]
    picks_path.write_text(json.dumps(picks))
    calls: list[str] = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **k: calls.append("train"))
    monkeypatch.setattr(pipeline, "choose_blocks", lambda *a, **k: calls.append("pick"))
    again = sweep_stage(recipe, out, progress=False, echo=lambda line: None)
    assert calls == [] and again["regret"] == first["regret"]


def test_a_sweep_moved_with_its_source_model_resumes_and_other_weights_are_refused(tmp_path, bert_dir, text_csv,
                                                                                     finished_run, monkeypatch) -> None:
    """A study copied to another folder with its ``backbone.init_from`` run beside it resumes without retraining (the
    source is recognised by its weights, not its path); a source with other weights is another recipe."""
    import shutil

    import nc_finetune.pipeline as pipeline
    from nc_finetune.errors import UserError
    from nc_finetune.sweep import sweep_stage

    def recipe_from(root):
        return load_recipe(None, recipe_overrides(bert_dir, text_csv, **{
            "train.epochs": 1, "sweep.seeds": "[0]", "sweep.strategies": "[last_k]",
            "backbone.init_from": str(root / "source")}))

    first_root, moved_root = tmp_path / "first", tmp_path / "moved"
    shutil.copytree(finished_run["out"], first_root / "source")
    first = sweep_stage(recipe_from(first_root), first_root / "sweep", progress=False, echo=lambda line: None)
    shutil.copytree(first_root, moved_root)
    shutil.rmtree(first_root)
    calls: list[str] = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **k: calls.append("train"))
    again = sweep_stage(recipe_from(moved_root), moved_root / "sweep", progress=False, echo=lambda line: None)
    assert calls == [] and again["regret"] == first["regret"]
    assert json.loads((moved_root / "sweep" / runs.SOURCE).read_text())["path"] == str(moved_root / "source")
    third = tmp_path / "third"
    shutil.copytree(moved_root, third)
    weights = third / "source" / runs.WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # other weights under the source's name
    before = tree_bytes(third / "sweep")
    with pytest.raises(UserError, match=r"another recipe \(backbone\.init_from"):
        sweep_stage(recipe_from(third), third / "sweep", progress=False)
    assert tree_bytes(third / "sweep") == before


def test_trials_run_once_per_seed_for_every_budget(tmp_path, bert_dir, text_csv, monkeypatch) -> None:
    import nc_finetune.select.trial as trial
    from nc_finetune.sweep import sweep_stage

    real, calls = trial.run_trials, []
    monkeypatch.setattr(trial, "run_trials", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    recipe = load_recipe(None, recipe_overrides(bert_dir, text_csv, **{
        "train.epochs": 1, "sweep.seeds": "[0]", "sweep.strategies": "[trial]", "selection.trial_steps": 2,
        "selection.trial_samples": 2, "sweep.budgets": "[{max_blocks: 1}, {max_blocks: 2}]"}))
    report = sweep_stage(recipe, tmp_path / "sweep", progress=False, echo=lambda line: None)
    assert len(calls) == 1
    one, two = (report["regret"][b]["trial"]["picks"]["0"] for b in ("1_block", "2_blocks"))
    assert len(one) == 1 and len(two) == 2 and one[0] in two  # the same ranking, cut twice
