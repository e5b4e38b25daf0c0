"""Markdown reports for probe, run, rank and UFM directories (fabricated artefacts, no model is run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from nc_finetune.errors import UserError
from nc_finetune.probe.result import ProbeResult
from nc_finetune.report.render import render_report
from nc_finetune.select import Selection
from nc_finetune.utils.io import write_json_atomic

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE


def _probe() -> ProbeResult:
    layers = [
        {"index": 0, "name": "blocks.0", "is_block": True, "dim": 16, "num_params": 1000, "nc1": 2.5,
         "nc1_trace": 1.25, "cdnv": 0.8, "nc2": 0.4, "ncc_accuracy": 0.6, "lp_accuracy": 0.55},
        {"index": 1, "name": "blocks.1", "is_block": True, "dim": 16, "num_params": 1000, "nc1": 0.75,
         "nc1_trace": 0.5, "cdnv": math.nan, "nc2": 0.3, "ncc_accuracy": 0.8, "lp_accuracy": 0.7},
        {"index": 2, "name": "output", "is_block": False, "dim": 16, "num_params": 0, "nc1": 0.5,
         "nc1_trace": 0.4, "cdnv": 0.2, "nc2": 0.25, "ncc_accuracy": 0.85, "lp_accuracy": 0.75},
    ]
    meta = {"backbone": "timm:tiny_net", "dataset": "toy-data", "num_classes": 2, "samples": 40,
            "class_counts": [20, 20], "versions": {"python": "3.11.0", "torch": "2.4.0"}}
    return ProbeResult(layers=layers, fit={"metric": "nc1", "rho": 0.3, "r2": 1.0}, meta=meta)


@pytest.fixture
def probe_dir(tmp_path: Path) -> Path:
    d = tmp_path / "probe"
    _probe().save(d / "probe.json")
    return d


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    _probe().save(d / "probe.json")
    Selection(strategy="knee", blocks=[{"index": 1, "name": "blocks.1", "num_params": 1000}],
              module_names=["backbone.blocks.1"], scores={0: 0.1, 1: 0.9}, block_params=1000, total_params=12_345,
              trainable_params=1034, head_params=34, trainable_fraction=1034 / 12_345,
              budget={"max_blocks": 1, "max_param_fraction": None, "defaulted": True}, ranking=[1, 0],
              rationale="blocks.1 is where NC1 stops falling fast.", num_blocks=2).save(d / "selection.json")
    lines = [{"step": 1, "epoch": 0, "loss": 0.9, "lr": 0.01}, {"step": 2, "epoch": 0, "loss": 0.7, "lr": 0.005},
             {"step": 2, "epoch": 0, "split": "test", "accuracy": 0.625, "loss": 0.66, "samples": 8},
             {"step": 3, "epoch": 1, "loss": 0.5, "lr": 0.001},
             {"step": 3, "epoch": 1, "split": "test", "accuracy": 0.875, "loss": 0.41, "samples": 8},
             {"step": 3, "epoch": 2, "split": "final_test", "accuracy": 0.875, "loss": 0.41, "samples": 8}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "ep',
                                     encoding="utf-8")  # a killed writer's partial line
    write_json_atomic(d / "summary.json", {
        "test_accuracy": 0.875, "test_loss": 0.41, "test_samples": 8, "trainable_params": 1034, "total_params": 12_345,
        "head_params": 34, "trainable_fraction": 1034 / 12_345, "train_seconds": 3.25, "seconds_per_epoch": 1.625,
        "steps": 3, "epochs_run": 2, "stopped_early": False, "peak_memory_mb": math.nan, "device": "cpu",
        "world_size": 1, "prefix_cache": {"enabled": False, "reason": "train.cache_prefix=off"}, "method": "finetune",
        "backbone": "timm:tiny_net", "dataset": "toy-data", "train_samples": 40,
        "versions": {"python": "3.11.0", "torch": "2.4.0"}})
    return d


def test_probe_dir(probe_dir: Path, tmp_path: Path) -> None:
    report = render_report(probe_dir)
    assert report == probe_dir / "report.md"
    text = report.read_text(encoding="utf-8")
    assert text.startswith("# nc-finetune report: `probe`")
    assert "- kind: probe" in text and "- backbone: `timm:tiny_net`" in text and "- dataset: `toy-data`" in text
    assert "- probe samples: 40 (per class: 20, 20), classes: 2" in text and "torch 2.4.0" in text
    assert "## Layer-wise collapse (probe)" in text
    assert "| index | name | dim | nc1 | nc1_trace | cdnv | nc2 | ncc_accuracy | lp_accuracy |" in text
    assert "| 1 | `blocks.1` | 16 | 0.75 | 0.5 | nan | 0.3 | 0.800 | 0.700 |" in text  # NaN (null on disk) → nan
    assert "| - | `output` |" in text and "ρ = 0.3000 per block" in text
    assert "![probe](probe.png)" in text and _is_png(probe_dir / "probe.png")  # regenerated: none was there
    for absent in ("## Chosen blocks", "## Training", "## Costs", "## Ranking"):
        assert absent not in text
    # Elsewhere: the page and its image land in `out`, the probe directory gains nothing more.
    other = render_report(probe_dir, tmp_path / "elsewhere" / "page.md")
    assert other.name == "page.md" and _is_png(other.parent / "probe.png")
    assert sorted(p.name for p in probe_dir.iterdir()) == ["probe.json", "probe.png", "report.md"]


def test_run_dir(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pages"
    report = render_report(run_dir, out)
    assert report == out / "report.md"
    text = report.read_text(encoding="utf-8")
    assert "- kind: run" in text and "- method: `finetune`" in text and "- train samples: 40, test samples: 8" in text
    assert "| 1 | `blocks.1` | 16 |" in text and text.count("| yes |") == 1  # tuned column marks blocks.1 only
    assert "## Chosen blocks" in text and "Strategy `knee`: 1 of 2 blocks tuned." in text
    assert "| 1 | `blocks.1` | `backbone.blocks.1` | 1,000 |" in text
    assert "Parameters in the chosen blocks: 1,000 (trainable parameters as trained: see Costs)." in text
    assert "**Rationale.** blocks.1 is where NC1 stops falling fast." in text
    assert "Ranking (tune first → last): 1 > 0" in text
    assert "## Training" in text and "1 unreadable line(s) of metrics.jsonl skipped" in text
    assert "last: step 3, loss 0.5, lr 0.001" in text
    assert "| 2 | 1 | test | 0.6250 | 0.6600 | 8 |" in text and "| 3 | 2 | final_test | 0.8750 | 0.4100 | 8 |" in text
    assert "## Costs" in text and "| test accuracy | 0.8750 |" in text
    assert "| trainable / total params (as trained) | 1,034 / 12,345 (8.38%) |" in text
    assert "| train seconds | 3.2 |" in text or "| train seconds | 3.3 |" in text
    assert "| seconds per epoch | 1.62 |" in text or "| seconds per epoch | 1.63 |" in text
    assert "| peak memory (MB) | nan |" in text and "| prefix cache | off (train.cache_prefix=off) |" in text
    for png in ("probe.png", "training.png"):
        assert f"![{png[:-4]}]({png})" in text and _is_png(out / png)
    assert not (run_dir / "report.md").exists() and not (run_dir / "training.png").exists()
    assert not list(out.glob(".*.tmp"))


def test_run_dir_without_selection_json_uses_summary(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    summary["selection"] = json.loads((run_dir / "selection.json").read_text(encoding="utf-8"))
    write_json_atomic(run_dir / "summary.json", summary)
    (run_dir / "selection.json").unlink()
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "probe.json").unlink()
    text = render_report(run_dir).read_text(encoding="utf-8")
    assert "## Chosen blocks" in text and "## Costs" in text
    assert "## Training" not in text and "## Layer-wise collapse" not in text


def test_lora_run_shows_one_trainable_fraction_from_the_summary(run_dir: Path) -> None:
    # The selection counts whole blocks (1,034 = 8.38%); LoRA trains its adapters and the head only (234 = 1.90%).
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    summary.update(method="lora", trainable_params=234, trainable_fraction=234 / 12_345)
    write_json_atomic(run_dir / "summary.json", summary)
    text = render_report(run_dir).read_text(encoding="utf-8")
    assert "| trainable / total params (as trained) | 234 / 12,345 (1.90%) |" in text
    assert "8.38%" not in text and "1,034" not in text
    assert text.count("1.90%") == 1


def test_selection_without_a_run_keeps_its_trainable_count(run_dir: Path) -> None:
    for name in ("summary.json", "metrics.jsonl"):
        (run_dir / name).unlink()
    text = render_report(run_dir).read_text(encoding="utf-8")
    assert "Trainable parameters: 1,034 of 12,345 (8.38%) = blocks 1,000 + head 34." in text


@pytest.mark.parametrize("listed", [False, True])
def test_rank_dir(tmp_path: Path, listed: bool) -> None:
    fig = Figure(figsize=(1, 1))
    fig.subplots().plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "rank.png", format="png", dpi=20)
    corr = {"nc1": {"tau": -0.6, "tau_w": -0.7}, "lp_accuracy": {"tau": 0.8, "tau_w": None}}
    if listed:
        corr = [{"score": k, **v} for k, v in corr.items()]
    write_json_atomic(tmp_path / "rank.json", {
        "dataset": "toy-data", "target": "finetune_accuracy",
        "rows": [{"backbone": "model-a", "nc1": 0.5, "lp_accuracy": 0.8, "finetune_accuracy": 0.9},
                 {"backbone": "model-b", "nc1": 2.0, "lp_accuracy": math.nan, "finetune_accuracy": 0.7}],
        "correlations": corr})
    text = render_report(tmp_path).read_text(encoding="utf-8")
    assert "- kind: rank" in text and "## Ranking" in text and "- target: finetune_accuracy" in text
    assert "### Candidates (2)" in text and "| backbone | nc1 | lp_accuracy | finetune_accuracy |" in text
    assert "| model-b | 2 | nan | 0.7 |" in text
    assert "### Rank correlations" in text and "| score | τ | τ_w |" in text
    assert "| `nc1` | -0.6 | -0.7 |" in text and "| `lp_accuracy` | 0.8 | nan |" in text
    assert "![rank](rank.png)" in text


def test_ufm_dir(tmp_path: Path) -> None:
    from nc_finetune.report.ufm_report import run_ufm

    d = tmp_path / "ufm"
    run_ufm(d, max_iter=200)
    (d / "ufm.png").unlink()
    text = render_report(d).read_text(encoding="utf-8")
    assert "- kind: ufm" in text and "## Unconstrained feature model" in text
    assert "| quantity | closed form | reached | error |" in text
    assert "| ‖w_k‖² | 7.478779 | 7.478779 |" in text and "| objective f | 0.1836919957 | 0.1836919957 |" in text
    assert "| ‖W‖_F / ‖M̄‖_F | 2.236068 | 2.236068 |" in text and "converged." in text
    assert "![ufm](ufm.png)" in text and _is_png(d / "ufm.png")  # regenerated from the history


def test_not_a_report_directory(tmp_path: Path) -> None:
    msg = (r"is not a probe, run, rank, sweep or ufm directory \(expected probe.json, summary.json, rank.json, "
           r"sweep.json or ufm.json\)")
    with pytest.raises(UserError, match=msg):
        render_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    with pytest.raises(UserError, match=msg):
        render_report(tmp_path)
    with pytest.raises(UserError, match="is not a directory"):
        render_report(tmp_path / "missing")
    (tmp_path / "probe.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="probe.json is not valid JSON"):
        render_report(tmp_path)
    assert not (tmp_path / "report.md").exists()


def test_run_dir_names_its_starting_run_cut_and_data_shift(run_dir: Path) -> None:
    (run_dir / "resolved.yaml").write_text(
        "backbone: {name: 'timm:tiny_net', init_from: runs/source, truncate_at: blocks.1}\n"
        "data: {name: toy-data, corruption: gaussian_noise, corruption_severity: 5}\n", encoding="utf-8")
    text = render_report(run_dir).read_text(encoding="utf-8")
    assert "- started from the weights of run `runs/source`" in text
    assert "- truncated after block `blocks.1`" in text
    assert "- dataset: `toy-data` corrupted by `gaussian_noise` (severity 5)" in text


def test_run_dir_shows_the_fill_policy_and_the_selection_evidence(run_dir: Path) -> None:
    sel = json.loads((run_dir / "selection.json").read_text(encoding="utf-8"))
    sel["strategy"] = "stall"
    sel["budget"].update({"max_param_fraction": 0.1, "fill": "stop", "stopped_at": "blocks.0", "defaulted": False,
                          "counts": "selected block parameters / backbone parameters (the head is not counted)"})
    sel["details"] = {"bootstrap": {"replicates": 10, "pick_frequency": {"blocks.1": 0.8, "blocks.0": 0.2},
                                    "stable_selection": ["blocks.1"], "stability": 0.8}}
    write_json_atomic(run_dir / "selection.json", sel)
    text = render_report(run_dir).read_text(encoding="utf-8")
    assert "Fill policy `stop`." in text and "Stopped at `blocks.0` (over the budget)." in text
    assert "the head is not counted" in text
    assert "bootstrap: 10 resampled probes; picked: blocks.1 80%, blocks.0 20%; the most stable selection " \
           "(blocks.1) in 80% of them" in text


def test_run_dir_shows_class_metrics(run_dir: Path) -> None:
    probe = _probe()
    probe.meta["class_names"] = ["ham", "spam"]
    probe.save(run_dir / "probe.json")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    summary.update({"test_macro_f1": 0.8667, "test_per_class_accuracy": [1.0, 0.75],
                    "test_confusion_matrix": [[4, 0], [1, 3]], "val_accuracy": 0.5, "val_macro_f1": 0.3333,
                    "val_per_class_accuracy": [1.0, None], "val_confusion_matrix": [[2, 0], [0, 0]]})
    write_json_atomic(run_dir / "summary.json", summary)
    text = render_report(run_dir).read_text(encoding="utf-8")
    assert "## Classification metrics" in text and "### Test split" in text and "### Validation split" in text
    assert "accuracy 0.8750, macro-F1 0.8667" in text
    assert "| true / predicted | ham | spam | samples | class accuracy |" in text
    assert "| ham | 4 | 0 | 4 | 1.0000 |" in text and "| spam | 1 | 3 | 4 | 0.7500 |" in text
    assert "| spam | 0 | 0 | 0 | nan |" in text  # no validation sample of that class
