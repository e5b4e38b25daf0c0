"""Backbones: one :class:`Backbone` interface over timm, Hugging Face and built-in offline models.

Spec grammar accepted by :func:`load_backbone`:

* ``timm:<model name>`` (``timm:resnet50.a1_in1k``, ``timm:vit_base_patch16_224``);
* ``hf:<hub id or local path>`` (BERT-like text encoders, decoder-only LLMs such as GPT-2/Llama/Qwen2, ViT-family
  vision encoders);
* a built-in short name from :data:`BUILTIN_BACKBONES` (``minilm-l6``, ``efficientnet-lite0``).

Example::

    bb = load_backbone("timm:resnet18", pretrained=False, image_size=64)
    inputs = bb.prepare(images)          # {"x": (B, 3, 64, 64) float32}
    feats = bb.model(**inputs)           # (B, 512)
    [b.name for b in bb.blocks][:2]      # ["layer1.0", "layer1.1"]
"""

from __future__ import annotations

from nc_finetune.backbones.base import POOLING_CHOICES, Backbone, BlockInfo, check_pooling, pool_output
from nc_finetune.backbones.builtin import BUILTIN_BACKBONES, load_builtin
from nc_finetune.errors import ConfigError

__all__ = [
    "BUILTIN_BACKBONES",
    "POOLING_CHOICES",
    "SPEC_PREFIXES",
    "Backbone",
    "BlockInfo",
    "load_backbone",
    "parse_spec",
    "pool_output",
]

#: Spec prefixes and what follows them.
SPEC_PREFIXES: dict[str, str] = {"timm": "<timm model name>", "hf": "<hub id or local path>"}


def _allowed_forms() -> str:
    forms = ", ".join(f"{p}:{what}" for p, what in SPEC_PREFIXES.items())
    return f"{forms}, or a built-in name ({', '.join(BUILTIN_BACKBONES)})"


def parse_spec(spec: str) -> tuple[str, str]:
    """Split a backbone spec into ``(family, reference)``.

    Args:
        spec: ``timm:<name>``, ``hf:<id or path>`` or a built-in name.

    Returns:
        ``("timm", name)``, ``("hf", id_or_path)`` or ``("builtin", name)``.

    Raises:
        ConfigError: Unknown prefix or built-in name, or an empty reference; the message lists the allowed forms.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"backbone spec must be a non-empty string; allowed: {_allowed_forms()}")
    text = spec.strip()
    if ":" in text:
        prefix, ref = text.split(":", 1)
        if prefix not in SPEC_PREFIXES:
            raise ConfigError(f"unknown backbone prefix {prefix!r} in {spec!r}; allowed: {_allowed_forms()}")
        if not ref.strip():
            raise ConfigError(f"backbone spec {spec!r} names no model; allowed: {_allowed_forms()}")
        return prefix, ref.strip()
    if text in BUILTIN_BACKBONES:
        return "builtin", text
    raise ConfigError(f"unknown backbone {spec!r}; allowed: {_allowed_forms()}")


def load_backbone(
    spec: str,
    *,
    pooling: str = "auto",
    image_size: int | None = None,
    max_length: int = 128,
    pretrained: bool = True,
    cache_dir: str | None = None,
) -> Backbone:
    """Load a backbone by spec; the model comes back on CPU, float32, in eval mode.

    Randomly initialised models (``pretrained=False``) are deterministic under ``torch.manual_seed``.

    Args:
        spec: See :func:`parse_spec`.
        pooling: ``"auto"`` (the model's own), ``"cls"``, ``"mean"`` or ``"last"`` (last real token) for token outputs.
        image_size: Square input resolution of image backbones (default: the model's).
        max_length: Truncation length of text backbones (clamped to the model's limit).
        pretrained: Load pretrained weights.
        cache_dir: Hub cache (timm/hf) or converted-weights cache (built-ins).

    Raises:
        ConfigError: Bad spec, pooling or model family.
        UserError: Weights that cannot be found, fail their checksum, or need a missing offline package.
    """
    check_pooling(pooling)
    family, ref = parse_spec(spec)
    if family == "timm":
        from nc_finetune.backbones.timm_backbone import load_timm_backbone

        return load_timm_backbone(
            ref, spec=spec, pooling=pooling, image_size=image_size, pretrained=pretrained, cache_dir=cache_dir
        )
    if family == "hf":
        from nc_finetune.backbones.hf_backbone import load_hf_backbone

        return load_hf_backbone(
            ref,
            spec=spec,
            pooling=pooling,
            image_size=image_size,
            max_length=max_length,
            pretrained=pretrained,
            cache_dir=cache_dir,
        )
    return load_builtin(
        ref, pooling=pooling, image_size=image_size, max_length=max_length, pretrained=pretrained, cache_dir=cache_dir
    )
