"""Adapt: turn a backbone and a block selection into a classifier where only the chosen parts train.

Modes (``adapt.method``):

* ``linear_probe``: backbone frozen, new linear head trained.
* ``finetune``: the selected blocks and the head train (optionally with BatchNorm statistics frozen).
* ``lora``: peft LoRA on every linear/conv module inside the selected blocks (explicit ``target_modules``),
  the head trained in full (``modules_to_save``).
* ``scl``: SCL-FT. The selected blocks train and the pooled output of the deepest selected block reaches the
  head through a skip connection: ``add`` (h = h_L + P z_l), ``concat`` (h = [h_L; P z_l]) or ``replace``
  (h = P z_l; blocks after l are never run). P is the identity when dimensions match (``add``) and a learned
  linear map otherwise.
* ``full``: every parameter trains.
* ``auto_rgn``: surgical fine-tuning's Auto-RGN: every backbone tensor the rule scores and the head train, each
  tensor at its own learning rate re-measured every epoch (:mod:`nc_finetune.train.auto_rgn`); BatchNorm in eval.
* ``lisa``: LISA: everything outside the blocks and the head train, plus as many blocks as were selected, redrawn
  uniformly every ``selection.lisa_interval`` steps (:mod:`nc_finetune.train.lisa`).

The head (``head``) is a new linear layer, or a fixed simplex ETF (:mod:`nc_finetune.adapt.etf`) that the tuned
blocks must collapse onto.

Frozen modules are kept in eval mode during training (no dropout, no BatchNorm drift), which also makes the frozen
prefix deterministic so its outputs can be cached (see :mod:`nc_finetune.train.cache`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nc_finetune.backbones.hooks import ForwardStop, tap_output
from nc_finetune.errors import ConfigError

if TYPE_CHECKING:
    from nc_finetune.config import AdaptConfig

METHODS = {
    "linear_probe": "head only (backbone frozen)",
    "finetune": "selected blocks + head",
    "lora": "peft LoRA on the linear/conv modules of the selected blocks + head",
    "scl": "SCL-FT: selected blocks + skip connection from the deepest one to the head",
    "full": "every parameter",
    "auto_rgn": "surgical fine-tuning's Auto-RGN: every backbone tensor at a per-tensor rate re-measured each epoch",
    "lisa": "LISA: non-block parameters + head + a uniform draw of blocks redrawn every selection.lisa_interval steps",
}
HEADS = ("linear", "etf")
WIRINGS = ("add", "concat", "replace")
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


class Classifier(nn.Module):
    """Backbone features -> (optional SCL skip) -> linear head ``nc_head``.

    The head's attribute name is deliberately unusual: peft selects ``modules_to_save`` by name *suffix*, so a head
    called ``head`` would also fully train a backbone's ``conv_head``.

    Args:
        backbone_model: Module mapping prepared inputs to pooled features (B, D_L).
        feature_dim: D_L.
        num_classes: K.
        pool: Function pooling a block's raw output to (B, D) given the batch inputs.
        skip_block: Qualified name (inside ``backbone_model``) of the SCL skip block, or ``None``.
        skip_dim: Pooled dimension of the skip block's output.
        wiring: ``add`` | ``concat`` | ``replace``.
        head: ``linear`` (trainable) or ``etf`` (fixed simplex ETF, :class:`~nc_finetune.adapt.etf.ETFHead`).
        etf_scale: Row norm of the ETF head.
        head_seed: Seed of the ETF head's random rotation.
    """

    def __init__(self, backbone_model: nn.Module, feature_dim: int, num_classes: int,
                 pool: Callable[[Any, dict], torch.Tensor] | None = None, skip_block: str | None = None,
                 skip_dim: int | None = None, wiring: str = "add", head: str = "linear", etf_scale: float = 1.0,
                 head_seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone_model
        self.skip_block = skip_block
        self.wiring = wiring
        self._pool = pool
        self._inputs: dict | None = None
        self._skip_out: torch.Tensor | None = None
        self._stop = ForwardStop()  # ``replace``: the blocks after the skip block are not needed
        head_in = feature_dim
        if skip_block is not None:
            if wiring not in WIRINGS:
                raise ConfigError(f"adapt.scl_wiring must be one of {', '.join(WIRINGS)}; got {wiring!r}")
            assert skip_dim is not None and pool is not None
            # P: identity when it can be (add with equal dims), else a learned projection to D_L.
            self.skip_proj = nn.Identity() if (wiring == "add" and skip_dim == feature_dim) else \
                nn.Linear(skip_dim, feature_dim)
            head_in = 2 * feature_dim if wiring == "concat" else feature_dim
            tap_output(self.backbone.get_submodule(skip_block), self._capture_skip)  # lives as long as the model
        if head == "etf":
            from nc_finetune.adapt.etf import ETFHead

            self.nc_head: nn.Module = ETFHead(head_in, num_classes, scale=etf_scale, seed=head_seed)
        else:
            self.nc_head = nn.Linear(head_in, num_classes)

    def _capture_skip(self, module: nn.Module, args: Any, output: Any) -> None:
        self._skip_out = self._pool(output, self._inputs)  # (B, D_l)
        if self.wiring == "replace":
            self._stop()

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        if self.skip_block is None:
            return self.nc_head(self.backbone(**inputs))
        self._inputs, self._skip_out = inputs, None
        h_last = None  # stays None when the replace wiring stopped the forward at the skip block
        with self._stop:
            h_last = self.backbone(**inputs)  # (B, D_L)
        z = self.skip_proj(self._skip_out)  # (B, D_L)
        self._inputs = self._skip_out = None
        if self.wiring == "add":
            h = h_last + z
        elif self.wiring == "concat":
            h = torch.cat([h_last, z], dim=1)
        else:
            h = z
        return self.nc_head(h)


@dataclass
class AdaptedModel:
    """A classifier ready to train, plus what trains and how to put it in train mode.

    Attributes:
        model: The module to optimise (a ``peft.PeftModel`` for ``lora``).
        method: The adapt mode.
        trainable_modules: Qualified names (in ``model``) of modules that run in train mode.
        first_trainable_block: Qualified name of the shallowest trainable backbone block (``None`` when the whole
            backbone trains or none of it does); everything before it is a frozen, cacheable prefix.
        frozen_bn: Keep BatchNorm layers in eval mode even inside trainable modules.
        param_names: For modes whose trainable set changes while training (``lisa``): every parameter that trains at
            some point, saved and counted as trainable; ``None``: the parameters with ``requires_grad``.
    """

    model: nn.Module
    method: str
    trainable_modules: list[str]
    first_trainable_block: str | None
    backbone_prefix: str
    frozen_bn: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    param_names: list[str] | None = None

    def train_mode(self) -> None:
        """Frozen parts in eval mode, trainable modules in train mode (BatchNorm per ``frozen_bn``)."""
        if self.method in ("full", "auto_rgn", "lisa"):
            self.model.train()
        else:
            self.model.eval()
            for name in self.trainable_modules:
                self.model.get_submodule(name).train()
        if self.frozen_bn:
            for m in self.model.modules():
                if isinstance(m, _NORM_TYPES):
                    m.eval()

    def parameter_counts(self) -> dict[str, int]:
        """Trainable/total *parameters* (not buffers), with the head on its own."""
        total = sum(p.numel() for p in self.model.parameters())
        names = self._trainable_names()
        trainable = sum(p.numel() for n, p in self.model.named_parameters() if n in names)
        head = sum(p.numel() for n, p in self.model.named_parameters() if n in names and is_head_param(n))
        return {"trainable_params": trainable, "total_params": total, "head_params": head}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the parameters that train (and the BatchNorm buffers of trainable modules)."""
        names = self._trainable_names()
        state = self.model.state_dict()
        out = {n: state[n] for n in names if n in state}
        if not self.frozen_bn or self.method == "full":
            for mod_name in self.trainable_modules or [""]:
                prefix = f"{mod_name}." if mod_name else ""
                out.update({k: v for k, v in state.items() if k.startswith(prefix) and "running_" in k})
        return out

    def _trainable_names(self) -> set[str]:
        if self.param_names is not None:
            return set(self.param_names)
        return {n for n, p in self.model.named_parameters() if p.requires_grad}


