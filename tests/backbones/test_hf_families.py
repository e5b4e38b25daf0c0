"""Hugging Face families beyond BERT/ViT: decoder-only LLMs (GPT-2, Llama, Qwen2, Mistral, Phi, Gemma) and the
encoders DistilBERT, DeBERTa-v2, ELECTRA, RoBERTa, each as a tiny random model written in the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nc_finetune.backbones import Backbone, load_backbone
from nc_finetune.errors import ConfigError
from tests.hf_families import DECODERS, ENCODERS, FAMILIES, LAYER_STACKS, make_family_dir

transformers = pytest.importorskip("transformers")

TEXTS = ["the cat sat", "a big red dog ran fast on the mat", "dog", "the slow cat ran on a red mat"]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory: pytest.TempPathFactory):
    made: dict[tuple[str, str], Path] = {}

    def get(family: str, padding_side: str = "right") -> Path:
        if (family, padding_side) not in made:
            made[family, padding_side] = make_family_dir(tmp_path_factory.mktemp(family), family, padding_side)
        return made[family, padding_side]

    return get


def _taps(bb: Backbone, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Features and the pooled output of every block and of the final tap, from one hooked forward."""
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


def _reference_pool(hidden: torch.Tensor, mask: torch.Tensor, decoder: bool) -> torch.Tensor:
    """Independent pooling of right-padded hidden states (B, T, D): the last real token for decoders, token 0 else."""
    if not decoder:
        return hidden[:, 0]
    return torch.stack([hidden[i, int(mask[i].sum()) - 1] for i in range(hidden.shape[0])])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_blocks_follow_output_hidden_states(family_dir, family: str) -> None:
    """Block i's pooled output equals the pooled ``hidden_states[i + 1]`` of the plain model (right padding, so the
    model's default positions are the real ones): the discovered blocks are the layers, in forward order."""
    bb = load_backbone(f"hf:{family_dir(family)}")
    decoder = family in DECODERS
    assert bb.pooling == ("last" if decoder else "cls") and bb.feature_dim == 16 and len(bb.blocks) == 3
    stack = LAYER_STACKS.get(family, "hf.layers" if decoder else "hf.encoder.layer")
    assert [b.name for b in bb.blocks] == [f"{stack}.{i}" for i in range(3)]
    inputs = bb.prepare(TEXTS)
    mask = inputs["attention_mask"]
    assert mask[:, 0].all() and not mask.all()  # right padded, of different lengths
    feats, pooled = _taps(bb, inputs)
    with torch.no_grad():
        out = transformers.AutoModel.from_pretrained(family_dir(family)).eval()(**inputs, output_hidden_states=True)
    hidden = out.hidden_states  # embeddings, then one per layer (the last one after the final norm, if any)
    assert len(hidden) == 4
    for i, block in enumerate(bb.blocks[:-1]):
        torch.testing.assert_close(pooled[block.name], _reference_pool(hidden[i + 1], mask, decoder))
    final = _reference_pool(out.last_hidden_state, mask, decoder)
    torch.testing.assert_close(feats, final)
    torch.testing.assert_close(pooled["<final>"], final)
    if bb.final_tap is None:  # post-LN encoders: the last block's output is the final feature
        torch.testing.assert_close(pooled[bb.blocks[-1].name], final)
    else:  # pre-LN decoders: a final norm follows the last block
        assert decoder and not torch.allclose(pooled[bb.blocks[-1].name], final)


@pytest.mark.parametrize("family", list(DECODERS))
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_decoder_features_do_not_depend_on_the_padding_side(family_dir, family: str, pooling: str) -> None:
    """Left and right padding give the features of each text run alone, at every block (GPT-2 has absolute
    position embeddings: this needs positions counted from the attention mask)."""
    bb = load_backbone(f"hf:{family_dir(family)}", pooling=pooling)
    tok = bb.preprocess.tokenizer
    assert tok.pad_token is not None
    alone = [_taps(bb, bb.prepare([t])) for t in TEXTS]
    for side in ("right", "left"):
        tok.padding_side = side
        inputs = bb.prepare(TEXTS)
        first_pad = inputs["attention_mask"][:, -1 if side == "right" else 0]
        assert not first_pad.all()  # really padded on this side
        feats, pooled = _taps(bb, inputs)
        for i, (f_alone, p_alone) in enumerate(alone):
            torch.testing.assert_close(feats[i], f_alone[0], atol=1e-5, rtol=1e-5)
            for b in bb.blocks:
                torch.testing.assert_close(pooled[b.name][i], p_alone[b.name][0], atol=1e-5, rtol=1e-5)


