"""Issue 12, item 6 (hardening): every case of the hostile-user attack, family by family.

Each case exits 2 with one line before any compute, or is fixed so that nothing is lost and the result is right.
Cases whose test lives next to the module it exercises are listed here and not repeated:

Run directories
  two commands on one --out ........ test_runs::test_a_held_lock_refuses_a_second_command; through the CLI below
  LoRA adapter through a symlink ... test_runs::test_writing_through_a_symlink_is_refused; resume and links inside
                                     adapter/ below
  probe --overwrite of a finished .. test_runs::test_probe_overwrite_with_another_recipe_keeps_a_finished_run
  failure after the probe .......... test_runs::test_a_failed_run_leaves_nothing_that_blocks_a_rerun,
                                     test_pipeline::test_run_killed_before_its_first_checkpoint_resumes_from_the_start
  rank "x/y" and "x y" ............. test_runs::test_rank_labels_sharing_a_folder_are_refused
  ufm replaces ufm.json ............ test_runs::test_ufm_refuses_to_replace_its_result
Values
  ranges (grad_accum_steps, batch sizes, log/checkpoint intervals, lora_r, dropout, val_fraction, seeds, lr=-1,
  lr=nan, max_grad_norm=-1, epochs=0, probe.ncc_samples=0, ...)
                                     test_config::test_validate_refuses_every_value_out_of_range (sweep.seeds too)
  no NaN-loss guard ................ train/test_trainer::test_a_non_finite_loss_stops_training_in_one_line
  train.device=cuda:7 .............. test_devices::test_every_stage_refuses_a_missing_device_before_loading_data
Resources
  YAML alias bomb .................. test_config::test_alias_bomb_is_refused_in_one_line_at_once; inside a sweep
                                     strategy option below
  CSV label 10^9 ................... data/test_data::test_load_data_refuses_a_sparse_integer_label_before_allocating_
                                     its_classes (10^6, memory traced); 10^9 through the CLI under a memory cap below
  backbone.image_size=100000 ....... test_config::test_validate_refuses_every_value_out_of_range
Damaged files
  trainable.safetensors, trainer_state.pt, position.json, resolved.yaml, probe.json, selection.json
                                     test_cli::test_a_damaged_artefact_is_one_line_naming_it,
                                     train/test_checkpoint::test_a_damaged_checkpoint_is_refused_naming_the_file;
                                     resolved.yaml, probe.json, selection.json through run --resume below
  partial last metrics.jsonl line .. train/test_trainer::test_resume_tolerates_a_cut_off_last_metrics_line
  checkpoint.old fallback .......... train/test_checkpoint::test_resume_falls_back_to_an_intact_old_checkpoint
  half-deleted copy ................ train/test_checkpoint::test_a_kill_during_the_cleanup_leaves_no_trusted_half_copy
Resume corner
  killed after the last checkpoint with max_steps mid-epoch
                                     train/test_trainer::test_resume_replays_the_uninterrupted_run
                                     [max_steps-mid-epoch-killed-after-last-checkpoint]
Tracebacks instead of one line
  --out a file, read-only, full disk  below
  non-UTF-8 recipe ................. test_config::test_unreadable_recipe_files_are_refused_in_one_line
  hf: path empty / unknown type .... backbones/test_hf::test_a_directory_that_holds_no_model_is_one_line
  empty or binary CSV .............. data/test_data::test_an_unreadable_csv_is_one_line_naming_it
  corrupt PNG outside the probe .... data/test_data::test_a_corrupt_image_is_found_when_the_data_loads (every image
                                     is decoded once when the data loads: the command fails naming the file)
  CSV texts "NA", "None", "null" ... data/test_data::test_csv_texts_that_pandas_reads_as_missing_are_kept (training);
                                     predict's tables below
Numerics
  features x1e200 / x1e-200 ........ probe/test_metrics::test_metrics_do_not_depend_on_the_size_of_the_features,
                                     probe/test_stats::test_features_of_extreme_size_are_scaled_exactly
  1e12 offset, ncc_accuracy ........ probe/test_metrics::test_ncc_accuracy_survives_a_large_offset
  logme_score with one class ....... transfer/test_scores::test_logme_refuses_a_single_class
  ufm --dim 2 ...................... report/test_ufm_report::test_dimension_below_k_minus_1_is_refused_before_training
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from nc_finetune import pipeline, runs
from nc_finetune.cli import main
from nc_finetune.errors import UserError
from nc_finetune.runs import RunDir
from tests.conftest import FINISHED_RUN, recipe_overrides, tree_bytes

pytest.importorskip("transformers")


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text("adapt:\n  method: finetune\n", encoding="utf-8")
    return path


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a command gets as far as loading data or a model."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("data or a model was loaded")

    monkeypatch.setattr(pipeline, "prepare_data", refuse)
    monkeypatch.setattr(pipeline, "load_recipe_backbone", refuse)


def _fails(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI: exit status 2 and exactly one line on stderr holding every needle; return that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"nc-finetune {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, err
    return err.strip()


# ------------------------------------------------------------------------------------------------ run directories


def test_two_commands_on_one_out_the_second_is_refused(capsys, tmp_path, recipe_file, bert_dir, text_csv,
                                                       nothing_loads) -> None:
    out = tmp_path / "run"
    with RunDir(out).lock("run"):  # the first command, still running
        (out / runs.METRICS).write_text('{"step": 1}\n')
        before = tree_bytes(out)
        for command in ("run", "probe", "select"):
            _fails(capsys, [command, str(recipe_file), *recipe_overrides(bert_dir, text_csv), "--out", str(out),
                            "--quiet"], f"{out} is in use by nc-finetune run (pid {os.getpid()})")
        assert tree_bytes(out) == before


def test_resume_refuses_to_write_through_a_symlink(capsys, tmp_path, recipe_file, finished_run, bert_dir, text_csv,
                                                   nothing_loads) -> None:
    """A resumed run appends to metrics.jsonl and writes adapter/, best.safetensors...: a link planted under one of
    those names would receive the writes."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    argv = ["run", str(recipe_file), *recipe_overrides(bert_dir, text_csv, **FINISHED_RUN), "--resume", "--out"]
    for name, target in ((runs.ADAPTER, elsewhere), (runs.METRICS, elsewhere / "keep.txt")):
        out = tmp_path / f"run-{name}"
        shutil.copytree(finished_run["out"], out)
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(target)
        _fails(capsys, [*argv, str(out)], f"{out / name} is a symbolic link; refusing to write through it")
    assert tree_bytes(elsewhere) == {"keep.txt": b"mine"}


