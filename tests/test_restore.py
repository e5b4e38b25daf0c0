"""``backbone.init_from``: a new run starts from the weights an earlier run trained (finetune and LoRA)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nc_finetune.errors import ConfigError, UserError
from nc_finetune.pipeline import load_recipe_backbone, run_pipeline
from nc_finetune.probe.result import ProbeResult
from nc_finetune.restore import restore_backbone_weights
from nc_finetune.select import Selection
from tests.conftest import make_recipe

pytest.importorskip("transformers")


def _paths(finished_run) -> tuple[Path, dict]:
    recipe = finished_run["recipe"]
    return Path(recipe.backbone.name[len("hf:"):]), recipe.data.data_files


def test_finetuned_blocks_come_back_and_the_rest_stays_pretrained(finished_run) -> None:
    out, recipe = finished_run["out"], finished_run["recipe"]
    pretrained = load_recipe_backbone(recipe).model.state_dict()
    backbone = load_recipe_backbone(recipe)
    info = restore_backbone_weights(backbone, out, name=recipe.backbone.name, pretrained=True)

    trained = load_file(str(out / "trainable.safetensors"))
    block = Selection.load(out / "selection.json").blocks[0]["name"]
    state = backbone.model.state_dict()
    restored = {k for k in state if k.startswith(block + ".")}
    assert info["method"] == "finetune" and info["tensors"] == len(restored) > 0
    for k, v in state.items():
        if k in restored:
            assert torch.equal(v, trained["backbone." + k]), k
            assert not torch.equal(v, pretrained[k]) or "LayerNorm" in k or "bias" in k, k
        else:
            assert torch.equal(v, pretrained[k]), k
    assert all(p.requires_grad for p in backbone.model.parameters()) and not backbone.model.training


def test_a_run_started_from_a_run_probes_the_trained_model(finished_run, tmp_path) -> None:
    """Blocks before the tuned one see the same features as before, the tuned block and later ones do not."""
    bert, csv = _paths(finished_run)
    src = finished_run["out"]
    recipe = make_recipe(bert, csv, **{"backbone.init_from": str(src), "adapt.method": "linear_probe",
                                       "train.epochs": 1})
    summary = run_pipeline(recipe, tmp_path / "run", progress=False)
    assert summary["backbone_provenance"]["init_from"] == str(src)
    assert summary["backbone_provenance"]["init_from_method"] == "finetune"

    tuned = Selection.load(src / "selection.json").blocks[0]["index"]
    before = {r["index"]: r["nc1"] for r in ProbeResult.load(src / "probe.json").blocks()}
    after = {r["index"]: r["nc1"] for r in ProbeResult.load(tmp_path / "run" / "probe.json").blocks()}
    for i in before:
        if i < tuned:
            assert after[i] == pytest.approx(before[i], rel=1e-9), i
        else:
            assert after[i] != pytest.approx(before[i], rel=1e-6), i


def test_lora_runs_are_merged_into_the_weights(finished_run, tmp_path) -> None:
    bert, csv = _paths(finished_run)
    recipe = make_recipe(bert, csv, **{"adapt.method": "lora", "adapt.lora_r": 2, "adapt.lora_alpha": 8,
                                       "train.epochs": 1})
    out = tmp_path / "lora"
    run_pipeline(recipe, out, progress=False)
    adapter = load_file(str(out / "trainable.safetensors"))
    pretrained = load_recipe_backbone(recipe).model.state_dict()
    backbone = load_recipe_backbone(recipe)
    info = restore_backbone_weights(backbone, out, name=recipe.backbone.name, pretrained=True)
    state = backbone.model.state_dict()
    assert not any("lora" in k for k in state)  # a plain backbone again

    prefix = "base_model.model.backbone."
    targets = {k[len(prefix):k.index(".lora_A")] for k in adapter if k.startswith(prefix) and ".lora_A." in k}
    assert targets and info["method"] == "lora"
    scaling = 8 / 2
    for t in targets:
        a = adapter[f"{prefix}{t}.lora_A.default.weight"]  # (r, in)
        b = adapter[f"{prefix}{t}.lora_B.default.weight"]  # (out, r)
        torch.testing.assert_close(state[f"{t}.weight"], pretrained[f"{t}.weight"] + scaling * b @ a)
    untouched = [k for k in state if not any(k.startswith(t + ".") for t in targets)]
    assert untouched and all(torch.equal(state[k], pretrained[k]) for k in untouched)


def test_refusals(finished_run, tmp_path) -> None:
    out, recipe = finished_run["out"], finished_run["recipe"]
    name = recipe.backbone.name
    with pytest.raises(UserError, match="is not a finished nc-finetune run .missing resolved.yaml"):
        restore_backbone_weights(load_recipe_backbone(recipe), tmp_path, name=name, pretrained=True)
    with pytest.raises(ConfigError, match="trained backbone 'hf:.*', but backbone.name is 'timm:resnet18'"):
        restore_backbone_weights(load_recipe_backbone(recipe), out, name="timm:resnet18", pretrained=True)
    with pytest.raises(ConfigError, match="backbone.pretrained=True; set the same here"):
        restore_backbone_weights(load_recipe_backbone(recipe), out, name=name, pretrained=False)

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    from safetensors.torch import save_file

    weights = load_file(str(broken / "trainable.safetensors"))
    weights["backbone.no.such.weight"] = torch.zeros(1)
    save_file(weights, str(broken / "trainable.safetensors"))
    with pytest.raises(UserError, match="does not fit this backbone .'no.such.weight'"):
        restore_backbone_weights(load_recipe_backbone(recipe), broken, name=name, pretrained=True)


def test_a_run_that_started_from_a_run_restores_the_whole_chain(finished_run, tmp_path) -> None:
    """C = init_from B, B = init_from A: A's trained block must come back too, not only what B trained."""
    bert, csv = _paths(finished_run)
    a_out, a_recipe = finished_run["out"], finished_run["recipe"]
    a_block = Selection.load(a_out / "selection.json").blocks[0]
    b_index = 0 if a_block["index"] != 0 else 2
    b_out = tmp_path / "b"
    run_pipeline(make_recipe(bert, csv, **{"backbone.init_from": str(a_out), "selection.blocks": f"[{b_index}]",
                                        "train.epochs": 1}), b_out, progress=False)
    b_block = Selection.load(b_out / "selection.json").blocks[0]["name"]
    a_weights = load_file(str(a_out / "trainable.safetensors"))
    b_weights = load_file(str(b_out / "trainable.safetensors"))

    backbone = load_recipe_backbone(a_recipe)
    info = restore_backbone_weights(backbone, b_out, name=a_recipe.backbone.name, pretrained=True)
    state = backbone.model.state_dict()
    assert info["run"] == str(b_out)
    for k, v in state.items():
        if k.startswith(a_block["name"] + "."):
            assert torch.equal(v, a_weights["backbone." + k]), k
        elif k.startswith(b_block + "."):
            assert torch.equal(v, b_weights["backbone." + k]), k

    loop = tmp_path / "loop"
    shutil.copytree(b_out, loop)
    text = (loop / "resolved.yaml").read_text(encoding="utf-8").replace(str(a_out), str(loop))
    (loop / "resolved.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match="starts from itself"):
        restore_backbone_weights(load_recipe_backbone(a_recipe), loop, name=a_recipe.backbone.name, pretrained=True)


def test_a_truncated_lora_run_restores_into_the_whole_backbone(finished_run, tmp_path) -> None:
    """The head of a truncated run reads the cut block's width (here made narrower than the final feature, as for a
    CNN cut early); the head is dropped, so it must not stop the merge."""
    from safetensors.torch import save_file

    bert, csv = _paths(finished_run)
    out = tmp_path / "lora_cut"
    run_pipeline(make_recipe(bert, csv, **{"adapt.method": "lora", "adapt.lora_r": 2, "backbone.truncate_at": 1,
                                        "train.epochs": 1}), out, progress=False)
    weights = load_file(str(out / "trainable.safetensors"))
    for k in [k for k in weights if ".nc_head." in k and k.endswith(".weight")]:
        weights[k] = torch.zeros(weights[k].shape[0], 8)  # (K, D_cut) with D_cut = 8 != 16
    save_file(weights, str(out / "trainable.safetensors"))

    recipe = finished_run["recipe"]
    backbone = load_recipe_backbone(recipe)
    info = restore_backbone_weights(backbone, out, name=recipe.backbone.name, pretrained=True)
    assert info["method"] == "lora" and info["tensors"] > 0
    assert not any("lora" in k for k in backbone.model.state_dict())
