"""``nc-finetune predict``: a finished run's per-sample predictions and class probabilities on new data.

The input is a table (``.csv``, ``.tsv``, ``.json``, ``.jsonl``, ``.parquet``) with the run's text column for a
text model, or an image file or a directory of image files for an image model. The output (``.csv`` or ``.jsonl``,
by extension) has one row per input, in input order: the predicted class name and id, its probability, and the
probability of every class; the input table's label column is copied when present.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from nc_finetune import runs
from nc_finetune.errors import DataError, UserError

TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
OUTPUT_SUFFIXES = (".csv", ".jsonl")
_TEXT_COLUMNS = ("text", "sentence", "content", "review")  # tried in order when the recipe names none


def read_table(path: Path):
    """A pandas DataFrame from a csv/tsv/json/jsonl/parquet file."""
    import pandas as pd

    suffix = path.suffix.lower()
    text_is_text = {"keep_default_na": False, "na_values": [""]}  # "NA", "None", "null" are texts; "" is missing
    try:
        if suffix == ".csv":
            return pd.read_csv(path, **text_is_text)
        if suffix == ".tsv":
            return pd.read_csv(path, sep="\t", **text_is_text)
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        if suffix == ".json":
            text = path.read_text(encoding="utf-8").lstrip()
            return pd.read_json(io.StringIO(text), lines=not text.startswith("["))
        return pd.read_parquet(path)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"predict: cannot read {path}: {str(e).splitlines()[0]}") from None


def read_inputs(path: Path, modality: str, column: str | None, label_column: str) -> dict[str, Any]:
    """The inputs to predict on, with a per-row source and the labels when the table has them.

    Args:
        path: A table file (text), or an image file / a directory of image files (images).
        modality: ``text`` or ``image`` (the run's backbone).
        column: The input column of a table (default: the recipe's, else a usual text column name).
        label_column: Copied to the output when the table has it.

    Returns:
        ``{"inputs": list, "sources": list[str], "labels": list | None}``.

    Raises:
        DataError: a missing file, an unsupported format, a missing column, or no input at all.
    """
    if not path.exists():
        raise DataError(f"predict: {path} does not exist")
    if modality == "image":
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
        if not files or files[0].suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"predict: an image model takes an image file or a directory of images "
                            f"({', '.join(IMAGE_SUFFIXES)}); found none in {path}")
        return {"inputs": files, "sources": [str(p) for p in files], "labels": None}
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise DataError(f"predict: a text model takes a table ({', '.join(TABLE_SUFFIXES)}); got {path}")
    table = read_table(path)
    if column is None:
        column = next((c for c in _TEXT_COLUMNS if c in table.columns), None)
    if column not in table.columns:
        raise DataError(f"predict: {path} has no text column {column!r}; columns: {', '.join(map(str, table.columns))}"
                        f" (choose one with --column)")
    if len(table) == 0:
        raise DataError(f"predict: {path} has no rows")
    texts = ["" if isinstance(v, float) and math.isnan(v) else str(v) for v in table[column].tolist()]
    labels = table[label_column].tolist() if label_column in table.columns else None
    return {"inputs": texts, "sources": [str(i) for i in range(len(texts))], "labels": labels}


def _load_images(files: list[Path]) -> list:
    from PIL import Image

    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy())
    return images


def check_finished_run(run_dir: Path) -> None:
    """Raises UserError unless ``run_dir`` holds what rebuilding its model needs."""
    needed = [runs.RESOLVED, runs.SELECTION, runs.PROBE, runs.WEIGHTS]
    missing = [n for n in needed if not (run_dir / n).exists()]
    if missing:
        raise UserError(f"{run_dir} is not a finished run: missing {', '.join(missing)}")


def load_run_classifier(run_dir: Path, example_inputs: list):
    """Rebuild a finished run's classifier with its trained weights.

    Args:
        run_dir: Directory of a finished ``nc-finetune run``.
        example_inputs: One raw input (SCL-FT may need a forward to size its skip block).

    Returns:
        ``(recipe, backbone, adapted, class_names)``.

    Raises:
        UserError: not a finished run, or weights that do not fit the rebuilt model.
    """
    from safetensors.torch import load_file

    from nc_finetune.adapt.recipe import build_recipe_classifier
    from nc_finetune.config import load_recipe
    from nc_finetune.data import Split
    from nc_finetune.evaluate import load_trained_weights
    from nc_finetune.pipeline import load_recipe_backbone
    from nc_finetune.probe.result import ProbeResult
    from nc_finetune.select import Selection

    check_finished_run(run_dir)
    recipe = load_recipe(run_dir / runs.RESOLVED)
    probe_result = ProbeResult.load(run_dir / runs.PROBE)
    weights = load_file(str(run_dir / runs.WEIGHTS))
    head = next((v for k, v in weights.items() if ".nc_head." in f".{k}" and k.endswith("weight")), None)
    class_names = probe_result.meta.get("class_names")
    if class_names is None:
        if head is None:
            raise UserError(f"{run_dir} records no class names and its weights hold no head")
        class_names = [str(k) for k in range(int(head.shape[0]))]
    backbone = load_recipe_backbone(recipe)
    selection = Selection.load(run_dir / runs.SELECTION)
    example = Split(example_inputs[:1], np.zeros(1, dtype=np.int64))
    adapted = build_recipe_classifier(recipe, backbone, len(class_names), selection, probe_result, example)
    load_trained_weights(adapted, weights, run_dir)
    return recipe, backbone, adapted, [str(c) for c in class_names]


def predict_stage(run_dir: Path, data: Path, out: Path, *, column: str | None = None,
                  batch_size: int | None = None) -> dict[str, Any]:
    """Write the predictions of a finished run on ``data`` to ``out`` (``.csv`` or ``.jsonl``).

    Returns:
        ``{"rows", "out", "class_names", "accuracy"}`` (accuracy only when the table has labels that are class
        names or ids of the run).
    """
    import torch

    from nc_finetune.adapt import eval_mode
    from nc_finetune.utils.env import resolve_device
    from nc_finetune.utils.io import write_text_atomic

    run_dir, data, out = Path(run_dir), Path(data), Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UserError(f"predict --out must end in {' or '.join(OUTPUT_SUFFIXES)}; got {out}")
    check_finished_run(run_dir)
    from nc_finetune.config import load_recipe

    d = load_recipe(run_dir / runs.RESOLVED).data
    modality = "text" if data.suffix.lower() in TABLE_SUFFIXES else "image"
    table = read_inputs(data, modality, column or d.text_column, d.label_column)  # before any model is built
    example = table["inputs"][:1]
    recipe, backbone, adapted, names = load_run_classifier(
        run_dir, _load_images(example) if modality == "image" else example)
    if backbone.modality != modality:
        raise UserError(f"predict: {run_dir} holds a model of {backbone.modality} inputs; {data} holds {modality} "
                        f"inputs")
    bs = batch_size or recipe.train.eval_batch_size
    device = resolve_device(recipe.train.device)
    model = adapted.model.to(device)
    probs = []
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(table["inputs"]), bs):
            raw = table["inputs"][start:start + bs]
            raw = _load_images(raw) if modality == "image" else raw
            inputs = backbone.finish({k: v.to(device) for k, v in backbone.collate(raw).items()})  # on the device
            probs.append(torch.softmax(model(**inputs).float(), dim=1).cpu().numpy())  # (B, K)
    p = np.concatenate(probs)  # (N, K)
    pred = p.argmax(1)
    rows = []
    for i, source in enumerate(table["sources"]):
        row: dict[str, Any] = {"source": source, "prediction": names[pred[i]], "prediction_id": int(pred[i]),
                               "probability": float(p[i, pred[i]])}
        if table["labels"] is not None:
            row["label"] = table["labels"][i]
        row.update({f"prob_{name}": float(p[i, k]) for k, name in enumerate(names)})
        rows.append(row)
    write_text_atomic(out, _format(rows, out.suffix.lower()))
    result: dict[str, Any] = {"rows": len(rows), "out": str(out), "class_names": names}
    if table["labels"] is not None:
        result["accuracy"] = _accuracy(table["labels"], pred, names)
    return result


def _accuracy(labels: list, pred: np.ndarray, names: list[str]) -> float | None:
    """Share of rows whose label (a class name, or a class id) equals the prediction; None if labels fit neither."""
    as_names = [str(y) for y in labels]
    if all(y in names for y in as_names):
        return float(np.mean([names.index(y) == k for y, k in zip(as_names, pred, strict=True)]))
    return None


def _format(rows: list[dict[str, Any]], suffix: str) -> str:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
