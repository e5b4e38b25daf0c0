"""Budgeted block selection: a strategy's ranking cut to a parameter budget, and its ``selection.json`` form.

:func:`select_blocks` ranks the blocks with one strategy (:mod:`nc_finetune.select.strategies`) and fills the budget
greedily in ranking order; the resulting :class:`Selection` names the modules to tune inside the classifier and
builds explicit peft ``LoraConfig`` arguments (fully qualified ``target_modules``, never ``layers_to_transform``,
which cannot address timm blocks; anchors.md §1.1).
"""

from __future__ import annotations

import difflib
import math
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from nc_finetune.errors import ConfigError
from nc_finetune.probe.result import ProbeResult
from nc_finetune.select.strategies import STRATEGIES, BlockLike, Ranking, rank_blocks
from nc_finetune.utils.io import read_json_object, write_json_atomic

#: Blocks tuned when no budget is given: one block, as in Li et al.'s Layer FT / SCL FT.
DEFAULT_MAX_BLOCKS = 1


def _pct(fraction: float) -> str:
    pct = 100.0 * fraction
    return f"{pct:.1f}%" if pct >= 0.1 else f"{pct:.2g}%"


@dataclass
class Selection:
    """The blocks chosen for tuning and the parameter accounting of the resulting fine-tune (method.md §1.6).

    Attributes:
        strategy: Strategy name.
        blocks: Selected blocks in forward order, each ``{"index", "name", "num_params"}`` (name inside the backbone).
        module_names: Fully qualified names in the classifier (``prefix + name``), forward order.
        scores: The strategy's score per block index (higher = tune first; ``-inf``/NaN = unscored).
        block_params: Parameters of the selected blocks.
        total_params: Parameters of the whole classifier (backbone + head).
        trainable_params: ``block_params + head_params``.
        head_params: Parameters of the classifier head.
        trainable_fraction: ``trainable_params / total_params``.
        budget: The budget as applied: ``max_blocks``, ``max_param_fraction``, ``backbone_params``,
            ``selected_fraction`` (of the backbone), ``skipped`` (names of blocks ranked above a selected one but left
            out because they did not fit the fraction budget), ``ignored`` (strategy ``all``), ``defaulted`` (no
            budget given, so :data:`DEFAULT_MAX_BLOCKS` applied).
        rationale: Why these blocks (one paragraph, from the strategy).
        ranking: Every ranked block index, first = tune first.
        num_blocks: Number of blocks of the backbone.
        prefix: Attribute path of the backbone inside the classifier.
    """

    strategy: str
    blocks: list[dict[str, Any]]
    module_names: list[str]
    scores: dict[int, float]
    block_params: int
    total_params: int
    trainable_params: int
    head_params: int
    trainable_fraction: float
    budget: dict[str, Any]
    rationale: str
    ranking: list[int] = field(default_factory=list)
    num_blocks: int = 0
    prefix: str = "backbone."

    @property
    def indices(self) -> list[int]:
        """Selected block indices in forward order."""
        return [int(b["index"]) for b in self.blocks]

    # ------------------------------------------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (score keys become strings; non-finite scores are written as ``null`` on save)."""
        d = asdict(self)
        d["scores"] = {str(k): float(v) for k, v in self.scores.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Selection:
        """Inverse of :meth:`to_dict` (``null`` scores come back as NaN)."""
        known = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in known}
        kw["scores"] = {int(k): (math.nan if v is None else float(v)) for k, v in d.get("scores", {}).items()}
        kw["blocks"] = [dict(b) for b in d["blocks"]]
        kw["module_names"] = list(d["module_names"])
        kw["ranking"] = [int(i) for i in d.get("ranking", [])]
        kw["budget"] = dict(d.get("budget", {}))
        return cls(**kw)

    def save(self, path: str | Path) -> Path:
        """Write ``selection.json`` atomically."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Selection:
        """Read ``selection.json``.

        Raises:
            UserError: a missing or damaged file (one line naming it).
        """
        return read_json_object(path, cls.from_dict, "a selection.json written by nc-finetune")

    # ------------------------------------------------------------------------------------------------------ text

    def explain(self) -> str:
        """A human-readable account: what is tuned, how many parameters, the budget and why."""
        backbone = self.budget.get("backbone_params") or (self.total_params - self.head_params)
        of = f" of {self.num_blocks}" if self.num_blocks else ""
        lines = [f"strategy: {self.strategy} — {STRATEGIES.get(self.strategy, '')}".rstrip(" —"),
                 f"selected {len(self.blocks)}{of} blocks (forward order):"]
        width = max((len(n) for n in self.module_names), default=0)
        for b, name in zip(self.blocks, self.module_names, strict=True):
            share = _pct(b["num_params"] / backbone) if backbone else "?"
            lines.append(f"  [{b['index']}] {name.ljust(width)}  {b['num_params']:,} params ({share} of the backbone)")
        lines.append(f"trainable: {self.trainable_params:,} of {self.total_params:,} parameters "
                     f"({_pct(self.trainable_fraction)}) = blocks {self.block_params:,} + head {self.head_params:,}")
        if self.budget.get("ignored"):
            lines.append("budget: ignored (strategy 'all')")
        else:
            b = self.budget
            note = " (default: no budget given)" if b.get("defaulted") else ""
            lines.append(f"budget: max_blocks={b.get('max_blocks')}, max_param_fraction={b.get('max_param_fraction')}"
                         f"{note}")
            if b.get("skipped"):
                lines.append(f"  skipped (over the fraction budget): {', '.join(b['skipped'])}")
        if self.ranking:
            lines.append("ranking: " + " > ".join(str(i) for i in self.ranking))
        lines.append(f"why: {self.rationale}")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------------------ peft

    def verify(self, model: nn.Module) -> None:
        """Check that every selected module name resolves in ``model``.

        Raises:
            ConfigError: naming the first module that does not resolve (with close matches, if any).
        """
        for name in self.module_names:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ConfigError(_missing_module_message(model, name)) from None

    def lora_kwargs(
        self,
        model: nn.Module,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        head: str | Sequence[str] = "head",
    ) -> dict[str, Any]:
        """Keyword arguments for ``peft.LoraConfig`` that adapt exactly the selected blocks.

        ``target_modules`` is the sorted list of fully qualified names of every ``nn.Linear``, ``nn.Conv2d`` (and
        transformers ``Conv1D``) inside the selected blocks, found by walking ``model.named_modules()``; peft matches
        such names exactly. ``modules_to_save`` holds the head (trained in full). ``layers_to_transform`` is never
        used (anchors.md §1.1: it cannot address timm blocks).

        Args:
            model: The classifier the selection refers to (the model later passed to ``get_peft_model``).
            r: LoRA rank.
            alpha: ``lora_alpha``.
            dropout: ``lora_dropout``.
            head: Name(s) of the head module(s) in ``model``, for ``modules_to_save``.

        Raises:
            ConfigError: a selected block is not a module of ``model``, contains no adaptable module, or contains a
                module that peft would skip because it matches the head's name.
        """
        heads = [head] if isinstance(head, str) else list(head)
        modules = dict(model.named_modules())
        adaptable = _adaptable_types()
        targets: list[str] = []
        for name in self.module_names:
            if name not in modules:
                raise ConfigError(_missing_module_message(model, name))
            # Grouped (depthwise) convs are left out: peft's LoRA needs r divisible by the group count.
            found = [n for n, m in modules.items()
                     if (n == name or n.startswith(name + ".")) and isinstance(m, adaptable)
                     and getattr(m, "groups", 1) == 1]
            if not found:
                kinds = ", ".join(sorted({type(m).__name__ for m in modules[name].modules()}))
                raise ConfigError(f"selected block '{name}' contains no Linear/Conv2d/Conv1D module that LoRA can "
                                  f"adapt (its modules: {kinds})")
            targets.extend(found)
        # peft never adapts a module whose name has a modules_to_save entry as a dotted component.
        for h in heads:
            clash = [t for t in targets if re.match(rf"(^|.*\.){re.escape(h)}($|\..*)", t)]
            if clash:
                raise ConfigError(f"the head name '{h}' also matches selected modules {clash}; peft would not adapt "
                                  "them: pass the head's exact module name")
            if h not in modules:
                raise ConfigError(_missing_module_message(model, h))
            # peft wraps every module whose name merely *ends with* a modules_to_save entry.
            extra = [n for n in modules if n != h and n.endswith(h)]
            if extra:
                warnings.warn(f"peft will also treat {extra} as modules_to_save (names ending in '{h}')", stacklevel=2)
        return {
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": dropout,
            "target_modules": sorted(set(targets)),
            "modules_to_save": heads,
        }


def _adaptable_types() -> tuple[type[nn.Module], ...]:
    types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
    # Only look transformers' Conv1D up if transformers is already imported: a model holding one implies it is.
    pu = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pu, "Conv1D", None) if pu is not None else None
    return (*types, conv1d) if conv1d is not None else types


def _missing_module_message(model: nn.Module, name: str) -> str:
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return f"module '{name}' is not part of the model{hint}"


# -------------------------------------------------------------------------------------------------------------- budget


def _check_budget(max_blocks: int | None, max_param_fraction: float | None) -> None:
    if max_blocks is not None and (isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1):
        raise ConfigError(f"selection budget max_blocks={max_blocks!r} must be an integer >= 1")
    if max_param_fraction is not None and (
        isinstance(max_param_fraction, bool)
        or not isinstance(max_param_fraction, (int, float))
        or not 0.0 < max_param_fraction <= 1.0
    ):
        raise ConfigError(f"selection budget max_param_fraction={max_param_fraction!r} must be in (0, 1]")


def fill_budget(
    ranking: Ranking,
    blocks: Sequence[BlockLike],
    *,
    max_blocks: int | None,
    max_param_fraction: float | None,
    backbone_params: int,
) -> tuple[list[int], list[int]]:
    """Take blocks in ranking order while both budgets hold.

    Greedy: a block that would push the selected parameters over ``max_param_fraction · backbone_params`` is skipped
    and the next ranked block is tried; filling stops once ``max_blocks`` blocks are taken.

    Returns:
        ``(selected, skipped)`` block indices: selected in forward order; skipped = blocks ranked above the last
        selected one that did not fit the fraction budget, in ranking order.

    Raises:
        ConfigError: the fraction budget cannot hold any ranked block, or (``ranking.exact``) cannot hold every
            ranked block.
    """
    by_index = {b.index: b for b in blocks}
    limit = None if max_param_fraction is None else max_param_fraction * backbone_params
    if not ranking.uses_budget:
        return sorted(ranking.order), []
    if ranking.exact:
        chosen = ranking.order
        if max_blocks is not None and len(chosen) > max_blocks:
            raise ConfigError(f"selection budget max_blocks={max_blocks} cannot hold the {len(chosen)} blocks listed "
                              f"for strategy 'manual' ({', '.join(by_index[i].name for i in chosen)})")
        used = sum(by_index[i].num_params for i in chosen)
        if limit is not None and used > limit:
            raise ConfigError(f"selection budget max_param_fraction={max_param_fraction:g} cannot hold the blocks "
                              f"listed for strategy 'manual': they have {_pct(used / backbone_params)} of the "
                              "parameters")
        return sorted(chosen), []
    selected: list[int] = []
    skipped: list[int] = []
    used = 0
    for i in ranking.order:
        if max_blocks is not None and len(selected) >= max_blocks:
            break
        n = by_index[i].num_params
        if limit is not None and used + n > limit:
            skipped.append(i)
            continue
        selected.append(i)
        used += n
    if not selected:
        smallest = min((by_index[i] for i in ranking.order), key=lambda b: (b.num_params, b.index))
        raise ConfigError(f"selection budget max_param_fraction={max_param_fraction:g} cannot hold any block: the "
                          f"smallest block '{smallest.name}' has {_pct(smallest.num_params / backbone_params)} of the "
                          "parameters")
    # Only blocks that gave way to a lower-ranked one are worth reporting.
    skipped = [i for i in skipped if ranking.order.index(i) < ranking.order.index(selected[-1])]
    return sorted(selected), skipped


# -------------------------------------------------------------------------------------------------------------- entry


def select_blocks(
    probe_result: ProbeResult | None,
    blocks: Sequence[BlockLike],
    *,
    strategy: str,
    max_blocks: int | None = None,
    max_param_fraction: float | None = None,
    manual: Sequence[int | str] | int | str | None = None,
    seed: int = 0,
    head_params: int = 0,
    total_params: int | None = None,
    rgn_scores: Mapping[int, float] | None = None,
    stall_fraction: float = 0.1,
    prefix: str = "backbone.",
) -> Selection:
    """Rank the blocks with ``strategy`` and cut the ranking to the budget.

    Args:
        probe_result: The probe of the backbone on the downstream training data (needed by ``knee`` and ``stall``).
        blocks: The backbone's blocks (``index``, ``name``, ``num_params``).
        strategy: One of :data:`STRATEGIES`.
        max_blocks: At most this many blocks. With neither budget given, one block (:data:`DEFAULT_MAX_BLOCKS`).
        max_param_fraction: Selected block parameters / backbone parameters at most this, in (0, 1].
        manual: Block indices or names for ``manual``.
        seed: Seed for ``random_k``.
        head_params: Parameters of the classifier head (counted as trainable).
        total_params: Parameters of the whole classifier, backbone + head. Default: the blocks' sum + head (a
            backbone with parameters outside its blocks, e.g. stem or embeddings, should pass the true total).
        rgn_scores: Per-block scores from :func:`~nc_finetune.select.strategies.auto_rgn_scores` for ``auto_rgn``.
        stall_fraction: Threshold of the ``stall`` rule.
        prefix: Attribute path of the backbone inside the classifier.

    Returns:
        The selection, blocks in forward order.

    Raises:
        ConfigError: unknown strategy, missing input for a strategy, invalid or impossible budget, inconsistent
            parameter counts.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown selection strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    _check_budget(max_blocks, max_param_fraction)
    if head_params < 0:
        raise ConfigError(f"head_params must be >= 0, got {head_params}")
    ranking = rank_blocks(strategy, blocks, probe_result, manual=manual, seed=seed, rgn_scores=rgn_scores,
                          stall_fraction=stall_fraction)
    block_sum = sum(int(b.num_params) for b in blocks)
    if total_params is None:
        total_params = block_sum + head_params
    backbone_params = total_params - head_params
    if backbone_params < block_sum:
        raise ConfigError(f"total_params={total_params:,} is smaller than the blocks ({block_sum:,}) plus the head "
                          f"({head_params:,})")
    if max_param_fraction is not None and backbone_params <= 0:
        raise ConfigError("max_param_fraction needs a backbone with parameters (the blocks have none)")
    defaulted = ranking.uses_budget and not ranking.exact and max_blocks is None and max_param_fraction is None
    if defaulted:
        max_blocks = DEFAULT_MAX_BLOCKS
    selected, skipped = fill_budget(ranking, blocks, max_blocks=max_blocks, max_param_fraction=max_param_fraction,
                                    backbone_params=backbone_params)
    by_index = {b.index: b for b in blocks}
    chosen = [by_index[i] for i in selected]
    block_params = sum(int(b.num_params) for b in chosen)
    trainable = block_params + head_params
    budget = {
        "max_blocks": max_blocks,
        "max_param_fraction": max_param_fraction,
        "backbone_params": backbone_params,
        "selected_fraction": block_params / backbone_params if backbone_params else math.nan,
        "skipped": [by_index[i].name for i in skipped],
        "ignored": not ranking.uses_budget,
        "defaulted": defaulted,
    }
    return Selection(
        strategy=strategy,
        blocks=[{"index": int(b.index), "name": b.name, "num_params": int(b.num_params)} for b in chosen],
        module_names=[prefix + b.name for b in chosen],
        scores=dict(ranking.scores),
        block_params=block_params,
        total_params=int(total_params),
        trainable_params=trainable,
        head_params=int(head_params),
        trainable_fraction=trainable / total_params if total_params else math.nan,
        budget=budget,
        rationale=ranking.rationale,
        ranking=list(ranking.order),
        num_blocks=len(blocks),
        prefix=prefix,
    )
