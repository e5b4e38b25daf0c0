"""Recipes: a typed schema, YAML loading, dotted ``key=value`` overrides and validation.

A recipe is data. It is read with ``yaml.safe_load`` and checked field by field against the dataclasses below;
every problem is reported as a one-line :class:`~nc_finetune.errors.ConfigError` that names the offending key and
the allowed values. The same schema serves every subcommand (``probe``, ``select``, ``run``, ``rank``), each of
which reads only the sections it needs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from nc_finetune.errors import ConfigError


@dataclass
class BackboneConfig:
    """Which pretrained model to probe or fine-tune."""

    name: str = "minilm-l6"
    """Built-in short name (``minilm-l6``, ``efficientnet-lite0``), ``timm:<model>`` or ``hf:<hub id or path>``."""
    pooling: Literal["auto", "cls", "mean"] = "auto"
    """Token pooling for transformer outputs; ``auto`` uses the model family's convention. Feature maps use GAP."""
    image_size: int | None = None
    """Input resolution for image backbones; default from the model's pretrained config."""
    max_length: int = 128
    """Tokenizer truncation length for text backbones."""
    pretrained: bool = True
    """Load pretrained weights (``false`` gives the random-init control)."""
    init_from: str | None = None
    """Directory of a finished ``nc-finetune run`` of the same backbone: start from the weights it trained (its head
    is dropped). For adapting a source-domain model to a shifted target, e.g. ``data.corruption``."""
    truncate_at: int | str | None = None
    """Cut the backbone after this block (index, negative from the end, or name): its pooled output becomes the
    final feature and later modules are dropped (a truncated transfer candidate)."""


@dataclass
class DataConfig:
    """The downstream classification dataset."""

    name: str = "rotten-tomatoes"
    """Built-in name, ``hf:<hub id>``, or a local format (``csv``, ``json``, ``parquet``, ``imagefolder``)."""
    data_files: str | dict[str, str] | None = None
    """Local files for ``csv``/``json``/``parquet``/``imagefolder`` (a path, or ``{split: path}``)."""
    train_split: str = "train"
    test_split: str = "test"
    text_column: str | None = None
    image_column: str | None = None
    label_column: str = "label"
    num_classes: int | None = None
    """Optional check: the run fails early if the data has a different number of classes."""
    max_train_samples: int | None = None
    """Stratified, seeded subsample of the training split."""
    max_eval_samples: int | None = None
    """Stratified, seeded subsample of the test split."""
    test_size: float = 0.2
    """Held-out fraction when the source has no test split."""
    seed: int = 0
    corruption: Literal["gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast", "brightness",
                        "pixelate", "invert"] | None = None
    """Image data only: an input-level shift (CIFAR-10-C style corruption) applied to both splits, seeded by
    ``seed``; the target domain of a surgical fine-tuning study."""
    corruption_severity: int = 3
    """1 (mild) .. 5 (strong)."""


@dataclass
class ProbeConfig:
    """The layer-wise collapse probe: one streaming pass over the downstream training split."""

    samples_per_class: int | None = 200
    """Deterministic per-class subsample of the training split (``null`` = every sample)."""
    batch_size: int = 64
    layers: str | list[int] = "all"
    """``all`` or a list of block indices (negative counts from the end)."""
    ncc_samples: int = 4096
    """Samples per layer kept (bounded reservoir) to score nearest-class-centre and linear-probe accuracy."""
    linear_probe: bool = False
    """Also fit a logistic-regression probe per layer (adds ``lp_accuracy``, and ``nc3`` on the last layer)."""
    autocast: bool = False
    """Run the forward under autocast (bf16 on CPU, fp16 on CUDA); statistics are always float64."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` ..."""
    seed: int = 0


@dataclass
class SelectionConfig:
    """Which blocks to adapt, chosen from the probe (or a baseline rule) under a budget."""

    strategy: Literal["knee", "stall", "last_k", "first_k", "random_k", "all", "manual", "auto_rgn"] = "knee"
    """NC-guided: ``knee``, ``stall``; baselines: ``last_k``, ``first_k``, ``random_k``, ``all``, ``manual``,
    ``auto_rgn``."""
    max_blocks: int | None = 1
    """Budget in blocks."""
    max_param_fraction: float | None = None
    """Budget as a fraction of the backbone's parameters."""
    blocks: list[int | str] | None = None
    """For ``manual``: block indices or names."""
    stall_fraction: float = 0.1
    """For ``stall``: the remaining blocks must add less than this share of the total log-NC1 reduction."""
    rgn_batches: int = 5
    """For ``auto_rgn``: mini-batches used to measure relative gradient norms."""
    seed: int = 0
    """For ``random_k``."""


