"""Neural-collapse metrics computed from :class:`~nc_finetune.probe.stats.ClassStats`.

Formulas as in ``tding1/Neural-Collapse`` (Zhu et al., NeurIPS 2021) and ``Heimine/PNC_DLN`` (Wang et al.,
"Understanding Deep Representation Learning via Layerwise Feature Compression and Discrimination", 2023); CDNV
from Galanti, György and Hutter, "On the Role of Neural Collapse in Transfer Learning" (ICLR 2022).

Notation: K classes, n_k samples in class k, N in all; μ_k class means, μ_G the sample-weighted global
mean, M̄ = [μ_k − μ_G] (D×K; stored here as K×D rows), Σ_W pooled within-class covariance normalised by N,
Σ_B = M̄ M̄^T / K, E_K = (I_K − 11^T/K)/√(K−1).

All functions are pure. Degenerate input (fewer than two classes, an empty class, non-finite features or statistics,
all class means equal) gives NaN for the affected metrics together with a ``RuntimeWarning`` naming the layer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from nc_finetune.errors import DataError
from nc_finetune.probe.stats import ClassStats, FeatureReservoir, pow2_scale

_F64 = torch.float64
_EPS = float(torch.finfo(_F64).eps)
_NAN = float("nan")
_CHUNK = 4096  # rows per update when feeding in-memory features through the streaming path
_RANK0_RTOL = 1e-12  # class means closer than this (relative to the data scale) count as equal

# Metrics that need at least two distinct class means (Σ_B of rank >= 1).
_SPREAD_KEYS = ("nc1", "nc1_trace", "sep_fuzziness", "cdnv", "nc2")


def _warn(name: str, msg: str) -> None:
    where = f"layer {name!r}" if name else "collapse metrics"
    warnings.warn(f"{where}: {msg}; affected metrics are NaN", RuntimeWarning, stacklevel=3)


def _degenerate_reason(stats: ClassStats) -> str | None:
    """Why no metric can be computed from ``stats`` at all, or None."""
    if stats.num_classes < 2:
        return f"needs at least 2 classes, got K={stats.num_classes}"
    if stats.nonfinite > 0:
        return f"{stats.nonfinite} sample(s) with non-finite features"
    empty = (stats.counts == 0).nonzero().flatten().tolist()
    if empty:
        shown = ", ".join(str(k) for k in empty[:10]) + (", ..." if len(empty) > 10 else "")
        return f"{len(empty)} class(es) without samples (class {shown})"
    parts = (stats.counts, stats.sums, stats.scatter, stats.sq_norms, stats.shift)
    if not all(bool(torch.isfinite(t).all()) for t in parts):
        return "non-finite statistics"
    return None


def _etf_distance(g: torch.Tensor) -> float:
    """‖G/‖G‖_F − E_K‖_F for a K×K matrix G."""
    k = g.shape[0]
    etf = (torch.eye(k, dtype=_F64, device=g.device) - 1.0 / k) / math.sqrt(k - 1)  # (K, K)
    g = g / pow2_scale(g.abs().amax())  # exact; keeps ‖G‖_F from overflowing or underflowing
    return float(torch.linalg.matrix_norm(g / torch.linalg.matrix_norm(g) - etf))


def _inverse_quadratic_sum(a_rows: torch.Tensor, cov: torch.Tensor, max_rank: int) -> float:
    """tr(cov · (A A^T)^†) for A = a_rows^T (D×K), via the thin SVD of a_rows, without a D×D pseudo-inverse.

    With a_rows = U S V^T, (A A^T)^† = Σ_i v_i v_i^T / s_i², so the trace is Σ_{i≤r} v_i^T cov v_i / s_i².
    The rank r keeps s_i > s_1 · max(K, D) · eps and never exceeds ``max_rank``.
    """
    _, s, vh = torch.linalg.svd(a_rows, full_matrices=False)  # s: (m,), vh: (m, D)
    k, d = a_rows.shape
    r = min(int((s > s[0] * max(k, d) * _EPS).sum()), max_rank)
    v = vh[:r]  # (r, D)
    quad = ((v @ cov) * v).sum(1)  # (r,): v_i^T cov v_i
    return float((quad / s[:r].square()).sum())


def metrics_from_stats(
    stats: ClassStats,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    name: str = "",
) -> dict[str, float]:
    """Collapse metrics of one layer from its statistics.

    Args:
        stats: Accumulated statistics (after ``all_reduce`` when distributed).
        weight: Optional (K, D) linear classifier; enables ``nc3`` and ``nc4_bias``.
        bias: Optional (K,) classifier bias (zero if omitted).
        name: Layer name, used in warnings.

    Returns:
        ``nc1`` = tr(Σ_W Σ_B^†)/K (SVD form), ``nc1_trace`` = tr Σ_W / tr Σ_B, ``sep_fuzziness`` = tr(SS_w SS_b^†)
        (He–Su, count-weighted SS_b), ``cdnv`` = mean_{i<j} (Var_i + Var_j)/(2‖μ_i − μ_j‖²), ``nc2`` =
        ‖G/‖G‖_F − E_K‖_F with G = M̄^T M̄, ``discrim`` = 1 − max_{k≠k'} cos(μ_k, μ_k'); with ``weight`` also
        ``nc3`` = ‖W M̄/‖W M̄‖_F − E_K‖_F and ``nc4_bias`` = ‖W μ_G + b‖. NaN where undefined (with a warning).
    """
    keys = [*_SPREAD_KEYS, "discrim"] + (["nc3", "nc4_bias"] if weight is not None else [])
    out = dict.fromkeys(keys, _NAN)
    k, d = stats.num_classes, stats.dim
    if weight is not None and tuple(weight.shape) != (k, d):
        raise DataError(f"classifier weight must have shape ({k}, {d}), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (k,):
        raise DataError(f"classifier bias must have shape ({k},), got {tuple(bias.shape)}")
    reason = _degenerate_reason(stats)
    if reason is not None:
        _warn(name, reason)
        return out

    mu_g = stats.global_mean()  # (D,), in the features' own units for nc4_bias
    # Every other metric is invariant to the scale of the features: compute on x / scale, finite for any size.
    stats = stats.normalised()
    n = stats.counts  # (K,)
    mbar = stats.centered_means()  # (K, D), rows μ_k − μ_G
    mu = stats.class_means()  # (K, D)
    sw = stats.within_cov()  # (D, D)
    var = stats.class_variances()  # (K,)

    # Uncentred class means (Wang et al. D_l); needs no spread. 1 − cos(a, b) = ½‖â − b̂‖², which keeps its
    # relative accuracy when the means are nearly parallel (features with a large common offset). Each row is first
    # divided by a power of two near its size (exact), so that its norm cannot overflow.
    mu = mu / pow2_scale(mu.abs().amax(1, keepdim=True))  # (K, D)
    unit = mu / torch.linalg.vector_norm(mu, dim=1, keepdim=True)  # (K, D)
    gap = torch.cdist(unit, unit, compute_mode="donot_use_mm_for_euclid_dist").fill_diagonal_(math.inf)  # (K, K)
    out["discrim"] = 0.5 * float(gap.min()) ** 2
    if weight is not None:
        w = weight.detach().to(device=stats.device, dtype=_F64)  # (K, D)
        b = torch.zeros(k, dtype=_F64, device=stats.device) if bias is None else bias.detach().to(w)  # (K,)
        out["nc4_bias"] = float(torch.linalg.vector_norm(w @ mu_g + b))

    # Rank-0 Σ_B: the class means coincide up to accumulation rounding, i.e. their RMS distance to μ_G is below
    # _RANK0_RTOL times the RMS size of the shifted features (NC1 would exceed ~1e24: no separation at all).
    rms = math.sqrt(float(stats.sq_norms.sum() / n.sum()))
    tr_b = float(mbar.square().sum()) / k
    if math.sqrt(tr_b) <= _RANK0_RTOL * rms:
        _warn(name, "all class means are equal (between-class covariance has rank 0)")
        return out

    out["nc1"] = _inverse_quadratic_sum(mbar, sw, max_rank=k - 1)
    out["nc1_trace"] = float(torch.trace(sw)) / tr_b
    # He–Su: SS_b = (1/N) Σ_k n_k (μ_k − μ_G)(μ_k − μ_G)^T = A A^T with A^T rows sqrt(n_k/N)(μ_k − μ_G).
    out["sep_fuzziness"] = _inverse_quadratic_sum((n / n.sum()).sqrt()[:, None] * mbar, sw, max_rank=k - 1)
    # Pairwise distances by direct differences (no Gram cancellation), K×K output only.
    dist2 = torch.cdist(mbar, mbar, compute_mode="donot_use_mm_for_euclid_dist").square()  # (K, K)
    iu = torch.triu_indices(k, k, offset=1, device=stats.device)
    pair = (var[iu[0]] + var[iu[1]]) / (2.0 * dist2[iu[0], iu[1]])  # (K(K−1)/2,)
    out["cdnv"] = float(pair.mean())
    out["nc2"] = _etf_distance(mbar @ mbar.T)
    if weight is not None:
        out["nc3"] = _etf_distance(w @ mbar.T)  # W M̄, (K, K)
    return out


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what} must be an array or tensor, got {type(x).__name__}") from exc


def _check_inputs(features: Any, labels: Any, num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Validate (features, labels) and return them as tensors with K."""
    x = _as_tensor(features, "features")
    y = _as_tensor(labels, "labels")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"features must be a non-empty N×D array, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.to(_F64)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"labels must have shape ({x.shape[0]},) to match the features, got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"labels must be integers, got dtype {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    k = hi + 1 if num_classes is None else int(num_classes)
    if k < 1 or lo < 0 or hi >= k:
        raise DataError(f"labels must lie in [0, {k}) (num_classes={k}), got values in [{lo}, {hi}]")
    return x, y.long(), k


