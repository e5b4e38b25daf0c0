"""Collapse metrics: closed-form oracles, brute-force reference, degenerate input, fits and the linear probe."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from nc_finetune.errors import DataError
from nc_finetune.probe.metrics import (
    collapse_metrics,
    equi_separation_fit,
    linear_probe_accuracy,
    metrics_from_stats,
)
from nc_finetune.probe.stats import ClassStats

from .reference import reference_metrics, simplex_etf

METRIC_KEYS = ("nc1", "nc1_trace", "sep_fuzziness", "cdnv", "nc2", "discrim", "ncc_accuracy")


def _imbalanced_data(k: int, d: int, seed: int, offset: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes with random means, anisotropic noise and very unequal class sizes (3 ... 60)."""
    rng = np.random.default_rng(seed)
    counts = rng.permutation(np.linspace(3, 60, k).astype(int))
    labels = rng.permutation(np.repeat(np.arange(k), counts))
    means = 2.0 * rng.standard_normal((k, d))
    noise = rng.standard_normal((labels.size, d)) * rng.uniform(0.2, 2.0, size=d)  # anisotropic
    return offset + means[labels] + noise, labels


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# ---------------------------------------------------------------------------------------------- exact simplex ETF


@pytest.mark.parametrize(("k", "d"), [(4, 4), (5, 20), (10, 64)])
def test_exact_etf_is_fully_collapsed(k: int, d: int) -> None:
    rng = np.random.default_rng(k)
    etf = simplex_etf(k, d, rng)  # (D, K)
    labels = np.repeat(np.arange(k), 7)
    offset = 1e4 * rng.uniform(0.5, 1.0, size=d)  # large offset on every coordinate
    features = etf.T[labels] + offset  # every sample of class k is column k (+ offset)
    mbar = etf - etf.mean(axis=1, keepdims=True)  # (D, K), equal to etf (columns sum to 0)
    out = collapse_metrics(features, labels, weight=mbar.T)
    for key in ("nc1", "nc1_trace", "sep_fuzziness", "cdnv", "nc2", "nc3"):
        assert abs(out[key]) <= 1e-10, (key, out[key])
    assert out["ncc_accuracy"] == 1.0


def test_noisy_etf_closed_forms() -> None:
    # method.md §6.2 item 3: K=5, d=20, σ=0.3. With 5000/class the relative sampling s.d. over 20 seeds is 0.6 %
    # for NC1 and 0.45 % for NC1_tr and CDNV (bias < 0.05 %); the tolerances below are >= 5 s.d.
    k, d, sigma, n = 5, 20, 0.3, 5000
    rng = np.random.default_rng(0)
    etf = simplex_etf(k, d, rng)
    labels = np.repeat(np.arange(k), n)
    features = etf.T[labels] + sigma * rng.standard_normal((k * n, d))
    out = collapse_metrics(features, labels)
    nc1 = sigma**2 * (k - 1) ** 2 / k
    assert _rel(out["nc1"], nc1) < 0.03
    assert _rel(out["nc1_trace"], d * sigma**2) < 0.025
    assert _rel(out["cdnv"], d * sigma**2 * (k - 1) / (2 * k)) < 0.025
    assert _rel(out["sep_fuzziness"], k * out["nc1"]) < 1e-10  # balanced: SS_b = Σ_B exactly
    assert out["nc2"] < 0.02  # sampling noise only: 0.010 ± 0.002 over seeds
    # Each wrong centre is 1.58 away: error ≈ (K−1)·Φ(−0.79/σ) ≈ 1.6 %; measured 0.985 ± 0.001 over seeds.
    assert 0.98 < out["ncc_accuracy"] < 0.99


# ---------------------------------------------------------------------------------------------- brute-force reference


@pytest.mark.parametrize(
    ("k", "d", "seed"),
    [(5, 2, 0), (4, 3, 1), (7, 50, 2), (6, 40, 3), (3, 200, 4), (12, 30, 5), (2, 1, 6)],
)
def test_metrics_match_reference_on_imbalanced_data(k: int, d: int, seed: int) -> None:
    features, labels = _imbalanced_data(k, d, seed)
    rng = np.random.default_rng(100 + seed)
    weight, bias = rng.standard_normal((k, d)), rng.standard_normal(k)
    ref = reference_metrics(features, labels, k, weight=weight, bias=bias)
    out = collapse_metrics(features, labels, num_classes=k, weight=weight, bias=bias)
    assert np.bincount(labels).max() > 3 * np.bincount(labels).min()  # really imbalanced
    for key, value in ref.items():
        assert _rel(out[key], value) < 1e-10, (key, out[key], value)


