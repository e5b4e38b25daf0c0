"""Dataset containers, deterministic stratified sampling and validation.

Every index helper here is a pure function of ``(labels, size, seed)``: the same call always returns the same
indices, so a run can be reproduced from its recipe alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from nc_finetune.errors import DataError


@dataclass
class Split:
    """One split of a classification dataset.

    Attributes:
        inputs: Images as a ``np.ndarray`` of shape (N, H, W) or (N, H, W, C) with dtype uint8, or a lazy sequence
            whose items are such arrays (it has a ``select(indices)`` method); texts as a ``list[str]``.
        labels: Integer class ids of shape (N,), dtype int64, in ``[0, num_classes)``.
    """

    inputs: Sequence[Any]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        inputs = self.inputs
        if isinstance(inputs, np.ndarray):
            kind = f"ndarray{tuple(inputs.shape)} {inputs.dtype}"
        elif isinstance(inputs, list):
            kind = f"list[{type(inputs[0]).__name__}]" if inputs else "list"
        else:
            kind = type(inputs).__name__
        classes = len(np.unique(np.asarray(self.labels))) if len(self.labels) else 0
        return f"Split(samples={len(self)}, classes={classes}, inputs={kind})"

    def subset(self, indices: np.ndarray | Sequence[int]) -> Split:
        """Return the examples at ``indices`` (in that order) as a new split.

        Numpy inputs are fancy-indexed, lazy sequences with a ``select`` method (such as the image column of a
        Hugging Face dataset) stay lazy, and anything else is gathered into a list.

        Args:
            indices: Integer positions into this split.

        Returns:
            A new :class:`Split`; the original is unchanged.
        """
        idx = np.asarray(indices, dtype=np.int64)
        if isinstance(self.inputs, np.ndarray):
            inputs: Sequence[Any] = self.inputs[idx]
        elif hasattr(self.inputs, "select"):
            inputs = self.inputs.select(idx)
        else:
            inputs = [self.inputs[int(i)] for i in idx]
        return Split(inputs=inputs, labels=self.labels[idx])


@dataclass
class ClassificationData:
    """A classification dataset with a train and a test split.

    Attributes:
        name: The name it was loaded by (``fashion-mnist``, ``csv``, ``hf:<id>``, ...).
        modality: ``"image"`` or ``"text"``.
        train: Training split.
        test: Held-out split used for evaluation.
        num_classes: Number of classes; labels are in ``[0, num_classes)``.
        class_names: One human-readable name per class id.
        info: Provenance (source, sizes, seed, split rule, file checksums where cheap); JSON-serialisable.
    """

    name: str
    modality: Literal["image", "text"]
    train: Split
    test: Split
    num_classes: int
    class_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        names = ", ".join(repr(str(n)) for n in self.class_names[:5]) + (", ..." if self.num_classes > 5 else "")
        return (f"ClassificationData(name={self.name!r}, modality={self.modality!r}, num_classes={self.num_classes}, "
                f"train={len(self.train)}, test={len(self.test)}, class_names=[{names}])")


def _class_indices(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(class, positions)`` for every class present, in increasing class order."""
    labels = np.asarray(labels)
    return [(int(k), np.flatnonzero(labels == k)) for k in np.unique(labels)]


