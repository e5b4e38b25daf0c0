"""Hugging Face datasets read as streams (``data.streaming: true``): memory stays bounded as the number of rows grows.

A streamed split is never held in memory. What the pipeline needs from it is drawn in one pass:

* **Per-class samples** (``probe.samples_per_class``, ``data.max_train_samples``, ``data.max_eval_samples``) use
  *bottom-k sampling per class*: every row gets a key, a seeded uniform number that is a function of
  ``(seed, purpose, row index)`` only, and each class keeps the ``k`` rows with the smallest keys (memory: ``k`` rows
  per class). This is a uniform random sample of each class over the *whole* stream, reproducible from the seed and
  independent of batch sizes or shards; a larger ``k`` keeps a superset. First-k-per-class behind a shuffle buffer
  would stop earlier, but it samples from the head of the file (a file sorted by class, date or source would give a
  biased subset), so it is not used. The kept rows are returned in key order, which mixes the classes.
* **Evaluation** reads the test split batch by batch (:meth:`StreamSplit.batches`), prepared in the background.
* **A missing test split** is carved per row: a row is held out when its own seeded uniform is below
  ``test_size`` (about ``test_size`` of every class, not exactly stratified as in memory).
* **The label set** comes from, in order: ``data.labels`` (the class names; string labels are matched to them, integer
  labels are ids into them), a ``ClassLabel`` feature, or, for local files only, one label-only pass that also counts
  the rows of every class. A hub dataset without a ``ClassLabel`` and without ``data.labels`` is refused (the pass
  would download the whole dataset). ``data.max_train_samples`` / ``max_eval_samples`` need per-class counts for
  their stratified quotas: they also trigger the label-only pass.

Training reads a sample (``data.max_train_samples``, in memory) or the whole stream, one shuffled pass per epoch
through a seeded buffer of :data:`SHUFFLE_BUFFER` rows (:meth:`StreamSplit.shuffled_batches`); a validation part is
carved per row like the test split.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nc_finetune.data.base import ClassificationData, Split, stratified_counts
from nc_finetune.data.hf import (
    LOCAL_BUILDERS,
    _first_line,
    _jsonable,
    _pick_input_column,
    load_dataset_args,
    to_uint8_image,
)
from nc_finetune.errors import ConfigError, DataError

READ_BATCH = 4096
"""Rows read from the stream at a time (the stream's own reader is chunked too: CSV reads 10k-row chunks)."""
KEY_CHUNK = 1 << 16
"""Row keys are drawn in chunks of this many rows, each chunk from its own seeded generator."""
MAX_LABEL_PASS_CLASSES = 100_000
"""A label-only pass that finds more distinct values than this is reading something that is not a label."""

SHUFFLE_BUFFER = 10_000
"""Rows held by the shuffle buffer of a training epoch read from a stream."""

# purposes of the per-row keys: the same seed draws independent keys for each
KEY_TEST_CARVE, KEY_TRAIN_SAMPLE, KEY_EVAL_SAMPLE, KEY_PROBE_SAMPLE, KEY_VAL_CARVE = 0, 1, 2, 3, 4


class RowKeys:
    """Seeded uniform numbers in [0, 1), one per row index, independent of how the rows are batched.

    Args:
        seed: The seed.
        purpose: Which independent stream of keys (``KEY_*``).
    """

    def __init__(self, seed: int, purpose: int) -> None:
        self.seed, self.purpose = int(seed), int(purpose)
        self._chunk, self._values = -1, np.zeros(0)

    def _chunk_values(self, chunk: int) -> np.ndarray:
        if chunk != self._chunk:
            rng = np.random.default_rng([self.seed, self.purpose, chunk])
            self._chunk, self._values = chunk, rng.random(KEY_CHUNK)
        return self._values

    def __call__(self, start: int, stop: int) -> np.ndarray:
        """Keys of rows ``start .. stop - 1``, shape (stop - start,), float64."""
        out = np.empty(stop - start)
        pos = start
        while pos < stop:
            chunk, offset = divmod(pos, KEY_CHUNK)
            take = min(stop - pos, KEY_CHUNK - offset)
            out[pos - start: pos - start + take] = self._chunk_values(chunk)[offset: offset + take]
            pos += take
        return out


@dataclass
class LabelCoder:
    """Raw label values -> class ids.

    Attributes:
        names: Class names, one per id.
        mapping: String value -> id (``None``: integer labels are the ids).
        encoding: How the label set was obtained, for the provenance.
    """

    names: list[str]
    mapping: dict[str, int] | None
    encoding: str

    def encode(self, values: Sequence[Any], what: str) -> np.ndarray:
        """Class ids of ``values``, shape (len(values),), int64.

        Raises:
            DataError: A missing value, or one outside the label set.
        """
        out = np.empty(len(values), dtype=np.int64)
        k = len(self.names)
        for i, v in enumerate(values):
            if v is None:
                raise DataError(f"{what}: label column has missing values")
            if isinstance(v, str) and self.mapping is not None:
                if v not in self.mapping:
                    raise DataError(f"{what}: label {v!r} is not in the label set "
                                    f"({', '.join(self.names[:10])}{' ...' if k > 10 else ''})")
                out[i] = self.mapping[v]
            elif isinstance(v, (bool, int, np.integer)) and not isinstance(v, str):
                if not 0 <= int(v) < k:
                    raise DataError(f"{what}: label {int(v)} out of range [0, {k}) (num_classes={k})")
                out[i] = int(v)
            else:
                raise DataError(f"{what}: label {v!r} of type {type(v).__name__} does not match the label set "
                                f"({self.encoding})")
        return out


@dataclass
class StreamSource:
    """The rows of one split of a streamed dataset, optionally carved (a seeded share held out per row).

    Attributes:
        dataset: A ``datasets.IterableDataset`` with the input and label columns.
        input_column: Name of the input column.
        label_column: Name of the label column.
        modality: ``"text"`` or ``"image"``.
        what: Prefix of error messages (``"data 'csv' split 'train'"``).
        carves: Row filters ``(seed, purpose, fraction, held)``, all applied: keep the rows whose key (of that seed
            and purpose) is below ``fraction`` (``held=True``: the held-out part) or the others; none keeps every
            row.
    """

    dataset: Any
    input_column: str
    label_column: str
    modality: str
    what: str
    carves: tuple[tuple[int, int, float, bool], ...] = ()

    def rows(self, columns: Sequence[str] | None = None) -> Iterator[tuple[np.ndarray, dict[str, list]]]:
        """``(row indices (n,), {column: values})`` chunks in file order; row indices count the source file's rows
        (before carving), so keys drawn from them do not depend on the carves."""
        ds = self.dataset if columns is None else self.dataset.select_columns(list(columns))
        filters = [(RowKeys(seed, purpose), fraction, held) for seed, purpose, fraction, held in self.carves]
        start = 0
        for chunk in ds.iter(batch_size=READ_BATCH):
            n = len(next(iter(chunk.values())))
            index = np.arange(start, start + n, dtype=np.int64)
            start += n
            if filters:
                keep = np.ones(n, dtype=bool)
                for keys, fraction, held in filters:
                    below = keys(int(index[0]), int(index[-1]) + 1) < fraction
                    keep &= below if held else ~below
                index = index[keep]
                chunk = {c: [v for v, k in zip(vals, keep, strict=True) if k] for c, vals in chunk.items()}
            if len(index):
                yield index, chunk

    def inputs(self, values: list[Any]) -> list[Any]:
        """Raw column values -> what ``Backbone.prepare`` takes (str, or uint8 arrays decoded here)."""
        if self.modality == "image":
            return [decode_image(v) for v in values]
        missing = sum(v is None for v in values)
        if missing:
            raise DataError(f"{self.what}: text column {self.input_column!r} has {missing} missing value(s)")
        return [str(v) for v in values]


def decode_image(value: Any) -> np.ndarray:
    """An undecoded image cell (``{"bytes", "path"}``) or a decoded one -> uint8 array (H, W) or (H, W, 3)."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        from PIL import Image

        with Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]) as img:
            img.load()
            return to_uint8_image(img)
    return to_uint8_image(value)


@dataclass
class StreamSplit:
    """A split read as a stream: iterated in batches or sampled per class, never held in memory.

    Attributes:
        source: Where the rows come from.
        coder: Label values -> class ids.
        num_rows: Row count when a pass counted it (else ``None``).
        class_counts: Rows per class when a pass counted them (shape (K,)), else ``None``.
        relabel: Class id -> id applied after encoding (set by :meth:`relabelled`), else ``None``.
    """

    source: StreamSource
    coder: LabelCoder
    num_rows: int | None = None
    class_counts: np.ndarray | None = None
    relabel: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        if self.num_rows is None:
            raise DataError(f"{self.source.what}: the number of rows of a streamed split is unknown without a pass")
        return self.num_rows

    def __repr__(self) -> str:
        rows = self.num_rows if self.num_rows is not None else "unknown"
        return f"StreamSplit({self.source.what}, rows={rows}, classes={len(self.coder.names)})"

    @property
    def labels(self) -> np.ndarray:
        raise DataError(f"{self.source.what} is streamed (data.streaming=true): its labels are not held in memory; "
                        "set data.max_train_samples to train on a bounded per-class sample")

    def subset(self, indices: Any) -> Split:
        raise DataError(f"{self.source.what} is streamed (data.streaming=true) and has no random access; "
                        "set data.max_train_samples to train on a bounded per-class sample")

    def relabelled(self, new_id: np.ndarray) -> StreamSplit:
        """The same stream with class ids renumbered by ``new_id`` (old id -> new id)."""
        new_id = np.asarray(new_id, dtype=np.int64)
        chained = new_id if self.relabel is None else new_id[self.relabel]
        counts = None
        if self.class_counts is not None:
            counts = np.zeros_like(self.class_counts)
            counts[new_id] = self.class_counts
        return StreamSplit(self.source, self.coder, self.num_rows, counts, chained)

    def _encode(self, values: list[Any]) -> np.ndarray:
        y = self.coder.encode(values, self.source.what)
        return y if self.relabel is None else self.relabel[y]

    def batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[tuple[list[Any], np.ndarray]]:
        """``(raw inputs, labels (B,))`` batches of this rank's share (every ``world``-th row, from ``rank``)."""
        src = self.source
        buf_inputs: list[Any] = []
        buf_labels: list[np.ndarray] = []
        position = 0  # rows of this split seen so far, for sharding
        for _, chunk in src.rows([src.input_column, src.label_column]):
            n = len(chunk[src.label_column])
            mine = [i for i in range(n) if (position + i) % world == rank]
            position += n
            values = [chunk[src.input_column][i] for i in mine]
            labels = self._encode([chunk[src.label_column][i] for i in mine])
            buf_inputs.extend(values)
            buf_labels.append(labels)
            while len(buf_inputs) >= batch_size:
                y = np.concatenate(buf_labels)
                yield src.inputs(buf_inputs[:batch_size]), y[:batch_size]
                buf_inputs, buf_labels = buf_inputs[batch_size:], [y[batch_size:]]
        if buf_inputs:
            yield src.inputs(buf_inputs), np.concatenate(buf_labels)

    def sample(self, quota: np.ndarray, seed: int, purpose: int) -> Split:
        """Bottom-k sample per class in one pass: class ``k`` keeps its ``quota[k]`` rows of smallest key.

        Args:
            quota: Rows to keep per class, shape (K,) (a class with fewer rows keeps all of them).
            seed: Seed of the row keys.
            purpose: Which key stream (``KEY_*``), so that different samples of one seed are independent.

        Returns:
            An in-memory :class:`Split` (inputs decoded), rows in increasing key order (classes mixed).
        """
        src = self.source
        quota = np.asarray(quota, dtype=np.int64)
        K = len(quota)
        keys = RowKeys(seed, purpose)
        kept_keys = [np.zeros(0) for _ in range(K)]
        kept_values: list[list[Any]] = [[] for _ in range(K)]
        threshold = np.where(quota > 0, np.inf, -np.inf)  # (K,): a row enters class k's sample iff its key is below
        for index, chunk in src.rows([src.input_column, src.label_column]):
            y = self._encode(chunk[src.label_column])  # (n,)
            u = keys(int(index[0]), int(index[-1]) + 1)[index - index[0]]  # (n,) keys of these rows
            enter = np.flatnonzero(u < threshold[y])
            if not len(enter):
                continue
            values = chunk[src.input_column]
            for k in np.unique(y[enter]):
                rows = enter[y[enter] == k]
                cand_keys = np.concatenate([kept_keys[k], u[rows]])
                cand_values = kept_values[k] + [values[i] for i in rows]
                if len(cand_keys) > quota[k]:
                    keep = np.argpartition(cand_keys, quota[k] - 1)[: quota[k]]
                    cand_keys, cand_values = cand_keys[keep], [cand_values[i] for i in keep]
                    threshold[k] = cand_keys.max()
                kept_keys[k], kept_values[k] = cand_keys, cand_values
        all_keys = np.concatenate(kept_keys)
        all_labels = np.concatenate([np.full(len(kk), k, dtype=np.int64) for k, kk in enumerate(kept_keys)])
        all_values = [v for vs in kept_values for v in vs]
        order = np.argsort(all_keys, kind="stable")
        return Split(inputs=src.inputs([all_values[i] for i in order]), labels=all_labels[order])

    def split_off(self, fraction: float, seed: int) -> tuple[StreamSplit, StreamSplit]:
        """``(rest, held)``: each row goes to ``held`` with probability ``fraction`` (its own seeded key), e.g. the
        validation part of a streamed training split. Both are counted (one label-only pass each)."""
        src = self.source
        parts = []
        for held in (False, True):
            carves = (*src.carves, (seed, KEY_VAL_CARVE, fraction, held))
            what = src.what + (f" (held-out {fraction:.0%})" if held else "")
            part = StreamSplit(StreamSource(src.dataset, src.input_column, src.label_column, src.modality, what,
                                            carves), self.coder, relabel=self.relabel)
            part.count()
            parts.append(part)
        return parts[0], parts[1]

    def shuffled_batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                         skip: int = 0) -> Iterator[tuple[list[Any], np.ndarray]]:
        """One training epoch: ``(raw inputs, labels)`` micro-batches of this rank, in a seeded shuffled order.

        Rows pass through a shuffle buffer of :data:`SHUFFLE_BUFFER` rows (a row leaves it for a uniformly drawn
        slot's place), so the order is random within about that many rows of the file, not over the whole file.
        The emitted rows are cut into global batches of ``batch_size * world``, each split evenly over the ranks (a
        tail smaller than ``world`` is dropped), as :func:`nc_finetune.train.loop.epoch_batches` cuts a permutation:
        every rank gets :func:`micro_batch_count` batches.

        Args:
            batch_size: Per-rank micro-batch size.
            seed: Shuffle seed (with ``epoch``: a new order every epoch, the same for every rank).
            epoch: The epoch.
            rank: This process.
            world: Number of processes.
            skip: Micro-batches to read past without preparing them (a resumed epoch).
        """
        src = self.source
        rng = np.random.default_rng([seed, epoch, KEY_VAL_CARVE + 1])
        buffer: list[tuple[Any, int]] = []
        pending: list[tuple[Any, int]] = []
        global_size = batch_size * world
        done = 0

        def emit(rows: list[tuple[Any, int]]) -> tuple[list[Any], np.ndarray] | None:
            nonlocal done
            done += 1
            if done <= skip:
                return None
            mine = [rows[i] for i in np.array_split(np.arange(len(rows)), world)[rank]]
            return src.inputs([v for v, _ in mine]), np.asarray([y for _, y in mine], dtype=np.int64)

        def shuffled_rows() -> Iterator[tuple[Any, int]]:
            for _, chunk in src.rows([src.input_column, src.label_column]):
                labels = self._encode(chunk[src.label_column])
                slots = rng.integers(0, SHUFFLE_BUFFER, size=len(labels))
                for value, y, j in zip(chunk[src.input_column], labels.tolist(), slots.tolist(), strict=True):
                    if len(buffer) < SHUFFLE_BUFFER:
                        buffer.append((value, y))
                    else:
                        yield buffer[j]
                        buffer[j] = (value, y)
            for i in rng.permutation(len(buffer)):
                yield buffer[int(i)]

        for row in shuffled_rows():
            pending.append(row)
            if len(pending) == global_size:
                out = emit(pending)
                pending = []
                if out is not None:
                    yield out
        if len(pending) >= world:
            out = emit(pending)
            if out is not None:
                yield out

    def count(self) -> np.ndarray:
        """Rows per class in one label-only pass, shape (K,); also sets ``num_rows`` and ``class_counts``."""
        src = self.source
        counts = np.zeros(len(self.coder.names), dtype=np.int64)
        for _, chunk in src.rows([src.label_column]):
            counts += np.bincount(self._encode(chunk[src.label_column]), minlength=len(counts))
        self.num_rows, self.class_counts = int(counts.sum()), counts
        return counts


