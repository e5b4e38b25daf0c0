"""Budgeted selection, the Selection record (JSON, explain) and its peft LoRA arguments."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from nc_finetune.errors import ConfigError
from nc_finetune.select import Ranking, Selection, fill_budget, select_blocks

from .test_strategies import Blk, log_curve, make_blocks, make_probe


def test_max_blocks_takes_the_top_of_the_ranking_in_forward_order():
    sel = select_blocks(None, make_blocks(6), strategy="last_k", max_blocks=3, head_params=10)
    assert sel.indices == [3, 4, 5]
    assert sel.module_names == ["backbone.blocks.3", "backbone.blocks.4", "backbone.blocks.5"]
    assert (sel.block_params, sel.head_params, sel.trainable_params, sel.total_params) == (300, 10, 310, 610)
    assert sel.trainable_fraction == pytest.approx(310 / 610)


def test_no_budget_means_one_block():
    sel = select_blocks(None, make_blocks(6), strategy="last_k")
    assert sel.indices == [5] and sel.budget["defaulted"]


def test_max_param_fraction_skips_blocks_that_do_not_fit():
    # Backbone = 1000 (blocks 600 + stem 400). Budget 0.25 -> 250 params.
    blocks = make_blocks(4, [50, 100, 150, 300])
    sel = select_blocks(None, blocks, strategy="last_k", max_param_fraction=0.25, head_params=20, total_params=1020,
                        fill="skip")
    # Ranking 3, 2, 1, 0: block 3 (300) does not fit, 2 (150) fits, 1 (100) fits exactly (250), 0 no longer fits.
    assert sel.indices == [1, 2]
    assert sel.block_params == 250
    assert sel.budget["skipped"] == ["blocks.3"]
    assert sel.budget["selected_fraction"] == pytest.approx(0.25)
    # Both budgets: max_blocks stops first.
    sel = select_blocks(None, blocks, strategy="last_k", max_blocks=1, max_param_fraction=0.25, total_params=1000,
                        fill="skip")
    assert sel.indices == [2]


# Sizes 50, 100, 150, 300 (blocks 0..3) in a backbone of 1000 parameters (600 in the blocks + 400 outside).
_SIZES = [50, 100, 150, 300]


def _fill(order: list[int], fraction: float, fill: str, max_blocks: int | None = None) -> tuple[list[int], list[int]]:
    ranking = Ranking(order=order, scores={i: float(len(order) - p) for p, i in enumerate(order)}, rationale="")
    return fill_budget(ranking, make_blocks(4, _SIZES), max_blocks=max_blocks, max_param_fraction=fraction,
                       backbone_params=1000, fill=fill)


def test_fill_stop_never_passes_over_a_ranked_block():
    # Limit 250: block 1 (100) fits, block 3 (300) does not -> stop there, even though block 0 (50) would fit.
    assert _fill([1, 3, 0, 2], 0.25, "stop") == ([1], [])
    # Limit 450: 3 (300) + 2 (150) = 450 fits exactly, then 0 does not fit: stop.
    assert _fill([3, 2, 0, 1], 0.45, "stop") == ([2, 3], [])
    # max_blocks still applies.
    assert _fill([3, 2, 0, 1], 0.45, "stop", max_blocks=1) == ([3], [])


def test_fill_skip_tops_up_with_lower_ranked_blocks():
    # Today's greedy: block 3 is passed over and block 0 (ranked third) tops the budget up.
    assert _fill([1, 3, 0, 2], 0.25, "skip") == ([0, 1], [3])
    assert _fill([3, 2, 0, 1], 0.45, "skip") == ([2, 3], [])


def test_fill_per_param_takes_rank_weight_per_parameter():
    # Rank weights 4, 3, 2, 1 for blocks 3, 2, 0, 1: per parameter 4/300, 3/150, 2/50, 1/100 -> order 0, 2, 3, 1.
    # Limit 450: 0 (50) + 2 (150) = 200; 3 (300) would make 500: skipped; 1 (100) -> 300.
    assert _fill([3, 2, 0, 1], 0.45, "per_param") == ([0, 1, 2], [3])
    # Equal weight per parameter (blocks 1 and 0: 4/100 and 2/50) keeps the ranking order.
    assert _fill([1, 3, 0, 2], 0.25, "per_param") == ([0, 1], [3])


def test_fill_stop_refuses_when_the_top_block_does_not_fit():
    with pytest.raises(ConfigError) as e:
        _fill([3, 2, 0, 1], 0.25, "stop")
    assert str(e.value) == ("selection budget max_param_fraction=0.25 cannot hold the top-ranked block 'blocks.3' "
                            "(30.0% of the parameters) and selection.fill=stop never passes over a block; raise the "
                            "budget or use selection.fill=skip or per_param")
    with pytest.raises(ConfigError, match="unknown selection fill policy 'greedy'"):
        _fill([3, 2, 0, 1], 0.25, "greedy")
    with pytest.raises(ConfigError, match="unknown selection fill policy"):
        select_blocks(None, make_blocks(4), strategy="last_k", fill="greedy")


def test_selection_records_fill_policy_what_the_budget_counts_and_where_it_stopped(tmp_path):
    blocks = make_blocks(4, _SIZES)
    sel = select_blocks(None, blocks, strategy="first_k", max_param_fraction=0.25, head_params=20, total_params=1020)
    # Default policy stop: 0 (50) + 1 (100) = 150, block 2 (150) would make 300 > 250.
    assert sel.indices == [0, 1]
    assert sel.budget["fill"] == "stop" and sel.budget["stopped_at"] == "blocks.2" and sel.budget["skipped"] == []
    # The fraction counts block parameters against the backbone (1000), not the head (20).
    assert sel.budget["selected_fraction"] == pytest.approx(0.15)
    assert "head is not counted" in sel.budget["counts"]
    text = Selection.load(sel.save(tmp_path / "selection.json")).explain()
    assert "fill: stop" in text and "stopped at blocks.2" in text and "head is not counted" in text
    assert "15.0% used" in text
    skip = select_blocks(None, blocks, strategy="last_k", max_param_fraction=0.25, total_params=1000, fill="skip")
    text = skip.explain()
    assert "fill: skip" in text and "skipped (over the fraction budget): blocks.3" in text
    assert skip.budget["stopped_at"] is None


def test_impossible_and_invalid_budgets():
    blocks = make_blocks(3, [23, 40, 40])
    with pytest.raises(ConfigError) as e:
        select_blocks(None, blocks, strategy="last_k", max_param_fraction=0.01, total_params=1000)
    assert str(e.value) == ("selection budget max_param_fraction=0.01 cannot hold any block: the smallest block "
                            "'blocks.0' has 2.3% of the parameters")
    for kw in ({"max_blocks": 0}, {"max_param_fraction": 0.0}, {"max_param_fraction": -0.5}, {"max_blocks": 1.5}):
        with pytest.raises(ConfigError, match="selection budget"):
            select_blocks(None, blocks, strategy="last_k", **kw)
    with pytest.raises(ConfigError, match="smaller than the blocks"):
        select_blocks(None, blocks, strategy="last_k", total_params=50)
    with pytest.raises(ConfigError, match="unknown selection strategy 'nc'.*knee"):
        select_blocks(None, blocks, strategy="nc")


def test_all_ignores_budget_and_manual_must_fit():
    blocks = make_blocks(4)
    sel = select_blocks(None, blocks, strategy="all", max_blocks=1)
    assert sel.indices == [0, 1, 2, 3] and sel.budget["ignored"]
    sel = select_blocks(None, blocks, strategy="manual", manual=["blocks.2", 0])
    assert sel.indices == [0, 2]
    with pytest.raises(ConfigError, match="max_blocks=1 cannot hold the 2 blocks"):
        select_blocks(None, blocks, strategy="manual", manual=[2, 0], max_blocks=1)


def test_nc_strategies_through_select_blocks():
    z = [0.0, -0.5, -1.0, -1.5, -1.5, -2.0, -2.5, -3.0]
    probe = make_probe(log_curve(z))
    assert select_blocks(probe, make_blocks(8), strategy="knee").indices == [4]
    assert select_blocks(probe, make_blocks(8), strategy="knee", max_blocks=2).indices == [4, 7]
    with pytest.raises(ConfigError, match="needs a probe"):
        select_blocks(None, make_blocks(8), strategy="stall")


def test_selection_json_round_trip(tmp_path):
    nc1 = log_curve([0.0, -0.5, -1.0, -1.0])
    nc1[1] = math.nan
    sel = select_blocks(make_probe(nc1), make_blocks(4), strategy="knee", max_blocks=2, head_params=7)
    path = sel.save(tmp_path / "selection.json")
    raw = json.loads(path.read_text())
    assert {"blocks", "trainable_params", "total_params", "module_names", "scores"} <= set(raw)
    assert raw["scores"]["1"] is None  # -inf stored as null (strict JSON)
    back = Selection.load(path)
    assert back.blocks == sel.blocks and back.module_names == sel.module_names and back.ranking == sel.ranking
    assert back.trainable_params == sel.trainable_params and back.budget == sel.budget
    assert back.scores[3] == sel.scores[3] and math.isnan(back.scores[1])
    text = back.explain()
    assert "backbone.blocks.3" in text and "knee" in text and "head 7" in text


# ----------------------------------------------------------------------------------------------------------- peft


class ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.mlp = nn.Sequential(nn.Linear(2, 4), nn.GELU(), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return x + self.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNet(nn.Module):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ConvBlock() for _ in range(n))
        self.norm = nn.LayerNorm(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.norm(x.mean((2, 3)))


class Clf(nn.Module):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.backbone = ConvNet(n)
        self.head = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _blocks_of(model: Clf) -> list[Blk]:
    return [Blk(i, f"blocks.{i}", sum(p.numel() for p in b.parameters())) for i, b in enumerate(model.backbone.blocks)]


def test_lora_kwargs_exact_targets_with_dot_boundary():
    model = Clf(n=11)  # "blocks.1" must not pick up modules of "blocks.10"
    sel = select_blocks(None, _blocks_of(model), strategy="manual", manual=[1])
    kw = sel.lora_kwargs(model, r=4, alpha=8, dropout=0.1)
    assert kw == {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,
        "target_modules": ["backbone.blocks.1.conv", "backbone.blocks.1.mlp.0", "backbone.blocks.1.mlp.2"],
        "modules_to_save": ["head"],
    }
    sel.verify(model)


def test_lora_kwargs_applied_with_peft_adapts_only_the_selected_blocks():
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    torch.manual_seed(0)
    model = Clf(n=3)
    sel = select_blocks(None, _blocks_of(model), strategy="manual", manual=["blocks.0", "blocks.2"],
                        head_params=sum(p.numel() for p in model.head.parameters()))
    kw = sel.lora_kwargs(model)
    pm = peft.get_peft_model(model, peft.LoraConfig(**kw))
    lora = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer))
    assert lora == kw["target_modules"]
    assert all(n.startswith(("backbone.blocks.0.", "backbone.blocks.2.")) for n in lora)
    assert isinstance(pm.base_model.model.head, ModulesToSaveWrapper)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert not any("blocks.1." in n for n in trainable)
    assert any("lora_A" in n and "blocks.2.conv" in n for n in trainable)
    assert pm(torch.randn(2, 2, 3, 3)).shape == (2, 3)


def test_lora_kwargs_and_verify_errors():
    model = Clf(n=3)
    blocks = _blocks_of(model)
    sel = select_blocks(None, blocks, strategy="manual", manual=[1], prefix="model.")
    with pytest.raises(ConfigError, match=r"module 'model\.blocks\.1' is not part of the model"):
        sel.verify(model)
    with pytest.raises(ConfigError, match="not part of the model"):
        sel.lora_kwargs(model)
    # A "block" holding only a norm layer has nothing LoRA can adapt.
    sel = select_blocks(None, [Blk(0, "norm", 4)], strategy="all")
    with pytest.raises(ConfigError, match="no Linear/Conv2d/Conv1D"):
        sel.lora_kwargs(model)
    sel = select_blocks(None, blocks, strategy="manual", manual=[1])
    with pytest.raises(ConfigError, match="'fc' is not part of the model"):
        sel.lora_kwargs(model, head="fc")


def test_repr_is_short():
    sel = select_blocks(None, make_blocks(60), strategy="last_k", max_blocks=2, head_params=10)
    assert repr(sel) == ("Selection(strategy='last_k', blocks=['blocks.58', 'blocks.59'], trainable_params=210 of "
                         "6,010 (3.5%))")


def test_lora_kwargs_default_head_is_the_classifier_head():
    from nc_finetune.adapt import Classifier

    backbone = Clf(n=3).backbone
    model = Classifier(backbone, 2, 3)  # build_classifier's head is `nc_head`
    sel = select_blocks(None, _blocks_of(Clf(n=3)), strategy="manual", manual=[1])
    assert sel.lora_kwargs(model)["modules_to_save"] == ["nc_head"]


def test_a_selection_section_taken_whole_is_the_keywords_it_holds():
    """``select_blocks(..., cfg=recipe.selection)`` picks what the keywords it holds pick; not both at once."""
    from nc_finetune.config import SelectionConfig

    blocks = make_blocks(6)
    cfg = SelectionConfig(strategy="random_k", max_blocks=None, max_param_fraction=0.5, fill="skip", seed=7)
    by_cfg = select_blocks(None, blocks, cfg=cfg, head_params=10)
    by_kw = select_blocks(None, blocks, strategy="random_k", max_param_fraction=0.5, fill="skip", seed=7,
                          head_params=10)
    assert by_cfg.to_dict() == by_kw.to_dict()
    other_seed = select_blocks(None, blocks, strategy="random_k", max_param_fraction=0.5, fill="skip", seed=8,
                               head_params=10)
    assert other_seed.indices != by_cfg.indices  # the section's seed was used, not the default
    manual = select_blocks(None, blocks, cfg=SelectionConfig(strategy="manual", blocks=[1, 4], max_blocks=None))
    assert manual.indices == [1, 4]
    with pytest.raises(TypeError, match="not both"):
        select_blocks(None, blocks, strategy="last_k", cfg=cfg)