def is_head_param(param_name: str) -> bool:
    """Parameters of the new head and of the SCL skip projection (reported and optimised as "head")."""
    parts = param_name.split(".")
    return "nc_head" in parts or "skip_proj" in parts


def build_classifier(backbone, num_classes: int, *, method: str | None = None, selection=None,
                     skip_dim: int | None = None, wiring: str = "add", lora_r: int = 8, lora_alpha: int = 16,
                     lora_dropout: float = 0.0, freeze_bn: bool = True, head: str = "linear", etf_scale: float = 1.0,
                     head_seed: int = 0, rgn_batches: int = 5, lisa_interval: int = 20, lisa_seed: int = 0,
                     copy_backbone: bool = True, cfg: AdaptConfig | None = None) -> AdaptedModel:
    """Build the classifier for ``method`` and freeze everything that must not train.

    Call :func:`nc_finetune.utils.env.seed_everything` first: the head (and LoRA matrices) are initialised here.

    Args:
        backbone: A :class:`~nc_finetune.backbones.Backbone`.
        num_classes: K.
        method: One of :data:`METHODS`.
        selection: The :class:`~nc_finetune.select.Selection` of blocks; ignored by ``linear_probe``/``full``.
        skip_dim: Pooled dim of the deepest selected block (``scl`` only).
        wiring: SCL wiring.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        freeze_bn: Keep BatchNorm running statistics frozen in trainable blocks (``auto_rgn``: always frozen).
        head: ``linear`` or ``etf`` (a fixed simplex ETF; nothing of it trains).
        etf_scale: Row norm of the ETF head.
        head_seed: Seed of the ETF head's random rotation.
        rgn_batches: ``auto_rgn``: mini-batches per relative-gradient-norm measurement.
        lisa_interval: ``lisa``: optimizer steps between two draws of the trainable blocks.
        lisa_seed: ``lisa``: seed of the draws.
        copy_backbone: Build on a deep copy of ``backbone.model`` so the backbone stays as it was (no frozen
            parameters, LoRA layers or skip hooks left behind) and can build another classifier. ``False`` uses the
            model in place (no second copy in memory) when the backbone is not used again.
        cfg: A recipe's adapt section, taken whole, instead of ``method``: its ``method``, ``scl_wiring``,
            ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``freeze_bn``, ``head`` and ``etf_scale`` replace those
            keyword arguments.

    Raises:
        ConfigError: unknown method or head, empty selection, a block name that matches no module, or a fixed head
            with nothing else to train (``linear_probe``).
    """
    if cfg is not None:
        if method is not None:
            raise TypeError("build_classifier takes method= or cfg= (the adapt section holds the method), not both")
        method, wiring, head, etf_scale = cfg.method, cfg.scl_wiring, cfg.head, cfg.etf_scale
        lora_r, lora_alpha, lora_dropout, freeze_bn = cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.freeze_bn
    if method not in METHODS:
        raise ConfigError(f"adapt.method must be one of {', '.join(METHODS)}; got {method!r}")
    if head not in HEADS:
        raise ConfigError(f"adapt.head must be one of {', '.join(HEADS)}; got {head!r}")
    if head == "etf" and method == "linear_probe":
        raise ConfigError("adapt.head=etf is fixed, so adapt.method=linear_probe would train nothing; tune blocks "
                          "(e.g. adapt.method=finetune) or use adapt.head=linear")
    block_names = [b["name"] for b in selection.blocks] if selection is not None else []
    if method in ("finetune", "lora", "scl", "lisa") and not block_names:
        raise ConfigError(f"adapt.method={method} needs at least one selected block")
    known = dict(backbone.model.named_modules())
    for name in block_names:
        if name not in known:
            raise ConfigError(f"selected block '{name}' is not a module of {backbone.spec}")
    order = {b.name: b.index for b in backbone.blocks}
    fixed = ("linear_probe", "full", "auto_rgn")
    blocks = sorted(block_names, key=lambda n: order.get(n, 0)) if method not in fixed else []
    skip = blocks[-1] if method == "scl" else None
    backbone_model = copy.deepcopy(backbone.model) if copy_backbone else backbone.model
    model = Classifier(backbone_model, backbone.feature_dim, num_classes, pool=backbone.pool, skip_block=skip,
                       skip_dim=skip_dim, wiring=wiring, head=head, etf_scale=etf_scale, head_seed=head_seed)
    model.requires_grad_(method in ("full", "lisa"))
    model.nc_head.requires_grad_(True)
    trainable = ["nc_head"]
    if skip is not None:
        model.skip_proj.requires_grad_(True)
        trainable.append("skip_proj")
    prefix = "backbone."
    if method in ("finetune", "scl"):
        for name in blocks:
            model.get_submodule(prefix + name).requires_grad_(True)
        trainable += [prefix + n for n in blocks]
    info: dict[str, Any] = {"blocks": blocks, "skip_block": skip, "wiring": wiring if skip else None, "head": head}
    param_names = None
    if method == "auto_rgn":
        from nc_finetune.select.strategies import rgn_tensors

        # The whole backbone as one pseudo-block: the tensors the Auto-RGN rule scores, by the ranking's own rule.
        whole = type(backbone.blocks[0])(index=-1, name="", num_params=0)
        for _, p in rgn_tensors(model, whole, prefix="backbone"):
            p.requires_grad_(True)
        info["rgn_batches"] = rgn_batches
        freeze_bn = True  # as published: BatchNorm in eval mode
    if method == "lisa":
        info.update(lisa_pool=[b.name for b in sorted(backbone.blocks, key=lambda b: b.index)],
                    lisa_interval=lisa_interval, lisa_seed=lisa_seed)
        param_names = [n for n, p in model.named_parameters() if p.requires_grad]
    if method in ("full", "auto_rgn", "lisa"):
        trainable = [""]
    first = prefix + blocks[0] if blocks and method != "lisa" else None
    if method == "lora":
        import peft

        kwargs = selection.lora_kwargs(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, head="nc_head")
        if head == "etf":  # a fixed head has nothing to save (peft would otherwise train a copy of it)
            kwargs["modules_to_save"] = None
        model = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
        wrap = "base_model.model."
        trainable = [wrap + "nc_head"] + [wrap + prefix + n for n in blocks]
        first = wrap + prefix + blocks[0]
        prefix = wrap + prefix
    return AdaptedModel(model=model, method=method, trainable_modules=trainable, first_trainable_block=first,
                        backbone_prefix=prefix.rstrip("."), frozen_bn=freeze_bn and method != "full",
                        info=info, param_names=param_names)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Temporarily put ``model`` in eval mode, restoring each module's previous mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, t in modes.items():
            m.training = t
