"""Classification metrics from a confusion matrix, and the class balance of the training data.

The trainer accumulates a K x K confusion matrix per rank and sums it across ranks (it is additive, like the
probe's statistics); every metric here is a function of that matrix, so a sharded evaluation equals one process.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

#: Majority share of the training data above which the trainer warns that accuracy alone is misleading.
IMBALANCE_WARNING = 0.6


def confusion_counts(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(K, K)`` int64 counts, rows = true class, columns = predicted class."""
    flat = y_true.long() * num_classes + y_pred.long()  # (B,)
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def metrics_from_confusion(cm: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class accuracy (recall) and the matrix itself.

    Macro-F1 averages the per-class F1 = 2 TP / (2 TP + FP + FN) over the classes that occur as a label or a
    prediction (as ``sklearn.metrics.f1_score(average="macro")``). A class without samples has a per-class accuracy
    of NaN (``null`` in JSON).

    Args:
        cm: ``(K, K)`` counts, rows = true class, columns = predicted class.

    Returns:
        ``{"accuracy", "macro_f1", "per_class_accuracy", "confusion_matrix"}`` (plain Python types).
    """
    cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.int64)
    total = int(cm.sum())
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)  # true samples per class
    predicted = cm.sum(axis=0)
    occurs = (support + predicted) > 0
    f1 = 2 * tp[occurs] / (support[occurs] + predicted[occurs])  # 2TP / (2TP + FP + FN)
    per_class = [float(tp[k] / support[k]) if support[k] else math.nan for k in range(len(cm))]
    return {
        "accuracy": float(tp.sum() / total) if total else math.nan,
        "macro_f1": float(f1.mean()) if occurs.any() else math.nan,
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
    }


def balanced_class_weights(labels: np.ndarray | None, num_classes: int, counts: np.ndarray | None = None) -> np.ndarray:
    """``N / (K * n_k)`` per class (sklearn's ``compute_class_weight("balanced")``); 0 for an absent class.
    ``counts`` (examples per class) replaces ``labels`` when given (a streamed split)."""
    if counts is None:
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    counts = np.asarray(counts).astype(np.float64)
    weights = np.zeros(num_classes)
    present = counts > 0
    weights[present] = counts.sum() / (num_classes * counts[present])
    return weights


def imbalance_message(labels: np.ndarray | None, num_classes: int, class_weights: str | None,
                      counts: np.ndarray | None = None) -> str | None:
    """A one-line warning when the majority class exceeds :data:`IMBALANCE_WARNING` of the training data
    (``counts``, examples per class, replaces ``labels`` when given)."""
    if counts is None:
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    if counts.sum() == 0:
        return None
    k = int(counts.argmax())
    share = counts[k] / counts.sum()
    if share <= IMBALANCE_WARNING:
        return None
    advice = "" if class_weights == "balanced" else "; consider train.class_weights=balanced"
    return (f"class {k} is {100 * share:.0f}% of the training data: read macro_f1 and per_class_accuracy in "
            f"summary.json, not accuracy alone{advice}")
