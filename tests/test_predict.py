"""``nc-finetune predict`` on an image model: a folder of image files, predictions in file order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nc_finetune.cli import main
from tests.conftest import TIMM_CNN, TIMM_IMAGE_SIZE

pytest.importorskip("timm")


def test_predict_on_a_folder_of_images_matches_eval(tmp_path, capsys) -> None:
    from PIL import Image

    from nc_finetune.data import load_data

    out = tmp_path / "run"
    overrides = [f"backbone.name={TIMM_CNN}", "backbone.pretrained=false", f"backbone.image_size={TIMM_IMAGE_SIZE}",
                 "data.name=digits", "data.max_train_samples=60", "data.max_eval_samples=20",
                 "probe.samples_per_class=3", "probe.device=cpu", "selection.strategy=last_k", "adapt.method=finetune",
                 "train.epochs=1", "train.batch_size=8", "train.lr=0.01", "train.device=cpu"]
    assert main(["run", "effnet-lite0-fashion-mnist", "--out", str(out), "--quiet", *overrides]) == 0, \
        capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    test = load_data("digits", max_train_samples=60, max_eval_samples=20).test
    images = tmp_path / "images"
    images.mkdir()
    for i, img in enumerate(test.inputs):  # 8x8 gray uint8, written losslessly
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(images / f"{i:03d}.png")
    pred_file = tmp_path / "pred.jsonl"
    assert main(["predict", str(out), str(images), "--out", str(pred_file)]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in pred_file.read_text().splitlines()]
    assert [r["source"] for r in rows] == [str(images / f"{i:03d}.png") for i in range(len(test))]
    assert all(len([k for k in r if k.startswith("prob_")]) == 10 for r in rows)
    correct = np.mean([r["prediction_id"] == y for r, y in zip(rows, test.labels, strict=True)])
    assert correct == pytest.approx(summary["test_accuracy"])
    # A table for an image model is refused in one line.
    capsys.readouterr()
    table = tmp_path / "t.csv"
    table.write_text("text,label\na,0\n")
    assert main(["predict", str(out), str(table), "--out", str(pred_file)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"nc-finetune predict: error: predict: {out} holds a model of image inputs; {table} holds text inputs"]
