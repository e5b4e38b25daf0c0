"""The fixed simplex-ETF head: the closed form W Wᵀ = s²·K/(K−1)·(I − 11ᵀ/K), nothing of it trains, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nc_finetune.adapt import build_classifier
from nc_finetune.adapt.etf import ETFHead, simplex_etf
from nc_finetune.errors import ConfigError
from nc_finetune.select import select_blocks
from nc_finetune.train.loop import TrainData, Trainer
from tests.conftest import load_bert, train_config


@pytest.mark.parametrize(("k", "d", "scale"), [(2, 1, 1.0), (3, 2, 1.0), (4, 16, 2.5), (10, 9, 1.0), (10, 64, 0.3)])
def test_etf_closed_form(k: int, d: int, scale: float) -> None:
    w = simplex_etf(k, d, scale=scale, seed=1).double()  # (K, D)
    assert w.shape == (k, d)
    expected = scale**2 * k / (k - 1) * (torch.eye(k, dtype=torch.float64) - 1.0 / k)
    torch.testing.assert_close(w @ w.T, expected, atol=1e-5 * scale**2, rtol=0)
    # Equivalently: unit rows (times the scale), pairwise cosine -1/(K-1), rows summing to zero.
    norms = w.norm(dim=1)
    torch.testing.assert_close(norms, torch.full((k,), scale, dtype=torch.float64), atol=1e-5, rtol=0)
    cos = (w / norms[:, None]) @ (w / norms[:, None]).T
    off = cos[~torch.eye(k, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1.0 / (k - 1)), atol=1e-5, rtol=0)


def test_etf_seed_rotates_the_frame_only() -> None:
    a, b = simplex_etf(5, 12, seed=0), simplex_etf(5, 12, seed=1)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a @ a.T, b @ b.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(simplex_etf(5, 12, seed=0), a)


@pytest.mark.parametrize(("k", "d", "scale"), [(5, 3, 1.0), (1, 4, 1.0), (3, 4, 0.0), (3, 4, float("nan"))])
def test_etf_refuses_impossible_frames(k: int, d: int, scale: float) -> None:
    with pytest.raises(ConfigError):
        simplex_etf(k, d, scale=scale)


def test_etf_head_has_no_parameters_and_gives_w_h() -> None:
    head = ETFHead(6, 4, scale=2.0)
    assert list(head.parameters()) == []
    h = torch.randn(3, 6)
    torch.testing.assert_close(head(h), h @ head.weight.T)


def _sel(bb):
    return select_blocks(None, bb.blocks, strategy="manual", manual=[1])


def test_etf_classifier_trains_only_the_block(bert_dir: Path, text_data, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    bb = load_bert(bert_dir)
    adapted = build_classifier(bb, 2, method="finetune", selection=_sel(bb), head="etf", etf_scale=3.0)
    model = adapted.model
    assert isinstance(model.nc_head, ETFHead)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("backbone.hf.encoder.layer.1.") for n in trainable)
    assert adapted.parameter_counts()["head_params"] == 0
    before = model.nc_head.weight.clone()
    split = TrainData(train=text_data["train"], test=text_data["test"])
    Trainer(adapted, bb, split, train_config(epochs=1), tmp_path, progress=False).fit()
    torch.testing.assert_close(model.nc_head.weight, before, rtol=0, atol=0)
    assert "nc_head.weight" not in adapted.trainable_state_dict()


def test_etf_with_lora_saves_no_head(bert_dir: Path) -> None:
    pytest.importorskip("peft")
    bb = load_bert(bert_dir)
    adapted = build_classifier(bb, 2, method="lora", selection=_sel(bb), head="etf", lora_r=2)
    trainable = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_etf_with_linear_probe_is_refused(bert_dir: Path) -> None:
    bb = load_bert(bert_dir)
    with pytest.raises(ConfigError, match="train nothing"):
        build_classifier(bb, 2, method="linear_probe", head="etf")
    with pytest.raises(ConfigError, match="adapt.head"):
        build_classifier(bb, 2, method="finetune", selection=_sel(bb), head="cosine")
