"""Shared fixtures: tiny random models built in-process, tiny datasets and recipes. Nothing comes from a hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models on a shared 2-core machine: one intra-op thread is faster and does not stall when the cores are busy.
torch.set_num_threads(1)

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "fast", "slow", "red", "big"]
#: Words that mark each class of the tiny text data (so the classes are learnable, not just noise).
CLASS_WORDS = [("cat", "red"), ("dog", "big"), ("mat", "slow")]
TIMM_CNN = "timm:test_efficientnet"  # ~100k parameters, BatchNorm in every block, conv_head + bn2 after the blocks
TIMM_IMAGE_SIZE = 16


def make_bert_dir(path: Path, dropout: float = 0.1, layers: int = 3) -> Path:
    """Write a tiny random BERT (hidden 16) plus a word-level tokenizer with ``save_pretrained``."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    transformers.BertModel(config).save_pretrained(path)
    transformers.BertTokenizer(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny BERT with the usual dropout (0.1): 3 blocks ``hf.encoder.layer.{0,1,2}``, hidden 16."""
    pytest.importorskip("transformers")
    return make_bert_dir(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def bert_dir_nodrop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny BERT architecture with every dropout probability 0."""
    pytest.importorskip("transformers")
    return make_bert_dir(tmp_path_factory.mktemp("tiny_bert_nodrop"), dropout=0.0)


def make_texts(n: int, num_classes: int = 2, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Variable-length sentences (2..9 words); class k always contains one of its marker words."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    texts = []
    for k in labels:
        words = list(rng.choice(WORDS, size=int(rng.integers(1, 8))))
        words.insert(int(rng.integers(0, len(words) + 1)), CLASS_WORDS[k][int(rng.integers(0, 2))])
        texts.append(" ".join(words))
    return texts, labels.astype(np.int64)


def make_images(n: int, num_classes: int = 3, size: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random gray uint8 images (N, size, size) whose brightness depends a little on the class."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % num_classes).astype(np.int64)
    rng.shuffle(labels)
    base = rng.integers(0, 200, size=(n, size, size))
    images = np.clip(base + 25 * labels[:, None, None], 0, 255).astype(np.uint8)
    return images, labels


@pytest.fixture(scope="session")
def text_data():
    """TrainData-ready tiny text data: 16 train / 8 val / 8 test sentences, 2 classes."""
    from nc_finetune.data import Split

    texts, labels = make_texts(32, 2, seed=1)
    return {"train": Split(texts[:16], labels[:16]), "val": Split(texts[16:24], labels[16:24]),
            "test": Split(texts[24:], labels[24:])}


@pytest.fixture(scope="session")
def image_data():
    """Tiny image data: 12 train / 6 test random uint8 images, 3 classes."""
    from nc_finetune.data import Split

    images, labels = make_images(18, 3, seed=2)
    return {"train": Split(images[:12], labels[:12]), "test": Split(images[12:], labels[12:])}


def load_bert(path: Path, seed: int = 0):
    """A fresh backbone (its model is modified in place by build_classifier, so never share one)."""
    from nc_finetune.backbones import load_backbone

    torch.manual_seed(seed)
    return load_backbone(f"hf:{path}")


def load_cnn(seed: int = 0):
    """A fresh random-init tiny timm CNN with BatchNorm (deterministic for a given seed)."""
    from nc_finetune.backbones import load_backbone

    torch.manual_seed(seed)
    return load_backbone(TIMM_CNN, pretrained=False, image_size=TIMM_IMAGE_SIZE)


def train_config(**overrides):
    """A TrainConfig for tiny runs (override anything); on the CPU unless NC_TEST_DEVICE names another device."""
    from nc_finetune.config import TrainConfig

    kw = {"epochs": 2, "batch_size": 4, "eval_batch_size": 8, "lr": 1e-2, "head_lr": 1e-2, "warmup_ratio": 0.0,
          "log_every": 1, "checkpoint_every": 100, "device": os.environ.get("NC_TEST_DEVICE", "cpu"),
          "cache_prefix": "off"}
    kw.update(overrides)
    return TrainConfig(**kw)


def write_text_csv(path: Path, texts: list[str], labels: np.ndarray) -> str:
    lines = ["text,label"] + [f"{t},{int(y)}" for t, y in zip(texts, labels, strict=True)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def text_csv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``{train, test}`` csv files (columns text,label): 24 train / 8 test sentences, 2 classes."""
    d = tmp_path_factory.mktemp("csv")
    texts, labels = make_texts(32, 2, seed=3)
    return {"train": write_text_csv(d / "train.csv", texts[:24], labels[:24]),
            "test": write_text_csv(d / "test.csv", texts[24:], labels[24:])}


@pytest.fixture(scope="session", autouse=True)
def _private_datasets_cache(tmp_path_factory: pytest.TempPathFactory):
    """Arrow files written by ``datasets`` (csv runs) go to a temporary cache, not the user's."""
    try:
        import datasets
    except ImportError:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets-cache"))
        yield


def recipe_overrides(bert: Path, csv: dict[str, str], **extra) -> list[str]:
    """``key=value`` overrides for a tiny end-to-end text run (data.name=csv, local tiny BERT, CPU)."""
    base = {
        "backbone.name": f"hf:{bert}",
        "backbone.max_length": 16,
        "data.name": "csv",
        "data.data_files": f"{{train: {csv['train']}, test: {csv['test']}}}",
        "probe.samples_per_class": 8,
        "probe.batch_size": 16,
        "probe.ncc_samples": 64,
        "probe.device": "cpu",
        "selection.strategy": "manual",
        "selection.blocks": "[1]",
        "adapt.method": "finetune",
        "train.epochs": 2,
        "train.batch_size": 4,
        "train.eval_batch_size": 16,
        "train.lr": 1.0e-2,
        "train.warmup_ratio": 0.0,
        "train.log_every": 1,
        "train.checkpoint_every": 2,
        "train.device": "cpu",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def make_recipe(bert: Path, csv: dict[str, str], **extra):
    from nc_finetune.config import load_recipe

    return load_recipe(None, recipe_overrides(bert, csv, **extra))


#: Overrides of the shared finished run: NC-guided (knee) selection of one block, finetune, 2 epochs x 6 steps.
FINISHED_RUN = {"selection.strategy": "knee", "selection.max_blocks": 1, "selection.blocks": "null"}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, bert_dir: Path, text_csv: dict[str, str]) -> dict:
    """One tiny end-to-end ``run_pipeline`` shared by the pipeline and CLI tests. Never modify it: copy it first."""
    from nc_finetune.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("finished") / "run"
    overrides = recipe_overrides(bert_dir, text_csv, **FINISHED_RUN)
    recipe = make_recipe(bert_dir, text_csv, **FINISHED_RUN)
    summary = run_pipeline(recipe, out, progress=False)
    return {"out": out, "recipe": recipe, "overrides": overrides, "summary": summary}


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content), to show that a refused command touched nothing."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
