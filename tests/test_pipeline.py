"""End-to-end ``run_pipeline`` on a tiny local BERT and a local csv: artefacts, summary, kill + resume, eval,
refusals."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from nc_finetune.config import Recipe, from_dict, recipe_to_dict
from nc_finetune.errors import ConfigError, DataError, UserError
from nc_finetune.pipeline import eval_stage, probe_and_select, run_pipeline, run_probe_stage
from nc_finetune.probe.result import ProbeResult
from nc_finetune.runs import RunDir
from nc_finetune.select import Selection
from nc_finetune.train.loop import StopTraining
from tests.conftest import make_recipe, tree_bytes, write_text_csv

pytest.importorskip("transformers")
pytest.importorskip("datasets")

SUMMARY_KEYS = {"test_accuracy", "trainable_params", "total_params", "train_seconds", "peak_memory_mb", "selection",
                "recipe"}


def test_run_writes_every_artefact(finished_run) -> None:
    out, recipe, summary = finished_run["out"], finished_run["recipe"], finished_run["summary"]
    for name in ["resolved.yaml", "probe.json", "probe.png", "selection.json", "metrics.jsonl", "summary.json",
                 "trainable.safetensors", "checkpoint/trainable.safetensors", "checkpoint/position.json"]:
        assert (out / name).is_file(), name
    assert not (out / "adapter").exists()  # only LoRA writes a peft adapter

    # resolved.yaml is the complete recipe: read back, it is the recipe that ran.
    assert from_dict(Recipe, yaml.safe_load((out / "resolved.yaml").read_text()), "") == recipe
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    probe = ProbeResult.load(out / "probe.json")
    assert [r["name"] for r in probe.blocks()] == [f"hf.encoder.layer.{i}" for i in range(3)]
    assert all(math.isfinite(r["nc1"]) and r["nc1"] > 0 for r in probe.blocks())
    assert probe.meta["samples_per_class"] == 8 and probe.meta["dataset"] == "csv"

    selection = Selection.load(out / "selection.json")
    assert selection.strategy == "knee" and len(selection.blocks) == 1
    assert selection.ranking[0] == selection.blocks[0]["index"]  # knee: the top-ranked block within the budget

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert "step" in r and ("loss" in r or ("split" in r and "accuracy" in r)), r
    train = [r for r in rows if "split" not in r]
    assert [r["step"] for r in train] == list(range(1, 13))  # 24 samples / batch 4 = 6 steps x 2 epochs
    assert all(math.isfinite(r["loss"]) for r in train)
    assert [r["split"] for r in rows if "split" in r] == ["test", "test", "final_test"]

    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk) >= SUMMARY_KEYS
    assert {k: on_disk[k] for k in SUMMARY_KEYS - {"selection", "recipe"}} == \
        {k: summary[k] for k in SUMMARY_KEYS - {"selection", "recipe"}}
    assert 0.0 <= on_disk["test_accuracy"] <= 1.0 and on_disk["test_samples"] == 8
    assert on_disk["train_seconds"] > 0 and on_disk["peak_memory_mb"] > 0
    assert on_disk["recipe"] == json.loads(json.dumps(recipe_to_dict(recipe)))
    assert on_disk["selection"] == json.loads((out / "selection.json").read_text())
    # The selection's parameter accounting is what actually trained.
    assert on_disk["trainable_params"] == selection.trainable_params
    assert on_disk["total_params"] == selection.total_params
    block = selection.blocks[0]["name"]
    weights = load_file(str(out / "trainable.safetensors"))
    assert set(weights) == {n for n in weights if n.startswith(("nc_head.", f"backbone.{block}."))}
    assert sum(v.numel() for v in weights.values()) == on_disk["trainable_params"]


def test_probe_accuracies_are_fractions(finished_run) -> None:
    probe = ProbeResult.load(finished_run["out"] / "probe.json")
    assert all(0.0 <= r["ncc_accuracy"] <= 1.0 for r in probe.layers), [r["ncc_accuracy"] for r in probe.layers]


def test_killed_run_resumed_through_the_cli_equals_the_uninterrupted_run(finished_run, tmp_path, capsys) -> None:
    from nc_finetune.cli import main

    out = tmp_path / "run"
    with pytest.raises(StopTraining):
        run_pipeline(finished_run["recipe"], out, progress=False, stop_after_steps=4)
    assert not (out / "summary.json").exists()
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text("adapt:\n  method: finetune\n")  # the rest comes from the same overrides
    assert main(["run", str(recipe_file), *finished_run["overrides"], "--out", str(out), "--resume", "--quiet"]) == 0
    assert "test accuracy" in capsys.readouterr().out

    base = finished_run["out"]
    a, b = json.loads((base / "summary.json").read_text()), json.loads((out / "summary.json").read_text())
    assert b["test_accuracy"] == a["test_accuracy"]
    assert b["test_loss"] == pytest.approx(a["test_loss"], abs=1e-6)
    assert b["steps"] == a["steps"] and b["selection"] == a["selection"]
    wa, wb = load_file(str(base / "trainable.safetensors")), load_file(str(out / "trainable.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)
    la = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [r["step"] for r in la]
    np.testing.assert_allclose([r["loss"] for r in lb], [r["loss"] for r in la], atol=1e-6)


def test_eval_reproduces_the_summary(finished_run) -> None:
    before = tree_bytes(finished_run["out"])
    r = eval_stage(finished_run["out"])
    summary = finished_run["summary"]
    assert r["split"] == "test" and r["samples"] == summary["test_samples"]
    assert r["accuracy"] == summary["test_accuracy"]
    assert r["loss"] == pytest.approx(summary["test_loss"], abs=1e-5)  # the run evaluated from the prefix cache
    assert eval_stage(finished_run["out"], split="train")["samples"] == 24
    assert tree_bytes(finished_run["out"]) == before
    with pytest.raises(UserError, match="split"):
        eval_stage(finished_run["out"], split="validation")


def test_eval_on_other_data_takes_only_data_overrides(finished_run, tmp_path) -> None:
    out = finished_run["out"]
    r = eval_stage(out, data_overrides=["data.max_eval_samples=4"])
    assert r["samples"] == 4 and 0.0 <= r["accuracy"] <= 1.0
    with pytest.raises(ConfigError, match="only data.. overrides .* got 'train.lr=1'"):
        eval_stage(out, data_overrides=["train.lr=1"])
    texts = ["the cat", "a dog", "red mat", "big cat", "the dog", "a mat"]
    three = write_text_csv(tmp_path / "three.csv", texts, np.array([0, 1, 2, 0, 1, 2]))
    with pytest.raises(DataError, match="trained on 2 classes; data 'csv' has 3"):
        eval_stage(out, data_overrides=[f"data.data_files={{train: {three}, test: {three}}}"])


def test_eval_refuses_an_unfinished_run(tmp_path) -> None:
    with pytest.raises(UserError, match="not a finished"):
        eval_stage(tmp_path)


def test_existing_run_is_not_overwritten(finished_run, tmp_path) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run["out"], out)
    before = tree_bytes(out)
    with pytest.raises(UserError, match="--resume"):
        run_pipeline(finished_run["recipe"], out, progress=False)
    with pytest.raises(UserError, match="different recipe"):
        RunDir(out).check_resume(make_recipe(*_paths(finished_run), **{"train.lr": 0.5}))
    with pytest.raises(UserError, match="--overwrite"):
        run_probe_stage(finished_run["recipe"], out)
    with pytest.raises(UserError, match="--overwrite"):
        probe_and_select(finished_run["recipe"], out)
    assert tree_bytes(out) == before


def _paths(finished_run):
    recipe = finished_run["recipe"]
    bert = recipe.backbone.name[len("hf:"):]
    return bert, recipe.data.data_files


def test_select_stage_reuses_a_matching_probe(finished_run, tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(finished_run["out"] / "probe.json", out / "probe.json")
    import nc_finetune.probe.runner as runner

    monkeypatch.setattr(runner, "probe", lambda *a, **k: pytest.fail("the probe must be reused"))
    selection = probe_and_select(finished_run["recipe"], out, progress=False)
    assert selection.indices == Selection.load(finished_run["out"] / "selection.json").indices
    assert (out / "selection.json").read_bytes() == (finished_run["out"] / "selection.json").read_bytes()


def test_impossible_selection_fails_before_the_probe(finished_run, tmp_path, monkeypatch) -> None:
    import nc_finetune.probe.runner as runner

    monkeypatch.setattr(runner, "probe", lambda *a, **k: pytest.fail("the probe ran before the selection failed"))
    bert, csv = _paths(finished_run)
    out = tmp_path / "run"
    tiny_budget = {"selection.max_param_fraction": 0.0001}
    with pytest.raises(ConfigError, match="cannot hold any block"):
        run_pipeline(make_recipe(bert, csv, **tiny_budget, **{"selection.strategy": "stall"}), out, progress=False)
    with pytest.raises(ConfigError, match="cannot hold the blocks listed"):
        run_pipeline(make_recipe(bert, csv, **tiny_budget), out, progress=False)  # manual [1]
    with pytest.raises(ConfigError, match="unknown block 7"):
        run_pipeline(make_recipe(bert, csv, **{"selection.blocks": "[7]"}), out, progress=False)
    with pytest.raises(ConfigError, match="cannot hold any block"):
        probe_and_select(make_recipe(bert, csv, **tiny_budget, **{"selection.strategy": "knee"}), out, progress=False)
    assert not out.exists()  # nothing written, so nothing blocks a corrected rerun


@pytest.mark.parametrize("labels", [[0] * 12, [0] * 11 + [1]], ids=["one-class", "singleton-class"])
def test_unusable_data_is_refused_before_any_model(finished_run, tmp_path, monkeypatch, labels) -> None:
    import nc_finetune.backbones as backbones

    monkeypatch.setattr(backbones, "load_backbone", lambda *a, **k: pytest.fail("a model was built"))
    bert, _ = _paths(finished_run)
    texts = [f"the cat {i}" for i in range(12)]
    csv = {"train": write_text_csv(tmp_path / "train.csv", texts, np.array(labels)),
           "test": write_text_csv(tmp_path / "test.csv", texts[:4], np.array([0, 1, 0, 1]))}
    with pytest.raises(DataError):
        run_pipeline(make_recipe(bert, csv), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_scl_on_a_block_the_probe_skipped(finished_run, tmp_path) -> None:
    """probe.layers leaves the selected block out: the skip width comes from the model; run and eval agree."""
    bert, csv = _paths(finished_run)
    recipe = make_recipe(bert, csv, **{"adapt.method": "scl", "adapt.scl_wiring": "concat", "probe.layers": "[0]",
                                       "train.epochs": 1})
    out = tmp_path / "run"
    summary = run_pipeline(recipe, out, progress=False)
    assert [r["name"] for r in ProbeResult.load(out / "probe.json").layers] == ["hf.encoder.layer.0"]
    weights = load_file(str(out / "trainable.safetensors"))
    assert weights["skip_proj.weight"].shape == (16, 16) and weights["nc_head.weight"].shape == (2, 32)
    r = eval_stage(out)
    assert r["accuracy"] == summary["test_accuracy"]
    assert r["loss"] == pytest.approx(summary["test_loss"], abs=1e-5)


def test_run_killed_before_its_first_checkpoint_resumes_from_the_start(finished_run, tmp_path) -> None:
    """Killed after probing/selecting and some logged steps but before any checkpoint: --resume trains from step 0
    (instead of refusing, which left a directory that neither `run` nor `run --resume` would accept)."""
    out = tmp_path / "run"
    with pytest.raises(StopTraining):
        run_pipeline(finished_run["recipe"], out, progress=False, stop_after_steps=2)
    shutil.rmtree(out / "checkpoint")  # the state of a kill at step 1
    summary = run_pipeline(finished_run["recipe"], out, progress=False, resume=True)
    assert summary["test_loss"] == pytest.approx(finished_run["summary"]["test_loss"], abs=1e-6)
    assert (out / "metrics.jsonl").read_text().count('"loss"') == \
        (finished_run["out"] / "metrics.jsonl").read_text().count('"loss"')


def test_a_truncated_backbone_runs_end_to_end_and_evals(finished_run, tmp_path) -> None:
    bert, csv = _paths(finished_run)
    recipe = make_recipe(bert, csv, **{"backbone.truncate_at": 1, "selection.blocks": "[1]", "train.epochs": 1})
    out = tmp_path / "run"
    summary = run_pipeline(recipe, out, progress=False)
    assert [r["name"] for r in ProbeResult.load(out / "probe.json").blocks()] == \
        ["hf.encoder.layer.0", "hf.encoder.layer.1"]
    assert summary["total_params"] < finished_run["summary"]["total_params"]
    assert summary["backbone_provenance"]["truncated_at"] == "hf.encoder.layer.1"
    r = eval_stage(out)
    assert r["accuracy"] == summary["test_accuracy"]
