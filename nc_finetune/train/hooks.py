"""Training hooks: how an adapt mode that changes its optimiser during training plugs into the trainer.

Most adapt modes train a fixed set of parameters with one AdamW; two do not. ``auto_rgn`` (surgical fine-tuning)
re-measures a learning rate per tensor and restarts Adam at every epoch; ``lisa`` redraws the trainable blocks every
few steps. Each is a :class:`TrainHook` in its own module; :func:`make_train_hook` picks the one for an
:class:`~nc_finetune.adapt.AdaptedModel`, and the trainer calls it at three points: to build the optimiser, at the
start of every epoch, and after every optimiser step. A hook keeps what it must report in ``pos["hook"]`` (saved in
every checkpoint), so a resumed run reports the same as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from nc_finetune.config import TrainConfig


@dataclass
class HookContext:
    """What a hook may touch.

    Attributes:
        model: The unwrapped model (no DDP wrapper).
        optimizer: The torch optimiser (not accelerate's wrapper).
        scheduler: The ``LambdaLR`` that scales every group's ``initial_lr`` by the warmup/cosine factor.
        accelerator: The trainer's ``accelerate.Accelerator`` (device, autocast, reductions).
        batch: Index array -> ``(inputs, labels)`` of the training split, without augmentation.
        cfg: Training configuration.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    accelerator: Any
    batch: Callable[[np.ndarray], tuple[dict[str, torch.Tensor], torch.Tensor]]
    cfg: TrainConfig


class TrainHook:
    """No-op base: override what the adapt mode needs."""

    def make_optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        """The optimiser; its parameter groups must not depend on the training state (resume reloads into them)."""
        from nc_finetune.train.loop import make_optimizer

        return make_optimizer(model, cfg)

    def on_fit_start(self, ctx: HookContext, pos: dict[str, Any]) -> None:
        """After the optimiser (and a resumed checkpoint) is loaded, before the first step."""

    def on_epoch_start(self, ctx: HookContext, epoch: int, batches: list[np.ndarray], pos: dict[str, Any]) -> None:
        """At the start of a fresh epoch (not when resuming in the middle of one)."""

    def on_step_end(self, ctx: HookContext, pos: dict[str, Any]) -> None:
        """After every optimiser step (``pos["step"]`` already counts it)."""


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Forget every moment estimate and step count: the optimiser continues as if it had just been created."""
    optimizer.state.clear()


def set_group_lr(ctx: HookContext, group_index: int, base_lr: float) -> None:
    """Give one parameter group a new base learning rate, keeping the warmup/cosine factor of the current step.

    The base lives in the group (``initial_lr``) and in the scheduler (``base_lrs``); both are checkpointed, so a run
    resumed mid-epoch continues with the rates set at the start of that epoch.
    """
    sched = ctx.scheduler
    group = ctx.optimizer.param_groups[group_index]
    group["initial_lr"] = base_lr
    sched.base_lrs[group_index] = base_lr
    group["lr"] = base_lr * sched.lr_lambdas[group_index](sched.last_epoch)


def make_train_hook(adapted) -> TrainHook | None:
    """The hook of an adapt mode (``None`` for modes that train a fixed set with the default optimiser)."""
    if adapted.method == "auto_rgn":
        from nc_finetune.train.auto_rgn import AutoRGNHook

        return AutoRGNHook(num_batches=int(adapted.info.get("rgn_batches", 5)))
    if adapted.method == "lisa":
        from nc_finetune.train.lisa import LisaHook

        return LisaHook.from_adapted(adapted)
    return None