def test_a_left_padding_tokenizer_is_used_as_it_is(family_dir) -> None:
    bb = load_backbone(f"hf:{family_dir('llama', 'left')}")
    inputs = bb.prepare(TEXTS[:2])
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][:, -1].all()
    right = load_backbone(f"hf:{family_dir('llama')}")
    with torch.no_grad():
        torch.testing.assert_close(bb.model(**inputs), right.model(**right.prepare(TEXTS[:2])), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_a_decoder_tokenizer_without_pad_token_pads_with_eos(family_dir, family: str) -> None:
    ref = family_dir(family)
    assert transformers.AutoTokenizer.from_pretrained(ref).pad_token is None
    tok = load_backbone(f"hf:{ref}").preprocess.tokenizer
    assert tok.pad_token == tok.eos_token == "</s>"


def test_inputs_the_model_does_not_name_are_not_produced(family_dir) -> None:
    """A BERT tokenizer returns token_type_ids, which DistilBERT's forward does not take (it would pass them on to its
    attention through ``**kwargs``)."""
    ref = family_dir("distilbert")
    assert "token_type_ids" in transformers.AutoTokenizer.from_pretrained(ref)(["a cat"])
    assert set(load_backbone(f"hf:{ref}").prepare(["a cat"])) == {"input_ids", "attention_mask"}


def test_last_pooling_on_an_encoder_and_mean_on_a_decoder(family_dir) -> None:
    bb = load_backbone(f"hf:{family_dir('distilbert')}", pooling="last")
    inputs = bb.prepare(TEXTS[:2])
    with torch.no_grad():
        hidden = bb.model.hf(**inputs).last_hidden_state
    torch.testing.assert_close(bb.model(**inputs), _reference_pool(hidden, inputs["attention_mask"], True))
    assert load_backbone(f"hf:{family_dir('qwen2')}", pooling="mean").pooling == "mean"


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_cls_pooling_on_a_decoder_is_refused(family_dir, family: str) -> None:
    with pytest.raises(ConfigError, match="pooling 'cls' does not fit decoder-only") as e:
        load_backbone(f"hf:{family_dir(family)}", pooling="cls")
    assert "\n" not in str(e.value)


def test_last_pooling_on_an_image_model_is_refused(tmp_path: Path) -> None:
    transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="pooling 'last'.*vision encoder"):
        load_backbone(f"hf:{tmp_path}", pooling="last", pretrained=False)
    with pytest.raises(ConfigError, match="pooling 'last'.*timm model"):
        load_backbone("timm:test_efficientnet", pooling="last", pretrained=False)


@pytest.mark.parametrize("family", list(ENCODERS))
def test_encoders_ignore_padding(family_dir, family: str) -> None:
    bb = load_backbone(f"hf:{family_dir(family)}", pooling="mean")
    feats, _ = _taps(bb, bb.prepare(TEXTS))
    for i, text in enumerate(TEXTS):
        f_alone, _ = _taps(bb, bb.prepare([text]))
        np.testing.assert_allclose(feats[i].numpy(), f_alone[0].numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_truncated_decoder_gives_the_pooled_output_of_its_cut_block(family_dir, family: str) -> None:
    from nc_finetune.backbones.truncate import truncate_backbone

    ref = family_dir(family)
    full = load_backbone(f"hf:{ref}")
    full.preprocess.tokenizer.padding_side = "left"
    inputs = full.prepare(TEXTS)
    _, pooled = _taps(full, inputs)
    cut = truncate_backbone(load_backbone(f"hf:{ref}"), 1)
    assert [b.name for b in cut.blocks] == [b.name for b in full.blocks[:2]] and cut.final_tap is None
    with torch.no_grad():
        torch.testing.assert_close(cut.model(**inputs), pooled[full.blocks[1].name])
