"""Transferability scores: LogME against a brute-force evidence maximisation, H-score against the direct formula,
NCTI terms against a scikit-learn reference, and the streaming (statistics-only) paths against the in-memory ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from nc_finetune.errors import DataError
from nc_finetune.probe.stats import ClassStats
from nc_finetune.transfer.scores import (
    NCTI_TERMS,
    hscore,
    hscore_from_stats,
    logme_from_stats,
    logme_score,
    ncti_combine,
    ncti_terms,
    scores_from_stats,
)


def _data(n: int, d: int, k: int, seed: int, offset: float = 0.5, sep: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes with random means, anisotropic noise and a constant offset."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % k)
    x = rng.standard_normal((n, d)) * rng.uniform(0.3, 3.0, d) + sep * rng.standard_normal((k, d))[labels] + offset
    return x, labels


def _stats(x: np.ndarray, y: np.ndarray, k: int, chunk: int = 17) -> ClassStats:
    st = ClassStats(k, x.shape[1])
    for i in range(0, len(y), chunk):
        st.update(torch.as_tensor(x[i : i + chunk]), torch.as_tensor(y[i : i + chunk]))
    return st


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# ---------------------------------------------------------------------------------------------------- LogME


def _log_evidence(log_a: float, log_b: float, f: np.ndarray, y: np.ndarray) -> float:
    """log p(y | F, α, β) written out directly (no eigendecomposition)."""
    a, b = math.exp(log_a), math.exp(log_b)
    n, d = f.shape
    amat = a * np.eye(d) + b * f.T @ f
    m = b * np.linalg.solve(amat, f.T @ y)
    logdet = np.linalg.slogdet(amat)[1]
    return (d / 2 * math.log(a) + n / 2 * math.log(b) - n / 2 * math.log(2 * math.pi)
            - b / 2 * float(np.sum((y - f @ m) ** 2)) - a / 2 * float(m @ m) - 0.5 * logdet)


def _brute_logme(f: np.ndarray, labels: np.ndarray) -> float:
    """Grid over (log α, log β), then Nelder–Mead from the best grid point; evidence / N averaged over classes."""
    out = []
    grid = np.linspace(-10.0, 14.0, 13)
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        best = max((_log_evidence(a, b, f, y), a, b) for a in grid for b in grid)
        res = minimize(lambda p, y=y: -_log_evidence(p[0], p[1], f, y), [best[1], best[2]], method="Nelder-Mead",
                       options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 4000})
        out.append(-res.fun / f.shape[0])
    return float(np.mean(out))


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(("n", "d", "k"), [(60, 8, 3), (20, 30, 3)], ids=["N>D", "N<D"])
def test_logme_matches_brute_force_evidence_maximum(n: int, d: int, k: int) -> None:
    x, y = _data(n, d, k, seed=1)
    assert _rel(logme_score(x, y), _brute_logme(x, y)) < 1e-4


@pytest.mark.filterwarnings("error")
def test_logme_boundary_supremum_for_uninformative_features() -> None:
    """Without usable signal the evidence is maximised as α → ∞: log N(y; 0, β⁻¹I) at β = N / n_k."""
    n, k = 90, 3
    y = np.arange(n) % k
    counts = np.bincount(y)
    limit = float(np.mean(-0.5 * (np.log(2 * np.pi) + np.log(counts / n) + 1.0)))
    assert logme_score(np.zeros((n, 4)), y) == pytest.approx(limit, rel=1e-12)
    noise = np.random.default_rng(12).standard_normal((n, 3))  # chance correlations can only lift it a little
    assert limit <= logme_score(noise, y) < limit + 0.01


@pytest.mark.filterwarnings("error")
def test_logme_from_stats_equals_in_memory_value() -> None:
    for n, d, k, offset in [(300, 12, 5, 0.0), (300, 12, 5, 100.0), (30, 40, 4, 3.0)]:
        x, y = _data(n, d, k, seed=2, offset=offset)
        assert _rel(logme_from_stats(_stats(x, y, k)), logme_score(x, y)) < 1e-8


def test_logme_accepts_tensors_skips_empty_classes_and_flags_nonfinite() -> None:
    x, y = _data(80, 6, 3, seed=3)
    ref = logme_score(x, y)
    assert logme_score(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)) == pytest.approx(ref, rel=1e-5)
    assert logme_from_stats(_stats(x, y, 5)) == pytest.approx(ref, rel=1e-8)  # classes 3 and 4 have no sample
    bad = x.copy()
    bad[0, 0] = np.nan
    assert math.isnan(logme_score(bad, y))
    assert math.isnan(logme_from_stats(ClassStats(3, 6)))


def test_logme_refuses_a_single_class() -> None:
    """One class is fitted perfectly by the constant: a finite 'evidence' would rank the features on nothing."""
    x, _ = _data(40, 5, 2, seed=6)
    one = np.zeros(40, dtype=np.int64)
    with pytest.raises(DataError, match="LogME needs samples of at least 2 classes, got 1"):
        logme_score(x, one)
    with pytest.raises(DataError, match="at least 2 classes, got 1"):
        logme_from_stats(_stats(x, one, 3))


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("factor", [1e200, 1e-200])
def test_scores_from_stats_do_not_depend_on_the_size_of_the_features(factor: float) -> None:
    """LogME and H-score are scale-invariant (α, β and the covariances absorb the scale): statistics of features
    ×1e±200, whose second moments would overflow or underflow, give the in-memory values of the unscaled features."""
    x, y = _data(200, 8, 4, seed=7)
    st = _stats(x * factor, y, 4)
    assert _rel(logme_from_stats(st), logme_score(x, y)) < 1e-8
    assert _rel(hscore_from_stats(st), hscore(x, y)) < 1e-8


def test_logme_prefers_informative_features() -> None:
    x, y = _data(200, 10, 4, seed=4, sep=3.0)
    noise = np.random.default_rng(5).standard_normal(x.shape) * x.std(0)
    assert logme_score(x, y) > logme_score(noise, y)


# ---------------------------------------------------------------------------------------------------- H-score


def _brute_hscore(x: np.ndarray, y: np.ndarray) -> float:
    g = np.zeros_like(x)
    for c in np.unique(y):
        g[y == c] = x[y == c].mean(0)
    return float(np.trace(np.linalg.pinv(np.cov(x.T, bias=True)) @ np.cov(g.T, bias=True)))


def test_hscore_matches_direct_formula_and_streaming_path() -> None:
    x, y = _data(300, 12, 5, seed=6, offset=50.0)
    ref = _brute_hscore(x, y)
    assert _rel(hscore(x, y), ref) < 1e-9
    assert _rel(hscore_from_stats(_stats(x, y, 5)), ref) < 1e-8
    assert 0.0 < ref < 4.0  # bounded by K − 1


def test_hscore_saturates_when_samples_do_not_exceed_dimension() -> None:
    x, y = _data(20, 40, 4, seed=7)
    assert hscore(x, y) == pytest.approx(3.0, abs=1e-8)
    assert hscore_from_stats(_stats(x, y, 4)) == pytest.approx(3.0, abs=1e-8)


# ---------------------------------------------------------------------------------------------------- NCTI


def _sklearn_ncti(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """NCTI's recipe written with scikit-learn (exact PCA) as the oracle for the numpy implementation."""
    decomposition = pytest.importorskip("sklearn.decomposition")
    da = pytest.importorskip("sklearn.discriminant_analysis")
    pca = decomposition.PCA(n_components=min(64, *x.shape), svd_solver="full")
    xp = pca.fit_transform(x)
    s = max(math.exp(-pca.explained_variance_[:32].sum()), 1e-10)
    lda = da.LinearDiscriminantAnalysis(solver="svd") if s == 1e-10 else \
        da.LinearDiscriminantAnalysis(solver="eigen", shrinkage=s)
    z = lda.fit_transform(xp, y)
    z = z - z.mean(0)
    p = lda.predict_proba(xp)
    return {"ncti_seli_raw": float(np.linalg.norm(z, "nuc")),
            "ncti_ncc_raw": float(p[np.arange(len(y)), y].mean()),
            "ncti_vc_raw": math.log(sum(np.linalg.norm(p[y == c], "nuc") for c in np.unique(y)))}


