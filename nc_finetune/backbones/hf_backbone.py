"""Hugging Face backbones: ``hf:<hub id or local path>`` (BERT-family text encoders, ViT-family vision encoders).

The ``AutoModel`` is wrapped in :class:`HFFeatureModel` under the attribute ``hf``, so block names read
``hf.encoder.layer.i`` (BERT) or ``hf.layers.i`` / ``hf.encoder.layer.i`` (ViT, depending on the transformers
version: transformers 5 keeps ViT layers directly under ``layers``). The wrapper pools ``last_hidden_state`` itself,
so the unused tanh ``pooler`` of BERT/ViT is dropped and never shows up as a frozen or untrained parameter.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from nc_finetune.backbones.base import (
    Backbone,
    check_pooling,
    finalize_model,
    first_line,
    make_block_infos,
    pool_tokens,
)
from nc_finetune.backbones.preprocess import ImagePreprocessor, TextPreprocessor, hf_image_config
from nc_finetune.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

#: Where the layer stack lives, relative to the AutoModel, in lookup order.
_TEXT_LAYER_PATHS: tuple[str, ...] = ("encoder.layer", "encoder.layers")
_VISION_LAYER_PATHS: tuple[str, ...] = ("encoder.layer", "encoder.layers", "layers")

#: Names of a final norm applied to the last layer's output (ViT: ``layernorm``).
_FINAL_NORM_NAMES: tuple[str, ...] = ("layernorm", "final_layernorm", "norm")


class HFFeatureModel(nn.Module):
    """A Hugging Face encoder that returns one pooled vector per sample.

    Args:
        hf: The ``AutoModel`` (pooler removed).
        modality: ``"text"`` or ``"image"``.
        pooling: ``"cls"`` or ``"mean"`` over ``last_hidden_state`` (mask-aware for text; vision means skip the
            prefix tokens).
        num_prefix_tokens: CLS/distillation/register tokens in front of the patch tokens (vision).
        interpolate_pos_encoding: Pass ``interpolate_pos_encoding=True`` to ViT (input size != pretraining size).
    """

    def __init__(
        self,
        hf: nn.Module,
        modality: str,
        pooling: str,
        num_prefix_tokens: int = 0,
        interpolate_pos_encoding: bool = False,
    ) -> None:
        super().__init__()
        self.hf = hf
        self.modality = modality
        self.pooling = pooling
        self.num_prefix_tokens = num_prefix_tokens
        self.interpolate_pos_encoding = interpolate_pos_encoding

    def forward(self, **inputs: Tensor) -> Tensor:
        """Run the encoder on ``prepare()`` output and pool ``last_hidden_state`` -> ``(B, hidden_size)`` float32."""
        if self.modality == "image":
            extra = {"interpolate_pos_encoding": True} if self.interpolate_pos_encoding else {}
            hidden = self.hf(pixel_values=inputs["pixel_values"], **extra).last_hidden_state  # (B, N, D)
            mask = None
        else:
            hidden = self.hf(**inputs).last_hidden_state  # (B, T, D)
            mask = inputs.get("attention_mask")
        return pool_tokens(hidden.float(), self.pooling, mask, self.num_prefix_tokens)


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
    """Load a Hugging Face encoder as a :class:`Backbone`.

    Args:
        ref: Hub id (``bert-base-uncased``) or local directory written by ``save_pretrained``.
        spec: The user's spec string (default ``"hf:<ref>"``).
        pooling: ``"auto"``, ``"cls"`` or ``"mean"``. Auto: vision -> CLS (what ``ViTForImageClassification``
            feeds its head); text -> ``default_pooling``, else the sentence-transformers pooling config shipped in a
            local directory (``1_Pooling/config.json``), else CLS.
        image_size: Square input resolution for vision models (position embeddings are interpolated).
        max_length: Tokenizer truncation length, clamped to the model's position limit.
        pretrained: Load weights; False builds a randomly initialised model from the config.
        cache_dir: Hub cache directory.
        default_pooling: Pooling that "auto" resolves to for text (built-ins set the model's own).
        family: Recorded on the backbone.
        provenance: Extra provenance entries.
    """
    from transformers import AutoConfig, AutoModel

    check_pooling(pooling)
    config = _hf_call(AutoConfig.from_pretrained, ref, "config", cache_dir=cache_dir)
    modality = _modality(config, ref)
    if pretrained:
        hf = _hf_call(AutoModel.from_pretrained, ref, "weights", config=config, cache_dir=cache_dir)
    else:
        hf = AutoModel.from_config(config)
    if getattr(hf, "pooler", None) is not None:
        hf.pooler = None  # BERT/ViT forward skips a None pooler; we pool last_hidden_state ourselves

    layer_path = _layer_path(hf, config, modality, ref)
    num_prefix = _num_prefix_tokens(hf, config, ref) if modality == "image" else 0
    resolved = _resolve_pooling(pooling, modality, ref, default_pooling)
    if modality == "image":
        processor = _image_processor(ref, cache_dir)
        image_cfg = hf_image_config(processor, config, image_size)
        interpolate = image_cfg.size != (int(config.image_size), int(config.image_size))
        preprocess: Any = ImagePreprocessor(image_cfg, key="pixel_values")
    else:
        from transformers import AutoTokenizer

        tokenizer = _hf_call(AutoTokenizer.from_pretrained, ref, "tokenizer", cache_dir=cache_dir)
        preprocess = TextPreprocessor(tokenizer, _clamp_length(max_length, tokenizer, config))
        interpolate = False

    model = finalize_model(HFFeatureModel(hf, modality, resolved, num_prefix, interpolate))
    num_layers = len(hf.get_submodule(layer_path))
    blocks = make_block_infos(model, [f"hf.{layer_path}.{i}" for i in range(num_layers)])
    final_norm = next((n for n in _FINAL_NORM_NAMES if isinstance(getattr(hf, n, None), nn.Module)), None)
    prov = {"source": f"hf:{ref}", "pretrained": str(pretrained), "model_type": str(config.model_type)}
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
        # post-LN BERT: the last layer's output is last_hidden_state; pre-LN ViT normalises it once more
        final_tap=f"hf.{final_norm}" if final_norm else None,
        preprocess=preprocess,
        num_prefix_tokens=num_prefix,
        family=family,
        provenance=prov,
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
    """Call a ``from_pretrained`` and turn "not found / offline" errors into a one-line :class:`UserError`."""
    try:
        return fn(ref, **kwargs)
    except OSError as e:
        raise UserError(
            f"cannot load the {what} of hf:{ref}: {first_line(e)} "
            "(expected a local save_pretrained directory, or a hub id that is cached or reachable)"
        ) from e


def _modality(config: Any, ref: str) -> str:
    if hasattr(config, "image_size") and hasattr(config, "num_channels"):
        return "image"
    if hasattr(config, "vocab_size"):
        return "text"
    raise ConfigError(
        f"hf:{ref} (model_type {config.model_type!r}) is neither a text encoder nor a vision encoder; "
        "supported: BERT-family text encoders, ViT-family vision encoders"
    )


def _layer_path(hf: nn.Module, config: Any, modality: str, ref: str) -> str:
    """Find the ``ModuleList`` of transformer layers."""
    paths = _VISION_LAYER_PATHS if modality == "image" else _TEXT_LAYER_PATHS
    want = getattr(config, "num_hidden_layers", None)
    for path in paths:
        try:
            stack = hf.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(stack, nn.ModuleList) and (want is None or len(stack) == want):
            return path
    family = "ViT-family vision" if modality == "image" else "BERT-family text"
    raise ConfigError(
        f"hf:{ref} (model_type {config.model_type!r}) has no layer stack at {' / '.join(paths)}; "
        f"supported: {family} encoders"
    )


def _num_prefix_tokens(hf: nn.Module, config: Any, ref: str) -> int:
    """CLS (+ distillation, + register) tokens of a ViT-family model; models without a CLS token are rejected."""
    emb = getattr(hf, "embeddings", None)
    if getattr(emb, "cls_token", None) is None:
        raise ConfigError(
            f"hf:{ref} (model_type {config.model_type!r}) has no CLS token; supported: ViT-family vision encoders"
        )
    distill = getattr(emb, "distillation_token", None) is not None
    return 1 + int(distill) + int(getattr(config, "num_register_tokens", 0) or 0)


def _resolve_pooling(pooling: str, modality: str, ref: str, default_pooling: str | None) -> str:
    if pooling != "auto":
        return pooling
    if modality == "image":
        return "cls"
    return default_pooling or _sentence_transformers_pooling(ref) or "cls"


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
