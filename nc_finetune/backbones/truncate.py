"""Truncated backbones: a model cut after one of its blocks, whose pooled output becomes the final feature.

A truncated model is a transfer candidate of its own (the TMLR study ranks "the same backbone cut at several
depths" beside whole models): it is smaller, cheaper, and on data far from the pretraining domain its middle
blocks may carry the better features. ``backbone.truncate_at`` (a block index or name) builds one from any backbone.

How: the model's forward runs until the cut block has produced its output, then stops
(:func:`nc_finetune.backbones.hooks.output_of`). Modules with parameters that
did not run before the cut on a probe input (the later blocks and the original head) are replaced by
``nn.Identity``, so the parameter count, the optimiser and the checkpoints see only the part that is used.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from nc_finetune.backbones.base import Backbone, count_params, pool_output
from nc_finetune.backbones.hooks import HookSet, output_of
from nc_finetune.errors import ConfigError


def resolve_block(backbone: Backbone, where: int | str) -> int:
    """Position in ``backbone.blocks`` of a block given by index (negative counts from the end) or name.

    Raises:
        ConfigError: No such block; the message lists the valid range and a few names.
    """
    names = [b.name for b in backbone.blocks]
    if isinstance(where, bool) or not isinstance(where, (int, str)):
        raise ConfigError(f"backbone.truncate_at must be a block index or name; got {where!r}")
    if isinstance(where, int):
        if not -len(names) <= where < len(names):
            raise ConfigError(f"backbone.truncate_at={where} is out of range: {backbone.spec} has {len(names)} blocks "
                              f"(0..{len(names) - 1}, or negative from the end)")
        return where % len(names)
    if where not in names:
        shown = ", ".join(names[:4] + (["..."] if len(names) > 5 else []) + names[-1:])
        raise ConfigError(f"backbone.truncate_at={where!r} is not a block of {backbone.spec}; blocks: {shown}")
    return names.index(where)


def _probe_inputs(backbone: Backbone) -> dict[str, torch.Tensor]:
    if backbone.modality == "text":
        return backbone.prepare(["a short probe sentence"])
    return backbone.prepare(np.zeros((1, 32, 32, 3), dtype=np.uint8))


def _run_to_cut(forward: Any, model: nn.Module, cut_name: str, batch: dict[str, torch.Tensor]) -> Any:
    """Run ``forward(**batch)`` until block ``cut_name`` has produced its output; return that raw output."""
    # Looked up per call, not captured: peft LoRA replaces a leaf block (a bare Linear/Conv) by a wrapper whose
    # output, not its inner base layer's, is the block's output.
    return output_of(model.get_submodule(cut_name), lambda: forward(**batch), name=f"block {cut_name}")


class _CutForward:
    """The truncated model's forward: run to the cut block, pool its output to (B, D_cut).

    An object rather than a closure so that ``copy.deepcopy`` of the model (``build_classifier`` builds on a copy)
    gives a forward that runs the copy: the model and its bound forward are attributes, remapped by the copy.
    """

    def __init__(self, model: nn.Module, cut_name: str, backbone: Backbone) -> None:
        self.model, self.original_forward, self.cut_name = model, model.forward, cut_name
        self.pool_kwargs = {"pooling": backbone.pooling, "num_prefix_tokens": backbone.num_prefix_tokens,
                            "channels_last": backbone.channels_last}

    def __call__(self, **batch: torch.Tensor) -> torch.Tensor:
        out = _run_to_cut(self.original_forward, self.model, self.cut_name, batch)
        return pool_output(out, attention_mask=batch.get("attention_mask"), **self.pool_kwargs)  # (B, D_cut)


def truncate_backbone(backbone: Backbone, where: int | str) -> Backbone:
    """Cut ``backbone`` after block ``where``; the model is modified in place and returned in a new Backbone.

    Args:
        backbone: A freshly loaded backbone (its model is changed: later modules are dropped, ``forward`` replaced).
        where: Block index (negative from the end) or block name.

    Returns:
        A :class:`Backbone` whose blocks end at the cut, whose final feature is the cut block's pooled output
        (``feature_dim`` = its width, ``final_tap`` None), spec ``<spec>@<block>``.

    Raises:
        ConfigError: An unknown block.
    """
    k = resolve_block(backbone, where)
    if k == len(backbone.blocks) - 1 and backbone.final_tap is None:
        return backbone  # cutting after the last block changes nothing
    model = backbone.model
    cut_name = backbone.blocks[k].name
    inputs = _probe_inputs(backbone)

    ran: set[str] = set()
    with HookSet() as hooks, torch.no_grad():
        for n, m in model.named_modules():
            if n:
                hooks.on_input(m, lambda mod, args, n=n: ran.add(n))
        dim = int(backbone.pool(_run_to_cut(model.forward, model, cut_name, inputs), inputs).shape[1])

    keep = ran | {cut_name} | {n for n in dict(model.named_modules()) if cut_name.startswith(n + ".")}
    dropped = []
    for name, module in list(model.named_modules()):
        if not name or name in keep or any(name.startswith(d + ".") for d in dropped):
            continue
        if any(True for _ in module.parameters()) and not any(r.startswith(name + ".") for r in ran):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
            dropped.append(name)

    model.forward = _CutForward(model, cut_name, backbone)
    prov = {**backbone.provenance, "truncated_at": cut_name, "dropped_modules": str(len(dropped)),
            "params_after_truncation": str(count_params(model))}
    return dataclasses.replace(backbone, spec=f"{backbone.spec}@{cut_name}", blocks=backbone.blocks[:k + 1],
                               feature_dim=dim, final_tap=None, provenance=prov)