@dataclass
class AdaptConfig:
    """How the selected blocks are adapted."""

    method: Literal["linear_probe", "finetune", "lora", "scl", "full"] = "finetune"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    scl_wiring: Literal["add", "concat", "replace"] = "add"
    freeze_bn: bool = True
    """Keep BatchNorm running statistics frozen inside trainable blocks."""


@dataclass
class TrainConfig:
    """The training loop (accelerate: one CPU, one GPU, or many via ``accelerate launch``/torchrun)."""

    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides ``epochs`` when reached first)."""
    batch_size: int = 32
    """Per-process micro-batch size."""
    eval_batch_size: int = 128
    lr: float = 1.0e-4
    """Learning rate of the adapted backbone parameters."""
    head_lr: float | None = None
    """Learning rate of the head (and skip projection); default: ``lr``."""
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision; ``auto``: bf16 on a GPU that supports it, else fp32 (``no``; bf16 autocast on a CPU is
    several times slower than fp32). The choice and its reason are in ``summary.json["precision"]``."""
    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass (timm ``set_grad_checkpointing``, Hugging Face
    ``gradient_checkpointing_enable``): less memory, more compute."""
    compile: bool = False
    """``torch.compile`` the model's forward (pays off on a GPU for long runs; the first steps compile)."""
    channels_last: bool = False
    """Channels-last memory format for image models and inputs (faster convolutions on tensor-core GPUs)."""
    val_fraction: float = 0.0
    """Held-out share of the training split for early stopping (0: no validation split)."""
    early_stopping_patience: int | None = None
    """Evaluations without validation improvement before stopping (needs ``val_fraction`` > 0)."""
    augment: bool = False
    """Random horizontal flips for images (disables the prefix cache)."""
    cache_prefix: Literal["auto", "on", "off"] = "auto"
    """Cache the frozen prefix's outputs (``auto``: whenever it is valid)."""
    log_every: int = 10
    checkpoint_every: int = 100
    """Optimizer steps between checkpoints (and one at every epoch end)."""
    seed: int = 0
    device: str = "auto"


@dataclass
class RankConfig:
    """``nc-finetune rank``: rank candidate backbones (and each one's layers) by downstream collapse."""

    candidates: list[dict[str, Any]] = field(default_factory=list)
    """Backbone sections (``{name: efficientnet-lite0, pretrained: false}``), each with an optional ``label``."""
    finetune: bool = False
    """Ground truth: train every candidate with this recipe's selection/adapt/train sections and use its test
    accuracy; otherwise the held-out linear-probe accuracy of the probe (``probe.linear_probe``) is the truth."""


@dataclass
class Recipe:
    """A complete recipe. Sections not used by a subcommand are validated but ignored."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    description: str = ""
    """Free text shown by ``nc-finetune ls``."""


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: ``dotted.key=value`` strings; each value is parsed as YAML (``3`` -> int, ``null`` -> None,
            ``[1, 2]`` -> list).

    Returns:
        The validated recipe.

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown key, wrong type or disallowed value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"recipe {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            raise ConfigError(f"recipe {path} is empty; expected a mapping with sections {_field_names(Recipe)}")
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections {_field_names(Recipe)}, "
                              f"got {type(loaded).__name__}")
        raw = loaded
    for item in overrides or []:
        _apply_override(raw, item)
    return from_dict(Recipe, raw, "")


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain-dict form of a recipe (for ``resolved.yaml`` and JSON provenance)."""
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    """YAML text of a fully resolved recipe."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``dotted.key=value`` (value parsed as YAML) in a raw recipe mapping, creating sections as needed."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. probe.batch_size=32")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override '{item}': empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: keep the literal string, the schema decides whether a string is allowed
    node = raw
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def _field_names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from ``raw``, checking every key and type (recursive)."""
    where = prefix or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"'{where}' must be a mapping with keys {_field_names(cls)}, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown recipe key '{dotted}'; allowed keys{' in ' + prefix if prefix else ''}: "
                              f"{_field_names(cls)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            dotted = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(hints[f.name], raw[f.name], dotted)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against type ``tp``; return the (possibly converted) value or raise ConfigError."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans: map them back to the word
            words = ("on", "true", "yes") if value else ("off", "false", "no")
            value = next((w for w in words if w in allowed), value)
        if value in allowed:
            return value
        raise ConfigError(f"recipe key '{key}' must be one of {', '.join(map(str, allowed))}; got {value!r}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        literal_errors = [e for e in errors if "must be one of" in e]
        if len(literal_errors) == 1 and len(errors) == 1:
            raise ConfigError(literal_errors[0])
        raise ConfigError(f"recipe key '{key}' must be {_type_name(tp)}; got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"recipe key '{key}' must be a list of {_type_name(item_tp)}; got {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"recipe key '{key}' must be a mapping; got {value!r}")
        return {_coerce(key_tp, k, key): _coerce(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"recipe key '{key}' must be {_type_name(tp)}; got {type(value).__name__} {value!r}")
