"""The classifier a recipe describes: ``adapt`` on the selected blocks, the SCL skip width, the head's size."""

from __future__ import annotations

from nc_finetune.adapt import AdaptedModel, build_classifier


def head_param_count(feature_dim: int, num_classes: int, head: str = "linear") -> int:
    """Trainable parameters of the new head: ``D * K + K`` for a linear head, none for the fixed ``etf`` one."""
    return 0 if head == "etf" else feature_dim * num_classes + num_classes


def build_recipe_classifier(recipe, backbone, num_classes: int, selection, probe_result, split) -> AdaptedModel:
    """The classifier of ``recipe.adapt`` on ``selection``, seeded with ``train.seed`` (shared by run, eval, predict).

    Args:
        recipe: The validated :class:`~nc_finetune.config.Recipe`.
        backbone: The :class:`~nc_finetune.backbones.Backbone` (used in place: ``copy_backbone=False``).
        num_classes: K.
        selection: The :class:`~nc_finetune.select.Selection`.
        probe_result: The probe of this backbone (gives the SCL skip width when it tapped that block).
        split: Training data; one sample measures the SCL skip width when the probe did not.
    """
    from nc_finetune.rivals import classifier_options
    from nc_finetune.utils.env import seed_everything

    skip_dim = scl_skip_dim(recipe, backbone, selection, probe_result, split)
    seed_everything(recipe.train.seed)  # the head / LoRA init must not depend on what ran before
    return build_classifier(backbone, num_classes, cfg=recipe.adapt, selection=selection, skip_dim=skip_dim,
                            copy_backbone=False, **classifier_options(recipe))


def scl_skip_dim(recipe, backbone, selection, probe_result, split) -> int | None:
    """Pooled width of the SCL skip block (the deepest selected one): from the probe, or, when ``probe.layers`` left
    that block out, from one no-grad forward of a training sample. ``None`` for the other methods."""
    import torch

    from nc_finetune.backbones.hooks import output_of

    names = [b["name"] for b in selection.blocks]
    if recipe.adapt.method != "scl" or not names:
        return None
    dims = {r["name"]: r["dim"] for r in probe_result.layers}
    if names[-1] in dims:
        return int(dims[names[-1]])
    device = next(backbone.model.parameters()).device
    inputs = {k: v.to(device) for k, v in backbone.prepare(split.subset([0]).inputs).items()}
    with torch.no_grad():
        out = output_of(backbone.model.get_submodule(names[-1]), lambda: backbone.model(**inputs),
                        name=f"block {names[-1]}")
    return int(backbone.pool(out, inputs).shape[1])