#: Selection strategies and adapt modes that draw batches of the training split by index (not from the probe sample).
RANDOM_ACCESS_STRATEGIES = ("auto_rgn", "trial")
RANDOM_ACCESS_METHODS = ("auto_rgn",)


def check_stream_training(recipe: Any) -> None:
    """Refuse, before any work, a run that would need random access to a streamed training split (no
    ``data.max_train_samples``): Auto-RGN (selection or adapt mode) and trial selection draw batches by index.

    Raises:
        ConfigError: One line naming the option and the way out.
    """
    d = recipe.data
    if not d.streaming or d.max_train_samples is not None:
        return
    s, a = recipe.selection.strategy, recipe.adapt.method
    if s in RANDOM_ACCESS_STRATEGIES or a in RANDOM_ACCESS_METHODS:
        which = f"selection.strategy={s}" if s in RANDOM_ACCESS_STRATEGIES else f"adapt.method={a}"
        raise ConfigError(f"{which} draws training batches by index; with data.streaming=true set "
                          "data.max_train_samples (a bounded sample in memory)")


def micro_batch_count(n: int, batch_size: int, world: int) -> int:
    """Micro-batches per rank and epoch over ``n`` rows (global batches of ``batch_size * world``; a tail smaller
    than ``world`` rows is dropped)."""
    full, tail = divmod(n, batch_size * world)
    return full + (1 if tail >= world else 0)


