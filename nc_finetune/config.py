"""Recipes: a typed schema, YAML loading, dotted ``key=value`` overrides and validation.

A recipe is data. It is read with a safe YAML loader (no aliases, at most 1 MiB of UTF-8) and checked field by field
against the dataclasses below; every problem is reported as a one-line :class:`~nc_finetune.errors.ConfigError` that
names the offending key and the allowed values. Types are checked by :func:`from_dict`; values by each section's
``__post_init__``, from the rules written next to each field (``Annotated[int, Range(ge=1)]``) plus the few rules
that tie fields together. The same schema serves every subcommand (``probe``, ``select``, ``run``, ``rank``), each of
which reads only the sections it needs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml

from nc_finetune.errors import ConfigError

MAX_RECIPE_BYTES = 1 << 20
"""Recipes are a few hundred bytes of plain data; anything over 1 MiB is not a recipe."""


class FieldError(ConfigError):
    """A value refused by a section's ``__post_init__``.

    The section knows only its own field names; :func:`from_dict` re-raises the error under the section's dotted
    path (``train.lr``, ``rank.candidates[0].image_size``).
    """

    def __init__(self, key: str, requirement: str, value: Any) -> None:
        self.key, self.requirement, self.value = key, requirement, value
        super().__init__(f"recipe key '{key}' {requirement}; got {value!r}")

    def under(self, prefix: str) -> FieldError:
        """The same error with ``prefix.`` in front of the key."""
        return FieldError(f"{prefix}.{self.key}" if prefix else self.key, self.requirement, self.value)


@dataclass(frozen=True)
class Range:
    """Allowed interval of a numeric field (``Annotated[int, Range(ge=1)]``); floats must also be finite."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def problem(self, value: Any) -> str | None:
        """``None`` when ``value`` is allowed, else what is required of it."""
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
              and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        return None if ok else f"must be {self.describe()}"

    def describe(self) -> str:
        """The interval as the message shows it: ``>= 1``, ``in (0, 1)``, ``in [8, 4096]``."""
        lo, hi = (self.ge, self.gt), (self.le, self.lt)
        if all(b is None for b in hi):
            return f">= {self.ge}" if self.ge is not None else f"> {self.gt}"
        if all(b is None for b in lo):
            return f"<= {self.le}" if self.le is not None else f"< {self.lt}"
        left = f"[{self.ge}" if self.ge is not None else f"({self.gt}"
        right = f"{self.le}]" if self.le is not None else f"{self.lt})"
        return f"in {left}, {right}"


@dataclass(frozen=True)
class Pattern:
    """Allowed form of a string field, as a regular expression that must match the whole value."""

    regex: str
    allowed: str
    """What the message lists as allowed."""

    def problem(self, value: Any) -> str | None:
        """``None`` when ``value`` matches, else what is required of it."""
        ok = isinstance(value, str) and re.fullmatch(self.regex, value) is not None
        return None if ok else f"must be {self.allowed}"


