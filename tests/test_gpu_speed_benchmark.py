"""``benchmarks/gpu_speed.py --smoke``: the GPU benchmark runs end to end on the CPU with a tiny model and writes
every number, ratio and target it promises (``targets_met`` is never true off a GPU)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def gpu_speed(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_speed

    yield gpu_speed
    sys.modules.pop("gpu_speed", None)


def test_smoke_run_writes_every_measurement(gpu_speed, tmp_path, capsys) -> None:
    out = tmp_path / "gpu_speed.json"
    assert gpu_speed.main(["--smoke", "--device", "cpu", "--models", "resnet", "--out", str(out),
                           "--workdir", str(tmp_path / "work")]) == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["smoke"] and r["targets_met"] is False
    assert r["sizes"]["preset"] == "smoke_sizes" and r["sizes"]["image_size"] == 32
    res = r["results"]["resnet"]
    assert set(res["inference_samples_per_s"]) == {"fp32", "bf16", "gpu_resident", "probe"}
    assert all(v > 0 for v in res["inference_samples_per_s"].values())
    assert set(res["train_ms_per_step"]) == {"full", "last2", "last2_lora", "last2_cache_3_epochs", "hand_full"}
    # timings are not asserted (the smoke run checks the plumbing; a loaded machine can make a difference <= 0)
    assert all(math.isfinite(v["ms_per_step"]) for v in res["train_ms_per_step"].values())
    assert res["train_ms_per_step"]["last2_cache_3_epochs"]["cache_enabled"]
    assert set(r["targets"]) == {*gpu_speed.TARGETS, "streaming_memory"}
    for key in gpu_speed.TARGETS:
        assert math.isfinite(r["targets"][key]["measured"]["resnet"])
    assert "targets_met: False" in capsys.readouterr().out


def test_unknown_model_label_is_refused(gpu_speed, tmp_path) -> None:
    with pytest.raises(SystemExit):
        gpu_speed.main(["--smoke", "--models", "nope", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_presets_cover_the_same_measurements(gpu_speed) -> None:
    # the CPU preset (no --smoke, no GPU) sets every size the GPU preset sets, nothing else
    params = gpu_speed.EXPERIMENT.params
    assert set(params["cpu_sizes"]) == set(params["sizes"]) == set(params["smoke_sizes"])
    cpu, cuda = gpu_speed.torch.device("cpu"), gpu_speed.torch.device("cuda")
    assert gpu_speed.size_preset(False, cpu) == "cpu_sizes" and gpu_speed.size_preset(False, cuda) == "sizes"
    assert gpu_speed.size_preset(True, cpu) == gpu_speed.size_preset(True, cuda) == "smoke_sizes"