def test_nc1_with_low_rank_class_means() -> None:
    # K=6 sample class means in a 2-dimensional subspace of R^30: Σ_B has rank 2 < K−1, so the SVD cut-off must
    # drop the remaining (rounding-level) singular values exactly as pinv does.
    rng = np.random.default_rng(7)
    k, d = 6, 30
    basis = np.linalg.qr(rng.standard_normal((d, 2)))[0]  # (D, 2)
    means = rng.standard_normal((k, 2)) @ basis.T  # (K, D)
    labels = np.repeat(np.arange(k), 40)
    noise = rng.standard_normal((labels.size, d))
    for c in range(k):
        noise[labels == c] -= noise[labels == c].mean(0)  # sample class means are exactly `means`
    features = means[labels] + 0.3 * noise + 3.0
    ref = reference_metrics(features, labels, k)
    out = collapse_metrics(features, labels)
    for key in ("nc1", "sep_fuzziness", "nc1_trace", "cdnv", "nc2"):
        assert _rel(out[key], ref[key]) < 1e-10, (key, out[key], ref[key])


def test_numpy_and_torch_inputs_agree() -> None:
    features, labels = _imbalanced_data(4, 6, 11)
    a = collapse_metrics(features, labels)
    b = collapse_metrics(torch.from_numpy(features), torch.from_numpy(labels))
    c = collapse_metrics(torch.from_numpy(features).float(), torch.from_numpy(labels).int())
    assert a == b
    assert all(_rel(c[key], a[key]) < 1e-5 for key in ("nc1", "nc1_trace", "cdnv"))


# ---------------------------------------------------------------------------------------------- degenerate input


def test_equal_class_means_give_nan_and_warning() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((10, 5)) + 1e3
    features = np.concatenate([base, base[::-1], np.roll(base, 3, axis=0)])  # same points in every class
    labels = np.repeat(np.arange(3), 10)
    with pytest.warns(RuntimeWarning, match="layer 'blocks.3'.*class means are equal"):
        out = collapse_metrics(features, labels, name="blocks.3", weight=np.ones((3, 5)))
    for key in ("nc1", "nc1_trace", "sep_fuzziness", "cdnv", "nc2", "nc3", "ncc_accuracy"):
        assert math.isnan(out[key]), key
    assert out["discrim"] == pytest.approx(0.0, abs=1e-12)  # identical uncentred means: cos = 1


def test_nonfinite_features_are_counted_and_give_nan() -> None:
    features, labels = _imbalanced_data(3, 4, 1)
    features[5, 2] = np.nan
    features[9, 0] = np.inf
    stats = ClassStats(3, 4)
    stats.update(torch.from_numpy(features), torch.from_numpy(labels))
    assert stats.nonfinite == 2
    assert stats.total == len(labels) - 2
    with pytest.warns(RuntimeWarning, match="layer 'head'.*2 sample.*non-finite"):
        out = metrics_from_stats(stats, name="head")
    assert all(math.isnan(v) for v in out.values())
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert math.isnan(collapse_metrics(features, labels)["ncc_accuracy"])


def test_one_class_and_empty_class_give_nan() -> None:
    x = np.random.default_rng(0).standard_normal((20, 3))
    with pytest.warns(RuntimeWarning, match="at least 2 classes"):
        out = collapse_metrics(x, np.zeros(20, dtype=int))
    assert all(math.isnan(v) for v in out.values())
    with pytest.warns(RuntimeWarning, match=r"1 class\(es\) without samples \(class 2\)"):
        out = collapse_metrics(x, np.arange(20) % 2, num_classes=3)  # class 2 is empty
    assert math.isnan(out["nc1"])


def test_nonfinite_statistics_give_nan() -> None:
    stats = ClassStats(2, 3)
    stats.update(torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 0, 1]))
    stats.scatter[0, 0] = math.inf
    with pytest.warns(RuntimeWarning, match="non-finite statistics"):
        assert math.isnan(metrics_from_stats(stats)["nc1"])


