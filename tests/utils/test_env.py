"""Devices: a device this machine does not have is refused when a command starts, before anything loads."""

from __future__ import annotations

import pytest
import torch

from nc_finetune import pipeline
from nc_finetune.cli import main
from nc_finetune.errors import ConfigError
from nc_finetune.utils.env import check_device, resolve_device


@pytest.fixture
def one_gpu(monkeypatch):
    """Pretend this machine has exactly one CUDA device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_a_cuda_index_beyond_the_visible_devices_is_refused(one_gpu):
    check_device("cuda")
    check_device("cuda:0")
    with pytest.raises(ConfigError, match=r"train.device=cuda:7 does not exist: this machine has 1 CUDA device"):
        check_device("cuda:7", "train.device")
    with pytest.raises(ConfigError, match=r"probe.device=cuda:1 does not exist"):
        resolve_device("cuda:1", "probe.device")


def test_cuda_or_mps_without_them_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    check_device("cpu")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        check_device("cuda", "probe.device")
    with pytest.raises(ConfigError, match="MPS is not available"):
        check_device("mps", "train.device")


@pytest.mark.parametrize("command", ["probe", "select", "run", "rank"])
def test_every_stage_refuses_a_missing_device_before_loading_data(one_gpu, monkeypatch, tmp_path, capsys, command):
    def no_loading(*_args, **_kwargs):
        raise AssertionError("data loaded before the device check")

    monkeypatch.setattr(pipeline, "prepare_data", no_loading)
    out = tmp_path / "out"
    assert main([command, "minilm-rotten-tomatoes", "train.device=cuda:7", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.device=cuda:7 does not exist" in err, err
    assert not out.exists()
