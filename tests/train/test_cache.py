"""Frozen-prefix cache: training from cached prefix outputs equals training through the real prefix; the prefix
really is skipped; verify() catches a cache that cannot replay the forward, and the trainer then falls back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nc_finetune.adapt import build_classifier, eval_mode
from nc_finetune.backbones import Backbone, load_backbone
from nc_finetune.backbones.base import make_block_infos
from nc_finetune.data import Split
from nc_finetune.errors import UserError
from nc_finetune.select import select_blocks
from nc_finetune.train.cache import PrefixCache
from nc_finetune.train.loop import TrainData, Trainer
from nc_finetune.utils.env import seed_everything
from tests.conftest import WORDS, load_bert, load_cnn, make_texts, train_config

pytest.importorskip("transformers")

BERT_PREFIX = ["backbone.hf.embeddings", "backbone.hf.encoder.layer.0"]
CASES = {
    # name: (model, method, selected block, expected prefix modules)
    "bert-finetune": ("bert", "finetune", 1, BERT_PREFIX),
    "bert-scl": ("bert", "scl", 1, BERT_PREFIX),
    "bert-lora": ("bert", "lora", 1, ["base_model.model." + n for n in BERT_PREFIX]),
    "bert-linear_probe": ("bert", "linear_probe", None, ["backbone"]),
    "cnn-finetune": ("cnn", "finetune", 2,
                     ["backbone.conv_stem", "backbone.bn1", "backbone.blocks.0", "backbone.blocks.1"]),
    "cnn-linear_probe": ("cnn", "linear_probe", None, ["backbone"]),
}


def _run(kind: str, method: str, block, data: dict, out: Path, cache: str, bert_dir: Path, **cfg):
    seed_everything(0)
    bb = load_bert(bert_dir) if kind == "bert" else load_cnn()
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=[block]) if block is not None else None
    adapted = build_classifier(bb, int(max(data["train"].labels)) + 1, method=method, selection=sel,
                               skip_dim=bb.feature_dim, wiring="concat")
    trainer = Trainer(adapted, bb, TrainData(train=data["train"], test=data["test"]),
                      train_config(cache_prefix=cache, **cfg), out, progress=False)
    return trainer, adapted


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("case", list(CASES))
def test_cached_training_equals_uncached(bert_dir, text_data, image_data, tmp_path, case) -> None:
    kind, method, block, prefix = CASES[case]
    data = text_data if kind == "bert" else image_data
    off, adapted_off = _run(kind, method, block, data, tmp_path / "off", "off", bert_dir)
    s_off = off.fit()
    on, adapted_on = _run(kind, method, block, data, tmp_path / "on", "on", bert_dir)

    # Count calls of modules *inside* the prefix (a patched prefix module is still __call__-ed, its body is not).
    model = adapted_on.model
    inner = [n for n, m in model.named_modules() if any(n.startswith(p + ".") for p in prefix)
             and isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))]
    tuned = [n for n, m in model.named_modules() if block is not None and isinstance(m, (nn.Linear, nn.Conv2d))
             and (".encoder.layer.1." in n or ".blocks.2.0." in n)]
    assert inner
    calls = dict.fromkeys(inner + tuned + ["nc_head"], 0)
    for n in calls:
        model.get_submodule(n).register_forward_pre_hook(lambda *_a, n=n: calls.__setitem__(n, calls[n] + 1))
    setup = on._setup_cache

    def setup_then_reset():
        info = setup()
        for n in calls:  # building and verifying the cache runs the prefix; from here on it must not
            calls[n] = 0
        return info

    on._setup_cache = setup_then_reset
    s_on = on.fit()

    assert s_off["prefix_cache"] == {"enabled": False, "reason": "train.cache_prefix=off"}
    assert s_on["prefix_cache"]["enabled"] and s_on["prefix_cache"]["prefix_modules"] == prefix
    assert all(calls[n] == 0 for n in inner), {n: calls[n] for n in inner if calls[n]}
    assert calls["nc_head"] > 0 and all(calls[n] > 0 for n in tuned)

    w_off, w_on = adapted_off.trainable_state_dict(), adapted_on.trainable_state_dict()
    assert set(w_off) == set(w_on)
    for k in w_off:
        torch.testing.assert_close(w_on[k], w_off[k], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(_losses(tmp_path / "on"), _losses(tmp_path / "off"), atol=1e-5, rtol=1e-5)
    assert s_on["test_loss"] == pytest.approx(s_off["test_loss"], abs=1e-5)


def test_linear_probe_cache_of_text_with_hidden_size_equal_to_the_padded_length(bert_dir, tmp_path) -> None:
    """Pooled (B, D) features must not be trimmed like (B, T, D) tokens when D happens to equal T (hidden 16 here):
    the first 8 samples (those verify() checks) are short, a later build batch pads to exactly 16 tokens."""
    texts, labels = make_texts(24, 2, seed=1)
    texts[12] = " ".join(["the"] * 14)  # [CLS] + 14 + [SEP] = 16 tokens = hidden size
    data = {"train": Split(texts[:16], labels[:16]), "test": Split(texts[16:], labels[16:])}
    off, a_off = _run("bert", "linear_probe", None, data, tmp_path / "off", "off", bert_dir)
    s_off = off.fit()
    on, a_on = _run("bert", "linear_probe", None, data, tmp_path / "on", "on", bert_dir)
    s_on = on.fit()
    assert s_on["prefix_cache"]["enabled"]
    for k, v in a_off.trainable_state_dict().items():
        torch.testing.assert_close(a_on.trainable_state_dict()[k], v, atol=1e-5, rtol=1e-5)
    assert s_on["test_loss"] == pytest.approx(s_off["test_loss"], abs=1e-5)


def test_augmentation_disables_the_cache(image_data, bert_dir, tmp_path) -> None:
    t, _ = _run("cnn", "finetune", 2, image_data, tmp_path, "auto", bert_dir, augment=True, epochs=1)
    info = t.fit()["prefix_cache"]
    assert not info["enabled"] and "augment" in info["reason"]


def test_full_finetune_has_no_prefix_to_cache(bert_dir, text_data, tmp_path) -> None:
    t, _ = _run("bert", "full", None, text_data, tmp_path, "on", bert_dir, epochs=1)
    assert t.fit()["prefix_cache"] == {"enabled": False, "reason": "no frozen prefix"}


# ------------------------------------------------------------------------------- a prefix the cache cannot replay


class _WorkBetweenModules(nn.Module):
    """``a`` -> functional work (not a module) -> ``b`` -> ``c``: b's input is not the output of any module, so
    nothing before b can be skipped (replaying b's input as the output of ``a`` would apply the work twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) * 2.0 + 1.0
        return self.c(torch.relu(self.b(h)))


class _ReuseAfterTarget(nn.Module):
    """``a`` -> ``a2`` -> ``b`` -> ``c``, and ``a``'s output is read again by a plain function after ``b``: the trace
    sees ``a`` feed only ``a2`` and skips it, so only :meth:`PrefixCache.verify` can notice that the replay is wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.a2 = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.c(torch.relu(self.b(self.a2(h)))) + h.sum(1, keepdim=True)


def _toy_backbone(cls: type[nn.Module] = _ReuseAfterTarget) -> Backbone:
    torch.manual_seed(0)
    model = cls().eval()
    names = [n for n, _ in model.named_children()]
    return Backbone(spec="toy", model=model, modality="image", blocks=make_block_infos(model, names),
                    feature_dim=8, pooling="mean", final_tap=None,
                    preprocess=lambda raw, train=False: {"x": torch.as_tensor(np.asarray(raw), dtype=torch.float32)})


def _toy_data() -> dict[str, Split]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return {"train": Split(x[:16], y[:16]), "test": Split(x[16:], y[16:])}


def _toy_run(cache: str, out: Path, cls: type[nn.Module] = _ReuseAfterTarget):
    seed_everything(0)
    bb = _toy_backbone(cls)
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=["b"])
    adapted = build_classifier(bb, 2, method="finetune", selection=sel)
    data = _toy_data()
    return Trainer(adapted, bb, TrainData(train=data["train"], test=data["test"]), train_config(cache_prefix=cache),
                   out, progress=False), adapted


def test_nothing_is_skipped_when_functional_work_feeds_the_target(tmp_path) -> None:
    bb = _toy_backbone(_WorkBetweenModules)
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=["b"])
    model = build_classifier(bb, 2, method="finetune", selection=sel).model
    x = _toy_data()["train"].inputs
    cache = PrefixCache(model, "backbone.b", "backbone")
    with eval_mode(model):
        cache.build("train", iter([bb.prepare(x[:8]), bb.prepare(x[8:])]), torch.device("cpu"))
    assert cache.plan.before == ["backbone.a"] and cache.prefix == []
    for mode in ("auto", "on"):
        t, _ = _toy_run(mode, tmp_path / mode, _WorkBetweenModules)
        info = t.fit()["prefix_cache"]
        assert info == {"enabled": False, "reason": "no module before the first trainable block can be skipped"}


def test_verify_rejects_a_replay_that_the_trace_cannot_see() -> None:
    bb = _toy_backbone()
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=["b"])
    model = build_classifier(bb, 2, method="finetune", selection=sel).model
    x = _toy_data()["train"].inputs
    cache = PrefixCache(model, "backbone.b", "backbone")
    with eval_mode(model):
        cache.build("train", iter([bb.prepare(x[:8]), bb.prepare(x[8:])]), torch.device("cpu"))
    assert cache.prefix == ["backbone.a", "backbone.a2"]
    assert not cache.verify("train", bb.prepare(x[:8]), list(range(8)), torch.device("cpu"))


def test_trainer_falls_back_when_the_replay_differs(tmp_path) -> None:
    auto, adapted_auto = _toy_run("auto", tmp_path / "auto")
    info = auto.fit()["prefix_cache"]
    assert info == {"enabled": False, "reason": "cached path differs from the real forward"}
    assert auto.cache is None
    off, adapted_off = _toy_run("off", tmp_path / "off")
    off.fit()
    for k, v in adapted_off.trainable_state_dict().items():  # the fallback trains through the real forward
        assert torch.equal(adapted_auto.trainable_state_dict()[k], v)
    on, _ = _toy_run("on", tmp_path / "on")
    with pytest.raises(UserError, match="cache_prefix=on"):
        on.fit()


def test_verify_catches_a_corrupted_cache(bert_dir) -> None:
    bb = load_bert(bert_dir)
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=[1])
    model = build_classifier(bb, 2, method="finetune", selection=sel).model
    texts = [" ".join(WORDS[i:i + 2 + i % 5]) for i in range(8)]
    inputs = bb.prepare(texts)
    cache = PrefixCache(model, "backbone.hf.encoder.layer.1", "backbone")
    with eval_mode(model):
        cache.build("train", iter([bb.prepare(texts[:4]), bb.prepare(texts[4:])]), torch.device("cpu"))
    assert cache.prefix == BERT_PREFIX
    assert [x.shape[0] for _, x in cache.samples["train"]] == inputs["attention_mask"].sum(1).tolist()
    assert cache.verify("train", inputs, list(range(8)), torch.device("cpu"))
    _, x = cache.samples["train"][5]
    x[0] += 1.0  # the CLS position of one sample
    assert not cache.verify("train", inputs, list(range(8)), torch.device("cpu"))


# ------------------------------------------------------------------------------------ decoder LLMs and other families

#: Cases the cache cannot replay: left padding (the cached token stream is trimmed on the right) and Gemma's
#: embedding scale between embed_tokens and layer 0 (work outside modules); ``auto`` must train uncached there.
UNCACHED_FAMILY_CASES = ("llama-left-lora", "gemma-finetune-block0")

FAMILY_CASES = {
    # name: (family, padding side, method, selected block, expected replayed prefix modules inside the backbone)
    # Llama computes rotary position embeddings once at model level and passes them to every layer: they are not
    # replayed (the cache would hand the layer hidden states instead of (cos, sin)); left padding is trimmed.
    "llama-left-lora": ("llama", "left", "lora", 1, ["hf.embed_tokens", "hf.layers.0"]),
    # Gemma scales its embeddings between embed_tokens and layer 0 (functional work the replay must not repeat).
    "gemma-finetune-block0": ("gemma", "right", "finetune", 0, ["hf.embed_tokens"]),
    # GPT-2: Conv1D LoRA, token + position embeddings summed before block 0.
    "gpt2-lora-block0": ("gpt2", "right", "lora", 0, ["hf.wte", "hf.wpe", "hf.drop"]),
    # DeBERTa-v2: layers return (hidden, None); the normalised relative embeddings are a side computation.
    "deberta-v2-scl": ("deberta-v2", "right", "scl", 1, ["hf.embeddings", "hf.encoder.layer.0"]),
}


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_cached_training_equals_uncached_on_other_families(tmp_path, case) -> None:
    from tests.hf_families import make_family_dir

    family, side, method, block, expected = FAMILY_CASES[case]
    ref = make_family_dir(tmp_path / family, family, side)
    texts, labels = make_texts(24, 2, seed=1)
    data = TrainData(train=Split(texts[:16], labels[:16]), test=Split(texts[16:], labels[16:]))
    runs = {}
    for cache in ("off", "on"):
        seed_everything(0)
        bb = load_backbone(f"hf:{ref}")
        mode = "auto" if cache == "on" and case in UNCACHED_FAMILY_CASES else cache
        sel = select_blocks(None, bb.blocks, strategy="manual", manual=[block])
        adapted = build_classifier(bb, 2, method=method, selection=sel, skip_dim=bb.feature_dim, wiring="concat")
        trainer = Trainer(adapted, bb, data, train_config(cache_prefix=mode, epochs=2), tmp_path / cache,
                          progress=False)
        runs[cache] = (trainer.fit(), adapted)
    (s_off, a_off), (s_on, a_on) = runs["off"], runs["on"]
    wrap = "base_model.model.backbone." if method == "lora" else "backbone."
    if case in UNCACHED_FAMILY_CASES:
        assert not s_on["prefix_cache"]["enabled"] and s_on["prefix_cache"]["reason"], s_on["prefix_cache"]
    else:
        assert s_on["prefix_cache"]["enabled"], s_on["prefix_cache"]
        assert all(m.startswith(wrap) for m in s_on["prefix_cache"]["prefix_modules"]), expected
    np.testing.assert_allclose(_losses(tmp_path / "on"), _losses(tmp_path / "off"), atol=1e-5, rtol=1e-5)
    for k, v in a_off.trainable_state_dict().items():
        torch.testing.assert_close(a_on.trainable_state_dict()[k], v, atol=1e-5, rtol=1e-5)
    assert s_on["test_loss"] == pytest.approx(s_off["test_loss"], abs=1e-5)


# ------------------------------------------------------------------------------- auto: only where the cache pays


def test_auto_skips_the_cache_when_every_split_is_read_once(bert_dir, text_data, tmp_path) -> None:
    t, _ = _run("bert", "finetune", 1, text_data, tmp_path, "auto", bert_dir, epochs=1)
    calls = []
    evaluate = t.evaluate
    t.evaluate = lambda name, split: calls.append(name) or evaluate(name, split)
    info = t.fit()["prefix_cache"]
    assert not info["enabled"] and "read once (1 epoch)" in info["reason"]
    assert calls == ["test"]  # without validation the epoch's test evaluation is the final one: not run twice


def test_auto_caches_only_the_splits_read_twice(bert_dir, text_data, tmp_path) -> None:
    """One epoch with validation: train and val are read once, test twice (epoch end, then the best model)."""
    data = {"train": text_data["train"], "val": text_data["val"], "test": text_data["test"]}
    summaries, weights = {}, {}
    for mode in ("auto", "off"):
        seed_everything(0)
        bb = load_bert(bert_dir)
        sel = select_blocks(None, bb.blocks, strategy="manual", manual=[1])
        adapted = build_classifier(bb, 2, method="finetune", selection=sel)
        t = Trainer(adapted, bb, TrainData(**data), train_config(cache_prefix=mode, epochs=1), tmp_path / mode,
                    progress=False)
        summaries[mode], weights[mode] = t.fit(), adapted.trainable_state_dict()
    info = summaries["auto"]["prefix_cache"]
    assert info["enabled"] and info["splits"] == ["test"]
    for k, v in weights["off"].items():
        torch.testing.assert_close(weights["auto"][k], v, atol=1e-5, rtol=1e-5)
    assert summaries["auto"]["test_loss"] == pytest.approx(summaries["off"]["test_loss"], abs=1e-5)