def test_lora_adapter_is_written_without_following_links(tmp_path, bert_dir) -> None:
    """peft's save_pretrained follows links inside an existing adapter/: the adapter is written beside it and
    renamed over it instead, so the file a link points to keeps its content."""
    from safetensors.torch import load_file

    from nc_finetune.adapt import build_classifier
    from nc_finetune.select import select_blocks
    from tests.conftest import load_bert

    bb = load_bert(bert_dir)
    adapted = build_classifier(bb, 2, method="lora", selection=select_blocks(None, bb.blocks, strategy="manual",
                                                                            manual=[1]))
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    (out / runs.ADAPTER).mkdir(parents=True)
    elsewhere.mkdir()
    names = ("adapter_model.safetensors", "adapter_config.json", "README.md")
    for name in names:
        (elsewhere / name).write_bytes(b"precious")
        (out / runs.ADAPTER / name).symlink_to(elsewhere / name)
    RunDir(out).save_final_weights(adapted)
    assert tree_bytes(elsewhere) == dict.fromkeys(names, b"precious")
    for name in names:
        assert (out / runs.ADAPTER / name).is_file() and not (out / runs.ADAPTER / name).is_symlink()
    saved = out / runs.ADAPTER / "adapter_model.safetensors"
    assert (out / runs.WEIGHTS).is_file() and not (out / f".{runs.ADAPTER}.tmp").exists()
    assert any(".lora_A." in k for k in load_file(str(saved)))


# ------------------------------------------------------------------------------------------------ resources


