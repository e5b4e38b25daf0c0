"""A selection as a plain peft LoraConfig: it adapts exactly the selected blocks of the library's own model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nc_finetune.select import select_blocks
from tests.conftest import TIMM_CNN, TIMM_IMAGE_SIZE, load_bert

peft = pytest.importorskip("peft")


def _lora_modules(model: nn.Module) -> dict[str, int]:
    """LoRA-wrapped module name (without peft's wrapper) -> its rank."""
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m.r["default"] for n, m in model.named_modules()
            if isinstance(m, LoraLayer)}


def _linears_under(model: nn.Module, prefixes: list[str]) -> set[str]:
    """Independent truth: every Linear/Conv2d (ungrouped) module below one of ``prefixes``."""
    return {n for n, m in model.named_modules() if any(n.startswith(p + ".") for p in prefixes)
            and isinstance(m, (nn.Linear, nn.Conv2d)) and getattr(m, "groups", 1) == 1}


def test_bert_selection_applies_to_the_plain_hf_models(bert_dir) -> None:
    from transformers import AutoModel, AutoModelForSequenceClassification

    bb = load_bert(bert_dir)
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=[0, 2])
    config = sel.peft_config(bb.plain_model(), r=4, alpha=8, ranks={2: 2})
    # the portable form: names inside a block + the layer stack's indices, no wrapper prefix anywhere
    assert config.layers_pattern == "layer" and config.layers_to_transform == [0, 2]
    assert not any(t.startswith(("hf.", "backbone.", "encoder.")) for t in config.target_modules)
    for cls, base in ((AutoModel, ""), (AutoModelForSequenceClassification, "bert.")):
        torch.manual_seed(0)
        plain = cls.from_pretrained(str(bert_dir), num_labels=2) if base else cls.from_pretrained(str(bert_dir))
        expected = _linears_under(plain, [f"{base}encoder.layer.0", f"{base}encoder.layer.2"])
        assert len(expected) == 2 * 6  # query, key, value, attention.output.dense, intermediate.dense, output.dense
        got = _lora_modules(peft.get_peft_model(plain, config))
        assert set(got) == expected
        assert {n: r for n, r in got.items()} == {n: 2 if ".layer.2." in n else 4 for n in expected}


def test_nested_timm_blocks_are_named_in_full() -> None:
    import timm

    from nc_finetune.backbones import load_backbone

    torch.manual_seed(0)
    bb = load_backbone(TIMM_CNN, pretrained=False, image_size=TIMM_IMAGE_SIZE)
    names = [b.name for b in bb.blocks]
    picked = [names[1], names[-1]]  # blocks of two different stages: blocks.S.B
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=picked)
    config = sel.peft_config(bb.plain_model(), r=4)
    assert config.layers_to_transform is None
    plain = timm.create_model(TIMM_CNN.removeprefix("timm:"), pretrained=False, num_classes=3)
    expected = _linears_under(plain, picked)
    got = _lora_modules(peft.get_peft_model(plain, config))
    assert set(got) == expected and got


def test_lora_kwargs_default_head_is_the_classifiers(bert_dir) -> None:
    from nc_finetune.adapt import build_classifier

    bb = load_bert(bert_dir)
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=[1])
    kw = sel.lora_kwargs(build_classifier(bb, 2, method="finetune", selection=sel).model)  # the README's call
    assert kw["modules_to_save"] == ["nc_head"]
    assert kw["target_modules"] and all(t.startswith("backbone.hf.encoder.layer.1.") for t in kw["target_modules"])


def test_select_emit_peft_writes_a_loadable_adapter_config(finished_run, tmp_path, capsys) -> None:
    import shutil

    from nc_finetune.cli import main

    out = tmp_path / "sel"
    out.mkdir()
    shutil.copy(finished_run["out"] / "probe.json", out / "probe.json")  # reused: no probe is paid for
    target = tmp_path / "lora" / "adapter_config.json"
    assert main(["select", "recipes/minilm-rotten-tomatoes.yaml", *finished_run["overrides"],
                 "selection.strategy=manual", "selection.blocks=[1, 2]", "selection.max_blocks=2", "--out", str(out),
                 "--emit-peft", str(target), "--quiet"]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    raw = json.loads(target.read_text())
    assert raw["layers_to_transform"] == [1, 2] and raw["layers_pattern"] == "layer"
    config = peft.LoraConfig.from_pretrained(str(target.parent))
    assert sorted(config.target_modules) == sorted(raw["target_modules"])
    assert config.r == finished_run["recipe"].adapt.lora_r


def test_emit_peft_into_a_directory_is_refused_before_any_work(tmp_path, capsys) -> None:
    from nc_finetune.cli import main

    assert main(["select", "recipes/minilm-rotten-tomatoes.yaml", "--out", str(tmp_path / "sel"),
                 "--emit-peft", str(tmp_path)]) == 2
    assert "--emit-peft" in capsys.readouterr().err and not (tmp_path / "sel").exists()
