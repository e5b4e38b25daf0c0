"""Training checkpoints: trainable weights (safetensors), optimizer, scheduler, RNG and data position.

A checkpoint is a directory written next to its final place and renamed over it, so a kill at any moment leaves
either the previous complete checkpoint or the new complete one. Everything is loaded with safetensors or
``torch.load(weights_only=True)``; nothing is unpickled.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nc_finetune.errors import UserError

WEIGHTS = "trainable.safetensors"
STATE = "trainer_state.pt"
META = "position.json"


def rng_state() -> dict[str, Any]:
    """Every RNG the loop touches (python, numpy, torch CPU and CUDA)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, weights: dict[str, torch.Tensor], optimizer: dict, scheduler: dict,
                    position: dict[str, Any]) -> None:
    """Write a checkpoint directory atomically (temp dir + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    torch.save({"optimizer": optimizer, "scheduler": scheduler, "rng": rng_state()}, tmp / STATE)
    (tmp / META).write_text(json.dumps(position, indent=2))
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def save_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    """Trainable weights only (e.g. the best model under early stopping), atomically."""
    from nc_finetune.utils.io import atomic_write

    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp))


def has_checkpoint(path: Path) -> bool:
    """Whether :func:`load_checkpoint` finds a complete checkpoint at ``path`` (or its ``.old`` predecessor)."""
    path = Path(path)
    return (path / META).is_file() or (path.with_name(path.name + ".old") / META).is_file()


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Load (weights, trainer state, position) from a checkpoint directory.

    Raises:
        UserError: the checkpoint is missing or incomplete.
    """
    path = Path(path)
    if not (path / META).is_file():
        old = path.with_name(path.name + ".old")
        if (old / META).is_file():  # killed between the two renames: the previous checkpoint is complete
            path = old
        else:
            raise UserError(f"no checkpoint to resume from in {path.parent}")
    weights = load_file(str(path / WEIGHTS))
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    position = json.loads((path / META).read_text())
    return weights, state, position
