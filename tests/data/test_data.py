"""Sampling helpers, validation and Hugging Face ``datasets`` sources (local files written to tmp_path)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest

from nc_finetune.data import (
    LazyImageColumn,
    Split,
    load_data,
    stratified_split,
    stratified_subsample,
    subsample_per_class,
    validate_split,
)
from nc_finetune.errors import ConfigError, DataError, UserError

LABELS = np.array([0] * 5 + [1] * 3 + [2] * 10 + [3] * 1)


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path, monkeypatch):
    """Keep the Arrow files that ``datasets`` writes out of the user's cache."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _counts(labels: np.ndarray, idx: np.ndarray, k: int = 4) -> list[int]:
    return np.bincount(labels[idx], minlength=k).tolist()


def _write_csv(path, rows: list[tuple], header: str = "sentence,label") -> str:
    lines = [header] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# --- subsample_per_class -----------------------------------------------------------------------------------------


def test_subsample_per_class_counts_and_determinism():
    idx = subsample_per_class(LABELS, 4, seed=1)
    assert _counts(LABELS, idx) == [4, 3, 4, 1]
    assert len(set(idx.tolist())) == len(idx)
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx, subsample_per_class(LABELS, 4, seed=1))
    assert not np.array_equal(idx, subsample_per_class(LABELS, 4, seed=2))


def test_subsample_per_class_mixes_classes():
    labels = np.repeat(np.arange(5), 40)
    idx = subsample_per_class(labels, 20, seed=0)
    picked = labels[idx]
    assert len(np.unique(picked[:20])) >= 3  # the first "batch" is not a single class
    assert (np.diff(picked) != 0).sum() > 20


def test_subsample_per_class_none_keeps_all_shuffled():
    idx = subsample_per_class(LABELS, None, seed=0)
    assert sorted(idx.tolist()) == list(range(len(LABELS)))
    assert idx.tolist() != list(range(len(LABELS)))
    with pytest.raises(ValueError):
        subsample_per_class(LABELS, 0, seed=0)


# --- stratified_split / stratified_subsample ---------------------------------------------------------------------


def test_stratified_split_counts_and_cover():
    a, b = stratified_split(LABELS, 0.2, seed=0)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(len(LABELS)))
    assert _counts(LABELS, b) == [1, 1, 2, 0]  # round(0.2 n_k) clipped to [1, n_k - 1]; a singleton stays in a
    assert _counts(LABELS, a) == [4, 2, 8, 1]
    a2, b2 = stratified_split(LABELS, 0.2, seed=0)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)
    a3, _ = stratified_split(LABELS, 0.2, seed=5)
    assert not np.array_equal(a, a3)


def test_stratified_split_every_class_in_both_parts():
    labels = np.repeat(np.arange(10), [2, 3, 50, 7, 9, 100, 2, 4, 5, 6])
    a, b = stratified_split(labels, 0.05, seed=3)
    assert (np.bincount(labels[a], minlength=10) >= 1).all()
    assert (np.bincount(labels[b], minlength=10) >= 1).all()
    with pytest.raises(ValueError):
        stratified_split(labels, 1.0, seed=0)


def test_stratified_subsample_is_proportional():
    labels = np.repeat(np.arange(3), [600, 300, 100])
    idx = stratified_subsample(labels, 100, seed=0)
    assert _counts(labels, idx, 3) == [60, 30, 10]
    np.testing.assert_array_equal(idx, stratified_subsample(labels, 100, seed=0))
    assert not np.array_equal(idx, stratified_subsample(labels, 100, seed=1))
    # every class keeps one example when n allows it, and the total is exact
    small = stratified_subsample(np.repeat(np.arange(3), [98, 1, 1]), 5, seed=0)
    assert np.bincount(np.repeat(np.arange(3), [98, 1, 1])[small]).tolist() == [3, 1, 1]


# --- Split -------------------------------------------------------------------------------------------------------


def test_split_subset_array_and_list():
    images = np.arange(4 * 2 * 2, dtype=np.uint8).reshape(4, 2, 2)
    s = Split(inputs=images, labels=np.array([0, 1, 0, 1]))
    sub = s.subset(np.array([3, 0]))
    assert len(sub) == 2 and sub.labels.tolist() == [1, 0]
    np.testing.assert_array_equal(sub.inputs[0], images[3])
    t = Split(inputs=["a", "b", "c"], labels=np.array([0, 1, 0]))
    assert t.subset([2, 1]).inputs == ["c", "b"]


