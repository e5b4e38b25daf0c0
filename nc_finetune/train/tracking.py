"""Experiment tracking (``train.report_to``) through accelerate's trackers: TensorBoard, Weights & Biases.

accelerate silently drops a tracker whose package is missing, so :func:`check_trackers` refuses it first, with one
line naming the package to install. TensorBoard event files go to ``<run dir>/nc-finetune/``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from nc_finetune.errors import ConfigError

#: ``train.report_to`` name -> (module that must be importable, how to install it).
TRACKERS = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}
PROJECT = "nc-finetune"


def check_trackers(report_to: list[str]) -> None:
    """Raises ConfigError for a tracker that is unknown or whose package is not installed."""
    for name in report_to:
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        module, install = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.report_to: {name} is not installed ({install}), or remove it from report_to")


def accelerate_trackers(report_to: list[str]) -> list[Any]:
    """What ``Accelerator(log_with=...)`` receives (tracker names; tests put a custom tracker here)."""
    return list(report_to)


def tracker_config(cfg: Any) -> dict[str, Any]:
    """The training config as flat scalars (TensorBoard's hyper-parameters take no ``None`` or lists)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in dataclasses.asdict(cfg).items()}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a ``metrics.jsonl`` record, named ``train/loss``, ``val/macro_f1``, ..."""
    prefix = record.get("split", "train")
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k not in ("step", "epoch", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