def test_no_warning_on_healthy_input() -> None:
    features, labels = _imbalanced_data(4, 8, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collapse_metrics(features, labels)


# ---------------------------------------------------------------------------------------------- extreme sizes

SCALE_FREE_KEYS = ("nc1", "nc1_trace", "sep_fuzziness", "cdnv", "nc2", "discrim", "ncc_accuracy")


@pytest.mark.parametrize("factor", [1e200, 1e-200, 2.0**70, 3e-25])
def test_metrics_do_not_depend_on_the_size_of_the_features(factor: float) -> None:
    """Every metric is a ratio of moments: features ×1e200 (squares overflow) or ×1e-200 (squares underflow) give
    the brute-force values of the unscaled features, without a warning."""
    features, labels = _imbalanced_data(4, 6, 5)
    ref = reference_metrics(features, labels, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = collapse_metrics(features * factor, labels)
    for key in SCALE_FREE_KEYS:
        assert _rel(out[key], ref[key]) < 1e-9, (key, out[key], ref[key])


def test_ncc_accuracy_survives_a_large_offset() -> None:
    """NC1 is exact under a 1e12 offset (the statistics are shifted); NCC accuracy must be too (float32 storage of the
    raw features would keep nothing of the classes)."""
    features, labels = _imbalanced_data(4, 6, 6, offset=0.0)
    features += 2.0 * np.random.default_rng(7).standard_normal(features.shape)  # enough overlap for mistakes
    ref = reference_metrics(features, labels, 4)
    assert 0.5 < ref["ncc_accuracy"] < 1.0
    shifted = features + 1e12
    out = collapse_metrics(shifted, labels)
    assert out["ncc_accuracy"] == reference_metrics(shifted, labels, 4)["ncc_accuracy"] == ref["ncc_accuracy"]
    assert _rel(out["nc1"], ref["nc1"]) < 1e-4  # the input itself is rounded to 1e12 · eps ≈ 1e-4


def test_nc4_bias_keeps_the_units_of_the_features() -> None:
    features, labels = _imbalanced_data(3, 4, 7)
    weight, bias = np.random.default_rng(1).standard_normal((3, 4)), np.array([0.5, -1.0, 2.0])
    out = collapse_metrics(features * 1e200, labels, weight=weight * 1e-200, bias=bias)
    direct = np.linalg.norm((weight * 1e-200) @ (features * 1e200).mean(0) + bias)  # ‖W μ_G + b‖, no squares
    assert _rel(out["nc4_bias"], direct) < 1e-9
    assert _rel(out["nc3"], reference_metrics(features, labels, 3, weight=weight)["nc3"]) < 1e-9


@pytest.mark.parametrize(
    ("features", "labels", "num_classes", "match"),
    [
        (np.zeros((0, 3)), np.zeros(0, dtype=int), None, "non-empty"),
        (np.zeros(5), np.zeros(5, dtype=int), None, "N×D"),
        (np.zeros((5, 3)), np.zeros(4, dtype=int), None, "shape"),
        (np.zeros((5, 3)), np.array([0, 1, 2, 3, 4]), 3, r"\[0, 3\)"),
        (np.zeros((5, 3)), np.array([0, 1, -1, 1, 0]), None, "lie in"),
        (np.zeros((5, 3)), np.zeros(5), None, "integers"),
    ],
)
def test_bad_inputs_raise_data_error(features, labels, num_classes, match) -> None:
    with pytest.raises(DataError, match=match):
        collapse_metrics(features, labels, num_classes=num_classes)


def test_bad_classifier_shape_raises() -> None:
    features, labels = _imbalanced_data(3, 4, 0)
    with pytest.raises(DataError, match="weight"):
        collapse_metrics(features, labels, weight=np.zeros((4, 3)))


# ---------------------------------------------------------------------------------------------- equi-separation fit


def test_equi_separation_fit_recovers_geometric_decay() -> None:
    values = [3.0 * 0.7**l for l in range(8)]
    fit = equi_separation_fit(values)
    assert fit["rho"] == pytest.approx(0.7, rel=1e-12)
    assert fit["slope"] == pytest.approx(math.log(0.7), rel=1e-12)
    assert fit["intercept"] == pytest.approx(math.log(3.0), rel=1e-12)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    # Unusable entries are skipped but keep their layer index.
    values[2], values[5] = float("nan"), 0.0
    fit = equi_separation_fit(values)
    assert fit["rho"] == pytest.approx(0.7, rel=1e-12) and fit["n_points"] == 6.0
    noisy = equi_separation_fit([1.0, 0.5, 0.3, 0.1])
    assert 0.0 < noisy["r2"] < 1.0


def test_equi_separation_fit_needs_two_points() -> None:
    fit = equi_separation_fit([float("nan"), 2.0, -1.0])
    assert all(math.isnan(fit[key]) for key in ("rho", "slope", "intercept", "r2"))


# ---------------------------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_vs_shuffled() -> None:
    rng = np.random.default_rng(0)
    k, d, n = 10, 1280, 2000  # the size the probe must handle in well under a second (not timed here: shared CPU)
    means = rng.standard_normal((k, d))
    labels = np.arange(n) % k
    features = means[labels] + 3.0 * rng.standard_normal((n, d)) + 50.0  # offset: the probe standardises
    res = linear_probe_accuracy(features, labels, k, seed=0)
    assert res.accuracy > 0.95
    assert res.weight.shape == (k, d) and res.bias.shape == (k,)
    # (W, b) live in the raw feature space: they classify the raw features directly.
    raw_acc = float(((torch.from_numpy(features) @ res.weight.T + res.bias).argmax(1).numpy() == labels).mean())
    assert raw_acc > 0.95
    # Shuffled labels: nothing to learn, held-out accuracy at chance (0.1; 400 held-out samples, s.d. 0.015).
    shuffled = linear_probe_accuracy(features[:, :256], rng.permutation(labels), k, seed=0)
    assert shuffled.accuracy < 0.17


def test_linear_probe_is_seeded() -> None:
    features, labels = _imbalanced_data(4, 10, 9)
    features = features + 3.0 * np.random.default_rng(0).standard_normal(features.shape)  # not separable
    a, b = (linear_probe_accuracy(features, labels, 4, seed=1) for _ in range(2))
    assert a.accuracy == b.accuracy and torch.equal(a.weight, b.weight)


def test_linear_probe_weight_feeds_nc3() -> None:
    features, labels = _imbalanced_data(4, 10, 2)
    res = linear_probe_accuracy(features, labels, 4, holdout=0.0)
    out = collapse_metrics(features, labels, weight=res.weight, bias=res.bias)
    assert 0.0 <= out["nc3"] < 2.0 and math.isfinite(out["nc4_bias"])
