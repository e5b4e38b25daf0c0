"""Checkpoints: a damaged or half-deleted checkpoint is never trusted; an intact predecessor is used instead."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from nc_finetune.errors import UserError
from nc_finetune.train import checkpoint as ckpt
from nc_finetune.train.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint


def _save(path: Path, step: int) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(path, {"w": torch.full((2, 3), float(step))}, opt.state_dict(), sched.state_dict(),
                    {"epoch": 0, "micro": step, "step": step})


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", [ckpt.WEIGHTS, ckpt.STATE, ckpt.META])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, name) -> None:
    path = tmp_path / "checkpoint"
    _save(path, 3)
    _cut(path / name)
    assert has_checkpoint(path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert f"{path / name} is damaged" in msg and "no checkpoint.old/ to fall back to" in msg and "\n" not in msg


def test_a_missing_file_is_refused_too(tmp_path) -> None:
    path = tmp_path / "checkpoint"
    _save(path, 3)
    (path / ckpt.WEIGHTS).unlink()
    with pytest.raises(UserError, match=r"trainable.safetensors is missing"):
        load_checkpoint(path)


def test_resume_falls_back_to_an_intact_old_checkpoint(tmp_path) -> None:
    path = tmp_path / "checkpoint"
    _save(path, 2)
    shutil.copytree(path, tmp_path / "kept")
    _save(path, 4)
    (tmp_path / "kept").rename(tmp_path / "checkpoint.old")  # e.g. kept by hand before the disk filled up
    _cut(path / ckpt.STATE)
    with pytest.warns(RuntimeWarning, match=r"resuming from .*checkpoint.old .*trainer_state.pt is damaged"):
        weights, _state, position = load_checkpoint(path)
    assert position["step"] == 2 and float(weights["w"][0, 0]) == 2.0
    _cut(tmp_path / "checkpoint.old" / ckpt.WEIGHTS)
    with pytest.raises(UserError, match=r"trainer_state.pt is damaged.*, and .*checkpoint.old/trainable"):
        load_checkpoint(path)


def test_a_kill_during_the_cleanup_leaves_no_trusted_half_copy(tmp_path, monkeypatch) -> None:
    """The replaced checkpoint is renamed to checkpoint.trash before it is deleted: a kill in the middle of the
    deletion leaves nothing under a name that resume reads."""
    path = tmp_path / "checkpoint"
    _save(path, 2)
    real_rmtree = shutil.rmtree

    def killed_midway(target, *args, **kwargs):
        target = Path(target)
        if target.name == "checkpoint.trash" and target.is_dir():
            next(target.iterdir()).unlink()  # one file gone, then the kill
            raise KeyboardInterrupt
        return real_rmtree(target, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        _save(path, 4)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert not (tmp_path / "checkpoint.old").exists() and (tmp_path / "checkpoint.trash").is_dir()
    _weights, _state, position = load_checkpoint(path)
    assert position["step"] == 4
    _save(path, 6)  # the next checkpoint clears the leftover
    assert not (tmp_path / "checkpoint.trash").exists() and load_checkpoint(path)[2]["step"] == 6


def test_killed_between_the_renames_resumes_from_old(tmp_path) -> None:
    path = tmp_path / "checkpoint"
    _save(path, 2)
    path.rename(tmp_path / "checkpoint.old")  # the moment between `path -> old` and `tmp -> path`
    assert has_checkpoint(path)
    assert load_checkpoint(path)[2]["step"] == 2