# --- validate_split ----------------------------------------------------------------------------------------------

WHAT = "data 'csv' split 'train'"


@pytest.mark.parametrize(
    ("inputs", "labels", "num_classes", "message"),
    [
        ([], [], 3, "data 'csv' split 'train': split is empty (0 examples)"),
        (["a", "b", "c"], [0, 1], 2, "data 'csv' split 'train': 3 inputs but 2 labels"),
        (["a"] * 4, [0, 1, 2, 7], 3, "data 'csv' split 'train': label 7 out of range [0, 3) (num_classes=3)"),
        (["a"] * 3, [0, -1, 1], 2, "label -1 out of range [0, 2)"),
        (["a"] * 3, [0.0, 1.0, 1.0], 2, "labels must be integers, got dtype float64"),
        (["a"] * 3, [1, 1, 1], 2, "data 'csv' split 'train': only 1 class present (class 1); need at least 2"),
        (["a"] * 5, [0, 0, 1, 1, 2], 3, "data 'csv' split 'train': class 2 has 1 example(s), need at least 2"),
        (["a"] * 4, [0, 0, 1, 1], 3, "class 2 has 0 example(s)"),
    ],
)
def test_validate_split_errors(inputs, labels, num_classes, message):
    split = Split(inputs=inputs, labels=np.asarray(labels))
    with pytest.raises(DataError) as err:
        validate_split(split, num_classes, WHAT)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_validate_split_eval_mode_allows_one_class():
    split = Split(inputs=["a", "b"], labels=np.array([1, 1]))
    validate_split(split, 2, "data 'x' split 'test'", min_per_class=0)
    validate_split(Split(inputs=["a"] * 4, labels=np.array([0, 0, 1, 1])), 2, WHAT)


# --- local csv / json --------------------------------------------------------------------------------------------


def _text_rows(n_per_class: dict[str, int]) -> list[tuple]:
    return [(f"{label} text {i}", label) for label, n in n_per_class.items() for i in range(n)]


def test_csv_string_labels_auto_column_and_auto_test_split(tmp_path):
    path = _write_csv(tmp_path / "a.csv", _text_rows({"pos": 20, "neg": 10, "mid": 10}))
    data = load_data("csv", data_files=path, seed=0, test_size=0.2)
    assert data.modality == "text" and data.name == "csv"
    assert data.class_names == ["mid", "neg", "pos"]  # sorted strings -> ids
    assert data.num_classes == 3
    assert (len(data.train), len(data.test)) == (32, 8)
    assert np.bincount(data.test.labels).tolist() == [2, 2, 4]
    assert isinstance(data.train.inputs, list) and isinstance(data.train.inputs[0], str)
    for split in (data.train, data.test):  # texts and labels stay aligned
        for text, label in zip(split.inputs, split.labels, strict=True):
            assert text.startswith(data.class_names[label] + " ")
    assert "stratified" in data.info["split_rule"]
    assert data.info["label_encoding"] == "strings mapped to sorted ids"
    assert len(data.info["files"]) == 1
    json.dumps(data.info)  # provenance is JSON-serialisable
    again = load_data("csv", data_files=path, seed=0, test_size=0.2)
    assert again.test.inputs == data.test.inputs
    other = load_data("csv", data_files=path, seed=1, test_size=0.2)
    assert other.test.inputs != data.test.inputs


def test_csv_column_mapping_and_given_splits(tmp_path):
    header = "review,stars"
    train = _write_csv(tmp_path / "train.csv", [(f"t{i}", i % 3) for i in range(30)], header)
    test = _write_csv(tmp_path / "test.csv", [(f"e{i}", i % 3) for i in range(9)], header)
    data = load_data("csv", data_files={"train": train, "test": test}, text_column="review", label_column="stars")
    assert data.class_names == ["0", "1", "2"]
    assert data.info["label_encoding"] == "integers kept"
    assert data.test.inputs == [f"e{i}" for i in range(9)]
    assert data.test.labels.tolist() == [i % 3 for i in range(9)]
    assert data.info["split_rule"] == "given splits 'train'/'test'"


