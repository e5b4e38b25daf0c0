"""The rivals and collapse-inducing options through recipes: end-to-end runs that eval reproduces, selection.json
rationale, and refusals with exit 2 and one line before any compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nc_finetune.cli import main
from nc_finetune.config import load_recipe
from nc_finetune.errors import ConfigError
from nc_finetune.pipeline import eval_stage, probe_and_select, run_pipeline
from nc_finetune.rivals import check_rival_options
from tests.conftest import make_recipe, recipe_overrides

pytest.importorskip("transformers")
pytest.importorskip("datasets")

RUNS = {
    "cka+etf+penalty": {"selection.strategy": "cka", "selection.blocks": "null", "adapt.head": "etf",
                        "adapt.etf_scale": 4.0, "train.nc1_penalty": 0.1},
    "auto_rgn": {"adapt.method": "auto_rgn", "selection.rgn_batches": 2},
    "lisa": {"selection.strategy": "lisa", "selection.blocks": "null", "adapt.method": "lisa",
             "selection.lisa_interval": 2},
}


@pytest.mark.parametrize("case", list(RUNS))
def test_run_and_eval(bert_dir, text_csv, tmp_path, case) -> None:
    recipe = make_recipe(bert_dir, text_csv, **{"train.epochs": 1, **RUNS[case]})
    out = tmp_path / "run"
    summary = run_pipeline(recipe, out, progress=False)
    sel = json.loads((out / "selection.json").read_text())
    assert sel["strategy"] == recipe.selection.strategy
    if case == "cka+etf+penalty":
        assert sel["rationale"].startswith("cka: label-free") and sel["head_params"] == 0
        assert summary["head_params"] == 0
    if case == "auto_rgn":
        assert [r["epoch"] for r in summary["train_hook"]["auto_rgn"]] == [0]
    if case == "lisa":
        assert [r["step"] for r in summary["train_hook"]["lisa"]] == [0, 2, 4, 6]  # 24 samples / 4 = 6 steps
        assert summary["train_hook"]["lisa"][0]["blocks"] == [f"backbone.{sel['blocks'][0]['name']}"]
    r = eval_stage(out)
    assert r["accuracy"] == summary["test_accuracy"]
    assert r["loss"] == pytest.approx(summary["test_loss"], abs=1e-5)


def test_select_with_cka_writes_its_rationale(bert_dir, text_csv, tmp_path, capsys) -> None:
    out = tmp_path / "sel"
    overrides = recipe_overrides(bert_dir, text_csv, **{"selection.strategy": "cka", "selection.blocks": "null",
                                                        "selection.max_blocks": 2})
    assert main(["select", *_recipe(tmp_path), *overrides, "--out", str(out), "--quiet"]) == 0
    assert "lowest linear CKA" in capsys.readouterr().out
    sel = json.loads((out / "selection.json").read_text())
    assert len(sel["blocks"]) == 2 and len(sel["scores"]) == 3
    assert all(0.0 <= v <= 1.0 for v in sel["scores"].values())  # 1 - CKA
    top = max(sel["scores"], key=lambda k: (round(sel["scores"][k], 9), int(k)))
    assert sel["ranking"][0] == int(top)
    again = probe_and_select(load_recipe(None, overrides), tmp_path / "sel2", progress=False)
    assert again.indices == [b["index"] for b in sel["blocks"]]  # deterministic


def _recipe(tmp_path: Path) -> list[str]:
    path = tmp_path / "tiny.yaml"
    path.write_text("adapt:\n  method: finetune\n", encoding="utf-8")
    return [str(path)]


BAD = [
    ({"train.nc1_penalty": -1}, "train.nc1_penalty"),
    ({"adapt.method": "lisa"}, "selection.strategy=lisa"),
    ({"adapt.head": "etf", "adapt.method": "linear_probe"}, "train nothing"),
    ({"train.nc1_penalty": 0.5, "adapt.method": "linear_probe"}, "tunes none"),
    ({"selection.strategy": "cka", "selection.cka_samples": 1}, "selection.cka_samples"),
    ({"adapt.method": "auto_rgn", "selection.rgn_batches": 0}, "selection.rgn_batches"),
    ({"adapt.head": "etf", "adapt.etf_scale": 0}, "adapt.etf_scale"),
    ({"adapt.head": "cosine"}, "adapt.head"),
]


@pytest.mark.parametrize(("overrides", "needle"), BAD)
def test_bad_input_exits_2_before_anything(bert_dir, text_csv, tmp_path, capsys, overrides, needle) -> None:
    out = tmp_path / "run"
    argv = ["run", *_recipe(tmp_path), *recipe_overrides(bert_dir, text_csv, **overrides), "--out", str(out),
            "--quiet"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()
    assert main(["validate", *_recipe(tmp_path), *[f"{k}={v}" for k, v in overrides.items()]]) == 2


def test_etf_width_is_checked_with_the_backbone() -> None:
    recipe = load_recipe(None, ["adapt.head=etf"])
    check_rival_options(recipe, feature_dim=9, num_classes=10)
    with pytest.raises(ConfigError, match="K-1 = 9"):
        check_rival_options(recipe, feature_dim=8, num_classes=10)


def test_a_lora_run_with_an_etf_head_can_be_started_from(bert_dir, text_csv, tmp_path) -> None:
    from nc_finetune.pipeline import load_recipe_backbone
    from nc_finetune.restore import restore_backbone_weights

    recipe = make_recipe(bert_dir, text_csv, **{"adapt.method": "lora", "adapt.lora_r": 2, "adapt.head": "etf",
                                                "train.epochs": 1})
    out = tmp_path / "run"
    summary = run_pipeline(recipe, out, progress=False)
    assert summary["head_params"] == 0
    backbone = load_recipe_backbone(recipe)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    info = restore_backbone_weights(backbone, out, name=recipe.backbone.name, pretrained=True)
    assert info["method"] == "lora" and info["tensors"] > 0
    changed = [k for k, v in backbone.model.state_dict().items() if not v.equal(before[k])]
    assert changed and all(k.startswith("hf.encoder.layer.1.") for k in changed)
