"""Transferability scores usable as per-model or per-layer scores: LogME, H-score and the NCTI terms.

* **LogME** (You, Liu, Wang, Long, ICML 2021, arXiv 2102.11005): for every class k the one-hot target y_k ∈ {0,1}^N is
  modelled by Bayesian linear regression on the raw (uncentred, as in the paper) features F (N×D): w ~ N(0, α⁻¹I),
  y_k | F, w ~ N(Fw, β⁻¹I). The log evidence

      L(α, β) = (D/2) log α + (N/2) log β − (N/2) log 2π − (β/2)‖y − Fm‖² − (α/2)‖m‖² − ½ log|αI + βFᵀF|,
      m = β (αI + βFᵀF)⁻¹ Fᵀy,

  is maximised over (α, β) by the paper's fixed-point iteration (γ = Σ_i βσ_i/(α + βσ_i), α ← γ/‖m‖²,
  β ← (N − γ)/‖y − Fm‖², σ_i the eigenvalues of FᵀF, starting from α = β = 1). The score is the mean over classes of
  L/N. Everything is expressed in the eigenbasis of FᵀF, so the score needs only FᵀF, Fᵀy_k and y_kᵀy_k = n_k: it
  can be computed exactly from the probe's additive statistics (:func:`logme_from_stats`).
* **H-score** (Bao et al., ICIP 2019): tr(cov(f)⁺ cov(E[f | y])), total covariance against the count-weighted
  between-class covariance. Bounded by the number of classes minus one.
* **NCTI terms** (Wang et al., ICCV 2023; ``BUserName/NCTI``): PCA to ≤ 64 dimensions, shrinkage LDA, then the raw SELI,
  NCC and within-class-variability terms; :func:`ncti_combine` min–max normalises them across candidates (models or
  layers) into the NCTI score.

All computations are float64 numpy; inputs may be numpy arrays or torch tensors (any device).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from nc_finetune.errors import DataError
from nc_finetune.probe.stats import ClassStats

_EPS = float(np.finfo(np.float64).eps)
_TINY = 1e-300
_LOG_2PI = math.log(2.0 * math.pi)
_PARAM_MIN, _PARAM_MAX = 1e-200, 1e200  # range of LogME's α and β
_NAN = float("nan")

#: Keys of the raw NCTI terms, as returned by :func:`ncti_terms` and stored in probe records.
NCTI_TERMS = ("ncti_seli_raw", "ncti_ncc_raw", "ncti_vc_raw")
#: Sign of each raw term in the combined NCTI score.
_NCTI_SIGNS = {"ncti_seli_raw": 1.0, "ncti_ncc_raw": 1.0, "ncti_vc_raw": -1.0}
_NCTI_MIN_SHRINKAGE = 1e-10  # NCTI's floor; at the floor the code switches to the unshrunk SVD solver
_LDA_TOL = 1e-4  # scikit-learn's svd-solver rank tolerance (LinearDiscriminantAnalysis(tol=1e-4))


# ---------------------------------------------------------------------------------------------------- input helpers


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check(features: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) float64 features and (N,) int64 labels, validated."""
    x = _to_numpy(features)
    y = _to_numpy(labels)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"features must be a non-empty N×D array, got shape {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"labels must have shape ({x.shape[0]},) to match the features, got {tuple(y.shape)}")
    if y.dtype.kind not in "iu":
        raise DataError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0:
        raise DataError(f"labels must be non-negative, got min {int(y.min())}")
    return x.astype(np.float64, copy=False), y.astype(np.int64, copy=False)


def _stats_numpy(stats: ClassStats) -> dict[str, np.ndarray] | None:
    """The statistics of x / scale (see :meth:`ClassStats.normalised`; LogME and H-score do not depend on the scale
    of the features) as float64 numpy arrays; None when they are non-finite or hold no sample."""
    stats = stats.normalised()
    parts = {name: getattr(stats, name).detach().cpu().double().numpy()
             for name in ("counts", "sums", "scatter", "shift")}
    if stats.nonfinite > 0 or not all(np.isfinite(v).all() for v in parts.values()) or parts["counts"].sum() <= 0:
        return None
    return parts


# ---------------------------------------------------------------------------------------------------- LogME


