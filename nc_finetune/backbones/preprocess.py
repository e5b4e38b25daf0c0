"""Raw batch -> model inputs: batched image preprocessing in torch and a thin tokenizer wrapper.

Images are resized straight to the model resolution (no resize-then-centre-crop as in timm's eval transform): the
downstream sets this toolkit targets (Fashion-MNIST, digits, ...) are small, centred images where cropping would only
cut content.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nc_finetune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

#: Normalisation used when a Hugging Face vision checkpoint ships no image-processor config (the ViT default).
DEFAULT_HF_MEAN_STD: tuple[float, float] = (0.5, 0.5)


@dataclass(frozen=True)
class ImageConfig:
    """Resolved input geometry and normalisation of an image backbone.

    Attributes:
        size: Target ``(height, width)``.
        mean: Per-channel mean (RGB) applied after scaling pixels to ``[0, 1]``.
        std: Per-channel standard deviation (RGB).
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class ImagePreprocessor:
    """Batched image preprocessing in two stages, so that the float work runs on the model's device.

    :meth:`collate` (CPU, in the loader / prefetch thread; deterministic): raw images -> one ``(B, C, H, W)`` uint8
    tensor (a quarter of the bytes of float32 to pin and copy). :meth:`finish` (on whatever device the batch is):
    uint8 -> float, bilinear resize, gray -> RGB, normalise, optional flip. ``__call__`` is ``finish(collate(raw))``
    on the CPU, the path used before the split, number for number.

    Attributes:
        config: Target size and normalisation.
        key: Name of the model's input keyword (``"x"`` for timm, ``"pixel_values"`` for Hugging Face).
    """

    config: ImageConfig
    key: str = "x"

    def __call__(self, raw: Sequence[Any], train: bool = False) -> dict[str, Tensor]:
        """Preprocess a batch of images on the CPU (:meth:`collate` then :meth:`finish`).

        Args:
            raw: A stacked uint8 array/tensor ``(B, H, W)`` or ``(B, H, W, C)``, or a sequence of images, each a uint8
                ``(H, W)`` / ``(H, W, C)`` array/tensor or a PIL image. C may be 1, 3 or 4 (alpha is dropped).
            train: Randomly flip each image horizontally (p = 0.5, torch's global RNG).

        Returns:
            ``{key: (B, 3, H', W') float32}``.
        """
        return self.finish(self.collate(raw), train=train)

    def collate(self, raw: Sequence[Any]) -> dict[str, Tensor]:
        """Raw images -> ``{key: (B, C, H, W) uint8}`` with C in (1, 3) (alpha dropped), on the CPU.

        Images of different sizes cannot share one uint8 tensor: each is converted and resized here instead, and the
        batch travels as ``(B, C, H', W')`` float32 in [0, 1] (the rare case: most datasets have one size).
        """
        groups = _uint8_batches(raw)
        if len(groups) == 1:
            x = groups[0].permute(0, 3, 1, 2)  # (B, C, H, W) uint8
            return {self.key: (x[:, :3] if x.shape[1] == 4 else x).contiguous()}
        scaled = [self._scaled(g.permute(0, 3, 1, 2)) for g in groups]
        return {self.key: torch.cat([x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x for x in scaled])}

    def finish(self, batch: dict[str, Tensor], train: bool = False) -> dict[str, Tensor]:
        """``{key: (B, C, H, W)}`` from :meth:`collate`, on any device -> ``{key: (B, 3, H', W') float32}`` there.

        Args:
            batch: Output of :meth:`collate`, possibly moved to the model's device.
            train: Randomly flip each image horizontally (p = 0.5). The draws come from torch's global CPU RNG, as
                before the split, so a seed gives the same flips on every device.
        """
        x = self._scaled(batch[self.key])
        if x.shape[1] == 1:  # resize the single channel first, then repeat: 3x less interpolation work
            x = x.expand(-1, 3, -1, -1)
        mean, std = self._stats(x)
        x = ((x - mean) / std).contiguous()
        if train:
            flip = (torch.rand(x.shape[0], device="cpu") < 0.5).to(x.device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)  # no boolean indexing: no host sync on a GPU
        return {self.key: x}

    def _scaled(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` uint8 -> float32 in [0, 1] at the target size, alpha dropped (float input: resized only)."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        if x.shape[1] == 4:
            x = x[:, :3]
        if tuple(x.shape[-2:]) != self.config.size:
            x = F.interpolate(x, size=self.config.size, mode="bilinear", align_corners=False, antialias=False)
        return x

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std as ``(1, 3, 1, 1)`` tensors on ``x``'s device and dtype (built once per device)."""
        cache = self.__dict__.setdefault("_stats_cache", {})
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (torch.tensor(self.config.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1),
                          torch.tensor(self.config.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1))
        return cache[key]


@dataclass
class TextPreprocessor:
    """Tokenizes a list of strings with padding to the longest sequence and truncation.

    Attributes:
        tokenizer: A Hugging Face tokenizer.
        max_length: Truncation length (already clamped to the model's position limit).
    """

    tokenizer: Any
    max_length: int

    def collate(self, raw: Sequence[Any]) -> dict[str, Tensor]:
        """Tokenize on the CPU (in the loader / prefetch thread): the whole preparation of text."""
        return self(raw)

    def finish(self, batch: dict[str, Tensor], train: bool = False) -> dict[str, Tensor]:
        """Nothing left to do on the device (text gets no augmentation)."""
        return batch

    def __call__(self, raw: Sequence[Any], train: bool = False) -> dict[str, Tensor]:
        """Tokenize a batch (``train`` is accepted for interface symmetry; text gets no augmentation)."""
        texts = list(raw)
        if not texts:
            raise DataError("cannot prepare an empty text batch")
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise DataError(f"text backbones take a list of str; got an item of type {type(bad).__name__}")
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return dict(enc.items())


def _uint8_batches(raw: Sequence[Any]) -> list[Tensor]:
    """Group a raw batch into as few ``(B, H, W, C)`` uint8 tensors as possible (one when all sizes agree)."""
    if isinstance(raw, (np.ndarray, Tensor)) and raw.ndim in (3, 4):  # already stacked
        t = _as_uint8_tensor(raw)
        return [t.unsqueeze(-1) if t.ndim == 3 else t]
    items = [_as_hwc(img) for img in raw]
    if not items:
        raise DataError("cannot prepare an empty image batch")
    if all(it.shape == items[0].shape for it in items):
        return [torch.stack(items)]
    return [it.unsqueeze(0) for it in items]  # mixed sizes: each is resized on its own


def _as_hwc(img: Any) -> Tensor:
    """One image -> ``(H, W, C)`` uint8 tensor."""
    if not isinstance(img, (np.ndarray, Tensor)):
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - pillow comes with torchvision
            Image = None
        if Image is not None and isinstance(img, Image.Image):
            img = np.asarray(img if img.mode in ("L", "RGB", "RGBA") else img.convert("RGB"))
        else:
            raise DataError(f"images must be uint8 numpy arrays, torch tensors or PIL images; got {type(img).__name__}")
    t = _as_uint8_tensor(img)
    if t.ndim == 2:
        return t.unsqueeze(-1)
    if t.ndim == 3 and t.shape[-1] in (1, 3, 4):
        return t
    raise DataError(f"an image must be HxW or HxWxC with C in (1, 3, 4); got shape {tuple(t.shape)}")


def _as_uint8_tensor(a: np.ndarray | Tensor) -> Tensor:
    """Wrap an array as a uint8 tensor without copying; other dtypes are rejected rather than guessed at."""
    if isinstance(a, np.ndarray):
        with warnings.catch_warnings():
            # read-only arrays (np.frombuffer, sklearn images) are fine: the tensor is never written in place
            warnings.filterwarnings("ignore", message=".*not writable.*")
            t = torch.from_numpy(np.ascontiguousarray(a))
    else:
        t = a.detach().cpu()
    if t.dtype != torch.uint8:
        raise DataError(
            f"images must be uint8 (0..255); got dtype {t.dtype}. Convert with np.clip(x, 0, 255).astype(np.uint8)"
        )
    if t.ndim == 4 and t.shape[-1] not in (1, 3, 4):
        raise DataError(f"a stacked image batch must be (B, H, W) or (B, H, W, C); got shape {tuple(t.shape)}")
    return t


def _square(image_size: int) -> tuple[int, int]:
    if image_size <= 0:
        raise ConfigError(f"image_size must be a positive number of pixels; got {image_size}")
    return (image_size, image_size)


def timm_image_config(model: nn.Module, image_size: int | None = None) -> ImageConfig:
    """Resolve input size and normalisation of a timm model from its pretrained config.

    Args:
        model: A timm model.
        image_size: Square resolution that overrides the model's default input size.
    """
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    size = _square(image_size) if image_size is not None else (int(cfg["input_size"][1]), int(cfg["input_size"][2]))
    return ImageConfig(size=size, mean=_rgb(cfg["mean"]), std=_rgb(cfg["std"]))


def hf_image_config(processor: Any | None, model_config: Any, image_size: int | None = None) -> ImageConfig:
    """Resolve input size and normalisation of a Hugging Face vision model.

    Args:
        processor: The checkpoint's ``AutoImageProcessor`` or None when it has none (ViT defaults are used).
        model_config: The model's ``PretrainedConfig`` (for ``image_size``).
        image_size: Square resolution that overrides the processor's size.
    """
    size = _square(image_size) if image_size is not None else None
    if processor is None:
        logger.warning("no image-processor config found; using image_size from the model config and mean=std=0.5")
        m, s = DEFAULT_HF_MEAN_STD
        return ImageConfig(size or _square(int(model_config.image_size)), (m, m, m), (s, s, s))
    if size is None:
        size = _hf_processor_size(processor, model_config)
    if getattr(processor, "do_normalize", True) is False:
        return ImageConfig(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return ImageConfig(size, _rgb(processor.image_mean), _rgb(processor.image_std))


def _hf_processor_size(processor: Any, model_config: Any) -> tuple[int, int]:
    """Read the target size of an image processor (``{"height", "width"}``, ``{"shortest_edge"}`` or an int)."""
    size = getattr(processor, "size", None)
    if hasattr(size, "to_dict"):  # SizeDict in recent transformers
        size = {k: v for k, v in size.to_dict().items() if v is not None}
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return (int(size["height"]), int(size["width"]))
        if "shortest_edge" in size:
            return _square(int(size["shortest_edge"]))
    if isinstance(size, int):
        return _square(size)
    return _square(int(model_config.image_size))


def _rgb(values: Any) -> tuple[float, float, float]:
    """Normalisation stats as an RGB triple (a scalar or 1-tuple is broadcast)."""
    v = [float(x) for x in (values if isinstance(values, (list, tuple)) else [values])]
    if len(v) == 1:
        v = v * 3
    if len(v) != 3:
        raise DataError(f"expected 3 per-channel normalisation values; got {v}")
    return (v[0], v[1], v[2])
