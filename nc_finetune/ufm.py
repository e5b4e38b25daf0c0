"""Unconstrained feature model (UFM, Zhu et al. NeurIPS 2021): closed-form optimum and a trainer.

Objective, with W (K×D), free features H (N×D, n per class), b (K):

    (1/N) Σ CE(W h + b, y) + (λ_W/2)‖W‖_F² + (λ_H/2)‖H‖_F² + (λ_b/2)‖b‖²

Every global minimiser is a simplex ETF (NC1–NC3 exact) as long as K·√(n λ_W λ_H) < 1; otherwise it is W = H = 0.
Used as a test oracle for the collapse metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nc_finetune.errors import UserError
from nc_finetune.probe.metrics import metrics_from_stats
from nc_finetune.probe.stats import ClassStats


def _check_regime(num_classes: int, n_per_class: int, lambda_w: float, lambda_h: float) -> None:
    """Raise UserError for invalid arguments or the collapse-to-zero regime."""
    if num_classes < 2 or n_per_class < 1:
        raise UserError(f"UFM needs num_classes >= 2 and n_per_class >= 1, got {num_classes} and {n_per_class}")
    if not (lambda_w > 0 and lambda_h > 0):
        raise UserError(f"UFM needs lambda_w > 0 and lambda_h > 0, got {lambda_w} and {lambda_h}")
    level = num_classes * math.sqrt(n_per_class * lambda_w * lambda_h)
    if level >= 1.0:
        raise UserError(
            f"K*sqrt(n*lambda_w*lambda_h) = {level:.6g} >= 1: the global optimum is W=0, H=0 (collapse to zero); "
            "NC metrics are undefined; choose K*sqrt(n*lambda_w*lambda_h) < 1"
        )


def ufm_optimum(num_classes: int, n_per_class: int, lambda_w: float, lambda_h: float) -> dict[str, float]:
    """Closed-form global optimum of the balanced UFM (structure from Zhu et al. 2021).

    The common squared classifier-row norm s = ‖w_k‖² minimises φ(s) = log(1 + (K−1)e^{−cs}) + Kλ_W s with
    c = (K/(K−1))·√(λ_W/(nλ_H)).

    Args:
        num_classes: K >= 2.
        n_per_class: n, samples per class.
        lambda_w: λ_W > 0.
        lambda_h: λ_H > 0.

    Returns:
        ``w_norm_sq`` = s* (= ‖w_k‖² for every k), ``f_star`` (optimal objective; the bias contributes 0),
        ``weight_to_mean_ratio`` = √(nλ_H/λ_W) (= ‖W‖_F/‖M̄‖_F, since w_k = √(nλ_H/λ_W)·h̄_k) and ``c``.

    Raises:
        UserError: Invalid arguments, or K·√(nλ_Wλ_H) >= 1 where the optimum is W = H = 0.
    """
    _check_regime(num_classes, n_per_class, lambda_w, lambda_h)
    k, n = num_classes, n_per_class
    c = (k / (k - 1)) * math.sqrt(lambda_w / (n * lambda_h))
    s = math.log((k - 1) * (c - k * lambda_w) / (k * lambda_w)) / c
    f = math.log1p((k - 1) * math.exp(-c * s)) + k * lambda_w * s
    return {"w_norm_sq": s, "f_star": f, "weight_to_mean_ratio": math.sqrt(n * lambda_h / lambda_w), "c": c}


@dataclass
class UFMResult:
    """A trained UFM.

    Attributes:
        W: (K, D) classifier.
        H: (N, D) features, sample i has label ``labels[i]`` (class-major order).
        b: (K,) bias.
        labels: (N,) labels.
        loss: Final objective value.
        grad_norm: Final gradient 2-norm.
        converged: Whether grad_norm <= tol was reached.
        history: One dict per iteration: ``step``, ``loss``, ``grad_norm``, ``nc1``, ``nc2``, ``nc3``.
    """

    W: torch.Tensor
    H: torch.Tensor
    b: torch.Tensor
    labels: torch.Tensor
    loss: float
    grad_norm: float
    converged: bool
    history: list[dict[str, float]] = field(default_factory=list)


def _nc(h: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, num_classes: int) -> dict[str, float]:
    stats = ClassStats(num_classes, h.shape[1])
    stats.update(h, labels)
    return metrics_from_stats(stats, weight=w, name="ufm")


def train_ufm(
    num_classes: int,
    n_per_class: int,
    dim: int,
    lambda_w: float,
    lambda_h: float,
    lambda_b: float,
    seed: int = 0,
    max_iter: int = 2000,
    tol: float = 1e-9,
    init_scale: float = 0.1,
) -> UFMResult:
    """Minimise the UFM objective with full-batch L-BFGS (strong Wolfe) in float64 from a seeded random start.

    Args:
        num_classes: K >= 2.
        n_per_class: n.
        dim: Feature dimension D.
        lambda_w: λ_W > 0.
        lambda_h: λ_H > 0.
        lambda_b: λ_b >= 0.
        seed: Seed of the random initialisation.
        max_iter: Maximum number of L-BFGS iterations.
        tol: Stop when the gradient 2-norm is at most this.
        init_scale: Standard deviation of the Gaussian initialisation.

    Returns:
        :class:`UFMResult`.

    Raises:
        UserError: Invalid arguments, or the collapse-to-zero regime K·√(nλ_Wλ_H) >= 1.
    """
    _check_regime(num_classes, n_per_class, lambda_w, lambda_h)
    if dim < 1 or lambda_b < 0:
        raise UserError(f"UFM needs dim >= 1 and lambda_b >= 0, got {dim} and {lambda_b}")
    k, n = num_classes, n_per_class
    gen = torch.Generator().manual_seed(int(seed))
    w = (init_scale * torch.randn(k, dim, generator=gen, dtype=torch.float64)).requires_grad_()  # (K, D)
    h = (init_scale * torch.randn(k * n, dim, generator=gen, dtype=torch.float64)).requires_grad_()  # (N, D)
    b = (init_scale * torch.randn(k, generator=gen, dtype=torch.float64)).requires_grad_()  # (K,)
    labels = torch.arange(k).repeat_interleave(n)  # (N,)
    params = [w, h, b]
    # One L-BFGS iteration per step() call (the curvature history persists), so that every iteration is recorded;
    # max_eval must be set explicitly, its default (5/4 max_iter) would cap the line search at one evaluation.
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=1,
        max_eval=25,
        history_size=50,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        ce = F.cross_entropy(h @ w.T + b, labels)  # mean over N
        return ce + 0.5 * (lambda_w * w.square().sum() + lambda_h * h.square().sum() + lambda_b * b.square().sum())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    def grad_norm() -> float:
        return float(torch.sqrt(sum(p.grad.square().sum() for p in params)))

    history: list[dict[str, float]] = []
    loss = closure().detach()
    gnorm = grad_norm()
    for step in range(max_iter):
        if gnorm <= tol:
            break
        opt.step(closure)
        loss = closure().detach()
        gnorm = grad_norm()
        nc = _nc(h.detach(), labels, w.detach(), k)
        history.append(
            {
                "step": step + 1,
                "loss": float(loss),
                "grad_norm": gnorm,
                "nc1": nc["nc1"],
                "nc2": nc["nc2"],
                "nc3": nc["nc3"],
            }
        )
    return UFMResult(
        W=w.detach(),
        H=h.detach(),
        b=b.detach(),
        labels=labels,
        loss=float(loss),
        grad_norm=gnorm,
        converged=gnorm <= tol,
        history=history,
    )
