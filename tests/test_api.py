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
