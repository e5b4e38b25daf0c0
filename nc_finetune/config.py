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
    pooling: Literal["auto", "cls", "mean", "last"] = "auto"
    """Token pooling for transformer outputs; ``auto`` uses the model family's convention (CLS for BERT-like and
    vision encoders, ``last`` = the last real token for decoder-only LLMs). Feature maps use GAP."""
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

    strategy: Literal["knee", "stall", "last_k", "first_k", "random_k", "all", "manual", "auto_rgn", "trial",
                      "shift", "cka", "lisa"] = "knee"
    """NC-guided: ``knee``, ``stall`` (from the probe), ``trial`` (short trial fine-tunes, Li et al.), ``shift``
    (probe of reference vs target data); baselines: ``last_k``, ``first_k``, ``random_k``, ``all``, ``manual``,
    ``auto_rgn``; rivals: ``cka`` (label-free: the blocks whose input and output representations differ most),
    ``lisa`` (LISA's uniform draw of blocks; resampled during training with ``adapt.method=lisa``)."""
    max_blocks: int | None = 1
    """Budget in blocks."""
    max_param_fraction: float | None = None
    """Budget as a fraction of the backbone's parameters: selected block parameters / backbone parameters (the head
    is not counted)."""
    fill: Literal["stop", "skip", "per_param"] = "stop"
    """How the ranking is cut to ``max_param_fraction``: ``stop`` at the first ranked block that does not fit;
    ``skip`` it and try the next (greedy); ``per_param``: by rank weight per parameter, skipping what does not fit."""
    blocks: list[int | str] | None = None
    """For ``manual``: block indices or names."""
    stall_fraction: float = 0.1
    """For ``stall``: the remaining blocks must add less than this share of the total log-NC1 reduction."""
    stall_reference: Literal["last", "min"] = "last"
    """For ``stall``: measure the total and remaining log-NC1 reduction against the ``last`` block or the block with
    the smallest NC1 (``min``)."""
    knee_residual: Literal["shortfall", "two_sided"] = "shortfall"
    """For ``knee``: score the one-sided ``shortfall`` of each block's collapse progress behind the equi-separation
    law, or the ``two_sided`` absolute residual of the law's fit."""
    bootstrap: int = 0
    """For ``knee``/``stall``: apply the rule to this many stratified bootstrap resamples of the probe subset and
    rank blocks by how often they are picked (0: off; costs one more forward pass over the probe subset)."""
    trial_steps: int = 30
    """For ``trial``: optimizer steps of each block's trial fine-tune (>= 1)."""
    trial_samples: int = 20
    """For ``trial``: training samples per class held out of the trials, on which NC1 and loss are measured."""
    trial_score: Literal["nc1_drop_per_param", "nc1_drop", "loss_drop"] = "nc1_drop_per_param"
    """For ``trial``: rank by the held-out last-layer NC1 drop per trainable block parameter, the NC1 drop, or the
    held-out loss drop."""
    reference: dict[str, Any] | str | None = None
    """For ``shift``: the reference data, as ``data.*`` overrides of this recipe's data section (e.g.
    ``{corruption: null}``), or ``source``: the data section of the ``backbone.init_from`` run."""
    shift_jump: float = 0.5
    """For ``shift``: the shift is located at the first block whose degradation jump reaches this share of the
    largest jump, in (0, 1]."""
    rgn_batches: int = 5
    """For ``auto_rgn`` (strategy and adapt mode): mini-batches used to measure relative gradient norms."""
    cka_samples: int = 2048
    """For ``cka``: probe samples (a seeded subset of the probe subset) whose block inputs and outputs are compared."""
    lisa_interval: int = 20
    """For ``adapt.method=lisa``: optimizer steps between two draws of the trainable blocks (LMFlow's default 20)."""
    seed: int = 0
    """For ``random_k`` (and the ``trial`` data order and ``bootstrap`` resamples)."""

    def __post_init__(self) -> None:
        if self.bootstrap < 0:
            raise ConfigError(f"recipe key 'selection.bootstrap' must be >= 0; got {self.bootstrap}")
        if self.bootstrap and self.strategy not in ("knee", "stall"):
            raise ConfigError(f"selection.bootstrap applies to the knee and stall rules, not to strategy "
                              f"'{self.strategy}'; set selection.bootstrap=0")
        if self.trial_steps < 1:
            raise ConfigError(f"recipe key 'selection.trial_steps' must be >= 1 (a trial of {self.trial_steps} steps "
                              "measures nothing)")
        if self.trial_samples < 2:
            raise ConfigError(f"recipe key 'selection.trial_samples' must be >= 2 per class (NC1 needs within-class "
                              f"spread); got {self.trial_samples}")
        if not 0.0 < self.shift_jump <= 1.0:
            raise ConfigError(f"recipe key 'selection.shift_jump' must be in (0, 1]; got {self.shift_jump}")
        if isinstance(self.reference, str) and self.reference != "source":
            raise ConfigError(f"recipe key 'selection.reference' must be 'source' or a mapping of data keys; got "
                              f"{self.reference!r}")
        if self.strategy == "shift" and self.reference is None:
            raise ConfigError("strategy 'shift' needs reference data: set selection.reference to 'source' (the "
                              "backbone.init_from run's data) or to data overrides, e.g. {corruption: null}")


