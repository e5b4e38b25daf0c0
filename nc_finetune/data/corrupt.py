"""Input-level distribution shift: common image corruptions applied to a dataset's images.

An input-level shift changes what the images look like but not what they mean, the setting in which surgical
fine-tuning (Lee et al., ICLR 2023) found the *first* blocks the best ones to tune. These corruptions let a recipe
build such a target domain from any image dataset (``data.corruption``, ``data.corruption_severity``).

The corruptions and their five severities follow the CIFAR-10-C recipe of Hendrycks & Dietterich (ICLR 2019),
which was made for small (32 px) images like the built-in datasets here; ``invert`` (a photographic negative) is an
extra, severity-free shift. They act on the stored uint8 images at their native resolution, before any resizing.
Every image gets its own random stream, ``numpy.random.default_rng([seed, stream, position])`` (``stream`` 0 for
the training split, 1 for the test split), so a corrupted dataset is the same on every run and every process, and
the two splits never share a noise pattern.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from nc_finetune.errors import ConfigError, DataError

SEVERITIES = (1, 2, 3, 4, 5)

# Per-corruption parameter for severities 1..5 (CIFAR-10-C), or None when severity does not apply.
_PARAMS: dict[str, tuple[float, ...] | None] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of additive noise on [0, 1]
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity (Poisson)
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # share of salt-and-pepper pixels
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # blur sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor around the image mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value (intensity for gray images)
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # down-scale factor before box up-scaling
    "invert": None,
}

#: Corruption name -> one-line description.
CORRUPTIONS: dict[str, str] = {
    "gaussian_noise": "additive Gaussian noise",
    "shot_noise": "Poisson (shot) noise",
    "impulse_noise": "salt-and-pepper noise",
    "gaussian_blur": "Gaussian blur",
    "contrast": "reduced contrast",
    "brightness": "increased brightness",
    "pixelate": "down-sampled then up-sampled (blocky)",
    "invert": "photographic negative (255 - x); severity ignored",
}


def check_corruption(name: str | None, severity: int) -> None:
    """Validate ``data.corruption`` and ``data.corruption_severity``.

    Raises:
        ConfigError: Unknown corruption or a severity outside 1..5; the message names the key and allowed values.
    """
    if name is None:
        return
    if name not in CORRUPTIONS:
        raise ConfigError(f"data.corruption must be one of {', '.join(CORRUPTIONS)} or null; got {name!r}")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ConfigError(f"data.corruption_severity must be one of 1, 2, 3, 4, 5; got {severity!r}")


def corrupt_image(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Corrupt one uint8 image.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` uint8.
        name: A key of :data:`CORRUPTIONS`.
        severity: 1..5.
        rng: The image's random stream (used by the noise corruptions).

    Returns:
        The corrupted image, same shape, uint8.
    """
    check_corruption(name, severity)
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise DataError(f"corruption {name!r} expects a uint8 (H, W) or (H, W, C) image; got {img.dtype} "
                        f"with shape {img.shape}")
    params = _PARAMS[name]
    c = params[severity - 1] if params is not None else None
    x = img.astype(np.float64) / 255.0  # (H, W[, C]) in [0, 1]
    out = _FUNCS[name](x, c, rng)
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(scale=c, size=x.shape)


def _shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(x * c) / c


def _impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    out = x.copy()
    hit = rng.random(x.shape) < c  # a share c of the values is replaced ...
    salt = rng.random(x.shape) < 0.5  # ... half by 1 (salt), half by 0 (pepper)
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