def _logme_core(gram: np.ndarray, fty: np.ndarray, yty: np.ndarray, n: float, tol: float, max_iter: int) -> float:
    """Mean over targets of the maximised LogME evidence / N, from FᵀF, Fᵀy and yᵀy only.

    Args:
        gram: (D, D) FᵀF.
        fty: (D, C) columns Fᵀy_c.
        yty: (C,) y_cᵀy_c.
        n: N.
        tol: Convergence tolerance: a target is done when α and β change by at most ``tol`` relatively, or its
            evidence / N by at most ``tol · max(1, |evidence / N|)``.
        max_iter: Iteration cap (a RuntimeWarning is issued when it is hit).

    In the eigenbasis FᵀF = V diag(σ) Vᵀ, t = VᵀFᵀy (eigenvalues ≤ D·eps·σ_max are exact zeros, their t is dropped):
    m = V (βt/(α + βσ)), ‖m‖² = Σ β²t²/(α + βσ)², and
    ‖y − Fm‖² = r₀ + Σ_{σ>0} t²α²/(σ(α + βσ)²) with r₀ = yᵀy − Σ_{σ>0} t²/σ the least-squares residual (exactly 0
    when F has full row rank, i.e. N nonzero eigenvalues). Writing the residual this way keeps it accurate when it
    is tiny. log|αI + βFᵀF| runs over all D eigenvalues, the zero ones included.

    The supremum may lie on a boundary, where the iteration drifts instead of converging: α → ∞ (the features do
    not help: y ~ N(0, β⁻¹I), best at β = N/yᵀy) or, when F has full row rank (N ≤ D), β → ∞ (noise-free fit:
    y ~ N(0, α⁻¹FFᵀ), best at α = N / Σ t²/σ²). Both limits are evaluated in closed form and each target returns
    the largest of the iterate's evidence and the applicable limits; a drifting iteration stops on the evidence
    criterion. α and β are kept in [1e-200, 1e200] and the updates avoid squaring α + βσ, so nothing overflows.
    """
    d = gram.shape[0]
    sigma, vecs = np.linalg.eigh(0.5 * (gram + gram.T))  # (D,), (D, D)
    sigma = np.clip(sigma, 0.0, None)
    pos = sigma > sigma[-1] * d * _EPS if sigma[-1] > 0 else np.zeros(d, dtype=bool)  # (D,) numerically nonzero
    t = vecs[:, pos].T @ fty  # (P, C)
    sp = sigma[pos][:, None]  # (P, 1)
    t2 = np.square(t)  # (P, C)
    full_row_rank = int(pos.sum()) >= n
    r0 = np.zeros_like(yty) if full_row_rank else np.maximum(yty - (t2 / sp).sum(0), 0.0)  # (C,)
    n_zero = d - int(pos.sum())  # eigenvalues that are exactly 0: each adds log α to log|αI + βFᵀF|

    def evidence_of(a: np.ndarray, b: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, ...]:
        tc = t[:, cols]  # (P, C')
        den = a + b * sp  # (P, C')
        gamma = (b * sp / den).sum(0)  # (C',) effective number of well-determined parameters
        m2 = np.maximum(np.square(b * tc / den).sum(0), _TINY)  # (C',) ‖m‖²
        res = np.maximum(r0[cols] + (np.square(a * tc / den) / sp).sum(0), _TINY)  # (C',) ‖y − Fm‖²
        logdet = np.log(den).sum(0) + n_zero * np.log(a)  # (C',)
        ev = (0.5 * d * np.log(a) + 0.5 * n * np.log(b) - 0.5 * logdet - 0.5 * b * res - 0.5 * a * m2
              - 0.5 * n * _LOG_2PI) / n  # (C',)
        return ev, gamma, m2, res

    c = fty.shape[1]
    alpha, beta = np.ones(c), np.ones(c)  # (C,), (C,): the paper's starting point
    ev, gamma, m2, res = evidence_of(alpha, beta, np.arange(c))
    done = np.zeros(c, dtype=bool)
    for _ in range(max_iter):
        act = np.flatnonzero(~done)  # only unconverged targets are updated
        if act.size == 0:
            break
        a_old, b_old = alpha[act], beta[act]
        a_new = np.clip(gamma[act] / m2[act], _PARAM_MIN, _PARAM_MAX)
        b_new = np.clip(np.maximum(n - gamma[act], 0.0) / res[act], _PARAM_MIN, _PARAM_MAX)
        ev_new, gamma[act], m2[act], res[act] = evidence_of(a_new, b_new, act)
        step = (np.abs(a_new - a_old) <= tol * a_old) & (np.abs(b_new - b_old) <= tol * b_old)
        flat = np.abs(ev_new - ev[act]) <= tol * np.maximum(1.0, np.abs(ev_new))
        done[act] = step | flat
        alpha[act], beta[act], ev[act] = a_new, b_new, ev_new
    if not done.all():
        warnings.warn(f"LogME: the fixed-point iteration did not converge in {max_iter} steps (tol={tol:g}) for "
                      f"{int((~done).sum())} of {c} targets", RuntimeWarning, stacklevel=3)
    # α → ∞ limit: log N(y; 0, β⁻¹I) at β = N / yᵀy
    ev = np.maximum(ev, -0.5 * (_LOG_2PI + np.log(np.maximum(yty, _TINY) / n) + 1.0))
    if full_row_rank:  # β → ∞ limit: log N(y; 0, α⁻¹FFᵀ) at its best α
        q = (t2 / np.square(sp)).sum(0)  # (C,) yᵀ(FFᵀ)⁻¹y
        a_inf = n / np.maximum(q, _TINY)
        ev_inf = (-0.5 * n * _LOG_2PI - 0.5 * np.log(sp).sum() + 0.5 * n * np.log(a_inf) - 0.5 * n) / n
        ev = np.maximum(ev, ev_inf)
    return float(np.mean(ev))


