"""Budgeted block selection: a strategy's ranking cut to a parameter budget, and its ``selection.json`` form.

:func:`select_blocks` ranks the blocks with one strategy (:mod:`nc_finetune.select.strategies`) and fills the budget
greedily in ranking order; the resulting :class:`Selection` names the modules to tune inside the classifier and
builds explicit peft ``LoraConfig`` arguments (fully qualified ``target_modules``, never ``layers_to_transform``,
whose regex needs a dot before the container name and so cannot address timm's top-level ``blocks.N``).
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
from typing import TYPE_CHECKING, Any

from torch import nn

from nc_finetune.errors import ConfigError
from nc_finetune.probe.result import ProbeResult
from nc_finetune.select.strategies import STRATEGIES, BlockLike, Ranking, rank_blocks
from nc_finetune.utils.io import read_json_object, write_json_atomic

if TYPE_CHECKING:
    from nc_finetune.config import SelectionConfig

#: Blocks tuned when no budget is given: one block, as in Li et al.'s Layer FT / SCL FT.
DEFAULT_MAX_BLOCKS = 1

#: How :func:`fill_budget` cuts a ranking to a parameter budget (policy -> one-line description).
FILL_POLICIES: dict[str, str] = {
    "stop": "take blocks in ranking order, stop at the first one that does not fit",
    "skip": "take blocks in ranking order, skip any that does not fit and try the next",
    "per_param": "take blocks by rank weight per parameter, skip any that does not fit",
}

#: What the fraction budget counts (stated in ``selection.json`` and by :meth:`Selection.explain`).
BUDGET_COUNTS = "selected block parameters / backbone parameters (the head is not counted)"


def _pct(fraction: float) -> str:
    pct = 100.0 * fraction
    return f"{pct:.1f}%" if pct >= 0.1 else f"{pct:.2g}%"


@dataclass
class Selection:
    """The blocks chosen for tuning and the parameter accounting of the resulting fine-tune.

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
            ``selected_fraction`` (of the backbone), ``counts`` (what the fraction counts, :data:`BUDGET_COUNTS`),
            ``fill`` (the :data:`FILL_POLICIES` entry), ``skipped`` (names of blocks ranked above a selected one but
            left out because they did not fit the fraction budget), ``stopped_at`` (``stop``: the name of the ranked
            block that did not fit, or ``None``), ``ignored`` (strategy ``all``), ``defaulted`` (no budget given, so
            :data:`DEFAULT_MAX_BLOCKS` applied).
        rationale: Why these blocks (one paragraph, from the strategy).
        ranking: Every ranked block index, first = tune first.
        num_blocks: Number of blocks of the backbone.
        prefix: Attribute path of the backbone inside the classifier.
        details: Strategy-specific evidence (``trial``: every trial's numbers and the total cost; ``shift``: the
            per-block degradation curves; ``bootstrap``: how often each block was picked).
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
    details: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        names = [b["name"] for b in self.blocks]
        return (f"Selection(strategy={self.strategy!r}, blocks={names}, trainable_params={self.trainable_params:,} "
                f"of {self.total_params:,} ({_pct(self.trainable_fraction)}))")

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
        kw["details"] = dict(d.get("details") or {})
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
            if b.get("max_param_fraction") is not None:
                lines.append(f"  the fraction counts {b.get('counts', BUDGET_COUNTS)}: "
                             f"{_pct(b.get('selected_fraction', math.nan))} used")
            fill = b.get("fill")
            if fill:
                lines.append(f"  fill: {fill} ({FILL_POLICIES.get(fill, '')})")
            if b.get("stopped_at"):
                lines.append(f"  stopped at {b['stopped_at']} (next in the ranking, over the fraction budget)")
            if b.get("skipped"):
                lines.append(f"  skipped (over the fraction budget): {', '.join(b['skipped'])}")
        if self.ranking:
            lines.append("ranking: " + " > ".join(str(i) for i in self.ranking))
        lines.append(f"why: {self.rationale}")
        lines += explain_details(self.details)
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
        head: str | Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Keyword arguments for ``peft.LoraConfig`` that adapt exactly the selected blocks.

        ``target_modules`` is the sorted list of fully qualified names of every ``nn.Linear``, ``nn.Conv2d`` (and
        transformers ``Conv1D``) inside the selected blocks, found by walking ``model.named_modules()``; peft matches
        such names exactly. ``modules_to_save`` holds the head (trained in full). ``layers_to_transform`` is never used
        (peft's pattern needs a dot before the container name, so it cannot address timm blocks). For a decoder layer
        the targets are its attention and MLP projections (q/k/v/o and gate/up/down for Llama/Qwen2/Mistral/Gemma,
        c_attn/c_proj/c_fc for GPT-2); when every target is a ``Conv1D`` (GPT-2), ``fan_in_fan_out`` is set (its weight
        is stored transposed).

        Args:
            model: The classifier the selection refers to (the model later passed to ``get_peft_model``).
            r: LoRA rank.
            alpha: ``lora_alpha``.
            dropout: ``lora_dropout``.
            head: Name(s) of the head module(s) in ``model``, for ``modules_to_save``; default: ``nc_head`` (the head
                of :func:`~nc_finetune.adapt.build_classifier`'s classifier) when ``model`` has one, else ``head``.

        Raises:
            ConfigError: a selected block is not a module of ``model``, contains no adaptable module, or contains a
                module that peft would skip because it matches the head's name.
        """
        modules = dict(model.named_modules())
        if head is None:
            head = _CLASSIFIER_HEAD if _CLASSIFIER_HEAD in modules else "head"
        heads = [head] if isinstance(head, str) else list(head)
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
        kwargs: dict[str, Any] = {
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": dropout,
            "target_modules": sorted(set(targets)),
            "modules_to_save": heads,
        }
        # transformers' Conv1D (GPT-2's c_attn/c_proj/c_fc) stores its weight transposed; say so, as peft asks.
        # Mixed Linear/Conv1D targets are left to peft, which sets the flag per module (with a warning).
        conv1d = _transformers_conv1d()
        if conv1d is not None and all(isinstance(modules[t], conv1d) for t in targets):
            kwargs["fan_in_fan_out"] = True
        return kwargs


    def peft_config(
        self,
        model: nn.Module,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        ranks: Mapping[int, int] | None = None,
        modules_to_save: Sequence[str] | None = None,
    ) -> Any:
        """A ``peft.LoraConfig`` that adapts the selected blocks of a plain model (no nc-finetune wrapper).

        Selected blocks are found in ``model`` by the longest trailing part of their name, so the same selection
        applies to the library's own model (``AutoModel``, ``AutoModelForSequenceClassification``, a timm model)
        whatever prefix it puts in front of the layer stack. When every selected block is ``<stack>.<pattern>.<i>``
        of one stack (``encoder.layer.3``, ``blocks.7``), the config is portable: ``target_modules`` are the
        adaptable modules' names inside a block, ``layers_pattern`` and ``layers_to_transform`` pick the blocks, and
        it applies to any model with that layer stack. Otherwise (nested timm stages such as ``layer2.0``) it names
        every module in full. Either way it is checked against ``model`` with peft's own matching rule.

        Args:
            model: The plain model the config is for (e.g. ``backbone.plain_model()``).
            r: LoRA rank of every block without an entry in ``ranks``.
            alpha: ``lora_alpha``.
            dropout: ``lora_dropout``.
            ranks: Rank per selected block index; blocks whose rank differs from ``r`` go to ``rank_pattern``.
            modules_to_save: Modules trained in full (e.g. the task model's ``classifier``).

        Returns:
            ``peft.LoraConfig``; ``config.save_pretrained(dir)`` writes ``adapter_config.json``.

        Raises:
            ConfigError: a selected block is not found (or found twice) in ``model``, or holds nothing to adapt.
        """
        import peft
        from peft.tuners.tuners_utils import check_target_module_exists

        modules = dict(model.named_modules())
        adaptable = _adaptable_types()
        located = {int(b["index"]): _locate(modules, b["name"]) for b in self.blocks}
        wanted: dict[str, int] = {}  # full module name in model -> block index
        for index, path in located.items():
            found = [n for n, m in modules.items() if n.startswith(path + ".") and isinstance(m, adaptable)
                     and getattr(m, "groups", 1) == 1]
            if not found:
                raise ConfigError(f"selected block '{path}' contains no Linear/Conv2d/Conv1D module that LoRA can "
                                  "adapt")
            wanted.update({n: index for n in found})
        block_rank = {i: int((ranks or {}).get(i, r)) for i in located}
        common = dict(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      modules_to_save=list(modules_to_save) if modules_to_save else None)
        stacks = {path.rsplit(".", 2)[-2] if path.count(".") >= 1 else "" for path in located.values()}
        parents = {path.rsplit(".", 1)[0] if "." in path else "" for path in located.values()}
        numbered = all(path.rsplit(".", 1)[-1].isdigit() for path in located.values())
        if numbered and len(parents) == 1 and len(stacks) == 1 and stacks != {""}:
            pattern = stacks.pop()
            layer = {i: int(p.rsplit(".", 1)[-1]) for i, p in located.items()}
            inner = sorted({n[len(located[i]) + 1:] for n, i in wanted.items()})
            rank_pattern = {rf"{re.escape(pattern)}\.{layer[i]}\..*": k for i, k in block_rank.items() if k != r}
            config = peft.LoraConfig(target_modules=inner, layers_to_transform=sorted(layer.values()),
                                     layers_pattern=pattern, rank_pattern=rank_pattern, **common)
            if {n for n, m in modules.items() if isinstance(m, adaptable) and
                    check_target_module_exists(config, n) is True} == set(wanted):
                return config
        rank_pattern = {re.escape(n): block_rank[i] for n, i in wanted.items() if block_rank[i] != r}
        return peft.LoraConfig(target_modules=sorted(wanted), rank_pattern=rank_pattern, **common)


#: Attribute name of the head of nc-finetune's classifier (:class:`~nc_finetune.adapt.Classifier`).
_CLASSIFIER_HEAD = "nc_head"


def _locate(modules: Mapping[str, nn.Module], block: str) -> str:
    """The module of ``modules`` whose name ends with the longest trailing part of ``block`` (dot-aligned)."""
    parts = block.split(".")
    for start in range(len(parts)):
        tail = ".".join(parts[start:])
        hits = [n for n in modules if n == tail or n.endswith("." + tail)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ConfigError(f"selected block '{block}' matches several modules of the model: {', '.join(hits[:3])}")
    raise ConfigError(f"selected block '{block}' is not part of the model (no module name ends with any part of it)")


def explain_details(details: Mapping[str, Any]) -> list[str]:
    """Text lines for a selection's strategy evidence (``trial``, ``shift``, ``bootstrap``); shared with ``report``."""
    lines: list[str] = []
    trial = details.get("trial")
    if trial:
        lines.append(f"trials: {trial['steps']} steps of batch {trial['batch_size']} per block, NC1/loss on "
                     f"{trial['held_out_samples']} held-out training samples (before: NC1 {_g(trial['nc1_before'])}, "
                     f"loss {_g(trial['loss_before'])}); score {trial['score']}")
        for t in trial["trials"]:
            lines.append(f"  [{t['index']}] {t['name']}: NC1 {_g(t['nc1_after'])} (drop {_g(t['nc1_drop'])}), "
                         f"loss {_g(t['loss_after'])} (drop {_g(t['loss_drop'])}), {t['params']:,} params, "
                         f"{t['seconds']:.2f} s")
        c = trial["cost"]
        lines.append(f"  trial cost: {c['seconds']:.2f} s, {c['forward_passes']} forward and {c['backward_passes']} "
                     f"backward passes ({c['forward_samples']:,} / {c['backward_samples']:,} samples)")
    shift = details.get("shift")
    if shift:
        lines.append(f"shift: reference {shift['reference']}; located at block {shift['located']} "
                     f"(first jump >= {shift['jump_fraction']:g} of the largest)")
        for b in shift["blocks"]:
            lines.append(f"  [{b['index']}] {b['name']}: Δ ln NC1 {_g(b['delta_log_nc1'])}, "
                         f"Δ NCC acc {_g(b['ncc_drop'])}, jump {_g(b['jump'])}")
    boot = details.get("bootstrap")
    if boot:
        freq = ", ".join(f"{k} {v:.0%}" for k, v in boot["pick_frequency"].items())
        lines.append(f"bootstrap: {boot['replicates']} resampled probes; picked: {freq}; the most stable selection "
                     f"({', '.join(map(str, boot['stable_selection']))}) in {boot['stability']:.0%} of them")
    return lines


def _g(v: Any) -> str:
    return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def _adaptable_types() -> tuple[type[nn.Module], ...]:
    types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
    conv1d = _transformers_conv1d()
    return (*types, conv1d) if conv1d is not None else types


def _transformers_conv1d() -> type[nn.Module] | None:
    """transformers' ``Conv1D``, looked up only if transformers is already imported (a model holding one implies it
    is)."""
    pu = sys.modules.get("transformers.pytorch_utils")
    return getattr(pu, "Conv1D", None) if pu is not None else None


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
    fill: str = "stop",
) -> tuple[list[int], list[int]]:
    """Cut a ranking to the budget with one of the :data:`FILL_POLICIES`.

    The fraction budget counts the selected *blocks'* parameters against ``backbone_params`` (the head is not
    counted: it trains under every strategy). ``max_blocks`` caps the number of blocks under every policy.

    * ``stop``: take blocks in ranking order and stop at the first one that does not fit, so a selection is always
      a prefix of the ranking.
    * ``skip``: greedy; a block that does not fit is skipped and the next ranked block is tried.
    * ``per_param``: blocks by rank weight per parameter (``(n - position) / num_params``, ties in ranking order),
      greedy as ``skip``. The rank weight, not the raw score, is used because scores differ in sign and scale
      between strategies (``knee`` shortfalls can be negative, ``last_k`` scores are indices).

    Returns:
        ``(selected, skipped)`` block indices: selected in forward order; skipped = blocks ranked above the
        lowest-ranked selected one but left out (``skip``/``per_param``), in ranking order; empty for ``stop``.

    Raises:
        ConfigError: unknown policy; the fraction budget cannot hold any ranked block; ``stop`` and the top-ranked
            block does not fit; or (``ranking.exact``) the budget cannot hold every ranked block.
    """
    if fill not in FILL_POLICIES:
        raise ConfigError(f"unknown selection fill policy {fill!r}; choose one of: {', '.join(FILL_POLICIES)}")
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
    if limit is not None and all(by_index[i].num_params > limit for i in ranking.order):
        smallest = min((by_index[i] for i in ranking.order), key=lambda b: (b.num_params, b.index))
        raise ConfigError(f"selection budget max_param_fraction={max_param_fraction:g} cannot hold any block: the "
                          f"smallest block '{smallest.name}' has {_pct(smallest.num_params / backbone_params)} of the "
                          "parameters")
    n = len(ranking.order)
    if fill == "per_param":
        # Rank weight n - position per parameter; a parameter-free block comes first (it costs nothing).
        density = {i: (n - pos) / max(by_index[i].num_params, 1e-12) for pos, i in enumerate(ranking.order)}
        candidates = sorted(ranking.order, key=lambda i: (-density[i], ranking.order.index(i)))
    else:
        candidates = list(ranking.order)
    selected: list[int] = []
    passed: list[int] = []
    used = 0
    for i in candidates:
        if max_blocks is not None and len(selected) >= max_blocks:
            break
        size = by_index[i].num_params
        if limit is not None and used + size > limit:
            if fill == "stop":
                if not selected:
                    top = by_index[i]
                    raise ConfigError(f"selection budget max_param_fraction={max_param_fraction:g} cannot hold the "
                                      f"top-ranked block '{top.name}' ({_pct(top.num_params / backbone_params)} of "
                                      "the parameters) and selection.fill=stop never passes over a block; raise the "
                                      "budget or use selection.fill=skip or per_param")
                break
            passed.append(i)
            continue
        selected.append(i)
        used += size
    # Only blocks ranked above a selected one are worth reporting.
    lowest = max(ranking.order.index(i) for i in selected)
    skipped = [i for i in ranking.order if i not in selected and ranking.order.index(i) < lowest]
    return sorted(selected), skipped


def _stopped_at(ranking: Ranking, selected: list[int], fill: str, max_blocks: int | None) -> int | None:
    """The block ``stop`` halted on: the next ranked block after the selection, when the budget (not
    ``max_blocks``, not the end of the ranking) made it stop."""
    if fill != "stop" or not ranking.uses_budget or ranking.exact or not selected:
        return None
    if max_blocks is not None and len(selected) >= max_blocks:
        return None
    nxt = len(selected)
    return ranking.order[nxt] if nxt < len(ranking.order) else None


# -------------------------------------------------------------------------------------------------------------- entry


def select_blocks(
    probe_result: ProbeResult | None,
    blocks: Sequence[BlockLike],
    *,
    strategy: str | None = None,
    max_blocks: int | None = None,
    max_param_fraction: float | None = None,
    manual: Sequence[int | str] | int | str | None = None,
    seed: int = 0,
    head_params: int = 0,
    total_params: int | None = None,
    rgn_scores: Mapping[int, float] | None = None,
    stall_fraction: float = 0.1,
    prefix: str = "backbone.",
    cka_scores: Mapping[int, float] | None = None,
    fill: str = "stop",
    stall_reference: str = "last",
    knee_residual: str = "shortfall",
    trial_results: Mapping[str, Any] | None = None,
    trial_score: str = "nc1_drop_per_param",
    reference_probe: ProbeResult | None = None,
    shift_jump: float = 0.5,
    bootstrap_probes: Sequence[ProbeResult] | None = None,
    cfg: SelectionConfig | None = None,
) -> Selection:
    """Rank the blocks with ``strategy`` and cut the ranking to the budget.

    Args:
        probe_result: The probe of the backbone on the downstream training data (needed by ``knee`` and ``stall``).
        blocks: The backbone's blocks (``index``, ``name``, ``num_params``).
        strategy: One of :data:`STRATEGIES`.
        max_blocks: At most this many blocks. With neither budget given, one block (:data:`DEFAULT_MAX_BLOCKS`).
        max_param_fraction: Selected block parameters / backbone parameters at most this, in (0, 1].
        manual: Block indices or names for ``manual``.
        seed: Seed for ``random_k`` and ``lisa``.
        head_params: Parameters of the classifier head (counted as trainable).
        total_params: Parameters of the whole classifier, backbone + head. Default: the blocks' sum + head (a
            backbone with parameters outside its blocks, e.g. stem or embeddings, should pass the true total).
        rgn_scores: Per-block scores from :func:`~nc_finetune.select.strategies.auto_rgn_scores` for ``auto_rgn``.
        stall_fraction: Threshold of the ``stall`` rule.
        prefix: Attribute path of the backbone inside the classifier.
        cka_scores: Per-block CKA from :func:`~nc_finetune.select.cka.block_cka` for ``cka``.
        fill: How the ranking is cut to the budget, one of :data:`FILL_POLICIES` (default ``stop``).
        stall_reference: ``stall`` measures the remaining progress against the ``last`` block or the NC1 ``min``.
        knee_residual: ``knee`` scores the one-sided ``shortfall`` or the ``two_sided`` deviation from the law.
        trial_results: For ``trial``: the measured trials (:func:`nc_finetune.select.trial.run_trials`).
        trial_score: For ``trial``: ``nc1_drop_per_param``, ``nc1_drop`` or ``loss_drop``.
        reference_probe: For ``shift``: the probe of the reference (source / clean) data.
        shift_jump: For ``shift``: the share of the largest degradation jump that locates the shift.
        bootstrap_probes: For ``knee``/``stall``: probes of resampled probe subsets
            (:func:`nc_finetune.select.bootstrap.bootstrap_probes`); the rule is applied to each, and blocks are
            ranked by how often they are picked under the budget (the most stable pick first).
        cfg: A recipe's selection section, taken whole, instead of ``strategy``: its ``strategy``, ``max_blocks``,
            ``max_param_fraction``, ``blocks`` (as ``manual``), ``seed``, ``stall_fraction``, ``fill``,
            ``stall_reference``, ``knee_residual``, ``trial_score`` and ``shift_jump`` replace those keyword
            arguments; the computed inputs (``rgn_scores``, ``trial_results``, ...) and the sizes stay arguments.

    Returns:
        The selection, blocks in forward order.

    Raises:
        ConfigError: unknown strategy, missing input for a strategy, invalid or impossible budget, inconsistent
            parameter counts.
    """
    if cfg is not None:
        if strategy is not None:
            raise TypeError("select_blocks takes strategy= or cfg= (the selection section holds the strategy), "
                            "not both")
        strategy, max_blocks, max_param_fraction = cfg.strategy, cfg.max_blocks, cfg.max_param_fraction
        manual, seed, stall_fraction, fill = cfg.blocks, cfg.seed, cfg.stall_fraction, cfg.fill
        stall_reference, knee_residual = cfg.stall_reference, cfg.knee_residual
        trial_score, shift_jump = cfg.trial_score, cfg.shift_jump
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown selection strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    _check_budget(max_blocks, max_param_fraction)
    if head_params < 0:
        raise ConfigError(f"head_params must be >= 0, got {head_params}")
    if fill not in FILL_POLICIES:
        raise ConfigError(f"unknown selection fill policy {fill!r}; choose one of: {', '.join(FILL_POLICIES)}")
    options = {"manual": manual, "seed": seed, "rgn_scores": rgn_scores, "stall_fraction": stall_fraction,
               "stall_reference": stall_reference, "knee_residual": knee_residual, "trial_results": trial_results,
               "trial_score": trial_score, "reference_probe": reference_probe, "shift_jump": shift_jump,
               "cka_scores": cka_scores}
    ranking = rank_blocks(strategy, blocks, probe_result, **options)
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
    if bootstrap_probes:
        from nc_finetune.select.bootstrap import bootstrap_ranking

        def cut(r: Ranking) -> list[int]:
            return fill_budget(r, blocks, max_blocks=max_blocks, max_param_fraction=max_param_fraction,
                               backbone_params=backbone_params, fill=fill)[0]

        ranking = bootstrap_ranking(strategy, blocks, ranking, bootstrap_probes, cut, options)
        # The most stable pick is itself a budgeted selection (of one replicate): taken as it is.
        selected, skipped, stopped = list(ranking.details["bootstrap"]["stable_indices"]), [], None
    else:
        selected, skipped = fill_budget(ranking, blocks, max_blocks=max_blocks, max_param_fraction=max_param_fraction,
                                        backbone_params=backbone_params, fill=fill)
        stopped = _stopped_at(ranking, selected, fill, max_blocks)
    by_index = {b.index: b for b in blocks}
    chosen = [by_index[i] for i in selected]
    block_params = sum(int(b.num_params) for b in chosen)
    trainable = block_params + head_params
    budget = {
        "max_blocks": max_blocks,
        "max_param_fraction": max_param_fraction,
        "backbone_params": backbone_params,
        "selected_fraction": block_params / backbone_params if backbone_params else math.nan,
        "counts": BUDGET_COUNTS,
        "fill": fill if ranking.uses_budget and not ranking.exact else None,
        "skipped": [by_index[i].name for i in skipped],
        "stopped_at": by_index[stopped].name if stopped is not None and max_param_fraction is not None else None,
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
        details=dict(ranking.details),
    )
