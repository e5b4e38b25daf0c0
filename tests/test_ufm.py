"""Unconstrained feature model: closed-form optimum (method.md §6.2) and training to it."""

from __future__ import annotations

import math

import pytest
import torch

from nc_finetune.errors import UserError
from nc_finetune.probe.metrics import collapse_metrics
from nc_finetune.ufm import train_ufm, ufm_optimum

ORACLE = {"num_classes": 4, "n_per_class": 5, "lambda_w": 5e-3, "lambda_h": 5e-3}
DEGENERATE = {"num_classes": 3, "n_per_class": 10, "lambda_w": 0.2, "lambda_h": 0.2}  # K√(nλ_Wλ_H) = 1.897


def test_closed_form_optimum() -> None:
    opt = ufm_optimum(**ORACLE)
    assert opt["w_norm_sq"] == pytest.approx(7.478779, abs=1e-6)
    assert opt["f_star"] == pytest.approx(0.1836919957, abs=1e-10)
    assert opt["weight_to_mean_ratio"] == pytest.approx(math.sqrt(5.0), rel=1e-15)


def test_closed_form_minimises_scalar_objective() -> None:
    # s* must be the minimiser of φ(s) = log(1 + (K−1)e^{−cs}) + Kλ_W s (checked on a grid around it).
    k, lam = 6, 1e-3
    opt = ufm_optimum(k, 8, lam, 2e-3)
    c = opt["c"]

    def phi(s: float) -> float:
        return math.log1p((k - 1) * math.exp(-c * s)) + k * lam * s

    assert phi(opt["w_norm_sq"]) == pytest.approx(opt["f_star"], rel=1e-14)
    for ds in (-1e-3, 1e-3, -0.5, 0.5):
        assert phi(opt["w_norm_sq"] + ds) > opt["f_star"]


def test_training_reaches_the_oracle() -> None:
    # method.md §6.2, unit test 1.
    res = train_ufm(dim=8, lambda_b=1e-3, seed=0, **ORACLE)
    opt = ufm_optimum(**ORACLE)
    assert res.converged and res.grad_norm <= 1e-9
    last = res.history[-1]
    assert last["nc1"] < 1e-6 and last["nc2"] < 1e-4 and last["nc3"] < 1e-4
    assert res.loss == pytest.approx(opt["f_star"], abs=1e-10)
    norms = res.W.square().sum(1)  # (K,)
    assert float((norms - 7.478779).abs().max()) < 1e-4
    mbar = res.H.reshape(4, 5, 8).mean(1) - res.H.mean(0)  # (K, D)
    assert float(res.W.norm() / mbar.norm()) == pytest.approx(math.sqrt(5.0), rel=1e-6)
    assert float(res.b.abs().max()) < 1e-6  # λ_b > 0 ⇒ b = 0
    # The public in-memory API agrees with the recorded history.
    out = collapse_metrics(res.H, res.labels, weight=res.W, bias=res.b)
    assert out["nc1"] < 1e-6 and out["nc2"] < 1e-4 and out["nc3"] < 1e-4 and out["ncc_accuracy"] == 1.0
    assert out["nc3"] == pytest.approx(last["nc3"], rel=1e-12)
    # History: one entry per iteration, loss non-increasing (L-BFGS with strong Wolfe decreases monotonically).
    assert [h["step"] for h in res.history] == list(range(1, len(res.history) + 1))
    losses = torch.tensor([h["loss"] for h in res.history])
    assert bool((losses[1:] <= losses[:-1] + 1e-15).all())
    assert res.history[0]["nc1"] > 1e-3  # it really started far from collapse


def test_degenerate_regime_raises() -> None:
    # method.md §6.2, unit test 5: the optimum is W = H = 0 and NC metrics are undefined.
    msg = r"collapse to zero.*choose K\*sqrt\(n\*lambda_w\*lambda_h\) < 1"
    with pytest.raises(UserError, match=msg):
        ufm_optimum(**DEGENERATE)
    with pytest.raises(UserError, match=msg):
        train_ufm(dim=6, lambda_b=0.0, **DEGENERATE)
    # The boundary itself is degenerate too.
    with pytest.raises(UserError, match="collapse to zero"):
        ufm_optimum(4, 1, 0.25, 0.25)  # K√(nλ_Wλ_H) = 1


def test_collapsed_to_zero_features_give_nan() -> None:
    # What the probe sees at the degenerate optimum (H = 0): NaN with a warning, never a number.
    with pytest.warns(RuntimeWarning, match="class means are equal"):
        out = collapse_metrics(torch.zeros(30, 6, dtype=torch.float64), torch.arange(3).repeat_interleave(10))
    assert math.isnan(out["nc1"]) and math.isnan(out["nc2"])


def test_invalid_arguments() -> None:
    with pytest.raises(UserError, match="num_classes"):
        ufm_optimum(1, 5, 1e-3, 1e-3)
    with pytest.raises(UserError, match="lambda"):
        ufm_optimum(4, 5, 0.0, 1e-3)
    with pytest.raises(UserError, match="lambda_b"):
        train_ufm(4, 5, 8, 5e-3, 5e-3, -1.0)
