"""Hugging Face backbones: ``hf:<hub id or local path>`` (text encoders, decoder-only LLMs, ViT-family vision).

Supported: BERT-like encoders (BERT, RoBERTa, DistilBERT, DeBERTa-v2, ELECTRA, ...), decoder-only language models
(GPT-2, Llama, Qwen2, Mistral, Phi, Gemma, ...) and ViT-family vision encoders. Encoder-decoder models (T5, BART)
are refused.

The ``AutoModel`` is wrapped in :class:`HFFeatureModel` under the attribute ``hf``, so block names read
``hf.encoder.layer.i`` (BERT), ``hf.layers.i`` (Llama, Qwen2, ViT on transformers 5), ``hf.h.i`` (GPT-2) or
``hf.transformer.layer.i`` (DistilBERT). The layer stack is found generically, not from a table per architecture:
the ``nn.ModuleList`` of ``config.num_hidden_layers`` identical layers, preferring the layer class the model lists in
``_no_split_modules`` (Hugging Face's own "one transformer layer" marker). The wrapper pools ``last_hidden_state``
itself, so the unused tanh ``pooler`` of BERT/ViT is dropped and never shows up as a frozen or untrained parameter.

Decoder-only models (detected from the layer's attention, which declares ``is_causal``) pool the last real token by
default; their position ids are computed from the attention mask (as ``generate()`` does), so left and right padding
give the same features. A decoder tokenizer without a pad token pads with its eos token (pads are masked out).
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nc_finetune.backbones.base import (
    Backbone,
    check_pooling,
    count_params,
    finalize_model,
    first_line,
    make_block_infos,
    pool_tokens,
)
from nc_finetune.backbones.preprocess import ImagePreprocessor, TextPreprocessor, hf_image_config
from nc_finetune.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

#: Names of a final norm applied to the last layer's output (ViT: ``layernorm``, Llama: ``norm``, GPT-2: ``ln_f``,
#: Phi: ``final_layernorm``), looked up as direct children of the AutoModel.
_FINAL_NORM_NAMES: tuple[str, ...] = ("layernorm", "final_layernorm", "norm", "ln_f")

#: What load_hf_backbone accepts, for error messages.
_SUPPORTED = ("BERT-like text encoders, decoder-only LLMs (GPT-2, Llama, Qwen2, Mistral, Phi, Gemma) "
              "and ViT-family vision encoders")


class HFFeatureModel(nn.Module):
    """A Hugging Face encoder or decoder that returns one pooled vector per sample.

    Args:
        hf: The ``AutoModel`` (pooler removed).
        modality: ``"text"`` or ``"image"``.
        pooling: ``"cls"``, ``"mean"`` or ``"last"`` over ``last_hidden_state`` (mask-aware for text; vision means
            skip the prefix tokens).
        num_prefix_tokens: CLS/distillation/register tokens in front of the patch tokens (vision).
        interpolate_pos_encoding: Pass ``interpolate_pos_encoding=True`` to ViT (input size != pretraining size).
        causal: A decoder-only model: position ids are derived from the attention mask, the KV cache is off.
    """

    def __init__(
        self,
        hf: nn.Module,
        modality: str,
        pooling: str,
        num_prefix_tokens: int = 0,
        interpolate_pos_encoding: bool = False,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.hf = hf
        self.modality = modality
        self.pooling = pooling
        self.num_prefix_tokens = num_prefix_tokens
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.causal = causal
        params = inspect.signature(hf.forward).parameters
        self._takes_position_ids = "position_ids" in params
        # a feature extractor never generates: no KV cache to build (it would also hold memory during training)
        self._extra: dict[str, Any] = {"use_cache": False} if causal and "use_cache" in params else {}

    def forward(self, **inputs: Tensor) -> Tensor:
        """Run the model on ``prepare()`` output and pool ``last_hidden_state`` -> ``(B, hidden_size)`` float32."""
        if self.modality == "image":
            extra = {"interpolate_pos_encoding": True} if self.interpolate_pos_encoding else {}
            hidden = self.hf(pixel_values=inputs["pixel_values"], **extra).last_hidden_state  # (B, N, D)
            mask = None
        else:
            mask = inputs.get("attention_mask")
            if self.causal and mask is not None and self._takes_position_ids and "position_ids" not in inputs:
                inputs = {**inputs, "position_ids": causal_position_ids(mask)}
            hidden = self.hf(**inputs, **self._extra).last_hidden_state  # (B, T, D)
        return pool_tokens(hidden.float(), self.pooling, mask, self.num_prefix_tokens)


def causal_position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that count real tokens only: ``(B, T)`` mask -> ``(B, T)`` long, 0 at each sequence's first token.

    With left padding the default positions ``0..T-1`` would shift every real token by the number of pads (GPT-2's
    absolute position embeddings would then see other positions than for the same text padded on the right).
    Pad positions get 0; they are masked out of attention and pooling.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def load_hf_backbone(
    ref: str,
    *,
    spec: str | None = None,
    pooling: str = "auto",
    image_size: int | None = None,
    max_length: int = 128,
    pretrained: bool = True,
    cache_dir: str | None = None,
    default_pooling: str | None = None,
    family: str = "hf",
    provenance: dict[str, str] | None = None,
) -> Backbone:
    """Load a Hugging Face encoder or decoder-only model as a :class:`Backbone`.

    Args:
        ref: Hub id (``bert-base-uncased``, ``Qwen/Qwen2.5-0.5B-Instruct``) or local directory written by
            ``save_pretrained``.
        spec: The user's spec string (default ``"hf:<ref>"``).
        pooling: ``"auto"``, ``"cls"``, ``"mean"`` or ``"last"``. Auto: vision -> CLS (what
            ``ViTForImageClassification`` feeds its head); text -> ``default_pooling``, else the sentence-transformers
            pooling config shipped in a local directory (``1_Pooling/config.json``), else ``last`` for decoder-only
            models (what ``*ForSequenceClassification`` of GPT-2/Llama/Qwen2 reads) and CLS for encoders.
        image_size: Square input resolution for vision models (position embeddings are interpolated).
        max_length: Tokenizer truncation length, clamped to the model's position limit.
        pretrained: Load weights; False builds a randomly initialised model from the config.
        cache_dir: Hub cache directory.
        default_pooling: Pooling that "auto" resolves to for text (built-ins set the model's own).
        family: Recorded on the backbone.
        provenance: Extra provenance entries.

    Raises:
        ConfigError: An unsupported model (encoder-decoder, no layer stack) or a pooling that does not fit it
            (``cls`` on a decoder-only model, ``last`` on a vision model); raised before any weights are read.
        UserError: Config, weights or tokenizer that cannot be found.
    """
    from transformers import AutoConfig, AutoModel

    check_pooling(pooling)
    config = _hf_call(AutoConfig.from_pretrained, ref, "config", cache_dir=cache_dir)
    modality = _modality(config, ref)
    if pooling == "last" and modality == "image":
        raise ConfigError(f"pooling 'last' (last token) is for text models; hf:{ref} is a vision encoder "
                          "(use cls or mean)")
    with torch.device("meta"):  # the architecture without memory: find the layer stack before loading weights
        skeleton = AutoModel.from_config(config)
    layer_path = _layer_path(skeleton, config, ref)
    causal = modality == "text" and _is_causal(skeleton.get_submodule(layer_path))
    resolved = _resolve_pooling(pooling, modality, ref, default_pooling, causal, config)
    del skeleton
    if pretrained:
        hf = _hf_call(AutoModel.from_pretrained, ref, "weights", config=config, cache_dir=cache_dir)
    else:
        hf = AutoModel.from_config(config)
    if getattr(hf, "pooler", None) is not None:
        hf.pooler = None  # BERT/ViT forward skips a None pooler; we pool last_hidden_state ourselves

    num_prefix = _num_prefix_tokens(hf, config, ref) if modality == "image" else 0
    if modality == "image":
        processor = _image_processor(ref, cache_dir)
        image_cfg = hf_image_config(processor, config, image_size)
        interpolate = image_cfg.size != (int(config.image_size), int(config.image_size))
        preprocess: Any = ImagePreprocessor(image_cfg, key="pixel_values")
    else:
        from transformers import AutoTokenizer

        tokenizer = _hf_call(AutoTokenizer.from_pretrained, ref, "tokenizer", cache_dir=cache_dir)
        _fit_tokenizer(tokenizer, hf, ref)
        preprocess = TextPreprocessor(tokenizer, _clamp_length(max_length, tokenizer, config))
        interpolate = False

    model = finalize_model(HFFeatureModel(hf, modality, resolved, num_prefix, interpolate, causal=causal))
    num_layers = len(hf.get_submodule(layer_path))
    blocks = make_block_infos(model, [f"hf.{layer_path}.{i}" for i in range(num_layers)])
    final_norm = next((n for n in _FINAL_NORM_NAMES if isinstance(getattr(hf, n, None), nn.Module)), None)
    prov = {"source": f"hf:{ref}", "pretrained": str(pretrained), "model_type": str(config.model_type)}
    if causal:
        prov["decoder_only"] = "True"
    commit = getattr(config, "_commit_hash", None)
    if commit:
        prov["revision"] = str(commit)
    prov.update(provenance or {})
    return Backbone(
        spec=spec or f"hf:{ref}",
        model=model,
        modality=modality,
        blocks=blocks,
        feature_dim=int(config.hidden_size),
        pooling=resolved,
        # post-LN BERT: the last layer's output is last_hidden_state; pre-LN ViT/Llama/GPT-2 normalise it once more
        final_tap=f"hf.{final_norm}" if final_norm else None,
        preprocess=preprocess,
        num_prefix_tokens=num_prefix,
        family=family,
        provenance=prov,
        plain_prefix="hf.",
        grad_checkpointing=_grad_checkpointing_switch(hf),
    )


def _grad_checkpointing_switch(hf: nn.Module) -> Any:
    """``enable -> None`` through transformers' own API, or None for a model without gradient checkpointing."""
    if not getattr(hf, "supports_gradient_checkpointing", False):
        return None

    def switch(enable: bool) -> None:
        # non-reentrant: works when the block inputs (a frozen prefix's output) need no gradient
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
            if enable:
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                hf.activation_checkpointing_disable()
        elif enable:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_disable()

    return switch


def _hf_call(fn: Any, ref: str, what: str, **kwargs: Any) -> Any:
    """Call a ``from_pretrained`` and turn "not found / offline / not a model" errors (an empty directory, an unknown
    ``model_type``) into a one-line :class:`UserError`."""
    try:
        return fn(ref, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"cannot load the {what} of hf:{ref}: {first_line(e)} "
            "(expected a local save_pretrained directory, or a hub id that is cached or reachable)"
        ) from e


def _modality(config: Any, ref: str) -> str:
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"hf:{ref} (model_type {config.model_type!r}) is an encoder-decoder model, whose forward "
                          f"needs decoder inputs; supported: {_SUPPORTED}")
    if hasattr(config, "image_size") and hasattr(config, "num_channels"):
        return "image"
    if hasattr(config, "vocab_size"):
        return "text"
    raise ConfigError(
        f"hf:{ref} (model_type {config.model_type!r}) is neither a text model nor a vision encoder; "
        f"supported: {_SUPPORTED}"
    )


