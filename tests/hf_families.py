"""Tiny random-init Hugging Face models of every supported text family, written with ``save_pretrained`` together
with a word-level tokenizer built offline (nothing comes from a hub)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.conftest import WORDS

#: Decoder-only families: (config class name, config kwargs). hidden 16, 3 layers, 2 heads (1 KV head where GQA).
DECODERS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", {"n_embd": 16, "n_layer": 3, "n_head": 2, "n_positions": 64}),
    "llama": ("LlamaConfig", {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
                              "num_key_value_heads": 1, "intermediate_size": 32}),
    "qwen2": ("Qwen2Config", {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
                              "num_key_value_heads": 1, "intermediate_size": 32}),
    "mistral": ("MistralConfig", {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
                                  "num_key_value_heads": 1, "intermediate_size": 32}),
    "phi": ("PhiConfig", {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
                          "intermediate_size": 32}),
    "gemma": ("GemmaConfig", {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
                              "num_key_value_heads": 1, "intermediate_size": 32, "head_dim": 8}),
}
#: BERT-like encoder families (CLS pooling by default).
ENCODERS: dict[str, tuple[str, dict[str, Any]]] = {
    "distilbert": ("DistilBertConfig", {"dim": 16, "n_layers": 3, "n_heads": 2, "hidden_dim": 32}),
    "deberta-v2": ("DebertaV2Config", {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
                                       "intermediate_size": 32, "relative_attention": True,
                                       "pos_att_type": ["p2c", "c2p"], "max_relative_positions": 8,
                                       "norm_rel_ebd": "layer_norm"}),
    "electra": ("ElectraConfig", {"embedding_size": 8, "hidden_size": 16, "num_hidden_layers": 3,
                                  "num_attention_heads": 2, "intermediate_size": 32}),
    "roberta": ("RobertaConfig", {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
                                  "intermediate_size": 32, "max_position_embeddings": 66}),
}
FAMILIES = {**DECODERS, **ENCODERS}

#: Block names per family (the layer stack each family keeps under the AutoModel).
LAYER_STACKS = {"gpt2": "hf.h", "distilbert": "hf.transformer.layer", "deberta-v2": "hf.encoder.layer",
                "electra": "hf.encoder.layer", "roberta": "hf.encoder.layer"}
#: Linear (Conv1D for GPT-2) modules inside one block, relative to it: the LoRA targets of a selected block.
BLOCK_LINEARS = {
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "llama": ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
              "self_attn.q_proj", "self_attn.v_proj"],
    "phi": ["mlp.fc1", "mlp.fc2", "self_attn.dense", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
}


def decoder_tokenizer(path: Path, padding_side: str = "right") -> int:
    """A word-level fast tokenizer with unk/bos/eos and no pad token (like GPT-2's and Llama's); returns its size."""
    import tokenizers
    import transformers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", padding_side=padding_side)
    fast.save_pretrained(path)
    return len(vocab)


def byte_level_tokenizer(path: Path, padding_side: str = "right") -> int:
    """A Qwen2 (byte-level BPE) tokenizer whose merges spell out the test words, so each word is one token (and each
    space another); its ``<|endoftext|>`` is pad and eos, as in Qwen2's. AutoTokenizer insists on this class for
    model_type qwen2."""
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        for i in range(1, len(word)):
            if word[:i + 1] not in vocab:
                vocab[word[:i + 1]] = len(vocab)
                merges.append((word[:i], word[i]))
    vocab["<|endoftext|>"] = len(vocab)
    tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, padding_side=padding_side)
    tok.save_pretrained(path)
    return len(vocab)


def encoder_tokenizer(path: Path) -> int:
    """A word-level BERT tokenizer ([PAD] = 0); returns its size. The vocabulary is passed as a dict: transformers 5
    ignores ``vocab_file=`` and would map every word to [UNK]."""
    import transformers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    return len(vocab)


def make_family_dir(path: Path, family: str, padding_side: str = "right", seed: int = 0) -> Path:
    """Write a tiny random ``family`` model and its tokenizer to ``path`` with ``save_pretrained``."""
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    cls_name, kwargs = FAMILIES[family]
    if family == "qwen2":
        vocab = byte_level_tokenizer(path, padding_side)
        extra = {"eos_token_id": vocab - 1}
    elif family in DECODERS:
        vocab = decoder_tokenizer(path, padding_side)
        extra = {"bos_token_id": 1, "eos_token_id": 2}
    else:
        vocab = encoder_tokenizer(path)
        extra = {"pad_token_id": 0}
    config = getattr(transformers, cls_name)(vocab_size=vocab, **kwargs, **extra)
    torch.manual_seed(seed)
    transformers.AutoModel.from_config(config).save_pretrained(path)
    return path


def family_dirs(factory: Callable[[str], Path], families: list[str]) -> dict[str, Path]:
    """``{family: directory}`` for each family (``factory`` makes one temporary directory per name)."""
    return {f: make_family_dir(factory(f), f) for f in families}
