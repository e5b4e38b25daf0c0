"""Auto-RGN as an adapt mode: per-tensor rates from an independent computation of the rule, Adam restarted every
epoch, BatchNorm in eval, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nc_finetune.adapt import build_classifier
from nc_finetune.select import select_blocks
from nc_finetune.train.loop import StopTraining, TrainData, Trainer, epoch_batches
from nc_finetune.utils.env import seed_everything
from tests.conftest import load_bert, load_cnn, train_config

pytest.importorskip("transformers")

LR, HEAD_LR = 1e-2, 3e-2


def _adapted(bert_dir: Path, rgn_batches: int = 2):
    seed_everything(0)
    bb = load_bert(bert_dir)
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=[1])
    return bb, build_classifier(bb, 2, method="auto_rgn", selection=sel, rgn_batches=rgn_batches)


def _trainer(bert_dir: Path, data: dict, out: Path, stop: int | None = None, **cfg):
    bb, adapted = _adapted(bert_dir)
    split = TrainData(train=data["train"], test=data["test"])
    config = train_config(**{"lr": LR, "head_lr": HEAD_LR, "checkpoint_every": 1, **cfg})
    return Trainer(adapted, bb, split, config, out, progress=False, stop_after_steps=stop), adapted


def _state(out: Path) -> dict:
    return torch.load(out / "checkpoint" / "trainer_state.pt", map_location="cpu", weights_only=True)


def _independent_rgn(bert_dir: Path, data: dict, num_batches: int) -> dict[str, float]:
    """The published rule by hand: .backward() per batch on a fresh copy, ||g|| / ||θ||, mean, divide by the max."""
    seed_everything(0)
    bb = load_bert(bert_dir)
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=[1])
    model = build_classifier(bb, 2, method="finetune", selection=sel).model
    model.requires_grad_(True)
    model.eval()
    split = data["train"]
    ratios: dict[str, list[float]] = {}
    for idx in epoch_batches(len(split), 4, 1, 0, seed=0, epoch=0)[:num_batches]:
        model.zero_grad(set_to_none=True)
        inputs = bb.prepare(split.subset(idx).inputs)
        F.cross_entropy(model(**inputs), torch.as_tensor(np.asarray(split.labels)[idx])).backward()
        for name, p in model.named_parameters():
            g = p.grad.norm().item() if p.grad is not None else 0.0
            ratios.setdefault(name, []).append(g / p.norm().item() if p.norm().item() > 0 else float("nan"))
    return {n: float(np.mean(v)) for n, v in ratios.items()}


def test_per_tensor_lr_is_the_published_rule(bert_dir, text_data, tmp_path) -> None:
    trainer, adapted = _trainer(bert_dir, text_data, tmp_path / "a", stop=1)
    with pytest.raises(StopTraining):
        trainer.fit()
    groups = _state(tmp_path / "a")["optimizer"]["param_groups"]
    named = {g["name"]: g for g in groups if g["name"]}
    head = [g for g in groups if not g["name"]]

    rgn = _independent_rgn(bert_dir, text_data, 2)
    model = adapted.model
    norm_params = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)
                   for p, _ in m.named_parameters(recurse=False)}
    expected = {n for n, p in model.named_parameters()
                if n.startswith("backbone.") and n not in norm_params and "bn" not in n[len("backbone."):]
                and p.detach().norm() > 0}
    assert set(named) == expected and expected  # every scored backbone tensor has its own group
    top = max(rgn[n] for n in expected)
    for n in expected:
        assert named[n]["initial_lr"] == pytest.approx(LR * rgn[n] / top, rel=1e-6), n
    assert max(g["initial_lr"] for g in named.values()) == pytest.approx(LR)
    # The new head trains at head_lr, outside the rule; norms and zero tensors never train.
    assert len(head) == 1 and head[0]["initial_lr"] == HEAD_LR
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert norm_params <= frozen and all(n.startswith("backbone.") for n in frozen)

    summary_rec = json.loads((tmp_path / "a" / "checkpoint" / "position.json").read_text())["hook"]["auto_rgn"]
    assert [r["epoch"] for r in summary_rec] == [0]
    assert summary_rec[0]["weights"] == pytest.approx({n: rgn[n] / top for n in expected}, rel=1e-6)


def test_adam_restarts_every_epoch(bert_dir, text_data, tmp_path) -> None:
    # 16 samples, batch 4: 4 steps per epoch; step 5 is the first step of epoch 1.
    trainer, _ = _trainer(bert_dir, text_data, tmp_path / "a", stop=5, epochs=2)
    with pytest.raises(StopTraining):
        trainer.fit()
    state = _state(tmp_path / "a")["optimizer"]["state"]
    assert state and {int(s["step"]) for s in state.values()} == {1}  # not 5: the moments restarted
    records = json.loads((tmp_path / "a" / "checkpoint" / "position.json").read_text())["hook"]["auto_rgn"]
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[0]["weights"] != records[1]["weights"]  # re-measured on the trained weights


@pytest.mark.parametrize("stop", [2, 4, 5])
def test_resume_is_exact(bert_dir, text_data, tmp_path, stop) -> None:
    a, adapted_a = _trainer(bert_dir, text_data, tmp_path / "a", epochs=2)
    summary_a = a.fit()
    b, _ = _trainer(bert_dir, text_data, tmp_path / "b", stop=stop, epochs=2)
    with pytest.raises(StopTraining):
        b.fit()
    c, adapted_c = _trainer(bert_dir, text_data, tmp_path / "b", epochs=2)
    summary_c = c.fit(resume=True)
    wa, wc = adapted_a.trainable_state_dict(), adapted_c.trainable_state_dict()
    assert set(wa) == set(wc) and wa
    for k in wa:
        torch.testing.assert_close(wc[k], wa[k], atol=1e-6, rtol=0)
    assert summary_c["test_loss"] == pytest.approx(summary_a["test_loss"], abs=1e-6)
    ra, rc = summary_a["train_hook"]["auto_rgn"], summary_c["train_hook"]["auto_rgn"]
    assert [r["epoch"] for r in rc] == [0, 1]
    for x, y in zip(ra, rc, strict=True):
        assert y["weights"] == pytest.approx(x["weights"], rel=1e-5)


def test_batchnorm_stays_in_eval_and_untrained() -> None:
    bb = load_cnn()
    adapted = build_classifier(bb, 3, method="auto_rgn", freeze_bn=False)
    adapted.train_mode()
    bns = [m for m in adapted.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    assert not any(p.requires_grad for m in bns for p in m.parameters())
    assert adapted.model.training and adapted.first_trainable_block is None
    assert any(p.requires_grad for n, p in adapted.model.named_parameters() if n.startswith("backbone."))


def _ddp_worker(rank: int, port: int, bert_dir: str, out: str) -> None:
    import os

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})
    torch.set_num_threads(1)
    from nc_finetune.data import Split
    from tests.conftest import make_texts

    texts, labels = make_texts(24, 2, seed=4)
    data = {"train": Split(texts[:16], labels[:16]), "test": Split(texts[16:], labels[16:])}
    trainer, adapted = _trainer(Path(bert_dir), data, Path(out) / "run", epochs=2, batch_size=2, checkpoint_every=100)
    summary = trainer.fit()
    weights = {k: v.detach().cpu().clone() for k, v in adapted.trainable_state_dict().items()}
    torch.save({"weights": weights, "hook": json.loads(json.dumps(summary["train_hook"])),
                "world": summary["world_size"]}, Path(out) / f"rank{rank}.pt")


def test_two_processes_set_the_same_rates(bert_dir_nodrop, tmp_path) -> None:
    """Each rank measures its own shard; the all-reduced rates, and so the weights, are the same on both."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(bert_dir_nodrop), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["world"] == r1["world"] == 2
    assert [r["epoch"] for r in r0["hook"]["auto_rgn"]] == [0, 1]
    for a, b in zip(r0["hook"]["auto_rgn"], r1["hook"]["auto_rgn"], strict=True):
        assert a["weights"] == b["weights"]
    for k in r0["weights"]:
        torch.testing.assert_close(r0["weights"][k], r1["weights"][k], atol=0, rtol=0, msg=k)
