"""Rank correlations (Kendall τ, weighted τ), ranking tables, the ranking plot and the probe's transfer-score option."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from nc_finetune.transfer.ranking import SCORE_DIRECTIONS, correlations, plot_rank, rank_table
from nc_finetune.transfer.scores import NCTI_TERMS, ncti_combine, scores_from_stats

PNG = b"\x89PNG\r\n\x1a\n"


def test_monotone_and_reversed_scores() -> None:
    truth = [60.0, 70.0, 75.0, 80.0, 90.0]
    up = correlations([1, 2, 3, 4, 5], truth, lower_is_better=False)
    assert up["kendall_tau"] == pytest.approx(1.0) and up["weighted_tau"] == pytest.approx(1.0) and up["n"] == 5
    down = correlations([1, 2, 3, 4, 5], truth, lower_is_better=True)
    assert down["kendall_tau"] == pytest.approx(-1.0) and down["weighted_tau"] == pytest.approx(-1.0)
    nc1 = correlations([5.0, 4.0, 3.0, 2.0, 1.0], truth, lower_is_better=True)  # less collapse ⇒ worse
    assert nc1["kendall_tau"] == pytest.approx(1.0) and nc1["weighted_tau"] == pytest.approx(1.0)


def test_weighted_tau_is_scipys_default_and_nan_safe() -> None:
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal(9), rng.standard_normal(9)
    got = correlations(list(s) + [math.nan], list(t) + [1.0], lower_is_better=False)
    assert got["n"] == 9
    assert got["weighted_tau"] == pytest.approx(sps.weightedtau(s, t).statistic)
    assert got["kendall_tau"] == pytest.approx(sps.kendalltau(s, t).statistic)
    few = correlations([1.0, 2.0, math.nan, math.inf], [1.0, 2.0, 3.0, 4.0], lower_is_better=False)
    assert few["n"] == 2 and math.isnan(few["kendall_tau"]) and math.isnan(few["weighted_tau"])
    with pytest.raises(ValueError):
        correlations([1.0, 2.0], [1.0], lower_is_better=False)


def test_score_directions() -> None:
    assert all(SCORE_DIRECTIONS[k] for k in ("nc1", "nc1_trace", "cdnv"))
    assert not any(SCORE_DIRECTIONS[k] for k in ("ncti", "logme", "hscore", "ncc_accuracy", "params"))


def _rows() -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for i, acc in enumerate([70.0, 80.0, 75.0, 90.0]):
        terms = dict(zip(NCTI_TERMS, (acc + rng.uniform(0, 1), acc / 100, 10.0 - acc / 10), strict=True))
        rows.append({"name": f"m{i}", "acc": acc, "nc1": 100.0 / acc, "logme": acc / 10, "params": 1e6 * (4 - i),
                     **terms})
    return rows


def test_rank_table_rankings_correlations_and_ncti() -> None:
    rows = _rows()
    table = rank_table(rows, "acc")
    assert table["truth_ranking"] == ["m3", "m1", "m2", "m0"]
    assert table["rankings"]["nc1"] == table["truth_ranking"] == table["rankings"]["logme"]
    assert table["rankings"]["params"] == ["m0", "m1", "m2", "m3"]
    assert table["ncti"] == pytest.approx(ncti_combine(rows))
    assert table["rankings"]["ncti"] == table["truth_ranking"]
    for key in ("nc1", "logme", "ncti"):
        assert table["correlations"][key]["kendall_tau"] == pytest.approx(1.0), key
        assert table["correlations"][key]["weighted_tau"] == pytest.approx(1.0), key
    assert table["correlations"]["params"]["kendall_tau"] < 0
    assert table["notes"] == [] and "acc" not in table["scores"]
    assert "ncti" not in rows[0]  # rows are not modified


def test_rank_table_without_truth_or_size_column() -> None:
    rows = [{"name": "a", "nc1": 2.0}, {"name": "b", "nc1": math.nan}, {"name": "c", "nc1": 1.0}]
    table = rank_table(rows, None)
    assert table["rankings"]["nc1"] == ["c", "a", "b"]  # NaN last
    assert table["correlations"] == {} and table["truth"] is None and table["ncti"] is None
    assert any("size ranker" in note for note in table["notes"])


def test_plot_rank_writes_png(tmp_path) -> None:
    rows = _rows()
    out = plot_rank(rows, "acc", tmp_path / "rank.png", title="toy")
    assert out.read_bytes()[:8] == PNG
    bars = plot_rank(rows, None, tmp_path / "sub" / "bars.png")
    assert bars.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bars.png", "rank.png", "sub"]  # no temp files left


def test_probe_option_adds_transfer_scores() -> None:
    from nc_finetune.backbones import load_backbone
    from nc_finetune.data import Split
    from nc_finetune.probe.runner import probe

    torch.manual_seed(0)
    bb = load_backbone("timm:test_vit", pretrained=False, image_size=32)
    rng = np.random.default_rng(0)
    labels = np.arange(24, dtype=np.int64) % 3
    images = np.clip(rng.integers(0, 200, size=(24, 32, 32)) + 25 * labels[:, None, None], 0, 255).astype(np.uint8)
    split = Split(images, labels)
    res = probe(bb, split, 3, batch_size=12, layers=[0, -1], ncc_samples=16, device="cpu", progress=False,
                scorers=(scores_from_stats,))
    for rec in res.layers:
        assert {"logme", "hscore", *NCTI_TERMS} <= set(rec)
        assert math.isfinite(rec["logme"]) and math.isfinite(rec["hscore"])
        assert math.isfinite(rec["ncti_ncc_raw"])
    plain = probe(bb, split, 3, batch_size=12, layers=[0], ncc_samples=16, device="cpu", progress=False)
    assert "logme" not in plain.layers[0]


def test_rounding_noise_is_a_tie_not_a_ranking() -> None:
    saturated = [2.0, 2.0 + 4e-15, 2.0 - 3e-15, 2.0 + 1e-15]  # e.g. H-score = K − 1 when N <= D
    got = correlations(saturated, [1.0, 2.0, 3.0, 4.0], lower_is_better=False)
    assert math.isnan(got["kendall_tau"]) and math.isnan(got["weighted_tau"])
    table = rank_table([{"name": str(i), "hscore": v} for i, v in enumerate(saturated)], None)
    assert table["rankings"]["hscore"] == ["0", "1", "2", "3"]
