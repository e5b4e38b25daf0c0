"""Block-ranking strategies: the NC rules on synthetic NC1 curves, the baselines and Auto-RGN."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from nc_finetune.errors import ConfigError
from nc_finetune.probe.result import ProbeResult
from nc_finetune.select import STRATEGIES, auto_rgn_scores, rank_blocks, rgn_tensors


@dataclass(frozen=True)
class Blk:
    index: int
    name: str
    num_params: int


def make_blocks(n: int, params: list[int] | None = None) -> list[Blk]:
    params = params or [100] * n
    return [Blk(i, f"blocks.{i}", params[i]) for i in range(n)]


def make_probe(nc1: list[float], blocks: list[Blk] | None = None) -> ProbeResult:
    blocks = blocks or make_blocks(len(nc1))
    layers = [{"index": b.index, "name": b.name, "is_block": True, "dim": 4, "num_params": b.num_params, "nc1": v}
              for b, v in zip(blocks, nc1, strict=True)]
    layers.append({"index": len(blocks), "name": "output", "is_block": False, "dim": 4, "num_params": 0,
                   "nc1": 0.001})
    return ProbeResult(layers=layers)


def log_curve(z: list[float]) -> list[float]:
    return [math.exp(v) for v in z]


# ----------------------------------------------------------------------------------------------------------- knee


def test_knee_ranks_the_stalled_block_first_and_breaks_ties_to_the_deeper_block():
    # Exact geometric decay by e^-0.5 per block, except block 4 which does not decrease at all.
    z = [0.0, -0.5, -1.0, -1.5, -1.5, -2.0, -2.5, -3.0]
    r = rank_blocks("knee", make_blocks(8), make_probe(log_curve(z)))
    # All other blocks progress equally (a tie) -> deep to shallow; block 0 is unscored and comes after.
    assert r.order == [4, 7, 6, 5, 3, 2, 1, 0]
    assert math.isnan(r.scores[0])
    # Shortfall = -slope - actual progress; block 4's actual progress is 0.
    slope = r.scores[4] * -1
    assert r.scores[7] == pytest.approx(-slope - 0.5)
    assert "Block 4 'blocks.4'" in r.rationale


def test_knee_uses_the_signed_shortfall_not_the_absolute_deviation():
    # Block 2 over-performs by a lot (drop 2.0), block 5 stalls (drop 0.1): only the stall is a shortfall.
    z = [0.0, -0.5, -2.5, -3.0, -3.5, -3.6, -4.1, -4.6]
    r = rank_blocks("knee", make_blocks(8), make_probe(log_curve(z)))
    assert r.order[0] == 5
    assert r.order.index(2) == 6  # the over-performer is the last scored block


def test_knee_non_finite_nc1_ranked_last_with_minus_inf_and_noted():
    z = [0.0, -0.5, -1.0, -1.5, -1.5, -2.0]
    nc1 = log_curve(z)
    nc1[2] = math.nan
    nc1[5] = 0.0
    r = rank_blocks("knee", make_blocks(6), make_probe(nc1))
    assert r.scores[2] == -math.inf and r.scores[5] == -math.inf
    assert r.order[-2:] == [5, 2]
    # Block 3's predecessor is block 1 (gap 2): progress (z1 - z3)/2 = 0.5 per block.
    assert r.order[0] == 4
    assert "Blocks 2, 5" in r.rationale


def test_knee_needs_probe_and_two_finite_blocks():
    with pytest.raises(ConfigError, match="needs a probe"):
        rank_blocks("knee", make_blocks(3), None)
    with pytest.raises(ConfigError, match="two or more"):
        rank_blocks("knee", make_blocks(3), make_probe([1.0, math.nan, math.nan]))


def test_probe_from_another_backbone_is_rejected():
    probe = make_probe([1.0, 0.5, 0.25], [Blk(0, "a", 1), Blk(1, "b", 1), Blk(2, "c", 1)])
    with pytest.raises(ConfigError, match="different backbone"):
        rank_blocks("knee", make_blocks(3), probe)


# ----------------------------------------------------------------------------------------------------------- stall


def test_stall_after_block_3_of_8_ranks_block_4_first():
    z = [0.0, -1.0, -2.0, -3.0, -3.01, -3.02, -3.03, -3.04]
    r = rank_blocks("stall", make_blocks(8), make_probe(log_curve(z)))
    assert r.order == [4, 5, 6, 7, 3, 2, 1, 0]
    assert r.scores[4] > r.scores[5] > r.scores[0]


def test_stall_monotone_to_the_end_ranks_the_last_block_first():
    z = [-float(i) for i in range(8)]
    r = rank_blocks("stall", make_blocks(8), make_probe(log_curve(z)))
    assert r.order == [7, 6, 5, 4, 3, 2, 1, 0]
    assert "keeps progressing" in r.rationale


def test_stall_fraction_moves_the_stall_point():
    # Remaining reductions after blocks 0..4: 4, 2, 1, 0.5, 0 of a total of 4.
    z = [0.0, -2.0, -3.0, -3.5, -4.0]
    assert rank_blocks("stall", make_blocks(5), make_probe(log_curve(z)), stall_fraction=0.2).order[0] == 4
    assert rank_blocks("stall", make_blocks(5), make_probe(log_curve(z)), stall_fraction=0.3).order[0] == 3
    with pytest.raises(ConfigError, match="stall_fraction"):
        rank_blocks("stall", make_blocks(5), make_probe(log_curve(z)), stall_fraction=1.5)


# ----------------------------------------------------------------------------------------------------------- baselines


def test_last_k_all_and_unknown_strategy():
    assert rank_blocks("last_k", make_blocks(4)).order == [3, 2, 1, 0]
    assert rank_blocks("first_k", make_blocks(4)).order == [0, 1, 2, 3]
    r = rank_blocks("all", make_blocks(4))
    assert r.order == [0, 1, 2, 3] and not r.uses_budget
    with pytest.raises(ConfigError, match="knee, stall, last_k"):
        rank_blocks("best", make_blocks(4))
    assert set(STRATEGIES) == {"knee", "stall", "last_k", "first_k", "random_k", "all", "manual", "auto_rgn", "trial",
                               "shift", "cka", "lisa"}


def test_random_k_is_deterministic_per_seed_and_seeds_differ():
    blocks = make_blocks(12)
    a = rank_blocks("random_k", blocks, seed=1).order
    assert a == rank_blocks("random_k", blocks, seed=1).order
    assert a != rank_blocks("random_k", blocks, seed=2).order
    assert sorted(a) == list(range(12))


def test_manual_by_index_and_name():
    blocks = make_blocks(5)
    r = rank_blocks("manual", blocks, manual=["blocks.3", 1, "-1", 1])
    assert r.order == [3, 1, 4] and r.exact
    with pytest.raises(ConfigError, match=r"unknown block 7 .*valid indices are 0\.\.4.*'blocks\.0', 'blocks\.1'"):
        rank_blocks("manual", blocks, manual=[7])
    with pytest.raises(ConfigError, match=r"unknown block 'blocks\.9'.*valid names are 'blocks\.0'"):
        rank_blocks("manual", blocks, manual=["blocks.9"])
    with pytest.raises(ConfigError, match="needs a list"):
        rank_blocks("manual", blocks, manual=[])


def test_auto_rgn_ranking_from_scores():
    r = rank_blocks("auto_rgn", make_blocks(3), rgn_scores={0: 1.0, 1: 0.2, 2: 0.2})
    assert r.order == [0, 2, 1]
    with pytest.raises(ConfigError, match="auto_rgn_scores"):
        rank_blocks("auto_rgn", make_blocks(3))
    with pytest.raises(ConfigError, match=r"missing \[2\]"):
        rank_blocks("auto_rgn", make_blocks(3), rgn_scores={0: 1.0, 1: 0.5})


# ----------------------------------------------------------------------------------------------------------- Auto-RGN


class TinyBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(torch.relu(self.bn(self.fc(x))))) + x


class TinyBackbone(nn.Module):
    def __init__(self, d: int = 6, n: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyBlock(d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


class TinyClassifier(nn.Module):
    def __init__(self, d: int = 6, n: int = 3, k: int = 3) -> None:
        super().__init__()
        self.backbone = TinyBackbone(d, n)
        self.head = nn.Linear(d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _tiny_setup():
    torch.manual_seed(0)
    model = TinyClassifier()
    for b in model.backbone.blocks:  # non-trivial BN statistics, so eval vs train mode matters
        b.bn.running_mean.normal_()
        b.bn.running_var.uniform_(0.5, 2.0)
    blocks = [Blk(i, f"blocks.{i}", sum(p.numel() for p in model.backbone.blocks[i].parameters())) for i in range(3)]
    batches = [({"x": torch.randn(8, 6)}, torch.randint(0, 3, (8,))) for _ in range(3)]
    return model, blocks, batches


def test_auto_rgn_scores_match_a_hand_computation_and_leave_the_model_untouched():
    model, blocks, batches = _tiny_setup()
    # Mixed state that must survive: frozen backbone, trainable head with a stale .grad, train mode, one BN in eval.
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.head.weight.grad = torch.full_like(model.head.weight, 3.0)
    stale_grad = model.head.weight.grad
    model.train()
    model.backbone.blocks[1].bn.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    modes = {k: m.training for k, m in model.named_modules()}

    scores = auto_rgn_scores(model, blocks, iter(batches), num_batches=2)

    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert {k: m.training for k, m in model.named_modules()} == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # includes BN running stats
    assert model.head.weight.grad is stale_grad and torch.all(stale_grad == 3.0)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert max(scores.values()) == 1.0 and all(0.0 < s <= 1.0 for s in scores.values())

    # Hand computation: eval mode, first two batches, only fc.weight and fc.bias (bn/norm excluded).
    ref = copy.deepcopy(model).eval()
    raw = {}
    for i in range(3):
        fc = ref.backbone.blocks[i].fc
        rgn = {"w": 0.0, "b": 0.0}
        for inputs, labels in batches[:2]:
            ref.zero_grad(set_to_none=True)
            for p in fc.parameters():
                p.requires_grad_(True)
            nn.functional.cross_entropy(ref(**inputs), labels).backward()
            rgn["w"] += (fc.weight.grad.norm() / fc.weight.norm()).item() / 2
            rgn["b"] += (fc.bias.grad.norm() / fc.bias.norm()).item() / 2
        raw[i] = (rgn["w"] + rgn["b"]) / 2
    top = max(raw.values())
    for i in range(3):
        assert scores[i] == pytest.approx(raw[i] / top, rel=1e-6)


def test_rgn_tensors_exclude_bn_and_norm_parameters():
    model, blocks, _ = _tiny_setup()
    names = [n for n, _ in rgn_tensors(model, blocks[0])]
    assert names == ["blocks.0.fc.weight", "blocks.0.fc.bias"]
    with pytest.raises(ConfigError, match="not a module"):
        rgn_tensors(model, Blk(9, "blocks.9", 1))


def test_recipe_schema_allows_exactly_the_registered_strategies():
    import typing

    from nc_finetune.config import SelectionConfig

    allowed = typing.get_args(typing.get_type_hints(SelectionConfig)["strategy"])
    assert set(allowed) == set(STRATEGIES)


# ------------------------------------------------------------------------------------------ stall / knee variants


def test_stall_reference_min_measures_progress_against_the_nc1_minimum():
    # NC1 falls to its minimum at block 3, then rises again.
    z = [0.0, -1.0, -2.0, -3.0, -2.5, -1.0]
    probe = make_probe(log_curve(z))
    # Against the last block (today's rule): total 1.0, block 1 already has remaining 0.0 < 0.1 -> stall at 1.
    last = rank_blocks("stall", make_blocks(6), probe)
    assert last.order == [2, 3, 4, 5, 1, 0]
    assert "reference: last block" in last.rationale
    # Against the minimum: total 3.0, remaining 3, 2, 1, 0 -> the first below 0.3 is block 3 itself.
    low = rank_blocks("stall", make_blocks(6), probe, stall_reference="min")
    assert low.order == [4, 5, 3, 2, 1, 0]
    assert "block 3 (its NC1 minimum)" in low.rationale
    # A monotone curve has its minimum at the last block: both references agree.
    mono = make_probe(log_curve([0.0, -1.0, -2.0, -2.05, -2.1]))
    assert rank_blocks("stall", make_blocks(5), mono).order == \
        rank_blocks("stall", make_blocks(5), mono, stall_reference="min").order
    with pytest.raises(ConfigError, match="stall_reference must be one of last, min"):
        rank_blocks("stall", make_blocks(5), mono, stall_reference="first")


def test_knee_two_sided_ranks_by_absolute_residual_of_the_fit():
    # A plateau over blocks 2..4, and the last block rises slightly: the rise is the largest one-sided shortfall,
    # the plateau the largest departure of the level from the law (block 4, residual +0.6).
    z = [0.0, -1.0, -1.1, -1.2, -1.3, -2.3, -3.3, -3.2]
    probe = make_probe(log_curve(z))
    assert rank_blocks("knee", make_blocks(8), probe).order[0] == 7
    r = rank_blocks("knee", make_blocks(8), probe, knee_residual="two_sided")
    # Independent: numpy's least-squares line and its residuals.
    slope, intercept = np.polyfit(np.arange(8), np.asarray(z), 1)
    resid = np.abs(np.asarray(z) - (intercept + slope * np.arange(8)))
    expected = sorted(range(8), key=lambda i: (-round(float(resid[i]), 9), -i))
    assert r.order == expected
    assert all(r.scores[i] == pytest.approx(resid[i]) for i in range(8))
    assert r.order[0] == 4 and "two-sided residual" in r.rationale and "above (less collapsed than)" in r.rationale
    with pytest.raises(ConfigError, match="knee_residual must be one of shortfall, two_sided"):
        rank_blocks("knee", make_blocks(8), probe, knee_residual="abs")
