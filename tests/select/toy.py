"""A tiny linear backbone with known structure, for rules whose right answer is known by construction."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nc_finetune.backbones.base import Backbone, make_block_infos
from nc_finetune.data import Split


class ToyNet(nn.Module):
    """``depth`` linear blocks ``R^d -> R^d`` (identity unless changed); the output is the last block's features."""

    def __init__(self, d: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        with torch.no_grad():
            for b in self.blocks:
                b.weight.copy_(torch.eye(d))
                b.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def toy_backbone(d: int = 8, depth: int = 4) -> Backbone:
    net = ToyNet(d, depth).eval()

    def prepare(raw, train: bool = False) -> dict[str, torch.Tensor]:
        return {"x": torch.as_tensor(np.stack(list(raw)), dtype=torch.float32)}

    return Backbone(spec="toy", model=net, modality="image", blocks=make_block_infos(net, [f"blocks.{i}" for i in
                    range(depth)]), feature_dim=d, pooling="mean", final_tap=None, preprocess=prepare, family="test")


def class_data(n_per_class: int, k: int = 3, d: int = 8, signal_dims: int = 3, noise: float = 3.0, seed: int = 0,
               input_noise: float = 0.0) -> Split:
    """Classes separated in the first ``signal_dims`` coordinates; the others are class-free nuisance (std
    ``noise``); ``input_noise`` adds Gaussian noise of that std to every coordinate (an input-level shift)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, signal_dims)) * 2.0
    y = np.repeat(np.arange(k), n_per_class)
    x = np.zeros((len(y), d), dtype=np.float32)
    x[:, :signal_dims] = means[y] + 0.5 * rng.normal(size=(len(y), signal_dims))
    x[:, signal_dims:] = noise * rng.normal(size=(len(y), d - signal_dims))
    x += input_noise * rng.normal(size=x.shape)
    return Split(list(x.astype(np.float32)), y.astype(np.int64))


def scramble(backbone: Backbone, index: int, signal_dims: int = 3, seed: int = 1) -> None:
    """Make block ``index`` pour the nuisance coordinates onto the class coordinates and drop them: the class
    signal is buried under nuisance from there on, and only retuning that block can dig it out again."""
    d = backbone.feature_dim
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(d, d)
    w[:signal_dims, :signal_dims] = torch.eye(signal_dims)
    w[:signal_dims, signal_dims:] = torch.randn(signal_dims, d - signal_dims, generator=g)
    with torch.no_grad():
        backbone.model.get_submodule(f"blocks.{index}").weight.copy_(w)
