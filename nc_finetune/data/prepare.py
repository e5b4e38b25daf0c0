"""A recipe's data, loaded and checked, with the stratified probe subset drawn: what every stage starts from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nc_finetune.errors import DataError

if TYPE_CHECKING:
    from nc_finetune.config import Recipe
    from nc_finetune.data.base import ClassificationData, Split


@dataclass
class PreparedData:
    """The loaded dataset plus the stratified probe subset of its training split."""

    data: ClassificationData
    probe_split: Split


def load_recipe_data(recipe: Recipe) -> ClassificationData:
    """Load and validate the recipe's dataset, drawing no probe subset (on a stream that draw is a pass over the
    training split, which scoring the test split does not need).

    Raises:
        DataError: unusable data (see :func:`nc_finetune.data.validate_split`) or a class count that disagrees
            with ``data.num_classes``.
    """
    from nc_finetune.data import StreamSplit, load_data, validate_split

    d = recipe.data
    data = load_data(cfg=d)
    if d.num_classes is not None and d.num_classes != data.num_classes:
        raise DataError(f"data.num_classes is {d.num_classes} but '{d.name}' has {data.num_classes} classes "
                        f"({', '.join(map(str, data.class_names[:10]))}{' ...' if data.num_classes > 10 else ''})")
    if not isinstance(data.train, StreamSplit):  # a stream is checked as it is read
        validate_split(data.train, data.num_classes, f"data '{d.name}' split '{d.train_split}'")
    return data


def prepare_data(recipe: Recipe) -> PreparedData:
    """Load and validate the dataset, then draw the probe subset (all before any model compute).

    Raises:
        DataError: unusable data (see :func:`nc_finetune.data.validate_split`) or a class count that disagrees
            with ``data.num_classes``.
    """
    from nc_finetune.data import per_class_sample, validate_split

    data = load_recipe_data(recipe)
    probe_split = per_class_sample(data.train, recipe.probe.samples_per_class, recipe.probe.seed)
    validate_split(probe_split, data.num_classes, f"probe subset of '{recipe.data.name}' (probe.samples_per_class)")
    return PreparedData(data=data, probe_split=probe_split)
