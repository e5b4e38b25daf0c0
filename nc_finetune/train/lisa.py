"""LISA as a training mode: everything outside the blocks trains, plus γ blocks redrawn every K optimiser steps.

As in LMFlow's implementation of LISA (Pan et al., NeurIPS 2024; ``OptimalScale/LMFlow``), the layers list is frozen
except for γ uniformly drawn layers, while every parameter outside it (embeddings / stem, final norm, head) always
trains. Here the layers are the backbone's blocks, γ is the number of selected blocks and K is
``selection.lisa_interval``. The optimiser holds every parameter from the start; a frozen block has no gradient, so
AdamW neither moves nor decays it, and when a block leaves the active set its moment estimates are dropped (it restarts
from zero when drawn again). Draws come from :func:`nc_finetune.select.lisa.lisa_draw`, a pure function of (seed,
interval), so a resumed run trains the same blocks at the same steps. One process only: DDP fixes the trainable set at
wrap time.
"""

from __future__ import annotations

from typing import Any

from nc_finetune.errors import UserError
from nc_finetune.select.lisa import lisa_draw
from nc_finetune.train.hooks import HookContext, TrainHook


class LisaHook(TrainHook):
    """Redraw the trainable blocks every ``interval`` optimiser steps.

    Args:
        pool: Qualified module names (in the trained model) of every block, in forward order.
        first: The blocks of interval 0 (the selection), a subset of ``pool``.
        interval: K, optimiser steps per draw.
        seed: Seed of the draws.
    """

    def __init__(self, pool: list[str], first: list[str], interval: int, seed: int) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise UserError(f"selection.lisa_interval must be an integer >= 1, got {interval!r}")
        unknown = [n for n in first if n not in pool]
        if not first or unknown:
            raise UserError(f"LISA's first blocks {first} must be a non-empty subset of the blocks")
        self.pool, self.first, self.interval, self.seed = pool, first, interval, seed

    @classmethod
    def from_adapted(cls, adapted) -> LisaHook:
        prefix = adapted.backbone_prefix + "."
        info = adapted.info
        return cls([prefix + n for n in info["lisa_pool"]], [prefix + n for n in info["blocks"]],
                   int(info["lisa_interval"]), int(info["lisa_seed"]))

    def active(self, interval: int) -> list[str]:
        """The blocks trained during ``interval`` (interval 0: the selection itself)."""
        if interval == 0:
            return list(self.first)
        return [self.pool[i] for i in lisa_draw(len(self.pool), len(self.first), self.seed, interval)]

    def _activate(self, ctx: HookContext, names: list[str]) -> None:
        for name in self.pool:
            on = name in names
            for p in ctx.model.get_submodule(name).parameters():
                if p.requires_grad and not on:
                    ctx.optimizer.state.pop(p, None)  # a frozen block keeps no optimiser state
                p.requires_grad_(on)

    def _record(self, pos: dict[str, Any], interval: int, names: list[str]) -> None:
        draws = pos.setdefault("hook", {}).setdefault("lisa", [])
        draws.append({"step": pos["step"], "interval": interval, "blocks": names})

    def on_fit_start(self, ctx: HookContext, pos: dict[str, Any]) -> None:
        if ctx.accelerator.num_processes > 1:
            raise UserError("adapt.method=lisa trains on one process only (DDP cannot change the trainable set)")
        interval = pos["step"] // self.interval
        names = self.active(interval)
        self._activate(ctx, names)
        if not pos.get("hook", {}).get("lisa"):
            self._record(pos, interval, names)

    def on_step_end(self, ctx: HookContext, pos: dict[str, Any]) -> None:
        if pos["step"] % self.interval:
            return
        interval = pos["step"] // self.interval
        names = self.active(interval)
        self._activate(ctx, names)
        self._record(pos, interval, names)
