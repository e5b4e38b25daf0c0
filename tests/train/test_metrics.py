"""Classification metrics against scikit-learn on known predictions; class weights; the imbalance warning; the
trainer's summary.json metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from nc_finetune.train.metrics import (
    balanced_class_weights,
    confusion_counts,
    imbalance_message,
    metrics_from_confusion,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")

CASES = {
    # name: (y_true, y_pred, K)
    "three-classes": ([0, 0, 0, 1, 1, 2, 2, 2, 2, 1], [0, 1, 0, 1, 2, 2, 2, 0, 2, 1], 3),
    "never-predicted": ([0, 1, 2, 2, 1, 0], [0, 0, 0, 0, 1, 1], 3),
    "predicted-but-absent": ([0, 0, 1, 1], [0, 3, 1, 1], 4),  # class 2 occurs nowhere: left out of macro-F1
    "all-right": ([1, 0, 1], [1, 0, 1], 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_metrics_match_sklearn(case) -> None:
    y, p, K = CASES[case]
    cm = confusion_counts(torch.tensor(y), torch.tensor(p), K)
    np.testing.assert_array_equal(cm.numpy(), sklearn_metrics.confusion_matrix(y, p, labels=list(range(K))))
    m = metrics_from_confusion(cm)
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(y, p, average="macro", zero_division=0))
    recall = sklearn_metrics.recall_score(y, p, average=None, labels=list(range(K)), zero_division=0)
    for k in range(K):
        if k in y:
            assert m["per_class_accuracy"][k] == pytest.approx(recall[k])
        else:
            assert math.isnan(m["per_class_accuracy"][k])
    assert m["confusion_matrix"] == cm.tolist()


def test_summed_shards_equal_the_whole() -> None:
    y, p, K = CASES["three-classes"]
    y, p = torch.tensor(y), torch.tensor(p)
    whole = confusion_counts(y, p, K)
    assert torch.equal(confusion_counts(y[::2], p[::2], K) + confusion_counts(y[1::2], p[1::2], K), whole)


def test_balanced_class_weights_match_sklearn() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 7 + [1] * 2 + [2] * 1)
    want = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    np.testing.assert_allclose(balanced_class_weights(labels, 3), want)
    assert balanced_class_weights(np.array([0, 0, 1]), 3)[2] == 0.0  # an absent class


def test_imbalance_message() -> None:
    assert imbalance_message(np.array([0] * 6 + [1] * 4), 2, None) is None  # 60% exactly: fine
    msg = imbalance_message(np.array([0] * 3 + [1] * 7), 2, None)
    assert msg.startswith("class 1 is 70% of the training data") and "class_weights=balanced" in msg
    assert "consider" not in imbalance_message(np.array([1] * 7 + [0] * 3), 2, "balanced")


def test_trainer_summary_has_class_metrics_and_balanced_weights_change_training(bert_dir, text_data,
                                                                                 tmp_path) -> None:
    from nc_finetune.data import Split
    from tests.train.test_trainer import _trainer

    t, adapted = _trainer(bert_dir, text_data, tmp_path / "plain", epochs=1)
    summary = t.fit()
    K = 2
    cm = np.array(summary["test_confusion_matrix"])
    assert cm.shape == (K, K) and cm.sum() == summary["test_samples"] == len(text_data["test"])
    # Independently: the model's own predictions on the test split.
    bb_inputs = t.backbone.prepare(text_data["test"].inputs)
    with torch.no_grad():
        adapted.model.eval()
        pred = adapted.model(**bb_inputs).argmax(1).numpy()
    y = np.asarray(text_data["test"].labels)
    np.testing.assert_array_equal(cm, sklearn_metrics.confusion_matrix(y, pred, labels=[0, 1]))
    assert summary["test_macro_f1"] == pytest.approx(sklearn_metrics.f1_score(y, pred, average="macro"))
    assert summary["test_accuracy"] == pytest.approx(float(np.mean(y == pred)))
    assert summary["val_macro_f1"] is not None and np.sum(summary["val_confusion_matrix"]) == len(text_data["val"])
    assert json.loads(json.dumps(summary))["test_per_class_accuracy"] == summary["test_per_class_accuracy"]

    # 12 of 16 training samples in class 0: a warning, and balanced weights train another model.
    labels = np.asarray(text_data["train"].labels).copy()
    labels[np.flatnonzero(labels == 1)[:12 - int((labels == 0).sum())]] = 0
    assert np.bincount(labels).tolist() == [12, 4]
    skewed = {**text_data, "train": Split(text_data["train"].inputs, labels)}
    a, adapted_a = _trainer(bert_dir, skewed, tmp_path / "a", epochs=1)
    b, adapted_b = _trainer(bert_dir, skewed, tmp_path / "b", epochs=1, class_weights="balanced")
    torch.testing.assert_close(b.class_weights, torch.tensor([16 / 24, 16 / 8]))
    with pytest.warns(UserWarning, match=r"class 0 is 75% of the training data"):
        a.fit()
    with pytest.warns(UserWarning, match="not accuracy alone$"):  # no advice to do what is done
        b.fit()
    wa, wb = adapted_a.trainable_state_dict(), adapted_b.trainable_state_dict()
    assert any(not torch.allclose(wa[k], wb[k]) for k in wa)
