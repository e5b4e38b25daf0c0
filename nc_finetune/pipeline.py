"""Recipe-level stages: each reads a validated recipe, does one stage and writes its artefact to the run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nc_finetune.config import Recipe, dump_recipe, recipe_to_dict
from nc_finetune.errors import DataError, UserError
from nc_finetune.utils.io import write_text_atomic


@dataclass
class PreparedData:
    """The loaded dataset plus the stratified probe subset of its training split."""

    data: object  # nc_finetune.data.ClassificationData
    probe_split: object  # nc_finetune.data.Split


def check_out_dir(out: Path, artefacts: list[str], overwrite: bool) -> None:
    """Refuse to clobber existing artefacts unless asked to.

    Raises:
        UserError: an artefact already exists and ``overwrite`` is false.
    """
    existing = [name for name in artefacts if (out / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{out} already holds {', '.join(existing)}; choose another --out or pass --overwrite")


def prepare_data(recipe: Recipe) -> PreparedData:
    """Load and validate the dataset, then draw the probe subset (all before any model compute).

    Raises:
        DataError: unusable data (see :func:`nc_finetune.data.validate_split`) or a class count that disagrees
            with ``data.num_classes``.
    """
    from nc_finetune.data import load_data, subsample_per_class, validate_split

    d = recipe.data
    data = load_data(d.name, train_split=d.train_split, test_split=d.test_split, text_column=d.text_column,
                     image_column=d.image_column, label_column=d.label_column, data_files=d.data_files,
                     max_train_samples=d.max_train_samples, max_eval_samples=d.max_eval_samples, seed=d.seed,
                     test_size=d.test_size)
    if d.num_classes is not None and d.num_classes != data.num_classes:
        raise DataError(f"data.num_classes is {d.num_classes} but '{d.name}' has {data.num_classes} classes "
                        f"({', '.join(map(str, data.class_names[:10]))}{' ...' if data.num_classes > 10 else ''})")
    validate_split(data.train, data.num_classes, f"data '{d.name}' split '{d.train_split}'")
    idx = subsample_per_class(np.asarray(data.train.labels), recipe.probe.samples_per_class, recipe.probe.seed)
    probe_split = data.train.subset(idx)
    validate_split(probe_split, data.num_classes, f"probe subset of '{d.name}' (probe.samples_per_class)")
    return PreparedData(data=data, probe_split=probe_split)


def load_recipe_backbone(recipe: Recipe):
    """Build the backbone named by ``recipe.backbone``."""
    from nc_finetune.backbones import load_backbone

    b = recipe.backbone
    return load_backbone(b.name, pooling=b.pooling, image_size=b.image_size, max_length=b.max_length,
                         pretrained=b.pretrained)


def run_probe_stage(recipe: Recipe, out: Path | None, *, overwrite: bool = False, progress: bool = True,
                    prepared: PreparedData | None = None, backbone=None):
    """Probe every block of the recipe's backbone on its training data; write ``probe.json`` and ``probe.png``.

    Args:
        recipe: Validated recipe.
        out: Run directory (``None``: write nothing).
        overwrite: Allow replacing existing artefacts.
        progress: tqdm progress bars.
        prepared: Data already loaded by the caller (``run`` reuses it for training).
        backbone: A backbone already built by the caller.

    Returns:
        The :class:`~nc_finetune.probe.result.ProbeResult`.
    """
    from nc_finetune.probe.runner import probe
    from nc_finetune.report.plots import plot_probe

    if out is not None:
        check_out_dir(out, ["probe.json", "probe.png"], overwrite)
    prepared = prepared or prepare_data(recipe)
    backbone = backbone or load_recipe_backbone(recipe)
    data = prepared.data
    p = recipe.probe
    meta = {"dataset": data.name, "class_names": list(data.class_names), "samples_per_class": p.samples_per_class,
            "data_info": data.info, "recipe": recipe_to_dict(recipe)}
    result = probe(backbone, prepared.probe_split, data.num_classes, batch_size=p.batch_size, layers=p.layers,
                   ncc_samples=p.ncc_samples, linear_probe=p.linear_probe, autocast=p.autocast, device=p.device,
                   seed=p.seed, progress=progress, meta=meta)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "resolved.yaml", dump_recipe(recipe))
        result.save(out / "probe.json")
        plot_probe(result, out / "probe.png")
    return result
