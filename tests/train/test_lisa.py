"""LISA: the draw is uniform and a pure function of (seed, interval); the ``lisa`` strategy selects the first draw;
the training mode trains the drawn blocks only, drops the moments of blocks that leave, and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nc_finetune.adapt import build_classifier, is_head_param
from nc_finetune.config import load_recipe
from nc_finetune.errors import ConfigError
from nc_finetune.select import select_blocks
from nc_finetune.select.lisa import lisa_draw, lisa_permutation
from nc_finetune.train.loop import StopTraining, TrainData, Trainer, make_optimizer
from nc_finetune.utils.env import seed_everything
from tests.conftest import load_bert, load_cnn, train_config

BLOCK = "backbone.hf.encoder.layer."


def test_draw_is_uniform_and_reproducible() -> None:
    n, gamma, draws = 6, 2, 6000
    counts = np.zeros(n)
    pairs: dict[tuple[int, ...], int] = {}
    for j in range(draws):
        d = lisa_draw(n, gamma, seed=3, interval=j)
        assert len(set(d)) == gamma and d == sorted(d)
        counts[d] += 1
        pairs[tuple(d)] = pairs.get(tuple(d), 0) + 1
    expected = draws * gamma / n  # 2000 per block
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)
    assert len(pairs) == 15 and max(pairs.values()) < 1.3 * draws / 15  # every pair, none favoured
    assert lisa_draw(n, gamma, 3, 17) == lisa_draw(n, gamma, 3, 17)
    assert lisa_draw(n, gamma, 3, 17) != lisa_draw(n, gamma, 4, 17) or lisa_draw(n, gamma, 3, 18) != \
        lisa_draw(n, gamma, 4, 18)


def test_strategy_selects_the_first_draw() -> None:
    bb = load_cnn()
    n = len(bb.blocks)
    for seed in range(4):
        sel = select_blocks(None, bb.blocks, strategy="lisa", max_blocks=2, seed=seed)
        assert sel.indices == lisa_draw(n, 2, seed, 0)
        assert sel.ranking == [bb.blocks[i].index for i in lisa_permutation(n, seed, 0)]
        assert "LISA" in sel.rationale and "selection-only" in sel.rationale


SEED = 2  # draws [2], [0], [1], [2] for intervals 0..3 of 3 blocks: the block changes at every draw


def _trainer(bert_dir: Path, data: dict, out: Path, stop: int | None = None, interval: int = 2, **cfg):
    seed_everything(0)
    bb = load_bert(bert_dir)
    sel = select_blocks(None, bb.blocks, strategy="lisa", max_blocks=1, seed=SEED)
    adapted = build_classifier(bb, 2, method="lisa", selection=sel, lisa_interval=interval, lisa_seed=SEED)
    split = TrainData(train=data["train"], test=data["test"])
    config = train_config(**{"epochs": 2, "checkpoint_every": 1, **cfg})
    return Trainer(adapted, bb, split, config, out, progress=False, stop_after_steps=stop), adapted, bb, sel


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_training_moves_only_the_drawn_blocks(bert_dir, text_data, tmp_path) -> None:
    pytest.importorskip("transformers")
    trainer, adapted, bb, sel = _trainer(bert_dir, text_data, tmp_path / "a", interval=100)  # one draw: 8 steps
    before = _snapshot(adapted.model)
    summary = trainer.fit()
    after = _snapshot(adapted.model)
    drawn = BLOCK + str(sel.indices[0]) + "."
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(n.startswith(drawn) for n in changed)
    assert not any(n.startswith(BLOCK) and not n.startswith(drawn) for n in changed)
    assert any(n.startswith("backbone.hf.embeddings.") for n in changed)  # outside the blocks: always trains
    assert any(is_head_param(n) for n in changed)
    assert summary["train_hook"]["lisa"] == [{"step": 0, "interval": 0, "blocks": [drawn[:-1]]}]
    assert summary["trainable_params"] == summary["total_params"]  # every parameter trains at some point


def test_resampling_drops_the_moments_of_blocks_that_leave(bert_dir, text_data, tmp_path) -> None:
    pytest.importorskip("transformers")
    # Draws at steps 0, 2, 4, 6 (interval 2); stop right after the checkpoint of step `stop`.
    draws = [lisa_draw(3, 1, SEED, j) for j in range(4)]
    stop = next(2 * j for j in range(1, 4) if draws[j] != draws[j - 1])  # the first draw that changes the block
    trainer, adapted, bb, sel = _trainer(bert_dir, text_data, tmp_path / "a", stop=stop)
    with pytest.raises(StopTraining):
        trainer.fit()
    state = torch.load(tmp_path / "a" / "checkpoint" / "trainer_state.pt", weights_only=True)["optimizer"]
    # Map optimizer indices to names with a fresh optimizer over every parameter (the same group layout).
    seed_everything(0)
    fresh = build_classifier(load_bert(bert_dir), 2, method="lisa", selection=sel).model
    opt = make_optimizer(fresh, train_config())
    ids = {id(p): n for n, p in fresh.named_parameters()}
    order = [ids[id(p)] for g in opt.param_groups for p in g["params"]]
    with_state = {order[i] for i in state["state"]}
    assert with_state and not any(n.startswith(BLOCK) for n in with_state)  # old block dropped, new one not stepped
    assert any(n.startswith("backbone.hf.embeddings.") for n in with_state)
    rec = json.loads((tmp_path / "a" / "checkpoint" / "position.json").read_text())["hook"]["lisa"]
    assert [r["step"] for r in rec] == list(range(0, stop + 1, 2))
    assert [r["blocks"] for r in rec] == [[BLOCK + str(d[0])] for d in draws[: len(rec)]]


@pytest.mark.parametrize("stop", [3, 4])
def test_resume_is_exact(bert_dir, text_data, tmp_path, stop) -> None:
    pytest.importorskip("transformers")
    a, adapted_a, _, _ = _trainer(bert_dir, text_data, tmp_path / "a")
    summary_a = a.fit()
    b, _, _, _ = _trainer(bert_dir, text_data, tmp_path / "b", stop=stop)
    with pytest.raises(StopTraining):
        b.fit()
    c, adapted_c, _, _ = _trainer(bert_dir, text_data, tmp_path / "b")
    summary_c = c.fit(resume=True)
    wa, wc = adapted_a.trainable_state_dict(), adapted_c.trainable_state_dict()
    assert set(wa) == set(wc) and len(wa) == len(list(adapted_a.model.parameters()))
    for k in wa:
        torch.testing.assert_close(wc[k], wa[k], atol=1e-6, rtol=0)
    assert summary_c["test_loss"] == pytest.approx(summary_a["test_loss"], abs=1e-6)
    assert summary_c["train_hook"] == summary_a["train_hook"]


def test_recipe_checks() -> None:
    with pytest.raises(ConfigError, match="selection.strategy=lisa"):
        load_recipe(None, ["adapt.method=lisa", "selection.strategy=random_k"])
    with pytest.raises(ConfigError, match="lisa_interval"):
        load_recipe(None, ["adapt.method=lisa", "selection.strategy=lisa", "selection.lisa_interval=0"])
    load_recipe(None, ["adapt.method=lisa", "selection.strategy=lisa", "selection.max_blocks=2"])
