"""The NC1 loss term: equal to the probe's nc1 on the same batch, differentiable (also near collapse), gradients only
into trainable parameters, and wired into the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nc_finetune.adapt import build_classifier
from nc_finetune.errors import ConfigError, UserError
from nc_finetune.probe.metrics import collapse_metrics
from nc_finetune.select import select_blocks
from nc_finetune.train.loop import TrainData, Trainer
from nc_finetune.train.nc1_penalty import NC1Penalty, batch_nc1
from nc_finetune.utils.env import seed_everything
from tests.conftest import load_bert, train_config


@pytest.mark.parametrize(("n", "d", "k", "seed"), [(30, 8, 4, 0), (12, 3, 4, 1), (40, 20, 2, 2), (64, 16, 10, 3)])
def test_batch_nc1_equals_the_probe_metric(n: int, d: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])  # every class present
    x = rng.normal(size=(n, d)) + 3.0 * rng.normal(size=(k, d))[y]
    expected = collapse_metrics(x, y, k)["nc1"]
    got = float(batch_nc1(torch.tensor(x), torch.tensor(y)))
    assert got == pytest.approx(expected, rel=1e-8)


def test_batch_nc1_uses_the_classes_present() -> None:
    rng = np.random.default_rng(0)
    y = np.array([1, 1, 1, 3, 3, 3, 3])
    x = rng.normal(size=(7, 4))
    remapped = np.searchsorted([1, 3], y)
    assert float(batch_nc1(torch.tensor(x), torch.tensor(y))) == pytest.approx(
        collapse_metrics(x, remapped, 2)["nc1"], rel=1e-8)
    one = torch.tensor(x, requires_grad=True)
    v = batch_nc1(one, torch.zeros(7, dtype=torch.long))
    assert float(v.detach()) == 0.0
    v.backward()
    assert torch.equal(one.grad, torch.zeros_like(one))
    with pytest.raises(ConfigError, match="feature width"):
        batch_nc1(torch.randn(8, 2), torch.arange(8) % 4)


def test_batch_nc1_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(12) % 3
    x = (torch.randn(12, 5, generator=gen, dtype=torch.float64) + 2 * torch.randn(3, 5, generator=gen,
                                                                                 dtype=torch.float64)[y])
    assert torch.autograd.gradcheck(lambda t: batch_nc1(t, y), (x.requires_grad_(),))
    # Nearly collapsed onto a simplex (equal singular values, where an SVD/eigh gradient breaks down): finite.
    etf = torch.eye(4, dtype=torch.float64) - 0.25  # (4, 4) centred one-hots = a simplex ETF in R^4
    y4 = torch.arange(16) % 4
    near = (etf[y4] + 1e-4 * torch.randn(16, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    batch_nc1(near, y4).backward()
    assert torch.isfinite(near.grad).all()


def _adapted(bert_dir: Path, method: str = "finetune"):
    seed_everything(0)
    bb = load_bert(bert_dir)
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=[1])
    return bb, build_classifier(bb, 2, method=method, selection=sel)


def test_penalty_gradients_reach_only_trainable_parameters(bert_dir: Path, text_data) -> None:
    pytest.importorskip("transformers")
    bb, adapted = _adapted(bert_dir)
    model = adapted.model
    penalty = NC1Penalty.for_adapted(adapted, bb)
    assert penalty.module_name == "backbone.hf.encoder.layer.1"
    split = text_data["train"]
    inputs = bb.prepare(split.inputs)
    y = torch.as_tensor(np.asarray(split.labels))
    model.train()
    penalty.attach()
    try:
        with penalty.capture(inputs):
            model(**inputs)
        value = penalty.value(y)
    finally:
        penalty.detach()
    # The same number as the probe's nc1 of the block's pooled output on this batch (dropout off for the check).
    store = {}

    def keep(module, args, out) -> None:  # must return None: a returned value would replace the output
        store["f"] = bb.pool(out, inputs)

    handle = model.get_submodule(penalty.module_name).register_forward_hook(keep)
    model.eval()
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    penalty.attach()
    with penalty.capture(inputs):
        model(**inputs)
    expected = collapse_metrics(store["f"].double(), y, 2)["nc1"]
    assert float(penalty.value(y).detach()) == pytest.approx(expected, rel=1e-6)
    penalty.detach()
    value.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got and got <= trainable
    assert all(n.startswith("backbone.hf.encoder.layer.1.") for n in got)  # not the head: NC1 ignores it


def test_trainer_adds_the_penalty(bert_dir: Path, text_data, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    split = TrainData(train=text_data["train"], test=text_data["test"])
    losses = {}
    for lam in (0.0, 0.5):
        bb, adapted = _adapted(bert_dir)
        out = tmp_path / str(lam)
        Trainer(adapted, bb, split, train_config(epochs=1, nc1_penalty=lam), out, progress=False).fit()
        losses[lam] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                       if "loss" in json.loads(line) and "split" not in json.loads(line)]
    # Same first batch, same weights: the logged loss grows by λ·NC1 > 0 at step 1.
    assert losses[0.5][0] > losses[0.0][0]


def test_penalty_refusals(bert_dir: Path, text_data, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    split = TrainData(train=text_data["train"], test=text_data["test"])
    bb, adapted = _adapted(bert_dir, method="linear_probe")
    with pytest.raises(ConfigError, match="linear_probe"):
        Trainer(adapted, bb, split, train_config(nc1_penalty=1.0), tmp_path, progress=False)
    bb, adapted = _adapted(bert_dir)
    with pytest.raises(UserError, match="nc1_penalty"):
        Trainer(adapted, bb, split, train_config(nc1_penalty=-1.0), tmp_path, progress=False)