def _layer_path(hf: nn.Module, config: Any, ref: str) -> str:
    """Find the ``ModuleList`` of transformer layers, relative to the AutoModel.

    Candidates are module lists of identical layers, ``config.num_hidden_layers`` long when the config says so.
    Among several (a layer may hold a list of its own, e.g. experts), the one whose layer class the model names in
    ``_no_split_modules`` wins, then the one with the most parameters.
    """
    want = getattr(config, "num_hidden_layers", None)
    no_split = set(getattr(hf, "_no_split_modules", None) or ())
    candidates = [
        name for name, m in hf.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(layer) for layer in m}) == 1
        and (want is None or len(m) == want)
    ]
    if not candidates:
        raise ConfigError(
            f"hf:{ref} (model_type {config.model_type!r}) has no stack of {want or 'identical'} transformer layers; "
            f"supported: {_SUPPORTED}"
        )

    def rank(name: str) -> tuple[bool, int]:
        stack = hf.get_submodule(name)
        return type(stack[0]).__name__ in no_split, count_params(stack)

    return max(candidates, key=rank)


def _is_causal(stack: nn.Module) -> bool:
    """Whether the layers attend causally (decoder-only): transformers' attention modules declare ``is_causal``."""
    return any(getattr(m, "is_causal", False) is True for m in stack[0].modules())


