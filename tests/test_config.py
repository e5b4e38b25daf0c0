"""Recipe schema: loading, overrides and one-line errors that name the key and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from nc_finetune.config import Recipe, dump_recipe, from_dict, load_recipe
from nc_finetune.errors import ConfigError

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    r = load_recipe(write(tmp_path, "backbone: {name: timm:resnet18}\n"),
                    ["probe.batch_size=16", "probe.layers=[0, -1]", "data.max_train_samples=null",
                     "train.lr=3e-4", "adapt.method=lora", "selection.blocks=[1, blocks.2]"])
    assert r.backbone.name == "timm:resnet18"
    assert r.probe.batch_size == 16 and r.probe.layers == [0, -1]
    assert r.train.lr == pytest.approx(3e-4) and isinstance(r.train.lr, float)
    assert r.adapt.method == "lora"
    assert r.selection.blocks == [1, "blocks.2"]
    assert r.data.max_train_samples is None


def test_yaml_booleans_map_back_to_on_off():
    assert load_recipe(None, ["train.cache_prefix=off"]).train.cache_prefix == "off"
    assert load_recipe(None, ["train.cache_prefix=on"]).train.cache_prefix == "on"


def test_int_is_accepted_for_float(tmp_path):
    assert load_recipe(None, ["train.lr=1"]).train.lr == 1.0


def test_round_trip_through_yaml(tmp_path):
    r = load_recipe(None, ["train.epochs=3", "backbone.image_size=96"])
    again = load_recipe(write(tmp_path, dump_recipe(r)))
    assert again == r


@pytest.mark.parametrize(
    ("text", "overrides", "needle"),
    [
        ("backbone: [1, 2", [], "not valid YAML"),
        ("", [], "is empty"),
        ("- a\n- b\n", [], "must be a mapping"),
        ("probe: {batch_size: 8, colour: red}\n", [], "unknown recipe key 'probe.colour'; allowed keys in probe:"),
        ("nonsense: 1\n", [], "unknown recipe key 'nonsense'; allowed keys: backbone, data, probe"),
        ("probe: {batch_size: eight}\n", [], "'probe.batch_size' must be int; got str 'eight'"),
        ("probe: {batch_size: true}\n", [], "'probe.batch_size' must be int"),
        ("adapt: {method: magic}\n", [], "'adapt.method' must be one of linear_probe, finetune, lora, scl, full"),
        ("selection: {strategy: best}\n", [], "'selection.strategy' must be one of knee, stall"),
        ("probe: 3\n", [], "'probe' must be a mapping"),
        ("probe: {}\n", ["probe.batch_size"], "must look like key=value"),
        ("backbone: {name: x}\n", ["backbone.name.sub=1"], "'name' is not a section"),
        ("backbone: {name: x}\n", ["train.nope=1"], "unknown recipe key 'train.nope'"),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path, text, overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, text), overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError):
        from_dict(Recipe, 5, "")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates_and_shows_its_command(path):
    load_recipe(path)
    header = path.read_text().splitlines()[:6]
    assert any("nc-finetune" in line for line in header if line.startswith("#")), "header comment must show the command"
