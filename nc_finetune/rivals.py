"""Recipe glue for the faithful rivals and the collapse-inducing options (issue 9, items 4 and 5).

The pieces live where they belong (``select/cka.py``, ``select/lisa.py``, ``train/auto_rgn.py``, ``train/lisa.py``,
``adapt/etf.py``, ``train/nc1_penalty.py``); this module only turns a recipe into their arguments and checks the
recipe's values before anything is loaded or computed:

* :func:`check_rival_options`: the combination checks (kept in :mod:`nc_finetune.config`, which
  :func:`~nc_finetune.config.load_recipe` runs too) and, with the backbone's width, ``adapt.head=etf``; called by
  the pipeline before the probe;
* :func:`selection_inputs`: the extra inputs a strategy needs (``cka``: one dedicated pass over the probe data);
* :func:`classifier_options`: the keyword arguments of :func:`nc_finetune.adapt.build_classifier`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nc_finetune.errors import ConfigError

if TYPE_CHECKING:
    from nc_finetune.config import Recipe


def check_rival_options(recipe: Recipe, feature_dim: int | None = None, num_classes: int | None = None) -> None:
    """Refuse impossible combinations of the rivals' options
    (:func:`~nc_finetune.config.check_rival_combinations`; their values are checked by the sections) and what they
    cannot do with this backbone and K.

    Args:
        recipe: The recipe.
        feature_dim: Width of the backbone's final feature, once known (checks ``adapt.head=etf``).
        num_classes: K, once known.

    Raises:
        ConfigError: naming the key and what is allowed.
    """
    from nc_finetune.config import check_rival_combinations

    check_rival_combinations(recipe)
    if (recipe.adapt.head == "etf" and feature_dim is not None and num_classes is not None
            and feature_dim < num_classes - 1):
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
    """Keyword arguments of :func:`~nc_finetune.adapt.build_classifier` beside the adapt section: the rival adapt
    modes' options and seeds, which live in the selection and train sections."""
    s = recipe.selection
    return {"head_seed": recipe.train.seed, "rgn_batches": s.rgn_batches, "lisa_interval": s.lisa_interval,
            "lisa_seed": s.seed}
