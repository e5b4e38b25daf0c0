"""Provenance and device helpers."""

from __future__ import annotations

import importlib.metadata
import platform
import random

import numpy as np
import torch

from nc_finetune.errors import ConfigError

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


def resolve_device(device: str, key: str = "device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is checked by :func:`check_device` and passed to
    :class:`torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device, key)
    return torch.device(device)


def check_device(device: str, key: str = "device") -> None:
    """Refuse a device that this machine does not have (``cuda:7`` on a machine with one GPU).

    Args:
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (the recipe schema checks the form).
        key: Recipe key named in the message.

    Raises:
        ConfigError: CUDA or MPS requested but not available, or a CUDA index beyond the visible devices.
    """
    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}={device} but CUDA is not available on this machine; use auto or cpu")
        if index and int(index) >= count:
            raise ConfigError(f"{key}={device} does not exist: this machine has {count} CUDA device(s), "
                              f"cuda:0..cuda:{count - 1}")
    elif kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{key}=mps but MPS is not available on this machine; use auto or cpu")


def check_recipe_devices(recipe) -> None:
    """:func:`check_device` for ``probe.device`` and ``train.device``: called when a command starts, before any
    model or data loads."""
    check_device(recipe.probe.device, "probe.device")
    check_device(recipe.train.device, "train.device")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Call before building any module or adapter."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
