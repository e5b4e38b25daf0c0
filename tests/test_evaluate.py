"""``nc-finetune eval``'s options are refused before any data or model loads; its parts score as the run did."""

from __future__ import annotations

import pytest

import nc_finetune.pipeline as pipeline
from nc_finetune.errors import ConfigError, UserError
from nc_finetune.evaluate import EVAL_SPLITS, check_eval_options

pytest.importorskip("transformers")


@pytest.mark.parametrize(("kwargs", "error", "needle"), [
    ({"split": "validation"}, UserError, "eval --split must be one of test, train; got 'validation'"),
    ({"batch_size": 0}, ConfigError, "eval --batch-size must be >= 1; got 0"),
    ({"data_overrides": ["train.lr=1"]}, ConfigError, "only data.* overrides"),
])
def test_eval_options_are_refused_before_data_or_a_model_loads(monkeypatch, finished_run, kwargs, error, needle):
    def refuse(*_a, **_k):
        raise AssertionError("data or a model was loaded before the option was checked")

    monkeypatch.setattr(pipeline, "prepare_data", refuse)
    monkeypatch.setattr(pipeline, "load_recipe_backbone", refuse)
    with pytest.raises(error) as e:
        pipeline.eval_stage(finished_run["out"], **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_splits_eval_accepts_pass_the_check():
    for split in EVAL_SPLITS:
        check_eval_options(split, None, ["data.corruption=gaussian_noise"])
