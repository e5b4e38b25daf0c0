"""Run directories: artefact names, locking, links, overwrite and resume rules (nc_finetune.runs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nc_finetune import runs
from nc_finetune.cli import main
from nc_finetune.errors import UserError
from nc_finetune.runs import RunDir
from tests.conftest import FINISHED_RUN, make_recipe, recipe_overrides, tree_bytes


def _one_line_failure(capsys, argv: list[str], needle: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and needle in err, err


def test_a_held_lock_refuses_a_second_command(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "out")
    with run.lock("run"):
        with pytest.raises(UserError, match=r"in use by nc-finetune run \(pid"), RunDir(tmp_path / "out").lock("run"):
            pass
        assert (run / runs.LOCK).exists()
    assert not (tmp_path / "out").exists()  # created by the lock and left empty: removed
    with run.lock("probe"):  # free again
        pass


def test_lock_keeps_a_directory_that_existed(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with RunDir(tmp_path / "out").lock("probe"):
        pass
    assert (tmp_path / "out").is_dir() and not list((tmp_path / "out").iterdir())


def test_out_that_is_a_file_is_one_line(capsys, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    _one_line_failure(capsys, ["ufm", "--out", str(f)], "is a file")
    assert f.read_text() == "x"


def test_writing_through_a_symlink_is_refused(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / runs.ADAPTER).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UserError, match="symbolic link"):
        RunDir(out).check_new_run()
    (out / runs.ADAPTER).unlink()
    (out / runs.PROBE).symlink_to(elsewhere / "probe.json")
    with pytest.raises(UserError, match="symbolic link"):
        RunDir(out).check_writable([runs.PROBE], overwrite=True)


def test_ufm_refuses_to_replace_its_result(capsys, tmp_path: Path) -> None:
    out = tmp_path / "ufm"
    assert main(["ufm", "--out", str(out), "--max-iter", "5"]) == 0
    before = tree_bytes(out)
    _one_line_failure(capsys, ["ufm", "--out", str(out), "--max-iter", "5"], "--overwrite")
    assert tree_bytes(out) == before
    assert main(["ufm", "--out", str(out), "--max-iter", "5", "--overwrite"]) == 0


def test_probe_overwrite_with_another_recipe_keeps_a_finished_run(capsys, tmp_path, finished_run, bert_dir,
                                                                   text_csv) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run["out"], out)
    before = tree_bytes(out)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("adapt:\n  method: finetune\n", encoding="utf-8")
    overrides = recipe_overrides(bert_dir, text_csv, **{**FINISHED_RUN, "probe.samples_per_class": 3})
    _one_line_failure(capsys, ["probe", str(recipe), *overrides, "--out", str(out), "--overwrite", "--quiet"],
                      "finished run trained with another recipe (probe.samples_per_class")
    assert tree_bytes(out) == before


def test_a_finished_run_reads_back(finished_run) -> None:
    run = RunDir(finished_run["out"])
    assert run.is_finished_run()
    assert run.read_recipe().selection.strategy == "knee"
    assert run.read_selection().strategy == "knee"
    assert run.read_summary()["steps"] > 0
    assert [r["name"] for r in run.read_probe().blocks()][0] == "hf.encoder.layer.0"


def test_a_damaged_artefact_is_one_line(tmp_path: Path, finished_run) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run["out"], out)
    text = (out / runs.SELECTION).read_text()
    (out / runs.SELECTION).write_text(text[: len(text) // 2])
    with pytest.raises(UserError, match="selection.json is damaged"):
        RunDir(out).read_selection()


def test_a_failed_run_leaves_nothing_that_blocks_a_rerun(tmp_path: Path, finished_run, bert_dir, text_csv,
                                                          monkeypatch) -> None:
    import nc_finetune.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("adapter construction failed")

    out = tmp_path / "run"
    monkeypatch.setattr(pipeline, "build_recipe_classifier", broken)
    with pytest.raises(RuntimeError, match="adapter construction failed"):
        pipeline.run_pipeline(make_recipe(bert_dir, text_csv, **FINISHED_RUN), out, progress=False)
    RunDir(out).check_new_run()  # nothing trained: a corrected rerun is accepted
    assert not [p for p in out.iterdir() if p.name in runs.RUN_ARTEFACTS]


def test_rank_labels_sharing_a_folder_are_refused(capsys, tmp_path: Path) -> None:
    recipe = tmp_path / "rank.yaml"
    recipe.write_text("rank:\n  candidates:\n    - {name: minilm-l6, label: 'x/y'}\n"
                      "    - {name: minilm-l6, label: 'x y'}\n", encoding="utf-8")
    _one_line_failure(capsys, ["rank", str(recipe), "--out", str(tmp_path / "r")], "share the folder name")


def test_resume_accepts_a_run_recorded_before_a_config_key_existed(tmp_path: Path, finished_run) -> None:
    """A ``resolved.yaml`` written before ``selection.rgn_batch_size`` existed reads it as its default (the old
    behaviour): the same recipe resumes, a changed value is still refused."""
    import yaml

    out = tmp_path / "run"
    shutil.copytree(finished_run["out"], out)
    recorded = yaml.safe_load((out / runs.RESOLVED).read_text())
    del recorded["selection"]["rgn_batch_size"]
    (out / runs.RESOLVED).write_text(yaml.safe_dump(recorded, sort_keys=False))
    RunDir(out).check_resume(finished_run["recipe"])
    RunDir(out).check_writable([runs.PROBE], overwrite=True, recipe=finished_run["recipe"])
    from nc_finetune.config import load_recipe

    changed = load_recipe(None, [*finished_run["overrides"], "selection.rgn_batch_size=8"])
    with pytest.raises(UserError, match=r"selection\.rgn_batch_size: 64 then, 8 now"):
        RunDir(out).check_resume(changed)


def test_a_moved_source_model_is_the_same_recipe_and_other_weights_are_not(tmp_path: Path, finished_run) -> None:
    """``backbone.init_from`` naming another folder resumes when that folder holds the source's weights (sha256
    recorded in init_from.json when the run began, so the old folder may be gone); other weights are refused."""
    import dataclasses

    from nc_finetune.config import recipe_to_dict

    src_a, src_b, src_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for src in (src_a, src_b, src_c):
        shutil.copytree(finished_run["out"], src)
    weights = (src_c / runs.WEIGHTS).read_bytes()
    (src_c / runs.WEIGHTS).write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))  # one bit of the last tensor

    def from_source(src: Path, **changes):
        recipe = finished_run["recipe"]
        return dataclasses.replace(recipe, backbone=dataclasses.replace(recipe.backbone, init_from=str(src)),
                                   **changes)

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_recipe(from_source(src_a))
    assert run.read_json(runs.SOURCE)["path"] == str(src_a)
    run.check_resume(from_source(src_b))
    with pytest.raises(UserError, match=r"different recipe \(backbone\.init_from: .*/a' then, .*/c' now"):
        run.check_resume(from_source(src_c))
    shutil.rmtree(src_a)  # the old folder gone: the recorded digest still identifies the source
    run.check_resume(from_source(src_b))
    changed = from_source(src_b, train=dataclasses.replace(finished_run["recipe"].train, epochs=9))
    assert run.recipe_difference(recipe_to_dict(changed)) == "train.epochs: 2 then, 9 now"
    assert run.recipe_difference(recipe_to_dict(changed), ignore=("train",)) is None
    (run / runs.SOURCE).unlink()  # no record and no old folder: nothing proves the weights are the same
    with pytest.raises(UserError, match=r"backbone\.init_from"):
        run.check_resume(from_source(src_b))
    run.write_recipe(from_source(src_b))  # the accepted resume records the new folder
    assert run.read_json(runs.SOURCE)["path"] == str(src_b)
