"""A fixed simplex-ETF classifier: the geometry neural collapse converges to, imposed instead of learned.

With a fixed simplex equiangular tight frame as the head, the only way to fit the data is for the tuned blocks to
map each class onto its frame vector, i.e. to collapse (Li et al., TMLR 2024; Yang et al., NeurIPS 2022).

Construction (K classes, feature width D >= K-1): the centring matrix C = I_K - 11ᵀ/K has rank K-1; with V (K×(K-1))
an orthonormal basis of its range, C = V Vᵀ. For R ((K-1)×D) with orthonormal rows,

    W = s · sqrt(K/(K-1)) · V R          (K×D)

gives W Wᵀ = s² · K/(K-1) · C: every row has norm s and every pair has cosine -1/(K-1). R is a seeded random
rotation, so the frame sits in a random (K-1)-dimensional subspace of the feature space.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nc_finetune.errors import ConfigError


def simplex_etf(num_classes: int, dim: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """The (K, D) float32 simplex-ETF weight described in the module docstring.

    Raises:
        ConfigError: fewer than 2 classes, ``dim < K - 1`` (no K-point simplex fits), or a scale that is not > 0.
    """
    k = int(num_classes)
    if k < 2:
        raise ConfigError(f"adapt.head=etf needs at least 2 classes, got {k}")
    if dim < k - 1:
        raise ConfigError(f"adapt.head=etf needs a feature width of at least K-1 = {k - 1} for {k} classes; the head "
                          f"input has {dim}: use adapt.head=linear")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ConfigError(f"adapt.etf_scale must be a finite number > 0, got {scale!r}")
    gen = torch.Generator().manual_seed(int(seed))
    centring = torch.eye(k, dtype=torch.float64) - 1.0 / k  # (K, K), C = V Vᵀ
    evals, evecs = torch.linalg.eigh(centring)  # eigenvalues 0 (once) and 1 (K-1 times), ascending
    v = evecs[:, 1:]  # (K, K-1)
    q, r = torch.linalg.qr(torch.randn(dim, k - 1, generator=gen, dtype=torch.float64))  # q: (D, K-1)
    q = q * torch.sign(torch.diagonal(r))  # a uniformly random orthonormal frame (sign-fixed QR)
    w = scale * math.sqrt(k / (k - 1)) * v @ q.T  # (K, D)
    return w.float()


class ETFHead(nn.Module):
    """``logits = h Wᵀ`` with a fixed simplex-ETF ``W`` (a buffer: no parameter, never trained, no bias).

    Args:
        in_features: D, the width of the head input.
        num_classes: K.
        scale: Row norm of ``W``.
        seed: Seed of the frame's random rotation.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, num_classes
        self.register_buffer("weight", simplex_etf(num_classes, in_features, scale, seed))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight.to(h.dtype))  # (B, K)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fixed simplex ETF"