def _num_prefix_tokens(hf: nn.Module, config: Any, ref: str) -> int:
    """CLS (+ distillation, + register) tokens of a ViT-family model; models without a CLS token are rejected."""
    emb = getattr(hf, "embeddings", None)
    if getattr(emb, "cls_token", None) is None:
        raise ConfigError(
            f"hf:{ref} (model_type {config.model_type!r}) has no CLS token; supported: ViT-family vision encoders"
        )
    distill = getattr(emb, "distillation_token", None) is not None
    return 1 + int(distill) + int(getattr(config, "num_register_tokens", 0) or 0)


def _resolve_pooling(
    pooling: str, modality: str, ref: str, default_pooling: str | None, causal: bool, config: Any
) -> str:
    if causal and pooling == "cls":
        raise ConfigError(
            f"pooling 'cls' does not fit decoder-only hf:{ref} (model_type {config.model_type!r}): its first token "
            "attends to nothing after it; use last (the default) or mean"
        )
    if pooling != "auto":
        return pooling
    if modality == "image":
        return "cls"
    return default_pooling or _sentence_transformers_pooling(ref) or ("last" if causal else "cls")


def _sentence_transformers_pooling(ref: str) -> str | None:
    """Read the pooling mode of a local sentence-transformers directory (``1_Pooling/config.json``), if any."""
    cfg = Path(ref) / "1_Pooling" / "config.json"
    if not cfg.is_file():
        return None
    try:
        modes = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if modes.get("pooling_mode_mean_tokens"):
        return "mean"
    if modes.get("pooling_mode_lasttoken"):
        return "last"
    if modes.get("pooling_mode_cls_token"):
        return "cls"
    return None