def test_missing_column_lists_available_columns(tmp_path):
    path = _write_csv(tmp_path / "a.csv", [(f"t{i}", i % 2) for i in range(10)], "body,target")
    with pytest.raises(DataError, match=r"label column 'label' not found; available columns: body, target"):
        load_data("csv", data_files=path)
    with pytest.raises(DataError, match=r"column 'txt' not found; available columns: body, target"):
        load_data("csv", data_files=path, text_column="txt", label_column="target")
    with pytest.raises(DataError, match=r"no input column found .*available columns: body, target"):
        load_data("csv", data_files=path, label_column="target")


def test_missing_split_lists_available_splits(tmp_path):
    rows = _text_rows({"a": 5, "b": 5})
    files = {"train": _write_csv(tmp_path / "t.csv", rows), "validation": _write_csv(tmp_path / "v.csv", rows)}
    with pytest.raises(DataError, match=r"split 'test' not found; available splits: train, validation"):
        load_data("csv", data_files=files)
    with pytest.raises(DataError, match=r"split 'training' not found; available splits: train, validation"):
        load_data("csv", data_files=files, train_split="training", test_split="validation")
    data = load_data("csv", data_files=files, test_split="validation")
    assert len(data.test) == 10


def test_json_max_samples_are_stratified(tmp_path):
    rows = [{"text": f"{lab} {i}", "label": lab} for lab, n in (("x", 60), ("y", 30), ("z", 10)) for i in range(n)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[::2]) + "\n")
    files = {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}
    data = load_data("json", data_files=files, max_train_samples=20, max_eval_samples=10, seed=4)
    assert np.bincount(data.train.labels).tolist() == [12, 6, 2]
    assert np.bincount(data.test.labels).tolist() == [6, 3, 1]
    assert data.info["full_sizes"] == {"train": 100, "test": 50}
    assert data.info["sizes"] == {"train": 20, "test": 10}
    again = load_data("json", data_files=files, max_train_samples=20, max_eval_samples=10, seed=4)
    assert again.train.inputs == data.train.inputs
    other = load_data("json", data_files=files, max_train_samples=20, max_eval_samples=10, seed=5)
    assert other.train.inputs != data.train.inputs


# --- DataError through load_data ---------------------------------------------------------------------------------


def test_load_data_refuses_one_class(tmp_path):
    path = _write_csv(tmp_path / "a.csv", _text_rows({"only": 10}))
    with pytest.raises(DataError, match=r"^data 'csv' split 'train': only 1 class present"):
        load_data("csv", data_files=path)


def test_load_data_refuses_class_with_one_example(tmp_path):
    files = {
        "train": _write_csv(tmp_path / "t.csv", _text_rows({"a": 6, "b": 1})),
        "test": _write_csv(tmp_path / "e.csv", _text_rows({"a": 2, "b": 2})),
    }
    with pytest.raises(DataError, match=r"^data 'csv' split 'train': class 1 has 1 example\(s\), need at least 2"):
        load_data("csv", data_files=files)


def test_load_data_refuses_negative_label(tmp_path):
    files = {
        "train": _write_csv(tmp_path / "t.csv", [(f"t{i}", i % 2) for i in range(8)]),
        "test": _write_csv(tmp_path / "e.csv", [("u", 0), ("v", -1)]),
    }
    with pytest.raises(DataError, match=r"^data 'csv' split 'test': label -1 out of range \[0, 2\) \(num_classes=2\)"):
        load_data("csv", data_files=files)


def test_load_data_refuses_empty_split(tmp_path):
    files = {
        "train": _write_csv(tmp_path / "t.csv", _text_rows({"a": 3, "b": 3})),
        "test": _write_csv(tmp_path / "e.csv", []),
    }
    with pytest.raises(DataError, match=r"^data 'csv' split 'test': split is empty \(0 examples\)$"):
        load_data("csv", data_files=files)


def test_load_data_refuses_float_labels(tmp_path):
    path = _write_csv(tmp_path / "a.csv", [(f"t{i}", i % 2 + 0.5) for i in range(8)])
    with pytest.raises(DataError, match=r"label column 'label' must hold integers or strings, got float"):
        load_data("csv", data_files=path)


