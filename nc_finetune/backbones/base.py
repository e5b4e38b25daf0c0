"""The family-independent backbone interface: :class:`BlockInfo`, :class:`Backbone` and token/feature-map pooling.

Every family (timm, Hugging Face, built-in offline assets) is loaded into the same :class:`Backbone`, so the probe
runner, the block selection and the trainer never branch on where a model came from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from nc_finetune.errors import ConfigError

#: Values accepted by ``load_backbone(pooling=...)``; "auto" resolves per family to one of the others.
POOLING_CHOICES: tuple[str, ...] = ("auto", "cls", "mean", "last")

Modality = Literal["image", "text"]


@dataclass(frozen=True)
class BlockInfo:
    """One tunable block of a backbone.

    Attributes:
        index: Position in forward order, ``0..L-1``.
        name: Fully qualified module name inside :attr:`Backbone.model` (``model.get_submodule(name)`` resolves it).
        num_params: Number of parameter elements (not buffers) of the block, shared parameters counted once.
    """

    index: int
    name: str
    num_params: int


class Preprocessor(Protocol):
    """Turns a raw batch into the keyword inputs of :attr:`Backbone.model`."""

    def __call__(self, raw: Sequence[Any], train: bool = False) -> dict[str, Tensor]: ...


@dataclass(eq=False)
class Backbone:
    """A feature extractor with an ordered list of blocks, shared by all model families.

    Attributes:
        spec: What the user asked for, e.g. ``"timm:resnet18"``, ``"hf:bert-base-uncased"``, ``"minilm-l6"``.
        model: ``model(**prepare(raw))`` returns the pooled features ``(B, feature_dim)`` that a classifier head
            consumes. Returned in eval mode, on CPU, float32.
        modality: ``"image"`` or ``"text"``.
        blocks: Every block in forward order.
        feature_dim: Width of the final feature.
        pooling: Resolved pooling of token outputs, ``"cls"``, ``"mean"`` or ``"last"`` (feature maps are always
            averaged).
        final_tap: Module name (``""`` = the root of :attr:`model`) whose pooled output is the final feature, when it
            differs from the last block's pooled output; ``None`` when the last block already gives the final feature.
        preprocess: Callable behind :meth:`prepare`.
        num_prefix_tokens: Leading non-content tokens of token outputs (CLS, distillation, registers); mean pooling
            skips them for vision transformers. 0 for text, whose mean pooling is attention-mask based.
        channels_last: Whether 4-D block outputs are ``(B, H, W, C)`` (e.g. timm Swin) instead of ``(B, C, H, W)``.
        family: ``"timm"``, ``"hf"`` or ``"builtin"``.
        provenance: Where the weights came from (source path/id, sha256, ...), for run manifests.
        plain_prefix: Attribute path, with a trailing dot, of the library's own model inside :attr:`model` (``"hf."``
            for Hugging Face models wrapped to pool their output; ``""`` when :attr:`model` is the library's model).
        grad_checkpointing: Turns activation checkpointing of the blocks on or off with the family's own API
            (``None``: not supported); use :meth:`set_grad_checkpointing`.
    """

    spec: str
    model: nn.Module
    modality: Modality
    blocks: list[BlockInfo]
    feature_dim: int
    pooling: str
    final_tap: str | None
    preprocess: Preprocessor
    num_prefix_tokens: int = 0
    channels_last: bool = False
    family: str = ""
    provenance: dict[str, str] = field(default_factory=dict)
    plain_prefix: str = ""

    def plain_model(self) -> nn.Module:
        """The library's own model (``transformers`` ``AutoModel``, timm model), without nc-finetune's wrapper."""
        return self.model.get_submodule(self.plain_prefix.rstrip("."))
    grad_checkpointing: Callable[[bool], None] | None = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations during backward (less memory) through the family's own switch.

        Raises:
            ConfigError: the backbone has no gradient checkpointing.
        """
        if self.grad_checkpointing is None:
            raise ConfigError(f"{self.spec} does not support gradient checkpointing; set "
                              "train.gradient_checkpointing=false")
        self.grad_checkpointing(enable)

    def prepare(self, raw: Sequence[Any], train: bool = False) -> dict[str, Tensor]:
        """Turn a raw batch into model inputs on CPU.

        Args:
            raw: Images (HxW / HxWxC uint8 arrays, PIL images, or one stacked uint8 array) or a list of strings.
            train: Add cheap augmentation (random horizontal flip for images; seeded by torch's global RNG).

        Returns:
            Keyword inputs for :attr:`model`: ``{"x": ...}`` / ``{"pixel_values": ...}`` for images, tokenizer
            output (``input_ids``, ``attention_mask``, ...) for text.
        """
        return self.preprocess(raw, train=train)

    def collate(self, raw: Sequence[Any]) -> dict[str, Tensor]:
        """The CPU half of :meth:`prepare`, for the loader / prefetch thread: images become one ``(B, C, H, W)``
        uint8 tensor, texts are tokenised. Deterministic (no random draws), so it may run in a background thread.

        ``finish(collate(raw), train)`` equals ``prepare(raw, train)``; a preprocessor without the two halves does
        all its work here.
        """
        collate = getattr(self.preprocess, "collate", None)
        return collate(raw) if collate is not None else self.preprocess(raw)

    def finish(self, batch: dict[str, Tensor], train: bool = False) -> dict[str, Tensor]:
        """The device half of :meth:`prepare`, run where ``batch`` is (the model's device): resize, normalise and
        the random flip of ``train`` for images (its draws come from torch's global CPU RNG, in this thread);
        nothing for text."""
        finish = getattr(self.preprocess, "finish", None)
        return finish(batch, train=train) if finish is not None else batch

    def prepare_on(self, raw: Sequence[Any], device: Any, train: bool = False) -> dict[str, Tensor]:
        """:meth:`prepare` with its device half on ``device``: collate on the CPU, move the small uint8 batch (or
        token ids), then resize and normalise there (what a probe, train or select loop without a prefetch thread
        should call)."""
        batch = {k: v.to(device) for k, v in self.collate(raw).items()}
        return self.finish(batch, train=train)

    def pool(self, output: Any, inputs: Mapping[str, Tensor]) -> Tensor:
        """Pool any block's raw forward output to one float32 vector per sample.

        Args:
            output: The block's forward output (tensor, or tuple/ModelOutput whose first element is the hidden state).
            inputs: The model inputs of the batch; ``inputs["attention_mask"]`` drives mask-aware mean pooling.

        Returns:
            ``(B, D)`` float32.
        """
        return pool_output(
            output,
            pooling=self.pooling,
            attention_mask=inputs.get("attention_mask"),
            num_prefix_tokens=self.num_prefix_tokens,
            channels_last=self.channels_last,
        )

    def block_modules(self) -> list[tuple[BlockInfo, nn.Module]]:
        """Return ``(info, module)`` for every block, in forward order."""
        return [(info, self.model.get_submodule(info.name)) for info in self.blocks]

    def final_module(self) -> nn.Module:
        """Return the module whose pooled output is the final feature (the last block when ``final_tap`` is None)."""
        name = self.blocks[-1].name if self.final_tap is None else self.final_tap
        return self.model.get_submodule(name)

    def num_params(self, trainable_only: bool = False) -> int:
        """Count parameter elements of :attr:`model` (buffers excluded, shared parameters once).

        Args:
            trainable_only: Count only parameters with ``requires_grad``.
        """
        return count_params(self.model, trainable_only=trainable_only)

    def __repr__(self) -> str:
        return (
            f"Backbone(spec={self.spec!r}, modality={self.modality!r}, blocks={len(self.blocks)}, "
            f"feature_dim={self.feature_dim}, pooling={self.pooling!r}, final_tap={self.final_tap!r})"
        )


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``module``; ``parameters()`` already de-duplicates shared tensors."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def make_block_infos(model: nn.Module, names: Sequence[str]) -> list[BlockInfo]:
    """Build :class:`BlockInfo` entries for module ``names`` (already in forward order)."""
    return [BlockInfo(i, name, count_params(model.get_submodule(name))) for i, name in enumerate(names)]


