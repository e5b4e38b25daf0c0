"""timm backbones: ``timm:<model name>``.

:attr:`Backbone.model` is the timm model itself, created with ``num_classes=0`` so that ``model(x=...)`` returns the
pooled pre-logits. Block names are therefore plain timm module names (``layer2.0``, ``blocks.3``, ``blocks.1.2``,
``stages.1.blocks.0``), and timm's own helpers (``group_matcher``, ``set_grad_checkpointing``, ...) stay usable.

Blocks come from ``model.group_matcher(coarse=False)``: its regexes over parameter names are applied to every
parameter; a parameter matched by a block regex belongs to the smallest module that covers the matched text (the
"deepest common module prefix" of the group), so ``^blocks\\.(\\d+)\\.(\\d+)`` yields ``blocks.S.B``. Parameters of the
stem regex, of the final groups (timm's "match previous group" entries such as ViT ``norm`` or EfficientNet
``conv_head|bn2``) and unmatched ones (head) belong to no block. Blocks are ordered by timm's group ordinal
(``timm.models.group_parameters``), ties broken by module registration order. timm merges a ConvNeXt stage's
``downsample`` into the group of that stage's first block; here it is a block of its own (``stages.S.downsample``),
so that every non-stem, non-head parameter belongs to exactly one block.

Models without a usable ``group_matcher`` fall back to :func:`container_blocks`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from nc_finetune.backbones.base import (
    Backbone,
    check_pooling,
    count_params,
    finalize_model,
    first_line,
    make_block_infos,
)
from nc_finetune.backbones.preprocess import ImagePreprocessor, timm_image_config
from nc_finetune.errors import ConfigError, UserError

#: timm's suffix for "merge into the previous group" (final norms, conv_head) in group_matcher specs.
_MATCH_PREV_GROUP = (99999,)

#: Top-level children the fallback heuristic never treats as blocks.
_NON_BLOCK_CHILDREN = frozenset({"stem", "conv1", "patch_embed", "head", "fc", "classifier", "norm", "fc_norm"})


@dataclass
class TimmBlocks:
    """Result of block enumeration.

    Attributes:
        names: Block module names in forward order.
        stem_params: Parameter names of the stem.
        other_params: Parameter names after/outside the blocks (final norm, conv_head, head).
        source: ``"group_matcher"`` or ``"heuristic"``.
    """

    names: list[str]
    stem_params: list[str] = field(default_factory=list)
    other_params: list[str] = field(default_factory=list)
    source: str = "group_matcher"


def load_timm_backbone(
    name: str,
    *,
    spec: str | None = None,
    pooling: str = "auto",
    image_size: int | None = None,
    pretrained: bool = True,
    cache_dir: str | None = None,
    state_dict: Mapping[str, Tensor] | None = None,
    family: str = "timm",
    provenance: dict[str, str] | None = None,
) -> Backbone:
    """Create a timm model as a :class:`Backbone`.

    Args:
        name: timm model name, optionally with a pretrained tag (``resnet50.a1_in1k``).
        spec: The user's spec string (default ``"timm:<name>"``).
        pooling: ``"auto"`` (the model's own: CLS for ``global_pool="token"``, mean otherwise), ``"cls"`` or
            ``"mean"``; an explicit choice for a token model also resets the model's global pooling so the final
            feature agrees with the block taps.
        image_size: Square input resolution; ViT-style models get their position embeddings resampled.
        pretrained: Load timm's pretrained weights (hub or hub cache).
        cache_dir: Hub cache directory for the weights.
        state_dict: Weights to load strictly after creation (converted offline assets; use ``pretrained=False``).
        family: Recorded on the backbone (``"builtin"`` for converted offline assets).
        provenance: Extra provenance entries.
    """
    import timm

    check_pooling(pooling)
    if not timm.is_model(name) and not name.startswith(("hf-hub:", "local-dir:")):  # timm's own hub/dir prefixes
        raise ConfigError(f"unknown timm model {name!r}; find valid names with timm.list_models('<pattern>')")
    kwargs: dict[str, Any] = {"pretrained": pretrained, "num_classes": 0}
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    try:
        model = timm.create_model(name, **kwargs)
    except OSError as e:
        raise UserError(
            f"could not load pretrained weights for timm model {name!r}: {first_line(e)} "
            "(offline? fill the hub cache once online, or use pretrained=False)"
        ) from e
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)  # strict: a partial checkpoint must not load silently
    current = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if image_size is not None and hasattr(model, "set_input_size") and current != (image_size, image_size):
        model.set_input_size(img_size=(image_size, image_size))  # resamples ViT position embeddings
    resolved = _resolve_pooling(model, name, pooling)
    model = finalize_model(model)

    found = enumerate_timm_blocks(model)
    blocks = make_block_infos(model, found.names)
    final_tap = _final_tap(model, found)
    image_cfg = timm_image_config(model, image_size)
    prov = {"source": f"timm:{name}", "pretrained": str(pretrained), "blocks_from": found.source}
    prov.update(provenance or {})
    return Backbone(
        spec=spec or f"timm:{name}",
        model=model,
        modality="image",
        blocks=blocks,
        feature_dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
        pooling=resolved,
        final_tap=final_tap,
        preprocess=ImagePreprocessor(image_cfg, key="x"),
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0) or 0),
        channels_last=str(getattr(model, "output_fmt", "NCHW")).upper().endswith("NHWC"),
        family=family,
        grad_checkpointing=model.set_grad_checkpointing if hasattr(model, "set_grad_checkpointing") else None,
        provenance=prov,
    )


def _resolve_pooling(model: nn.Module, name: str, pooling: str) -> str:
    """Resolve "auto" and align a token model's own global pooling with an explicit choice."""
    if pooling == "last":
        raise ConfigError(f"pooling 'last' (last token) is for text models; timm model {name!r} takes cls or mean")
    global_pool = getattr(model, "global_pool", None)
    if not isinstance(global_pool, str):  # a pooling module: CNN feature maps are always averaged
        if pooling == "cls":
            raise ConfigError(f"pooling 'cls' needs a token model; timm model {name!r} outputs feature maps (use mean)")
        return "mean"
    native = "cls" if global_pool == "token" else "mean"
    if pooling in ("auto", native):
        return native
    if pooling == "cls" and not getattr(model, "has_class_token", True):
        raise ConfigError(f"pooling 'cls' needs a class token; timm model {name!r} has none (use mean)")
    try:
        model.reset_classifier(0, global_pool="token" if pooling == "cls" else "avg")
    except (AssertionError, TypeError, ValueError) as e:
        raise ConfigError(f"timm model {name!r} does not support pooling {pooling!r}; allowed: auto, {native}") from e
    return pooling


def _final_tap(model: nn.Module, found: TimmBlocks) -> str | None:
    """``""`` (the model root, whose output is the pooled pre-logits) unless the last block already gives it."""
    if found.source != "group_matcher" or found.other_params:
        return ""  # final norm / conv_head / head norm run after the last block
    pool = getattr(model, "global_pool", None)
    pool_type = pool if isinstance(pool, str) else getattr(pool, "pool_type", "avg")
    # only plain average (or CLS for token models, matched by Backbone.pool) equals pooling the last block
    return None if pool_type in ("avg", "fast", "token") else ""


def enumerate_timm_blocks(model: nn.Module) -> TimmBlocks:
    """Find the ordered block modules of a timm model (see the module docstring for the rules).

    Args:
        model: A timm model.

    Returns:
        The block names and the parameter names outside blocks.

    Raises:
        ConfigError: When no blocks can be found.
    """
    matcher = _group_matcher(model)
    found = _blocks_from_matcher(model, matcher) if matcher is not None else None
    if found is None or not found.names:
        found = TimmBlocks(container_blocks(model), source="heuristic")
    if not found.names:
        raise ConfigError(f"cannot find blocks in {type(model).__name__}: no group_matcher and no block containers")
    return found


def _group_matcher(model: nn.Module) -> dict[str, Any] | None:
    fn = getattr(model, "group_matcher", None)
    if fn is None:
        return None
    try:
        matcher = fn(coarse=False)
    except (NotImplementedError, TypeError):
        return None
    return matcher if isinstance(matcher, Mapping) else None  # callable matchers: use the heuristic


def _compile(spec: Any) -> list[tuple[re.Pattern[str], bool]]:
    """A group_matcher value -> ``[(regex, is_final_group)]`` (a str, or a list of ``(regex, suffix)`` pairs)."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return [(re.compile(spec), False)]
    return [(re.compile(regex), tuple(suffix or ()) == _MATCH_PREV_GROUP) for regex, suffix in spec]


def _covering_module(param_name: str, end: int) -> str | None:
    """Smallest module prefix of ``param_name`` that covers the first ``end`` characters (the regex match)."""
    parts = param_name.split(".")
    for k in range(1, len(parts)):
        prefix = ".".join(parts[:k])
        if len(prefix) >= end:
            return prefix
    owner = ".".join(parts[:-1])  # the match reached into the leaf name: the owning module
    return owner or None


def _blocks_from_matcher(model: nn.Module, matcher: Mapping[str, Any]) -> TimmBlocks | None:
    from timm.models import group_parameters

    stem = [r for r, _ in _compile(matcher.get("stem"))]
    block_specs = [c for key, spec in matcher.items() if key != "stem" for c in _compile(spec)]
    stem_params: list[str] = []
    other_params: list[str] = []
    members: dict[str, list[str]] = {}  # block module -> its parameter names
    for pname, _ in model.named_parameters():
        if any(r.match(pname) for r in stem):
            stem_params.append(pname)
            continue
        hit = next(((m, final) for r, final in block_specs if (m := r.match(pname))), None)
        module = _covering_module(pname, hit[0].end()) if hit is not None and not hit[1] else None
        if module is None:
            other_params.append(pname)
        else:
            members.setdefault(module, []).append(pname)
    if not members:
        return None
    members = _split_nested(members, other_params)

    # forward order: timm's group ordinal first, then module registration order
    layer_of = {p: lid for lid, names in group_parameters(model, matcher).items() for p in names}
    registration = {n: i for i, (n, _) in enumerate(model.named_modules())}
    names = sorted(members, key=lambda m: (min(layer_of.get(p, 1 << 30) for p in members[m]), registration[m]))
    return TimmBlocks(names, stem_params, other_params)


def _split_nested(members: dict[str, list[str]], other_params: list[str]) -> dict[str, list[str]]:
    """Replace a block module that contains another block by its direct children (each keeps its own params).

    Parameters held directly by such an outer module belong to no block and are appended to ``other_params``.
    """
    changed = True
    while changed:
        changed = False
        for outer in list(members):
            if any(inner.startswith(outer + ".") for inner in members if inner != outer):
                for p in members.pop(outer):
                    rest = p[len(outer) + 1 :]
                    if "." not in rest:
                        other_params.append(p)
                        continue
                    members.setdefault(f"{outer}.{rest.split('.')[0]}", []).append(p)
                changed = True
                break
    return members


def container_blocks(model: nn.Module) -> list[str]:
    """Heuristic blocks for models without a usable ``group_matcher``.

    The model's top-level ``nn.Sequential``/``nn.ModuleList`` children (except stem/head-like names such as
    ``stem``, ``conv1``, ``head``) are expanded, in registration order, down through nested containers; every
    non-container module reached that holds parameters is a block. E.g. ``blocks`` of Blocks -> ``blocks.i``;
    ``layer1..4`` of Bottlenecks -> ``layerS.B``; ``blocks`` of stage Sequentials -> ``blocks.S.B``.

    Args:
        model: Any module.

    Returns:
        Block module names (possibly empty).
    """
    names: list[str] = []
    for child_name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and child_name not in _NON_BLOCK_CHILDREN:
            names.extend(_expand(child_name, child))
    return names


def _expand(prefix: str, container: nn.Module) -> Iterable[str]:
    for name, child in container.named_children():
        full = f"{prefix}.{name}"
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            yield from _expand(full, child)
        elif count_params(child) > 0:
            yield full