def logme_score(features: Any, labels: Any, tol: float = 1e-10, max_iter: int = 10000) -> float:
    """LogME of (features, labels) for classification, as in the ICML 2021 paper.

    Features are used as given (no centring, no bias column), in float64. The evidence of every class that occurs in
    ``labels`` is maximised over (α, β) by the fixed-point iteration, divided by N and averaged over those classes
    (classes without samples are skipped; the reference code would include them when they lie below max(labels)).
    Unlike the reference code (11 iterations, 1 % tolerance on α/β, ε = 1e-5 added to ‖m‖² and the residual),
    iteration runs to ``tol`` and adds no ε, so the value is the evidence maximum itself; the log-determinant
    always runs over all D eigenvalues of FᵀF, so N < D is handled (cf. thuml/LogME issue #23). Where the supremum
    lies on a boundary (α → ∞ for uninformative features; β → ∞ for a noise-free fit when N ≤ D) the iteration
    drifts; those limits are evaluated in closed form and the supremum is returned.

    Args:
        features: (N, D) array or tensor.
        labels: (N,) integer class labels (≥ 0).
        tol: Convergence tolerance (relative change of α and β, or of the per-class evidence / N).
        max_iter: Iteration cap.

    Returns:
        The LogME score (a log density per sample; only differences between candidates are meaningful). NaN for
        non-finite features.

    Raises:
        DataError: Bad shapes or labels, or labels of a single class (a one-class target is fitted perfectly by
            the constant, so its "evidence" says nothing about the features).
    """
    x, y = _check(features, labels)
    classes, inv = np.unique(y, return_inverse=True)
    _check_two_classes(classes.size)
    if not np.isfinite(x).all():
        return _NAN
    onehot = np.zeros((x.shape[0], classes.size))  # (N, C)
    onehot[np.arange(x.shape[0]), inv] = 1.0
    return _logme_core(x.T @ x, x.T @ onehot, onehot.sum(0), float(x.shape[0]), tol, max_iter)


def logme_from_stats(stats: ClassStats, tol: float = 1e-10, max_iter: int = 10000) -> float:
    """LogME from the probe's additive statistics (one streaming pass), equal to :func:`logme_score` on the same data.

    With c the shift, S the scatter of x − c, s_k the class sums of x − c and s = Σ_k s_k:
    FᵀF = S + s cᵀ + c sᵀ + N c cᵀ, Fᵀy_k = s_k + n_k c, y_kᵀy_k = n_k. Classes without samples are skipped.

    Args:
        stats: Statistics of one layer (after ``all_reduce`` when distributed).
        tol: Convergence tolerance (see :func:`logme_score`).
        max_iter: Iteration cap.

    Returns:
        The LogME score; NaN when the statistics hold no sample or non-finite values.

    Raises:
        DataError: Samples of a single class (see :func:`logme_score`).
    """
    p = _stats_numpy(stats)
    if p is None:
        return _NAN
    counts, sums, c = p["counts"], p["sums"], p["shift"]
    _check_two_classes(int((counts > 0).sum()))
    n = float(counts.sum())
    s = sums.sum(0)  # (D,)
    gram = p["scatter"] + np.outer(s, c) + np.outer(c, s) + n * np.outer(c, c)  # (D, D)
    present = counts > 0
    fty = (sums[present] + counts[present, None] * c).T  # (D, C)
    return _logme_core(gram, fty, counts[present], n, tol, max_iter)


