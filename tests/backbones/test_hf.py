"""Hugging Face backbones from tiny local ``save_pretrained`` directories (BERT text, ViT vision)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nc_finetune.backbones import Backbone, load_backbone
from nc_finetune.errors import ConfigError, UserError

transformers = pytest.importorskip("transformers")

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "fast", "slow", "red", "big"]
VISION_LAYER_PATHS = ("layers", "encoder.layer")  # transformers 5 keeps ViT layers at the top level


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(d)
    transformers.BertTokenizer(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    transformers.ViTModel(config).save_pretrained(d)
    transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]
    ).save_pretrained(d)
    return d


def _taps(bb: Backbone, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the model with a hook on every block and on the final tap; return (features, pooled taps)."""
    outs: dict[str, object] = {}
    hooked = [(b.name, m) for b, m in bb.block_modules()] + [("<final>", bb.final_module())]
    handles = [m.register_forward_hook(lambda _m, _i, o, n=n: outs.setdefault(n, o)) for n, m in hooked]
    try:
        with torch.no_grad():
            feats = bb.model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return feats, {n: bb.pool(o, inputs) for n, o in outs.items()}


def test_bert_blocks_and_cls_feature(bert_dir: Path) -> None:
    bb = load_backbone(f"hf:{bert_dir}", pretrained=True)
    assert bb.modality == "text" and bb.feature_dim == 32 and bb.pooling == "cls" and bb.final_tap is None
    assert [b.name for b in bb.blocks] == [f"hf.encoder.layer.{i}" for i in range(3)]
    for info, module in bb.block_modules():
        assert info.num_params == sum(p.numel() for p in module.parameters())
    assert not any("pooler" in k for k in bb.model.state_dict())  # unused tanh pooler dropped
    assert not bb.model.training
    inputs = bb.prepare(["the cat sat on the mat", "a dog ran"])
    assert set(inputs) >= {"input_ids", "attention_mask"}
    feats, pooled = _taps(bb, inputs)
    assert feats.shape == (2, 32) and feats.dtype == torch.float32
    torch.testing.assert_close(pooled[bb.blocks[-1].name], feats)  # post-LN BERT: last block == final feature
    assert all(v.shape == (2, 32) for v in pooled.values())


def test_bert_loads_the_saved_weights(bert_dir: Path) -> None:
    saved = transformers.BertModel.from_pretrained(bert_dir).state_dict()
    torch.manual_seed(123)  # a different seed must not matter with pretrained=True
    got = load_backbone(f"hf:{bert_dir}").model.hf.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in got.items())
    torch.manual_seed(5)
    r1 = load_backbone(f"hf:{bert_dir}", pretrained=False).model.state_dict()
    torch.manual_seed(5)
    r2 = load_backbone(f"hf:{bert_dir}", pretrained=False).model.state_dict()
    assert all(torch.equal(r1[k], r2[k]) for k in r1)
    assert not torch.equal(
        r1["hf.encoder.layer.0.attention.self.query.weight"], got["encoder.layer.0.attention.self.query.weight"]
    )


def test_mean_pooling_ignores_padding(bert_dir: Path) -> None:
    bb = load_backbone(f"hf:{bert_dir}", pooling="mean")
    assert bb.pooling == "mean"
    short = "the cat sat"
    alone = bb.prepare([short])
    padded = bb.prepare([short, "the big red dog ran fast on the mat the dog"])
    assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1]
    f_alone, p_alone = _taps(bb, alone)
    f_padded, p_padded = _taps(bb, padded)
    torch.testing.assert_close(f_padded[0], f_alone[0], atol=1e-5, rtol=1e-5)
    for b in bb.blocks:  # also every block tap
        torch.testing.assert_close(p_padded[b.name][0], p_alone[b.name][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_padded[bb.blocks[-1].name], f_padded)
    # CLS and mean really differ
    cls = load_backbone(f"hf:{bert_dir}", pooling="cls")
    with torch.no_grad():
        assert not torch.allclose(cls.model(**alone), f_alone)


def test_auto_pooling_follows_sentence_transformers_config(bert_dir: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "st"
    shutil.copytree(bert_dir, d)
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}), encoding="utf-8")
    assert load_backbone(f"hf:{d}").pooling == "mean"
    assert load_backbone(f"hf:{d}", pooling="cls").pooling == "cls"


