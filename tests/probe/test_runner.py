"""The probe runner against an independent path: hooks + one big batch + in-memory metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nc_finetune.probe.runner as runner
from nc_finetune.data import Split
from nc_finetune.errors import ConfigError, DataError
from nc_finetune.probe.metrics import collapse_metrics

from ..conftest import load_bert, load_cnn, make_images, make_texts

KEYS = ("nc1", "nc1_trace", "cdnv", "nc2", "ncc_accuracy")


def features_by_hand(backbone, split: Split) -> dict[str, np.ndarray]:
    """Pooled outputs of every block (and the final feature) from one forward over all samples."""
    out: dict[str, torch.Tensor] = {}
    inputs = backbone.prepare(split.inputs)
    handles = [backbone.model.get_submodule(b.name).register_forward_hook(
        lambda m, a, o, n=b.name: out.__setitem__(n, backbone.pool(o, inputs))) for b in backbone.blocks]
    try:
        with torch.no_grad():
            out["output"] = backbone.model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return {k: v.double().numpy() for k, v in out.items()}


@pytest.mark.parametrize("kind", ["cnn", "bert"])
def test_streaming_probe_equals_in_memory_metrics(kind, bert_dir):
    if kind == "cnn":
        backbone = load_cnn()
        images, labels = make_images(45, 3, seed=5)
        split = Split(images, labels)
    else:
        backbone = load_bert(bert_dir)
        texts, labels = make_texts(40, 2, seed=5)
        split = Split(texts, labels)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    result = runner.probe(backbone, split, int(labels.max()) + 1, batch_size=7, progress=False)
    expected = features_by_hand(backbone, split)
    names = [r["name"] for r in result.layers]
    assert names[: len(backbone.blocks)] == [b.name for b in backbone.blocks]
    for rec in result.layers:
        ref = collapse_metrics(expected[rec["name"]], labels)
        assert rec["dim"] == expected[rec["name"]].shape[1]
        for key in KEYS:
            assert rec[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), (rec["name"], key)
    after = backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the probe changed the model"
    assert not any(m._forward_hooks for m in backbone.model.modules()), "hooks left behind"


def test_forward_stops_after_the_deepest_tapped_block():
    backbone = load_cnn()
    images, labels = make_images(12, 3, seed=1)
    calls = {"last": 0}
    last = backbone.model.get_submodule(backbone.blocks[-1].name)
    handle = last.register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))
    try:
        result = runner.probe(backbone, Split(images, labels), 3, layers=[0, 1], progress=False)
    finally:
        handle.remove()
    assert [r["index"] for r in result.layers] == [0, 1]
    assert calls["last"] == 0


def test_bad_layers_and_labels_are_refused_before_compute():
    backbone = load_cnn()
    images, labels = make_images(12, 3, seed=1)
    with pytest.raises(ConfigError, match="block index 99 does not exist"):
        runner.probe(backbone, Split(images, labels), 3, layers=[99], progress=False)
    with pytest.raises(DataError, match="labels must lie in"):
        runner.probe(backbone, Split(images, labels + 5), 3, progress=False)


def _result_with_layers(n: int):
    from nc_finetune.probe.result import ProbeResult

    layers = [{"index": i, "name": f"blocks.{i}", "is_block": True, "dim": 64, "num_params": 1000,
               "nc1": 10.0 / (i + 1), "cdnv": 1.0, "ncc_accuracy": 0.5} for i in range(n)]
    meta = {"backbone": "timm:x", "dataset": "digits", "samples": 500, "versions": {"torch": "2"} | {
        f"pkg{i}": "1.0" for i in range(30)}, "recipe": {"probe": {"batch_size": 64}}}
    return ProbeResult(layers=layers, fit={"rho": 0.8, "r2": 0.9}, meta=meta)


def test_probe_result_repr_is_short() -> None:
    r = _result_with_layers(40)
    text = repr(r)
    assert len(text) < 200, text
    assert text == "ProbeResult(backbone='timm:x', dataset='digits', samples=500, layers=40, nc1=10->0.25, rho=0.800)"


def test_probe_result_to_pandas() -> None:
    pd = pytest.importorskip("pandas")
    r = _result_with_layers(3)
    df = r.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == 3
    assert list(df["name"]) == ["blocks.0", "blocks.1", "blocks.2"]
    assert df["nc1"].tolist() == pytest.approx([10.0, 5.0, 10.0 / 3])


def test_a_huge_ncc_samples_allocates_only_for_the_samples_there_are(monkeypatch):
    backbone = load_cnn()
    images, labels = make_images(12, 3, seed=2)
    capacities = []
    real = runner.FeatureReservoir

    def recording(capacity, **kw):
        capacities.append(capacity)
        return real(capacity, **kw)

    monkeypatch.setattr(runner, "FeatureReservoir", recording)
    huge = runner.probe(backbone, Split(images, labels), 3, ncc_samples=10**12, progress=False)
    assert set(capacities) == {12}
    plain = runner.probe(backbone, Split(images, labels), 3, ncc_samples=4096, progress=False)
    assert [r["ncc_accuracy"] for r in huge.layers] == [r["ncc_accuracy"] for r in plain.layers]


def test_the_probe_package_imports_nothing_from_transfer():
    """probe/ sits below transfer/: the scorers come in as an argument, so no import runs back up."""
    import ast
    from pathlib import Path

    package = Path(runner.__file__).parent
    imported = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.append((path.name, node.module))
            elif isinstance(node, ast.Import):
                imported += [(path.name, alias.name) for alias in node.names]
    assert [(f, m) for f, m in imported if m.startswith("nc_finetune.transfer")] == []


def test_scorers_see_each_layers_statistics_and_reservoir():
    backbone = load_cnn()
    images, labels = make_images(30, 3, seed=2)
    seen = []

    def scorer(stats, features, labels_seen):
        seen.append(features.shape)
        # Independent of the probe's own metrics: the class counts and the reservoir's size.
        return {"n_stats": float(stats.counts.sum()), "n_reservoir": float(len(labels_seen))}

    result = runner.probe(backbone, Split(images, labels), 3, layers=[0, 1], ncc_samples=20, progress=False,
                          scorers=(scorer,))
    assert len(seen) == len(result.layers) == 2  # one call per tapped block
    for rec, shape in zip(result.layers, seen, strict=True):
        assert rec["n_stats"] == 30 and rec["n_reservoir"] == 20 and shape == (20, rec["dim"])
    plain = runner.probe(backbone, Split(images, labels), 3, layers=[0], progress=False)
    assert "n_stats" not in plain.layers[0]


def test_a_probe_section_taken_whole_is_the_keywords_it_holds():
    """``probe(..., cfg=recipe.probe)`` measures as the keywords would (layers, reservoir, seed, linear probe)."""
    from nc_finetune.config import ProbeConfig

    images, labels = make_images(30, 3, seed=2)
    split = Split(images, labels)
    cfg = ProbeConfig(batch_size=5, layers=[0, 2], ncc_samples=11, linear_probe=True, seed=4, device="cpu")
    by_cfg = runner.probe(load_cnn(), split, 3, cfg=cfg, progress=False)
    by_kw = runner.probe(load_cnn(), split, 3, batch_size=5, layers=[0, 2], ncc_samples=11, linear_probe=True,
                         seed=4, device="cpu", progress=False)
    default = runner.probe(load_cnn(), split, 3, progress=False)
    assert [r["name"] for r in by_cfg.layers] == [r["name"] for r in by_kw.layers]
    assert len(by_cfg.layers) < len(default.layers)  # the section's layers, not the default "all"
    for a, b in zip(by_cfg.layers, by_kw.layers, strict=True):
        assert {k: a[k] for k in (*KEYS, "lp_accuracy")} == {k: b[k] for k in (*KEYS, "lp_accuracy")}
