"""Auto-RGN as published: a learning rate per tensor from its relative gradient norm, re-measured every epoch.

Surgical fine-tuning (Lee et al., ICLR 2023; ``main.py::get_lr_weights`` in ``anniesch/surgical-finetuning``) does
not pick blocks: every epoch it measures, on the first few mini-batches of the training data,

    RGN(θ) = mean over the batches of ||∂CE/∂θ||_2 / ||θ||_2          for every tensor θ it tunes
    w(θ)   = RGN(θ) / max_θ' RGN(θ')                                  ∈ (0, 1]

and re-creates Adam (``weight_decay`` = ``train.weight_decay``) with learning rate ``w(θ) · train.lr`` per tensor,
so the moment estimates restart every epoch. BatchNorm runs in eval mode and its affine parameters never train.

What is tuned here: every backbone tensor that :func:`nc_finetune.select.strategies.rgn_tensors` scores (all but
normalisation parameters, names containing ``bn``, and all-zero tensors, whose RGN is undefined) plus the head.
One deliberate difference from the authors' code, where the head was the source model's trained classifier and was
weighted like any tensor: our head is new and random, with no pretrained scale for ``||θ||`` to be relative to, so
it trains at ``train.head_lr`` and is left out of the maximum. The trainer's warmup/cosine factor still multiplies
every rate (the authors used a constant rate), so all adapt modes share one schedule.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nc_finetune.adapt import eval_mode, is_head_param
from nc_finetune.config import TrainConfig
from nc_finetune.errors import UserError
from nc_finetune.train.hooks import HookContext, TrainHook, reset_optimizer_state, set_group_lr


def relative_gradient_norms(
    model: nn.Module,
    tensors: Sequence[nn.Parameter],
    batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]],
    autocast=None,
) -> tuple[torch.Tensor, int]:
    """Mean over ``batches`` of ``||∂CE/∂θ|| / ||θ||`` for each tensor, with ``model`` in eval mode.

    Gradients are taken with ``torch.autograd.grad``: no ``.grad`` is written and module modes are restored.

    Args:
        model: Classifier returning logits.
        tensors: The tensors to measure (must require grad and be non-zero).
        batches: ``(inputs, labels)`` pairs already on the model's device.
        autocast: Optional context-manager factory for the forward (e.g. ``accelerator.autocast``).

    Returns:
        ``(rgn, batches used)``; ``rgn`` is a float64 tensor (len(tensors),) on the tensors' device.
    """
    norms = torch.stack([p.detach().double().norm() for p in tensors])  # (T,)
    sums = torch.zeros_like(norms)
    used = 0
    with eval_mode(model), torch.enable_grad():
        for inputs, labels in batches:
            ctx = autocast() if autocast is not None else contextlib.nullcontext()
            with ctx:
                logits = model(**inputs)
            loss = F.cross_entropy(logits.float(), labels)
            grads = torch.autograd.grad(loss, list(tensors), allow_unused=True)
            # A tensor off this forward's path (e.g. an unused embedding row set) has zero gradient.
            gn = torch.stack([g.detach().double().norm() if g is not None else sums.new_zeros(()) for g in grads])
            sums += gn / norms
            used += 1
    return (sums / max(used, 1)), used


class AutoRGNHook(TrainHook):
    """Per-tensor learning rates re-measured at the start of every epoch; Adam restarted with them.

    Args:
        num_batches: Mini-batches (the epoch's first ones, without augmentation) averaged per measurement.
    """

    def __init__(self, num_batches: int = 5) -> None:
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise UserError(f"Auto-RGN needs selection.rgn_batches >= 1, got {num_batches!r}")
        self.num_batches = num_batches

    def make_optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        """Adam with one group per measured backbone tensor (named, rate set each epoch) and one head group."""
        groups: list[dict[str, Any]] = []
        head: list[nn.Parameter] = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if is_head_param(name):
                head.append(p)
            else:
                groups.append({"params": [p], "lr": cfg.lr, "name": name})
        if not groups:
            raise UserError("adapt.method=auto_rgn: no backbone tensor to tune (every one is a norm or all-zero)")
        if head:
            groups.append({"params": head, "lr": cfg.head_lr if cfg.head_lr is not None else cfg.lr, "name": ""})
        return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)

    def on_epoch_start(self, ctx: HookContext, epoch: int, batches: list[np.ndarray], pos: dict[str, Any]) -> None:
        groups = [(i, g) for i, g in enumerate(ctx.optimizer.param_groups) if g.get("name")]
        tensors = [g["params"][0] for _, g in groups]
        data = (ctx.batch(idx) for idx in itertools.islice(batches, self.num_batches))
        rgn, used = relative_gradient_norms(ctx.model, tensors, data, autocast=ctx.accelerator.autocast)
        if ctx.accelerator.num_processes > 1:  # every rank must set the same rates
            rgn = ctx.accelerator.reduce(rgn, reduction="mean")
        top = float(rgn.max())
        if used == 0 or not (top > 0 and math.isfinite(top)):
            raise UserError(f"Auto-RGN at epoch {epoch}: every relative gradient norm is zero or non-finite "
                            f"(max {top:g} over {used} batches)")
        weights = (rgn / top).tolist()
        for (i, _), w in zip(groups, weights, strict=True):
            set_group_lr(ctx, i, w * ctx.cfg.lr)
        reset_optimizer_state(ctx.optimizer)  # the authors re-create Adam every epoch
        names = [g["name"] for _, g in groups]
        record = {"epoch": epoch, "step": pos["step"], "batches": used, "max_rgn": top,
                  "top_tensor": names[int(np.argmax(weights))], "min_weight": float(min(weights)),
                  "median_weight": float(np.median(weights)), "weights": dict(zip(names, weights, strict=True))}
        pos.setdefault("hook", {}).setdefault("auto_rgn", []).append(record)
