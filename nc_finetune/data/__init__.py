"""Downstream classification data: built-in offline datasets and Hugging Face ``datasets`` sources.

:func:`load_data` is the single entry point. It returns a :class:`ClassificationData` whose splits have already
been sub-sampled (stratified, seeded) and validated, so that unusable data fails before any model compute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nc_finetune.data.base import (
    ClassificationData,
    Split,
    stratified_split,
    stratified_subsample,
    subsample_per_class,
    validate_split,
)
from nc_finetune.data.builtin import BUILTIN_DATASETS, load_builtin
from nc_finetune.data.corrupt import CORRUPTIONS, check_corruption, corrupt_split_inputs
from nc_finetune.data.hf import LOCAL_BUILDERS, LazyImageColumn, is_hf_name, load_hf
from nc_finetune.data.streaming import StreamSplit, load_streaming, per_class_sample
from nc_finetune.errors import ConfigError, DataError, UserError

if TYPE_CHECKING:
    from nc_finetune.config import DataConfig

__all__ = [
    "BUILTIN_DATASETS",
    "CORRUPTIONS",
    "ClassificationData",
    "LazyImageColumn",
    "Split",
    "StreamSplit",
    "load_data",
    "per_class_sample",
    "stratified_split",
    "stratified_subsample",
    "subsample_per_class",
    "validate_data",
    "validate_split",
]


#: The arguments of :func:`load_data` that a recipe's data section holds under the same names.
_SECTION_ARGUMENTS = ("name", "train_split", "test_split", "text_column", "image_column", "label_column", "data_files",
                      "max_train_samples", "max_eval_samples", "seed", "test_size", "corruption",
                      "corruption_severity", "streaming", "labels")


def load_data(
    name: str | None = None,
    *,
    train_split: str = "train",
    test_split: str = "test",
    text_column: str | None = None,
    image_column: str | None = None,
    label_column: str = "label",
    data_files: dict | str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    test_size: float = 0.2,
    corruption: str | None = None,
    corruption_severity: int = 3,
    streaming: bool = False,
    labels: list[str] | None = None,
    cfg: DataConfig | None = None,
) -> ClassificationData:
    """Load, sub-sample and validate a classification dataset.

    Args:
        name: A built-in name (see :data:`BUILTIN_DATASETS`), ``hf:<hub id>[:<config>]``, or one of ``csv``,
            ``json``, ``parquet``, ``imagefolder`` with ``data_files``.
        train_split: Split to train on (built-ins have ``train`` and ``test``).
        test_split: Split to evaluate on; for HF sources with only a train split, a stratified test split of
            ``test_size`` is carved out with ``seed``.
        text_column: HF sources only: text column (default ``text`` or ``sentence``).
        image_column: HF sources only: image column (default ``image`` or ``img``).
        label_column: HF sources only: label column.
        data_files: Local builders only: a path or ``{split: path}``.
        max_train_samples: Keep a stratified (per-class proportional) subsample of this size, chosen with ``seed``.
        max_eval_samples: The same for the test split.
        seed: Seed for the sub-samples and an auto test split. Built-in splits are fixed and ignore it.
        test_size: Held-out share for an auto test split, in (0, 1).
        corruption: Image datasets only: an input-level shift applied to both splits after sub-sampling, one of
            :data:`~nc_finetune.data.corrupt.CORRUPTIONS` (CIFAR-10-C style); ``None`` leaves the images alone.
        corruption_severity: 1..5.
        streaming: HF sources only: read as streams (:mod:`nc_finetune.data.streaming`); an unsampled split is then
            a :class:`StreamSplit`.
        labels: With ``streaming``: the class names, so that the label set needs no pass over the data.
        cfg: A recipe's data section, taken whole, instead of ``name``: every argument above is its field of the
            same name.

    Returns:
        The validated dataset; ``info`` records the source, sizes, seed and split rule.

    Raises:
        UserError: Unknown name or a missing data package.
        ConfigError: Arguments that do not apply or are out of range.
        DataError: A split, column or labels that cannot be used (one line naming the split).
    """
    if cfg is not None:
        if name is not None:
            raise TypeError("load_data takes a name or cfg= (the data section holds the name), not both")
        return load_data(**{key: getattr(cfg, key) for key in _SECTION_ARGUMENTS})
    if name is None:
        raise TypeError("load_data needs a dataset name (or cfg=, a recipe's data section)")
    for arg, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
        if value is not None and value < 1:
            raise ConfigError(f"{arg} must be >= 1 or unset, got {value}")
    if not 0.0 < test_size < 1.0:
        raise ConfigError(f"test_size must be in (0, 1), got {test_size}")
    if train_split == test_split:
        raise ConfigError(f"train_split and test_split are both {train_split!r}; evaluation needs held-out data")
    check_corruption(corruption, corruption_severity)
    if streaming and not is_hf_name(name):
        raise ConfigError(f"data.streaming applies to HF sources (hf:<id>, {', '.join(LOCAL_BUILDERS)}); "
                          f"{name!r} is not one")
    if streaming and corruption is not None:
        raise ConfigError("data.corruption cannot be combined with data.streaming")
    if labels is not None and not streaming:
        raise ConfigError("data.labels applies with data.streaming=true")

    if streaming:
        data = load_streaming(name, train_split=train_split, test_split=test_split, text_column=text_column,
                              image_column=image_column, label_column=label_column, data_files=data_files,
                              labels=labels, max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
                              seed=seed, test_size=test_size)
    elif name in BUILTIN_DATASETS:
        given = {"text_column": text_column, "image_column": image_column, "data_files": data_files}
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise ConfigError(f"data {name!r} is built in; {', '.join(extra)} only apply to HF/local sources")
        data = _builtin_splits(name, train_split, test_split)
        full_sizes = {"train": len(data.train), "test": len(data.test)}
        if max_train_samples is not None and max_train_samples < len(data.train):
            data.train = data.train.subset(stratified_subsample(data.train.labels, max_train_samples, seed))
        if max_eval_samples is not None and max_eval_samples < len(data.test):
            data.test = data.test.subset(stratified_subsample(data.test.labels, max_eval_samples, seed))
        data.info["full_sizes"] = full_sizes
    elif is_hf_name(name):
        data = load_hf(
            name,
            train_split=train_split,
            test_split=test_split,
            text_column=text_column,
            image_column=image_column,
            label_column=label_column,
            data_files=data_files,
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            seed=seed,
            test_size=test_size,
        )
    else:
        raise UserError(
            f"unknown dataset {name!r}; choose a built-in ({', '.join(BUILTIN_DATASETS)}), hf:<hub id>, "
            f"or {', '.join(LOCAL_BUILDERS)} with data_files"
        )

    if corruption is not None:
        if data.modality != "image":
            raise ConfigError(f"data.corruption applies to image datasets; {name!r} is {data.modality}")
        data.train.inputs = corrupt_split_inputs(data.train.inputs, corruption, corruption_severity, seed, stream=0)
        data.test.inputs = corrupt_split_inputs(data.test.inputs, corruption, corruption_severity, seed, stream=1)
        data.info["corruption"] = {"name": corruption, "severity": corruption_severity, "seed": seed}
    data.info.update(
        {
            "name": name,
            "modality": data.modality,
            "num_classes": data.num_classes,
            "sizes": {k: s.num_rows if isinstance(s, StreamSplit) else len(s)
                      for k, s in (("train", data.train), ("test", data.test))},
            "streaming": streaming,
            "seed": seed,
            "max_train_samples": max_train_samples,
            "max_eval_samples": max_eval_samples,
            "train_split": train_split,
            "test_split": test_split,
        }
    )
    validate_data(data, train_split=train_split, test_split=test_split)
    return data


def validate_data(data: ClassificationData, train_split: str = "train", test_split: str = "test") -> None:
    """Validate both splits of ``data`` (train strictly, test for shape and label range only).

    Raises:
        DataError: One line naming the data, the split and the problem.
    """
    if len(data.class_names) != data.num_classes:
        raise DataError(f"data {data.name!r}: {len(data.class_names)} class names for num_classes={data.num_classes}")
    # a streamed split is checked row by row as it is read (labels outside the label set raise DataError)
    if not isinstance(data.train, StreamSplit):
        validate_split(data.train, data.num_classes, f"data {data.name!r} split {train_split!r}", min_per_class=2)
    if not isinstance(data.test, StreamSplit):
        validate_split(data.test, data.num_classes, f"data {data.name!r} split {test_split!r}", min_per_class=0)


def _builtin_splits(name: str, train_split: str, test_split: str) -> ClassificationData:
    """Load a built-in and arrange it so that ``train``/``test`` are the requested splits."""
    for split in (train_split, test_split):
        if split not in ("train", "test"):
            raise DataError(f"data {name!r}: split {split!r} not found; available splits: train, test")
    data = load_builtin(name)
    splits: dict[str, Any] = {"train": data.train, "test": data.test}
    data.train, data.test = splits[train_split], splits[test_split]
    return data
