"""The prefix cache on every supported family: tiny random-init timm ViT, Swin, ConvNeXt, ResNet, EfficientNet and
Hugging Face BERT, RoBERTa, DeBERTa-v2, ViT. For each, the replayed forward equals the real one, and a short training
run with ``train.cache_prefix=on`` equals the run without the cache (the ViT and DeBERTa-v2 replays used to crash)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nc_finetune.adapt import build_classifier, eval_mode
from nc_finetune.backbones import load_backbone
from nc_finetune.data import Split
from nc_finetune.select import select_blocks
from nc_finetune.train.cache import PrefixCache
from nc_finetune.train.loop import TrainData, Trainer
from nc_finetune.utils.env import seed_everything
from tests.conftest import WORDS, make_images, make_texts, train_config

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

#: timm models: (name, create_model kwargs); tiny widths, 32 px inputs.
TIMM = {
    "timm-vit": ("test_vit", {}),
    "timm-swin": ("swin_tiny_patch4_window7_224", {"img_size": 32, "window_size": 2, "embed_dim": 8,
                                                   "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}),
    "timm-convnext": ("test_convnext", {}),
    "timm-resnet": ("test_resnet", {}),
    "timm-efficientnet": ("test_efficientnet", {}),
}
HF = ("hf-bert", "hf-roberta", "hf-deberta-v2", "hf-vit")
FAMILIES = [*TIMM, *HF]


def _hf_text_dir(path: Path, kind: str) -> Path:
    """A tiny random text encoder (hidden 16, 3 layers) of ``kind`` with a word-level tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    common = {"vocab_size": len(vocab), "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
              "intermediate_size": 32, "max_position_embeddings": 40, "pad_token_id": 0}
    torch.manual_seed(0)
    if kind == "hf-bert":
        model = transformers.BertModel(transformers.BertConfig(**common))
    elif kind == "hf-roberta":
        model = transformers.RobertaModel(transformers.RobertaConfig(**common, type_vocab_size=1))
    else:  # DeBERTa-v2 with everything that sits between its layers: relative attention and the layer-0 conv
        model = transformers.DebertaV2Model(transformers.DebertaV2Config(
            **common, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
            max_relative_positions=16, conv_kernel_size=3, norm_rel_ebd="layer_norm", type_vocab_size=0))
    model.save_pretrained(path)
    transformers.BertTokenizer(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    return path


def _hf_vit_dir(path: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=3,
                                    num_attention_heads=2, intermediate_size=32)
    transformers.ViTModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    dirs = {k: _hf_text_dir(root / k, k) for k in ("hf-bert", "hf-roberta", "hf-deberta-v2")}
    dirs["hf-vit"] = _hf_vit_dir(root / "hf-vit")
    return dirs


def load_family(family: str, hf_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    """A fresh tiny backbone of ``family`` (deterministic)."""
    torch.manual_seed(0)
    if family in TIMM:
        name, kwargs = TIMM[family]
        if kwargs:
            monkeypatch.setattr(timm, "create_model", functools.partial(timm.create_model, **kwargs))
        return load_backbone(f"timm:{name}", pretrained=False, image_size=32)
    return load_backbone(f"hf:{hf_dirs[family]}", max_length=24)


def family_data(backbone) -> dict[str, Split]:
    if backbone.modality == "text":
        texts, labels = make_texts(24, 2, seed=4)
        return {"train": Split(texts[:16], labels[:16]), "test": Split(texts[16:], labels[16:])}
    images, labels = make_images(24, 3, size=32, seed=4)
    return {"train": Split(images[:16], labels[:16]), "test": Split(images[16:], labels[16:])}


def _middle_block(backbone) -> int:
    return len(backbone.blocks) // 2


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_forward_equals_the_real_one(family, hf_dirs, monkeypatch) -> None:
    bb = load_family(family, hf_dirs, monkeypatch)
    data = family_data(bb)
    k = _middle_block(bb)
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=[k])
    model = build_classifier(bb, 3, method="finetune", selection=sel).model
    x = data["train"].inputs
    cache = PrefixCache(model, f"backbone.{bb.blocks[k].name}", "backbone")
    with eval_mode(model):
        cache.build("train", iter([bb.prepare(x[:5]), bb.prepare(x[5:])]), torch.device("cpu"))
    # the block before the target is skipped (the prefix does not silently run in full)
    before = f"backbone.{bb.blocks[k - 1].name}"
    assert any(before == p or before.startswith(p + ".") for p in cache.prefix), (cache.prefix, cache.plan.before)
    with torch.no_grad(), eval_mode(model):
        real = model(**bb.prepare(x))
        inputs = cache.batch("train", list(range(len(x))), torch.device("cpu"))
        with cache.replay():
            cached = model(**inputs)
    torch.testing.assert_close(cached, real, atol=1e-5, rtol=1e-5)
    assert cache.verify("train", bb.prepare(x[:8]), list(range(8)), torch.device("cpu"), rtol=1e-5)


def _fit(family: str, hf_dirs, monkeypatch, out: Path, cache: str):
    seed_everything(0)
    bb = load_family(family, hf_dirs, monkeypatch)
    data = family_data(bb)
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=[_middle_block(bb)])
    adapted = build_classifier(bb, 3, method="finetune", selection=sel)
    trainer = Trainer(adapted, bb, TrainData(train=data["train"], test=data["test"]),
                      train_config(cache_prefix=cache, epochs=2, batch_size=8), out, progress=False)
    return trainer.fit(), adapted.trainable_state_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_training_equals_uncached_on_every_family(family, hf_dirs, monkeypatch, tmp_path) -> None:
    s_off, w_off = _fit(family, hf_dirs, monkeypatch, tmp_path / "off", "off")
    s_on, w_on = _fit(family, hf_dirs, monkeypatch, tmp_path / "on", "on")
    assert s_on["prefix_cache"]["enabled"], s_on["prefix_cache"]
    for name, v in w_off.items():
        torch.testing.assert_close(w_on[name], v, atol=1e-5, rtol=1e-5, msg=name)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / m / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line and '"split"' not in line] for m in ("off", "on")]
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    assert s_on["test_loss"] == pytest.approx(s_off["test_loss"], abs=1e-5)