def collapse_metrics(
    features: Any,
    labels: Any,
    num_classes: int | None = None,
    weight: Any = None,
    bias: Any = None,
    name: str = "",
) -> dict[str, float]:
    """Collapse metrics of an in-memory feature matrix (the streaming path, fed in chunks).

    Args:
        features: (N, D) numpy array or tensor.
        labels: (N,) integer labels in [0, num_classes).
        num_classes: K; defaults to ``max(labels) + 1``.
        weight: Optional (K, D) classifier for ``nc3``/``nc4_bias``.
        bias: Optional (K,) classifier bias.
        name: Name used in warnings.

    Returns:
        The keys of :func:`metrics_from_stats` plus ``ncc_accuracy`` (nearest-class-centre accuracy on all samples).

    Raises:
        DataError: Bad shapes, non-integer or out-of-range labels, empty input.
    """
    x, y, k = _check_inputs(features, labels, num_classes)
    n, d = x.shape
    stats = ClassStats(k, d, device=x.device)
    reservoir = FeatureReservoir(capacity=n, device=x.device)
    for start in range(0, n, _CHUNK):
        stats.update(x[start : start + _CHUNK], y[start : start + _CHUNK])
        # The reservoir rounds to float32: store the features in the statistics' frame (shifted and scaled), where
        # float32 keeps their class structure under an offset of 1e12 or a size of 1e±200.
        reservoir.add(stats.to_frame(x[start : start + _CHUNK]), y[start : start + _CHUNK])
    w = None if weight is None else _as_tensor(weight, "weight")
    b = None if bias is None else _as_tensor(bias, "bias")
    out = metrics_from_stats(stats, weight=w, bias=b, name=name)
    if math.isnan(out["nc1"]):
        out["ncc_accuracy"] = _NAN  # degenerate (already warned): class centres are missing or coincide
    else:
        correct, total = reservoir.ncc_correct(stats.frame_class_means())
        out["ncc_accuracy"] = correct / total
    return out


