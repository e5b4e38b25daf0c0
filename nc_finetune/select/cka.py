"""Label-free block scores from linear CKA between each block's input and output (the ``cka`` strategy).

Linear centred kernel alignment (Kornblith et al., ICML 2019) compares two representations X (N×D₁) and Y (N×D₂) of
the same samples; with both column-centred,

    CKA(X, Y) = ‖YᵀX‖²_F / (‖XᵀX‖_F · ‖YᵀY‖_F) = ⟨XXᵀ, YYᵀ⟩_F / (‖XXᵀ‖_F · ‖YYᵀ‖_F)      ∈ [0, 1].

It is invariant to orthogonal transforms and isotropic scaling of either side, 1 when Y = XQ, and near 0 for
independent representations. A block whose output is nearly an orthogonal re-mix of its input (CKA ≈ 1) changes
little; the ``cka`` strategy tunes first the blocks whose representation changes most (lowest CKA), a label-free rule
in the spirit of representational-similarity freezing (SmartFRZ, Li et al., ICLR 2024).

:func:`block_cka` runs one dedicated no-grad pass over (a seeded subset of) the probe data, taps every block's input
(forward pre-hook) and output (forward hook), mean-pools tokens / feature maps of both, and keeps the pooled
vectors (N × D per side, float32 on the CPU; N is capped by ``max_samples``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from nc_finetune.backbones.base import first_tensor, pool_output
from nc_finetune.backbones.hooks import ForwardStop, HookSet
from nc_finetune.errors import ConfigError, DataError
from nc_finetune.utils.env import resolve_device


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA between two representations of the same N samples (NaN when either has no variance).

    Args:
        x: (N, D₁) array or tensor.
        y: (N, D₂) array or tensor.

    Raises:
        DataError: not 2-D, or different numbers of samples.
    """
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().double()
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).detach().double().to(x.device)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise DataError(f"linear_cka needs two (N, D) representations of the same N >= 2 samples, got "
                        f"{tuple(x.shape)} and {tuple(y.shape)}")
    x = x - x.mean(0)
    y = y - y.mean(0)
    n = x.shape[0]
    if n <= max(x.shape[1], y.shape[1]):  # Gram form: N×N
        kx, ky = x @ x.T, y @ y.T  # (N, N)
        cross, nx, ny = (kx * ky).sum(), kx.norm(), ky.norm()
    else:  # feature form: D×D
        cross, nx, ny = (y.T @ x).square().sum(), (x.T @ x).norm(), (y.T @ y).norm()
    denom = float(nx) * float(ny)
    if not denom > 0 or not math.isfinite(denom):
        return math.nan
    return float(cross) / denom


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The hidden state a block receives: its first tensor argument (``hidden_states`` when passed by keyword)."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        return hidden
    return None


def block_cka(
    backbone,
    split,
    *,
    batch_size: int = 64,
    max_samples: int = 2048,
    device: str = "auto",
    seed: int = 0,
) -> dict[int, float]:
    """Linear CKA between the mean-pooled input and output of every block, over one pass of ``split``.

    Args:
        backbone: A :class:`~nc_finetune.backbones.Backbone` (left in eval mode, no hook left behind).
        split: The probe data (labels are not used).
        batch_size: Forward batch size.
        max_samples: Use a seeded random subset of at most this many samples.
        device: ``auto``, ``cpu``, ``cuda``...
        seed: Seed of the subset.

    Returns:
        Block index -> CKA in [0, 1] (NaN where a side has no variance, e.g. a constant input).

    Raises:
        ConfigError: ``max_samples < 2``.
        DataError: fewer than 2 samples, or a block whose input cannot be read.
    """
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 2:
        raise ConfigError(f"selection.cka_samples must be an integer >= 2, got {max_samples!r}")
    n = len(split)
    if n < 2:
        raise DataError(f"the cka strategy needs at least 2 probe samples, got {n}")
    idx = np.arange(n)
    if n > max_samples:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))
    subset = split.subset(idx)
    dev = resolve_device(device)
    model = backbone.model
    blocks = sorted(backbone.blocks, key=lambda b: b.index)
    ins: dict[int, list[torch.Tensor]] = {b.index: [] for b in blocks}
    outs: dict[int, list[torch.Tensor]] = {b.index: [] for b in blocks}
    current: dict[str, Any] = {}
    stop = ForwardStop()

    def pool(t: Any) -> torch.Tensor:  # (B, D) float32 on the CPU, tokens averaged (mask-aware), maps GAP
        return pool_output(t, "mean", attention_mask=current["inputs"].get("attention_mask"),
                           num_prefix_tokens=backbone.num_prefix_tokens,
                           channels_last=backbone.channels_last).detach().cpu()

    def make_hooks(index: int, last: bool):
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _block_input(args, kwargs)
            if x is None:
                raise DataError(f"cka: cannot find the input tensor of block {index} '{backbone.blocks[index].name}'")
            ins[index].append(pool(x))

        def post(module: nn.Module, args: tuple, output: Any) -> None:
            outs[index].append(pool(first_tensor(output)))
            if last:
                stop()  # nothing after the last block is needed

        return pre, post

    was_training = model.training
    model.eval().to(dev)
    try:
        with HookSet() as hooks, torch.no_grad():
            for pos, b in enumerate(blocks):
                pre, post = make_hooks(b.index, pos == len(blocks) - 1)
                module = model.get_submodule(b.name)
                hooks.on_input(module, pre, with_kwargs=True)
                hooks.on_output(module, post)
            for start in range(0, len(subset), batch_size):
                raw = subset.inputs[start:start + batch_size]
                current["inputs"] = backbone.prepare_on(raw, dev)
                with stop:
                    model(**current["inputs"])
    finally:
        model.train(was_training)
    out: dict[int, float] = {}
    for b in blocks:
        if len(ins[b.index]) != len(outs[b.index]) or not ins[b.index]:
            raise DataError(f"cka: block {b.index} '{b.name}' ran {len(ins[b.index])} times for "
                            f"{len(outs[b.index])} outputs (a block called more than once per forward?)")
        out[b.index] = linear_cka(torch.cat(ins[b.index]), torch.cat(outs[b.index]))
    return out
