"""An NC1 loss term: induce within-class collapse of the deepest tuned block while tuning (Li et al., TMLR 2024).

``train.nc1_penalty = λ`` adds ``λ · NC1`` of one block's pooled features, measured within each mini-batch, to the
cross-entropy. NC1 is the probe's metric (:mod:`nc_finetune.probe.metrics`), ``tr(Σ_W Σ_B^†) / K``, over the K_b classes
present in the batch. For a differentiable, decomposition-free form (an SVD or eigendecomposition has no usable gradient
when the class means become equiangular, which is exactly where collapse drives them): with M̄ (K_b×D) the centred class
means, G = M̄ M̄ᵀ and Z = (X − μ_y) M̄ᵀ (N×K_b),

    NC1 = tr(Σ_W (M̄ᵀM̄)^†) = ‖Z G^†‖²_F / N = ‖Z (G + u uᵀ)^{-1}‖²_F / N,

because (M̄ᵀM̄)^† = M̄ᵀ G^{†2} M̄, and G's null space is spanned by u = n/‖n‖ (class counts: Σ_k n_k (μ_k − μ_G) = 0),
which Z never reaches. This needs G of rank K_b − 1 (a block width of at least K_b − 1 and distinct class means).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from nc_finetune.errors import ConfigError


def batch_nc1(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Differentiable NC1 of one batch over the classes present in it (0 with fewer than two classes).

    Args:
        features: (N, D) pooled features (any float dtype; computed in float64).
        labels: (N,) integer labels.

    Returns:
        A float64 scalar on the features' device, equal to ``nc1`` of
        :func:`nc_finetune.probe.metrics.collapse_metrics` on the same batch when every class is present.
    """
    x = features.double()  # (N, D)
    classes, y = torch.unique(labels, return_inverse=True)
    k = int(classes.numel())
    if k < 2:
        return x.sum() * 0.0  # keeps the graph: a batch of one class says nothing about collapse
    n, d = x.shape
    if d < k - 1:
        raise ConfigError(f"train.nc1_penalty: NC1 of {k} classes needs a feature width of at least {k - 1}; the "
                          f"tapped block gives {d}")
    counts = torch.bincount(y, minlength=k).to(x)  # (K,)
    mu = torch.zeros(k, d, dtype=x.dtype, device=x.device).index_add(0, y, x) / counts[:, None]  # (K, D)
    mbar = mu - x.mean(0)  # (K, D), rows μ_k − μ_G
    z = (x - mu[y]) @ mbar.T  # (N, K)
    u = counts / counts.norm()  # (K,), G u = 0
    a = mbar @ mbar.T + torch.outer(u, u)  # (K, K), invertible when rank G = K − 1
    return torch.linalg.solve(a, z.T).square().sum() / n


class NC1Penalty:
    """Taps one module's output during training and scores its batch NC1.

    Args:
        model: The trained model.
        module_name: Qualified name of the tapped block in ``model``.
        pool: ``pool(output, inputs) -> (B, D)`` (the backbone's pooling).
    """

    def __init__(self, model: nn.Module, module_name: str, pool: Callable[[Any, dict], torch.Tensor]) -> None:
        self.model, self.module_name, self.pool = model, module_name, pool
        self._inputs: dict | None = None
        self._features: torch.Tensor | None = None
        self._handle: Any = None

    @classmethod
    def for_adapted(cls, adapted, backbone) -> NC1Penalty:
        """Tap the deepest tuned block: the deepest selected one, or the last block when the whole backbone trains.

        Raises:
            ConfigError: ``linear_probe`` (no block is tuned).
        """
        if adapted.method == "linear_probe":
            raise ConfigError("train.nc1_penalty needs a tuned block; adapt.method=linear_probe tunes none")
        blocks = adapted.info.get("blocks") or [max(backbone.blocks, key=lambda b: b.index).name]
        return cls(adapted.model, f"{adapted.backbone_prefix}.{blocks[-1]}", backbone.pool)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._inputs is not None:
            self._features = self.pool(output, self._inputs)  # (B, D)

    def attach(self) -> None:
        """Register the tap (before any other hook of the block: SCL's ``replace`` wiring stops the forward there)."""
        if self._handle is None:
            from nc_finetune.backbones.hooks import tap_output

            self._handle = tap_output(self.model.get_submodule(self.module_name), self._hook, prepend=True)

    def detach(self) -> None:
        """Remove the tap; the model is as before."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @contextlib.contextmanager
    def capture(self, inputs: dict) -> Iterator[None]:
        """Record the tapped features of the forwards run inside (training batches only)."""
        self._inputs, self._features = inputs, None
        try:
            yield
        finally:
            self._inputs = None

    def value(self, labels: torch.Tensor) -> torch.Tensor:
        """Batch NC1 of the last captured forward (outside autocast, in float64)."""
        if self._features is None:
            raise RuntimeError(f"NC1 penalty: block '{self.module_name}' did not run in the last forward")
        feats, self._features = self._features, None
        with torch.autocast(feats.device.type, enabled=False):
            return batch_nc1(feats, labels)
