"""Recipe hooks of the selection: check a strategy's inputs before any compute, then compute them.

``trial`` needs its trial fine-tunes, ``shift`` a probe of the reference data, and the ``bootstrap`` of ``knee`` /
``stall`` the resampled probes; :func:`selection_inputs` computes them from a recipe and returns the keyword
arguments of :func:`~nc_finetune.select.select_blocks`. :func:`check_selection_inputs` refuses what cannot work
before the probe is paid for.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nc_finetune.errors import ConfigError, DataError


def reference_recipe(recipe, source_data=None):
    """The recipe whose data section is ``selection.reference`` (``source``: the ``backbone.init_from`` run's data;
    a mapping: ``data.*`` overrides of this recipe's data), and a label for it.

    Args:
        recipe: The recipe.
        source_data: The data section of the ``backbone.init_from`` run, read by the caller from that run's
            directory (needed for ``selection.reference=source``; selection reads no run directories).

    Raises:
        ConfigError: no reference, ``source`` without ``backbone.init_from``, or unknown data keys.
    """
    from nc_finetune.config import DataConfig, from_dict

    ref = recipe.selection.reference
    if ref is None:
        raise ConfigError("strategy 'shift' needs reference data: set selection.reference to 'source' (the "
                          "backbone.init_from run's data) or to data overrides, e.g. {corruption: null}")
    if ref == "source":
        if not recipe.backbone.init_from:
            raise ConfigError("selection.reference=source means the data of the backbone.init_from run, but "
                              "backbone.init_from is not set; give data overrides instead, e.g. {corruption: null}")
        if source_data is None:
            raise ValueError("selection.reference=source: pass the backbone.init_from run's data section")
        data = source_data
        label = f"source (the data of {recipe.backbone.init_from})"
    else:
        raw = {**dataclasses.asdict(recipe.data), **ref}
        data = from_dict(DataConfig, raw, "selection.reference")
        label = "data with " + ", ".join(f"{k}={v!r}" for k, v in ref.items())
    return dataclasses.replace(recipe, data=data), label


def check_selection_inputs(recipe, source_data=None) -> None:
    """Refuse a strategy whose inputs cannot be had, before any model compute (exit 2, one line).

    Args:
        recipe: The recipe.
        source_data: As :func:`reference_recipe`.

    Raises:
        ConfigError: as :func:`reference_recipe` (``shift``) or the trial options (``trial``).
    """
    s = recipe.selection
    if s.strategy == "shift":
        reference_recipe(recipe, source_data)
    if s.strategy == "trial":
        from nc_finetune.select.trial import check_trial_options

        check_trial_options(s.trial_steps, s.trial_samples, s.trial_score)


def selection_inputs(recipe, backbone, prepared, num_classes: int, *, source_data=None,
                     progress: bool = False) -> dict[str, Any]:
    """The computed inputs of :func:`~nc_finetune.select.select_blocks` for ``recipe.selection`` (keyword
    arguments beside ``cfg=recipe.selection``).

    Computes the relative gradient norms (``auto_rgn``), the trials (``trial``), the reference probe (``shift``)
    and the resampled probes (``bootstrap``).

    Args:
        recipe: The recipe.
        backbone: The probed backbone.
        prepared: The recipe's :class:`~nc_finetune.data.prepare.PreparedData`.
        num_classes: K.
        source_data: As :func:`reference_recipe`.
        progress: tqdm bars.

    Raises:
        DataError: the reference data has a different number of classes.
    """
    s, t, p = recipe.selection, recipe.train, recipe.probe
    kw: dict[str, Any] = {}
    if s.strategy == "auto_rgn":
        kw["rgn_scores"] = auto_rgn_block_scores(backbone, prepared.data.train, num_classes, s, t)
    if s.strategy == "trial":
        from nc_finetune.select.trial import run_trials

        kw["trial_results"] = run_trials(
            backbone, prepared.data.train, num_classes, steps=s.trial_steps, held_out_per_class=s.trial_samples,
            batch_size=t.batch_size, lr=t.lr, head_lr=t.head_lr, weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm, seed=s.seed, device=t.device,
            cache_prefix=t.cache_prefix != "off" and not t.augment, freeze_bn=recipe.adapt.freeze_bn,
            score=s.trial_score)
    if s.strategy == "shift":
        from nc_finetune.data.prepare import prepare_data
        from nc_finetune.probe.runner import probe

        ref_recipe, label = reference_recipe(recipe, source_data)
        ref = prepare_data(ref_recipe)
        if ref.data.num_classes != num_classes:
            raise DataError(f"selection.reference has {ref.data.num_classes} classes, the target data "
                            f"{num_classes}: the shift rule compares collapse of the same classes")
        kw["reference_probe"] = probe(backbone, ref.probe_split, num_classes,
                                      cfg=dataclasses.replace(p, linear_probe=False), progress=progress,
                                      meta={"reference": label, "dataset": ref.data.name})
    if s.bootstrap:
        from nc_finetune.select.bootstrap import bootstrap_probes, collect_block_features

        feats, labels = collect_block_features(backbone, prepared.probe_split, layers=p.layers,
                                               batch_size=p.batch_size, device=p.device)
        kw["bootstrap_probes"] = bootstrap_probes(feats, labels, backbone.blocks, num_classes, s.bootstrap, s.seed)
    return kw


def auto_rgn_batches(backbone, split, cfg) -> list[tuple[dict[str, Any], Any]]:
    """The mini-batches on which strategy ``auto_rgn`` measures gradients: ``cfg.rgn_batches`` draws of
    ``cfg.rgn_batch_size`` samples without replacement (each draw independent, seeded by ``cfg.seed``).

    Args:
        backbone: Prepares the raw inputs.
        split: The training split.
        cfg: The recipe's :class:`~nc_finetune.config.SelectionConfig`.

    Returns:
        ``[(prepared inputs, labels (B,) int64)]``, on the CPU until scored.
    """
    import numpy as np
    import torch

    rng = np.random.default_rng(cfg.seed)
    labels = np.asarray(split.labels)
    batches = []
    for _ in range(cfg.rgn_batches):
        idx = rng.choice(len(split), size=min(cfg.rgn_batch_size, len(split)), replace=False)
        batches.append((backbone.prepare(split.subset(idx).inputs),
                        torch.as_tensor(labels[idx], dtype=torch.long, device="cpu")))
    return batches


def auto_rgn_block_scores(backbone, split, num_classes: int, cfg, train) -> dict[int, float]:
    """Per-block Auto-RGN scores (:func:`~nc_finetune.select.auto_rgn_scores`) of ``backbone`` with a new head.

    The gradients are measured on a temporary classifier that trains every parameter (``full``), built on the
    backbone itself (no copy) and undone afterwards: the backbone is left trainable and on the CPU, as loaders hand
    it out.

    Args:
        backbone: The :class:`~nc_finetune.backbones.Backbone`.
        split: The training split.
        num_classes: K.
        cfg: The recipe's :class:`~nc_finetune.config.SelectionConfig` (batches and seed).
        train: The recipe's :class:`~nc_finetune.config.TrainConfig` (seed of the head, device).
    """
    from nc_finetune.adapt import build_classifier
    from nc_finetune.select.strategies import auto_rgn_scores
    from nc_finetune.utils.env import resolve_device, seed_everything

    seed_everything(train.seed)
    tmp = build_classifier(backbone, num_classes, method="full", copy_backbone=False)  # restored below
    tmp.model.to(resolve_device(train.device))  # the new head is built on the CPU
    batches = auto_rgn_batches(backbone, split, cfg)
    scores = auto_rgn_scores(tmp.model, backbone.blocks, batches, num_batches=cfg.rgn_batches)
    tmp.model.requires_grad_(True).to("cpu")  # loaders hand out CPU models; the trainer moves it
    return scores
