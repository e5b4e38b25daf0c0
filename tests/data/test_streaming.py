"""``data.streaming``: per-class samples drawn on the stream, carved test splits, label sets, streamed evaluation.

Every file is a small CSV / JSON Lines file written to tmp_path. Each text names its row and class
(``"row 17 class c2"``), so a sample can be checked against a brute-force selection over the whole file.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest

from nc_finetune.data import Split, StreamSplit, load_data, per_class_sample
from nc_finetune.data import streaming as st
from nc_finetune.data.base import stratified_counts
from nc_finetune.errors import ConfigError, DataError

pytest.importorskip("datasets")

NAMES = ["c0", "c1", "c2"]


def _labels(n: int, seed: int = 0) -> np.ndarray:
    """Unbalanced classes (about 50% / 30% / 20%), in shuffled order."""
    rng = np.random.default_rng(seed)
    return rng.choice(3, size=n, p=[0.5, 0.3, 0.2]).astype(np.int64)


def _write_csv(path, labels: np.ndarray, offset: int = 0) -> str:
    lines = ["text,label"] + [f"row {i + offset} class c{y},c{y}" for i, y in enumerate(labels)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _rows(split: Split) -> list[int]:
    return [int(t.split()[1]) for t in split.inputs]


def _check_consistent(split: Split) -> None:
    """Every kept text names the class its label says."""
    for text, y in zip(split.inputs, split.labels, strict=True):
        assert text.endswith(f"class c{int(y)}"), (text, y)


@pytest.fixture
def small_chunks(monkeypatch):
    """Read 7 rows at a time and draw keys in chunks of 16 rows: samples must merge across many chunks."""
    monkeypatch.setattr(st, "READ_BATCH", 7)
    monkeypatch.setattr(st, "KEY_CHUNK", 16)


def _brute_force_bottom_k(labels: np.ndarray, k: int, seed: int, purpose: int) -> set[int]:
    keys = st.RowKeys(seed, purpose)(0, len(labels))  # every key at once, no chunking of the reads
    out: set[int] = set()
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        out.update(rows[np.argsort(keys[rows])[:k]].tolist())
    return out


def test_row_keys_do_not_depend_on_how_rows_are_read(small_chunks):
    keys = st.RowKeys(3, st.KEY_PROBE_SAMPLE)
    whole = keys(0, 100)
    pieces = np.concatenate([st.RowKeys(3, st.KEY_PROBE_SAMPLE)(a, b) for a, b in ((0, 5), (5, 40), (40, 100))])
    np.testing.assert_array_equal(whole, pieces)
    assert ((whole >= 0) & (whole < 1)).all()
    assert not np.array_equal(whole, st.RowKeys(4, st.KEY_PROBE_SAMPLE)(0, 100))
    assert not np.array_equal(whole, st.RowKeys(3, st.KEY_TRAIN_SAMPLE)(0, 100))


def test_probe_sample_is_bottom_k_per_class_and_reproducible(tmp_path, small_chunks):
    labels = _labels(300)
    files = {"train": _write_csv(tmp_path / "train.csv", labels),
             "test": _write_csv(tmp_path / "test.csv", labels[:20])}
    data = load_data("csv", data_files=files, streaming=True, labels=NAMES)
    assert isinstance(data.train, StreamSplit) and isinstance(data.test, StreamSplit)
    assert data.class_names == NAMES and data.info["label_encoding"] == "data.labels"

    sample = per_class_sample(data.train, 20, seed=5)
    assert isinstance(sample, Split)
    assert np.bincount(sample.labels, minlength=3).tolist() == [20, 20, 20]
    _check_consistent(sample)
    # the same rows as an independent brute-force bottom-k over the whole file
    assert set(_rows(sample)) == _brute_force_bottom_k(labels, 20, 5, st.KEY_PROBE_SAMPLE)
    # reproducible by seed, another seed draws another subset
    again = per_class_sample(load_data("csv", data_files=files, streaming=True, labels=NAMES).train, 20, seed=5)
    assert _rows(again) == _rows(sample)
    assert set(_rows(per_class_sample(data.train, 20, seed=6))) != set(_rows(sample))
    # classes are mixed (key order), not grouped
    assert len(set(sample.labels[:10].tolist())) > 1


def test_probe_sample_keeps_all_of_a_small_class(tmp_path, small_chunks):
    labels = np.array([0] * 40 + [1] * 3 + [2] * 30)
    files = {"train": _write_csv(tmp_path / "train.csv", labels), "test": _write_csv(tmp_path / "test.csv", labels)}
    data = load_data("csv", data_files=files, streaming=True, labels=NAMES)
    sample = per_class_sample(data.train, 10, seed=0)
    assert np.bincount(sample.labels, minlength=3).tolist() == [10, 3, 10]


def test_label_pass_gives_sorted_names_counts_and_sizes(tmp_path):
    labels = _labels(120, seed=1)
    files = {"train": _write_csv(tmp_path / "train.csv", labels), "test": _write_csv(tmp_path / "test.csv", labels[:9])}
    data = load_data("csv", data_files=files, streaming=True)
    assert data.class_names == NAMES
    assert data.info["label_encoding"] == "strings mapped to sorted ids (label pass)"
    assert data.train.class_counts.tolist() == np.bincount(labels, minlength=3).tolist()
    assert len(data.train) == 120 and len(data.test) == 9
    assert data.info["sizes"] == {"train": 120, "test": 9}


def test_max_train_samples_matches_the_in_memory_stratified_counts(tmp_path, small_chunks):
    labels = _labels(200, seed=2)
    files = {"train": _write_csv(tmp_path / "train.csv", labels), "test": _write_csv(tmp_path / "test.csv", labels)}
    streamed = load_data("csv", data_files=files, streaming=True, labels=NAMES, max_train_samples=31,
                         max_eval_samples=12, seed=4)
    in_memory = load_data("csv", data_files=files, max_train_samples=31, max_eval_samples=12, seed=4)
    assert isinstance(streamed.train, Split) and isinstance(streamed.test, Split)
    for a, b in ((streamed.train, in_memory.train), (streamed.test, in_memory.test)):
        assert np.bincount(a.labels, minlength=3).tolist() == np.bincount(b.labels, minlength=3).tolist()
    assert np.bincount(streamed.train.labels, minlength=3).tolist() == \
        stratified_counts(np.bincount(labels, minlength=3), 31).tolist()
    _check_consistent(streamed.train)
    # independent key streams: the train and eval samples of one seed are not the same draw
    assert streamed.info["full_sizes"] == {"train": 200, "test": 200}


def test_carved_test_split_is_disjoint_and_reproducible(tmp_path, small_chunks):
    labels = _labels(400, seed=3)
    path = _write_csv(tmp_path / "all.csv", labels)
    data = load_data("csv", data_files=path, streaming=True, labels=NAMES, test_size=0.25, seed=7)
    train_rows = [r for x, _ in data.train.batches(50) for r in (int(t.split()[1]) for t in x)]
    test_rows = [r for x, _ in data.test.batches(50) for r in (int(t.split()[1]) for t in x)]
    assert sorted(train_rows + test_rows) == list(range(400))
    assert train_rows == sorted(train_rows) and test_rows == sorted(test_rows)  # file order
    assert 0.18 < len(test_rows) / 400 < 0.32
    # brute force: a row is held out iff its carve key is below test_size
    held = np.flatnonzero(st.RowKeys(7, st.KEY_TEST_CARVE)(0, 400) < 0.25).tolist()
    assert test_rows == held
    again = load_data("csv", data_files=path, streaming=True, labels=NAMES, test_size=0.25, seed=7)
    assert [r for x, _ in again.test.batches(64) for r in (int(t.split()[1]) for t in x)] == test_rows
    # a sample of the carved train part never contains a held-out row
    sample = per_class_sample(data.train, 15, seed=0)
    assert not set(_rows(sample)) & set(held)


def test_batches_are_sharded_and_labelled(tmp_path, small_chunks):
    labels = _labels(50, seed=4)
    files = {"train": _write_csv(tmp_path / "train.csv", labels), "test": _write_csv(tmp_path / "test.csv", labels)}
    data = load_data("csv", data_files=files, streaming=True, labels=NAMES)
    got = {}
    for rank in range(3):
        for x, y in data.test.batches(8, rank=rank, world=3):
            assert len(x) == len(y) <= 8
            for text, label in zip(x, y, strict=True):
                got[int(text.split()[1])] = int(label)
    assert got == {i: int(y) for i, y in enumerate(labels)}


def test_json_lines_with_integer_labels(tmp_path):
    rows = [{"sentence": f"row {i}", "label": int(i % 3)} for i in range(30)]
    for name in ("train", "test"):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    files = {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}
    data = load_data("json", data_files=files, streaming=True)
    assert data.class_names == ["0", "1", "2"]
    sample = per_class_sample(data.train, 4, seed=0)
    assert np.bincount(sample.labels).tolist() == [4, 4, 4]
    assert all(int(t.split()[1]) % 3 == y for t, y in zip(sample.inputs, sample.labels, strict=True))


def test_refusals(tmp_path):
    labels = _labels(30)
    files = {"train": _write_csv(tmp_path / "train.csv", labels), "test": _write_csv(tmp_path / "test.csv", labels)}
    with pytest.raises(DataError, match="label 'c2' is not in the label set"):
        per_class_sample(load_data("csv", data_files=files, streaming=True, labels=["c0", "c1"]).train, 5, 0)
    with pytest.raises(ConfigError, match="samples_per_class must be set"):
        per_class_sample(load_data("csv", data_files=files, streaming=True, labels=NAMES).train, None, 0)
    with pytest.raises(ConfigError, match="data.streaming applies to HF sources"):
        load_data("digits", streaming=True)
    with pytest.raises(ConfigError, match="data.labels applies with data.streaming"):
        load_data("csv", data_files=files, labels=NAMES)
    stream = load_data("csv", data_files=files, streaming=True, labels=NAMES).train
    with pytest.raises(DataError, match="no random access"):
        stream.subset([0])
    with pytest.raises(DataError, match="max_train_samples"):
        np.asarray(stream.labels)


def test_config_validates_streaming_fields():
    from nc_finetune.config import load_recipe

    assert load_recipe(None, ["data.name=csv", "data.streaming=true", "data.labels=[a, b]"]).data.labels == ["a", "b"]
    for overrides, key in ((["data.name=digits", "data.streaming=true"], "data.streaming"),
                           (["data.name=csv", "data.labels=[a, b]"], "data.labels"),
                           (["data.name=csv", "data.streaming=true", "data.labels=[a, a]"], "data.labels"),
                           (["data.name=csv", "data.streaming=true", "data.corruption=contrast"], "data.corruption")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_recipe(None, overrides)


def test_imagefolder_stream_decodes_only_what_it_keeps(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = {}
    for split, n in (("train", 6), ("test", 2)):
        for c in ("ant", "bee"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
                Image.fromarray(img).save(tmp_path / split / c / f"{i}.png")
                pixels[img.tobytes()] = c
    files = {"train": str(tmp_path / "train"), "test": str(tmp_path / "test")}
    data = load_data("imagefolder", data_files=files, streaming=True)
    assert data.modality == "image" and data.class_names == ["ant", "bee"]  # ClassLabel from the folder names
    sample = per_class_sample(data.train, 4, seed=1)
    assert np.bincount(sample.labels).tolist() == [4, 4]
    for img, y in zip(sample.inputs, sample.labels, strict=True):
        assert img.dtype == np.uint8 and img.shape == (5, 4, 3)
        assert pixels[img.tobytes()] == data.class_names[y]  # the decoded pixels of a file of that class
    seen = [(x, y) for x, y in data.test.batches(3)]
    assert [len(y) for _, y in seen] == [3, 1]


def test_micro_batch_count_matches_epoch_batches():
    from nc_finetune.train.loop import epoch_batches

    for n in (0, 1, 5, 16, 17, 23, 64):
        for bs in (1, 4, 7):
            for world in (1, 2, 3):
                assert st.micro_batch_count(n, bs, world) == len(epoch_batches(n, bs, world, 0, 0, 0)), (n, bs, world)


def _epoch_rows(split, epoch, world=1, skip=0, batch_size=4):
    return [[[int(t.split()[1]) for t in x] for x, _ in split.shuffled_batches(batch_size, 11, epoch, r, world,
                                                                                skip=skip)]
            for r in range(world)]


def test_shuffled_epochs_cover_every_row_once_and_resume_exactly(tmp_path, monkeypatch, small_chunks):
    monkeypatch.setattr(st, "SHUFFLE_BUFFER", 16)
    labels = _labels(101, seed=5)
    files = {"train": _write_csv(tmp_path / "train.csv", labels), "test": _write_csv(tmp_path / "test.csv", labels)}
    split = load_data("csv", data_files=files, streaming=True, labels=NAMES).train
    (one,) = _epoch_rows(split, epoch=0)
    rows = [r for b in one for r in b]
    assert sorted(rows) == list(range(101)) and rows != list(range(101))  # every row once, shuffled
    assert len(one) == st.micro_batch_count(101, 4, 1)
    assert _epoch_rows(split, epoch=0) == [one]  # seeded
    assert _epoch_rows(split, epoch=1) != [one]  # a new order each epoch
    assert _epoch_rows(split, epoch=0, skip=5) == [one[5:]]  # a resumed epoch continues the same order
    for x, y in split.shuffled_batches(4, 11, 0):
        assert [f"c{int(v)}" for v in y] == [t.split()[-1] for t in x]  # labels travel with their rows
    # two ranks: as many batches each, disjoint halves of every global batch, a tail below 2 rows dropped
    r0, r1 = _epoch_rows(split, epoch=0, world=2)
    assert len(r0) == len(r1) == st.micro_batch_count(101, 4, 2)
    both = [r for b in r0 + r1 for r in b]
    assert len(both) == len(set(both)) == 101 - 101 % 8 + (101 % 8 if 101 % 8 >= 2 else 0)


def test_split_off_is_a_disjoint_per_row_carve(tmp_path, small_chunks):
    labels = _labels(90, seed=6)
    files = {"train": _write_csv(tmp_path / "train.csv", labels), "test": _write_csv(tmp_path / "test.csv", labels)}
    split = load_data("csv", data_files=files, streaming=True, labels=NAMES).train
    rest, held = split.split_off(0.3, seed=2)
    rest_rows = [int(t.split()[1]) for x, _ in rest.batches(16) for t in x]
    held_rows = [int(t.split()[1]) for x, _ in held.batches(16) for t in x]
    assert sorted(rest_rows + held_rows) == list(range(90)) and not set(rest_rows) & set(held_rows)
    assert held_rows == np.flatnonzero(st.RowKeys(2, st.KEY_VAL_CARVE)(0, 90) < 0.3).tolist()
    assert len(rest) == len(rest_rows) and len(held) == len(held_rows)
    assert rest.class_counts.tolist() == np.bincount(labels[rest_rows], minlength=3).tolist()


def test_hub_stream_label_set_from_classlabel_or_refused(monkeypatch):
    """A hub stream (stood in for by an in-process generator): a ClassLabel gives the label set without a pass; plain
    labels without data.labels are refused (the pass would download everything); data.labels makes it work."""
    import datasets

    rows = [{"text": f"row {i}", "label": i % 2} for i in range(20)]

    def hub(features):
        ds = datasets.IterableDataset.from_generator(lambda: iter(rows), features=features)
        return datasets.IterableDatasetDict({"train": ds, "test": ds})

    with_names = datasets.Features({"text": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["neg", "pos"])})
    monkeypatch.setattr(st, "_load_stream_dict", lambda name, files: hub(with_names))
    data = load_data("hf:someone/reviews", streaming=True)
    assert data.class_names == ["neg", "pos"] and data.info["label_encoding"] == "ClassLabel"
    assert data.train.num_rows is None  # no pass was made
    assert np.bincount(per_class_sample(data.train, 3, seed=0).labels).tolist() == [3, 3]

    plain = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")})
    monkeypatch.setattr(st, "_load_stream_dict", lambda name, files: hub(plain))
    with pytest.raises(ConfigError, match="has no ClassLabel feature.*set data.labels"):
        load_data("hf:someone/reviews", streaming=True)
    named = load_data("hf:someone/reviews", streaming=True, labels=["neg", "pos"])
    assert [int(y) for _, ys in named.test.batches(8) for y in ys] == [i % 2 for i in range(20)]
