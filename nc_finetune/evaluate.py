"""Score a finished run: the checks of ``nc-finetune eval`` and the evaluation of the model rebuilt from its
artefacts (:func:`nc_finetune.pipeline.eval_stage` composes them)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from nc_finetune.errors import ConfigError, DataError, UserError

if TYPE_CHECKING:
    from nc_finetune.config import Recipe
    from nc_finetune.runs import RunDir

#: The splits ``eval`` scores.
EVAL_SPLITS = ("test", "train")


def check_eval_options(split: str, batch_size: int | None, data_overrides: list[str] | None) -> None:
    """Refuse an unknown split, a batch size below 1 or an override outside ``data.*``, before anything loads.

    Raises:
        UserError: ``split`` is not one of :data:`EVAL_SPLITS`.
        ConfigError: ``batch_size`` < 1, or an override of a section that describes the trained model.
    """
    if split not in EVAL_SPLITS:
        raise UserError(f"eval --split must be one of {', '.join(EVAL_SPLITS)}; got {split!r}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"eval --batch-size must be >= 1; got {batch_size}")
    for item in data_overrides or []:
        if not item.split("=", 1)[0].strip().startswith("data."):
            raise ConfigError(f"eval accepts only data.* overrides (the rest describes the trained model); "
                              f"got {item!r}")


def eval_recipe(run: RunDir, data_overrides: list[str] | None, batch_size: int | None) -> Recipe:
    """The run's recipe with ``data_overrides`` and the evaluation batch size (no prefix cache: nothing trains)."""
    recipe = run.read_recipe(data_overrides)
    if batch_size is not None:
        recipe.train.eval_batch_size = batch_size
    recipe.train.cache_prefix = "off"
    return recipe


def trained_classes_of(run: RunDir, probe_result, data):
    """``data`` with its classes in the order of the run's head outputs.

    Raises:
        DataError: ``data`` has a different number of classes than the run trained on, or other names.
    """
    from nc_finetune.labels import align_class_names, run_class_names

    trained = probe_result.meta.get("class_names")
    if trained is not None and len(trained) != data.num_classes:
        raise DataError(f"{run.path} was trained on {len(trained)} classes; data '{data.name}' has "
                        f"{data.num_classes}")
    return align_class_names(run_class_names(run.path), data, str(run.path))


def load_trained_weights(adapted, weights: dict[str, Any], run_dir: Path) -> None:
    """Load a run's ``trainable.safetensors`` into the classifier rebuilt from its recipe (the frozen rest came
    with the backbone).

    Raises:
        UserError: a tensor the rebuilt model does not have.
    """
    unexpected = set(weights) - set(adapted.model.state_dict())
    if unexpected:
        raise UserError(f"{run_dir}/trainable.safetensors does not fit the rebuilt model ({sorted(unexpected)[0]})")
    adapted.model.load_state_dict(weights, strict=False)


def score_split(recipe: Recipe, backbone, adapted, data, split: str, run_dir: Path) -> dict[str, Any]:
    """Evaluate ``adapted`` on ``split`` of ``data`` as training evaluated it (the run's eval batch size, device
    and autocast).

    Returns:
        ``{"split", "accuracy", "loss", "samples", ...}`` (:meth:`~nc_finetune.train.loop.Trainer.evaluate`).
    """
    from nc_finetune.train.loop import TrainData, Trainer

    splits = {"test": data.test, "train": data.train}
    trainer = Trainer(adapted, backbone, TrainData(train=data.train, test=data.test), recipe.train, run_dir,
                      progress=False)
    adapted.model.to(trainer.device)
    return {"split": split, **trainer.evaluate(split, splits[split])}