def per_class_sample(split: Split | StreamSplit, per_class: int | None, seed: int) -> Split:
    """At most ``per_class`` examples of every class: the in-memory rule for a :class:`Split`, a one-pass bottom-k
    sample for a :class:`StreamSplit`.

    Raises:
        ConfigError: ``per_class`` is ``None`` on a stream (the whole stream would be held in memory).
    """
    from nc_finetune.data.base import subsample_per_class

    if isinstance(split, Split):
        return split.subset(subsample_per_class(np.asarray(split.labels), per_class, seed))
    if per_class is None:
        raise ConfigError("probe.samples_per_class must be set with data.streaming=true (null would hold the whole "
                          "stream in memory); or set data.max_train_samples")
    return split.sample(np.full(len(split.coder.names), per_class), seed, KEY_PROBE_SAMPLE)


def _load_stream_dict(name: str, data_files: dict | str | None) -> Any:
    """``datasets.load_dataset(..., streaming=True)`` for ``hf:<id>[:<config>]`` or a local builder."""
    import datasets

    args, kwargs = load_dataset_args(name, data_files)  # as in memory (CSV: only an empty cell is missing)
    try:
        loaded = datasets.load_dataset(*args, streaming=True, **kwargs)
    except (OSError, ValueError, ConnectionError) as err:
        raise DataError(f"data {name!r}: cannot stream: {type(err).__name__}: {_first_line(err)}") from err
    if not isinstance(loaded, datasets.IterableDatasetDict):
        raise DataError(f"data {name!r}: expected a dataset with named splits, got {type(loaded).__name__}")
    return loaded