def _gaussian_blur(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    sigma = (c, c) if x.ndim == 2 else (c, c, 0.0)  # blur space, never across channels
    return gaussian_filter(x, sigma=sigma, mode="nearest")


def _contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    mean = x.mean(axis=(0, 1), keepdims=True)
    return (x - mean) * c + mean


def _brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    if x.ndim == 2 or x.shape[2] != 3:
        return x + c  # gray: HSV value = intensity
    # RGB: CIFAR-10-C adds c to the HSV value V = max(R, G, B) with hue and saturation kept, which scales the
    # pixel by V' / V (a black pixel, S = 0, becomes gray V' = c).
    v = x.max(axis=2, keepdims=True)  # (H, W, 1)
    v_new = np.minimum(v + c, 1.0)
    return np.where(v > 0, x * (v_new / np.where(v > 0, v, 1.0)), v_new)


def _pixelate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    h, w = x.shape[:2]
    small = (max(1, int(w * c)), max(1, int(h * c)))
    u8 = (x * 255.0 + 0.5).astype(np.uint8)
    pil = Image.fromarray(u8 if u8.ndim == 2 or u8.shape[2] != 1 else u8[:, :, 0])
    out = np.asarray(pil.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX), np.float64)
    return out.reshape(x.shape) / 255.0


def _invert(x: np.ndarray, c: None, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - x


_FUNCS: dict[str, Callable[[np.ndarray, Any, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "pixelate": _pixelate,
    "invert": _invert,
}


def image_rng(seed: int, stream: int, position: int) -> np.random.Generator:
    """The random stream of the image at ``position`` of a corrupted split."""
    return np.random.default_rng([int(seed), int(stream), int(position)])


class CorruptedImages(Sequence):
    """A lazy view that corrupts each image on access (for image columns too large to corrupt up front).

    Args:
        images: A sequence of uint8 images (for example a :class:`~nc_finetune.data.hf.LazyImageColumn`).
        name: Corruption.
        severity: 1..5.
        seed: Seed of the per-image streams.
        stream: Stream of this split (0 train, 1 test).
        positions: Stream position of each item (default ``0..N-1``); kept through :meth:`select`, so a subset
            shows exactly the pixels the full split shows.
    """

    def __init__(self, images: Sequence[Any], name: str, severity: int, seed: int, stream: int = 0,
                 positions: np.ndarray | None = None) -> None:
        check_corruption(name, severity)
        self.images, self.name, self.severity, self.seed, self.stream = images, name, severity, seed, stream
        self.positions = np.arange(len(images), dtype=np.int64) if positions is None else positions

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, (int, np.integer)):
            i = int(index) + (len(self) if int(index) < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"image index {index} out of range for {len(self)} images")
            rng = image_rng(self.seed, self.stream, int(self.positions[i]))
            return corrupt_image(np.asarray(self.images[i]), self.name, self.severity, rng)
        idx = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        return [self[int(i)] for i in idx.reshape(-1)]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def select(self, indices: np.ndarray | Sequence[int]) -> CorruptedImages:
        """A lazy view of the images at ``indices`` (same pixels as in this view)."""
        idx = np.asarray(indices, dtype=np.int64)
        inner = self.images.select(idx) if hasattr(self.images, "select") else [self.images[int(i)] for i in idx]
        return CorruptedImages(inner, self.name, self.severity, self.seed, self.stream, self.positions[idx])


def corrupt_split_inputs(inputs: Sequence[Any], name: str, severity: int, seed: int,
                         stream: int = 0) -> Sequence[Any]:
    """Corrupt a split's images: eagerly for a stacked uint8 array, lazily for anything else.

    Args:
        inputs: ``(N, H, W[, C])`` uint8 array, or a sequence of images.
        name: Corruption.
        severity: 1..5.
        seed: Seed of the per-image streams (image ``i`` uses ``[seed, stream, i]``).
        stream: 0 for a training split, 1 for a test split.

    Returns:
        A new uint8 array of the same shape, or a :class:`CorruptedImages` view.
    """
    check_corruption(name, severity)
    if isinstance(inputs, np.ndarray):
        out = np.empty_like(inputs)  # (N, H, W[, C]) uint8
        for i in range(len(inputs)):
            out[i] = corrupt_image(inputs[i], name, severity, image_rng(seed, stream, i))
        return out
    return CorruptedImages(inputs, name, severity, seed, stream)