def equi_separation_fit(values: Sequence[float]) -> dict[str, float]:
    """OLS fit of log(values[l]) = intercept + slope · l over the finite positive values (He–Su law).

    Args:
        values: Per-layer values (e.g. NC1 or separation fuzziness), layer l at index l.

    Returns:
        ``rho`` = exp(slope) (per-layer decay factor), ``slope``, ``intercept``, ``r2`` and ``n_points``;
        NaN fields when fewer than two usable points (``r2`` is NaN when all used values are equal).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    ok = np.isfinite(v) & (v > 0)
    out = {"rho": _NAN, "slope": _NAN, "intercept": _NAN, "r2": _NAN, "n_points": float(ok.sum())}
    if ok.sum() < 2:
        return out
    l = np.arange(v.size, dtype=np.float64)[ok]
    z = np.log(v[ok])
    lc = l - l.mean()
    slope = float((lc * (z - z.mean())).sum() / (lc * lc).sum())
    intercept = float(z.mean() - slope * l.mean())
    ss_res = float(((z - intercept - slope * l) ** 2).sum())
    ss_tot = float(((z - z.mean()) ** 2).sum())
    out.update(rho=math.exp(slope), slope=slope, intercept=intercept, r2=1.0 - ss_res / ss_tot if ss_tot > 0 else _NAN)
    return out


class LinearProbeResult(NamedTuple):
    """Held-out accuracy and the classifier in the original feature space (logits = x @ weight.T + bias)."""

    accuracy: float
    weight: torch.Tensor  # (K, D) float64
    bias: torch.Tensor  # (K,) float64


def _stratified_split(y: torch.Tensor, k: int, holdout: float, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Per class, a random ``holdout`` fraction (rounded; at least one sample stays in training) goes to test."""
    train, test = [], []
    for c in range(k):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = min(round(holdout * idx.numel()), idx.numel() - 1) if idx.numel() else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train), torch.cat(test)


