"""``shift``: where collapse first degrades from the reference to the target data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nc_finetune.data import Split
from nc_finetune.errors import ConfigError
from nc_finetune.probe.runner import probe
from nc_finetune.select import select_blocks
from nc_finetune.select.shift import rank_shift, shift_curves

from .test_strategies import log_curve, make_blocks, make_probe
from .toy import class_data, toy_backbone


def test_an_input_level_shift_is_located_at_the_first_block():
    ref = [0.0, -0.5, -1.0, -1.5, -2.0, -2.5]
    # The target is less collapsed by the same amount everywhere: the degradation is there from block 0 on.
    r = rank_shift(make_blocks(6), make_probe(log_curve(ref)), make_probe(log_curve([z + 1.0 for z in ref])))
    assert r.details["shift"]["located"] == 0
    assert r.order == [0, 1, 2, 3, 4, 5]
    assert "block 0 'blocks.0'" in r.rationale


def test_a_label_level_change_is_located_late_and_neighbours_follow_by_distance():
    ref = [0.0, -0.5, -1.0, -1.5, -2.0, -2.5]
    tgt = [0.0, -0.5, -1.0, -1.5, -1.4, -1.3]  # the same early features; collapse stops after block 3
    r = rank_shift(make_blocks(6), make_probe(log_curve(ref)), make_probe(log_curve(tgt)))
    rows = shift_curves(make_blocks(6), make_probe(log_curve(ref)), make_probe(log_curve(tgt)))
    assert [round(x["delta_log_nc1"], 9) for x in rows] == [0.0, 0.0, 0.0, 0.0, 0.6, 1.2]
    assert r.details["shift"]["located"] == 4
    assert r.order == [4, 5, 3, 2, 1, 0]  # 5 and 3 are both one away: the deeper first


def test_no_degradation_leads_with_the_last_block_and_missing_reference_is_refused():
    ref = make_probe(log_curve([0.0, -0.5, -1.0]))
    r = rank_shift(make_blocks(3), ref, make_probe(log_curve([-0.1, -0.7, -1.2])))
    assert r.order == [2, 1, 0] and "no positive jump" in r.rationale
    with pytest.raises(ConfigError, match="needs a probe of the reference data"):
        select_blocks(ref, make_blocks(3), strategy="shift")
    with pytest.raises(ConfigError, match="shift_jump must be in"):
        rank_shift(make_blocks(3), ref, ref, jump=0.0)


def test_ncc_accuracy_jumps_count_with_nc1():
    blocks = make_blocks(4)
    ref, tgt = make_probe(log_curve([0.0, -1.0, -2.0, -3.0])), make_probe(log_curve([0.0, -1.0, -2.0, -3.0]))
    for rec, acc_r, acc_t in zip(ref.blocks(), [0.5, 0.6, 0.8, 0.9], [0.5, 0.6, 0.5, 0.5], strict=True):
        rec["ncc_accuracy"] = acc_r
        tgt.layers[rec["index"]]["ncc_accuracy"] = acc_t
    # Equal NC1 everywhere; accuracy drops from block 2 on.
    r = rank_shift(blocks, ref, tgt)
    assert r.details["shift"]["located"] == 2


def _probe(bb, split, k=3):
    return probe(bb, split, k, batch_size=32, device="cpu", progress=False)


def test_input_noise_on_a_real_probe_is_located_at_block_0():
    bb = toy_backbone(depth=4)
    clean = class_data(40, seed=0)
    noisy = class_data(40, seed=0, input_noise=3.0)
    sel = select_blocks(_probe(bb, noisy), bb.blocks, strategy="shift", reference_probe=_probe(bb, clean))
    assert sel.indices == [0] and sel.details["shift"]["located"] == 0
    assert "shift: reference" in sel.explain()


def test_a_label_change_on_a_real_probe_is_located_where_the_backbone_drops_the_new_labels_signal():
    # Coordinates 0..2 carry the reference labels, 3..5 the target labels, 6..7 class-free nuisance (std 3).
    # Blocks 0..3 pass everything; block 4 buries coordinates 3..5 under the nuisance (what a backbone trained on
    # the reference task may do with features that task does not need).
    bb = toy_backbone(depth=6)
    with torch.no_grad():
        w = bb.model.blocks[4].weight
        w[3:6, 3:6] = 0.2 * torch.eye(3)
        w[3:6, 6:] = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    n = 120
    y_ref, y_tgt = rng.integers(0, 3, n), rng.integers(0, 3, n)
    m_ref, m_tgt = 2 * rng.normal(size=(3, 3)), 2 * rng.normal(size=(3, 3))
    x = np.concatenate([m_ref[y_ref] + 0.5 * rng.normal(size=(n, 3)), m_tgt[y_tgt] + 0.5 * rng.normal(size=(n, 3)),
                        3 * rng.normal(size=(n, 2))], axis=1).astype(np.float32)
    ref = _probe(bb, Split(list(x), y_ref.astype(np.int64)))
    tgt = _probe(bb, Split(list(x), y_tgt.astype(np.int64)))
    sel = select_blocks(tgt, bb.blocks, strategy="shift", reference_probe=ref)
    assert sel.details["shift"]["located"] == 4 and sel.indices == [4]
    assert all(math.isfinite(r["delta_log_nc1"]) for r in sel.details["shift"]["blocks"])
