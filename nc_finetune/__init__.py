"""nc-finetune: efficient fine-tuning guided by neural collapse.

The pipeline is recipe -> backbone -> probe -> select -> adapt -> train -> report. The public API is imported
lazily so that ``import nc_finetune`` (and ``nc-finetune --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "collapse_metrics": "nc_finetune.probe.metrics",
    "metrics_from_stats": "nc_finetune.probe.metrics",
    "ClassStats": "nc_finetune.probe.stats",
    "probe": "nc_finetune.probe.runner",
    "ProbeResult": "nc_finetune.probe.result",
    "load_backbone": "nc_finetune.backbones",
    "Backbone": "nc_finetune.backbones",
    "load_data": "nc_finetune.data",
    "load_recipe": "nc_finetune.config",
    "Recipe": "nc_finetune.config",
    "logme_score": "nc_finetune.transfer",
    "select_blocks": "nc_finetune.select",
    "Selection": "nc_finetune.select",
    "train_ufm": "nc_finetune.ufm",
    "ufm_optimum": "nc_finetune.ufm",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name == "probe":  # the subpackage of that name is callable (it runs probe.runner.probe): see its docstring
        return importlib.import_module("nc_finetune.probe")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nc_finetune' has no attribute {name!r}")
