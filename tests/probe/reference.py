"""Brute-force numpy reference for the collapse metrics, written straight from method.md §0, §1.2, §3, §5.8.

Independent of nc_finetune on purpose (never import the package here): explicit per-class loops, scipy's pinv of
Σ_B, an explicit pairwise CDNV loop and an explicit nearest-class-centre argmin. Slow; for tests only.
"""

from __future__ import annotations

import itertools

import numpy as np
import scipy.linalg


def _etf_distance(g: np.ndarray) -> float:
    k = g.shape[0]
    etf = (np.eye(k) - np.ones((k, k)) / k) / np.sqrt(k - 1)
    return float(np.linalg.norm(g / np.linalg.norm(g) - etf))


def reference_metrics(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics of one layer from raw features (N×D) and labels (N,), by the definitions."""
    h = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    n, d = h.shape
    k = num_classes
    mu_g = h.sum(axis=0) / n
    mu = np.zeros((k, d))
    counts = np.zeros(k)
    var = np.zeros(k)
    sigma_w = np.zeros((d, d))
    for c in range(k):
        hc = h[y == c]
        counts[c] = len(hc)
        mu[c] = hc.mean(axis=0)
        for x in hc:
            r = x - mu[c]
            sigma_w += np.outer(r, r)
            var[c] += r @ r
        var[c] /= len(hc)
    sigma_w /= n
    mbar = (mu - mu_g).T  # (D, K)
    sigma_b = np.zeros((d, d))
    ss_b = np.zeros((d, d))
    for c in range(k):
        sigma_b += np.outer(mbar[:, c], mbar[:, c]) / k
        ss_b += counts[c] * np.outer(mbar[:, c], mbar[:, c]) / n
    out = {
        "nc1": float(np.trace(sigma_w @ scipy.linalg.pinv(sigma_b)) / k),
        "nc1_trace": float(np.trace(sigma_w) / np.trace(sigma_b)),
        "sep_fuzziness": float(np.trace(sigma_w @ scipy.linalg.pinv(ss_b))),
        "nc2": _etf_distance(mbar.T @ mbar),
    }
    pairs = []
    for i, j in itertools.combinations(range(k), 2):
        diff = mu[i] - mu[j]
        pairs.append((var[i] + var[j]) / (2.0 * (diff @ diff)))
    out["cdnv"] = float(np.mean(pairs))
    best = -np.inf
    for i in range(k):
        for j in range(k):
            if i != j:
                best = max(best, mu[i] @ mu[j] / (np.linalg.norm(mu[i]) * np.linalg.norm(mu[j])))
    out["discrim"] = float(1.0 - best)
    correct = 0
    for x, c in zip(h, y, strict=True):
        dists = [np.sum((x - mu[j]) ** 2) for j in range(k)]
        correct += int(np.argmin(dists) == c)
    out["ncc_accuracy"] = correct / n
    if weight is not None:
        w = np.asarray(weight, dtype=np.float64)
        b = np.zeros(k) if bias is None else np.asarray(bias, dtype=np.float64)
        out["nc3"] = _etf_distance(w @ mbar)
        out["nc4_bias"] = float(np.linalg.norm(w @ mu_g + b))
    return out


def reference_moments(features: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Class means, global mean, Σ_W, Σ_B and per-class variances by the definitions."""
    h = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    n, d = h.shape
    mu = np.stack([h[y == c].mean(axis=0) for c in range(num_classes)])
    mu_g = h.mean(axis=0)
    sigma_w = sum(np.outer(x - mu[c], x - mu[c]) for x, c in zip(h, y, strict=True)) / n
    sigma_b = sum(np.outer(m - mu_g, m - mu_g) for m in mu) / num_classes
    var = np.array([np.mean(np.sum((h[y == c] - mu[c]) ** 2, axis=1)) for c in range(num_classes)])
    return {"class_means": mu, "global_mean": mu_g, "within_cov": sigma_w, "between_cov": sigma_b, "variances": var}


def simplex_etf(num_classes: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """A (D, K) matrix whose unit-norm columns form a randomly rotated simplex ETF (cos = −1/(K−1))."""
    k = num_classes
    q, _ = np.linalg.qr(rng.standard_normal((dim, k)))  # (D, K) orthonormal columns
    return np.sqrt(k / (k - 1)) * q @ (np.eye(k) - np.ones((k, k)) / k)