def test_max_length_is_clamped_to_positions(bert_dir: Path) -> None:
    bb = load_backbone(f"hf:{bert_dir}", max_length=1000)
    ids = bb.prepare([" ".join(WORDS * 20)])["input_ids"]
    assert ids.shape[1] == 64
    assert load_backbone(f"hf:{bert_dir}", max_length=8).prepare([" ".join(WORDS)])["input_ids"].shape[1] == 8


def test_vit_blocks_final_layernorm_and_cls(vit_dir: Path) -> None:
    bb = load_backbone(f"hf:{vit_dir}")
    assert bb.modality == "image" and bb.pooling == "cls" and bb.feature_dim == 32
    assert bb.final_tap == "hf.layernorm" and bb.num_prefix_tokens == 1
    names = [b.name for b in bb.blocks]
    assert any(names == [f"hf.{p}.{i}" for i in range(2)] for p in VISION_LAYER_PATHS), names
    assert bb.preprocess.config.std == (0.25, 0.25, 0.25)
    imgs = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    inputs = bb.prepare(imgs)
    assert inputs["pixel_values"].shape == (3, 3, 32, 32)
    feats, pooled = _taps(bb, inputs)
    assert feats.shape == (3, 32)
    torch.testing.assert_close(pooled["<final>"], feats)  # CLS of the final-normed sequence
    assert not torch.allclose(pooled[names[-1]], feats)  # pre-LN: last block output is not yet normalised


def test_vit_image_size_override_and_mean(vit_dir: Path) -> None:
    bb = load_backbone(f"hf:{vit_dir}", image_size=48, pooling="mean")
    inputs = bb.prepare(np.zeros((2, 10, 10, 3), np.uint8))
    assert inputs["pixel_values"].shape == (2, 3, 48, 48)
    feats, pooled = _taps(bb, inputs)  # position embeddings interpolated to 6x6 patches
    assert feats.shape == (2, 32)
    torch.testing.assert_close(pooled["<final>"], feats)  # mean over patch tokens, CLS skipped


def test_unsupported_and_missing_hf_models(tmp_path: Path) -> None:
    # GPT-2 and the other decoder-only models are supported now (tests/backbones/test_hf_families.py)
    transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=32).save_pretrained(
        tmp_path)
    with pytest.raises(ConfigError, match="encoder-decoder.*supported: BERT-like"):
        load_backbone(f"hf:{tmp_path}", pretrained=False)
    with pytest.raises(UserError, match="cannot load"):
        load_backbone(f"hf:{tmp_path / 'does-not-exist'}")


@pytest.mark.parametrize("config", [None, '{"model_type": "nosuchmodel", "hidden_size": 8}', '{"model_type": "be'],
                         ids=["empty-dir", "unknown-model-type", "cut-config"])
def test_a_directory_that_holds_no_model_is_one_line(tmp_path: Path, config: str | None) -> None:
    if config is not None:
        (tmp_path / "config.json").write_text(config, encoding="utf-8")
    with pytest.raises(UserError, match=rf"^cannot load the config of hf:{tmp_path}: ") as e:
        load_backbone(f"hf:{tmp_path}")
    assert "\n" not in str(e.value)


def test_vit_without_image_processor_uses_config_defaults(tmp_path: Path) -> None:
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    transformers.ViTModel(config).save_pretrained(tmp_path)
    bb = load_backbone(f"hf:{tmp_path}")
    assert bb.preprocess.config.size == (16, 16) and bb.preprocess.config.mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        assert bb.model(**bb.prepare([np.zeros((20, 20), np.uint8)])).shape == (1, 16)