def test_a_csv_label_of_a_billion_is_refused_without_allocating(tmp_path, bert_dir) -> None:
    """One integer label of 10^9 once asked for ~60 GB of class names. Under a 6 GiB address-space cap, the CLI
    refuses it in one line from the label ids (a regression would die of MemoryError instead)."""
    csv = tmp_path / "train.csv"
    csv.write_text("text,label\n" + "".join(f"the cat {i},{i % 2}\n" for i in range(10)) + "odd one,1000000000\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"backbone: {{name: 'hf:{bert_dir}'}}\ndata: {{name: csv, data_files: '{csv}'}}\n",
                      encoding="utf-8")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
            "from nc_finetune.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "probe", str(recipe), "--out", str(tmp_path / "out"),
                           "--quiet"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "found 3 distinct ids up to 1000000000" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_alias_bomb_inside_a_sweep_strategy_option_is_refused_at_once(capsys, tmp_path, nothing_loads) -> None:
    """Strategy variants (``name@key=value``) parse their values as YAML: the recipe's no-alias rule holds there too
    (a safe_load of these 400 bytes kept a 43-million-element structure that the sweep then walked for minutes)."""
    import time

    lines = ["a: &a", *["- lol"] * 9]
    for prev, name in zip("abcdefg", "bcdefgh", strict=True):
        lines += [f"{name}: &{name}", *[f"- *{prev}"] * 9]
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text("sweep:\n  strategies:\n    - |-\n" + "".join(f"      {line}\n" for line in
                                                                  ["knee@reference=" + lines[0], *lines[1:]]),
                      encoding="utf-8")
    start = time.perf_counter()
    _fails(capsys, ["sweep", str(recipe), "--out", str(tmp_path / "out"), "--quiet"],
           "sweep.strategies option 'reference' (line 12, column 3): YAML aliases (*a) are not allowed")
    assert time.perf_counter() - start < 5.0
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("name", [runs.RESOLVED, runs.PROBE, runs.SELECTION])
def test_resume_of_a_run_with_a_damaged_artefact_is_one_line(capsys, tmp_path, recipe_file, finished_run, bert_dir,
                                                              text_csv, name) -> None:
    """test_cli covers these files through eval and the checkpoint's through run --resume; --resume reads these
    three too."""
    out = tmp_path / "run"
    shutil.copytree(finished_run["out"], out)
    data = (out / name).read_bytes()
    (out / name).write_bytes(data[: len(data) // 2])
    before = tree_bytes(out)
    line = _fails(capsys, ["run", str(recipe_file), *recipe_overrides(bert_dir, text_csv, **FINISHED_RUN), "--resume",
                           "--out", str(out), "--quiet"], str(out / name))
    assert "damaged" in line or "not valid YAML" in line
    assert tree_bytes(out) == before


# ---------------------------------------------------------------------------------- tracebacks instead of one line


@pytest.mark.parametrize("command", ["probe", "select", "run", "rank", "sweep", "ufm"])
def test_out_that_is_a_file_is_one_line(capsys, tmp_path, command, nothing_loads) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    recipe = [] if command == "ufm" else ["minilm-rotten-tomatoes"]
    _fails(capsys, [command, *recipe, "--out", str(f)], f"--out {f} is a file, not a directory")
    assert f.read_text() == "x"


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(path)``: make ``path`` (an existing directory) unwritable: by its mode, or, for root (who writes
    anyway), by making every write below it fail as on a read-only file system. Returns the expected message."""
    import builtins

    made = []

    def make(path: Path) -> str:
        if os.geteuid() != 0:
            path.chmod(0o555)
            made.append(path)
            return "Permission denied"
        real_open, real_mkdir = builtins.open, os.mkdir

        def below(p) -> bool:
            return isinstance(p, (str, os.PathLike)) and Path(os.path.abspath(p)).is_relative_to(path)

        def ro_open(file, mode="r", *args, **kwargs):
            if below(file) and any(c in mode for c in "wax+"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
            return real_open(file, mode, *args, **kwargs)

        def ro_mkdir(p, *args, **kwargs):
            if below(p):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))
            return real_mkdir(p, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", ro_open)
        monkeypatch.setattr(os, "mkdir", ro_mkdir)
        return "Read-only file system"

    yield make
    for path in made:
        path.chmod(0o755)  # so that pytest can remove it


def test_a_read_only_out_is_one_line_before_anything_loads(capsys, tmp_path, recipe_file, bert_dir, text_csv,
                                                          read_only, nothing_loads) -> None:
    parent = tmp_path / "ro"
    (parent / "out").mkdir(parents=True)
    reason = read_only(parent)
    overrides = recipe_overrides(bert_dir, text_csv)
    _fails(capsys, ["run", str(recipe_file), *overrides, "--out", str(parent / "out"), "--quiet"],
           f"cannot write to --out {parent / 'out'}: {reason}")
    _fails(capsys, ["probe", str(recipe_file), *overrides, "--out", str(parent / "new"), "--quiet"],
           f"cannot create --out {parent / 'new'}: {reason}")
    assert sorted(p.name for p in parent.iterdir()) == ["out"]


def test_a_full_disk_during_training_is_one_line_and_loses_nothing(capsys, tmp_path, recipe_file, finished_run,
                                                                   monkeypatch) -> None:
    """The disk fills up while the second checkpoint is written: one line, the first checkpoint stays intact and
    no partial copy is left, and --resume (once there is room) ends where the uninterrupted run did."""
    from nc_finetune.train import checkpoint

    real_save = checkpoint.save_file
    calls = []

    def fills_the_disk(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"the part that fitted")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_the_disk)
    out = tmp_path / "run"
    argv = ["run", str(recipe_file), *finished_run["overrides"], "--out", str(out), "--quiet"]
    _fails(capsys, argv, f"cannot write {out / 'checkpoint.tmp'}: no space left on the device",
           "checkpoint/ keeps the previous checkpoint")
    assert json.loads((out / "checkpoint" / "position.json").read_text())["step"] == 2
    assert not (out / "checkpoint.tmp").exists() and not (out / runs.SUMMARY).exists()

    monkeypatch.setattr(checkpoint, "save_file", real_save)
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    base = finished_run["out"]
    a, b = (json.loads((d / runs.SUMMARY).read_text()) for d in (base, out))
    assert (b["steps"], b["epochs_run"], b["test_accuracy"]) == (a["steps"], a["epochs_run"], a["test_accuracy"])
    assert b["test_loss"] == pytest.approx(a["test_loss"], abs=1e-6)
    steps = [[json.loads(line)["step"] for line in (d / runs.METRICS).read_text().splitlines()] for d in (base, out)]
    assert steps[0] == steps[1]


def _safetensors_full_disk() -> Exception:
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("make_error", [
    lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    _safetensors_full_disk,  # what safetensors raises on a full disk (measured on a full tmpfs)
    lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),  # torch.save
], ids=["oserror", "safetensors", "torch-save"])
def test_an_atomic_write_on_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, make_error) -> None:
    from nc_finetune.utils import io

    path = tmp_path / "summary.json"
    path.write_text("the previous summary")

    def write(tmp: str) -> None:
        Path(tmp).write_text("half a")
        raise make_error()

    full = SimpleNamespace(total=10 << 30, used=10 << 30, free=0)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda _path: full)
    with pytest.raises(UserError, match=rf"^cannot write {path}: no space left on the device$"):
        io.atomic_write(path, write)
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"] and path.read_text() == "the previous summary"


def test_a_runtime_error_with_room_on_the_disk_is_not_called_a_full_disk(tmp_path) -> None:
    from nc_finetune.utils.io import atomic_write

    def write(tmp: str) -> None:
        raise RuntimeError("a bug in the writer")

    with pytest.raises(RuntimeError, match="a bug in the writer"):
        atomic_write(tmp_path / "x.json", write)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["log-append", "export"])
def test_a_full_disk_met_outside_the_atomic_writers_is_one_line(capsys, tmp_path, monkeypatch, nothing_loads,
                                                                 where) -> None:
    """A metrics.jsonl append raises OSError; peft/transformers' save_pretrained (export, the LoRA adapter) raises
    safetensors' error naming the OS error: the CLI says either in one line. Any other error stays a traceback."""
    import nc_finetune.cli as cli

    log = tmp_path / "out" / runs.METRICS
    error = (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(log)) if where == "log-append"
             else _safetensors_full_disk())

    def fails(_args):
        raise error

    monkeypatch.setitem(cli._COMMANDS, "ufm", fails)
    _fails(capsys, ["ufm", "--out", str(tmp_path / "out")],
           f"error: {log}: no space left on the device" if where == "log-append"
           else "error: no space left on the device")
    error = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        main(["ufm", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_predict_keeps_texts_that_pandas_reads_as_missing(tmp_path, suffix) -> None:
    """Training keeps "NA", "None", "null" as texts (data/test_data); predict must read them the same way, not
    predict on an empty string in their place. Only an empty cell is missing."""
    from nc_finetune.predict import read_inputs

    sep = "," if suffix == ".csv" else "\t"
    words = ["NA", "None", "null", "NaN", "n/a", "#N/A", ""]
    path = tmp_path / f"in{suffix}"
    path.write_text(f"text{sep}label\n" + "".join(f"{w}{sep}{i % 2}\n" for i, w in enumerate(words)),
                    encoding="utf-8")
    read = read_inputs(path, "text", None, "label")
    assert read["inputs"] == words and read["labels"] == [i % 2 for i in range(len(words))]
