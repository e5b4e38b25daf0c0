"""What an export writes for each model family: the library's own task model holding a backbone and a trained head.

:func:`export_target` builds, from a :class:`~nc_finetune.backbones.Backbone` and a linear head, the model a user of
that library loads without nc-finetune:

* Hugging Face: the ``AutoModelForSequenceClassification`` / ``AutoModelForImageClassification`` class of the model
  when it feeds the head exactly what nc-finetune pooled (ViT-style CLS classifiers); otherwise (BERT's tanh pooler,
  mean pooling) a small task class shipped in the directory (:mod:`nc_finetune.backbones.hf_export_modeling`), loaded
  with ``trust_remote_code=True``. Which one is decided by comparing logits, never by model name.
* timm: the timm model with ``num_classes=K``, the head as timm's classifier, saved by ``timm.models.save_for_hf``
  (``model.safetensors`` + ``config.json``), loaded with ``timm.create_model("local-dir:DIR", pretrained=True)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from nc_finetune.backbones.base import Backbone
from nc_finetune.errors import ConfigError

#: Largest |difference| between exported and nc-finetune logits that counts as equal (float32 reordering).
LOGIT_TOLERANCE = 1e-4


@dataclass
class ExportTarget:
    """A library task model with the backbone's weights and the head.

    Attributes:
        model: The task model (eval mode, CPU).
        head_name: Module name of the classifier in :attr:`model` (peft ``modules_to_save``).
        backbone_prefix: Where ``backbone.plain_model()`` sits in :attr:`model` (``"vit."``, ``"backbone."``, ``""``).
        kind: ``"transformers"``, ``"transformers-remote-code"`` or ``"timm"``.
        save: Writes :attr:`model` (and the tokenizer, for text) to a directory.
        load_code: Python that loads the saved directory ``DIR`` with the library alone.
    """

    model: nn.Module
    head_name: str
    backbone_prefix: str
    kind: str
    save: Callable[[nn.Module, Path], None]
    load_code: str

    def name_of(self, plain_name: str) -> str:
        """Name in :attr:`model` of a module/tensor named ``plain_name`` inside ``backbone.plain_model()``."""
        return self.backbone_prefix + plain_name


def logits_of(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """``(B, K)`` logits of a task model (transformers outputs carry them in ``.logits``)."""
    out = model(**inputs)
    return getattr(out, "logits", out)


def export_target(backbone: Backbone, head: nn.Linear, class_names: Sequence[str], inputs: dict[str, Tensor],
                  reference: Tensor) -> ExportTarget:
    """The task model of ``backbone``'s library with ``head`` as its classifier.

    Args:
        backbone: The (trained) backbone; its weights are copied.
        head: Linear head on the backbone's pooled feature.
        class_names: Class ``k``'s name for ``id2label`` / ``label_names``.
        inputs: A prepared batch, to check the export.
        reference: nc-finetune's logits on ``inputs``.

    Raises:
        ConfigError: The backbone is of no exportable family, or its export does not reproduce ``reference``.
    """
    from nc_finetune.backbones.hf_backbone import HFFeatureModel

    if isinstance(backbone.model, HFFeatureModel):
        candidates = [_hf_standard, _hf_remote_code]
    elif hasattr(backbone.model, "pretrained_cfg"):
        candidates = [_timm]
    else:
        raise ConfigError(f"cannot export {backbone.spec}: only Hugging Face and timm backbones have a library format")
    worst = float("nan")
    for build in candidates:
        target = build(backbone, head, list(class_names))
        if target is None:
            continue
        with torch.no_grad():
            try:
                diff = float((logits_of(target.model, inputs) - reference).abs().max())
            except (RuntimeError, ValueError, TypeError):  # e.g. a position embedding that needs interpolation
                continue
        if diff <= LOGIT_TOLERANCE:
            return target
        worst = diff
    raise ConfigError(f"cannot export {backbone.spec}: no library format reproduces its logits "
                      f"(max difference {worst:.3g})")


def _labels(class_names: list[str]) -> dict:
    return {"id2label": dict(enumerate(class_names)), "label2id": {n: i for i, n in enumerate(class_names)}}


def _load_checked(model: nn.Module, state: dict[str, Tensor]) -> bool:
    """Load ``state``; True when it covered every persistent tensor of ``model`` (nothing left at random init)."""
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        return False
    return not result.missing_keys


def _hf_save(backbone: Backbone) -> Callable[[nn.Module, Path], None]:
    tokenizer = getattr(backbone.preprocess, "tokenizer", None)

    def save(model: nn.Module, out: Path) -> None:
        model.save_pretrained(str(out))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))

    return save


def _hf_state(backbone: Backbone, head: nn.Linear, prefix: str, head_name: str) -> dict[str, Tensor]:
    state = {prefix + k: v for k, v in backbone.plain_model().state_dict().items()}
    state.update({f"{head_name}.weight": head.weight.detach(), f"{head_name}.bias": head.bias.detach()})
    return state


def _hf_auto_class(backbone: Backbone):
    import transformers

    if backbone.modality == "image":
        return transformers.AutoModelForImageClassification
    return transformers.AutoModelForSequenceClassification


def _hf_standard(backbone: Backbone, head: nn.Linear, class_names: list[str]) -> ExportTarget | None:
    """transformers' own task class, when loading our weights into it leaves nothing at random init."""
    auto = _hf_auto_class(backbone)
    config = copy.deepcopy(backbone.plain_model().config)
    for key, value in _labels(class_names).items():
        setattr(config, key, value)
    try:
        model = auto.from_config(config)
    except ValueError:  # no task class of this kind for the model type
        return None
    prefix = model.base_model_prefix
    heads = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == len(class_names)
             and not n.startswith(prefix + ".")]
    if len(heads) != 1 or model.get_submodule(heads[0]).in_features != head.in_features:
        return None
    if not _load_checked(model, _hf_state(backbone, head, prefix + ".", heads[0])):
        return None  # e.g. BERT's pooler: trained by nobody
    name = auto.__name__
    return ExportTarget(model.eval(), heads[0], prefix + ".", "transformers", _hf_save(backbone),
                        f"from transformers import {name}\nmodel = {name}.from_pretrained(DIR)")


