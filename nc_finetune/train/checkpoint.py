"""Training checkpoints: trainable weights (safetensors), optimizer, scheduler, RNG and data position.

A checkpoint is a directory written next to its final place and renamed over it, so a kill at any moment leaves
either the previous complete checkpoint or the new complete one. The previous one is renamed away before it is
deleted, so a kill during the deletion leaves a ``checkpoint.trash`` that is never read. Loading checks every file of
``checkpoint/`` and falls back to an intact ``checkpoint.old/`` (the previous one, left by a kill between the two
renames, or kept by hand) when ``checkpoint/`` is missing or damaged. Everything is loaded with safetensors or
``torch.load(weights_only=True)``; nothing is unpickled.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from nc_finetune.errors import UserError
from nc_finetune.utils.io import load_safetensors, load_torch_state, read_json, write_failure

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
    tmp, old, trash = (path.with_name(path.name + suffix) for suffix in (".tmp", ".old", ".trash"))
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(trash, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
        torch.save({"optimizer": optimizer, "scheduler": scheduler, "rng": rng_state()}, tmp / STATE)
        (tmp / META).write_text(json.dumps(position, indent=2))
    except Exception as e:
        failure = write_failure(tmp, e)  # before the cleanup frees the space
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            raise
        keeps = f"{path.name}/ keeps the previous checkpoint" if path.exists() else "no checkpoint was written yet"
        raise UserError(f"{failure}; {keeps}") from None
    if path.exists():
        _discard(old, trash)
        path.rename(old)
    tmp.rename(path)
    _discard(old, trash)


def _discard(directory: Path, trash: Path) -> None:
    """Delete ``directory`` by renaming it to ``trash`` first: a half-deleted copy never keeps a trusted name."""
    if directory.exists():
        shutil.rmtree(trash, ignore_errors=True)
        directory.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    """Trainable weights only (e.g. the best model under early stopping), atomically."""
    from nc_finetune.utils.io import atomic_write

    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp))


def has_checkpoint(path: Path) -> bool:
    """Whether a checkpoint was written at ``path`` (or its ``.old`` predecessor survives): :func:`load_checkpoint`
    then resumes from it, or says why it cannot."""
    path = Path(path)
    return path.is_dir() or path.with_name(path.name + ".old").is_dir()


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Load (weights, trainer state, position) from a checkpoint directory, or from its intact ``.old`` predecessor
    when the directory is missing or damaged (a warning says so).

    Raises:
        UserError: neither holds a complete, readable checkpoint (names the damaged file).
    """
    path = Path(path)
    old = path.with_name(path.name + ".old")
    try:
        return _load_complete(path)
    except UserError as damage:
        if not old.is_dir():
            if not path.exists():
                raise UserError(f"no checkpoint to resume from in {path.parent}") from None
            raise UserError(f"cannot resume: {damage}; no {old.name}/ to fall back to (delete {path} to train "
                            "again from step 0)") from None
        try:
            loaded = _load_complete(old)
        except UserError as old_damage:
            raise UserError(f"cannot resume: {damage}, and {old_damage}") from None
        if path.exists():  # killed between the two renames leaves no checkpoint/: nothing to warn about
            warnings.warn(f"resuming from {old} ({damage})", RuntimeWarning, stacklevel=2)
        return loaded


def _load_complete(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """The three parts of one checkpoint directory; UserError naming the first missing or damaged file."""
    weights = load_safetensors(path / WEIGHTS)
    state = load_torch_state(path / STATE)
    position = read_json(path / META)
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng"} <= set(state):
        raise UserError(f"{path / STATE} is damaged: not a trainer state written by nc-finetune")
    if not isinstance(position, dict) or not {"epoch", "micro", "step"} <= set(position):
        raise UserError(f"{path / META} is damaged: not a position written by nc-finetune")
    return weights, state, position