POSITIVE = Range(ge=1)
SEED = Range(ge=0, lt=2**32)
"""numpy's ``default_rng`` refuses negative seeds and ``torch.manual_seed`` huge ones."""
NON_EMPTY = Pattern(r"(?s).*\S.*", "a non-empty string")
DEVICE = Pattern(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N or mps")


@functools.cache
def _field_rules(cls: type) -> dict[str, tuple[type, list[Range | Pattern], bool]]:
    """``{field: (annotated type, its rules, whether None is allowed)}`` from the ``Annotated`` hints of a section."""
    out = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        parts = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
        for part in parts:
            if typing.get_origin(part) is Annotated:
                out[name] = (typing.get_args(part)[0], list(part.__metadata__), type(None) in parts)
    return out


def check_fields(section: Any) -> None:
    """Apply the ``Annotated`` rules of every field of ``section`` (each section's ``__post_init__`` calls this).

    A rule applies to values of its annotated type (``layers: Annotated[str, ...] | list[int]`` checks strings only);
    a value of no allowed type is left to :func:`from_dict`'s type check.

    Raises:
        FieldError: the first value outside its rule, naming the field and what is allowed.
    """
    for name, (tp, rules, nullable) in _field_rules(type(section)).items():
        value = getattr(section, name)
        numeric = tp in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (numeric or isinstance(value, tp)):
            continue
        for rule in rules:
            problem = rule.problem(value)
            if problem:
                raise FieldError(name, problem + (" or null" if nullable else ""), value)


def require(condition: bool, key: str, requirement: str, value: Any) -> None:
    """A rule that ties fields together: raise :class:`FieldError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise FieldError(key, requirement, value)


@dataclass
class BackboneConfig:
    """Which pretrained model to probe or fine-tune."""

    name: Annotated[str, NON_EMPTY] = "minilm-l6"
    """Built-in short name (``minilm-l6``, ``efficientnet-lite0``), ``timm:<model>`` or ``hf:<hub id or path>``."""
    pooling: Literal["auto", "cls", "mean", "last"] = "auto"
    """Token pooling for transformer outputs; ``auto`` uses the model family's convention (CLS for BERT-like and
    vision encoders, ``last`` = the last real token for decoder-only LLMs). Feature maps use GAP."""
    image_size: Annotated[int, Range(ge=8, le=4096)] | None = None
    """Input resolution for image backbones; default from the model's pretrained config."""
    max_length: Annotated[int, POSITIVE] = 128
    """Tokenizer truncation length for text backbones."""
    pretrained: bool = True
    """Load pretrained weights (``false`` gives the random-init control)."""
    init_from: str | None = None
    """Directory of a finished ``nc-finetune run`` of the same backbone: start from the weights it trained (its head
    is dropped). For adapting a source-domain model to a shifted target, e.g. ``data.corruption``."""
    truncate_at: int | str | None = None
    """Cut the backbone after this block (index, negative from the end, or name): its pooled output becomes the
    final feature and later modules are dropped (a truncated transfer candidate)."""

    def __post_init__(self) -> None:
        check_fields(self)


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
    num_classes: Annotated[int, Range(ge=2)] | None = None
    """Optional check: the run fails early if the data has a different number of classes."""
    max_train_samples: Annotated[int, POSITIVE] | None = None
    """Stratified, seeded subsample of the training split."""
    max_eval_samples: Annotated[int, POSITIVE] | None = None
    """Stratified, seeded subsample of the test split."""
    test_size: Annotated[float, Range(gt=0, lt=1)] = 0.2
    """Held-out fraction when the source has no test split."""
    seed: Annotated[int, SEED] = 0
    streaming: bool = False
    """HF sources only (``hf:<id>`` or local ``csv``/``json``/``parquet``/``imagefolder``): read the data as a stream
    and never hold a whole split in memory. The probe and evaluation read the full stream; per-class samples
    (``probe.samples_per_class``, ``max_train_samples``, ``max_eval_samples``) are drawn on the stream (seeded
    bottom-k per class, one pass); training runs on the ``max_train_samples`` sample or, without it, on the whole
    stream (one shuffled pass per epoch through a seeded buffer)."""
    labels: list[str] | None = None
    """With ``streaming``: the class names in id order (string labels are matched to them, integer labels are ids
    into them), so that the label set needs no pass over the data; without it the label set comes from a
    ClassLabel feature or, for local files, a label-only pass."""
    corruption: Literal["gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast", "brightness",
                        "pixelate", "invert"] | None = None
    """Image data only: an input-level shift (CIFAR-10-C style corruption) applied to both splits, seeded by
    ``seed``; the target domain of a surgical fine-tuning study."""
    corruption_severity: Annotated[int, Range(ge=1, le=5)] = 3
    """1 (mild) .. 5 (strong)."""

    def __post_init__(self) -> None:
        check_fields(self)
        require(self.train_split != self.test_split, "test_split",
                "must differ from train_split (evaluation needs held-out data)", self.test_split)
        require(self.text_column is None or self.image_column is None, "image_column",
                "cannot be set together with text_column (one input column)", self.image_column)
        require(not self.streaming or self.name.startswith("hf:")
                or self.name in ("csv", "json", "parquet", "imagefolder"), "streaming",
                "applies to HF sources (hf:<id>, csv, json, parquet, imagefolder), not to built-in data", self.name)
        require(not self.streaming or self.corruption is None, "corruption",
                "cannot be combined with data.streaming (corruptions apply to in-memory splits)", self.corruption)
        require(self.labels is None or self.streaming, "labels", "applies with data.streaming=true", self.labels)
        require(self.labels is None or (len(self.labels) >= 2 and len(set(self.labels)) == len(self.labels)),
                "labels", "must list at least 2 distinct class names", self.labels)


