"""Results that leave the toolkit: a finished run as a model of its own library (``nc-finetune export``), and a
selection as a plain peft ``LoraConfig`` (``select --emit-peft``).

``export RUN --out DIR`` writes, by method:

* ``linear_probe`` / ``finetune`` / ``full`` (and ``lora --merge``): the library's task model with the trained head
  as its classifier (see :mod:`nc_finetune.backbones.export_target`): a ``save_pretrained`` directory with
  ``id2label`` for Hugging Face backbones, a timm ``local-dir`` (``model.safetensors`` + ``config.json``) for timm.
* ``lora``: a peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``) on that task model, with the
  library's module names, the head in ``modules_to_save`` under the classifier's name and
  ``base_model_name_or_path`` set (the hub/timm name when the base is the published checkpoint, else ``DIR/base``).
* ``scl``, and any truncated backbone (no library class has their wiring): ``model.safetensors`` with every tensor
  of the classifier, loaded by :func:`load_export`.

Every export is checked before it is written: its logits on a sample batch must equal the run's. ``DIR/nc_export.json``
records the format, the class names and the Python that loads it (``DIR`` standing for the directory).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nc_finetune import runs
from nc_finetune.errors import ConfigError, UserError
from nc_finetune.utils.io import write_json_atomic, write_text_atomic

#: The manifest every export directory holds.
MANIFEST = "nc_export.json"
_WEIGHTS = "model.safetensors"
_PEFT = "base_model.model."
_LORA_HEAD = "nc_head.modules_to_save.default."


def write_peft_config(recipe, selection, path: str | Path) -> Path:
    """Write ``selection`` as a peft ``adapter_config.json`` for the recipe's plain model (no nc-finetune wrapper).

    The backbone is built without weights (only its module names matter). ``LoraConfig.from_pretrained`` reads the
    file's directory when it is named ``adapter_config.json``; ``LoraConfig.from_json_file`` reads any name.

    Args:
        recipe: The validated recipe (``backbone`` names the model, ``adapt.lora_*`` the LoRA settings).
        selection: The :class:`~nc_finetune.select.Selection` to express.
        path: Destination JSON file.

    Returns:
        ``path``.
    """
    from nc_finetune.backbones import load_backbone

    b, a = recipe.backbone, recipe.adapt
    backbone = load_backbone(b.name, pooling=b.pooling, image_size=b.image_size, max_length=b.max_length,
                             pretrained=False)
    config = selection.peft_config(backbone.plain_model(), r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout)
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)  # peft's own serialisation (sets as lists, enums as strings)
        text = (Path(tmp) / "adapter_config.json").read_text(encoding="utf-8")
    return write_text_atomic(path, text)


def export_run(run_dir: str | Path, out: str | Path, *, merge: bool = False) -> dict[str, Any]:
    """Export a finished run's model (see the module docstring for the formats).

    Args:
        run_dir: Directory of a finished ``nc-finetune run``.
        out: New (or empty) export directory.
        merge: LoRA runs: merge the adapter into the weights and write a plain model instead of an adapter (other
            methods have nothing to merge and ignore it).

    Returns:
        The manifest written to ``out/nc_export.json``.

    Raises:
        UserError: Not a finished run, ``out`` not empty or being written by another export, or class names that
            do not fit the head.
        ConfigError: A model no format reproduces.
    """
    run = runs.RunDir(run_dir)
    out = Path(out)
    run.require_finished_run("export")
    with export_lock(out):
        return _export(run, out, merge)


@contextlib.contextmanager
def export_lock(out: Path) -> Iterator[None]:
    """Hold the lock of export directory ``out`` (as other writing commands hold their ``--out``'s): two exports
    to one directory would share its temporary copy.

    The lock lives beside ``out`` (``.<name>.lock/``, removed afterwards): ``out`` itself must stay empty until the
    finished export is renamed into place.

    Raises:
        UserError: another export to ``out`` is running.
    """
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(runs.RunDir(out.with_name(f".{out.name}.lock")).lock("export"))
        except UserError as e:
            raise UserError(f"--out {out} is being written by another export: {e}") from None
        yield


def _export(run: runs.RunDir, out: Path, merge: bool) -> dict[str, Any]:
    """:func:`export_run` under the lock of ``out``."""
    from safetensors.torch import load_file

    from nc_finetune.labels import run_class_names

    run_dir = run.path
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty directory; choose a new one")
    recipe = run.read_recipe()
    weights = load_file(str(run / runs.WEIGHTS))
    head = weights.get("nc_head.weight", weights.get(_PEFT + _LORA_HEAD + "weight"))
    if head is None:
        raise UserError(f"{run_dir}/trainable.safetensors holds no head (nc_head)")
    num_classes = int(head.shape[0])
    class_names = run_class_names(run_dir) or [str(k) for k in range(num_classes)]
    if len(class_names) != num_classes:
        raise UserError(f"{run_dir} names {len(class_names)} classes but its head has {num_classes} outputs")

    adapted, backbone = _rebuild(recipe, run_dir, weights, num_classes)
    inputs = _sample_inputs(backbone)
    with torch.no_grad():
        reference = adapted.model(**inputs)  # (B, K)
    method = recipe.adapt.method
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if method == "scl" or recipe.backbone.truncate_at is not None:
            model = adapted.model.merge_and_unload() if method == "lora" else adapted.model
            manifest = _export_weights(model, recipe, num_classes, tmp, inputs, reference)
        elif method == "lora" and not merge:
            manifest = _export_adapter(adapted, recipe, run_dir, num_classes, class_names, tmp, inputs, reference)
        else:
            model = adapted.model.merge_and_unload() if method == "lora" else adapted.model
            manifest = _export_model(backbone, model.nc_head, class_names, tmp, inputs, reference)
        manifest.update({"run": str(run_dir), "method": method, "merged": method == "lora" and merge,
                         "class_names": list(class_names)})
        write_json_atomic(tmp / MANIFEST, manifest)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _rebuild(recipe, run_dir: Path, weights: dict, num_classes: int):
    """The run's classifier with its trained weights (as ``eval`` rebuilds it), and its backbone."""
    from nc_finetune.adapt import build_classifier
    from nc_finetune.pipeline import load_recipe_backbone
    from nc_finetune.select import Selection
    from nc_finetune.utils.env import seed_everything

    seed_everything(recipe.train.seed)  # as run_pipeline: a randomly initialised backbone is drawn right after seeding
    backbone = load_recipe_backbone(recipe)
    proj = weights.get("skip_proj.weight")
    skip_dim = int(proj.shape[1]) if proj is not None else backbone.feature_dim  # identity P: equal dims
    # A fixed (etf) head is not saved, so such a run was refused above: the head here is the trained linear one.
    adapted = build_classifier(backbone, num_classes, cfg=recipe.adapt, selection=Selection.load(
        run_dir / runs.SELECTION), skip_dim=skip_dim,
        copy_backbone=False)  # the export reads the trained weights from backbone.model
    unexpected = sorted(set(weights) - set(adapted.model.state_dict()))
    if unexpected:
        raise UserError(f"{run_dir}/trainable.safetensors does not fit the rebuilt model ({unexpected[0]})")
    adapted.model.load_state_dict(weights, strict=False)
    adapted.model.eval()
    return adapted, backbone


def _sample_inputs(backbone) -> dict[str, torch.Tensor]:
    """A small prepared batch that the export's logits are checked on."""
    if backbone.modality == "image":
        raw: Any = np.random.default_rng(0).integers(0, 256, size=(3, 40, 40, 3), dtype=np.uint8)
    else:
        raw = ["a short example", "another, somewhat longer example of a text to classify", "x"]
    return backbone.prepare(raw)


def _check(model: nn.Module, inputs: dict, reference: torch.Tensor, what: str) -> None:
    from nc_finetune.backbones.export_target import LOGIT_TOLERANCE, logits_of

    with torch.no_grad():
        diff = float((logits_of(model, inputs) - reference).abs().max())
    if not diff <= LOGIT_TOLERANCE:
        raise ConfigError(f"the exported {what} does not reproduce the run's logits (max difference {diff:.3g})")


def _export_model(backbone, head: nn.Linear, class_names, out: Path, inputs: dict, reference) -> dict[str, Any]:
    from nc_finetune.backbones.export_target import export_target

    target = export_target(backbone, head, class_names, inputs, reference)
    target.save(target.model, out)
    return {"format": target.kind, "load": target.load_code}


def _export_adapter(adapted, recipe, run_dir: Path, num_classes: int, class_names, out: Path, inputs: dict,
                    reference) -> dict[str, Any]:
    """A peft adapter on the library's task model, its base either published or written to ``out/base``."""
    import peft

    from nc_finetune.adapt import Classifier
    from nc_finetune.backbones.export_target import export_target, published_base
    from nc_finetune.pipeline import load_recipe_backbone
    from nc_finetune.select import Selection
    from nc_finetune.utils.env import seed_everything

    seed_everything(recipe.train.seed)
    base = load_recipe_backbone(recipe)  # the weights LoRA was trained on
    head = adapted.model.base_model.model.nc_head.modules_to_save["default"]
    base_clf = Classifier(base.model, base.feature_dim, num_classes)
    base_clf.nc_head.load_state_dict(head.state_dict())
    with torch.no_grad():
        base_reference = base_clf.eval()(**inputs)
    target = export_target(base, base_clf.nc_head, class_names, inputs, base_reference)
    published = published_base(base, target.kind, recipe.backbone, num_classes)
    base_dir = out / "base"
    if published is None:
        target.save(target.model, base_dir)
    a = recipe.adapt
    config = Selection.load(run_dir / runs.SELECTION).peft_config(
        target.model, r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout, modules_to_save=[target.head_name])
    model = peft.get_peft_model(target.model, config)
    plain = _PEFT + "backbone." + base.plain_prefix
    state = {}
    for key, value in adapted.model.state_dict().items():
        if ".lora_" in key and key.startswith(plain):
            state[_PEFT + target.name_of(key[len(plain):])] = value
        elif key.startswith(_PEFT + _LORA_HEAD):
            state[f"{_PEFT}{target.head_name}.modules_to_save.default.{key[len(_PEFT + _LORA_HEAD):]}"] = value
    known = model.state_dict()
    stray = sorted(k for k in state if k not in known)
    if stray:
        raise ConfigError(f"cannot export the adapter: '{stray[0]}' has no place in the {target.kind} model")
    model.load_state_dict(state, strict=False)
    model.eval()
    _check(model, inputs, reference, "adapter")
    model.peft_config["default"].base_model_name_or_path = published[0] if published else "base"
    model.save_pretrained(str(out))
    base_code = published[1] if published else 'BASE = f"{DIR}/base"\n' + target.load_code.replace("DIR", "BASE")
    return {"format": f"peft+{target.kind}", "base": published[0] if published else "base",
            "load": f"{base_code.replace('model = ', 'base = ')}\nfrom peft import PeftModel\n"
                    "model = PeftModel.from_pretrained(base, DIR)"}


def _export_weights(model: nn.Module, recipe, num_classes: int, out: Path, inputs: dict, reference) -> dict:
    """Every tensor of the classifier plus what :func:`load_export` needs to rebuild it."""
    from safetensors.torch import save_file

    from nc_finetune.config import recipe_to_dict

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / _WEIGHTS))
    spec = {"backbone": recipe_to_dict(recipe)["backbone"], "num_classes": num_classes,
            "skip_block": getattr(model, "skip_block", None), "wiring": getattr(model, "wiring", "add"),
            "skip_dim": int(model.skip_proj.in_features) if isinstance(getattr(model, "skip_proj", None), nn.Linear)
            else None}
    manifest = {"format": "nc-finetune", "classifier": spec,
                "load": "from nc_finetune.export import load_export\nmodel, backbone = load_export(DIR)"}
    loaded, _ = _load_weights_export(out, manifest)
    _check(loaded, inputs, reference, "weights")
    return manifest


