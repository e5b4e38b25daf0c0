"""Class names of a run: stored with the run, and matched by name (never by position) when data comes back.

Class ids are positions in ``ClassificationData.class_names``, and string labels get their ids by sorting, so the
same class can carry another id in another file (a ClassLabel ``[pos, neg]`` in training, strings ``neg``/``pos``
sorted the other way at evaluation). A trained head's output ``k`` means the run's ``class_names[k]``:
:func:`align_class_names` renumbers a dataset's labels into the run's ids, or refuses when the names differ.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nc_finetune import runs
from nc_finetune.errors import DataError

#: Where a run's class names live: ``summary.json`` (canonical, written by ``run``), then ``probe.json``'s meta.
_SOURCES = ((runs.SUMMARY, ("class_names",)), (runs.PROBE, ("meta", "class_names")))


def run_class_names(run_dir: str | Path) -> list[str] | None:
    """The class names a run was trained with, in head-output order; ``None`` when the run stored none."""
    for name, keys in _SOURCES:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        value = json.loads(path.read_text(encoding="utf-8"))
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, list):
            return [str(v) for v in value]
    return None


def align_class_names(trained: Sequence[str] | None, data, where: str):
    """Renumber ``data``'s labels so that id ``k`` means ``trained[k]``.

    Args:
        trained: The run's class names (``None``: an old run without names; ``data`` is returned unchanged).
        data: A :class:`~nc_finetune.data.ClassificationData`.
        where: The run, for messages.

    Returns:
        ``data`` itself when the names agree in order, else a copy with remapped labels and the run's class names.

    Raises:
        DataError: The two sets of class names differ (the message names both).
    """
    names = [str(n) for n in data.class_names]
    if trained is None or list(trained) == names:
        return data
    trained = [str(n) for n in trained]
    if sorted(trained) != sorted(names) or len(set(names)) != len(names):
        missing = [n for n in trained if n not in names]
        unknown = [n for n in names if n not in trained]
        detail = "; ".join(part for part in (f"not in the data: {_fmt(missing)}" if missing else "",
                                             f"unknown to the run: {_fmt(unknown)}" if unknown else "") if part)
        raise DataError(f"{where} was trained on classes {_fmt(trained)}; data '{data.name}' has classes "
                        f"{_fmt(names)}" + (f" ({detail})" if detail else ""))
    new_id = np.asarray([trained.index(n) for n in names], dtype=np.int64)  # data id -> run id
    train, test = (split.relabelled(new_id) if hasattr(split, "relabelled")  # a stream: relabelled as it is read
                   else dataclasses.replace(split, labels=new_id[np.asarray(split.labels)])
                   for split in (data.train, data.test))
    info = {**data.info, "label_map": {n: int(i) for n, i in zip(names, new_id, strict=True)}}
    return dataclasses.replace(data, train=train, test=test, class_names=list(trained), info=info)


def _fmt(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"