def _check_two_classes(present: int) -> None:
    if present < 2:
        raise DataError(f"LogME needs samples of at least 2 classes, got {present}")


# ---------------------------------------------------------------------------------------------------- H-score


def _hscore_core(cov_total: np.ndarray, cov_between: np.ndarray, rcond: float | None) -> float:
    """tr(cov_total⁺ cov_between) through the eigendecomposition of cov_total.

    Eigenvalues at or below ``rcond · λ_max`` (default D·eps, numpy's ``matrix_rank`` convention) are treated as
    zero. Each kept direction contributes u_iᵀ B u_i / λ_i, which lies in [0, 1] exactly (B ≼ total covariance);
    the terms are clipped to that range to keep rounding in ill-conditioned directions from leaking in.
    """
    d = cov_total.shape[0]
    lam, u = np.linalg.eigh(0.5 * (cov_total + cov_total.T))  # (D,), (D, D)
    if not lam.size or lam[-1] <= 0:
        return _NAN
    cut = (d * _EPS if rcond is None else rcond) * lam[-1]
    keep = lam > cut
    uk = u[:, keep]  # (D, r)
    quad = ((uk.T @ cov_between) * uk.T).sum(1)  # (r,) u_iᵀ B u_i
    return float(np.clip(quad / lam[keep], 0.0, 1.0).sum())


def hscore(features: Any, labels: Any, rcond: float | None = None) -> float:
    """H-score tr(cov(f)⁺ cov(E[f | y])) of in-memory features.

    Both covariances are normalised by N (the normalisation cancels); cov(E[f | y]) = (1/N) Σ_k n_k (μ_k − μ)(μ_k − μ)ᵀ.

    Args:
        features: (N, D) array or tensor.
        labels: (N,) integer labels.
        rcond: Relative eigenvalue cut-off of the pseudo-inverse; default D·eps.

    Returns:
        The H-score, in [0, K − 1]; NaN for non-finite or constant features.
    """
    x, y = _check(features, labels)
    if not np.isfinite(x).all():
        return _NAN
    n = x.shape[0]
    xc = x - x.mean(0)  # (N, D)
    classes, inv = np.unique(y, return_inverse=True)
    counts = np.bincount(inv).astype(np.float64)  # (C,)
    means = np.zeros((classes.size, x.shape[1]))  # (C, D), of the centred features
    np.add.at(means, inv, xc)
    means /= counts[:, None]
    between = (means.T * counts) @ means / n  # (D, D)
    return _hscore_core(xc.T @ xc / n, between, rcond)


def hscore_from_stats(stats: ClassStats, rcond: float | None = None) -> float:
    """H-score from the probe's additive statistics (equal to :func:`hscore` on the same data).

    Args:
        stats: Statistics of one layer.
        rcond: Relative eigenvalue cut-off of the pseudo-inverse; default D·eps.

    Returns:
        The H-score; NaN for empty, non-finite or constant statistics.
    """
    p = _stats_numpy(stats)
    if p is None:
        return _NAN
    counts, sums = p["counts"], p["sums"]
    n = float(counts.sum())
    s = sums.sum(0)  # (D,)
    total = (p["scatter"] - np.outer(s, s) / n) / n  # (D, D), shift-invariant
    present = counts > 0
    dev = sums[present] / counts[present, None] - s / n  # (C, D) μ_k − μ
    between = (dev.T * counts[present]) @ dev / n  # (D, D)
    return _hscore_core(total, between, rcond)


# ---------------------------------------------------------------------------------------------------- NCTI


