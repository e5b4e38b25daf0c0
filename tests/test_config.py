"""Recipe schema: loading, overrides and one-line errors that name the key and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from nc_finetune.cli import main
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


# ------------------------------------------------------------------------------------------------ value rules

VALUE_ERRORS = [
    ("backbone.name=''", "backbone.name", "non-empty"),
    ("backbone.image_size=100000", "backbone.image_size", "in [8, 4096] or null"),
    ("backbone.image_size=0", "backbone.image_size", "in [8, 4096]"),
    ("backbone.max_length=0", "backbone.max_length", ">= 1"),
    ("data.num_classes=1", "data.num_classes", ">= 2 or null"),
    ("data.max_train_samples=0", "data.max_train_samples", ">= 1 or null"),
    ("data.max_eval_samples=-5", "data.max_eval_samples", ">= 1 or null"),
    ("data.test_size=0", "data.test_size", "in (0, 1)"),
    ("data.test_size=1", "data.test_size", "in (0, 1)"),
    ("data.corruption_severity=0", "data.corruption_severity", "in [1, 5]"),
    ("data.corruption_severity=6", "data.corruption_severity", "in [1, 5]"),
    ("data.seed=-1", "data.seed", "in [0, 4294967296)"),
    ("data.test_split=train", "data.test_split", "must differ from train_split"),
    ("data.image_column=img", "data.image_column", "text_column"),  # with text_column set below
    ("probe.samples_per_class=0", "probe.samples_per_class", ">= 1 or null"),
    ("probe.batch_size=0", "probe.batch_size", ">= 1"),
    ("probe.ncc_samples=0", "probe.ncc_samples", ">= 1"),
    ("probe.layers=some", "probe.layers", "'all' or a non-empty list"),
    ("probe.layers=[]", "probe.layers", "'all' or a non-empty list"),
    ("probe.device=gpu", "probe.device", "auto, cpu, cuda, cuda:N or mps"),
    ("probe.device=cuda:x", "probe.device", "auto, cpu, cuda, cuda:N or mps"),
    ("probe.seed=4294967296", "probe.seed", "in [0, 4294967296)"),
    ("selection.max_blocks=0", "selection.max_blocks", ">= 1 or null"),
    ("selection.max_param_fraction=0", "selection.max_param_fraction", "in (0, 1] or null"),
    ("selection.max_param_fraction=1.5", "selection.max_param_fraction", "in (0, 1] or null"),
    ("selection.stall_fraction=2", "selection.stall_fraction", "in (0, 1)"),
    ("selection.stall_fraction=0", "selection.stall_fraction", "in (0, 1)"),
    ("selection.rgn_batches=0", "selection.rgn_batches", ">= 1"),
    ("selection.seed=-3", "selection.seed", "in [0, 4294967296)"),
    ("selection.strategy=manual", "selection.blocks", "strategy manual"),
    ("adapt.lora_r=0", "adapt.lora_r", ">= 1"),
    ("adapt.lora_alpha=0", "adapt.lora_alpha", ">= 1"),
    ("adapt.lora_dropout=1", "adapt.lora_dropout", "in [0, 1)"),
    ("adapt.lora_dropout=-0.1", "adapt.lora_dropout", "in [0, 1)"),
    ("train.epochs=0", "train.epochs", ">= 1"),
    ("train.max_steps=0", "train.max_steps", ">= 1 or null"),
    ("train.batch_size=0", "train.batch_size", ">= 1"),
    ("train.eval_batch_size=-1", "train.eval_batch_size", ">= 1"),
    ("train.lr=-1", "train.lr", ">= 0"),
    ("train.lr=.nan", "train.lr", ">= 0"),
    ("train.lr=.inf", "train.lr", ">= 0"),
    ("train.head_lr=-1e-3", "train.head_lr", ">= 0 or null"),
    ("train.weight_decay=-0.1", "train.weight_decay", ">= 0"),
    ("train.weight_decay=.inf", "train.weight_decay", ">= 0"),
    ("train.warmup_ratio=1", "train.warmup_ratio", "in [0, 1)"),
    ("train.warmup_ratio=-0.5", "train.warmup_ratio", "in [0, 1)"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps", ">= 1"),
    ("train.max_grad_norm=-1", "train.max_grad_norm", "> 0 or null"),
    ("train.val_fraction=1", "train.val_fraction", "in [0, 1)"),
    ("train.early_stopping_patience=0", "train.early_stopping_patience", ">= 1 or null"),
    ("train.early_stopping_patience=2", "train.early_stopping_patience", "val_fraction > 0"),
    ("train.log_every=0", "train.log_every", ">= 1"),
    ("train.eval_every_epochs=0", "train.eval_every_epochs", ">= 1"),
    ("train.checkpoint_every=0", "train.checkpoint_every", ">= 1"),
    ("train.seed=-1", "train.seed", "in [0, 4294967296)"),
    ("train.device=cuda7", "train.device", "auto, cpu, cuda, cuda:N or mps"),
    ("sweep.seeds=[0, -1]", "sweep.seeds", "in [0, 4294967296); got -1"),
]


@pytest.mark.parametrize(("override", "key", "needle"), VALUE_ERRORS, ids=[v[0] for v in VALUE_ERRORS])
def test_validate_refuses_every_value_out_of_range(tmp_path, capsys, override, key, needle):
    recipe = write(tmp_path, "data: {name: csv, data_files: x.csv, text_column: text}\n")
    assert main(["validate", str(recipe), override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"recipe key '{key}' " in err and needle in err, err


@pytest.mark.parametrize("text", ["train: {lr: -1}\n", "train:\n  epochs: 2\n  grad_accum_steps: 0\n"])
def test_value_errors_in_the_file_name_the_dotted_key(tmp_path, text):
    with pytest.raises(ConfigError, match=r"recipe key 'train\.(lr|grad_accum_steps)' must be"):
        load_recipe(write(tmp_path, text))


def test_values_inside_the_range_are_accepted():
    r = load_recipe(None, ["train.lr=1e-3", "train.warmup_ratio=0", "train.val_fraction=0.2",
                           "train.early_stopping_patience=2", "selection.max_blocks=null", "backbone.image_size=8",
                           "train.max_grad_norm=null", "probe.device=cuda:0", "train.device=mps",
                           "adapt.lora_dropout=0", "selection.strategy=manual", "selection.blocks=[0]",
                           "probe.layers=[0, -1]"])
    assert r.train.early_stopping_patience == 2 and r.backbone.image_size == 8 and r.probe.device == "cuda:0"


def test_sections_built_in_python_check_their_values_too():
    from nc_finetune.config import TrainConfig

    with pytest.raises(ConfigError, match=r"recipe key 'grad_accum_steps' must be >= 1; got 0"):
        TrainConfig(grad_accum_steps=0)


def test_a_section_nested_elsewhere_is_named_by_its_full_path():
    from nc_finetune.config import BackboneConfig

    with pytest.raises(ConfigError, match=r"recipe key 'rank\.candidates\[1\]\.image_size' must be in \[8, 4096\]"):
        from_dict(BackboneConfig, {"name": "timm:x", "image_size": 5}, "rank.candidates[1]")


def test_validate_loads_no_model_library(tmp_path):
    """`validate` refuses values before torch (let alone a model or data) is imported: it stays well under 1 s."""
    import subprocess
    import sys

    code = ("import sys; from nc_finetune.cli import main; "
            f"rc = main(['validate', {str(RECIPES[0])!r}, 'train.grad_accum_steps=0']); "
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'timm') if m in sys.modules]; "
            "print(rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "2 []"



@pytest.mark.parametrize(("override", "needle"), [
    ("sweep.strategies=[knee, nc_magic]", "sweep.strategies: 'nc_magic' cannot be scored; choose from knee, stall"),
    ("sweep.strategies=[knee, manual]", "'manual' cannot be scored"),  # the user's own choice: nothing to score
    ("sweep.strategies=['nc_magic@fill=skip']", "sweep.strategies[nc_magic@fill=skip].strategy' must be one of"),
    ("sweep.strategies=['stall@stall_reference=median']", "stall_reference' must be one of last, min"),
    ("sweep.strategies=['stall@fill']", "options look like name@key=value"),
])
def test_validate_refuses_a_sweep_strategy_the_sweep_would_refuse(capsys, override, needle):
    """Names and variant options of sweep.strategies are checked by the recipe, not only when the sweep starts;
    without importing torch (the names come from the schema, which matches the strategy registry)."""
    import subprocess
    import sys

    capsys.readouterr()
    assert main(["validate", str(RECIPES[0]), override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    code = ("import sys; from nc_finetune.config import load_recipe; from nc_finetune.errors import ConfigError\n"
            f"try: load_recipe({str(RECIPES[0])!r}, [{override!r}])\nexcept ConfigError: print('refused', "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "refused False"


def test_the_sweep_accepts_every_strategy_validate_accepts():
    from nc_finetune.sweep import default_strategies

    recipe = load_recipe(RECIPES[0], ["sweep.strategies=[" + ", ".join(default_strategies()) + ", 'knee@fill=skip']"])
    assert recipe.sweep.strategies[:-1] == default_strategies()

# ------------------------------------------------------------------------------------------------ resources

BILLION_LAUGHS = "".join(
    [f"a: &a [{', '.join(['lol'] * 9)}]\n"]
    + [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)])


def test_alias_bomb_is_refused_in_one_line_at_once(tmp_path, capsys):
    import time

    assert len(BILLION_LAUGHS) < 400
    path = write(tmp_path, BILLION_LAUGHS)
    start = time.perf_counter()
    assert main(["validate", str(path)]) == 2
    assert time.perf_counter() - start < 1.0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "aliases (*a) are not allowed" in err and "line 2" in err, err


def test_alias_in_an_override_is_refused():
    with pytest.raises(ConfigError, match=r"override 'selection.blocks' .*aliases"):
        load_recipe(None, ["selection.blocks=[&x 1, *x]"])


@pytest.mark.parametrize(("content", "needle"), [
    (b"probe: {batch_size: 8}\n# caf\xe9\n", "is not UTF-8 text (byte 0xe9 at offset 28)"),
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b"# padding\n" + b" " * (1 << 20), "a recipe is plain data of at most 1,048,576 bytes"),
])
def test_unreadable_recipe_files_are_refused_in_one_line(tmp_path, content, needle):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    assert needle in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ rank candidates

BAD_CANDIDATES = [
    ("[{name: a}, {name: b, colour: red}]", "unknown recipe key 'rank.candidates[1].colour'"),
    ("[{label: a}, {name: b}]", "recipe key 'rank.candidates[0].name' must name the candidate's backbone"),
    ("[{name: a}, {name: b, image_size: 5}]", "recipe key 'rank.candidates[1].image_size' must be in [8, 4096]"),
    ("[{name: a}, {name: b, label: ''}]", "recipe key 'rank.candidates[1].label' must be a non-empty string"),
    ("[{name: a}]", "at least 2 backbone sections"),
    ("[{name: a, label: s}, {name: b, label: s}]", "labels must be unique"),
    ("[{name: a}, {name: a}]", "labels must be unique"),  # the default labels collide
    ("[{name: m, label: 'x/y'}, {name: m, label: 'x y'}]", "share the folder name candidates/x-y"),
    ("[{name: m, label: '../up'}, {name: m, label: 'up'}]", "share the folder name candidates/up"),
    ("{name: a}", "must be a list of RankCandidate"),
]


@pytest.mark.parametrize(("candidates", "needle"), BAD_CANDIDATES, ids=[c[0] for c in BAD_CANDIDATES])
def test_validate_refuses_a_bad_rank_candidate_in_one_line(tmp_path, capsys, candidates, needle):
    recipe = write(tmp_path, f"rank:\n  candidates: {candidates}\n")
    capsys.readouterr()
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_rank_candidates_are_typed_and_survive_resolved_yaml(tmp_path):
    from nc_finetune.config import BackboneConfig, RankCandidate

    recipe = load_recipe(write(tmp_path, "rank:\n  candidates:\n    - {name: 'timm:x', truncate_at: 3, "
                                         "pretrained: false}\n    - {name: 'hf:a/b', label: mine}\n"))
    cut, mine = recipe.rank.candidates
    assert isinstance(cut, RankCandidate) and cut.title == "timm:x@3 (random init)"
    assert cut.folder == "timm-x-3-random-init"
    assert (mine.title, mine.folder) == ("mine", "mine")
    assert RankCandidate(name="a", label="..").folder == "candidate"  # never the parent of candidates/
    assert cut.backbone() == BackboneConfig(name="timm:x", truncate_at=3, pretrained=False)
    again = load_recipe(write(tmp_path, dump_recipe(recipe)))  # resolved.yaml round trip
    assert again.rank == recipe.rank


def test_rank_section_built_in_python_checks_its_candidates():
    from nc_finetune.config import RankCandidate, RankConfig

    assert RankConfig(candidates=[{"name": "a"}, {"name": "b"}]).candidates[1] == RankCandidate(name="b")
    with pytest.raises(ConfigError, match=r"recipe key 'rank\.candidates\[0\]\.name' must name"):
        RankConfig(candidates=[{"pretrained": False}, {"name": "b"}])
    with pytest.raises(ConfigError, match="labels must be unique"):
        RankConfig(candidates=[RankCandidate(name="a"), RankCandidate(name="a")])
