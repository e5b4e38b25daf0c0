"""Restore a finished run: start from the model an earlier ``nc-finetune run`` trained (``backbone.init_from``).

Use case: fine-tune on a source domain, then adapt that model to a shifted target domain (for example the same
images corrupted, ``data.corruption``), which is the setting of surgical fine-tuning. The earlier run's trained
backbone weights are written into a freshly built backbone of the same name; its head is dropped (the new run
trains a new one). LoRA runs are merged into the weights with peft's ``merge_and_unload``. The run directory is read
through :class:`~nc_finetune.runs.RunDir`; the classifier a LoRA run trained is rebuilt by :mod:`nc_finetune.adapt`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nc_finetune import runs
from nc_finetune.errors import ConfigError, UserError
from nc_finetune.runs import RunDir

_BACKBONE_PREFIX = "backbone."
_PEFT_PREFIX = "base_model.model."


def restore_backbone_weights(backbone, run_dir: str | Path, *, name: str, pretrained: bool,
                             _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Overwrite ``backbone``'s weights with those a finished run trained.

    A run that itself started from another run (its own ``backbone.init_from``) trained on top of that run's
    weights, so those are restored first, down the chain (a ``full`` run of the whole backbone saved every weight
    and ends it).

    Args:
        backbone: A freshly loaded :class:`~nc_finetune.backbones.Backbone` (modified in place).
        run_dir: Directory of a finished ``nc-finetune run``.
        name: This recipe's ``backbone.name`` (must be the run's).
        pretrained: This recipe's ``backbone.pretrained`` (must be the run's).

    Returns:
        Provenance: ``{"run", "method", "tensors", "params"}`` (backbone tensors and parameters overwritten).

    Raises:
        UserError: Not a finished run, weights that do not fit the backbone, or an init_from chain that loops.
        ConfigError: A run of a different ``backbone.name``/``backbone.pretrained``, or one that trained only part
            of a randomly initialised backbone (its frozen part cannot be rebuilt).
    """
    from nc_finetune.utils.io import load_safetensors

    run_dir = Path(run_dir)
    what = "backbone.init_from"
    run = RunDir(run_dir)
    src = run.read_finished_recipe(what)
    if src.backbone.name != name:
        raise ConfigError(f"{what}: {run_dir} trained backbone {src.backbone.name!r}, but backbone.name is {name!r}; "
                          f"set backbone.name={src.backbone.name}")
    if src.backbone.pretrained != pretrained:
        raise ConfigError(f"{what}: {run_dir} used backbone.pretrained={src.backbone.pretrained}; set the same here")
    method = src.adapt.method
    if not pretrained and method != "full":
        raise ConfigError(f"{what}: {run_dir} trained part of a randomly initialised backbone "
                          f"(adapt.method={method}); its frozen blocks cannot be rebuilt; start from a full run")
    if src.backbone.init_from and (method != "full" or src.backbone.truncate_at is not None):
        key = run_dir.resolve()
        if key in _chain:
            raise UserError(f"{what}: {run_dir} starts from itself (backbone.init_from chain: "
                            f"{' -> '.join(map(str, (*_chain, key)))})")
        restore_backbone_weights(backbone, src.backbone.init_from, name=name, pretrained=pretrained,
                                 _chain=(*_chain, key))
    weights = load_safetensors(run / runs.WEIGHTS)
    if method == "lora":
        tensors = _merge_lora(backbone, run, src, weights)
    else:
        tensors = {k[len(_BACKBONE_PREFIX):]: v for k, v in weights.items() if k.startswith(_BACKBONE_PREFIX)}
        _load_into(backbone.model, tensors, run_dir)
    backbone.model.requires_grad_(True)  # the state every loader hands out
    backbone.model.eval()
    return {"run": str(run_dir), "method": method, "tensors": len(tensors),
            "params": int(sum(v.numel() for v in tensors.values()))}


def _load_into(model, tensors: dict, run_dir: Path) -> None:
    state = model.state_dict()
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        raise UserError(f"backbone.init_from: {run_dir}/trainable.safetensors does not fit this backbone "
                        f"('{unknown[0]}' is not one of its tensors)")
    bad = next((k for k, v in tensors.items() if tuple(v.shape) != tuple(state[k].shape)), None)
    if bad is not None:
        raise UserError(f"backbone.init_from: '{bad}' has shape {tuple(tensors[bad].shape)} in {run_dir}, "
                        f"{tuple(state[bad].shape)} in this backbone")
    model.load_state_dict(tensors, strict=False)


def _merge_lora(backbone, run: RunDir, src, weights: dict) -> dict:
    """Rebuild the run's LoRA classifier on ``backbone``, load its adapter, merge it into the base weights."""
    from nc_finetune.adapt import build_classifier

    run_dir = run.path
    a = src.adapt
    head = next((v for k, v in weights.items() if k.endswith("nc_head.modules_to_save.default.weight")), None)
    if head is not None:
        num_classes = int(head.shape[0])
    elif a.head == "etf" and (run / runs.PROBE).is_file():  # a fixed head is not saved: K from the probe
        num_classes = len(run.read_probe().meta["class_names"])
    else:
        raise UserError(f"backbone.init_from: {run_dir}/trainable.safetensors holds no LoRA head (nc_head)")
    adapted = build_classifier(backbone, num_classes, cfg=a, selection=run.read_selection(), copy_backbone=False)
    prefix = _PEFT_PREFIX + _BACKBONE_PREFIX
    # Only the backbone part is loaded: the head is dropped anyway, and its input width differs from this
    # backbone's when the run was truncated (backbone.truncate_at).
    weights = {k: v for k, v in weights.items() if k.startswith(prefix)}
    unknown = sorted(set(weights) - set(adapted.model.state_dict()))
    if unknown:
        raise UserError(f"backbone.init_from: {run_dir}/trainable.safetensors does not fit the rebuilt LoRA model "
                        f"('{unknown[0]}')")
    adapted.model.load_state_dict(weights, strict=False)
    merged = adapted.model.merge_and_unload()  # LoRA layers replaced in place by merged base layers
    if merged.backbone is not backbone.model:  # pragma: no cover - peft changed how it unloads
        raise RuntimeError("peft merge_and_unload did not merge into the backbone module in place")
    adapted_blocks = {k[len(prefix):].split(".lora_")[0] for k in weights if k.startswith(prefix) and ".lora_" in k}
    state = backbone.model.state_dict()
    return {k: v for k, v in state.items() if any(k.startswith(m + ".") for m in adapted_blocks)}