def check_pooling(pooling: str) -> str:
    """Validate a user-facing pooling value."""
    if pooling not in POOLING_CHOICES:
        raise ConfigError(f"unknown pooling {pooling!r}; allowed: {', '.join(POOLING_CHOICES)}")
    return pooling


def first_tensor(output: Any) -> Tensor:
    """Extract the hidden state from a module output (HF layers may return tuples or ModelOutputs)."""
    while not isinstance(output, Tensor):
        if isinstance(output, (tuple, list)) and output:
            output = output[0]
        elif hasattr(output, "to_tuple"):  # transformers ModelOutput
            output = output.to_tuple()[0]
        elif isinstance(output, Mapping) and output:
            output = next(iter(output.values()))
        else:
            raise TypeError(f"cannot pool a block output of type {type(output).__name__}")
    return output


def pool_tokens(
    tokens: Tensor, pooling: str, attention_mask: Tensor | None = None, num_prefix_tokens: int = 0
) -> Tensor:
    """Pool a token sequence ``(B, N, D)`` to ``(B, D)``.

    Args:
        tokens: Hidden states ``(B, N, D)``.
        pooling: ``"cls"`` (token 0), ``"mean"`` or ``"last"`` (the last real token: what a decoder-only model's
            next-token head reads).
        attention_mask: ``(B, N)``; when given, the mean runs over non-pad tokens only (sentence-transformers style)
            and "last" picks the last position whose mask is 1, so right padding (the last non-pad token) and left
            padding (index -1) both pick the last real token.
        num_prefix_tokens: Leading tokens the unmasked mean skips (CLS/register tokens of vision transformers).
    """
    if pooling == "cls":
        return tokens[:, 0]
    if pooling not in ("mean", "last"):
        raise ConfigError(f"unknown pooling {pooling!r}; allowed: cls, mean, last")
    masked = attention_mask is not None and attention_mask.shape == tokens.shape[:2]
    if pooling == "last":
        if not masked:
            return tokens[:, -1]
        positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)  # (N,), 1-based so pads (0) lose
        last = ((attention_mask > 0).long() * positions).argmax(1)  # (B,)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]
    if masked:
        keep = (attention_mask > 0).unsqueeze(-1)  # (B, N, 1)
        # masked_fill, not a product: a pad position may hold NaN (a fully masked attention row), and NaN * 0 = NaN
        total = tokens.masked_fill(~keep, 0.0).sum(1)  # (B, D)
        # clamp: an all-pad row (should not happen) gives zeros instead of NaN
        return total / keep.sum(1).to(tokens.dtype).clamp_min(1e-9)
    return tokens[:, num_prefix_tokens:].mean(1)