def _first_row(name: str, split: str, ds: Any) -> dict[str, Any]:
    """The first row (for the column names when the stream does not declare its features)."""
    from datasets.exceptions import DatasetGenerationError

    try:
        for row in ds.take(1):
            return row
    except (DatasetGenerationError, OSError, ValueError) as err:
        cause = err.__cause__ or err
        raise DataError(f"data {name!r} split {split!r}: cannot read: {type(cause).__name__}: "
                        f"{_first_line(cause)}") from err
    raise DataError(f"data {name!r} split {split!r}: split is empty (0 examples)")


def _coder(name: str, label_column: str, feature: Any, labels: Sequence[str] | None) -> LabelCoder | None:
    """The label set when it is known without reading the data (``data.labels`` or a ClassLabel), else ``None``."""
    import datasets

    if labels is not None:
        names = [str(n) for n in labels]
        return LabelCoder(names, {n: i for i, n in enumerate(names)}, "data.labels")
    if isinstance(feature, datasets.ClassLabel):
        return LabelCoder(list(feature.names), None, "ClassLabel")
    return None


def _coder_from_pass(name: str, label_column: str, sources: list[StreamSource]) -> tuple[LabelCoder, list[Counter]]:
    """One label-only pass over ``sources``: the sorted distinct strings, or the integer ids 0..K-1 (as in memory),
    and the count of every raw value per source."""
    counters: list[Counter] = []
    for src in sources:
        counter: Counter = Counter()
        for _, chunk in src.rows([label_column]):
            counter.update(chunk[label_column])
            if len(counter) > MAX_LABEL_PASS_CLASSES:
                raise DataError(f"data {name!r}: label column {label_column!r} has more than "
                                f"{MAX_LABEL_PASS_CLASSES} distinct values; is it the label?")
        counters.append(counter)
    values = set().union(*counters)
    if None in values:
        raise DataError(f"data {name!r}: label column {label_column!r} has missing values")
    if all(isinstance(v, str) for v in values):
        names = sorted(values)
        return LabelCoder(names, {s: i for i, s in enumerate(names)}, "strings mapped to sorted ids (label pass)"), \
            counters
    if all(isinstance(v, (bool, int, np.integer)) for v in values):
        ids = {int(v) for v in values}
        if ids != set(range(len(ids))):
            raise DataError(f"data {name!r}: integer labels in column {label_column!r} must be the class ids 0..K-1, "
                            f"each used; found {len(ids)} distinct ids up to {max(ids)}; recode them, or set "
                            "data.labels")
        return LabelCoder([str(i) for i in range(len(ids))], None, "integers kept (label pass)"), counters
    kinds = sorted({type(v).__name__ for v in values})
    raise DataError(f"data {name!r}: label column {label_column!r} must hold integers or strings, got "
                    f"{', '.join(kinds)}")


