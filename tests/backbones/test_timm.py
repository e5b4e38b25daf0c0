"""timm backbones: block enumeration, taps, pooling and image preprocessing, on tiny random-init models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nc_finetune.backbones import Backbone, load_backbone
from nc_finetune.backbones.preprocess import ImageConfig, ImagePreprocessor
from nc_finetune.backbones.timm_backbone import container_blocks, enumerate_timm_blocks
from nc_finetune.errors import ConfigError, DataError

# (model, image size, expected block names); sizes are small to keep the suite fast on 2 cores
CASES = {
    "test_vit": (32, [f"blocks.{i}" for i in range(6)]),
    "test_resnet": (32, ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]),
    "resnet18": (32, [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]),
    "tf_efficientnet_lite0": (
        32,
        [f"blocks.{s}.{b}" for s, n in enumerate([1, 2, 2, 3, 3, 4, 1]) for b in range(n)],
    ),
    "test_convnext": (
        32,
        ["stages.0.blocks.0"]
        + [
            f"stages.{s}.{part}"
            for s, n in [(1, 2), (2, 4), (3, 2)]
            for part in ["downsample"] + [f"blocks.{b}" for b in range(n)]
        ],
    ),
}
FINAL_TAP = {"test_vit": "", "test_resnet": None, "resnet18": None, "tf_efficientnet_lite0": "", "test_convnext": ""}


def _images(n: int, size: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size), dtype=np.uint8)  # gray, like F-MNIST


@pytest.fixture(scope="module", params=list(CASES))
def loaded(request: pytest.FixtureRequest) -> tuple[str, Backbone]:
    name = request.param
    torch.manual_seed(0)
    return name, load_backbone(f"timm:{name}", pretrained=False, image_size=CASES[name][0])


def test_blocks_are_named_as_expected(loaded: tuple[str, Backbone]) -> None:
    name, bb = loaded
    assert [b.name for b in bb.blocks] == CASES[name][1]
    assert [b.index for b in bb.blocks] == list(range(len(bb.blocks)))
    assert bb.final_tap == FINAL_TAP[name]
    assert bb.modality == "image" and bb.spec == f"timm:{name}"


def test_block_order_equals_forward_call_order(loaded: tuple[str, Backbone]) -> None:
    _, bb = loaded
    calls: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, _a, n=info.name: calls.append(n)) for info, m in bb.block_modules()
    ]
    try:
        with torch.no_grad():
            bb.model(**bb.prepare(_images(2)))
    finally:
        for h in handles:
            h.remove()
    assert calls == [b.name for b in bb.blocks]  # each block runs exactly once, in this order


def test_block_params_cover_the_body(loaded: tuple[str, Backbone]) -> None:
    _, bb = loaded
    names = [b.name for b in bb.blocks]
    for info, module in bb.block_modules():
        assert module is bb.model.get_submodule(info.name)
        assert info.num_params == sum(p.numel() for p in module.parameters()) > 0
        assert not any(other.startswith(info.name + ".") for other in names)  # disjoint blocks
    in_blocks = {f"{b.name}.{p}" for b, m in bb.block_modules() for p, _ in m.named_parameters()}
    found = enumerate_timm_blocks(bb.model)
    everything = {n for n, _ in bb.model.named_parameters()}
    # every parameter is stem, block or after the blocks (final norm / conv_head), exactly once
    assert in_blocks.isdisjoint(found.stem_params) and in_blocks.isdisjoint(found.other_params)
    assert in_blocks | set(found.stem_params) | set(found.other_params) == everything
    assert (
        sum(b.num_params for b in bb.blocks)
        + sum(bb.model.get_parameter(p).numel() for p in found.stem_params + found.other_params)
        == bb.num_params()
    )


def test_taps_pool_to_vectors_and_final_tap_gives_the_feature(loaded: tuple[str, Backbone]) -> None:
    _, bb = loaded
    inputs = bb.prepare(_images(3))
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    outs: dict[str, object] = {}
    modules = dict(bb.block_modules())
    hooked = [(info.name, m) for info, m in modules.items()] + [("<final>", bb.final_module())]
    handles = [m.register_forward_hook(lambda _m, _i, o, n=n: outs.setdefault(n, o)) for n, m in hooked]
    try:
        with torch.no_grad():
            feats = bb.model(**inputs)
    finally:
        for h in handles:
            h.remove()
    assert feats.shape == (3, bb.feature_dim) and feats.dtype == torch.float32
    for info in bb.blocks:
        pooled = bb.pool(outs[info.name], inputs)
        assert pooled.ndim == 2 and pooled.shape[0] == 3 and pooled.dtype == torch.float32
        assert torch.isfinite(pooled).all()
    torch.testing.assert_close(bb.pool(outs["<final>"], inputs), feats)
    last = bb.pool(outs[bb.blocks[-1].name], inputs)
    # final_tap is None exactly when the last block's pooled output already is the feature
    assert (last.shape == feats.shape and torch.allclose(last, feats, atol=1e-5)) == (bb.final_tap is None)
    # probing leaves the model untouched (eval mode: BN running stats frozen)
    after = bb.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_model_state(loaded: tuple[str, Backbone]) -> None:
    _, bb = loaded
    assert not bb.model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in bb.model.parameters())


def test_random_init_is_deterministic() -> None:
    torch.manual_seed(3)
    a = load_backbone("timm:test_resnet", pretrained=False).model.state_dict()
    torch.manual_seed(3)
    b = load_backbone("timm:test_resnet", pretrained=False).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vit_pooling_override_resets_the_models_pooling() -> None:
    bb = load_backbone("timm:test_vit", pretrained=False, image_size=32, pooling="mean")
    assert bb.pooling == "mean" and bb.model.global_pool == "avg"
    inputs = bb.prepare(_images(2))
    outs: list[torch.Tensor] = []
    h = bb.model.norm.register_forward_hook(lambda _m, _i, o: outs.append(o))
    with torch.no_grad():
        feats = bb.model(**inputs)
    h.remove()
    # mean skips the prefix (CLS) token, like timm's own avg pooling
    torch.testing.assert_close(bb.pool(outs[0], inputs), feats)
    assert bb.num_prefix_tokens == 1


def test_cls_pooling_on_a_cnn_is_rejected() -> None:
    with pytest.raises(ConfigError, match="cls"):
        load_backbone("timm:test_resnet", pretrained=False, pooling="cls")


def test_unknown_timm_model() -> None:
    with pytest.raises(ConfigError, match="timm.list_models"):
        load_backbone("timm:not_a_real_model_xyz", pretrained=False)


def test_heuristic_fallback_without_group_matcher() -> None:
    torch.manual_seed(0)
    bb = load_backbone("timm:test_resnet", pretrained=False)
    bb.model.group_matcher = None  # instance attribute shadows the method
    found = enumerate_timm_blocks(bb.model)
    assert found.source == "heuristic" and found.names == [b.name for b in bb.blocks]

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 4, 1))
            self.stages = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1)))
            self.head = nn.Linear(4, 2)

    assert container_blocks(Toy()) == ["stages.0.0", "stages.0.2"]


# ---------------------------------------------------------------------------------------------- preprocessing
CFG = ImageConfig(size=(8, 8), mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))


def test_prepare_gray_batch_to_normalised_rgb() -> None:
    prep = ImagePreprocessor(CFG)
    raw = np.full((2, 4, 4), 255, dtype=np.uint8)
    x = prep(raw)["x"]
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))  # (1 - mean) / std


def test_prepare_accepts_lists_mixed_sizes_pil_and_rgba() -> None:
    from PIL import Image

    prep = ImagePreprocessor(CFG, key="pixel_values")
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((5, 6, 1), 7, np.uint8)], axis=-1)
    items = [rgb, Image.fromarray(rgb), rgba, np.zeros((3, 3), np.uint8), torch.from_numpy(rgb)]
    x = prep(items)["pixel_values"]
    assert x.shape == (5, 3, 8, 8)
    torch.testing.assert_close(x[0], x[1])  # PIL == numpy
    torch.testing.assert_close(x[0], x[2])  # alpha dropped
    torch.testing.assert_close(x[0], x[4])  # torch == numpy


def test_prepare_train_flip_is_seeded() -> None:
    prep = ImagePreprocessor(CFG)
    raw = np.random.default_rng(0).integers(0, 256, (16, 8, 8), dtype=np.uint8)
    plain = prep(raw)["x"]
    torch.manual_seed(0)
    a = prep(raw, train=True)["x"]
    torch.manual_seed(0)
    b = prep(raw, train=True)["x"]
    assert torch.equal(a, b)
    flipped = [not torch.equal(a[i], plain[i]) for i in range(16)]
    assert any(flipped) and not all(flipped)
    for i in range(16):
        assert torch.equal(a[i], plain[i].flip(-1) if flipped[i] else plain[i])


def test_prepare_rejects_bad_inputs() -> None:
    prep = ImagePreprocessor(CFG)
    with pytest.raises(DataError, match="uint8"):
        prep(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(DataError, match="HxW"):
        prep([np.zeros((4, 4, 2), np.uint8)])
    with pytest.raises(DataError):
        prep(["not an image"])
