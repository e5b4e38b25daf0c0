"""The recipe hooks of trial, shift and bootstrap: through ``nc-finetune select``, and refused before compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nc_finetune.cli import main
from nc_finetune.errors import ConfigError
from nc_finetune.pipeline import probe_and_select
from tests.conftest import make_recipe, recipe_overrides

pytest.importorskip("transformers")
pytest.importorskip("datasets")


def _fails_before_compute(capsys, tmp_path: Path, bert_dir, text_csv, *needles: str, **overrides) -> None:
    out = tmp_path / "sel"
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text("adapt:\n  method: finetune\n", encoding="utf-8")
    capsys.readouterr()
    argv = ["select", str(recipe_file), *recipe_overrides(bert_dir, text_csv, **overrides), "--out", str(out),
            "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("nc-finetune select: error: "), err
    assert all(n in err[0] for n in needles), err[0]
    assert not (out / "probe.json").exists() and not (out / "selection.json").exists()


def test_shift_without_reference_and_a_zero_step_trial_exit_2_before_compute(capsys, tmp_path, bert_dir, text_csv):
    base = {"selection.blocks": "null", "selection.max_blocks": 1}
    _fails_before_compute(capsys, tmp_path, bert_dir, text_csv, "strategy 'shift' needs reference data",
                          **base, **{"selection.strategy": "shift"})
    _fails_before_compute(capsys, tmp_path, bert_dir, text_csv, "backbone.init_from is not set",
                          **base, **{"selection.strategy": "shift", "selection.reference": "source"})
    _fails_before_compute(capsys, tmp_path, bert_dir, text_csv, "selection.reference", "colour",
                          **base, **{"selection.strategy": "shift", "selection.reference": "{colour: red}"})
    _fails_before_compute(capsys, tmp_path, bert_dir, text_csv, "trial_steps", ">= 1",
                          **base, **{"selection.strategy": "trial", "selection.trial_steps": 0})
    _fails_before_compute(capsys, tmp_path, bert_dir, text_csv, "selection.bootstrap applies to the knee and stall",
                          **base, **{"selection.strategy": "last_k", "selection.bootstrap": 5})


def test_select_with_trial_shift_and_bootstrap(tmp_path, bert_dir, text_csv):
    base = {"selection.blocks": "null", "selection.max_blocks": 1}
    recipe = make_recipe(bert_dir, text_csv, **base, **{"selection.strategy": "trial", "selection.trial_steps": 3,
                                                        "selection.trial_samples": 3})
    sel = probe_and_select(recipe, tmp_path / "trial", progress=False)
    trial = json.loads((tmp_path / "trial" / "selection.json").read_text())["details"]["trial"]
    assert [t["name"] for t in trial["trials"]] == ["hf.encoder.layer.0", "hf.encoder.layer.1", "hf.encoder.layer.2"]
    assert trial["steps"] == 3 and trial["held_out_samples"] == 6 and trial["cost"]["backward_passes"] == 9
    assert sel.ranking[0] == sel.indices[0] and "trial cost" in sel.explain()

    recipe = make_recipe(bert_dir, text_csv, **base, **{"selection.strategy": "shift",
                                                        "selection.reference": "{max_train_samples: 16, seed: 3}"})
    sel = probe_and_select(recipe, tmp_path / "shift", progress=False)
    shift = sel.details["shift"]
    assert len(shift["blocks"]) == 3 and "max_train_samples=16" in shift["reference"]

    recipe = make_recipe(bert_dir, text_csv, **base, **{"selection.strategy": "stall", "selection.bootstrap": 6,
                                                        "selection.stall_reference": "min"})
    sel = probe_and_select(recipe, tmp_path / "boot", progress=False)
    boot = sel.details["bootstrap"]
    assert boot["replicates"] == 6 and boot["stable_selection"] == [b["name"] for b in sel.blocks]
    assert "reference: min block" in sel.rationale


def test_the_fill_policy_is_checked_as_it_will_run_before_the_probe(bert_dir, text_csv):
    from nc_finetune.pipeline import check_selection_feasible
    from tests.conftest import load_cnn

    bb = load_cnn()  # blocks of different sizes
    last, smallest = bb.blocks[-1].num_params, min(b.num_params for b in bb.blocks)
    fraction = round(0.99 * last / bb.num_params(), 6)  # the last block does not fit, smaller blocks do
    assert smallest < fraction * bb.num_params()
    recipe = make_recipe(bert_dir, text_csv, **{"selection.strategy": "last_k", "selection.blocks": "null",
                                                "selection.max_blocks": "null",
                                                "selection.max_param_fraction": fraction})
    with pytest.raises(ConfigError, match=f"top-ranked block '{bb.blocks[-1].name}'"):
        check_selection_feasible(recipe, bb, 2)
    recipe.selection.fill = "skip"
    check_selection_feasible(recipe, bb, 2)
    # A probe-based rule cannot be checked for the stop policy before the probe: only that some block fits.
    recipe.selection.strategy, recipe.selection.fill = "knee", "stop"
    check_selection_feasible(recipe, bb, 2)


def test_auto_rgn_batches_follow_the_selection_section() -> None:
    """``selection.rgn_batches`` draws of ``selection.rgn_batch_size`` distinct samples, reproducible by seed, the
    labels those of the drawn inputs (each input here is its own label)."""
    import numpy as np
    import torch

    from nc_finetune.config import SelectionConfig
    from nc_finetune.data import Split
    from nc_finetune.select.hooks import auto_rgn_batches

    class Prepares:
        def prepare(self, raw):
            return {"x": torch.as_tensor(np.asarray(raw))}

    split = Split(inputs=np.arange(100), labels=np.arange(100))
    cfg = SelectionConfig(strategy="auto_rgn", rgn_batches=3, rgn_batch_size=16, seed=7)
    batches = auto_rgn_batches(Prepares(), split, cfg)
    assert len(batches) == 3
    for inputs, labels in batches:
        assert inputs["x"].shape == (16,) and labels.dtype == torch.long
        assert torch.equal(inputs["x"], labels) and len(set(labels.tolist())) == 16
    again = auto_rgn_batches(Prepares(), split, cfg)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    small = auto_rgn_batches(Prepares(), Split(inputs=np.arange(5), labels=np.arange(5)), cfg)
    assert [len(b[1]) for b in small] == [5, 5, 5]  # never more than the split holds


def test_reference_source_reaches_selection_as_an_argument(tmp_path, bert_dir, text_csv):
    """``selection.reference=source``: the pipeline reads the init_from run's data section (refusing a directory
    that is not a finished run), selection only uses the section it is given."""
    import dataclasses

    from nc_finetune.errors import UserError
    from nc_finetune.pipeline import reference_source_data
    from nc_finetune.select.hooks import reference_recipe

    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    recipe = make_recipe(bert_dir, text_csv, **{"selection.strategy": "shift", "selection.reference": "source",
                                                "selection.blocks": "null", "selection.max_blocks": 1,
                                                "backbone.init_from": str(not_a_run)})
    with pytest.raises(UserError, match="selection.reference=source"):
        reference_source_data(recipe)
    source = dataclasses.replace(recipe.data, max_train_samples=7)
    ref, label = reference_recipe(recipe, source)
    assert ref.data is source and ref.backbone == recipe.backbone and label.startswith("source (the data of ")
    assert reference_source_data(dataclasses.replace(recipe, selection=dataclasses.replace(
        recipe.selection, reference={"seed": 3}))) is None  # data overrides: no run directory is read
