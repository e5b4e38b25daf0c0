"""Adapt modes: exactly the intended parameters train, parameter accounting, SCL wiring, BatchNorm freezing, and the
peft adapter that the pipeline saves for LoRA. Tiny random models built in-process; real Trainer runs of a few steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nc_finetune.adapt import Classifier, build_classifier
from nc_finetune.select import select_blocks
from nc_finetune.train.loop import TrainData, Trainer
from tests.conftest import load_bert, load_cnn, make_recipe, train_config

pytest.importorskip("transformers")

K = 2
LORA_R = 4
SKIP = "backbone.hf.encoder.layer.1"  # the selected block (block index 1 of 0..2)
AFTER = "backbone.hf.encoder.layer.2"


def _select(bb, blocks=(1,)):
    return select_blocks(None, bb.blocks, strategy="manual", manual=list(blocks))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not), cloned."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state.update({k: v.detach().cpu().clone() for k, v in model.named_buffers()})
    return state


def _fit(adapted, bb, data, out: Path, **cfg) -> dict:
    split = TrainData(train=data["train"], test=data["test"])
    return Trainer(adapted, bb, split, train_config(epochs=1, **cfg), out, progress=False).fit()


def _expected_trainable(name: str, method: str, wiring: str | None) -> bool:
    """The parameter names that should train, written out per mode (independently of the code under test)."""
    in_block = name.startswith(SKIP + ".")
    if method == "linear_probe":
        return name.startswith("nc_head.")
    if method == "finetune":
        return name.startswith("nc_head.") or in_block
    if method == "scl":
        return name.startswith(("nc_head.", "skip_proj.")) or in_block
    if method == "lora":
        return ("lora_A" in name or "lora_B" in name) and ".encoder.layer.1." in name or \
            name.startswith("base_model.model.nc_head.modules_to_save.")
    assert method == "full"
    return True


MODES = [("linear_probe", "add"), ("finetune", "add"), ("lora", "add"), ("scl", "add"), ("scl", "concat"),
         ("scl", "replace"), ("full", "add")]


@pytest.mark.parametrize(("method", "wiring"), MODES, ids=[f"{m}-{w}" if m == "scl" else m for m, w in MODES])
def test_only_the_intended_parameters_train(bert_dir, text_data, tmp_path, method, wiring) -> None:
    bb = load_bert(bert_dir)
    fresh = load_bert(bert_dir)  # untouched copy for independent parameter counts
    torch.manual_seed(0)
    adapted = build_classifier(bb, K, method=method, selection=_select(bb), skip_dim=16, wiring=wiring,
                               lora_r=LORA_R)
    model = adapted.model
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if _expected_trainable(n, method, wiring)}
    assert expected, "the expectation must name some parameters"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected

    calls = {SKIP: 0, AFTER: 0}
    inner = model.base_model.model if method == "lora" else model
    hooks = [inner.get_submodule(n).register_forward_pre_hook(lambda *_a, n=n: calls.__setitem__(n, calls[n] + 1))
             for n in calls]
    before = _snapshot(model)
    summary = _fit(adapted, bb, text_data, tmp_path)
    for h in hooks:
        h.remove()
    after = _snapshot(model)

    for n in names:
        if n in expected:
            assert not torch.equal(before[n], after[n]), f"{n} should have trained"
        else:
            assert torch.equal(before[n], after[n]), f"{n} is frozen but changed"
    for n, b in model.named_buffers():
        assert torch.equal(before[n], b.cpu()), f"buffer {n} changed"

    # Parameter accounting: parameters (not buffers) of the selected block + head (+ skip projection), exactly.
    D = bb.feature_dim
    block = sum(p.numel() for p in fresh.model.get_submodule("hf.encoder.layer.1").parameters())
    backbone_total = sum(p.numel() for p in fresh.model.parameters())
    head_in = 2 * D if wiring == "concat" and method == "scl" else D
    head = head_in * K + K
    skip = D * D + D if method == "scl" and wiring != "add" else 0
    lora = sum(LORA_R * (m.in_features + m.out_features) for m in
               fresh.model.get_submodule("hf.encoder.layer.1").modules() if isinstance(m, nn.Linear))
    want = {"linear_probe": head, "finetune": block + head, "scl": block + head + skip, "lora": lora + head,
            "full": backbone_total + head}[method]
    counts = adapted.parameter_counts()
    assert counts["trainable_params"] == want == summary["trainable_params"]
    assert counts["head_params"] == head + skip
    extra = lora + head if method == "lora" else 0  # peft keeps the original head next to the trained copy
    assert counts["total_params"] == backbone_total + head + skip + extra

    # The trainable state dict holds exactly the trainable parameters (what checkpoints and eval reload).
    assert set(adapted.trainable_state_dict()) == expected

    if method == "scl" and wiring == "replace":
        assert calls[SKIP] > 0 and calls[AFTER] == 0, calls  # blocks after the skip block never run
    elif method != "linear_probe":
        assert calls[SKIP] > 0 and calls[AFTER] > 0, calls


@pytest.mark.parametrize("wiring", ["add", "concat", "replace"])
def test_scl_logits_follow_the_wiring(bert_dir, wiring) -> None:
    """h = h_L + P z_l, [h_L; P z_l] or P z_l, with z_l the pooled output of the skip block, computed by hand."""
    bb = load_bert(bert_dir)
    torch.manual_seed(0)
    adapted = build_classifier(bb, K, method="scl", selection=_select(bb), skip_dim=16, wiring=wiring)
    model = adapted.model.eval()
    inputs = bb.prepare(["the cat sat on the mat", "a dog"])
    ref = load_bert(bert_dir).model  # same weights, no hooks
    outs = {}
    h = ref.get_submodule("hf.encoder.layer.1").register_forward_hook(lambda _m, _i, o: outs.setdefault("z", o))
    with torch.no_grad():
        h_last = ref(**inputs)
        h.remove()
        z = bb.pool(outs["z"], inputs)
        pz = z if wiring == "add" else model.skip_proj(z)
        feats = {"add": h_last + pz, "concat": torch.cat([h_last, pz], 1), "replace": pz}[wiring]
        torch.testing.assert_close(model(**inputs), model.nc_head(feats))
    assert isinstance(model.skip_proj, nn.Identity) == (wiring == "add")


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_batchnorm_statistics(image_data, tmp_path, freeze_bn) -> None:
    bb = load_cnn()
    block = "blocks.2.0"
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=[block])
    adapted = build_classifier(bb, 3, method="finetune", selection=sel, freeze_bn=freeze_bn)
    model = adapted.model
    bn_buffers = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert any(n.startswith(f"backbone.{block}.") for n in bn_buffers) and len(bn_buffers) > 3
    before = _snapshot(model)
    _fit(adapted, bb, image_data, tmp_path)
    after = _snapshot(model)
    for n, _ in model.named_parameters():
        trains = n.startswith(("nc_head.", f"backbone.{block}."))
        assert torch.equal(before[n], after[n]) != trains, n
    for n, _ in model.named_buffers():
        in_block = n.startswith(f"backbone.{block}.")
        if "running_" in n and in_block and not freeze_bn:
            assert not torch.equal(before[n], after[n]), f"{n} should track the batch statistics"
        elif "num_batches_tracked" in n and in_block and not freeze_bn:
            assert int(after[n]) == int(before[n]) + 3  # 12 samples / batch 4
        else:
            assert torch.equal(before[n], after[n]), f"{n} changed"
    # BN running statistics of a trainable block are saved with the trainable weights only when they move.
    saved = adapted.trainable_state_dict()
    assert any("running_mean" in k for k in saved) == (not freeze_bn)


def test_cnn_counts_parameters_not_buffers_and_match_the_selection() -> None:
    bb = load_cnn()
    fresh = load_cnn()
    sel = select_blocks(None, bb.blocks, strategy="manual", manual=[2, 3], head_params=bb.feature_dim * 3 + 3,
                        total_params=bb.num_params() + bb.feature_dim * 3 + 3)
    adapted = build_classifier(bb, 3, method="finetune", selection=sel)
    counts = adapted.parameter_counts()
    blocks = sum(p.numel() for b in ("blocks.2.0", "blocks.3.0") for p in fresh.model.get_submodule(b).parameters())
    buffers = sum(b.numel() for b in fresh.model.get_submodule("blocks.2.0").buffers())
    assert buffers > 0
    head = bb.feature_dim * 3 + 3
    assert counts["trainable_params"] == blocks + head == sel.trainable_params
    assert counts["head_params"] == head == sel.head_params
    assert counts["total_params"] == sum(p.numel() for p in fresh.model.parameters()) + head == sel.total_params


def test_train_mode_keeps_frozen_parts_in_eval(bert_dir) -> None:
    bb = load_bert(bert_dir)
    adapted = build_classifier(bb, K, method="finetune", selection=_select(bb))
    adapted.train_mode()
    model = adapted.model
    for n, m in model.named_modules():
        trains = n == "nc_head" or n == SKIP or n.startswith(SKIP + ".")
        assert m.training == trains, n


def test_lora_adapter_from_the_pipeline_loads_with_plain_peft(bert_dir, text_csv, tmp_path) -> None:
    """``adapter/`` is a standard peft adapter: PeftModel.from_pretrained on a plain classifier reproduces the run."""
    import json

    import peft

    pytest.importorskip("datasets")
    from nc_finetune.data import load_data
    from nc_finetune.pipeline import run_pipeline

    out = tmp_path / "run"
    recipe = make_recipe(bert_dir, text_csv, **{"adapt.method": "lora", "adapt.lora_r": LORA_R, "train.epochs": 1})
    summary = run_pipeline(recipe, out, progress=False)
    assert (out / "adapter" / "adapter_config.json").is_file()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == LORA_R and all(".encoder.layer.1." in t for t in cfg["target_modules"])

    bb = load_bert(bert_dir)
    base = Classifier(bb.model, bb.feature_dim, K)  # a fresh head: the adapter must bring the trained one
    model = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    test = load_data("csv", data_files=recipe.data.data_files).test
    with torch.no_grad():
        logits = model(**bb.prepare(list(test.inputs)))
    y = torch.as_tensor(np.asarray(test.labels))
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    assert loss == pytest.approx(summary["test_loss"], abs=1e-5)
    assert float((logits.argmax(1) == y).float().mean()) == pytest.approx(summary["test_accuracy"])

    # The same logits as the model rebuilt from trainable.safetensors (what `nc-finetune eval` uses).
    from safetensors.torch import load_file

    bb2 = load_bert(bert_dir)
    rebuilt = build_classifier(bb2, K, method="lora", selection=_select(bb2), lora_r=LORA_R).model
    missing = set(load_file(str(out / "trainable.safetensors"))) - set(rebuilt.state_dict())
    assert not missing
    rebuilt.load_state_dict(load_file(str(out / "trainable.safetensors")), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**bb.prepare(list(test.inputs))), logits)


def test_lora_trains_nothing_but_adapters_and_the_head_on_a_model_with_conv_head() -> None:
    # peft picks modules_to_save by name suffix: a head named "head" would also fully train timm's `conv_head`.
    backbone = load_cnn()
    assert any(n.endswith("conv_head") for n, _ in backbone.model.named_modules())
    sel = select_blocks(None, backbone.blocks, strategy="last_k", max_blocks=1, head_params=0,
                        total_params=backbone.num_params())
    adapted = build_classifier(backbone, 3, method="lora", selection=sel)
    trainable = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or ".nc_head." in n for n in trainable), trainable


@pytest.mark.parametrize("family", ["gpt2", "llama", "phi"])
def test_lora_on_a_decoder_block_adapts_its_attention_and_mlp_projections(tmp_path, family) -> None:
    """The LoRA targets of a selected decoder layer are its q/k/v/o and MLP projections (GPT-2: the Conv1D modules
    c_attn/c_proj/c_fc, with peft's fan_in_fan_out); a merged adapter gives the logits of the unmerged one, which
    checks that the transposed Conv1D weights are handled."""
    import warnings

    from nc_finetune.backbones import load_backbone
    from tests.hf_families import BLOCK_LINEARS, make_family_dir

    torch.manual_seed(0)
    bb = load_backbone(f"hf:{make_family_dir(tmp_path, family)}")
    block = bb.blocks[1].name
    sel = _select(bb)
    plain = build_classifier(bb, K, method="finetune", selection=sel).model
    kwargs = sel.lora_kwargs(plain, head="nc_head")
    assert kwargs["target_modules"] == [f"backbone.{block}.{m}" for m in BLOCK_LINEARS[family]]
    assert kwargs.get("fan_in_fan_out", False) is (family == "gpt2")

    torch.manual_seed(0)
    bb = load_backbone(f"hf:{make_family_dir(tmp_path / 'fresh', family)}")
    inputs = bb.prepare(["the cat sat on the mat", "a dog"])
    with torch.no_grad():
        before = build_classifier(bb, K, method="finetune", selection=sel).model.backbone(**inputs)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fan_in_fan_out.*")  # peft warns when the flag is wrong
        adapted = build_classifier(bb, K, method="lora", selection=_select(bb), lora_r=LORA_R)
    model = adapted.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.base_model.model.backbone(**inputs), before)  # lora_B starts at zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
        adapted_feats = model.base_model.model.backbone(**inputs)
        assert not torch.allclose(adapted_feats, before)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged.backbone(**inputs), adapted_feats, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("first", ["lora", "scl", "finetune"])
def test_building_a_classifier_leaves_the_backbone_as_it_was(bert_dir, text_data, first) -> None:
    # A second classifier on the same backbone must not see the first one's LoRA layers, frozen parameters or hooks.
    bb = load_bert(bert_dir)
    names = [n for n, _ in bb.model.named_modules()]
    state = _snapshot(bb.model)
    inputs = bb.prepare(text_data["test"].inputs)
    with torch.no_grad():
        features = bb.model.eval()(**inputs)
    build_classifier(bb, K, method=first, selection=_select(bb), skip_dim=16, wiring="replace")
    assert [n for n, _ in bb.model.named_modules()] == names
    assert all(p.requires_grad for p in bb.model.parameters())
    assert not any(m._forward_hooks for m in bb.model.modules())
    assert all(torch.equal(v, state[k]) for k, v in _snapshot(bb.model).items())
    with torch.no_grad():
        torch.testing.assert_close(bb.model(**inputs), features)
    second = build_classifier(bb, K, method="lora", selection=_select(bb), lora_r=LORA_R)
    targets = second.model.peft_config["default"].target_modules
    assert targets and not any("lora_" in t for t in targets)
    assert sum(".lora_A." in n for n, _ in second.model.named_parameters()) == len(targets)


def test_copy_backbone_false_builds_in_place(bert_dir) -> None:
    bb = load_bert(bert_dir)
    adapted = build_classifier(bb, K, method="finetune", selection=_select(bb), copy_backbone=False)
    assert adapted.model.backbone is bb.model


def test_an_adapt_section_taken_whole_is_the_keywords_it_holds(bert_dir) -> None:
    """``build_classifier(..., cfg=recipe.adapt)``: LoRA of the section's rank, alpha and dropout, same weights."""
    from nc_finetune.config import AdaptConfig

    cfg = AdaptConfig(method="lora", lora_r=LORA_R + 1, lora_alpha=5, lora_dropout=0.25)
    torch.manual_seed(0)
    by_cfg = build_classifier(load_bert(bert_dir), K, cfg=cfg, selection=_select(load_bert(bert_dir)))
    torch.manual_seed(0)
    by_kw = build_classifier(load_bert(bert_dir), K, method="lora", selection=_select(load_bert(bert_dir)),
                             lora_r=LORA_R + 1, lora_alpha=5, lora_dropout=0.25)
    a, b = by_cfg.model.state_dict(), by_kw.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    peft_cfg = by_cfg.model.peft_config["default"]
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.lora_dropout) == (LORA_R + 1, 5, 0.25)
    with pytest.raises(TypeError, match="not both"):
        build_classifier(load_bert(bert_dir), K, method="lora", cfg=cfg)