def _image_processor(ref: str, cache_dir: str | None) -> Any | None:
    """The checkpoint's image processor, or None when it ships none (defaults are used then)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(ref, cache_dir=cache_dir)
    except (OSError, ValueError, KeyError) as e:
        logger.warning("hf:%s has no usable image processor (%s)", ref, first_line(e))
        return None


def _fit_tokenizer(tokenizer: Any, hf: nn.Module, ref: str) -> None:
    """Make a checkpoint's tokenizer usable for batched feature extraction, in place.

    * No pad token (GPT-2, Llama and most decoder tokenizers): pad with the eos token (else bos, else unk); pads are
      masked out of attention and pooling, so which id fills them does not matter.
    * Inputs the model's forward does not name (``token_type_ids`` from a generic fast tokenizer given to a Llama,
      whose forward would pass unknown keywords on to its attention) are not produced.
    """
    if tokenizer.pad_token is None:
        fill = next((a for a in ("eos_token", "bos_token", "unk_token") if getattr(tokenizer, a, None) is not None),
                    None)
        if fill is None:
            raise ConfigError(f"the tokenizer of hf:{ref} has no pad, eos, bos or unk token to pad batches with")
        tokenizer.pad_token = getattr(tokenizer, fill)
        logger.info("hf:%s: the tokenizer has no pad token; padding with its %s %r", ref, fill, tokenizer.pad_token)
    params = inspect.signature(hf.forward).parameters
    names = list(getattr(tokenizer, "model_input_names", []) or [])
    kept = [n for n in names if n in params]
    if "input_ids" in kept and kept != names:
        tokenizer.model_input_names = kept


def _clamp_length(max_length: int, tokenizer: Any, config: Any) -> int:
    """Truncation length that the position embeddings can hold."""
    if max_length <= 0:
        raise ConfigError(f"max_length must be a positive number of tokens; got {max_length}")
    limits = [max_length]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 1_000_000:  # "unset" is a huge sentinel
        limits.append(model_max)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        # RoBERTa-style models offset positions by padding_idx + 1
        offset = 2 if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else 0
        limits.append(positions - offset)
    return min(limits)
