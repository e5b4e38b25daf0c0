"""nc-finetune export: every family/method loads with its own library and predicts exactly what the run predicts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nc_finetune.cli import main
from nc_finetune.export import MANIFEST, export_run, load_export
from tests.conftest import make_texts, recipe_overrides

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TEXTS, _ = make_texts(8, 2, seed=11)


@pytest.fixture(autouse=True)
def _private_modules_cache(tmp_path, monkeypatch):
    """trust_remote_code copies the shipped modeling file into transformers' modules cache: keep it private."""
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def _run(tmp_path_factory, overrides: list[str], name: str) -> Path:
    from nc_finetune.config import load_recipe
    from nc_finetune.pipeline import run_stage

    out = tmp_path_factory.mktemp(name) / "run"
    run_stage(load_recipe(None, overrides), out, progress=False)
    return out


def _ours(run: Path):
    """The run's classifier rebuilt independently of the export code (as eval rebuilds it) and its backbone."""
    from safetensors.torch import load_file

    from nc_finetune.config import load_recipe
    from nc_finetune.pipeline import build_recipe_classifier, load_recipe_backbone
    from nc_finetune.probe.result import ProbeResult
    from nc_finetune.select import Selection
    from nc_finetune.utils.env import seed_everything

    recipe = load_recipe(run / "resolved.yaml")
    seed_everything(recipe.train.seed)  # as run_stage: a random-init backbone is drawn right after seeding
    backbone = load_recipe_backbone(recipe)
    k = len(json.loads((run / "summary.json").read_text())["class_names"])
    adapted = build_recipe_classifier(recipe, backbone, k, Selection.load(run / "selection.json"),
                                      ProbeResult.load(run / "probe.json"), None)
    adapted.model.load_state_dict(load_file(str(run / "trainable.safetensors")), strict=False)
    return adapted.model.eval(), backbone


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return getattr(out, "logits", out)


# --------------------------------------------------------------------------------------------------- text (BERT)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, bert_dir, text_csv) -> Path:
    return _run(tmp_path_factory, recipe_overrides(bert_dir, text_csv, **{"adapt.method": "lora",
                                                                           "train.epochs": 1}), "lora")


def test_finetune_bert_loads_with_auto_model_and_predicts_as_eval(finished_run, tmp_path, capsys) -> None:
    from nc_finetune.pipeline import eval_stage

    out = tmp_path / "export"
    assert main(["export", str(finished_run["out"]), "--out", str(out)]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == "transformers-remote-code"  # BERT's own class would add its tanh pooler
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), trust_remote_code=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert model.config.id2label == {0: "0", 1: "1"} and model.config.label2id == {"0": 0, "1": 1}
    ours, backbone = _ours(finished_run["out"])
    inputs = backbone.prepare(TEXTS)
    theirs = dict(tokenizer(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt"))
    torch.testing.assert_close(_logits(model, theirs), _logits(ours, inputs), atol=1e-5, rtol=0)
    # the exported model's test accuracy is eval's
    import csv

    with open(finished_run["recipe"].data.data_files["test"], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    enc = dict(tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=16,
                         return_tensors="pt"))
    pred = _logits(model, enc).argmax(1).numpy()
    acc = float(np.mean(pred == np.array([int(r["label"]) for r in rows])))
    assert acc == eval_stage(finished_run["out"])["accuracy"]


def test_lora_adapter_loads_with_plain_peft(lora_run, tmp_path) -> None:
    out = tmp_path / "export"
    manifest = export_run(lora_run, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "base" and manifest["base"] == "base"
    assert cfg["modules_to_save"] == ["classifier"]
    assert cfg["layers_to_transform"] == [1] and cfg["layers_pattern"] == "layer"
    assert not any("backbone" in t or t.startswith("hf.") for t in cfg["target_modules"])
    base = transformers.AutoModelForSequenceClassification.from_pretrained(str(out / "base"),
                                                                           trust_remote_code=True)
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ours, backbone = _ours(lora_run)
    inputs = backbone.prepare(TEXTS)
    torch.testing.assert_close(_logits(model, inputs), _logits(ours, inputs), atol=1e-5, rtol=0)
    lora = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert lora and all(".encoder.layer.1." in n for n in lora)


def test_lora_merged_is_a_plain_model(lora_run, tmp_path) -> None:
    out = tmp_path / "merged"
    manifest = export_run(lora_run, out, merge=True)
    assert manifest["merged"] and not (out / "adapter_config.json").exists()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), trust_remote_code=True)
    assert not any("lora" in n for n, _ in model.named_parameters())
    ours, backbone = _ours(lora_run)
    inputs = backbone.prepare(TEXTS)
    torch.testing.assert_close(_logits(model, inputs), _logits(ours, inputs), atol=1e-5, rtol=0)


def test_scl_exports_weights_with_a_loader(tmp_path_factory, bert_dir, text_csv, tmp_path) -> None:
    run = _run(tmp_path_factory, recipe_overrides(bert_dir, text_csv, **{"adapt.method": "scl",
                                                                          "adapt.scl_wiring": "concat",
                                                                          "train.epochs": 1}), "scl")
    out = tmp_path / "export"
    assert export_run(run, out)["format"] == "nc-finetune"
    model, backbone = load_export(out)
    ours, _ = _ours(run)
    inputs = backbone.prepare(TEXTS)
    torch.testing.assert_close(_logits(model, inputs), _logits(ours, inputs), atol=1e-5, rtol=0)


def test_unfinished_run_and_used_out_dir_exit_2(finished_run, tmp_path, capsys) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(finished_run["out"] / "resolved.yaml", partial / "resolved.yaml")
    assert main(["export", str(partial), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a finished run (missing selection.json" in err
    assert not (tmp_path / "e").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("keep")
    assert main(["export", str(finished_run["out"]), "--out", str(used)]) == 2
    assert "not an empty directory" in capsys.readouterr().err and (used / "x").read_text() == "keep"
