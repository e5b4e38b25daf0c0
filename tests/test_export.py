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
    from nc_finetune.pipeline import run_pipeline

    out = tmp_path_factory.mktemp(name) / "run"
    run_pipeline(load_recipe(None, overrides), out, progress=False)
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
    seed_everything(recipe.train.seed)  # as run_pipeline: a random-init backbone is drawn right after seeding
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
    scope = {"DIR": str(out)}
    exec(manifest["load"], scope)  # the loading code the manifest (and the CLI) gives
    torch.testing.assert_close(_logits(scope["model"].eval(), inputs), _logits(ours, inputs), atol=1e-5, rtol=0)


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
    assert err.count("\n") == 0 and "is not a finished nc-finetune run (missing selection.json" in err
    assert not (tmp_path / "e").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("keep")
    assert main(["export", str(finished_run["out"]), "--out", str(used)]) == 2
    assert "not an empty directory" in capsys.readouterr().err and (used / "x").read_text() == "keep"



def test_a_second_export_to_one_directory_is_refused_while_the_first_writes(finished_run, tmp_path, capsys,
                                                                            monkeypatch) -> None:
    """Two exports to one --out would share its temporary copy: the second exits 2 in one line while the first
    holds the lock, and the first finishes intact; the lock leaves nothing behind."""
    import threading

    import nc_finetune.export as export

    out = tmp_path / "e"
    writing, release = threading.Event(), threading.Event()
    real_rebuild = export._rebuild

    def slow_rebuild(*args, **kwargs):
        writing.set()
        assert release.wait(60)
        return real_rebuild(*args, **kwargs)

    monkeypatch.setattr(export, "_rebuild", slow_rebuild)
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(m=export_run(finished_run["out"], out)))
    thread.start()
    try:
        assert writing.wait(60)
        capsys.readouterr()
        assert main(["export", str(finished_run["out"]), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {out} is being written by another export" in err, err
        assert "nc-finetune export (pid" in err
    finally:
        release.set()
        thread.join(120)
    assert first["m"]["class_names"] and (out / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no lock or temporary copy left beside it
    assert main(["export", str(finished_run["out"]), "--out", str(out)]) == 2  # now: not empty, as before
    assert "not an empty directory" in capsys.readouterr().err

# --------------------------------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> str:
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog", "emu")):
        (root / name).mkdir()
        for i in range(8):
            arr = np.clip(rng.integers(0, 180, size=(12, 12, 3)) + 30 * c, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32)
    transformers.ViTModel(config).save_pretrained(d)
    return d


def _image_overrides(bert_dir, text_csv, image_folder, backbone: list[str], **extra) -> list[str]:
    base = recipe_overrides(bert_dir, text_csv, **{"data.name": "imagefolder", "data.data_files": image_folder,
                                                   "data.test_size": 0.25, "train.epochs": 1, **extra})
    return base + backbone


IMAGES = np.random.default_rng(3).integers(0, 256, size=(4, 12, 12, 3), dtype=np.uint8)
TIMM = ["backbone.name=timm:test_efficientnet", "backbone.pretrained=false", "backbone.image_size=16"]


@pytest.mark.parametrize("method", ["finetune", "lora"])
def test_timm_loads_with_timm_and_peft(tmp_path_factory, tmp_path, bert_dir, text_csv, image_folder, method) -> None:
    import timm

    run = _run(tmp_path_factory, _image_overrides(bert_dir, text_csv, image_folder, TIMM,
                                                  **{"adapt.method": method}), f"timm-{method}")
    ours, backbone = _ours(run)
    inputs = backbone.prepare(IMAGES)
    expected = _logits(ours, inputs)
    merged = tmp_path / "model"
    assert export_run(run, merged, merge=True)["format"] == "timm"
    model = timm.create_model(f"local-dir:{merged}", pretrained=True).eval()
    assert model.num_classes == 3 and model.pretrained_cfg["label_names"] == ["cat", "dog", "emu"]
    torch.testing.assert_close(_logits(model, inputs), expected, atol=1e-5, rtol=0)
    # eval's accuracy and loss are the exported model's (a random-init backbone: eval must draw the run's weights)
    from nc_finetune.config import load_recipe
    from nc_finetune.pipeline import eval_stage, prepare_data

    test = prepare_data(load_recipe(run / "resolved.yaml")).data.test
    logits = _logits(model, backbone.prepare(test.inputs[:]))
    labels = torch.as_tensor(test.labels)
    r = eval_stage(run)
    assert r["accuracy"] == int((logits.argmax(1) == labels).sum()) / len(labels)
    assert r["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), abs=1e-5)
    # the documented alternative: the architecture name with the checkpoint file
    plain = timm.create_model("test_efficientnet", num_classes=3, checkpoint_path=str(merged / "model.safetensors"))
    torch.testing.assert_close(_logits(plain.eval(), inputs), expected,
                               atol=1e-5, rtol=0)
    if method == "lora":
        out = tmp_path / "adapter"
        manifest = export_run(run, out)
        assert manifest["format"] == "peft+timm" and manifest["base"] == "base"  # random init: the base ships
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["modules_to_save"] == [model.pretrained_cfg["classifier"]]
        base = timm.create_model(f"local-dir:{out / 'base'}", pretrained=True)
        loaded = peft.PeftModel.from_pretrained(base, str(out)).eval()
        torch.testing.assert_close(_logits(loaded, inputs), expected, atol=1e-5, rtol=0)
        scope = {"DIR": str(out)}
        exec(manifest["load"], scope)  # the loading code the manifest (and the CLI) gives
        torch.testing.assert_close(_logits(scope["model"].eval(), inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("pooling", "kind"), [("cls", "transformers"), ("mean", "transformers-remote-code")])
def test_vit_exports_to_its_own_class_when_it_pools_the_same(tmp_path_factory, tmp_path, bert_dir, text_csv,
                                                             image_folder, vit_dir, pooling, kind) -> None:
    vit = [f"backbone.name=hf:{vit_dir}", f"backbone.pooling={pooling}", "backbone.image_size=16"]
    run = _run(tmp_path_factory, _image_overrides(bert_dir, text_csv, image_folder, vit), f"vit-{pooling}")
    out = tmp_path / "export"
    assert export_run(run, out)["format"] == kind
    model = transformers.AutoModelForImageClassification.from_pretrained(str(out), trust_remote_code=True)
    if kind == "transformers":
        assert type(model).__name__ == "ViTForImageClassification"
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "emu"}
    ours, backbone = _ours(run)
    inputs = backbone.prepare(IMAGES)
    torch.testing.assert_close(_logits(model.eval(), inputs), _logits(ours, inputs), atol=1e-5, rtol=0)


def test_vit_lora_adapter_on_the_published_checkpoint(tmp_path_factory, tmp_path, bert_dir, text_csv, image_folder,
                                                      vit_dir) -> None:
    vit = [f"backbone.name=hf:{vit_dir}", "backbone.image_size=16", "adapt.method=lora"]
    run = _run(tmp_path_factory, _image_overrides(bert_dir, text_csv, image_folder, vit), "vit-lora")
    out = tmp_path / "adapter"
    manifest = export_run(run, out)
    assert manifest["format"] == "peft+transformers" and manifest["base"] == str(vit_dir)
    assert not (out / "base").exists()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(vit_dir) and cfg["modules_to_save"] == ["classifier"]
    base = transformers.AutoModelForImageClassification.from_pretrained(str(vit_dir), num_labels=3,
                                                                         ignore_mismatched_sizes=True)
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ours, backbone = _ours(run)
    inputs = backbone.prepare(IMAGES)
    torch.testing.assert_close(_logits(model, inputs), _logits(ours, inputs), atol=1e-5, rtol=0)
    scope = {"DIR": str(out)}
    exec(manifest["load"], scope)
    torch.testing.assert_close(_logits(scope["model"].eval(), inputs), _logits(ours, inputs), atol=1e-5, rtol=0)


def test_builtin_efficientnet_lite_exports_as_its_timm_architecture(tmp_path) -> None:
    import timm

    from nc_finetune.backbones import load_backbone
    from nc_finetune.backbones.export_target import export_target

    torch.manual_seed(0)
    backbone = load_backbone("efficientnet-lite0", pretrained=False, image_size=32)
    head = torch.nn.Linear(backbone.feature_dim, 2)
    inputs = backbone.prepare(IMAGES)
    with torch.no_grad():
        reference = head(backbone.model(**inputs))
    target = export_target(backbone, head, ["no", "yes"], inputs, reference)
    assert target.kind == "timm"
    target.save(target.model, tmp_path)
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert model.pretrained_cfg["architecture"] == "tf_efficientnet_lite0"
    torch.testing.assert_close(_logits(model, inputs), reference, atol=1e-5, rtol=0)
    from nc_finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="no library format reproduces its logits"):
        export_target(backbone, head, ["no", "yes"], inputs, reference + 1.0)


def test_truncated_backbone_exports_weights_with_the_loader(tmp_path_factory, bert_dir, text_csv, tmp_path) -> None:
    run = _run(tmp_path_factory, recipe_overrides(bert_dir, text_csv, **{"backbone.truncate_at": 1,
                                                                          "selection.blocks": "[0]",
                                                                          "train.epochs": 1}), "truncated")
    out = tmp_path / "export"
    assert export_run(run, out)["format"] == "nc-finetune"
    model, backbone = load_export(out)
    assert len(backbone.blocks) == 2
    ours, _ = _ours(run)
    inputs = backbone.prepare(TEXTS)
    torch.testing.assert_close(_logits(model, inputs), _logits(ours, inputs), atol=1e-5, rtol=0)