def load_streaming(
    name: str,
    *,
    train_split: str = "train",
    test_split: str = "test",
    text_column: str | None = None,
    image_column: str | None = None,
    label_column: str = "label",
    data_files: dict | str | None = None,
    labels: Sequence[str] | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    test_size: float = 0.2,
) -> ClassificationData:
    """Open a Hugging Face dataset as streams; draw the bounded samples asked for (see the module docstring).

    Args:
        name: ``hf:<hub id>[:<config>]`` or a local builder (``csv``, ``json``, ``parquet``, ``imagefolder``).
        train_split: Split to train on.
        test_split: Split to evaluate on; when the source has only ``train_split``, rows are held out per row with
            probability ``test_size`` (seeded by ``seed``).
        text_column: Text input column (default ``text`` or ``sentence``).
        image_column: Image input column (default ``image`` or ``img``).
        label_column: Label column.
        data_files: Local builders: a path or ``{split: path}``.
        labels: The class names (``data.labels``); without it the label set comes from a ClassLabel feature or, for
            local files, a label-only pass.
        max_train_samples: A stratified, seeded per-class sample of the train stream, held in memory (else the
            train split stays a :class:`StreamSplit`).
        max_eval_samples: The same for the test split.
        seed: Seed of the carve and the samples.
        test_size: Held-out share when the test split is carved.

    Returns:
        The dataset; a split is a :class:`Split` when sampled, else a :class:`StreamSplit`.

    Raises:
        ConfigError: A hub dataset whose label set cannot be known without downloading it all.
        DataError: Missing split or column, unusable labels, a source that cannot be streamed.
    """
    loaded = _load_stream_dict(name, data_files)
    available = ", ".join(loaded.keys())
    if train_split not in loaded:
        raise DataError(f"data {name!r}: split {train_split!r} not found; available splits: {available}")
    train_ds = loaded[train_split]
    columns = list(train_ds.column_names or _first_row(name, train_split, train_ds))
    if label_column not in columns:
        raise DataError(f"data {name!r}: label column {label_column!r} not found; available columns: "
                        f"{', '.join(columns)}")
    input_column, modality = _pick_input_column(name, columns, text_column, image_column)
    feature = (train_ds.features or {}).get(input_column)
    if modality == "image":
        import datasets

        if isinstance(feature, datasets.Image):  # decode only the rows kept or batched, not every row read
            loaded = {k: v.cast_column(input_column, datasets.Image(decode=False)) for k, v in loaded.items()}
            train_ds = loaded[train_split]
    label_feature = (train_ds.features or {}).get(label_column)

    def source(ds: Any, split: str, carves: tuple = ()) -> StreamSource:
        return StreamSource(ds.select_columns([input_column, label_column]), input_column, label_column, modality,
                            f"data {name!r} split {split!r}", carves)

    if test_split in loaded:
        test_ds = loaded[test_split]
        test_columns = list(test_ds.column_names or _first_row(name, test_split, test_ds))
        missing = [c for c in (input_column, label_column) if c not in test_columns]
        if missing:
            raise DataError(f"data {name!r} split {test_split!r}: column {missing[0]!r} not found; "
                            f"available columns: {', '.join(test_columns)}")
        train_src, test_src = source(train_ds, train_split), source(test_ds, test_split)
        split_rule = f"given splits {train_split!r}/{test_split!r}"
    elif list(loaded.keys()) == [train_split]:
        train_src = source(train_ds, train_split, ((seed, KEY_TEST_CARVE, test_size, False),))
        test_src = source(train_ds, f"{test_split} (held out of {train_split})",
                          ((seed, KEY_TEST_CARVE, test_size, True),))
        split_rule = f"per-row seeded hold-out of {test_size:.0%} of {train_split!r} (streaming), seed {seed}"
    else:
        raise DataError(f"data {name!r}: split {test_split!r} not found; available splits: {available}")

    coder = _coder(name, label_column, label_feature, labels)
    counters = None
    if coder is None:
        if name not in LOCAL_BUILDERS:
            raise ConfigError(f"data {name!r} with data.streaming=true: label column {label_column!r} has no "
                              "ClassLabel feature, so the label set needs a pass over the whole dataset; set "
                              "data.labels to the class names")
        coder, counters = _coder_from_pass(name, label_column, [train_src, test_src])
    if len(coder.names) < 2:
        raise DataError(f"data {name!r}: {len(coder.names)} class in the label set; need at least 2")
    train: Split | StreamSplit = StreamSplit(train_src, coder)
    test: Split | StreamSplit = StreamSplit(test_src, coder)
    for split, counter, needed in ((train, 0, max_train_samples), (test, 1, max_eval_samples)):
        if counters is not None:  # the label pass counted every value
            values = list(counters[counter])
            ids = coder.encode(values, split.source.what)
            split.class_counts = np.bincount(ids, weights=[counters[counter][v] for v in values],
                                             minlength=len(coder.names)).astype(np.int64)
            split.num_rows = int(split.class_counts.sum())
        elif needed is not None:
            split.count()  # one label-only pass (K counters): the stratified quotas need the class sizes
    full_sizes = {"train": train.num_rows, "test": test.num_rows}
    if max_train_samples is not None:
        train = train.sample(stratified_counts(train.class_counts, max_train_samples), seed, KEY_TRAIN_SAMPLE)
    if max_eval_samples is not None:
        test = test.sample(stratified_counts(test.class_counts, max_eval_samples), seed, KEY_EVAL_SAMPLE)
    info: dict[str, Any] = {
        "source": name if name.startswith("hf:") else f"local {name}",
        "data_files": _jsonable(data_files),
        "columns": {"input": input_column, "label": label_column},
        "label_encoding": coder.encoding,
        "splits_available": list(loaded.keys()),
        "split_rule": split_rule,
        "full_sizes": full_sizes,
        "streaming": {"sampling": "bottom-k per class on seeded per-row keys", "read_batch": READ_BATCH},
    }
    return ClassificationData(name, modality, train, test, len(coder.names), list(coder.names), info)