def _hf_remote_code(backbone: Backbone, head: nn.Linear, class_names: list[str]) -> ExportTarget:
    """The task class of :mod:`~nc_finetune.backbones.hf_export_modeling`, shipped in the directory."""
    from nc_finetune.backbones import hf_export_modeling as m

    auto = _hf_auto_class(backbone)
    cls = m.NCPooledForImageClassification if backbone.modality == "image" else m.NCPooledForSequenceClassification
    config = m.NCPooledConfig(backbone_config=backbone.plain_model().config.to_dict(), pooling=backbone.pooling,
                              num_prefix_tokens=backbone.num_prefix_tokens,
                              interpolate_pos_encoding=bool(getattr(backbone.model, "interpolate_pos_encoding", False)),
                              architectures=[cls.__name__], **_labels(class_names))
    m.NCPooledConfig.register_for_auto_class()  # save_pretrained writes auto_map and copies the module file
    cls.register_for_auto_class(auto.__name__)
    model = cls(config)
    if not _load_checked(model, _hf_state(backbone, head, "backbone.", "classifier")):
        raise ConfigError(f"cannot export {backbone.spec}: its weights do not fit {cls.__name__}")
    name = auto.__name__
    return ExportTarget(model.eval(), "classifier", "backbone.", "transformers-remote-code", _hf_save(backbone),
                        f"from transformers import {name}\nmodel = {name}.from_pretrained(DIR, trust_remote_code=True)")


def _timm(backbone: Backbone, head: nn.Linear, class_names: list[str]) -> ExportTarget:
    model = copy.deepcopy(backbone.plain_model())
    model.reset_classifier(len(class_names))  # keeps the model's global pooling
    classifier = model.get_classifier()
    head_name = next(n for n, mod in model.named_modules() if mod is classifier)
    classifier.load_state_dict(head.state_dict())

    def save(model: nn.Module, out: Path) -> None:
        from timm.models import save_for_hf

        save_for_hf(model, str(out), model_config={"label_names": list(class_names)}, safe_serialization=True)

    return ExportTarget(model.eval(), head_name, "", "timm", save,
                        'import timm\nmodel = timm.create_model(f"local-dir:{DIR}", pretrained=True)')



def published_base(backbone: Backbone, kind: str, config, num_classes: int) -> tuple[str, str] | None:
    """The published checkpoint an adapter's base loads from, when the run's base weights are its weights.

    Args:
        backbone: The backbone LoRA was trained on.
        kind: The :attr:`ExportTarget.kind` of the export.
        config: The run's ``BackboneConfig`` (``pretrained``, ``init_from``).
        num_classes: K, for the task model's head.

    Returns:
        ``(name, Python that loads it as model)``, or ``None`` when the base must be written with the export:
        built-in assets, random init, weights restored from another run, the shipped-code task class.
    """
    source = backbone.provenance.get("source", "")
    if kind == "transformers-remote-code" or not config.pretrained or config.init_from or ":" not in source:
        return None
    prefix, ref = source.split(":", 1)
    if backbone.family != prefix:  # built-in assets come from a package, not from the hub
        return None
    if kind == "timm":
        return ref, f"import timm\nmodel = timm.create_model({ref!r}, pretrained=True, num_classes={num_classes})"
    name = _hf_auto_class(backbone).__name__
    load = f"{name}.from_pretrained({ref!r}, num_labels={num_classes}, ignore_mismatched_sizes=True)"
    return ref, f"from transformers import {name}\nmodel = {load}"