@dataclass
class ProbeConfig:
    """The layer-wise collapse probe: one streaming pass over the downstream training split."""

    samples_per_class: Annotated[int, POSITIVE] | None = 200
    """Deterministic per-class subsample of the training split (``null`` = every sample)."""
    batch_size: Annotated[int, POSITIVE] = 64
    layers: Annotated[str, Pattern("all", "'all' or a non-empty list of block indices")] | list[int] = "all"
    """``all`` or a list of block indices (negative counts from the end)."""
    ncc_samples: Annotated[int, POSITIVE] = 4096
    """Samples per layer kept (bounded reservoir) to score nearest-class-centre and linear-probe accuracy."""
    linear_probe: bool = False
    """Also fit a logistic-regression probe per layer (adds ``lp_accuracy``, and ``nc3`` on the last layer)."""
    autocast: bool = False
    """Run the forward under autocast (bf16 on CPU, fp16 on CUDA); statistics are always float64."""
    device: Annotated[str, DEVICE] = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` ...; a device that does not exist is refused
    when a command starts, before anything loads."""
    seed: Annotated[int, SEED] = 0

    def __post_init__(self) -> None:
        check_fields(self)
        require(self.layers != [], "layers", "must be 'all' or a non-empty list of block indices", self.layers)


@dataclass
class SelectionConfig:
    """Which blocks to adapt, chosen from the probe (or a baseline rule) under a budget."""

    strategy: Literal["knee", "stall", "last_k", "first_k", "random_k", "all", "manual", "auto_rgn", "trial",
                      "shift", "cka", "lisa"] = "knee"
    """NC-guided: ``knee``, ``stall`` (from the probe), ``trial`` (short trial fine-tunes, Li et al.), ``shift``
    (probe of reference vs target data); baselines: ``last_k``, ``first_k``, ``random_k``, ``all``, ``manual``,
    ``auto_rgn``; rivals: ``cka`` (label-free: the blocks whose input and output representations differ most),
    ``lisa`` (LISA's uniform draw of blocks; resampled during training with ``adapt.method=lisa``)."""
    max_blocks: Annotated[int, POSITIVE] | None = 1
    """Budget in blocks."""
    max_param_fraction: Annotated[float, Range(gt=0, le=1)] | None = None
    """Budget as a fraction of the backbone's parameters: selected block parameters / backbone parameters (the head
    is not counted)."""
    fill: Literal["stop", "skip", "per_param"] = "stop"
    """How the ranking is cut to ``max_param_fraction``: ``stop`` at the first ranked block that does not fit;
    ``skip`` it and try the next (greedy); ``per_param``: by rank weight per parameter, skipping what does not fit."""
    blocks: list[int | str] | None = None
    """For ``manual``: block indices or names."""
    stall_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.1
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
    rgn_batches: Annotated[int, POSITIVE] = 5
    """For ``auto_rgn`` (strategy and adapt mode): mini-batches used to measure relative gradient norms."""
    rgn_batch_size: Annotated[int, POSITIVE] = 64
    """For strategy ``auto_rgn``: samples per mini-batch, drawn at random from the training split (64 as in the
    surgical fine-tuning code; the adapt mode measures on training batches of ``train.batch_size``)."""
    cka_samples: Annotated[int, Range(ge=2)] = 2048
    """For ``cka``: probe samples (a seeded subset of the probe subset) whose block inputs and outputs are compared."""
    lisa_interval: Annotated[int, POSITIVE] = 20
    """For ``adapt.method=lisa``: optimizer steps between two draws of the trainable blocks (LMFlow's default 20)."""
    seed: Annotated[int, SEED] = 0
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
        check_fields(self)
        require(self.strategy != "manual" or bool(self.blocks), "blocks",
                "must list block indices or names for strategy manual, e.g. [3] or [blocks.3]", self.blocks)


@dataclass
class AdaptConfig:
    """How the selected blocks are adapted."""

    method: Literal["linear_probe", "finetune", "lora", "scl", "full", "auto_rgn", "lisa"] = "finetune"
    """``auto_rgn``: surgical fine-tuning's Auto-RGN, every backbone tensor at its own learning rate (relative
    gradient norm, re-measured each epoch); ``lisa``: LISA, everything outside the blocks plus a fresh uniform draw of
    as many blocks as were selected every ``selection.lisa_interval`` steps."""
    lora_r: Annotated[int, POSITIVE] = 8
    lora_alpha: Annotated[int, POSITIVE] = 16
    lora_dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    scl_wiring: Literal["add", "concat", "replace"] = "add"
    freeze_bn: bool = True
    """Keep BatchNorm running statistics frozen inside trainable blocks."""
    head: Literal["linear", "etf"] = "linear"
    """``linear``: a new trainable linear classifier; ``etf``: a fixed simplex equiangular tight frame (K unit rows,
    pairwise cosine -1/(K-1)) that the tuned blocks must collapse onto; needs a feature width of at least K-1."""
    etf_scale: Annotated[float, Range(gt=0)] = 1.0
    """``head=etf``: the norm of each fixed classifier row (logits = etf_scale · cos-geometry · ‖h‖)."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class TrainConfig:
    """The training loop (accelerate: one CPU, one GPU, or many via ``accelerate launch``/torchrun)."""

    epochs: Annotated[int, POSITIVE] = 1
    max_steps: Annotated[int, POSITIVE] | None = None
    """Train for exactly this many optimizer steps, across as many epochs as needed (replaces ``epochs``, as in
    HF Trainer)."""
    batch_size: Annotated[int, POSITIVE] = 32
    """Per-process micro-batch size."""
    eval_batch_size: Annotated[int, POSITIVE] = 128
    lr: Annotated[float, Range(ge=0)] = 1.0e-4
    """Learning rate of the adapted backbone parameters (0 keeps them as they are)."""
    head_lr: Annotated[float, Range(ge=0)] | None = None
    """Learning rate of the head (and skip projection); default: ``lr``."""
    weight_decay: Annotated[float, Range(ge=0)] = 0.01
    warmup_ratio: Annotated[float, Range(ge=0, lt=1)] = 0.06
    grad_accum_steps: Annotated[int, POSITIVE] = 1
    max_grad_norm: Annotated[float, Range(gt=0)] | None = 1.0
    nc1_penalty: Annotated[float, Range(ge=0)] = 0.0
    """Weight λ of an added loss term λ·NC1 of the deepest tuned block's pooled features, measured within each
    mini-batch over the classes present in it (0: off). Induces collapse while tuning (Li et al.)."""
    class_weights: Literal["balanced"] | None = None
    """``balanced``: weight the training loss of class k by N / (K * n_k) (as sklearn's ``compute_class_weight``);
    for imbalanced data (the trainer warns when one class exceeds 60% of it)."""
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
    val_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Held-out share of the training split for early stopping (0: no validation split)."""
    early_stopping_patience: Annotated[int, POSITIVE] | None = None
    """Evaluations without validation improvement before stopping (needs ``val_fraction`` > 0)."""
    eval_every_epochs: Annotated[int, POSITIVE] = 1
    """Evaluate the validation and test splits every N epochs (and always after the last one): with a tiny training
    set and many epochs, a per-epoch test pass can cost more than the training itself."""
    augment: bool = False
    """Random horizontal flips for images (disables the prefix cache)."""
    cache_prefix: Literal["auto", "on", "off"] = "auto"
    """Cache the frozen prefix's outputs (``auto``: whenever it is valid)."""
    log_every: Annotated[int, POSITIVE] = 10
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    """Experiment trackers (accelerate's) that receive the logged loss, learning rate and evaluations; the package
    must be installed. TensorBoard writes to ``<run dir>/nc-finetune/``."""
    checkpoint_every: Annotated[int, POSITIVE] = 100
    """Optimizer steps between checkpoints (and one at every epoch end)."""
    seed: Annotated[int, SEED] = 0
    device: Annotated[str, DEVICE] = "auto"
    """As ``probe.device``."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class RankCandidate(BackboneConfig):
    """One backbone that ``nc-finetune rank`` compares: a backbone section (``name`` required) and a label.

    Written in a recipe as ``{name: efficientnet-lite0, pretrained: false, label: random}``; every other key is the
    backbone section's (``truncate_at``, ``init_from``, ``image_size``...).
    """

    name: Annotated[str, NON_EMPTY] | None = None
    """As ``backbone.name``; required: which backbone this candidate is."""
    label: Annotated[str, NON_EMPTY] | None = None
    """Its name in ``rank.json`` and ``rank.png``, and its folder ``candidates/<label>/`` (default: the backbone name,
    then ``@<truncate_at>`` when cut and `` (random init)`` when not pretrained)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.name is not None, "name", "must name the candidate's backbone (a built-in name, timm:<model> or "
                "hf:<hub id or path>)", self.name)

    @property
    def title(self) -> str:
        """The label, or the default one built from the backbone fields."""
        if self.label is not None:
            return self.label
        return (f"{self.name}{f'@{self.truncate_at}' if self.truncate_at is not None else ''}"
                f"{'' if self.pretrained else ' (random init)'}")

    @property
    def folder(self) -> str:
        """Folder name under ``candidates/``: the title with every run of other characters than letters, digits,
        ``_ . -`` replaced by one ``-``, without leading or trailing ``-`` and ``.`` (so neither ``x/y`` nor ``..``
        reaches outside ``candidates/``)."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.title).strip("-.") or "candidate"

    def backbone(self) -> BackboneConfig:
        """The candidate as a recipe's ``backbone`` section."""
        return BackboneConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BackboneConfig)})


@dataclass
class RankConfig:
    """``nc-finetune rank``: rank candidate backbones (and each one's layers) by downstream collapse."""

    candidates: list[RankCandidate] = field(default_factory=list)
    """The backbones to compare, at least two (``[{name: efficientnet-lite0}, {name: efficientnet-lite0, pretrained:
    false}]``); titles and folders must be unique."""
    finetune: bool = False
    """Ground truth: train every candidate with this recipe's selection/adapt/train sections and use its test
    accuracy; otherwise the held-out linear-probe accuracy of the probe (``probe.linear_probe``) is the truth."""

    def __post_init__(self) -> None:
        # Python callers may pass plain mappings, as a recipe file does.
        self.candidates = [from_dict(RankCandidate, c, f"rank.candidates[{i}]") if isinstance(c, dict) else c
                           for i, c in enumerate(self.candidates)]
        if len(self.candidates) == 1:
            raise ConfigError("recipe key 'rank.candidates' needs at least 2 backbone sections to rank, e.g. "
                              "[{name: efficientnet-lite0}, {name: efficientnet-lite0, pretrained: false}]")
        titles = [c.title for c in self.candidates]
        if len(set(titles)) != len(titles):
            raise ConfigError(f"recipe key 'rank.candidates': labels must be unique (got {titles}); add a 'label' to "
                              "each")
        folders = [c.folder for c in self.candidates]
        clash = next((f for f in folders if folders.count(f) > 1), None)
        if clash is not None:
            twins = [t for t, f in zip(titles, folders, strict=True) if f == clash]
            raise ConfigError(f"recipe key 'rank.candidates': labels {twins} share the folder name "
                              f"candidates/{clash}; rename one")


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
#: ``adapt.method`` values a sweep can train as references: those that train the same weights whatever is selected.
SWEEP_REFERENCES = ("linear_probe", "full", "auto_rgn")
#: Strategies never scored by a sweep: ``all`` ignores budgets, ``manual`` is the user's own choice.
SWEEP_NOT_SCORED = ("all", "manual")


def parse_sweep_strategy(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name@key=value,key=value`` (a variant: ``selection.*`` options, values parsed as YAML).

    Raises:
        ConfigError: an option that is not a ``selection`` key, or a value it does not accept.
    """
    name, _, rest = spec.partition("@")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"sweep.strategies: {spec!r}: options look like name@key=value,key=value")
        options[key.strip()] = parse_yaml(value, f"sweep.strategies option {key.strip()!r}")  # plain data: no aliases
    if options:
        from_dict(SelectionConfig, {"strategy": name, **options}, f"sweep.strategies[{spec}]")
    return name, options


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
    rate is chosen by its mean validation accuracy (``train.val_fraction`` > 0), never on test. Each rate replaces
    ``train.lr`` (the blocks' rate; the head keeps ``train.head_lr``), except for the ``linear_probe`` reference,
    which trains only the head: there the grid scales ``train.head_lr`` by ``rate / train.lr``."""
    strategies: list[str] | None = None
    """Selection strategies to score (``null``: every strategy that applies to the recipe)."""
    budgets: list[SweepBudget] = field(default_factory=lambda: [SweepBudget(max_blocks=1)])
    """Budgets under which each strategy picks; a pick that is not a candidate is trained as an extra cell."""
    references: list[str] = field(default_factory=list)
    """Adapt methods that do not depend on a block choice, trained per seed beside the cells and compared with every
    strategy's pick (paired per seed): ``linear_probe`` (the floor), ``full`` fine-tuning, surgical fine-tuning's
    ``auto_rgn`` (every tensor at a per-tensor rate). They use the sweep's learning rates, chosen on validation."""

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
        bad_seed = next((s for s in self.seeds if not 0 <= s < 2**32), None)
        if bad_seed is not None:  # each becomes data/probe/train/selection.seed: the same range
            raise ConfigError(f"recipe key 'sweep.seeds' must hold seeds in [0, 4294967296); got {bad_seed}")
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
        bad_refs = [m for m in self.references if m not in SWEEP_REFERENCES]
        if bad_refs:
            raise ConfigError(f"recipe key 'sweep.references' must hold adapt methods from "
                              f"{', '.join(SWEEP_REFERENCES)}; got {bad_refs[0]!r}")
        if len(set(self.references)) != len(self.references):
            raise ConfigError(f"recipe key 'sweep.references' has repeated methods: {self.references}")
        # Names (from the schema's own list, no stage import) and each variant's options, as the sweep reads them.
        scored = [s for s in typing.get_args(typing.get_type_hints(SelectionConfig)["strategy"])
                  if s not in SWEEP_NOT_SCORED]
        for spec in self.strategies or []:
            if not isinstance(spec, str) or parse_sweep_strategy(spec)[0] not in scored:
                raise ConfigError(f"sweep.strategies: {spec!r} cannot be scored; choose from {', '.join(scored)}")


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
        # A recipe's only validation split is train.val_fraction (the Trainer API also takes one directly).
        t = self.train
        require(t.early_stopping_patience is None or t.val_fraction > 0, "train.early_stopping_patience",
                "needs a validation split: set train.val_fraction > 0 too, or early_stopping_patience null",
                t.early_stopping_patience)


def check_rival_combinations(recipe: Recipe) -> None:
    """Refuse combinations of the rivals' options that cannot work (:func:`load_recipe` and the pipeline check
    them; :mod:`nc_finetune.rivals` turns the options into stage arguments).

    Raises:
        ConfigError: naming the keys and what to set instead.
    """
    s, a, t = recipe.selection, recipe.adapt, recipe.train
    if a.method == "lisa" and s.strategy != "lisa":
        raise ConfigError(f"adapt.method=lisa draws its own blocks: set selection.strategy=lisa (got "
                          f"{s.strategy!r}); selection.max_blocks is the number of blocks trained at a time")
    if a.head == "etf" and a.method == "linear_probe":
        raise ConfigError("adapt.head=etf is fixed, so adapt.method=linear_probe would train nothing; tune blocks "
                          "(e.g. adapt.method=finetune) or use adapt.head=linear")
    if t.nc1_penalty > 0 and a.method == "linear_probe":
        raise ConfigError("train.nc1_penalty needs a tuned block; adapt.method=linear_probe tunes none")


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
        loaded = read_yaml(path)
        if loaded is None:
            raise ConfigError(f"recipe {path} is empty; expected a mapping with sections {_field_names(Recipe)}")
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections {_field_names(Recipe)}, "
                              f"got {type(loaded).__name__}")
        raw = loaded
    for item in overrides or []:
        _apply_override(raw, item)
    recipe = from_dict(Recipe, raw, "")
    check_rival_combinations(recipe)
    return recipe


def load_resolved_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A run's ``resolved.yaml`` (as :func:`dump_recipe` writes it: every section, ``description`` last), with
    ``overrides``.

    Raises:
        ConfigError: as :func:`load_recipe`, naming the file; or a section missing, i.e. a file cut short.
    """
    path = Path(path)
    raw = read_yaml(path, "resolved recipe")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is damaged: not a resolved recipe (a mapping of sections {_field_names(Recipe)})")
    missing = [f.name for f in dataclasses.fields(Recipe) if f.name not in raw]
    if missing:
        raise ConfigError(f"{path} is damaged: section '{missing[0]}' is missing (cut short?); a resolved recipe "
                          f"lists every section: {_field_names(Recipe)}")
    return load_recipe(path, overrides)


def read_yaml(path: Path, what: str = "recipe") -> Any:
    """Read a small YAML file of plain data (a recipe, a run's ``resolved.yaml``) with :func:`parse_yaml`.

    Raises:
        ConfigError: missing, unreadable, over :data:`MAX_RECIPE_BYTES`, not UTF-8, or refused by
            :func:`parse_yaml`; the message names the file.
    """
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise ConfigError(f"{what} {path} is {path.stat().st_size:,} bytes; a recipe is plain data of at most "
                              f"{MAX_RECIPE_BYTES:,} bytes")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") \
            from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    return parse_yaml(text, f"{what} {path}")


def parse_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` for recipe text, refusing aliases and absurd nesting with one line.

    Args:
        text: YAML text.
        what: Names the source in messages, e.g. ``"recipe r.yaml"``.

    Raises:
        ConfigError: invalid YAML (with line and column), an alias, or nesting too deep to be a recipe.
    """
    try:
        return _load_plain_yaml(text, what)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{what} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that stops at the first alias: recipes are plain data, and a few hundred bytes of nested
    anchors and aliases ("billion laughs") expand to more values than memory holds once the schema walks them."""

    what = "recipe"

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            mark = event.start_mark
            raise ConfigError(f"{self.what} (line {mark.line + 1}, column {mark.column + 1}): YAML aliases "
                              f"(*{event.anchor}) are not allowed in recipes; write the value out")
        return super().compose_node(parent, index)


def _load_plain_yaml(text: str, what: str) -> Any:
    """Parse YAML text with :class:`_NoAliasLoader`; syntax errors stay ``yaml.YAMLError``."""
    loader = _NoAliasLoader(text)
    loader.what = what
    try:
        return loader.get_single_data()
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply to be a recipe") from None
    finally:
        loader.dispose()


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
        value = _load_plain_yaml(text, f"override '{key}'") if text.strip() else ""
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
    try:
        return cls(**kwargs)
    except FieldError as e:  # raised by the section's __post_init__, which does not know where it sits
        raise e.under(prefix) from None


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
