"""Trainer speed options: precision ``auto``, gradient checkpointing, ``torch.compile``, channels-last, and no host
read of the loss per step. Each option must leave the training result unchanged (fp32 on the CPU)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from nc_finetune.adapt import build_classifier
from nc_finetune.errors import ConfigError
from nc_finetune.select import select_blocks
from nc_finetune.train.loop import TrainData, Trainer, resolve_precision
from nc_finetune.utils.env import seed_everything
from tests.conftest import load_bert, load_cnn, train_config

pytest.importorskip("transformers")


def test_resolve_precision(monkeypatch) -> None:
    assert resolve_precision("auto", "cpu")[0] == "no"
    assert "slower" in resolve_precision("auto", "cpu")[1]
    assert resolve_precision("fp16", "cpu")[0] == "bf16"
    assert resolve_precision("bf16", "cpu") == ("bf16", "as configured")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda")[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda")[0] == "no"
    assert resolve_precision("fp16", "cuda")[0] == "fp16"


def _fit(kind: str, data: dict, out, bert_dir=None, block: int = 1, **cfg):
    seed_everything(0)
    bb = load_bert(bert_dir) if kind == "bert" else load_cnn()
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=[block])
    adapted = build_classifier(bb, int(max(data["train"].labels)) + 1, method="finetune", selection=sel)
    trainer = Trainer(adapted, bb, TrainData(train=data["train"], test=data["test"]), train_config(**cfg), out,
                      progress=False)
    return trainer, adapted, bb


def _same_training(a, b) -> None:
    wa, wb = a.trainable_state_dict(), b.trainable_state_dict()
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-5, msg=k)


def test_precision_auto_is_fp32_on_the_cpu_with_a_note(bert_dir, text_data, tmp_path) -> None:
    t, _, _ = _fit("bert", text_data, tmp_path, bert_dir, precision="auto", epochs=1)
    info = t.fit()["precision"]
    assert info["requested"] == "auto" and info["used"] == "fp32" and "cpu" in info["reason"]


@pytest.mark.parametrize("kind", ["bert", "cnn"])
def test_gradient_checkpointing_trains_identically(kind, bert_dir, text_data, image_data, tmp_path) -> None:
    data = text_data if kind == "bert" else image_data
    block = 1 if kind == "bert" else 2
    plain, a_plain, _ = _fit(kind, data, tmp_path / "plain", bert_dir, block)
    plain.fit()
    ckpt, a_ckpt, bb = _fit(kind, data, tmp_path / "ckpt", bert_dir, block, gradient_checkpointing=True)
    model = bb.model
    # timm keeps a flag on the model, transformers one on every checkpointed module
    assert getattr(model, "grad_checkpointing", False) or any(
        getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    ckpt.fit()
    _same_training(a_plain, a_ckpt)


def test_gradient_checkpointing_unsupported_is_a_config_error(bert_dir, text_data, tmp_path) -> None:
    seed_everything(0)
    bb = load_bert(bert_dir)
    bb.grad_checkpointing = None
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=[1])
    adapted = build_classifier(bb, 2, method="finetune", selection=sel)
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        Trainer(adapted, bb, TrainData(train=text_data["train"], test=text_data["test"]),
                train_config(gradient_checkpointing=True), tmp_path, progress=False)


def test_compile_and_channels_last_train_identically(image_data, tmp_path, monkeypatch) -> None:
    compiled = []
    real_compile = torch.compile

    def eager_compile(model, **kwargs):  # the eager backend: the wiring is tested without a C++ toolchain
        compiled.append(model)
        return real_compile(model, backend="eager")

    plain, a_plain, _ = _fit("cnn", image_data, tmp_path / "plain", block=2)
    plain.fit()
    monkeypatch.setattr(torch, "compile", eager_compile)
    fast, a_fast, _ = _fit("cnn", image_data, tmp_path / "fast", block=2, compile=True, channels_last=True,
                           cache_prefix="off")
    summary = fast.fit()
    assert len(compiled) == 2  # the training forward and the evaluation forward
    conv = next(m for m in a_fast.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    _same_training(a_plain, a_fast)
    assert summary["test_accuracy"] >= 0


def test_the_loss_is_read_only_when_logged(bert_dir, text_data, tmp_path, monkeypatch) -> None:
    """16 samples, batch 2, 2 epochs = 16 steps; logging every 8 steps must not read the loss at every step."""
    reads = []
    loop_file = sys.modules[Trainer.__module__].__file__
    for name in ("item", "__float__", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if sys._getframe(1).f_code.co_filename == loop_file:
                reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    t, _, _ = _fit("bert", text_data, tmp_path, bert_dir, batch_size=2, log_every=8, checkpoint_every=100)
    t.fit()
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r and "split" not in r] == [8, 16]
    # one read per log line and checkpoint (4) and one per evaluation (2 test) -- far below one per step (16)
    assert len(reads) <= 6, reads
