"""Bootstrap of the zero-cost rules: resampled NC1 against a brute-force formula, pick counts, the stable pick."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nc_finetune.errors import ConfigError
from nc_finetune.select import select_blocks
from nc_finetune.select.bootstrap import bootstrap_probes, collect_block_features

from .test_strategies import make_blocks, make_probe


def _features(sep: list[float], n_per_class: int = 30, k: int = 3, d: int = 6, seed: int = 0):
    """Gaussian classes whose class means are ``sep[l]`` apart at block l (bigger = more collapsed)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(k).repeat_interleave(n_per_class)
    centres = torch.randn(k, d, generator=g, dtype=torch.float64)
    feats = {l: (s * centres[labels] + torch.randn(len(labels), d, generator=g, dtype=torch.float64)).float()
             for l, s in enumerate(sep)}
    return feats, labels


def _nc1_pinv(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """(1/K) tr(Σ_W Σ_B^†), Σ_W over all N samples, Σ_B unweighted over classes (method.md §1.2)."""
    mu_g = x.mean(0)
    means = np.stack([x[y == c].mean(0) for c in range(k)])
    r = x - means[y]
    sw = r.T @ r / len(x)
    mb = means - mu_g
    sb = mb.T @ mb / k
    return float(np.trace(sw @ np.linalg.pinv(sb)) / k)


def test_replicates_are_stratified_resamples_and_nc1_matches_the_pinv_formula():
    feats, labels = _features([1.0, 2.0, 4.0])
    blocks = make_blocks(3)
    probes = bootstrap_probes(feats, labels, blocks, 3, replicates=4, seed=7)
    assert len(probes) == 4
    # Replay the same draws: per class, as many as the class has, with replacement.
    rng = np.random.default_rng(7)
    y = labels.numpy()
    by_class = [np.flatnonzero(y == c) for c in range(3)]
    for p in probes:
        idx = np.concatenate([rng.choice(c, size=len(c), replace=True) for c in by_class])
        for rec in p.blocks():
            x = feats[rec["index"]].double().numpy()[idx]
            assert rec["nc1"] == pytest.approx(_nc1_pinv(x, y[idx], 3), rel=1e-6)
    with pytest.raises(ConfigError, match="replicates must be >= 1"):
        bootstrap_probes(feats, labels, blocks, 3, replicates=0)


def test_a_clear_knee_is_picked_in_every_replicate():
    # Separation grows geometrically except at block 3, which adds nothing: knee's stall.
    sep = [0.5, 1.0, 2.0, 2.0, 4.0, 8.0]
    feats, labels = _features(sep, n_per_class=60)
    blocks = make_blocks(6)
    full = make_probe([_nc1_pinv(feats[i].double().numpy(), labels.numpy(), 3) for i in range(6)], blocks)
    probes = bootstrap_probes(feats, labels, blocks, 3, replicates=20, seed=0)
    sel = select_blocks(full, blocks, strategy="knee", bootstrap_probes=probes)
    boot = sel.details["bootstrap"]
    assert sel.indices == [3]
    assert boot["stable_selection"] == ["blocks.3"] and boot["stability"] == 1.0
    assert boot["pick_frequency"] == {"blocks.3": 1.0} and boot["replicates"] == 20
    assert sel.ranking[0] == 3 and sel.scores[3] == 1.0
    assert "picked in 100% of them" in sel.rationale and "bootstrap: 20 resampled probes" in sel.explain()


def test_an_unstable_rule_reports_split_picks_and_takes_the_most_frequent_one():
    # Two equally strong stalls (blocks 2 and 4): the pick flips between them from resample to resample.
    sep = [0.5, 1.0, 1.05, 2.1, 2.2, 4.4]
    feats, labels = _features(sep, n_per_class=15, seed=3)
    blocks = make_blocks(6)
    full = make_probe([_nc1_pinv(feats[i].double().numpy(), labels.numpy(), 3) for i in range(6)], blocks)
    probes = bootstrap_probes(feats, labels, blocks, 3, replicates=40, seed=1)
    sel = select_blocks(full, blocks, strategy="knee", bootstrap_probes=probes)
    boot = sel.details["bootstrap"]
    freq = boot["pick_frequency"]
    assert len(freq) >= 2 and math.isclose(sum(freq.values()), 1.0)  # one block per replicate
    top = max(freq.values())
    assert boot["stability"] == top < 1.0
    # The chosen block is the most frequent pick.
    assert freq[sel.blocks[0]["name"]] == top
    # Counted independently: the knee rule on every replicate.
    from nc_finetune.select import rank_blocks

    firsts = [rank_blocks("knee", blocks, p).order[0] for p in probes]
    assert freq[sel.blocks[0]["name"]] == pytest.approx(firsts.count(sel.indices[0]) / 40)


def test_stall_bootstrap_under_a_block_budget():
    sep = [0.5, 1.0, 2.0, 4.0, 4.1, 4.2]
    feats, labels = _features(sep, n_per_class=40)
    blocks = make_blocks(6)
    full = make_probe([_nc1_pinv(feats[i].double().numpy(), labels.numpy(), 3) for i in range(6)], blocks)
    probes = bootstrap_probes(feats, labels, blocks, 3, replicates=10)
    sel = select_blocks(full, blocks, strategy="stall", max_blocks=2, stall_reference="min", bootstrap_probes=probes)
    assert len(sel.indices) == 2
    assert sel.details["bootstrap"]["stable_selection"] == [b["name"] for b in sel.blocks]
    with pytest.raises(ConfigError, match="bootstrap applies to the knee and stall rules"):
        select_blocks(full, blocks, strategy="last_k", bootstrap_probes=probes)


def test_collect_block_features_matches_the_probe(image_data):
    from nc_finetune.probe.runner import probe

    from ..conftest import load_cnn

    bb = load_cnn()
    split = image_data["train"]
    feats, labels = collect_block_features(bb, split, batch_size=5, device="cpu")
    assert sorted(feats) == [b.index for b in bb.blocks]
    assert labels.tolist() == list(split.labels)
    result = probe(bb, split, 3, batch_size=5, device="cpu", progress=False)
    for rec in result.blocks():
        x = feats[rec["index"]].double().numpy()
        assert x.shape == (len(split), rec["dim"])
        assert _nc1_pinv(x, labels.numpy(), 3) == pytest.approx(rec["nc1"], rel=1e-4)
