"""Provenance and device helpers."""

from __future__ import annotations

import importlib.metadata
import platform
import random

import numpy as np
import torch

_PACKAGES = ("torch", "timm", "transformers", "peft", "datasets", "accelerate", "numpy", "nc-finetune")


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour a result depends on."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to :class:`torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Call before building any module or adapter."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
