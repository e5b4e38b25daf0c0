"""Device-side preprocessing: ``finish(collate(raw))`` equals the single-stage CPU path it replaced, for every family
with an image preprocessor (timm, Hugging Face, built-in), on the CPU and (when available) on CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nc_finetune.backbones import load_backbone
from nc_finetune.backbones.preprocess import ImageConfig, ImagePreprocessor
from nc_finetune.data.prefetch import prefetch, to_device
from tests.conftest import load_bert, load_cnn

DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def old_prepare(cfg: ImageConfig, key: str, raw, train: bool = False) -> dict[str, torch.Tensor]:
    """The CPU path before the split into collate / finish, written out image by image: HWC uint8 -> /255 ->
    drop alpha -> bilinear resize -> gray to RGB -> normalise, then flip where ``torch.rand(B) < 0.5``."""
    out = []
    for img in raw:
        a = np.asarray(img)
        a = a[:, :, None] if a.ndim == 2 else a
        x = torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float() / 255.0  # (1, C, H, W)
        x = x[:, :3]
        if tuple(x.shape[-2:]) != cfg.size:
            x = F.interpolate(x, size=cfg.size, mode="bilinear", align_corners=False, antialias=False)
        x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std).view(1, 3, 1, 1)
        out.append((x - mean) / std)
    x = torch.cat(out)
    if train:
        flip = torch.rand(x.shape[0]) < 0.5
        x[flip] = x[flip].flip(-1)
    return {key: x}


def _batches(rng: np.random.Generator) -> dict[str, object]:
    from PIL import Image

    rgb = rng.integers(0, 256, (6, 20, 24, 3), dtype=np.uint8)
    return {
        "stacked gray": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "stacked rgb": rgb,
        "stacked rgba": rng.integers(0, 256, (3, 9, 9, 4), dtype=np.uint8),
        "list of PIL": [Image.fromarray(im) for im in rgb],
        "mixed sizes and modes": [rgb[0], rng.integers(0, 256, (7, 5), dtype=np.uint8), rgb[1][:10, :13]],
    }


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tiny_vit_pre")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32)
    transformers.ViTModel(config).save_pretrained(d)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.485, 0.456, 0.406],
                                   image_std=[0.229, 0.224, 0.225]).save_pretrained(d)
    return d


def _backbones(vit_dir: Path):
    torch.manual_seed(0)
    return {"timm": load_cnn(), "hf": load_backbone(f"hf:{vit_dir}"),
            "builtin": load_backbone("efficientnet-lite0", pretrained=False, image_size=16)}


@pytest.mark.parametrize("device", DEVICES)
def test_device_path_equals_the_old_cpu_path_for_every_family(device, vit_dir) -> None:
    dev = torch.device(device)
    for family, bb in _backbones(vit_dir).items():
        pre = bb.preprocess
        key = pre.key
        for what, raw in _batches(np.random.default_rng(0)).items():
            for train in (False, True):
                torch.manual_seed(3)
                expected = old_prepare(pre.config, key, raw, train)[key]
                collated = bb.collate(raw)
                if what.startswith("stacked") or what == "list of PIL":  # one size: travels as uint8 (B, C, H, W)
                    assert collated[key].dtype == torch.uint8 and collated[key].shape[1] in (1, 3), (family, what)
                torch.manual_seed(3)
                got = bb.finish(to_device(collated, dev), train=train)[key]
                assert got.device.type == dev.type and got.dtype == torch.float32
                tol = {"atol": 1e-6, "rtol": 1e-6} if device == "cpu" else {"atol": 1e-4, "rtol": 1e-4}
                torch.testing.assert_close(got.cpu(), expected, **tol, msg=f"{family} / {what} / train={train}")
                torch.manual_seed(3)
                torch.testing.assert_close(bb.prepare(raw, train=train)[key], expected, atol=1e-6, rtol=1e-6)
                torch.manual_seed(3)  # the one-call form the select hooks use: the same numbers, on the device
                on = bb.prepare_on(raw, dev, train=train)[key]
                assert on.device.type == dev.type
                torch.testing.assert_close(on.cpu(), expected, **tol)


def test_text_collate_is_the_whole_preparation(bert_dir) -> None:
    bb = load_bert(bert_dir)
    texts = ["the cat sat", "a dog ran fast on the mat"]
    collated = bb.collate(texts)
    assert bb.finish(collated) is collated
    for k, v in bb.prepare(texts).items():
        assert torch.equal(collated[k], v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_collated_batches_are_pinned_uint8_for_the_copy() -> None:
    pre = ImagePreprocessor(ImageConfig((32, 32), (0.5,) * 3, (0.5,) * 3))
    raw = [np.zeros((4, 8, 8, 3), np.uint8)] * 2
    batches = list(prefetch(raw, pre.collate, pin=True))
    assert all(b["x"].is_pinned() and b["x"].dtype == torch.uint8 for b in batches)
