"""The command line: bad input exits 2 with one line on stderr and touches nothing; help, ls and eval work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nc_finetune.cli import RECIPES_DIR, build_parser, main
from tests.conftest import FINISHED_RUN, recipe_overrides, tree_bytes, write_text_csv

pytest.importorskip("transformers")
pytest.importorskip("datasets")

CORE_COMMANDS = {"probe", "select", "run", "eval", "validate", "ls"}
SUBCOMMANDS = sorted(next(a for a in build_parser()._actions if a.dest == "command").choices)


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    """A small recipe file; the tests pass the rest as overrides (like a user would)."""
    path = tmp_path / "tiny.yaml"
    path.write_text("adapt:\n  method: finetune\n", encoding="utf-8")
    return path


def _fails(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI, expect exit status 2 and exactly one line on stderr (naming the command); return that line."""
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.err.endswith("\n"), captured.err
    assert lines[0].startswith(f"nc-finetune {argv[0]}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _run_args(recipe_file: Path, out: Path, bert, csv, *extra: str, **overrides) -> list[str]:
    return ["run", str(recipe_file), *recipe_overrides(bert, csv, **overrides), *extra, "--out", str(out), "--quiet"]


# ------------------------------------------------------------------------------------------- recipe errors


@pytest.mark.parametrize(("key", "value"), [("selection.strategy", "nc_magic"), ("adapt.method", "prompt_tuning")])
def test_unknown_strategy_or_method_in_the_recipe_file(capsys, tmp_path, bert_dir, text_csv, key, value) -> None:
    section, name = key.split(".")
    path = tmp_path / "bad.yaml"
    path.write_text(f"{section}:\n  {name}: {value}\n", encoding="utf-8")
    out = tmp_path / "run"
    line = _fails(capsys, ["run", str(path), "--out", str(out), "--quiet"], key, value)
    assert "must be one of" in line
    _fails(capsys, ["validate", str(path)], key)
    assert not out.exists()


def test_unknown_key_and_bad_override(capsys, recipe_file) -> None:
    _fails(capsys, ["validate", str(recipe_file), "train.learning_rate=0.1"], "train.learning_rate", "lr")
    _fails(capsys, ["validate", str(recipe_file), "train.epochs"], "key=value")
    _fails(capsys, ["validate", "no-such-recipe"], "no-such-recipe", "built-in recipes")


def test_impossible_budget(capsys, tmp_path, recipe_file, bert_dir, text_csv) -> None:
    out = tmp_path / "run"
    args = _run_args(recipe_file, out, bert_dir, text_csv,
                     **{"selection.strategy": "knee", "selection.max_param_fraction": 0.0001})
    _fails(capsys, args, "max_param_fraction=0.0001", "cannot hold any block")
    assert not (out / "probe.json").exists()


def test_manual_block_that_does_not_exist(capsys, tmp_path, recipe_file, bert_dir, text_csv) -> None:
    out = tmp_path / "run"
    _fails(capsys, _run_args(recipe_file, out, bert_dir, text_csv, **{"selection.blocks": "[7]"}),
           "unknown block 7", "0..2")
    _fails(capsys, ["select", str(recipe_file), *recipe_overrides(bert_dir, text_csv, **{"selection.blocks": "[-4]"}),
                    "--out", str(out), "--quiet"], "unknown block -4")


def test_num_classes_disagreeing_with_the_data(capsys, tmp_path, recipe_file, bert_dir, text_csv) -> None:
    out = tmp_path / "run"
    _fails(capsys, _run_args(recipe_file, out, bert_dir, text_csv, **{"data.num_classes": 3}),
           "data.num_classes is 3", "2 classes")
    assert not out.exists()


@pytest.mark.parametrize("labels", [[0] * 12, [0] * 11 + [1]], ids=["one-class", "singleton-class"])
def test_unusable_data_refused_before_any_model(capsys, tmp_path, recipe_file, bert_dir, monkeypatch, labels) -> None:
    import nc_finetune.backbones as backbones

    monkeypatch.setattr(backbones, "load_backbone", lambda *a, **k: pytest.fail("a model was built"))
    texts = [f"the cat sat {i}" for i in range(12)]
    csv = {"train": write_text_csv(tmp_path / "train.csv", texts, np.array(labels)),
           "test": write_text_csv(tmp_path / "test.csv", texts[:4], np.array([0, 1, 0, 1]))}
    out = tmp_path / "run"
    line = _fails(capsys, _run_args(recipe_file, out, bert_dir, csv), "split 'train'")
    assert ("only 1 class" in line) if len(set(labels)) == 1 else ("class 1 has 1 example" in line)
    _fails(capsys, ["probe", str(recipe_file), *recipe_overrides(bert_dir, csv), "--out", str(out), "--quiet"])
    assert not out.exists()


# ---------------------------------------------------------------------------------- existing run directories


def _copy_run(finished_run, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "run"
    shutil.copytree(finished_run["out"], out)
    return out, tree_bytes(out)


def test_resume_with_another_recipe_is_refused(capsys, tmp_path, recipe_file, finished_run, bert_dir,
                                               text_csv) -> None:
    out, before = _copy_run(finished_run, tmp_path)
    args = _run_args(recipe_file, out, bert_dir, text_csv, "--resume", **{**FINISHED_RUN, "train.lr": 0.5})
    _fails(capsys, args, "--resume", "different recipe", "train.lr")
    assert tree_bytes(out) == before
    _fails(capsys, _run_args(recipe_file, tmp_path / "empty", bert_dir, text_csv, "--resume"), "holds no run")


def test_run_into_an_existing_run_is_refused(capsys, tmp_path, recipe_file, finished_run, bert_dir,
                                             text_csv) -> None:
    out, before = _copy_run(finished_run, tmp_path)
    _fails(capsys, _run_args(recipe_file, out, bert_dir, text_csv, **FINISHED_RUN), "already holds a run", "--resume")
    assert tree_bytes(out) == before


def test_probe_and_select_refuse_to_overwrite(capsys, tmp_path, recipe_file, finished_run, bert_dir,
                                              text_csv) -> None:
    out, before = _copy_run(finished_run, tmp_path)
    overrides = recipe_overrides(bert_dir, text_csv, **FINISHED_RUN)
    _fails(capsys, ["probe", str(recipe_file), *overrides, "--out", str(out), "--quiet"], "probe.json", "--overwrite")
    _fails(capsys, ["select", str(recipe_file), *overrides, "--out", str(out), "--quiet"], "selection.json")
    assert tree_bytes(out) == before
    # --overwrite does replace the probe (same recipe, so the same per-layer table)
    assert main(["probe", str(recipe_file), *overrides, "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert "hf.encoder.layer.2" in capsys.readouterr().out
    new, old = (json.loads((d / "probe.json").read_text())["layers"] for d in (out, finished_run["out"]))
    assert [(r["name"], r["nc1"], r["cdnv"]) for r in new] == [(r["name"], r["nc1"], r["cdnv"]) for r in old]


DAMAGED = [  # (file cut in half, command that reads it)
    ("trainable.safetensors", "eval"),
    ("probe.json", "eval"),
    ("selection.json", "eval"),
    ("resolved.yaml", "eval"),
    ("checkpoint/trainable.safetensors", "run"),
    ("checkpoint/trainer_state.pt", "run"),
    ("checkpoint/position.json", "run"),
]


@pytest.mark.parametrize(("name", "command"), DAMAGED, ids=[f"{c}-{n}" for n, c in DAMAGED])
def test_a_damaged_artefact_is_one_line_naming_it(capsys, tmp_path, recipe_file, finished_run, bert_dir, text_csv,
                                                  name, command) -> None:
    out, _ = _copy_run(finished_run, tmp_path)
    data = (out / name).read_bytes()
    (out / name).write_bytes(data[: len(data) // 2])
    before = tree_bytes(out)
    if command == "eval":
        line = _fails(capsys, ["eval", str(out)], str(out / name))
    else:
        line = _fails(capsys, _run_args(recipe_file, out, bert_dir, text_csv, "--resume", **FINISHED_RUN),
                      str(out / name), "is damaged")
    assert "damaged" in line or "not valid YAML" in line
    assert tree_bytes(out) == before


# ------------------------------------------------------------------------------------------------ good input


def test_eval_reproduces_the_summary_accuracy(capsys, finished_run) -> None:
    assert main(["eval", str(finished_run["out"])]) == 0
    out = capsys.readouterr().out
    summary = json.loads((finished_run["out"] / "summary.json").read_text())
    assert f"accuracy {summary['test_accuracy']:.4f}" in out and f"on {summary['test_samples']} samples" in out
    _fails(capsys, ["eval", str(finished_run["out"].parent / "nothing-here")], "not a finished")
    assert main(["eval", str(finished_run["out"]), "data.max_eval_samples=4", "--split", "test"]) == 0
    assert "(data.max_eval_samples=4): accuracy" in capsys.readouterr().out
    _fails(capsys, ["eval", str(finished_run["out"]), "adapt.method=full"], "only data.* overrides")


def test_ls_lists_recipes_backbones_and_datasets(capsys) -> None:
    from nc_finetune.backbones import BUILTIN_BACKBONES
    from nc_finetune.data import BUILTIN_DATASETS

    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    recipes = {p.stem for p in RECIPES_DIR.glob("*.yaml")}
    assert recipes and recipes <= listed
    assert set(BUILTIN_BACKBONES) <= listed and set(BUILTIN_DATASETS) <= listed
    assert "recipes" in out and "backbones" in out and "datasets" in out


def test_builtin_recipes_validate(capsys) -> None:
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        assert main(["validate", path.stem]) == 0, capsys.readouterr().err
    assert main(["validate", str(next(RECIPES_DIR.glob("*.yaml"))), "train.epochs=3"]) == 0


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in SUBCOMMANDS]], ids=lambda a: " ".join(a))
def test_help_exits_zero(capsys, argv) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: nc-finetune" in out
    assert "%%" not in out  # argparse formats only help=, not description=: a doubled % shows as typed


def test_core_subcommands_exist_and_no_command_is_an_error(capsys) -> None:
    assert set(SUBCOMMANDS) >= CORE_COMMANDS
    assert main([]) == 2
    assert "usage: nc-finetune" in capsys.readouterr().out


# ------------------------------------------------------------------------- overrides anywhere, --print-config

RECIPE_COMMANDS = sorted(name for name, p in next(a for a in build_parser()._actions if a.dest == "command")
                         .choices.items() if any(a.dest == "recipe" for a in p._actions))


def _printed_recipe(capsys, argv: list[str]) -> dict:
    import yaml

    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("command", RECIPE_COMMANDS)
def test_print_config_prints_the_resolved_recipe_and_loads_nothing(capsys, monkeypatch, tmp_path, recipe_file,
                                                                   command) -> None:
    import nc_finetune.pipeline as pipeline
    from nc_finetune.config import load_recipe, recipe_to_dict

    def refuse(*_a, **_k):
        raise AssertionError("--print-config loaded data or a model")

    monkeypatch.setattr(pipeline, "prepare_data", refuse)
    monkeypatch.setattr(pipeline, "load_recipe_backbone", refuse)
    out = tmp_path / "out"
    # Overrides before and after the options; the later one of a key wins. No --out needed.
    argv = [command, str(recipe_file), "train.epochs=3", "--print-config", "adapt.method=lora", "train.epochs=7"]
    printed = _printed_recipe(capsys, argv)
    assert printed == recipe_to_dict(load_recipe(recipe_file, ["train.epochs=7", "adapt.method=lora"]))
    assert (printed["train"]["epochs"], printed["adapt"]["method"]) == (7, "lora")
    if command != "validate":
        assert _printed_recipe(capsys, [*argv, "--out", str(out)]) == printed
    assert not out.exists()
    _fails(capsys, [command, str(recipe_file), "--print-config", "train.nope=1"], "unknown recipe key 'train.nope'")


def test_print_config_of_a_run_directory(capsys, finished_run) -> None:
    printed = _printed_recipe(capsys, ["eval", str(finished_run["out"]), "--print-config", "data.max_eval_samples=4"])
    assert printed["data"]["max_eval_samples"] == 4
    assert printed["backbone"] == finished_run["recipe"].backbone.__dict__
    _fails(capsys, ["eval", str(finished_run["out"]), "--print-config", "adapt.method=full"], "only data.* overrides")


def test_overrides_after_the_options(capsys, tmp_path, recipe_file, bert_dir, text_csv) -> None:
    out = tmp_path / "p"
    overrides = recipe_overrides(bert_dir, text_csv)
    argv = ["probe", str(recipe_file), "--out", str(out), *overrides[:3], "--quiet", *overrides[3:]]
    assert main(argv) == 0, capsys.readouterr().err
    meta = json.loads((out / "probe.json").read_text())
    assert meta["backbone"] == f"hf:{bert_dir}" and meta["samples"] == 16
    with pytest.raises(SystemExit) as exc:  # an unknown option is still an error
        main(["probe", str(recipe_file), "--out", str(out), "--no-such-option", "train.epochs=2"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- predict


def _read_predictions(path: Path) -> list[dict]:
    import csv

    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_writes_per_sample_predictions(capsys, tmp_path, finished_run, text_csv) -> None:
    import pandas as pd

    run = finished_run["out"]
    summary = json.loads((run / "summary.json").read_text())
    test = pd.read_csv(text_csv["test"])
    rows = {}
    for suffix in (".csv", ".jsonl"):
        out = tmp_path / f"pred{suffix}"
        assert main(["predict", str(run), text_csv["test"], "--out", str(out)]) == 0, capsys.readouterr().err
        assert "wrote 8 predictions over 2 classes" in capsys.readouterr().out
        rows[suffix] = _read_predictions(out)
    assert len(rows[".csv"]) == len(test) == summary["test_samples"]
    for csv_row, json_row in zip(rows[".csv"], rows[".jsonl"], strict=True):
        probs = [json_row["prob_0"], json_row["prob_1"]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-6)
        assert json_row["prediction_id"] == int(np.argmax(probs)) == int(csv_row["prediction_id"])
        assert json_row["prediction"] == str(json_row["prediction_id"])  # the csv's class names are "0", "1"
        assert json_row["probability"] == pytest.approx(max(probs))
        assert float(csv_row["prob_1"]) == pytest.approx(json_row["prob_1"], rel=1e-6)
    # The same model as eval: the predictions score the run's test accuracy against the file's labels.
    correct = [r["prediction_id"] == y for r, y in zip(rows[".jsonl"], test["label"], strict=True)]
    assert float(np.mean(correct)) == pytest.approx(summary["test_accuracy"])
    assert [r["label"] for r in rows[".jsonl"]] == test["label"].tolist()


def test_predict_refuses_bad_input_before_loading_a_model(capsys, tmp_path, finished_run, text_csv) -> None:
    run = str(finished_run["out"])
    out = str(tmp_path / "p.csv")
    _fails(capsys, ["predict", str(tmp_path), text_csv["test"], "--out", out], "not a finished run")
    _fails(capsys, ["predict", run, text_csv["test"], "--out", str(tmp_path / "p.txt")], "must end in .csv or .jsonl")
    _fails(capsys, ["predict", run, text_csv["test"], "--out", out, "--column", "body"],
           "no text column 'body'", "columns: text, label")
    _fails(capsys, ["predict", run, str(tmp_path / "missing.csv"), "--out", out], "does not exist")
    assert not (tmp_path / "p.csv").exists()


def test_output_piped_into_a_reader_that_closes_is_not_a_traceback() -> None:
    import subprocess
    import sys

    # `ls` prints more than one line; `head -1` closes the pipe after the first
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m nc_finetune.cli ls | head -1"], capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.startswith("recipes") and "Traceback" not in proc.stderr, proc.stderr
