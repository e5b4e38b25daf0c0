"""`nc-finetune rank` end to end on tiny local models: artefacts, scores, truth, and the refusals."""

from __future__ import annotations

import json

import pytest

from nc_finetune.errors import ConfigError
from nc_finetune.pipeline import rank_stage
from tests.conftest import make_recipe


def candidates(bert_dir) -> str:
    return f"[{{name: 'hf:{bert_dir}', label: trained}}, {{name: 'hf:{bert_dir}', pretrained: false, label: random}}]"


def test_rank_writes_scores_correlations_and_layers(tmp_path, bert_dir, text_csv):
    recipe = make_recipe(bert_dir, text_csv, **{"rank.candidates": candidates(bert_dir), "probe.linear_probe": "true"})
    report = rank_stage(recipe, tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "rank.json").read_text())
    assert (tmp_path / "rank.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["name"] for r in on_disk["rows"]] == ["trained", "random"] == [r["name"] for r in report["rows"]]
    for row in on_disk["rows"]:
        assert {"nc1", "cdnv", "logme", "hscore", "params", "lp_accuracy"} <= set(row)
        assert (tmp_path / "candidates" / row["name"] / "probe.json").exists()
    assert on_disk["truth_key"] == "lp_accuracy"
    assert {"nc1", "logme", "params"} <= set(on_disk["correlations"])
    assert set(on_disk["layers"]) == {"trained", "random"}
    with pytest.raises(Exception, match="rank.json"):  # an existing ranking is not overwritten
        rank_stage(recipe, tmp_path, progress=False)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"rank.candidates": "[{name: x}]"}, "at least 2"),
        ({"rank.candidates": "[{name: a, label: s}, {name: b, label: s}]"}, "labels must be unique"),
        ({"rank.candidates": "[{name: a}, {name: b, colour: red}]"}, "rank.candidates[1].colour"),
        ({"rank.candidates": "[{name: a}, {name: b}]", "probe.linear_probe": "false"}, "needs a ground truth"),
    ],
)
def test_rank_refuses_bad_candidates_before_any_model(tmp_path, bert_dir, text_csv, extra, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        rank_stage(make_recipe(bert_dir, text_csv, **extra), tmp_path, progress=False)


def test_rank_takes_truncated_candidates_and_labels_them(tmp_path, bert_dir, text_csv):
    cands = f"[{{name: 'hf:{bert_dir}'}}, {{name: 'hf:{bert_dir}', truncate_at: 1}}]"
    report = rank_stage(make_recipe(bert_dir, text_csv, **{"rank.candidates": cands, "probe.linear_probe": "true"}),
                        tmp_path, progress=False)
    whole, cut = report["rows"]
    assert cut["name"] == f"hf:{bert_dir}@1" and whole["name"] == f"hf:{bert_dir}"
    assert cut["params"] < whole["params"]
    assert [r["name"] for r in report["layers"][cut["name"]]["rows"]] == ["hf.encoder.layer.0", "hf.encoder.layer.1"]
    assert len(report["layers"][whole["name"]]["rows"]) == 3
