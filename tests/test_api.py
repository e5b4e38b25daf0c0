"""The public top-level API resolves lazily and keeps its documented names."""

from __future__ import annotations

import numpy as np
import pytest

import nc_finetune


@pytest.mark.parametrize("name", nc_finetune.__all__)
def test_every_exported_name_resolves(name):
    assert getattr(nc_finetune, name) is not None


def test_collapse_metrics_and_logme_take_numpy():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    features = rng.normal(size=(60, 5)) + 4.0 * np.eye(5)[labels]  # separated classes
    m = nc_finetune.collapse_metrics(features, labels)
    assert {"nc1", "nc1_trace", "cdnv", "nc2", "ncc_accuracy"} <= set(m)
    assert m["ncc_accuracy"] == 1.0
    shuffled = nc_finetune.collapse_metrics(features, rng.permutation(labels))
    assert shuffled["nc1"] > 10 * m["nc1"]
    assert nc_finetune.logme_score(features, labels) > nc_finetune.logme_score(features, rng.permutation(labels))


def test_unknown_attribute():
    with pytest.raises(AttributeError):
        nc_finetune.no_such_thing  # noqa: B018


# Modules a user may import before touching the top-level API; each binds its parent package's attribute.
_FIRST_IMPORTS = ["", "nc_finetune.probe.result", "nc_finetune.select", "nc_finetune.pipeline"]


@pytest.mark.parametrize("first", _FIRST_IMPORTS)
def test_every_exported_name_is_callable_whatever_was_imported_first(first):
    import subprocess
    import sys

    code = "\n".join([
        f"import {first}" if first else "",
        "import nc_finetune as nc",
        "bad = [n for n in nc.__all__ if n != '__version__' and not callable(getattr(nc, n))]",
        "assert not bad, bad",
        "import nc_finetune.probe.result, nc_finetune.select",  # and after every subpackage is loaded
        "bad = [n for n in nc.__all__ if n != '__version__' and not callable(getattr(nc, n))]",
        "assert not bad, bad",
        "from nc_finetune import probe",
        "assert callable(probe)",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_calling_the_probe_package_runs_the_probe(bert_dir_nodrop, text_data):
    import inspect

    import nc_finetune.probe.result  # noqa: F401  (the import that used to shadow the function)
    from nc_finetune.probe.runner import probe
    from tests.conftest import load_bert

    assert list(inspect.signature(nc_finetune.probe).parameters)[:3] == ["backbone", "split", "num_classes"]
    bb = load_bert(bert_dir_nodrop)
    kw = {"batch_size": 8, "ncc_samples": 16, "device": "cpu", "progress": False}
    got = nc_finetune.probe(bb, text_data["train"], 2, **kw)
    want = probe(bb, text_data["train"], 2, **kw)
    assert [r["nc1"] for r in got.layers] == [r["nc1"] for r in want.layers]
