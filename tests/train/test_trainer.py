"""The Trainer: exact resume after a simulated kill (dropout active), schedule and data-order helpers, logging."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nc_finetune.adapt import build_classifier
from nc_finetune.errors import UserError
from nc_finetune.select import select_blocks
from nc_finetune.train.loop import StopTraining, TrainData, Trainer, epoch_batches, make_optimizer, warmup_cosine
from nc_finetune.utils.env import seed_everything
from nc_finetune.utils.io import load_safetensors
from tests.conftest import load_bert, train_config

pytest.importorskip("transformers")


def _trainer(bert_dir: Path, data: dict, out: Path, method: str = "finetune", stop: int | None = None, **cfg):
    """A fresh process-like start: seed, new backbone, new classifier, new Trainer."""
    seed_everything(0)
    bb = load_bert(bert_dir)
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=[1])
    adapted = build_classifier(bb, 2, method=method, selection=sel)
    split = TrainData(train=data["train"], test=data["test"], val=data.get("val"))
    config = train_config(**{"epochs": 2, "checkpoint_every": 2, "log_every": 1, **cfg})
    return Trainer(adapted, bb, split, config, out, progress=False, stop_after_steps=stop), adapted


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key, va in ra.items():
            if isinstance(va, float):
                assert rb[key] == pytest.approx(va, abs=1e-6), (ra, rb)
            else:
                assert rb[key] == va, (ra, rb)


RESUME_CASES = {
    # name: (stop after step, with a validation split (best model + early-stopping state), config)
    "mid-epoch": (2, False, {}),
    "epoch-end": (4, False, {}),
    "second-epoch+val": (6, True, {}),
    "accum+sparse-log": (2, False, {"grad_accum_steps": 2, "log_every": 3, "checkpoint_every": 1, "epochs": 3}),
    # max_steps past the epoch limit: 4 steps per epoch, 7 steps run over 2 epochs (killed in the second).
    "max_steps-past-epochs": (6, False, {"epochs": 1, "max_steps": 7}),
    # Issue 12, resume corner: max_steps ends mid-epoch (step 6 of 8) and the kill comes right after its checkpoint;
    # the resumed run still owes that epoch's evaluation (val/test lines, epochs_run, best.safetensors).
    "max_steps-mid-epoch-killed-after-last-checkpoint": (6, True, {"epochs": 2, "max_steps": 6}),
    # evaluations every 2 epochs: the kill lands in an epoch without one (step 10 of epoch 2)
    "eval-every-2+val": (10, True, {"epochs": 4, "eval_every_epochs": 2}),
}


def test_eval_every_epochs_evaluates_every_nth_and_the_last_epoch_without_changing_training(
        bert_dir, text_data, tmp_path) -> None:
    data = {k: v for k, v in text_data.items() if k != "val"}
    s_every = _trainer(bert_dir, data, tmp_path / "every", epochs=5)[0].fit()  # built and run one after the other:
    s_sparse = _trainer(bert_dir, data, tmp_path / "sparse", epochs=5, eval_every_epochs=2)[0].fit()  # one RNG
    tested = [r["epoch"] for r in _metrics(tmp_path / "sparse") if r.get("split") == "test"]
    assert tested == [1, 3, 4]  # after epochs 2 and 4, and after the last one (0-based epoch numbers)
    assert [r["epoch"] for r in _metrics(tmp_path / "every") if r.get("split") == "test"] == [0, 1, 2, 3, 4]
    # evaluating is read-only: the same weights and the same final test numbers
    assert s_sparse["test_accuracy"] == s_every["test_accuracy"]
    assert s_sparse["test_loss"] == pytest.approx(s_every["test_loss"], abs=1e-9)
    assert s_sparse["epochs_run"] == s_every["epochs_run"] == 5


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_replays_the_uninterrupted_run(bert_dir, text_data, tmp_path, case) -> None:
    stop, with_val, cfg = RESUME_CASES[case]
    data = text_data if with_val else {k: v for k, v in text_data.items() if k != "val"}
    a, adapted_a = _trainer(bert_dir, data, tmp_path / "a", **cfg)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in adapted_a.model.modules())
    summary_a = a.fit()

    b, _ = _trainer(bert_dir, data, tmp_path / "b", stop=stop, **cfg)
    with pytest.raises(StopTraining):
        b.fit()
    assert (tmp_path / "b" / "checkpoint" / "position.json").is_file()
    partial = _metrics(tmp_path / "b")
    assert max(r["step"] for r in partial) == stop

    c, adapted_c = _trainer(bert_dir, data, tmp_path / "b", **cfg)  # a new process resumes from disk
    summary_c = c.fit(resume=True)

    wa, wc = adapted_a.trainable_state_dict(), adapted_c.trainable_state_dict()
    assert set(wa) == set(wc) and wa
    for k in wa:
        torch.testing.assert_close(wc[k], wa[k], atol=1e-6, rtol=0)
    _assert_same_metrics(_metrics(tmp_path / "a"), _metrics(tmp_path / "b"))
    assert summary_c["steps"] == summary_a["steps"]
    assert summary_c["epochs_run"] == summary_a["epochs_run"]
    assert summary_c["test_loss"] == pytest.approx(summary_a["test_loss"], abs=1e-6)
    if with_val:  # the best validation model was tracked through the kill
        best_a, best_c = (load_safetensors(d / "best.safetensors") for d in (tmp_path / "a", tmp_path / "b"))
        assert set(best_a) == set(best_c)
        for k in best_a:
            torch.testing.assert_close(best_c[k], best_a[k], atol=1e-6, rtol=0)


def test_dropout_makes_runs_differ_without_the_rng_state(bert_dir, text_data, tmp_path) -> None:
    """Guards the resume test: with a different RNG stream the same run ends elsewhere (so RNG restore matters)."""
    a, adapted_a = _trainer(bert_dir, text_data, tmp_path / "a", epochs=1)
    a.fit()
    b, adapted_b = _trainer(bert_dir, text_data, tmp_path / "b", epochs=1)
    torch.manual_seed(1234)  # only the dropout masks differ
    b.fit()
    wa, wb = adapted_a.trainable_state_dict(), adapted_b.trainable_state_dict()
    assert any(not torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_metrics_log_and_validation(bert_dir, text_data, tmp_path) -> None:
    t, _ = _trainer(bert_dir, text_data, tmp_path, log_every=3, epochs=2)
    summary = t.fit()
    rows = _metrics(tmp_path)
    train_rows = [r for r in rows if "loss" in r and "split" not in r]
    assert [r["step"] for r in train_rows] == [3, 6, 8]  # every 3 steps and the last
    assert [(r["split"], r["epoch"]) for r in rows if "split" in r] == \
        [("val", 0), ("test", 0), ("val", 1), ("test", 1), ("final_test", 2)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["samples"] == 8 for r in rows if "split" in r)
    assert (tmp_path / "best.safetensors").is_file()
    assert summary["steps"] == 8 and summary["epochs_run"] == 2 and summary["test_samples"] == 8
    # A second fit without resume starts a fresh log instead of appending to the old one.
    t2, _ = _trainer(bert_dir, text_data, tmp_path, log_every=3, epochs=2)
    t2.fit()
    assert len(_metrics(tmp_path)) == len(rows)


def test_resume_without_checkpoint_is_a_user_error(bert_dir, text_data, tmp_path) -> None:
    t, _ = _trainer(bert_dir, text_data, tmp_path)
    with pytest.raises(UserError, match="no checkpoint"):
        t.fit(resume=True)


def test_resume_refuses_a_checkpoint_of_another_model(bert_dir, text_data, tmp_path) -> None:
    t, _ = _trainer(bert_dir, text_data, tmp_path, stop=2)
    with pytest.raises(StopTraining):
        t.fit()
    other, _ = _trainer(bert_dir, text_data, tmp_path, method="lora")
    with pytest.raises(UserError, match="does not match"):
        other.fit(resume=True)


def test_max_steps_caps_training(bert_dir, text_data, tmp_path) -> None:
    t, _ = _trainer(bert_dir, text_data, tmp_path, max_steps=3, epochs=5)
    assert t.fit()["steps"] == 3


def test_max_steps_wins_over_epochs(bert_dir, text_data, tmp_path) -> None:
    # 16 samples / batch 4 = 4 optimizer steps per epoch; as in HF Trainer, max_steps counts across epochs.
    t, _ = _trainer(bert_dir, text_data, tmp_path, max_steps=10, epochs=1)
    summary = t.fit()
    assert (summary["steps"], summary["epochs_run"]) == (10, 3)
    logged = [r["step"] for r in _metrics(tmp_path) if "loss" in r and "split" not in r]
    assert logged == list(range(1, 11))


# ------------------------------------------------------------------------------------------------- pure helpers


def test_epoch_batches_cover_each_epoch_and_split_over_ranks() -> None:
    n, bs, world = 23, 3, 2
    for epoch in range(2):
        per_rank = [epoch_batches(n, bs, world, r, seed=5, epoch=epoch) for r in range(world)]
        assert len(per_rank[0]) == len(per_rank[1])
        single = epoch_batches(n, bs * world, 1, 0, seed=5, epoch=epoch)
        for step, whole in enumerate(single):  # rank shards of a global batch == the single-process batch
            if len(whole) >= world:
                np.testing.assert_array_equal(np.concatenate([per_rank[r][step] for r in range(world)]), whole)
        seen = np.concatenate([b for r in per_rank for b in r])
        assert len(set(seen.tolist())) == len(seen) and len(seen) >= n - (world - 1)
    a = np.concatenate(epoch_batches(n, bs, 1, 0, seed=5, epoch=0))
    assert sorted(a.tolist()) == list(range(n))
    assert not np.array_equal(a, np.concatenate(epoch_batches(n, bs, 1, 0, seed=5, epoch=1)))
    np.testing.assert_array_equal(a, np.concatenate(epoch_batches(n, bs, 1, 0, seed=5, epoch=0)))


def test_warmup_cosine_schedule() -> None:
    f = warmup_cosine(10, 0.2)
    values = [f(s) for s in range(11)]
    assert values[0] < values[1] < values[2] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(values[2:], values[3:], strict=False))
    assert values[10] == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(4, 0.0)(0) == 1.0


def test_make_optimizer_groups() -> None:
    model = torch.nn.Module()
    model.body = torch.nn.Linear(3, 3)
    model.nc_head = torch.nn.Linear(3, 2)
    model.frozen = torch.nn.Linear(3, 3).requires_grad_(False)
    opt = make_optimizer(model, train_config(lr=1e-3, head_lr=1e-1, weight_decay=0.5))
    groups = {(g["lr"], g["weight_decay"]): {id(p) for p in g["params"]} for g in opt.param_groups}
    assert groups == {(1e-3, 0.5): {id(model.body.weight)}, (1e-3, 0.0): {id(model.body.bias)},
                      (1e-1, 0.5): {id(model.nc_head.weight)}, (1e-1, 0.0): {id(model.nc_head.bias)}}
    model.requires_grad_(False)
    with pytest.raises(UserError, match="nothing to train"):
        make_optimizer(model, train_config())


def test_resume_after_early_stopping_stays_stopped(bert_dir, text_data, tmp_path) -> None:
    """lr 0: validation accuracy never improves, so patience 1 stops after epoch 1 (of 4). A kill after that last
    checkpoint (before the summary) must not make the resumed run train the epochs that early stopping skipped."""
    cfg = {"epochs": 4, "lr": 0.0, "head_lr": 0.0, "early_stopping_patience": 1}
    a, _ = _trainer(bert_dir, text_data, tmp_path / "a", **cfg)
    summary_a = a.fit()
    assert summary_a["stopped_early"] and summary_a["steps"] == 8
    b, _ = _trainer(bert_dir, text_data, tmp_path / "b", stop=8, **cfg)
    with pytest.raises(StopTraining):
        b.fit()
    c, _ = _trainer(bert_dir, text_data, tmp_path / "b", **cfg)
    summary_c = c.fit(resume=True)
    assert summary_c["stopped_early"] and summary_c["steps"] == 8 and summary_c["epochs_run"] == 2
    _assert_same_metrics(_metrics(tmp_path / "a"), _metrics(tmp_path / "b"))


def test_resuming_a_finished_run_changes_nothing(bert_dir, text_data, tmp_path) -> None:
    data = {k: v for k, v in text_data.items() if k != "val"}
    a, adapted_a = _trainer(bert_dir, data, tmp_path)
    summary_a = a.fit()
    log = _metrics(tmp_path)
    b, adapted_b = _trainer(bert_dir, data, tmp_path)
    summary_b = b.fit(resume=True)
    assert summary_b["steps"] == summary_a["steps"] and summary_b["test_loss"] == summary_a["test_loss"]
    _assert_same_metrics(_metrics(tmp_path), log)  # no second final_test line
    for k, v in adapted_a.trainable_state_dict().items():
        assert torch.equal(adapted_b.trainable_state_dict()[k], v)


def test_a_fresh_run_ignores_a_stale_best_model(bert_dir, text_data, tmp_path) -> None:
    """best.safetensors of an earlier run with validation must not be loaded into a new run without validation."""
    data = {k: v for k, v in text_data.items() if k != "val"}
    old, _ = _trainer(bert_dir, text_data, tmp_path / "reused", lr=0.0, head_lr=0.0)
    old.fit()
    assert (tmp_path / "reused" / "best.safetensors").is_file()
    fresh, adapted_fresh = _trainer(bert_dir, data, tmp_path / "fresh")
    fresh.fit()
    reused, adapted_reused = _trainer(bert_dir, data, tmp_path / "reused")
    reused.fit()
    for k, v in adapted_fresh.trainable_state_dict().items():
        assert torch.equal(adapted_reused.trainable_state_dict()[k], v), k


def test_a_non_finite_loss_stops_training_in_one_line(bert_dir, text_data, tmp_path) -> None:
    """lr=1e30 (in range, absurd) sends the weights to inf: the loop stops at the first NaN/inf loss, before the
    optimizer writes it into the weights, instead of training garbage and exiting 0."""
    t, adapted = _trainer(bert_dir, text_data, tmp_path, lr=1e30, head_lr=1e30, max_grad_norm=None, checkpoint_every=1)
    with pytest.raises(UserError, match=r"^train: loss is (nan|inf) at step \d+; lower train.lr \(now 1e\+30\) or set "
                                        r"train.max_grad_norm") as e:
        t.fit()
    assert "\n" not in str(e.value)
    step = int(str(e.value).split("at step ")[1].split(";")[0])
    assert step > 1  # it trained normally until then
    assert json.loads((tmp_path / "checkpoint" / "position.json").read_text())["step"] == step - 1
    assert all(torch.isfinite(v).all() for v in adapted.trainable_state_dict().values())


def test_resume_tolerates_a_cut_off_last_metrics_line(bert_dir, text_data, tmp_path) -> None:
    """A kill during the (non-atomic) append of metrics.jsonl leaves half a line: resume drops it and replays."""
    data = {k: v for k, v in text_data.items() if k != "val"}
    a, _ = _trainer(bert_dir, data, tmp_path / "a")
    a.fit()
    b, _ = _trainer(bert_dir, data, tmp_path / "b", stop=2)
    with pytest.raises(StopTraining):
        b.fit()
    with open(tmp_path / "b" / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 3, "epoch": 0, "lo')
    c, _ = _trainer(bert_dir, data, tmp_path / "b")
    c.fit(resume=True)
    _assert_same_metrics(_metrics(tmp_path / "a"), _metrics(tmp_path / "b"))


def test_resume_refuses_a_damaged_line_inside_the_log(bert_dir, text_data, tmp_path) -> None:
    b, _ = _trainer(bert_dir, text_data, tmp_path, stop=2)
    with pytest.raises(StopTraining):
        b.fit()
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0][:5], *lines[1:]]) + "\n")
    c, _ = _trainer(bert_dir, text_data, tmp_path)
    with pytest.raises(UserError, match=r"metrics.jsonl is damaged: line 1 is not a JSON record"):
        c.fit(resume=True)
