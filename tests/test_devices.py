"""Every stage on every device: selection strategies (Auto-RGN included) x adapt modes x the prefix cache, end to end
through ``run_pipeline`` and ``eval_stage``, on the CPU always and on CUDA whenever it is available.

On the CPU a device mismatch cannot happen, so there every run is also watched by :class:`DeviceGuard`: a torch
function mode that fails the test when code of this package creates a tensor without saying on which device (such a
tensor lands on the CPU, while the model may be on a GPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from nc_finetune.pipeline import eval_stage, run_pipeline
from tests.conftest import make_recipe

pytest.importorskip("transformers")

DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
#: Factory functions whose result lands on the default (CPU) device unless ``device=`` is given.
FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor, torch.as_tensor,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye, torch.linspace}
PACKAGE = str(Path(__file__).resolve().parents[1] / "nc_finetune")


class DeviceGuard(TorchFunctionMode):
    """Records factory calls made directly from ``nc_finetune`` code without a ``device=`` argument."""

    def __init__(self) -> None:
        super().__init__()
        self.offenders: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(PACKAGE):
                self.offenders.add(f"{frame.f_code.co_filename[len(PACKAGE) + 1:]}:{frame.f_lineno} {func.__name__}")
        return func(*args, **kwargs)


# (strategy, method, cache): Auto-RGN (the only strategy that runs the model) under every adapt mode with the cache on
# and off (full fine-tuning has no frozen prefix), and NC-guided selection once; the other strategies only read the
# probe result, which the NC-guided case already covers.
CASES = [("auto_rgn", m, c) for m in ("linear_probe", "finetune", "lora", "scl") for c in ("on", "off")]
CASES += [("auto_rgn", "full", "off"), ("knee", "lora", "on")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("strategy", "method", "cache"), CASES)
def test_every_stage_runs_on_the_device(device, strategy, method, cache, bert_dir, text_csv, tmp_path) -> None:
    extra = {"selection.strategy": strategy, "selection.blocks": "null", "selection.max_blocks": 1,
             "selection.rgn_batches": 2, "adapt.method": method, "train.cache_prefix": cache,
             "probe.device": device, "train.device": device, "train.checkpoint_every": 100}
    if method == "scl":
        extra["probe.layers"] = "[0]"  # the skip block's width then comes from a forward outside the probe
    recipe = make_recipe(bert_dir, text_csv, **extra)
    summary, scored = _run_and_eval_guarded(recipe, tmp_path / "run")
    assert summary["device"].startswith(device)
    assert summary["prefix_cache"]["enabled"] == (cache == "on" and method != "full"), summary["prefix_cache"]
    # eval runs uncached; on CUDA the cached run's bf16 kernels see other batch sizes
    assert scored["loss"] == pytest.approx(summary["test_loss"], abs=1e-4 if device == "cpu" else 2e-2)
    assert json.loads((tmp_path / "run" / "probe.json").read_text())["device"].startswith(device)


@pytest.mark.parametrize("device", DEVICES)
def test_init_from_a_finished_run_on_the_device(device, finished_run, bert_dir, text_csv, tmp_path) -> None:
    recipe = make_recipe(bert_dir, text_csv, **{"backbone.init_from": str(finished_run["out"]),
                                                 "probe.device": device, "train.device": device,
                                                 "selection.strategy": "auto_rgn", "selection.blocks": "null",
                                                 "selection.rgn_batches": 1, "train.epochs": 1})
    guard = DeviceGuard()
    with guard:
        summary = run_pipeline(recipe, tmp_path / "run", progress=False)
    assert not guard.offenders, sorted(guard.offenders)
    assert summary["device"].startswith(device)


def test_the_guard_catches_a_tensor_made_without_a_device() -> None:
    from nc_finetune.probe.stats import FeatureReservoir

    package_code = compile("import torch\nt = torch.zeros(3)\nu = torch.zeros(3, device='cpu')\n",
                           f"{PACKAGE}/fake.py", "exec")
    guard = DeviceGuard()
    with guard:
        exec(package_code, {})
        FeatureReservoir(2, device="cpu").add(torch.ones(5, 3), torch.zeros(5, dtype=torch.long))  # draws on the CPU
        torch.zeros(3)  # test code is not watched
    assert guard.offenders == {"fake.py:2 zeros"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("augment", "cache"), [(True, "off"), (False, "on")])
def test_image_pipeline_runs_on_the_device(device, augment, cache, tmp_path) -> None:
    """uint8 images collated on the CPU, resized / normalised / flipped on the device, for the probe, training (with
    the flip augmentation, or with the prefix cache storing the uint8 inputs) and evaluation."""
    from nc_finetune.config import load_recipe

    recipe = load_recipe(None, [
        "backbone.name=timm:test_efficientnet", "backbone.pretrained=false", "backbone.image_size=16",
        "data.name=digits", "data.max_train_samples=40", "data.max_eval_samples=20", "probe.samples_per_class=3",
        "probe.batch_size=16", f"probe.device={device}", "selection.strategy=manual", "selection.blocks=[3]",
        "adapt.method=finetune", "train.epochs=2", "train.batch_size=8", "train.eval_batch_size=16",
        f"train.augment={str(augment).lower()}", f"train.cache_prefix={cache}", f"train.device={device}",
        "train.checkpoint_every=100"])
    summary, scored = _run_and_eval_guarded(recipe, tmp_path / "run")
    assert summary["device"].startswith(device)
    assert summary["prefix_cache"]["enabled"] == (cache == "on"), summary["prefix_cache"]
    assert scored["loss"] == pytest.approx(summary["test_loss"], abs=1e-4 if device == "cpu" else 2e-2)


def _run_and_eval_guarded(recipe, out):
    """``run`` then ``eval`` under the device guard; fails on any tensor created without a device."""
    guard = DeviceGuard()
    with guard:
        summary = run_pipeline(recipe, out, progress=False)
        scored = eval_stage(out)
    assert not guard.offenders, sorted(guard.offenders)
    return summary, scored
