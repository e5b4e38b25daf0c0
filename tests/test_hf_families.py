"""End to end on every supported Hugging Face text family: ``nc-finetune run`` (probe -> NC-guided selection ->
LoRA -> train with the frozen-prefix cache -> report) on tiny random decoders (GPT-2, Llama, Qwen2, Mistral, Phi,
Gemma) and encoders (DistilBERT, DeBERTa-v2, ELECTRA, RoBERTa); a pooling that does not fit the family is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nc_finetune.cli import main
from tests.conftest import recipe_overrides
from tests.hf_families import DECODERS, FAMILIES, LAYER_STACKS, make_family_dir

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("peft")

LORA_RUN = {"selection.strategy": "knee", "selection.max_blocks": 1, "selection.blocks": "null",
            "adapt.method": "lora", "adapt.lora_r": 4, "train.epochs": 2, "train.cache_prefix": "auto"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_probe_and_lora_run_on_each_family(capsys, tmp_path: Path, text_csv, family: str) -> None:
    ref = make_family_dir(tmp_path / family, family)
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n", encoding="utf-8")
    argv = ["run", str(recipe), *recipe_overrides(ref, text_csv, **LORA_RUN), "--out", str(out), "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err

    probe = json.loads((out / "probe.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    decoder = family in DECODERS
    assert probe["pooling"] == ("last" if decoder else "cls")
    stack = LAYER_STACKS.get(family, "hf.layers" if decoder else "hf.encoder.layer")
    blocks = [row["name"] for row in probe["layers"] if row["is_block"]]
    assert blocks == [f"{stack}.{i}" for i in range(3)]
    assert all(row["nc1"] == row["nc1"] for row in probe["layers"])  # finite (not NaN) at every tap
    (block,) = [b["name"] for b in json.loads((out / "selection.json").read_text())["blocks"]]
    assert block in blocks
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] and all(f".{block}." in t for t in adapter["target_modules"])
    assert adapter["fan_in_fan_out"] is (family == "gpt2")
    # the cached prefix reproduced the model's forward (else it reports a reason and trains uncached)
    assert summary["prefix_cache"]["enabled"], summary["prefix_cache"]
    assert summary["method"] == "lora" and 0.0 <= summary["test_accuracy"] <= 1.0


@pytest.mark.parametrize(("family", "pooling", "needle"), [
    ("gpt2", "cls", "pooling 'cls' does not fit decoder-only"),
    ("qwen2", "cls", "pooling 'cls' does not fit decoder-only"),
    ("llama", "max", "backbone.pooling"),
])
def test_a_pooling_that_does_not_fit_the_family_exits_2_with_one_line(capsys, tmp_path: Path, text_csv, family,
                                                                      pooling, needle) -> None:
    ref = make_family_dir(tmp_path / family, family)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n", encoding="utf-8")
    out = tmp_path / "probe"
    capsys.readouterr()
    argv = ["probe", str(recipe), *recipe_overrides(ref, text_csv, **{"backbone.pooling": pooling}),
            "--out", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()