def load_export(path: str | Path) -> tuple[nn.Module, Any]:
    """Load an export of format ``nc-finetune`` (SCL-FT, truncated backbones).

    Example::

        model, backbone = load_export("exports/scl")
        logits = model(**backbone.prepare(["a text", "another"]))   # (B, K); class k is manifest class_names[k]

    Args:
        path: The export directory.

    Returns:
        ``(model, backbone)``: the classifier in eval mode (``model(**inputs) -> (B, K)`` logits) and the backbone
        whose :meth:`~nc_finetune.backbones.Backbone.prepare` makes its inputs.

    Raises:
        UserError: ``path`` is no export of this format.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not an nc-finetune export (no readable {MANIFEST})") from e
    if manifest.get("format") != "nc-finetune":
        raise UserError(f"{path} holds a {manifest.get('format')!r} export; load it with: {manifest.get('load')}")
    return _load_weights_export(path, manifest)


def _load_weights_export(path: Path, manifest: dict) -> tuple[nn.Module, Any]:
    from safetensors.torch import load_file

    from nc_finetune.adapt import Classifier
    from nc_finetune.backbones import load_backbone

    spec = manifest["classifier"]
    b = spec["backbone"]
    backbone = load_backbone(b["name"], pooling=b["pooling"], image_size=b["image_size"],
                             max_length=b["max_length"], pretrained=False)
    if b.get("truncate_at") is not None:
        from nc_finetune.backbones.truncate import truncate_backbone

        backbone = truncate_backbone(backbone, b["truncate_at"])
    model = Classifier(backbone.model, backbone.feature_dim, spec["num_classes"], pool=backbone.pool,
                       skip_block=spec["skip_block"], skip_dim=spec["skip_dim"] or backbone.feature_dim,
                       wiring=spec["wiring"])
    model.load_state_dict(load_file(str(path / _WEIGHTS)), strict=True)
    return model.eval(), backbone
