"""``data.streaming`` through the recipe stages: probe on a per-class stream sample, training on a bounded sample,
evaluation that reads the test stream batch by batch and agrees with the in-memory evaluation."""

from __future__ import annotations

import json
import math

import pytest

from nc_finetune.errors import ConfigError
from nc_finetune.pipeline import eval_stage, run_probe_stage, run_stage
from tests.conftest import make_recipe, make_texts, write_text_csv

pytest.importorskip("transformers")
pytest.importorskip("datasets")


def test_streamed_eval_equals_in_memory_eval(finished_run) -> None:
    out = finished_run["out"]
    memory = eval_stage(out)
    streamed = eval_stage(out, data_overrides=["data.streaming=true"])  # labels from one label-only pass
    assert streamed["samples"] == memory["samples"] == 8
    assert streamed["accuracy"] == memory["accuracy"]
    assert streamed["loss"] == pytest.approx(memory["loss"], rel=1e-6)
    assert streamed["confusion_matrix"] == memory["confusion_matrix"]
    named = eval_stage(out, data_overrides=["data.streaming=true", "data.labels=['0', '1']"])  # no label pass
    assert named["accuracy"] == memory["accuracy"]
    assert eval_stage(out, split="train", data_overrides=["data.streaming=true"])["samples"] == 24


def test_streaming_probe_and_run(bert_dir, tmp_path) -> None:
    texts, labels = make_texts(60, 2, seed=7)
    csv = {"train": write_text_csv(tmp_path / "train.csv", texts[:48], labels[:48]),
           "test": write_text_csv(tmp_path / "test.csv", texts[48:], labels[48:])}
    recipe = make_recipe(bert_dir, csv, **{"data.streaming": "true", "probe.samples_per_class": 5})
    probe = run_probe_stage(recipe, tmp_path / "probe", progress=False)
    assert probe.meta["class_counts"] == [5, 5]
    saved = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert saved["data_info"]["streaming"] is True and saved["data_info"]["sizes"]["train"] == 48  # from the label pass
    assert all(math.isfinite(r["nc1"]) for r in probe.blocks())

    with pytest.raises(ConfigError, match="set data.max_train_samples"):
        run_stage(recipe, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()

    recipe = make_recipe(bert_dir, csv, **{"data.streaming": "true", "data.max_train_samples": 16,
                                           "probe.samples_per_class": 5, "train.epochs": 1})
    summary = run_stage(recipe, tmp_path / "run", progress=False)
    assert summary["train_samples"] == 16
    assert summary["test_samples"] == 12 and 0.0 <= summary["test_accuracy"] <= 1.0
