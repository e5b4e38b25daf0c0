"""``data.streaming`` through the recipe stages: probe on a per-class stream sample, training on a bounded sample or
on the whole stream, evaluation that reads the test stream batch by batch and agrees with the in-memory one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from nc_finetune.errors import ConfigError
from nc_finetune.pipeline import eval_stage, run_pipeline, run_probe_stage
from nc_finetune.train.loop import StopTraining
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


def test_streamed_test_eval_never_samples_the_train_stream(finished_run, monkeypatch) -> None:
    """Scoring the test split needs no per-class sample of the (possibly huge) train stream: neither the probe
    subset nor data.max_train_samples' draw is made; scoring the train split still draws the run's sample."""
    from nc_finetune.data import streaming

    purposes = []
    original = streaming.StreamSplit.sample

    def sample(self, quota, seed, purpose):
        purposes.append(purpose)
        return original(self, quota, seed, purpose)

    monkeypatch.setattr(streaming.StreamSplit, "sample", sample)
    out = finished_run["out"]
    memory = eval_stage(out)
    over = ["data.streaming=true", "data.max_train_samples=20", "data.labels=['0', '1']"]
    streamed = eval_stage(out, data_overrides=over)
    assert streamed["accuracy"] == memory["accuracy"] and streamed["samples"] == memory["samples"]
    assert streaming.KEY_TRAIN_SAMPLE not in purposes and streaming.KEY_PROBE_SAMPLE not in purposes
    assert eval_stage(out, split="train", data_overrides=over)["samples"] == 20
    assert streaming.KEY_TRAIN_SAMPLE in purposes


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

    refused = make_recipe(bert_dir, csv, **{"data.streaming": "true", "selection.strategy": "auto_rgn",
                                             "selection.blocks": "null"})
    with pytest.raises(ConfigError, match="selection.strategy=auto_rgn draws training batches by index"):
        run_pipeline(refused, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()

    recipe = make_recipe(bert_dir, csv, **{"data.streaming": "true", "data.max_train_samples": 16,
                                           "probe.samples_per_class": 5, "train.epochs": 1})
    summary = run_pipeline(recipe, tmp_path / "run", progress=False)
    assert summary["train_samples"] == 16
    assert summary["test_samples"] == 12 and 0.0 <= summary["test_accuracy"] <= 1.0


def test_training_on_the_whole_stream_resumes_exactly(bert_dir, tmp_path) -> None:
    """No max_train_samples: each epoch is one shuffled pass over the train stream, the validation part is carved
    per row, the test stream is evaluated batch by batch; a killed run resumes to the uninterrupted result."""
    texts, labels = make_texts(60, 2, seed=8)
    csv = {"train": write_text_csv(tmp_path / "train.csv", texts[:48], labels[:48]),
           "test": write_text_csv(tmp_path / "test.csv", texts[48:], labels[48:])}
    extra = {"data.streaming": "true", "data.labels": "['0', '1']", "probe.samples_per_class": 5,
             "train.val_fraction": 0.25, "train.epochs": 2, "train.checkpoint_every": 2}
    recipe = make_recipe(bert_dir, csv, **extra)
    full = run_pipeline(recipe, tmp_path / "full", progress=False)
    assert full["test_samples"] == 12 and "val_accuracy" in full
    n_val = full["val_samples"]
    assert 0 < n_val < 48 and full["train_samples"] == 48 - n_val
    assert full["steps"] == 2 * math.ceil((48 - n_val) / 4)
    assert full["prefix_cache"]["enabled"] is False and "streamed" in full["prefix_cache"]["reason"]

    with pytest.raises(StopTraining):
        run_pipeline(recipe, tmp_path / "resumed", progress=False, stop_after_steps=3)
    resumed = run_pipeline(recipe, tmp_path / "resumed", progress=False, resume=True)
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert resumed["test_loss"] == pytest.approx(full["test_loss"], abs=1e-6)
    wa = load_file(str(tmp_path / "full" / "trainable.safetensors"))
    wb = load_file(str(tmp_path / "resumed" / "trainable.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)
