"""train.report_to: accelerate trackers receive what metrics.jsonl records; a missing package is one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nc_finetune.config import TrainConfig
from nc_finetune.errors import ConfigError
from nc_finetune.train import tracking

pytest.importorskip("accelerate")
pytest.importorskip("transformers")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_missing_tracker_package_is_one_clear_line(monkeypatch) -> None:
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"^train.report_to: wandb is not installed \(pip install wandb\)"):
        tracking.check_trackers(["wandb"])
    with pytest.raises(ConfigError, match="unknown tracker 'mlflow'"):
        tracking.check_trackers(["mlflow"])
    tracking.check_trackers([])


def test_scalars_and_config_are_tracker_friendly() -> None:
    rec = {"step": 3, "epoch": 0, "split": "val", "accuracy": 0.5, "loss": 0.7, "samples": 8, "macro_f1": 0.4,
           "per_class_accuracy": [0.5, 0.5], "confusion_matrix": [[2, 2], [2, 2]]}
    assert tracking.scalars(rec) == {"val/accuracy": 0.5, "val/loss": 0.7, "val/samples": 8.0, "val/macro_f1": 0.4}
    assert tracking.scalars({"step": 1, "epoch": 0, "loss": 0.9, "lr": 0.01}) == {"train/loss": 0.9, "train/lr": 0.01}
    cfg = tracking.tracker_config(TrainConfig(report_to=["tensorboard"]))
    assert cfg["max_steps"] == "None" and cfg["report_to"] == "['tensorboard']" and cfg["epochs"] == 1


def test_trackers_receive_the_logged_records(bert_dir, text_data, tmp_path, monkeypatch) -> None:
    from accelerate.tracking import GeneralTracker

    import nc_finetune.train.loop as loop
    from tests.train.test_trainer import _trainer

    class Recorder(GeneralTracker):
        name = "recorder"
        requires_logging_directory = False

        def __init__(self) -> None:
            super().__init__()
            self.logs, self.config, self.finished = [], None, False

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values: dict) -> None:
            self.config = values

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            self.logs.append((step, values))

        def finish(self) -> None:
            self.finished = True

    recorder = Recorder()
    monkeypatch.setattr(loop, "accelerate_trackers", lambda names: [recorder])  # in place of tensorboard
    monkeypatch.setattr(loop, "check_trackers", lambda names: None)  # which need not be installed
    t, _ = _trainer(bert_dir, text_data, tmp_path, epochs=1, report_to=["tensorboard"])
    t.fit()
    assert recorder.config["epochs"] == 1 and recorder.finished
    records = _metrics(tmp_path)
    assert [(r["step"], tracking.scalars(r)) for r in records] == recorder.logs
    assert any("val/macro_f1" in v for _, v in recorder.logs) and any("train/loss" in v for _, v in recorder.logs)


def test_tensorboard_event_files(bert_dir, text_data, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.train.test_trainer import _trainer

    t, _ = _trainer(bert_dir, text_data, tmp_path, epochs=1, report_to=["tensorboard"])
    t.fit()
    logdir = tmp_path / tracking.PROJECT
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    losses = [r["loss"] for r in _metrics(tmp_path) if "split" not in r]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses)


def test_run_refuses_a_missing_tracker_before_any_work(capsys, tmp_path, bert_dir, text_csv, monkeypatch) -> None:
    from nc_finetune.cli import main
    from tests.conftest import recipe_overrides

    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    out = tmp_path / "run"
    argv = ["run", "minilm-rotten-tomatoes", "--out", str(out), *recipe_overrides(bert_dir, text_csv),
            "train.report_to=[tensorboard]"]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["nc-finetune run: error: train.report_to: tensorboard is not installed (pip install tensorboard), "
                   "or remove it from report_to"]
    assert not out.exists()
