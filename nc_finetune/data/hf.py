"""Datasets read with Hugging Face ``datasets``: hub ids (from the local cache) and local csv/json/parquet/imagefolder.

Only the label column is read in full; ``max_*_samples`` is applied by selecting indices, then the text column is
gathered for the selected rows only, and an image column stays lazy (:class:`LazyImageColumn`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nc_finetune.data.base import ClassificationData, Split, stratified_split, stratified_subsample
from nc_finetune.errors import ConfigError, DataError

LOCAL_BUILDERS = ("csv", "json", "parquet", "imagefolder")
TEXT_COLUMNS = ("text", "sentence")
IMAGE_COLUMNS = ("image", "img")
CHECKSUM_MAX_BYTES = 256 << 20  # local data files up to this total size get a sha256 in the provenance


def is_hf_name(name: str) -> bool:
    """Whether ``name`` is read through Hugging Face ``datasets`` (``hf:<id>`` or a local builder)."""
    return name.startswith("hf:") or name in LOCAL_BUILDERS


def to_uint8_image(value: Any) -> np.ndarray:
    """Convert a PIL image or array-like to a uint8 array of shape (H, W) or (H, W, 3).

    Gray modes (``1``, ``I``, ``I;16``, ``F``) become ``L``; palette, RGBA, CMYK and others become RGB.
    """
    if hasattr(value, "mode") and hasattr(value, "convert"):  # a PIL image
        if value.mode in ("1", "I", "I;16", "F"):
            value = value.convert("L")
        elif value.mode not in ("L", "RGB"):
            value = value.convert("RGB")
    arr = np.asarray(value)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


class LazyImageColumn(Sequence):
    """Read-only sequence over one image column of a Hugging Face dataset, decoded on access.

    ``col[i]`` returns a uint8 array; ``col[a:b]`` and ``col[[i, j, ...]]`` a list of uint8 arrays (images may differ
    in size); ``col.select(indices)`` a new lazy column over those rows.
    """

    def __init__(self, dataset: Any, column: str) -> None:
        """Wrap ``dataset[column]`` without reading it.

        Args:
            dataset: A ``datasets.Dataset``.
            column: Name of the image column.
        """
        self.dataset = dataset.select_columns([column])
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            rows = self.dataset[index]
            return [to_uint8_image(v) for v in rows[self.column]]
        if isinstance(index, (int, np.integer)):
            i = int(index)
            if i < 0:
                i += len(self)
            if not 0 <= i < len(self):
                raise IndexError(f"image index {index} out of range for {len(self)} rows")
            return to_uint8_image(self.dataset[i][self.column])
        if isinstance(index, (list, tuple, np.ndarray)):
            rows = self.dataset[[int(i) for i in np.asarray(index, dtype=np.int64).reshape(-1)]]
            return [to_uint8_image(v) for v in rows[self.column]]
        raise TypeError(f"LazyImageColumn indices must be int, slice or int array, got {type(index).__name__}")

    def __iter__(self) -> Iterator[np.ndarray]:
        for row in self.dataset:
            yield to_uint8_image(row[self.column])

    def select(self, indices: np.ndarray | Sequence[int]) -> LazyImageColumn:
        """A lazy column over the rows at ``indices``."""
        return LazyImageColumn(self.dataset.select(np.asarray(indices, dtype=np.int64)), self.column)

    def __repr__(self) -> str:
        return f"LazyImageColumn(column={self.column!r}, rows={len(self)})"

    def undecodable(self, show: int = 3) -> tuple[int, list[str]]:
        """Decode every image once (without keeping it) and report those that cannot be decoded.

        Training decodes images lazily, batch by batch; a corrupt file found this way fails the command before any
        model compute instead of in the middle of training.

        Args:
            show: How many failures to describe.

        Returns:
            ``(number of undecodable rows, descriptions "row i (path): error" of the first ``show``)``.
        """
        import datasets
        from PIL import Image

        if not isinstance(self.dataset.features[self.column], datasets.Image):
            return 0, []  # arrays, not encoded files: nothing can fail to decode
        raw = self.dataset.cast_column(self.column, datasets.Image(decode=False))
        count, shown = 0, []
        for row, item in enumerate(raw[self.column]):
            try:
                with Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as img:
                    img.load()
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... depending on the format
                count += 1
                if len(shown) < show:
                    where = f" ({item['path']})" if item.get("path") else ""
                    shown.append(f"row {row}{where}: {type(e).__name__}: {_first_line(e)}")
        return count, shown


def _normalise_data_files(data_files: dict | str | None) -> dict | str | None:
    """A directory becomes a recursive glob, so ``data_files="my_images/"`` works for imagefolder."""

    def one(path: Any) -> Any:
        return f"{str(path).rstrip('/')}/**" if isinstance(path, (str, os.PathLike)) and os.path.isdir(path) else path

    if isinstance(data_files, dict):
        return {str(k): one(v) for k, v in data_files.items()}
    return one(data_files) if data_files is not None else None


def _local_checksums(data_files: dict | str | None) -> dict[str, str]:
    """sha256 of the listed local files when they are plain files and small in total; else an empty dict."""
    values = data_files.values() if isinstance(data_files, dict) else [data_files]
    paths = [Path(p) for v in values for p in (v if isinstance(v, (list, tuple)) else [v]) if p is not None]
    if not paths or not all(p.is_file() for p in paths) or sum(p.stat().st_size for p in paths) > CHECKSUM_MAX_BYTES:
        return {}
    out = {}
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
        out[str(p)] = h.hexdigest()
    return out


def load_dataset_args(name: str, data_files: dict | str | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``datasets.load_dataset`` arguments for ``hf:<id>[:<config>]`` or a local builder (in memory or streamed).

    Raises:
        ConfigError: a local builder without ``data_files``, or ``hf:`` without an id.
    """
    if name in LOCAL_BUILDERS:
        if data_files is None:
            raise ConfigError(f"data {name!r} needs data_files (a path, or {{split: path}})")
        kwargs: dict[str, Any] = {"data_files": _normalise_data_files(data_files)}
        if name == "csv":  # texts such as "NA", "None" or "null" are texts; only an empty cell is missing
            kwargs.update(keep_default_na=False, na_values=[""])
        return (name,), kwargs
    hub_id, _, config = name[len("hf:") :].partition(":")
    if not hub_id:
        raise ConfigError("data 'hf:' needs a hub id, e.g. hf:stanfordnlp/imdb or hf:nyu-mll/glue:sst2")
    return ((hub_id, config) if config else (hub_id,)), ({"data_files": data_files} if data_files is not None else {})


