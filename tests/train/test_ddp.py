"""Data parallel on CPU: two gloo processes with a per-process batch of B/2 train the same weights as one process
with batch B (no dropout, so the only randomness is the data order, a pure function of seed and epoch)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

WORLD = 2
BATCH = 4  # the global batch
CACHE_MODES = ("off", "on")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit(bert_dir: str, out: str, batch_size: int, cache: str) -> tuple[dict, dict, int]:
    from nc_finetune.adapt import build_classifier
    from nc_finetune.data import Split
    from nc_finetune.select import select_blocks
    from nc_finetune.train.loop import TrainData, Trainer
    from nc_finetune.utils.env import seed_everything
    from tests.conftest import load_bert, make_texts, train_config

    texts, labels = make_texts(30, 2, seed=4)
    data = TrainData(train=Split(texts[:20], labels[:20]), test=Split(texts[20:], labels[20:]))
    seed_everything(0)
    bb = load_bert(Path(bert_dir))
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=[1])
    adapted = build_classifier(bb, 2, method="scl", selection=sel, skip_dim=bb.feature_dim, wiring="concat")
    # 20 samples / global batch 4 = 5 steps per epoch; a checkpoint mid-epoch exercises the collective barrier.
    cfg = train_config(epochs=2, batch_size=batch_size, checkpoint_every=3, cache_prefix=cache, max_grad_norm=1.0)
    trainer = Trainer(adapted, bb, data, cfg, Path(out), progress=False)
    summary = trainer.fit()
    weights = {k: v.detach().cpu().clone() for k, v in adapted.trainable_state_dict().items()}
    return weights, summary, trainer.world


def _worker(rank: int, port: int, bert_dir: str, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD)})
    torch.set_num_threads(1)
    from accelerate import Accelerator

    assert Accelerator(cpu=True).num_processes == WORLD
    for cache in CACHE_MODES:  # one spawn for both modes: process start-up dominates the cost
        weights, summary, world = _fit(bert_dir, f"{out}/{cache}", BATCH // WORLD, cache)
        torch.save({"weights": weights, "summary": json.loads(json.dumps(summary)), "world": world},
                   Path(out) / f"{cache}-rank{rank}.pt")


# The gradient of the attention key bias is exactly zero in exact arithmetic (softmax ignores the per-query constant
# q.b_k), so Adam's normalised step turns its float round-off into O(lr) moves whose sign depends on summation order.
ZERO_GRADIENT = "attention.self.key.bias"


def test_two_cpu_processes_match_one(bert_dir_nodrop, tmp_path) -> None:
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_worker, args=(_free_port(), str(bert_dir_nodrop), str(out)), nprocs=WORLD, join=True)
    for cache in CACHE_MODES:
        ranks = [torch.load(out / f"{cache}-rank{r}.pt") for r in range(WORLD)]
        assert [r["world"] for r in ranks] == [WORLD, WORLD]
        single_w, single_s, world = _fit(str(bert_dir_nodrop), str(tmp_path / f"single-{cache}"), BATCH, cache)
        assert world == 1
        compared = [k for k in single_w if ZERO_GRADIENT not in k]
        assert len(compared) == len(single_w) - 1
        for r in ranks:  # both replicas hold the same weights, equal to the single-process run
            assert set(r["weights"]) == set(single_w)
            for k in compared:
                torch.testing.assert_close(r["weights"][k], single_w[k], atol=1e-5, rtol=1e-5, msg=f"{cache} {k}")
            s = r["summary"]
            assert s["steps"] == single_s["steps"] == 10 and s["world_size"] == WORLD
            assert s["prefix_cache"]["enabled"] == (cache == "on") == single_s["prefix_cache"]["enabled"]
            # Evaluation is sharded over the ranks and summed: the same test metrics as one process.
            assert s["test_samples"] == single_s["test_samples"] == 10
            assert s["test_loss"] == pytest.approx(single_s["test_loss"], abs=1e-5)