@dataclass
class AdaptConfig:
    """How the selected blocks are adapted."""

    method: Literal["linear_probe", "finetune", "lora", "scl", "full", "auto_rgn", "lisa"] = "finetune"
    """``auto_rgn``: surgical fine-tuning's Auto-RGN, every backbone tensor at its own learning rate (relative
    gradient norm, re-measured each epoch); ``lisa``: LISA, everything outside the blocks plus a fresh uniform draw of
    as many blocks as were selected every ``selection.lisa_interval`` steps."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    scl_wiring: Literal["add", "concat", "replace"] = "add"
    freeze_bn: bool = True
    """Keep BatchNorm running statistics frozen inside trainable blocks."""
    head: Literal["linear", "etf"] = "linear"
    """``linear``: a new trainable linear classifier; ``etf``: a fixed simplex equiangular tight frame (K unit rows,
    pairwise cosine -1/(K-1)) that the tuned blocks must collapse onto; needs a feature width of at least K-1."""
    etf_scale: float = 1.0
    """``head=etf``: the norm of each fixed classifier row (logits = etf_scale · cos-geometry · ‖h‖)."""


@dataclass
class TrainConfig:
    """The training loop (accelerate: one CPU, one GPU, or many via ``accelerate launch``/torchrun)."""

    epochs: int = 1
    max_steps: int | None = None
    """Train for exactly this many optimizer steps, across as many epochs as needed (replaces ``epochs``, as in
    HF Trainer)."""
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
    nc1_penalty: float = 0.0
    """Weight λ of an added loss term λ·NC1 of the deepest tuned block's pooled features, measured within each
    mini-batch over the classes present in it (0: off). Induces collapse while tuning (Li et al.)."""
    class_weights: Literal["balanced"] | None = None
    """``balanced``: weight the training loss of class k by N / (K * n_k) (as sklearn's ``compute_class_weight``);
    for imbalanced data (the trainer warns when one class exceeds 60% of it)."""
    precision: Literal["no", "bf16", "fp16"] = "no"
    val_fraction: float = 0.0
    """Held-out share of the training split for early stopping (0: no validation split)."""
    early_stopping_patience: int | None = None
    """Evaluations without validation improvement before stopping (needs ``val_fraction`` > 0)."""
    augment: bool = False
    """Random horizontal flips for images (disables the prefix cache)."""
    cache_prefix: Literal["auto", "on", "off"] = "auto"
    """Cache the frozen prefix's outputs (``auto``: whenever it is valid)."""
    log_every: int = 10
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    """Experiment trackers (accelerate's) that receive the logged loss, learning rate and evaluations; the package
    must be installed. TensorBoard writes to ``<run dir>/nc-finetune/``."""
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
class SweepBudget:
    """One budget under which ``nc-finetune sweep`` lets every strategy pick its blocks."""

    max_blocks: int | None = 1
    """At most this many blocks."""
    max_param_fraction: float | None = None
    """Selected block parameters / backbone parameters at most this (the head is not counted)."""

    def __post_init__(self) -> None:
        if self.max_blocks is None and self.max_param_fraction is None:
            raise ConfigError("a sweep budget needs max_blocks and/or max_param_fraction, e.g. {max_blocks: 1} or "
                              "{max_param_fraction: 0.1, max_blocks: null}")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise ConfigError(f"sweep budget max_blocks must be >= 1; got {self.max_blocks}")
        if self.max_param_fraction is not None and not 0.0 < self.max_param_fraction <= 1.0:
            raise ConfigError(f"sweep budget max_param_fraction must be in (0, 1]; got {self.max_param_fraction}")

    @property
    def label(self) -> str:
        """Short name used as a key in ``sweep.json`` (``1_block``, ``10pct``, ``2_blocks_10pct``)."""
        parts = []
        if self.max_blocks is not None:
            parts.append(f"{self.max_blocks}_block{'s' if self.max_blocks > 1 else ''}")
        if self.max_param_fraction is not None:
            parts.append(f"{100 * self.max_param_fraction:g}pct")
        return "_".join(parts)


#: ``sweep.candidates`` words: every single block, or every pair of adjacent blocks.
SWEEP_CANDIDATES = ("blocks", "pairs")


@dataclass
class SweepConfig:
    """``nc-finetune sweep``: fine-tune every candidate block set alone (per seed and learning rate) to find the best
    one (the oracle), and measure each selection strategy's regret against it."""

    candidates: str | list[list[int | str]] = "blocks"
    """``blocks`` (every single block), ``pairs`` (adjacent pairs), or a list of block lists (indices or names)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Each seed sets ``data.seed``, ``probe.seed``, ``train.seed`` and ``selection.seed``: it resamples the
    training subset, the validation split and the probe subset, not only the training noise."""
    lr_grid: list[float] | None = None
    """Learning rates tried for every candidate (``null``: ``train.lr`` only). With more than one, each candidate's
    rate is chosen by its mean validation accuracy (``train.val_fraction`` > 0), never on test."""
    strategies: list[str] | None = None
    """Selection strategies to score (``null``: every strategy that applies to the recipe)."""
    budgets: list[SweepBudget] = field(default_factory=lambda: [SweepBudget(max_blocks=1)])
    """Budgets under which each strategy picks; a pick that is not a candidate is trained as an extra cell."""

    def __post_init__(self) -> None:
        if isinstance(self.candidates, str) and self.candidates not in SWEEP_CANDIDATES:
            raise ConfigError(f"recipe key 'sweep.candidates' must be one of {', '.join(SWEEP_CANDIDATES)} or a list "
                              f"of block lists; got {self.candidates!r}")
        if isinstance(self.candidates, list) and (not self.candidates or any(not c for c in self.candidates)):
            raise ConfigError("recipe key 'sweep.candidates' must list at least one non-empty block list")
        if not self.seeds:
            raise ConfigError("recipe key 'sweep.seeds' must list at least one seed, e.g. [0, 1, 2]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"recipe key 'sweep.seeds' has repeated seeds: {self.seeds}")
        if self.lr_grid is not None:
            if not self.lr_grid:
                raise ConfigError("recipe key 'sweep.lr_grid' must list at least one learning rate (or be null)")
            bad = [lr for lr in self.lr_grid if not (lr > 0 and lr < float("inf"))]
            if bad:
                raise ConfigError(f"recipe key 'sweep.lr_grid' must hold finite positive rates; got {bad[0]!r}")
        if not self.budgets:
            raise ConfigError("recipe key 'sweep.budgets' must list at least one budget, e.g. [{max_blocks: 1}]")
        labels = [b.label for b in self.budgets]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"recipe key 'sweep.budgets' has repeated budgets: {labels}")


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
    sweep: SweepConfig = field(default_factory=SweepConfig)
    description: str = ""
    """Free text shown by ``nc-finetune ls``."""

    def __post_init__(self) -> None:
        if self.sweep.lr_grid is not None and len(self.sweep.lr_grid) > 1 and not self.train.val_fraction > 0:
            raise ConfigError("recipe key 'sweep.lr_grid' has several rates but train.val_fraction is 0: the rate is "
                              "chosen on a validation split carved from train, never on test; set "
                              "train.val_fraction=0.1")


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
    recipe = from_dict(Recipe, raw, "")
    from nc_finetune.rivals import check_rival_options  # imports nothing at module level that needs this module

    check_rival_options(recipe)
    return recipe


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