def _load_dict(name: str, data_files: dict | str | None) -> Any:
    """``datasets.load_dataset`` for ``hf:<id>[:<config>]`` or a local builder, as a ``DatasetDict``."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    args, kwargs = load_dataset_args(name, data_files)
    try:
        loaded = datasets.load_dataset(*args, **kwargs)
    except DatasetGenerationError as err:  # the builder failed on the files' content (empty, binary, malformed)
        cause = err.__cause__ or err
        raise DataError(f"data {name!r}: cannot read {_jsonable(data_files)}: {type(cause).__name__}: "
                        f"{_first_line(cause)}") from err
    except (OSError, ValueError, ConnectionError) as err:  # missing files, not in the offline cache, bad format
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        empty = re.search(r'Instruction "([^"]+)" corresponds to no data', first)
        if empty:
            raise DataError(f"data {name!r} split {empty.group(1)!r}: split is empty (0 examples)") from err
        raise DataError(f"data {name!r}: cannot load: {type(err).__name__}: {first}") from err
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"data {name!r}: expected a dataset with named splits, got {type(loaded).__name__}")
    return loaded


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _pick_input_column(name: str, columns: list[str], text_column: str | None, image_column: str | None) -> tuple:
    """``(column, modality)`` from the explicit arguments or the conventional names."""
    available = ", ".join(columns)
    if text_column is not None and image_column is not None:
        raise ConfigError(f"data {name!r}: pass text_column or image_column, not both")
    explicit = text_column or image_column
    if explicit is not None:
        if explicit not in columns:
            raise DataError(f"data {name!r}: column {explicit!r} not found; available columns: {available}")
        return explicit, "text" if text_column is not None else "image"
    for modality, names in (("image", IMAGE_COLUMNS), ("text", TEXT_COLUMNS)):
        for col in names:
            if col in columns:
                return col, modality
    raise DataError(
        f"data {name!r}: no input column found (looked for {', '.join(IMAGE_COLUMNS + TEXT_COLUMNS)}); "
        f"pass text_column or image_column; available columns: {available}"
    )


def _label_mapping(name: str, label_column: str, splits: list[Any]) -> tuple[list[str], dict | None, str]:
    """Class names, the string -> id map for string labels (else ``None``) and how labels were encoded.

    ClassLabel features give their names; integer labels are kept (names ``"0"..``); strings are sorted over all
    ``splits`` so that train and test agree.
    """
    import datasets

    feature = splits[0].features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), None, "ClassLabel"
    values = [v for ds in splits for v in ds[label_column]]
    if any(v is None for v in values):
        raise DataError(f"data {name!r}: label column {label_column!r} has missing values")
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        return names, {s: i for i, s in enumerate(names)}, "strings mapped to sorted ids"
    if all(isinstance(v, (bool, int, np.integer)) for v in values):
        ids = {int(v) for v in values}
        top, used = max(ids), sum(i >= 0 for i in ids)
        if top >= used:  # an id in 0..top never occurs: refuse before building top + 1 class names
            gap = next(i for i in range(used + 1) if i not in ids)
            raise DataError(f"data {name!r}: integer labels in column {label_column!r} must be the class ids "
                            f"0..K-1, each used; found {used} distinct ids up to {top} (id {gap} never occurs); "
                            "recode them as 0..K-1, or as strings")
        return [str(i) for i in range(max(top + 1, 0))], None, "integers kept"
    kinds = sorted({type(v).__name__ for v in values})
    raise DataError(
        f"data {name!r}: label column {label_column!r} must hold integers or strings, got {', '.join(kinds)}"
    )


def _labels(dataset: Any, label_column: str, mapping: dict | None) -> np.ndarray:
    values = list(dataset[label_column])
    if mapping is not None:
        return np.asarray([mapping[v] for v in values], dtype=np.int64)
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _texts(name: str, dataset: Any, column: str) -> list[str]:
    texts = list(dataset[column])
    missing = sum(t is None for t in texts)
    if missing:
        raise DataError(f"data {name!r}: text column {column!r} has {missing} missing value(s)")
    return [str(t) for t in texts]


def load_hf(
    name: str,
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
) -> ClassificationData:
    """Load a classification dataset through Hugging Face ``datasets``.

    Args:
        name: ``hf:<hub id>`` or ``hf:<hub id>:<config>`` (read from the local cache when offline), or one of
            ``csv``, ``json``, ``parquet``, ``imagefolder`` with ``data_files``.
        train_split: Split to train on.
        test_split: Split to evaluate on. When the dataset has only ``train_split``, a stratified test split of
            ``test_size`` is carved from it with ``seed``.
        text_column: Text input column (default: ``text`` or ``sentence``).
        image_column: Image input column (default: ``image`` or ``img``).
        label_column: Label column: ClassLabel, integers in ``[0, num_classes)`` or strings (mapped to sorted ids).
        data_files: Local file(s) for the local builders: a path or ``{split: path}``; a directory is globbed.
        max_train_samples: Stratified, seeded subsample of the train split (``None``: all).
        max_eval_samples: Stratified, seeded subsample of the test split (``None``: all).
        seed: Seed for the auto test split and the subsamples.
        test_size: Share of each class held out when the test split is carved from train.

    Returns:
        The dataset; text inputs are lists of str, image inputs :class:`LazyImageColumn`.

    Raises:
        DataError: Missing split or column, unusable labels, or a dataset that cannot be loaded.
        ConfigError: Contradictory arguments.
    """
    loaded = _load_dict(name, data_files)
    available = ", ".join(loaded.keys())
    if train_split not in loaded:
        raise DataError(f"data {name!r}: split {train_split!r} not found; available splits: {available}")
    train_ds = loaded[train_split]
    columns = list(train_ds.column_names)
    if label_column not in columns:
        available_columns = ", ".join(columns)
        raise DataError(
            f"data {name!r}: label column {label_column!r} not found; available columns: {available_columns}"
        )
    input_column, modality = _pick_input_column(name, columns, text_column, image_column)
    feature = train_ds.features[input_column]
    if modality == "image" and getattr(feature, "dtype", None) in ("string", "large_string"):
        raise DataError(f"data {name!r}: column {input_column!r} holds strings, not images; pass text_column")

    if test_split in loaded:
        test_ds = loaded[test_split]
        missing = [c for c in (input_column, label_column) if c not in test_ds.column_names]
        if missing:
            raise DataError(
                f"data {name!r} split {test_split!r}: column {missing[0]!r} not found; "
                f"available columns: {', '.join(test_ds.column_names)}"
            )
        split_rule = f"given splits {train_split!r}/{test_split!r}"
    elif list(loaded.keys()) == [train_split]:
        test_ds = None
        split_rule = f"stratified {1 - test_size:.0%}/{test_size:.0%} of {train_split!r}, seed {seed}"
    else:
        raise DataError(f"data {name!r}: split {test_split!r} not found; available splits: {available}")

    label_sources = [train_ds] if test_ds is None else [train_ds, test_ds]
    class_names, mapping, encoding = _label_mapping(name, label_column, label_sources)
    train_labels = _labels(train_ds, label_column, mapping)
    if test_ds is None:
        idx_train, idx_test = stratified_split(train_labels, test_size, seed)
        test_ds, test_labels = train_ds.select(idx_test), train_labels[idx_test]
        train_ds, train_labels = train_ds.select(idx_train), train_labels[idx_train]
    else:
        test_labels = _labels(test_ds, label_column, mapping)
    full_sizes = {"train": len(train_labels), "test": len(test_labels)}

    if max_train_samples is not None and max_train_samples < len(train_labels):
        idx = stratified_subsample(train_labels, max_train_samples, seed)
        train_ds, train_labels = train_ds.select(idx), train_labels[idx]
    if max_eval_samples is not None and max_eval_samples < len(test_labels):
        idx = stratified_subsample(test_labels, max_eval_samples, seed)
        test_ds, test_labels = test_ds.select(idx), test_labels[idx]

    if modality == "text":
        train = Split(inputs=_texts(name, train_ds, input_column), labels=train_labels)
        test = Split(inputs=_texts(name, test_ds, input_column), labels=test_labels)
    else:
        train = Split(inputs=LazyImageColumn(train_ds, input_column), labels=train_labels)
        test = Split(inputs=LazyImageColumn(test_ds, input_column), labels=test_labels)
        for split_name, split in ((train_split, train), (test_split, test)):
            bad, shown = split.inputs.undecodable()
            if bad:
                raise DataError(f"data {name!r} split {split_name!r}: {bad} image(s) cannot be decoded "
                                f"({'; '.join(shown)}{'; ...' if bad > len(shown) else ''}); remove or replace them")

    info: dict[str, Any] = {
        "source": name if name.startswith("hf:") else f"local {name}",
        "data_files": _jsonable(data_files),
        "columns": {"input": input_column, "label": label_column},
        "label_encoding": encoding,
        "splits_available": list(loaded.keys()),
        "split_rule": split_rule,
        "full_sizes": full_sizes,
        "fingerprints": {split: loaded[split]._fingerprint for split in loaded},
    }
    checksums = _local_checksums(data_files) if name in LOCAL_BUILDERS else {}
    if checksums:
        info["files"] = checksums
    return ClassificationData(name, modality, train, test, len(class_names), class_names, info)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, os.PathLike) else value
