"""``trial``: short trial fine-tunes of every block, ranked by the held-out last-layer NC1 drop (Li et al.)."""

from __future__ import annotations

import math

import pytest
import torch

from nc_finetune.config import load_recipe
from nc_finetune.errors import ConfigError, DataError
from nc_finetune.select import select_blocks
from nc_finetune.select.trial import rank_trial, run_trials

from .test_strategies import make_blocks
from .toy import class_data, scramble, toy_backbone

_KW = {"steps": 30, "held_out_per_class": 20, "batch_size": 16, "lr": 1e-2, "device": "cpu"}


@pytest.mark.parametrize("k", [1, 2])
def test_the_scrambled_block_is_ranked_first_and_the_backbone_is_left_as_it_was(k):
    bb = toy_backbone()
    scramble(bb, k)
    before = {n: v.clone() for n, v in bb.model.state_dict().items()}
    flags = [p.requires_grad for p in bb.model.parameters()]
    results = run_trials(bb, class_data(60), 3, **_KW)
    sel = select_blocks(None, bb.blocks, strategy="trial", trial_results=results)
    assert sel.indices == [k]
    # Blocks after the scrambled one cannot recover the buried signal: NC1 stays where it was.
    trials = {t["index"]: t for t in results["trials"]}
    assert trials[k]["nc1_after"] < 0.5 * min(t["nc1_after"] for i, t in trials.items() if i != k)
    assert all(trials[i]["nc1_drop"] < 0.05 * results["nc1_before"] for i in trials if i > k)
    assert all(torch.equal(before[n], v) for n, v in bb.model.state_dict().items())
    assert [p.requires_grad for p in bb.model.parameters()] == flags
    assert sel.details["trial"]["trials"] == results["trials"]
    assert f"Block {k} 'blocks.{k}'" in sel.rationale and "trial cost" in sel.explain()


def test_trial_cost_is_counted_exactly_and_the_prefix_cache_changes_nothing():
    bb = toy_backbone()
    scramble(bb, 1)
    split = class_data(60)
    cached = run_trials(bb, split, 3, **_KW)
    plain = run_trials(bb, split, 3, cache_prefix=False, **_KW)
    # 60 held-out samples in one eval batch: 1 baseline pass, then per block 30 steps of 16 + 1 held-out pass.
    for r in (cached, plain):
        c = r["cost"]
        assert (c["forward_passes"], c["backward_passes"]) == (1 + 4 * 31, 4 * 30)
        assert (c["forward_samples"], c["backward_samples"]) == (60 + 4 * (30 * 16 + 60), 4 * 30 * 16)
        assert r["held_out_samples"] == 60 and r["train_pool_samples"] == 120 and c["seconds"] > 0
    assert all(t["prefix_cache"] for t in cached["trials"]) and not any(t["prefix_cache"] for t in plain["trials"])
    for a, b in zip(cached["trials"], plain["trials"], strict=True):
        assert a["nc1_after"] == pytest.approx(b["nc1_after"], rel=1e-3)
        assert a["loss_after"] == pytest.approx(b["loss_after"], rel=1e-3)


def test_rank_trial_scores():
    blocks = make_blocks(3, [100, 10, 1000])
    results = {"steps": 5, "held_out_samples": 6, "nc1_before": 10.0, "loss_before": 1.0,
               "cost": {"seconds": 1.0, "forward_passes": 3, "backward_passes": 2},
               "trials": [{"index": 0, "name": "blocks.0", "params": 100, "nc1_after": 6.0, "nc1_drop": 4.0,
                           "loss_after": 0.5, "loss_drop": 0.5},
                          {"index": 1, "name": "blocks.1", "params": 10, "nc1_after": 9.0, "nc1_drop": 1.0,
                           "loss_after": 0.9, "loss_drop": 0.1},
                          {"index": 2, "name": "blocks.2", "params": 1000, "nc1_after": 2.0, "nc1_drop": 8.0,
                           "loss_after": 0.8, "loss_drop": 0.2}]}
    # Per parameter: 0.04, 0.1, 0.008.
    r = rank_trial(blocks, results)
    assert r.order == [1, 0, 2] and r.scores[1] == pytest.approx(0.1)
    assert rank_trial(blocks, results, "nc1_drop").order == [2, 0, 1]
    assert rank_trial(blocks, results, "loss_drop").order == [0, 2, 1]
    # A block without a trial ranks last with -inf.
    r = rank_trial(make_blocks(4, [100, 10, 1000, 5]), results)
    assert r.order[-1] == 3 and r.scores[3] == -math.inf
    with pytest.raises(ConfigError, match="needs trial results"):
        select_blocks(None, blocks, strategy="trial")
    with pytest.raises(ConfigError, match="trial_score must be one of"):
        rank_trial(blocks, results, "acc")


def test_bad_trial_options_fail_before_any_compute():
    bb = toy_backbone()
    with pytest.raises(ConfigError, match="trial_steps must be an integer >= 1"):
        run_trials(bb, class_data(10), 3, steps=0, device="cpu")
    with pytest.raises(DataError, match="class 0 has 10 training samples"):
        run_trials(bb, class_data(10), 3, held_out_per_class=10, device="cpu")
    with pytest.raises(ConfigError, match=r"^recipe key 'selection.trial_steps' must be >= 1"):
        load_recipe(None, ["selection.strategy=trial", "selection.trial_steps=0"])
    with pytest.raises(ConfigError, match="trial_samples"):
        load_recipe(None, ["selection.trial_samples=1"])