def pool_output(
    output: Any,
    pooling: str,
    attention_mask: Tensor | None = None,
    num_prefix_tokens: int = 0,
    channels_last: bool = False,
) -> Tensor:
    """Pool any block output to ``(B, D)`` float32 (see :meth:`Backbone.pool`)."""
    x = first_tensor(output).float()  # float32 so bf16/fp16 autocast taps still accumulate well
    if x.ndim == 4:  # feature map: global average pool
        return x.mean((1, 2)) if channels_last else x.mean((2, 3))
    if x.ndim == 3:  # tokens
        return pool_tokens(x, pooling, attention_mask, num_prefix_tokens)
    if x.ndim == 2:
        return x
    raise ValueError(f"cannot pool a block output with shape {tuple(x.shape)}; expected 2-D, 3-D or 4-D")


def first_line(exc: BaseException) -> str:
    """First line of an exception message (library errors can span many lines), or its type name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def finalize_model(model: nn.Module) -> nn.Module:
    """Return ``model`` on CPU, float32, in eval mode (the state every loader hands out).

    A model built under ``torch.device("meta")`` (structure only, e.g. to list its blocks without reading or
    initialising weights) stays on the meta device.
    """
    if any(p.is_meta for p in model.parameters()):
        return model.to(dtype=torch.float32).eval()
    return model.to(device="cpu", dtype=torch.float32).eval()
