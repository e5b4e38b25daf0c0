"""Truncated backbones: features = the cut block's pooled output, later modules dropped, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nc_finetune.backbones import load_backbone
from nc_finetune.backbones.truncate import truncate_backbone
from nc_finetune.errors import ConfigError


def _resnet(seed: int = 0):
    torch.manual_seed(seed)
    return load_backbone("timm:test_resnet", pretrained=False, image_size=32)


def test_cnn_cut_gives_the_block_output_and_drops_the_rest():
    ref = _resnet()
    images = np.random.default_rng(0).integers(0, 256, size=(4, 20, 20, 3), dtype=np.uint8)
    inputs = ref.prepare(images)
    seen = {}
    ref.model.get_submodule("layer2.0").register_forward_hook(lambda m, a, o: seen.setdefault("x", o))
    with torch.no_grad():
        ref.model(**inputs)
    expect = seen["x"].mean((2, 3))  # (B, C) global average pool of the block's feature map

    bb = truncate_backbone(_resnet(), "layer2.0")
    with torch.no_grad():
        got = bb.model(**bb.prepare(images))
    torch.testing.assert_close(got, expect)
    assert bb.feature_dim == expect.shape[1] and bb.final_tap is None
    assert [b.name for b in bb.blocks] == ["layer1.0", "layer2.0"] and bb.spec.endswith("@layer2.0")
    kept = ("conv1.", "bn1.", "layer1.", "layer2.")
    assert bb.num_params() == sum(p.numel() for n, p in ref.model.named_parameters() if n.startswith(kept))
    assert not any(n.startswith(("layer3", "layer4", "fc")) for n, _ in bb.model.named_parameters())
    assert bb.provenance["truncated_at"] == "layer2.0"


def test_index_forms_and_the_last_block():
    assert [b.name for b in truncate_backbone(_resnet(), 0).blocks] == ["layer1.0"]
    assert [b.name for b in truncate_backbone(_resnet(), -2).blocks][-1] == "layer3.0"
    whole = _resnet()
    assert truncate_backbone(whole, -1) is whole  # nothing after the last block


def test_text_cut_equals_the_hidden_state_of_that_layer(bert_dir):
    ref = load_backbone(f"hf:{bert_dir}", pooling="mean")
    texts = ["the cat sat on the mat", "a dog"]
    inputs = ref.prepare(texts)
    with torch.no_grad():
        hidden = ref.model.hf(**inputs, output_hidden_states=True).hidden_states[2]  # after layer 1: (B, T, D)
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    expect = (hidden * mask).sum(1) / mask.sum(1)

    bb = truncate_backbone(load_backbone(f"hf:{bert_dir}", pooling="mean"), "hf.encoder.layer.1")
    with torch.no_grad():
        got = bb.model(**bb.prepare(texts))
    torch.testing.assert_close(got, expect)
    assert len(bb.blocks) == 2
    assert not any(".layer.2." in n for n, _ in bb.model.named_parameters())
    assert bb.num_params() < ref.num_params()


def test_refusals():
    with pytest.raises(ConfigError, match=r"truncate_at=9 is out of range: .* has 4 blocks \(0..3"):
        truncate_backbone(_resnet(), 9)
    with pytest.raises(ConfigError, match="'layer9' is not a block of .*; blocks: layer1.0"):
        truncate_backbone(_resnet(), "layer9")
    with pytest.raises(ConfigError, match="must be a block index or name"):
        truncate_backbone(_resnet(), 1.5)


def test_lora_on_a_leaf_cut_block_reaches_the_features():
    """A block that is a bare Linear (timm VGG's ``features.N`` are bare convs) is replaced by peft's LoRA wrapper:
    the features must be the wrapper's output (LoRA delta included), not its inner base layer's."""
    pytest.importorskip("peft")
    from torch import nn

    from nc_finetune.adapt import build_classifier
    from nc_finetune.backbones.base import Backbone, make_block_infos
    from nc_finetune.select import select_blocks

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(6, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blocks(x)

    torch.manual_seed(0)
    model = Toy().eval()
    bb = Backbone(spec="toy", model=model, modality="image", feature_dim=5, pooling="mean", final_tap=None,
                  blocks=make_block_infos(model, ["blocks.0", "blocks.1", "blocks.2"]),
                  preprocess=lambda raw, train=False: {"x": torch.zeros(len(raw), 4)})
    bb = truncate_backbone(bb, 1)
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=[1], head_params=0, total_params=100)
    adapted = build_classifier(bb, 3, method="lora", selection=sel, lora_r=2)
    with torch.no_grad():
        for n, p in adapted.model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a non-zero LoRA delta
    seen = {}
    classifier = adapted.model.base_model.model
    classifier.nc_head.register_forward_hook(lambda m, a, o: seen.setdefault("h", a[0]))
    x = torch.randn(2, 4)
    with torch.no_grad():
        adapted.model(x=x)
        expect = classifier.backbone.blocks[1](model.blocks[0](x))  # the LoRA-wrapped block's output
    torch.testing.assert_close(seen["h"], expect)