def _pca(x: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact PCA: (N, r) scores and (r,) explained variances (/(N − 1), scikit-learn's convention), r ≤ min(N, D).

    For N ≥ D the principal axes come from the eigendecomposition of the D×D scatter matrix (several times faster
    than an SVD of the N×D data for reservoir-sized inputs; the scores are still projections of the data), otherwise
    from the thin SVD of the centred data.
    """
    n, d = x.shape
    r = min(n_components, n, d)
    xc = x - x.mean(0)
    if n >= d:
        lam, vecs = np.linalg.eigh(xc.T @ xc)  # ascending
        axes = vecs[:, ::-1][:, :r]  # (D, r)
        var = np.clip(lam[::-1][:r], 0.0, None)
    else:
        _, sv, vt = np.linalg.svd(xc, full_matrices=False)  # sv: (N,), vt: (N, D)
        axes, var = vt[:r].T, np.square(sv[:r])
    return xc @ axes, var / max(n - 1, 1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    np.exp(z, out=z)
    return z / z.sum(1, keepdims=True)


def _lda(x: np.ndarray, y: np.ndarray, k: int, shrinkage: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Linear discriminant analysis with scikit-learn's semantics; returns (centred projections Z, posteriors P).

    ``shrinkage=None`` follows the ``svd`` solver: features scaled by the within-class standard deviations, within
    directions with singular value ≤ 1e-4 of the (1/√N-scaled) residuals dropped, discriminant directions with
    between-class singular value ≤ 1e-4 · the largest dropped; the posterior lives in the kept discriminant space.
    A float follows the ``eigen`` solver with a fixed shrinkage s: Σ_W = (1 − s) Σ_k π_k C_k + s · tr(…)/d · I and the
    same shrinkage of the total covariance, directions = the top min(K − 1, d) generalised eigenvectors of
    (Σ_T − Σ_W, Σ_W) normalised to vᵀΣ_W v = 1, posterior from the full Σ_W⁻¹. Covariances are normalised by the
    sample counts (scikit-learn ≥ 1.x; older releases divided the svd solver's within scatter by N − K, which only
    changes the posterior's temperature).

    Args:
        x: (N, d) features.
        y: (N,) labels in [0, k), every class present.
        k: Number of classes (≥ 2).
        shrinkage: None or s in (0, 1].

    Returns:
        Z (N, q) with zero column means and P (N, k).
    """
    n, d = x.shape
    counts = np.bincount(y, minlength=k).astype(np.float64)  # (k,)
    priors = counts / n
    means = np.zeros((k, d))  # (k, d)
    np.add.at(means, y, x)
    means /= counts[:, None]
    xbar = priors @ means  # (d,)
    resid = x - means[y]  # (N, d) within-class residuals
    if shrinkage is None:
        std = resid.std(0)
        std[std == 0] = 1.0
        _, sv, vt = np.linalg.svd(resid / std / math.sqrt(n), full_matrices=False)
        r = int((sv > _LDA_TOL).sum())
        if r == 0:  # no within-class spread left: every projection and posterior is uninformative
            return np.zeros((n, 0)), np.tile(priors, (n, 1))
        whiten = (vt[:r] / std).T / sv[:r]  # (d, r): whitenᵀ Σ_W whiten = I
        between = np.sqrt(counts / (k - 1))[:, None] * (means - xbar) @ whiten  # (k, r)
        _, sb, vbt = np.linalg.svd(between, full_matrices=False)
        q = int((sb > _LDA_TOL * sb[0]).sum()) if sb.size and sb[0] > 0 else 0
        scalings = whiten @ vbt[:q].T  # (d, q)
        post = scalings
    else:
        def shrink(cov: np.ndarray) -> np.ndarray:
            return (1.0 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)

        xc = x - xbar
        sw = shrink(resid.T @ resid / n)  # (d, d) Σ_k π_k C_k, shrunk
        st = shrink(xc.T @ xc / n)  # (d, d)
        lam, u = np.linalg.eigh(sw)
        pos = lam > lam[-1] * d * _EPS
        whiten = u[:, pos] / np.sqrt(lam[pos])  # (d, r)
        ev, ve = np.linalg.eigh(whiten.T @ (st - sw) @ whiten)  # ascending
        q = min(k - 1, ve.shape[1])
        scalings = whiten @ ve[:, ::-1][:, :q]  # (d, q) top generalised eigenvectors
        post = whiten
    z = (x - xbar) @ scalings  # (N, q)
    z -= z.mean(0)
    # log posterior up to a per-row constant: −½‖(x − μ_k)W‖² + log π_k = (x W)·(μ_k W) − ½‖μ_k W‖² + log π_k + c(x);
    # both sides are taken relative to the global mean to keep the products small.
    px, pm = (x - xbar) @ post, (means - xbar) @ post  # (N, r'), (k, r')
    logits = px @ pm.T - 0.5 * np.square(pm).sum(1) + np.log(priors)  # (N, k)
    return z, _softmax(logits)


def _nuclear(a: np.ndarray) -> float:
    return float(np.linalg.svd(a, compute_uv=False).sum()) if a.size else 0.0


def ncti_terms(features: Any, labels: Any, n_components: int = 64, seed: int = 0) -> dict[str, float]:
    """The three raw NCTI terms of one feature matrix (``BUserName/NCTI`` ``NCTI_Score``).

    Steps: exact PCA to r = min(n_components, N, D) dimensions; shrinkage s = max(exp(−Σ of the first 32 explained
    variances), 1e-10); LDA (svd solver when s is at the floor, else eigen solver with shrinkage s, see :func:`_lda`);
    then

    * ``ncti_seli_raw`` = ‖Z − mean(Z)‖_* (nuclear norm of the centred ≤ K − 1 LDA projections);
    * ``ncti_ncc_raw`` = mean_i P[i, y_i] (mean LDA posterior of the true class);
    * ``ncti_vc_raw`` = log Σ_c ‖P[y = c]‖_* (class-wise nuclear norms of the posterior blocks).

    Rows with a non-finite feature are dropped. Only classes present in ``labels`` take part. Note the shrinkage
    depends on the feature scale (PCA variances are in raw units), as in the reference code.

    Args:
        features: (N, D) array or tensor.
        labels: (N,) integer labels.
        n_components: PCA dimension cap (64 in NCTI).
        seed: Accepted for API stability; the PCA here is exact (the reference's scikit-learn PCA may use a randomised
            solver for large inputs), so the terms are deterministic and do not depend on it.

    Returns:
        ``{"ncti_seli_raw", "ncti_ncc_raw", "ncti_vc_raw"}``; NaN values when fewer than two classes or samples remain.
    """
    del seed
    x, y = _check(features, labels)
    ok = np.isfinite(x).all(1)
    x, y = x[ok], y[ok]
    out = dict.fromkeys(NCTI_TERMS, _NAN)
    classes, inv = np.unique(y, return_inverse=True)
    if classes.size < 2 or x.shape[0] <= classes.size:
        return out
    xp, var = _pca(x, n_components)
    s = max(math.exp(-float(var[:32].sum())), _NCTI_MIN_SHRINKAGE)
    z, p = _lda(xp, inv, classes.size, None if s <= _NCTI_MIN_SHRINKAGE else s)
    out["ncti_seli_raw"] = _nuclear(z)
    out["ncti_ncc_raw"] = float(p[np.arange(inv.size), inv].mean())
    out["ncti_vc_raw"] = math.log(sum(_nuclear(p[inv == c]) for c in range(classes.size)))
    return out


def ncti_combine(terms: Sequence[Mapping[str, float]]) -> list[float]:
    """NCTI scores of a candidate set (models, or the layers of one model): mm(seli) + mm(ncc) − mm(vc).

    mm(t)_m = (t_m − min t)/(max t − min t) over the candidates with a finite term; a term that is equal for all
    candidates carries no ranking information and normalises to 0. Candidates with a missing or non-finite term get
    NaN. The score is relative to the candidate set: adding or removing a candidate changes everyone's score.

    Args:
        terms: One mapping per candidate with the keys of :data:`NCTI_TERMS`.

    Returns:
        One score per candidate (higher = more transferable).
    """
    m = len(terms)
    total = np.zeros(m)
    for key, sign in _NCTI_SIGNS.items():
        v = np.array([float(t.get(key, _NAN)) if t.get(key) is not None else _NAN for t in terms], dtype=np.float64)
        fin = np.isfinite(v)
        if not fin.any():
            return [_NAN] * m
        lo, hi = v[fin].min(), v[fin].max()
        norm = (v - lo) / (hi - lo) if hi > lo else np.where(fin, 0.0, _NAN)
        total += sign * norm
    return [float(t) for t in total]


# ---------------------------------------------------------------------------------------------------- all at once


def scores_from_stats(stats: ClassStats, features: Any = None, labels: Any = None) -> dict[str, float]:
    """Transferability scores of one layer.

    Args:
        stats: The layer's additive statistics (global after ``all_reduce``).
        features: Optional (n, D) sample of the layer's features (e.g. ``FeatureReservoir.features``).
        labels: Their (n,) labels.

    Returns:
        ``logme`` and ``hscore`` (from ``stats``), plus the raw NCTI terms (:data:`NCTI_TERMS`, from the sample) when
        ``features`` and ``labels`` are given and non-empty.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # degenerate layers end up NaN
        out = {"logme": logme_from_stats(stats), "hscore": hscore_from_stats(stats)}
    if features is not None and labels is not None and len(labels) > 0:
        out.update(ncti_terms(features, labels))
    return out
