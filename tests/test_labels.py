"""Labels by name: a run's head outputs mean its class names, whatever order another file sorts them in."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from nc_finetune.cli import main
from nc_finetune.data import ClassificationData, Split
from nc_finetune.errors import DataError
from nc_finetune.labels import align_class_names, run_class_names
from tests.conftest import make_texts, recipe_overrides


def _data(names, train_labels, test_labels):
    return ClassificationData("csv", "text", Split(["x"] * len(train_labels), np.asarray(train_labels)),
                              Split(["y"] * len(test_labels), np.asarray(test_labels)), len(names), list(names))


def test_align_renumbers_by_name() -> None:
    # data ids: a=0, b=1, c=2; the run's head order is [c, a, b] -> a=1, b=2, c=0
    data = _data(["a", "b", "c"], [0, 1, 2, 2], [1, 0])
    out = align_class_names(["c", "a", "b"], data, "runs/x")
    assert out.class_names == ["c", "a", "b"]
    assert out.train.labels.tolist() == [1, 2, 0, 0] and out.test.labels.tolist() == [2, 1]
    assert out.info["label_map"] == {"a": 1, "b": 2, "c": 0}
    assert data.train.labels.tolist() == [0, 1, 2, 2]  # the input is left alone
    assert align_class_names(["a", "b", "c"], data, "runs/x") is data
    assert align_class_names(None, data, "runs/x") is data


def test_align_refuses_other_names() -> None:
    data = _data(["neg", "pos"], [0, 1], [0, 1])
    msg = (r"runs/x was trained on classes \[0, 1\]; data 'csv' has classes \[neg, pos\] "
           r"\(not in the data: \[0, 1\]; unknown to the run: \[neg, pos\]\)")
    with pytest.raises(DataError, match=msg):
        align_class_names(["0", "1"], data, "runs/x")


def _write_parquet(path, texts, labels, names) -> str:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    datasets.Dataset.from_dict({"text": texts, "label": [int(y) for y in labels]}, features=features).to_parquet(
        str(path))
    return str(path)


def _write_named_csv(path, texts, labels, names) -> str:
    lines = ["text,label"] + [f"{t},{names[int(y)]}" for t, y in zip(texts, labels, strict=True)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def pos_neg_run(tmp_path_factory, bert_dir):
    """A run trained on parquet files whose ClassLabel order is [pos, neg] (id 0 = pos), and the same data as CSV
    files with string labels (which sort to neg=0, pos=1)."""
    from nc_finetune.config import load_recipe
    from nc_finetune.pipeline import run_pipeline

    d = tmp_path_factory.mktemp("posneg")
    texts, labels = make_texts(32, 2, seed=5)
    names = ["pos", "neg"]
    files = {"train": _write_parquet(d / "train.parquet", texts[:24], labels[:24], names),
             "test": _write_parquet(d / "test.parquet", texts[24:], labels[24:], names)}
    csv = {"train": _write_named_csv(d / "train.csv", texts[:24], labels[:24], names),
           "test": _write_named_csv(d / "test.csv", texts[24:], labels[24:], names)}
    overrides = recipe_overrides(bert_dir, files, **{"data.name": "parquet", "train.epochs": 1})
    run_pipeline(load_recipe(None, overrides), d / "run", progress=False)
    return {"run": d / "run", "csv": csv}


def test_flipped_string_labels_are_mapped_by_name(pos_neg_run, capsys) -> None:
    from nc_finetune.pipeline import eval_stage

    run, csv = pos_neg_run["run"], pos_neg_run["csv"]
    assert run_class_names(run) == ["pos", "neg"]
    assert json.loads((run / "summary.json").read_text())["class_names"] == ["pos", "neg"]
    same = eval_stage(run)
    files = f"data.data_files={{train: {csv['train']}, test: {csv['test']}}}"
    flipped = eval_stage(run, data_overrides=["data.name=csv", files])
    # Before labels were matched by name, the CSV's sorted ids (neg=0, pos=1) scored 1 - accuracy.
    assert flipped["accuracy"] == same["accuracy"]
    assert flipped["loss"] == pytest.approx(same["loss"], abs=1e-6)
    assert same["accuracy"] != 0.5  # otherwise a flip would not show in the accuracy (the loss still shows it)


def test_eval_with_other_class_names_exits_2_naming_them(finished_run, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run["out"], run)
    texts, labels = make_texts(12, 2, seed=7)
    f = _write_named_csv(tmp_path / "named.csv", texts, labels, ["neg", "pos"])
    assert main(["eval", str(run), "data.name=csv", f"data.data_files={{train: {f}, test: {f}}}"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: the datasets progress bar
    assert line.startswith("nc-finetune eval: error: ")
    assert "trained on classes [0, 1]; data 'csv' has classes [neg, pos]" in line