def test_load_data_refuses_a_sparse_integer_label_before_allocating_its_classes(tmp_path):
    """One label of 10^6 would make 10^6 class names (10^9: ~60 GB); it is refused from the ids alone."""
    import tracemalloc

    path = _write_csv(tmp_path / "a.csv", [(f"t{i}", i % 2) for i in range(10)] + [("odd", 10**6)])
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"^data 'csv': integer labels in column 'label' must be the class ids "
                                            r"0..K-1, each used; found 3 distinct ids up to 1000000 \(id 2 never"):
            load_data("csv", data_files=path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


@pytest.mark.parametrize(("content", "needle"), [
    (b"", "EmptyDataError: No columns to parse from file"),
    (bytes(range(256)) * 8, "Error"),  # a ParserError or a UnicodeDecodeError, depending on the bytes
], ids=["empty", "binary"])
def test_an_unreadable_csv_is_one_line_naming_it(tmp_path, content, needle):
    path = tmp_path / "a.csv"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_data("csv", data_files=str(path))
    assert str(e.value).startswith(f"data 'csv': cannot read {path}: ") and needle in str(e.value)
    assert "\n" not in str(e.value)


def test_csv_texts_that_pandas_reads_as_missing_are_kept(tmp_path):
    words = ["NA", "None", "null", "NULL", "nan", "NaN", "n/a", "#N/A", "-", "na"]
    path = _write_csv(tmp_path / "a.csv", [(w, i % 2) for i, w in enumerate(words * 2)])
    data = load_data("csv", data_files=path)
    assert sorted(data.train.inputs + data.test.inputs) == sorted(words * 2)
    empty = _write_csv(tmp_path / "b.csv", [("", 0)] + [(w, i % 2) for i, w in enumerate(words * 2)])
    with pytest.raises(DataError, match="text column 'sentence' has 1 missing value"):  # an empty cell still is
        load_data("csv", data_files=empty, test_size=0.05)


def test_load_data_argument_errors(tmp_path):
    with pytest.raises(UserError, match=r"unknown dataset 'nope'"):
        load_data("nope")
    with pytest.raises(ConfigError, match=r"needs data_files"):
        load_data("csv")
    with pytest.raises(ConfigError, match=r"max_train_samples must be >= 1"):
        load_data("csv", data_files="x.csv", max_train_samples=0)
    with pytest.raises(ConfigError, match=r"test_size must be in \(0, 1\)"):
        load_data("csv", data_files="x.csv", test_size=1.5)
    with pytest.raises(ConfigError, match=r"both 'train'"):
        load_data("csv", data_files="x.csv", test_split="train")
    with pytest.raises(DataError, match=r"^data 'csv': cannot load: FileNotFoundError"):
        load_data("csv", data_files=str(tmp_path / "missing.csv"))


def test_hf_hub_name_is_parsed_without_network(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["n", "p"])})

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        rows = {"sentence": [f"s{i}" for i in range(12)], "label": [i % 2 for i in range(12)]}
        split = datasets.Dataset.from_dict(rows, features=features)
        return datasets.DatasetDict({"train": split, "validation": split.select(range(4))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_data("hf:someone/glue:sst2", test_split="validation")
    assert calls == [(("someone/glue", "sst2"), {})]
    assert data.class_names == ["n", "p"] and data.info["label_encoding"] == "ClassLabel"
    assert (len(data.train), len(data.test)) == (12, 4)
    assert data.info["source"] == "hf:someone/glue:sst2"


# --- imagefolder -------------------------------------------------------------------------------------------------


def _image_folder(root, per_class: int = 4) -> str:
    from PIL import Image

    for c, (cls, mode) in enumerate((("cat", "RGB"), ("dog", "L"), ("emu", "P"))):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            arr = np.full((6, 5, 3) if mode == "RGB" else (6, 5), 10 * c + i, dtype=np.uint8)
            img = Image.fromarray(arr).convert(mode) if mode == "P" else Image.fromarray(arr)
            img.save(root / cls / f"{i}.png")
    return str(root)


def test_imagefolder_lazy_uint8_images(tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    data = load_data("imagefolder", data_files=folder, test_size=0.25, seed=0)
    assert data.modality == "image"
    assert data.class_names == ["cat", "dog", "emu"]
    assert (len(data.train), len(data.test)) == (9, 3)
    assert isinstance(data.train.inputs, LazyImageColumn)
    for i in range(len(data.train)):
        img = data.train.inputs[i]
        assert img.dtype == np.uint8
        assert img.shape == ((6, 5) if data.class_names[data.train.labels[i]] == "dog" else (6, 5, 3))
    batch = data.train.inputs[0:3]
    assert isinstance(batch, list) and len(batch) == 3 and all(b.dtype == np.uint8 for b in batch)
    assert len(list(data.train.inputs)) == 9
    picked = data.train.inputs[np.array([4, 1])]
    np.testing.assert_array_equal(picked[1], data.train.inputs[1])
    sub = data.train.subset(np.array([2, 0]))
    assert isinstance(sub.inputs, LazyImageColumn) and len(sub.inputs) == 2
    np.testing.assert_array_equal(sub.inputs[1], data.train.inputs[0])
    np.testing.assert_array_equal(sub.inputs[-1], data.train.inputs[0])
    with pytest.raises(IndexError):
        sub.inputs[2]


@pytest.mark.parametrize("damage", ["truncated", "not-an-image"])
def test_a_corrupt_image_is_found_when_the_data_loads(tmp_path, damage):
    """Images decode lazily during training: one corrupt file (outside any probe subset) must fail the load, with
    its path, instead of crashing the training loop later."""
    folder = Path(_image_folder(tmp_path / "imgs", 4))
    bad = folder / "dog" / "3.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"this is no png" * 10)
    with pytest.raises(DataError, match=r"^data 'imagefolder' split '(train|test)': 1 image\(s\) cannot be decoded "
                                        rf"\(row \d+ \({bad}\): \w+: .*\); remove or replace them$"):
        load_data("imagefolder", data_files=str(folder), test_size=0.25, seed=0)


def test_imagefolder_split_dirs_and_max_samples(tmp_path):
    files = {"train": _image_folder(tmp_path / "train", 6), "test": _image_folder(tmp_path / "test", 2)}
    data = load_data("imagefolder", data_files=files, max_train_samples=6, max_eval_samples=3, seed=1)
    assert np.bincount(data.train.labels).tolist() == [2, 2, 2]
    assert np.bincount(data.test.labels).tolist() == [1, 1, 1]
    assert data.info["full_sizes"] == {"train": 18, "test": 6}
    assert data.test.inputs[0].dtype == np.uint8


def test_reprs_are_short():
    from nc_finetune.data import ClassificationData

    images = Split(np.zeros((500, 8, 8), dtype=np.uint8), np.arange(500) % 3)
    texts = Split([f"text {i}" for i in range(400)], np.arange(400) % 2)
    assert repr(images) == "Split(samples=500, classes=3, inputs=ndarray(500, 8, 8) uint8)"
    assert repr(texts) == "Split(samples=400, classes=2, inputs=list[str])"
    data = ClassificationData("csv", "text", texts, texts.subset(range(10)), 7, [f"c{k}" for k in range(7)],
                              info={"files": ["x" * 100] * 50})
    assert repr(data) == ("ClassificationData(name='csv', modality='text', num_classes=7, train=400, test=10, "
                          "class_names=['c0', 'c1', 'c2', 'c3', 'c4', ...])")


def test_a_data_section_taken_whole_is_the_keywords_it_holds(tmp_path):
    from nc_finetune.config import DataConfig

    path = _write_csv(tmp_path / "a.csv", _text_rows({"pos": 20, "neg": 10, "mid": 10}))
    cfg = DataConfig(name="csv", data_files=str(path), seed=3, test_size=0.25, max_train_samples=12)
    by_cfg = load_data(cfg=cfg)
    by_kw = load_data("csv", data_files=str(path), seed=3, test_size=0.25, max_train_samples=12)
    default_share = load_data("csv", data_files=str(path), seed=3, max_train_samples=12)
    assert len(by_cfg.train) == 12 and len(by_cfg.test) != len(default_share.test)  # the section's cap and share
    assert by_cfg.train.inputs == by_kw.train.inputs and by_cfg.test.inputs == by_kw.test.inputs
    with pytest.raises(TypeError, match="not both"):
        load_data("csv", cfg=cfg)