def linear_probe_accuracy(
    features: Any,
    labels: Any,
    num_classes: int,
    seed: int = 0,
    holdout: float = 0.2,
    l2: float = 1e-3,
    max_iter: int = 100,
    dtype: torch.dtype = torch.float32,
) -> LinearProbeResult:
    """Multinomial logistic regression on standardised features, scored on a seeded stratified hold-out split.

    The model is fitted with full-batch L-BFGS (strong Wolfe) on mean cross-entropy + (l2/2)‖A‖² (A: weights on the
    standardised features; bias not penalised), then mapped back to the raw features: W = A / std, b = c − W mean.

    Args:
        features: (N, D) array or tensor.
        labels: (N,) integer labels in [0, num_classes).
        num_classes: K.
        seed: Seed of the split.
        holdout: Fraction of every class held out for scoring, in [0, 1). With 0 the accuracy is on the training set.
        l2: L2 penalty on the standardised weights.
        max_iter: L-BFGS iterations.
        dtype: Compute dtype of the fit.

    Returns:
        :class:`LinearProbeResult` (accuracy, weight (K, D), bias (K,)); weight and bias are float64.

    Raises:
        DataError: Bad inputs (see :func:`collapse_metrics`).
    """
    if not 0.0 <= holdout < 1.0:
        raise DataError(f"holdout must be in [0, 1), got {holdout}")
    x, y, k = _check_inputs(features, labels, num_classes)
    x = x.to(dtype)
    gen = torch.Generator().manual_seed(int(seed))
    train, test = _stratified_split(y.cpu(), k, holdout, gen)
    train, test = train.to(x.device), test.to(x.device)
    if test.numel() == 0:
        test = train
    xt, yt = x[train], y[train]  # (n_train, D), (n_train,)
    mean = xt.mean(0)  # (D,)
    std = xt.std(0, unbiased=False)  # (D,)
    std = torch.where(std > 1e-12 * std.max().clamp(min=1e-30), std, torch.ones_like(std))  # constant features
    z = (xt - mean) / std  # (n_train, D)
    a = torch.zeros(k, x.shape[1], dtype=dtype, device=x.device, requires_grad=True)  # (K, D)
    c = torch.zeros(k, dtype=dtype, device=x.device, requires_grad=True)  # (K,)
    opt = torch.optim.LBFGS([a, c], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ a.T + c, yt) + 0.5 * l2 * a.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    weight = a.detach().to(_F64) / std.to(_F64)  # (K, D)
    bias = c.detach().to(_F64) - weight @ mean.to(_F64)  # (K,)
    pred = (x[test].to(_F64) @ weight.T + bias).argmax(1)
    return LinearProbeResult(float((pred == y[test]).double().mean()), weight, bias)
