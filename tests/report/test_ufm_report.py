"""UFM demonstration report: closed form reached, ufm.json / ufm.png written, degenerate regime refused up front."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nc_finetune.errors import UserError
from nc_finetune.report import ufm_report
from nc_finetune.report.ufm_report import format_ufm, run_ufm

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_oracle_reaches_closed_form_and_writes_artefacts(tmp_path: Path) -> None:
    # method.md §6.2 oracle row (the defaults): K=4, n=5, d=8, λ_W=λ_H=5e-3, λ_b=1e-3.
    summary = run_ufm(tmp_path)
    cf, reached = summary["closed_form"], summary["reached"]
    assert cf["w_norm_sq"] == pytest.approx(7.478779, abs=1e-6)
    assert cf["f_star"] == pytest.approx(0.1836919957, abs=1e-10)
    assert len(reached["w_norm_sq"]) == 4
    assert all(abs(v - 7.478779) < 1e-4 for v in reached["w_norm_sq"])
    assert reached["nc1"] < 1e-6 and reached["nc2"] < 1e-4 and reached["nc3"] < 1e-4
    assert reached["weight_to_mean_ratio"] == pytest.approx(math.sqrt(5.0), rel=1e-6)
    assert abs(reached["objective_gap"]) < 1e-10 and reached["converged"]
    history = summary["history"]
    assert len(history) == reached["iterations"] > 1
    assert {"step", "loss", "nc1", "nc2", "nc3"} <= set(history[0])

    on_disk = json.loads((tmp_path / "ufm.json").read_text(encoding="utf-8"))
    assert set(on_disk) == {"parameters", "closed_form", "reached", "history", "versions"}
    assert on_disk["parameters"]["num_classes"] == 4 and on_disk["parameters"]["lambda_b"] == 1e-3
    assert on_disk["closed_form"]["w_norm_sq"] == cf["w_norm_sq"]
    assert len(on_disk["history"]) == len(history)
    assert (tmp_path / "ufm.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not list(tmp_path.glob(".*.tmp"))

    text = format_ufm(summary)
    assert "7.478779" in text and "0.1836919957" in text and "2.236068" in text and "converged" in text
    on_disk["reached"]["nc1"] = None  # NaN is stored as null
    assert "nan /" in format_ufm(on_disk)


def test_degenerate_regime_raises_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_train(*args, **kwargs):
        raise AssertionError("train_ufm must not be called in the collapse-to-zero regime")

    monkeypatch.setattr(ufm_report, "train_ufm", must_not_train)
    # K√(nλ_Wλ_H) = 3·√(10·0.04) = 1.897 >= 1: the optimum is W = H = 0.
    with pytest.raises(UserError, match=r"1\.89737 >= 1.*collapse to zero.*choose K\*sqrt"):
        run_ufm(tmp_path, num_classes=3, n_per_class=10, dim=6, lambda_w=0.2, lambda_h=0.2, lambda_b=0.0)
    with pytest.raises(UserError, match="max_iter"):
        run_ufm(tmp_path, max_iter=0)
    with pytest.raises(UserError, match="dim"):
        run_ufm(tmp_path, dim=0)
    assert not any(tmp_path.iterdir())


def test_dimension_below_k_minus_1_is_refused_before_training(tmp_path: Path, monkeypatch) -> None:
    """A simplex ETF of K classes needs K-1 dimensions: with d = 2 < K-1 = 3 the trained optimum stays above the
    closed-form f*, so printing the closed form as "the optimum" would be wrong."""
    from nc_finetune.ufm import train_ufm, ufm_optimum

    res = train_ufm(4, 5, 2, 5e-3, 5e-3, 1e-3, seed=0, max_iter=500)
    assert res.loss > ufm_optimum(4, 5, 5e-3, 5e-3)["f_star"] + 1e-2  # independent: the closed form is not reached

    monkeypatch.setattr(ufm_report, "train_ufm", lambda *a, **k: pytest.fail("trained despite d < K-1"))
    with pytest.raises(UserError, match=r"needs dim >= K-1 = 3 .*got dim 2"):
        run_ufm(tmp_path, num_classes=4, dim=2)
    assert not any(tmp_path.iterdir())