def subsample_per_class(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Pick at most ``per_class`` examples of every class, deterministically.

    For each class (in increasing order) a seeded permutation of its positions is drawn and the first
    ``min(per_class, n_k)`` are kept; the result is then shuffled with the same generator, so that consecutive
    batches mix classes.

    Args:
        labels: Class id of every example, shape (N,).
        per_class: Examples to keep per class; ``None`` keeps all of them (still shuffled).
        seed: Seed of the generator.

    Returns:
        Integer positions into ``labels`` (int64), shuffled.

    Raises:
        ValueError: If ``per_class`` is smaller than 1.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if per_class is None:
        return rng.permutation(len(labels)).astype(np.int64)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1 or None, got {per_class}")
    picked = [rng.permutation(pos)[:per_class] for _, pos in _class_indices(labels)]
    out = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    return rng.permutation(out).astype(np.int64)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into two stratified parts, deterministically.

    Part ``b`` gets ``round(fraction * n_k)`` examples of every class ``k``, clipped to ``[1, n_k - 1]`` so that
    every class with at least two examples appears in both parts; a class with a single example goes to part ``a``.

    Args:
        labels: Class id of every example, shape (N,).
        fraction: Share of every class that goes to part ``b`` (the held-out part), in (0, 1).
        seed: Seed of the generator.

    Returns:
        ``(idx_a, idx_b)``: int64 positions, each shuffled with the seed; together they cover every position once.

    Raises:
        ValueError: If ``fraction`` is not strictly between 0 and 1.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    part_a: list[np.ndarray] = []
    part_b: list[np.ndarray] = []
    for _, pos in _class_indices(labels):
        pos = rng.permutation(pos)
        n_b = 0 if len(pos) < 2 else min(max(int(round(fraction * len(pos))), 1), len(pos) - 1)
        part_b.append(pos[:n_b])
        part_a.append(pos[n_b:])
    empty = np.zeros(0, dtype=np.int64)
    idx_a = rng.permutation(np.concatenate(part_a)) if part_a else empty
    idx_b = rng.permutation(np.concatenate(part_b)) if part_b else empty
    return idx_a.astype(np.int64), idx_b.astype(np.int64)


def stratified_subsample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Pick ``n`` examples with per-class counts proportional to the class sizes, deterministically.

    Counts follow the largest-remainder rule (ties go to the lower class id). When ``n`` is at least the number of
    classes present, a class rounded down to zero still gets one example, taken from the largest allocation. Within
    a class the examples are a seeded random choice; the result is shuffled with the seed.

    Args:
        labels: Class id of every example, shape (N,).
        n: Number of examples to keep; ``n >= N`` keeps all of them (shuffled).
        seed: Seed of the generator.

    Returns:
        Integer positions into ``labels`` (int64), shuffled.

    Raises:
        ValueError: If ``n`` is smaller than 1.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    groups = _class_indices(labels)
    counts = stratified_counts(np.array([len(pos) for _, pos in groups], dtype=np.int64), n)
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(pos)[:c] for (_, pos), c in zip(groups, counts, strict=True)]
    out = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    return rng.permutation(out).astype(np.int64)


def stratified_counts(sizes: np.ndarray, n: int) -> np.ndarray:
    """Per-class counts of a stratified sample of ``n`` from classes of ``sizes`` (the rule of
    :func:`stratified_subsample`; classes of size 0 get 0).

    Args:
        sizes: Examples per class, shape (K,).
        n: Sample size (``n`` >= the total keeps everything), >= 1.

    Returns:
        Counts per class, shape (K,), int64, each at most its size.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    present = np.flatnonzero(sizes)
    out = np.zeros(len(sizes), dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        return out
    n = min(n, total)
    quota = n * sizes[present] / total
    counts = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[: n - int(counts.sum())]] += 1
    if n >= len(present):  # a class rounded down to zero takes one example from the largest allocation
        for k in np.flatnonzero(counts == 0):
            counts[int(np.argmax(counts))] -= 1
            counts[k] = 1
    out[present] = counts
    return out


def validate_split(split: Split, num_classes: int, what: str, min_per_class: int = 2) -> None:
    """Refuse a split that cannot be trained or evaluated on, before any model compute.

    Always checked: inputs and labels have the same length, the split is not empty, labels are 1-D integers in
    ``[0, num_classes)``. With ``min_per_class >= 1`` (a training split), also: at least two classes are present
    and every class id in ``[0, num_classes)`` has at least ``min_per_class`` examples. Pass ``min_per_class=0``
    for an evaluation split.

    Args:
        split: The split to check.
        num_classes: Number of classes of the dataset.
        what: Prefix that names the data and split in the message, e.g. ``"data 'csv' split 'train'"``.
        min_per_class: Minimum examples per class (0 disables the class checks).

    Raises:
        DataError: One line, ``"<what>: <problem>"``.
    """
    labels = np.asarray(split.labels)
    if len(split.inputs) != len(labels):
        raise DataError(f"{what}: {len(split.inputs)} inputs but {len(labels)} labels")
    if len(labels) == 0:
        raise DataError(f"{what}: split is empty (0 examples)")
    if labels.ndim != 1:
        raise DataError(f"{what}: labels must be 1-D, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise DataError(f"{what}: labels must be integers, got dtype {labels.dtype}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        more = f"; {len(bad)} labels out of range in all" if len(bad) > 1 else ""
        raise DataError(
            f"{what}: label {int(bad[0])} out of range [0, {num_classes}) (num_classes={num_classes}){more}"
        )
    if min_per_class < 1:
        return
    counts = np.bincount(labels.astype(np.int64), minlength=num_classes)
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise DataError(f"{what}: only {len(present)} class present (class {int(present[0])}); need at least 2")
    small = np.flatnonzero(counts < min_per_class)
    if len(small):
        k = int(small[0])
        more = f" ({len(small)} classes in all)" if len(small) > 1 else ""
        raise DataError(
            f"{what}: class {k} has {int(counts[k])} example(s), need at least {min_per_class} per class{more}"
        )
