"""Recipe glue for the faithful rivals and the collapse-inducing options (issue 9, items 4 and 5).

The pieces live where they belong (``select/cka.py``, ``select/lisa.py``, ``train/auto_rgn.py``, ``train/lisa.py``,
``adapt/etf.py``, ``train/nc1_penalty.py``); this module only turns a recipe into their arguments and checks the
recipe's values before anything is loaded or computed:

* :func:`check_rival_options`: value and combination checks (one ``ConfigError`` line each), called by
  :func:`nc_finetune.config.load_recipe`, and with the backbone's width by the pipeline before the probe;
* :func:`selection_inputs`: the extra inputs a strategy needs (``cka``: one dedicated pass over the probe data);
* :func:`classifier_options`: the keyword arguments of :func:`nc_finetune.adapt.build_classifier`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from nc_finetune.errors import ConfigError

if TYPE_CHECKING:
    from nc_finetune.config import Recipe


def _positive_int(value: Any, key: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"recipe key '{key}' must be an integer >= {minimum}; got {value!r}")


def check_rival_options(recipe: Recipe, feature_dim: int | None = None, num_classes: int | None = None) -> None:
    """Refuse impossible values and combinations of the rivals' options.

    Args:
        recipe: The recipe.
        feature_dim: Width of the backbone's final feature, once known (checks ``adapt.head=etf``).
        num_classes: K, once known.

    Raises:
        ConfigError: naming the key and what is allowed.
    """
    s, a, t = recipe.selection, recipe.adapt, recipe.train
    _positive_int(s.rgn_batches, "selection.rgn_batches", 1)
    _positive_int(s.cka_samples, "selection.cka_samples", 2)
    _positive_int(s.lisa_interval, "selection.lisa_interval", 1)
    if not (math.isfinite(t.nc1_penalty) and t.nc1_penalty >= 0):
        raise ConfigError(f"recipe key 'train.nc1_penalty' must be a finite number >= 0; got {t.nc1_penalty!r}")
    if not (math.isfinite(a.etf_scale) and a.etf_scale > 0):
        raise ConfigError(f"recipe key 'adapt.etf_scale' must be a finite number > 0; got {a.etf_scale!r}")
    if a.method == "lisa" and s.strategy != "lisa":
        raise ConfigError(f"adapt.method=lisa draws its own blocks: set selection.strategy=lisa (got "
                          f"{s.strategy!r}); selection.max_blocks is the number of blocks trained at a time")
    if a.head == "etf" and a.method == "linear_probe":
        raise ConfigError("adapt.head=etf is fixed, so adapt.method=linear_probe would train nothing; tune blocks "
                          "(e.g. adapt.method=finetune) or use adapt.head=linear")
    if t.nc1_penalty > 0 and a.method == "linear_probe":
        raise ConfigError("train.nc1_penalty needs a tuned block; adapt.method=linear_probe tunes none")
    if a.head == "etf" and feature_dim is not None and num_classes is not None and feature_dim < num_classes - 1:
        raise ConfigError(f"adapt.head=etf needs a feature width of at least K-1 = {num_classes - 1} for "
                          f"{num_classes} classes; {recipe.backbone.name} gives {feature_dim}: use adapt.head=linear")


def selection_inputs(recipe: Recipe, backbone, prepared) -> dict[str, Any]:
    """Extra keyword arguments of :func:`~nc_finetune.select.select_blocks` for the recipe's strategy."""
    s, p = recipe.selection, recipe.probe
    if s.strategy == "cka":
        from nc_finetune.select.cka import block_cka

        return {"cka_scores": block_cka(backbone, prepared.probe_split, batch_size=p.batch_size,
                                        max_samples=s.cka_samples, device=p.device, seed=p.seed)}
    return {}


def classifier_options(recipe: Recipe) -> dict[str, Any]:
    """Keyword arguments of :func:`~nc_finetune.adapt.build_classifier` for the head and the rival adapt modes."""
    a, s = recipe.adapt, recipe.selection
    return {"head": a.head, "etf_scale": a.etf_scale, "head_seed": recipe.train.seed, "rgn_batches": s.rgn_batches,
            "lisa_interval": s.lisa_interval, "lisa_seed": s.seed}