@pytest.mark.parametrize("scale", [0.05, 1.0], ids=["shrinkage-eigen", "svd"])
def test_ncti_terms_match_sklearn_reference(scale: float) -> None:
    x, y = _data(150, 80, 4, seed=8)
    x = x * scale  # small variances: shrinkage > 1e-10 (eigen solver); unit scale: floor (svd solver)
    got, ref = ncti_terms(x, y), _sklearn_ncti(x, y)
    for key in NCTI_TERMS:
        assert got[key] == pytest.approx(ref[key], rel=1e-7), key


def test_ncti_terms_reward_separability() -> None:
    x, y = _data(120, 16, 4, seed=9, sep=3.0)
    shuffled = np.random.default_rng(0).permutation(y)
    sep, shuf = ncti_terms(x, y), ncti_terms(x, shuffled)
    assert sep["ncti_seli_raw"] > shuf["ncti_seli_raw"]
    assert sep["ncti_ncc_raw"] > shuf["ncti_ncc_raw"]
    assert sep["ncti_vc_raw"] < shuf["ncti_vc_raw"]
    assert ncti_combine([sep, shuf]) == [2.0, -1.0]


def test_ncti_degenerate_inputs_give_nan() -> None:
    x, _ = _data(30, 5, 2, seed=10)
    assert all(math.isnan(v) for v in ncti_terms(x, np.zeros(30, dtype=np.int64)).values())


def test_ncti_combine_normalises_each_term_across_candidates() -> None:
    terms = [{"ncti_seli_raw": 1.0, "ncti_ncc_raw": 0.5, "ncti_vc_raw": 2.0},
             {"ncti_seli_raw": 3.0, "ncti_ncc_raw": 0.5, "ncti_vc_raw": 1.0},
             {"ncti_seli_raw": 2.0, "ncti_ncc_raw": 0.5, "ncti_vc_raw": 1.5},
             {"ncti_seli_raw": float("nan"), "ncti_ncc_raw": 0.5, "ncti_vc_raw": 1.0}]
    got = ncti_combine(terms)
    assert got[:3] == pytest.approx([-1.0, 1.0, 0.0])  # constant ncc term normalises to 0
    assert math.isnan(got[3])


def test_scores_from_stats_keys() -> None:
    x, y = _data(90, 6, 3, seed=11)
    st = _stats(x, y, 3)
    assert set(scores_from_stats(st)) == {"logme", "hscore"}
    out = scores_from_stats(st, torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y))
    assert set(out) == {"logme", "hscore", *NCTI_TERMS}
    assert all(math.isfinite(v) for v in out.values())
    assert out["logme"] == pytest.approx(logme_score(x, y), rel=1e-8)
