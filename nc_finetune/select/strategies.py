"""Block-ranking strategies: every strategy orders the backbone's blocks by how much tuning them should help.

A strategy returns a :class:`Ranking` (block indices, first = tune first, a score per block and a one-paragraph
rationale); :func:`nc_finetune.select.selection.select_blocks` turns any ranking into a budgeted selection.

NC-guided, training-free rules (after He & Su, "A Law of Data Separation in Deep Learning", PNAS 2023), with
``z_l = ln nc1_l`` over the blocks whose NC1 is finite and positive:

* ``knee``: OLS fit ``z_l ≈ a + b·l`` over block depth (He–Su equi-separation law, ``ρ = e^b``). The expected
  per-block progress is ``-b = -ln ρ``; the measured progress of block ``l`` is
  ``d_l = (z_p - z_l) / (l - p)`` with ``p`` the previous usable block. Score = shortfall ``s_l = -b - d_l``;
  ranked by score, ties to the deeper block.
* ``stall``: total reduction ``T = z_first - z_last``; remaining reduction ``R_l = z_l - z_last``; the stall point
  ``l*`` is the shallowest block with ``R_l < stall_fraction · T``. Ranked ``l*+1, …, last`` then
  ``l*, l*-1, …, first``.

Baselines: ``last_k``, ``first_k`` (surgical fine-tuning's choice under input-level shift), ``random_k``, ``all``,
``manual`` and ``auto_rgn`` (surgical fine-tuning's relative gradient norm, Lee et al. ICLR 2023, aggregated per
block by :func:`auto_rgn_scores`).

Rivals: ``cka`` (label-free: lowest linear CKA between a block's input and output first, scores from
:func:`nc_finetune.select.cka.block_cka`) and ``lisa`` (LISA's seeded uniform draw, :mod:`nc_finetune.select.lisa`).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nc_finetune.errors import ConfigError, DataError
from nc_finetune.probe.result import ProbeResult
from nc_finetune.select.lisa import lisa_permutation

#: ``stall`` references: the remaining collapse progress is measured against the last block or the NC1 minimum.
STALL_REFERENCES = ("last", "min")
#: ``knee`` residuals: the one-sided shortfall behind the equi-separation law, or the absolute deviation from it.
KNEE_RESIDUALS = ("shortfall", "two_sided")

# Scores closer than this are ties (broken towards the deeper block): exact geometric NC1 curves otherwise
# tie-break on float round-off.
_TIE_DECIMALS = 9


class BlockLike(Protocol):
    """What the selection needs from a block (``nc_finetune.backbones.BlockInfo`` satisfies it)."""

    index: int
    name: str
    num_params: int


@dataclass
class Ranking:
    """A strategy's ordering of blocks.

    Attributes:
        order: Block indices, first = tune first. Covers every block, except for ``manual`` (only the listed ones).
        scores: Score per block index, higher = tune earlier. ``-inf`` marks a block the rule cannot score (NC1
            not finite, not probed); NaN a block it deliberately leaves unscored (``knee``: the first block).
        rationale: One paragraph explaining why the order is what it is.
        uses_budget: False when budgets do not apply (``all``).
        exact: True when every ranked block must be selected (``manual``): a budget that cannot hold them all is
            an error instead of a cut.
        details: Strategy-specific evidence copied into ``selection.json`` (trial numbers, shift curves, bootstrap
            pick counts).
    """

    order: list[int]
    scores: dict[int, float]
    rationale: str
    uses_budget: bool = True
    exact: bool = False
    details: dict[str, Any] = field(default_factory=dict)


def _sort_desc(indices: Iterable[int], scores: Mapping[int, float]) -> list[int]:
    """Indices by score, highest first; ties (to ``_TIE_DECIMALS``) go to the deeper block."""
    return sorted(indices, key=lambda i: (-round(scores[i], _TIE_DECIMALS), -i))


def _sorted_blocks(blocks: Sequence[BlockLike]) -> list[BlockLike]:
    if not blocks:
        raise ConfigError("the backbone has no blocks to select from")
    out = sorted(blocks, key=lambda b: b.index)
    idx = [b.index for b in out]
    if len(set(idx)) != len(idx):
        raise ConfigError(f"duplicate block indices in {idx}")
    return out


def _fmt_blocks(indices: Sequence[int]) -> str:
    return ", ".join(str(i) for i in indices)


# ---------------------------------------------------------------------------------------------------------- NC input


def block_log_nc1(blocks: Sequence[BlockLike], probe_result: ProbeResult | None, strategy: str) -> dict[int, float]:
    """``ln nc1`` per block index from a probe; NaN where NC1 is missing, non-finite or not positive.

    Raises:
        ConfigError: no probe, or a probe measured on a different backbone (block names/indices disagree).
    """
    if probe_result is None:
        raise ConfigError(f"strategy '{strategy}' needs a probe result (probe.json); run `nc-finetune probe` first "
                          "or choose one of: last_k, first_k, random_k, all, manual, auto_rgn")
    by_index = {b.index: b for b in blocks}
    z = {b.index: math.nan for b in blocks}
    for rec in probe_result.blocks():
        i = int(rec["index"])
        if i not in by_index:
            raise ConfigError(f"the probe has block {i} '{rec.get('name')}' but the backbone has blocks "
                              f"{min(by_index)}..{max(by_index)}: probe.json comes from a different backbone")
        if rec.get("name") != by_index[i].name:
            raise ConfigError(f"block {i} is '{rec.get('name')}' in the probe but '{by_index[i].name}' in the "
                              "backbone: probe.json comes from a different backbone")
        v = rec.get("nc1")
        v = math.nan if v is None else float(v)
        z[i] = math.log(v) if math.isfinite(v) and v > 0 else math.nan
    return z


def _unusable_note(bad: list[int]) -> str:
    if not bad:
        return ""
    return (f" Blocks {_fmt_blocks(bad)} have no finite positive NC1 (degenerate or not probed): score -inf, "
            "ranked last.")


# ---------------------------------------------------------------------------------------------------------- NC rules


def rank_knee(blocks: Sequence[BlockLike], probe_result: ProbeResult | None, residual: str = "shortfall") -> Ranking:
    """Rank blocks by their shortfall against the equi-separation law (He & Su, PNAS 2023).

    With ``z_l = ln nc1_l`` over the usable blocks, OLS ``z_l ≈ a + b·l`` gives the expected per-block collapse
    progress ``-b = -ln ρ``. Block ``l`` with previous usable block ``p`` progresses ``d_l = (z_p - z_l)/(l - p)``;
    its score is the shortfall ``s_l = -b - d_l``. The block where downstream collapse falls furthest behind the law
    is where the pretrained features stop fitting the task, so it is tuned first; ties go to the deeper block.
    The first usable block has no measured predecessor (the raw input is not probed): it is left unscored (NaN)
    and ranked after the scored blocks. Blocks with non-finite NC1 get ``-inf`` and are ranked last.

    With ``residual="two_sided"`` the score is the absolute residual of the fit itself, ``|z_l - (a + b·l)|``, for
    every usable block (the first included): the block whose collapse level deviates most from the law, above or
    below it. A level residual integrates the per-block steps, so one block where NC1 rises briefly (a large
    one-sided shortfall) does not by itself outrank a sustained departure from the law.

    Raises:
        ConfigError: no probe, fewer than two blocks with finite positive NC1, or an unknown ``residual``.
    """
    if residual not in KNEE_RESIDUALS:
        raise ConfigError(f"knee_residual must be one of {', '.join(KNEE_RESIDUALS)}; got {residual!r}")
    blocks = _sorted_blocks(blocks)
    z = block_log_nc1(blocks, probe_result, "knee")
    good = [b.index for b in blocks if math.isfinite(z[b.index])]
    bad = [b.index for b in blocks if not math.isfinite(z[b.index])]
    if len(good) < 2:
        raise ConfigError(f"strategy 'knee' needs finite NC1 at two or more blocks, the probe has {len(good)}; "
                          "use 'stall', 'last_k' or 'manual' instead")
    ls = np.asarray(good, dtype=np.float64)
    zs = np.asarray([z[i] for i in good])
    lc = ls - ls.mean()
    slope = float((lc * (zs - zs.mean())).sum() / (lc * lc).sum())
    ss_tot = float(((zs - zs.mean()) ** 2).sum())
    resid = zs - (zs.mean() + slope * lc)
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else math.nan
    expected = -slope

    scores: dict[int, float] = {i: -math.inf for i in bad}
    progress: dict[int, float] = {}
    scores[good[0]] = math.nan
    for p, l in itertools.pairwise(good):
        progress[l] = (z[p] - z[l]) / (l - p)
        scores[l] = expected - progress[l]
    if residual == "two_sided":
        scores.update({i: abs(float(r)) for i, r in zip(good, resid, strict=True)})
        scored = _sort_desc(good, scores)
        order = scored + sorted(bad, reverse=True)
    else:
        scored = _sort_desc(good[1:], scores)
        order = scored + [good[0]] + sorted(bad, reverse=True)

    top = scored[0]
    name = next(b.name for b in blocks if b.index == top)
    fit_note = f"R² = {r2:.3f}" if math.isfinite(r2) else "R² undefined (flat curve)"
    weak = " The law fits poorly (R² < 0.5), so the knee is a weak signal." if not (r2 >= 0.5) else ""
    if residual == "two_sided":
        side = "above (less collapsed than)" if z[top] > zs.mean() + slope * (top - ls.mean()) else \
            "below (more collapsed than)"
        rationale = (
            f"knee (two-sided residual): least-squares fit of ln NC1 over block depth on {len(good)} blocks gives "
            f"ρ = {math.exp(slope):.3g} per block ({fit_note}). Block {top} '{name}' lies furthest from the fitted "
            f"line (|residual| {scores[top]:.3g}, {side} the law): that is where the representation departs most "
            "from steady collapse on the downstream task, so it is tuned first; the other blocks follow by "
            f"|residual| (ties to the deeper block).{weak}{_unusable_note(bad)}"
        )
        return Ranking(order=order, scores=scores, rationale=rationale)
    rationale = (
        f"knee: least-squares fit of ln NC1 over block depth on {len(good)} blocks gives ρ = {math.exp(slope):.3g} "
        f"per block ({fit_note}), i.e. an expected collapse progress of -ln ρ = {expected:.3g} per block. "
        f"Block {top} '{name}' progresses only {progress[top] + 0.0:.3g} (shortfall {scores[top]:.3g}), the furthest "
        "behind the equi-separation law: downstream collapse stalls there, which is where the pretrained features stop "
        "fitting the task, so it is tuned first; the other blocks follow by shortfall (ties to the deeper block). "
        f"Block {good[0]} has no measured predecessor and is ranked after the scored blocks.{weak}"
        f"{_unusable_note(bad)}"
    )
    return Ranking(order=order, scores=scores, rationale=rationale)


def rank_stall(blocks: Sequence[BlockLike], probe_result: ProbeResult | None, stall_fraction: float = 0.1,
               reference: str = "last") -> Ranking:
    """Rank the blocks right after the collapse stall point first.

    With ``z_l = ln nc1_l`` over the usable blocks and the reference ``z_ref`` (``reference="last"``: the last
    usable block; ``"min"``: the smallest ln NC1 of any block), ``T = z_first - z_ref`` is the total reduction and
    ``R_l = z_l - z_ref`` what the blocks after ``l`` still add. The stall point ``l*`` is the shallowest block with
    ``R_l < stall_fraction · T``. Against the last block, a curve whose NC1 rises again after its minimum stalls
    early (the rise hides the later progress); against the minimum it stalls at or before the minimum.
    Blocks after ``l*`` no longer separate the downstream classes; tuning the first of
    them (ideally with a skip connection to the head, SCL-FT) lets the task shape the representation earliest where
    it matters. Ranked ``l*+1, l*+2, …, last`` then ``l*, l*-1, …, first``; if collapse keeps progressing to the end
    (``l* = last``) the last block ranks first. If NC1 does not decrease overall (``T <= 0``), ``l*`` is the first
    block. Scores are rank-derived (``n - position``); unusable blocks get ``-inf`` and are ranked last.

    Raises:
        ConfigError: no probe, ``stall_fraction`` outside (0, 1), an unknown ``reference``, or fewer than two blocks
            with finite NC1.
    """
    if not (isinstance(stall_fraction, (int, float)) and 0.0 < stall_fraction < 1.0):
        raise ConfigError(f"stall_fraction must be in (0, 1), got {stall_fraction!r}")
    if reference not in STALL_REFERENCES:
        raise ConfigError(f"stall_reference must be one of {', '.join(STALL_REFERENCES)}; got {reference!r}")
    blocks = _sorted_blocks(blocks)
    z = block_log_nc1(blocks, probe_result, "stall")
    good = [b.index for b in blocks if math.isfinite(z[b.index])]
    bad = [b.index for b in blocks if not math.isfinite(z[b.index])]
    if len(good) < 2:
        raise ConfigError(f"strategy 'stall' needs finite NC1 at two or more blocks, the probe has {len(good)}; "
                          "use 'last_k' or 'manual' instead")
    # Reference block: the last one, or the NC1 minimum (ties to the shallower block).
    ref = good[-1] if reference == "last" else min(good, key=lambda i: (z[i], i))
    total = z[good[0]] - z[ref]
    if total > 0:
        stall = next(i for i in good if z[i] - z[ref] < stall_fraction * total)
        ref_note = "" if reference == "last" else " (its NC1 minimum)"
        why = (f"ln NC1 falls by {total:.3g} from block {good[0]} to block {ref}{ref_note}; after block {stall} the "
               f"remaining blocks add {z[stall] - z[ref]:.3g} (< {stall_fraction:g} of it)")
    else:
        stall = good[0]
        why = (f"ln NC1 does not decrease from block {good[0]} to block {ref} (change {-total:+.3g}), so no "
               f"block after the first separates the downstream classes better; the stall point is block {stall}")
    after = [i for i in good if i > stall]
    before = [i for i in reversed(good) if i <= stall]
    ranked = after + before
    scores: dict[int, float] = {i: float(len(ranked) - pos) for pos, i in enumerate(ranked)}
    scores.update({i: -math.inf for i in bad})
    if after:
        what = (f"the pretrained blocks after the stall point ({_fmt_blocks(after)}) no longer separate the "
                f"downstream classes, so they are tuned first in forward order, starting with block {after[0]}: "
                "tuning the first of them (ideally with a skip connection to the head, SCL-FT) lets the task shape "
                "the representation earliest where it matters; the rest follow from deep to shallow")
    else:
        what = (f"collapse keeps progressing to the last block, so the last block ({stall}) ranks first and the "
                "rest follow from deep to shallow")
    rationale = (f"stall (fraction {stall_fraction:g}, reference: {reference} block): {why}; {what}."
                 f"{_unusable_note(bad)}")
    return Ranking(order=ranked + sorted(bad, reverse=True), scores=scores, rationale=rationale)


# ---------------------------------------------------------------------------------------------------------- baselines


def rank_last_k(blocks: Sequence[BlockLike]) -> Ranking:
    """Deepest block first (score = block index)."""
    blocks = _sorted_blocks(blocks)
    order = [b.index for b in reversed(blocks)]
    return Ranking(order=order, scores={b.index: float(b.index) for b in blocks},
                   rationale="last_k: the deepest blocks first (classic 'fine-tune the top layers' baseline); "
                             "no data is looked at.")


def rank_first_k(blocks: Sequence[BlockLike]) -> Ranking:
    """Shallowest block first (score = number of blocks minus the position, so the first block scores highest)."""
    blocks = _sorted_blocks(blocks)
    scores = {b.index: float(len(blocks) - i) for i, b in enumerate(blocks)}
    return Ranking(order=[b.index for b in blocks], scores=scores,
                   rationale="first_k: the shallowest blocks first (surgical fine-tuning's choice for input-level "
                             "shift such as image corruptions); no data is looked at.")


def rank_random_k(blocks: Sequence[BlockLike], seed: int = 0) -> Ranking:
    """A seeded random permutation (``numpy.random.default_rng(seed).permutation``); score = n - position."""
    blocks = _sorted_blocks(blocks)
    perm = np.random.default_rng(seed).permutation(len(blocks))
    order = [blocks[int(k)].index for k in perm]
    return Ranking(order=order, scores={i: float(len(order) - pos) for pos, i in enumerate(order)},
                   rationale=f"random_k: a random order of the blocks (numpy seed {seed}); a control for the "
                             "NC-guided rules.")


def rank_all(blocks: Sequence[BlockLike]) -> Ranking:
    """Every block (full fine-tuning of the backbone's blocks); budgets are ignored."""
    blocks = _sorted_blocks(blocks)
    return Ranking(order=[b.index for b in blocks], scores={b.index: 1.0 for b in blocks},
                   rationale="all: every block is tuned (full fine-tuning baseline); budgets are ignored.",
                   uses_budget=False)


def resolve_manual(blocks: Sequence[BlockLike], manual: Sequence[int | str] | int | str | None) -> list[int]:
    """Block indices for user-given block indices and/or names, in the given order, duplicates dropped.

    A string is matched as a block name first, then as an integer literal (``"3"``); negative indices count from
    the end.

    Raises:
        ConfigError: empty list, or an unknown index/name (the message lists the valid range and names).
    """
    blocks = _sorted_blocks(blocks)
    if manual is None or (isinstance(manual, (list, tuple)) and not manual):
        raise ConfigError("strategy 'manual' needs a list of block indices or names (e.g. manual: [3] or "
                          f"manual: ['{blocks[-1].name}'])")
    items = [manual] if isinstance(manual, (int, str)) else list(manual)
    by_name = {b.name: b.index for b in blocks}
    indices = [b.index for b in blocks]
    n = len(blocks)
    out: list[int] = []
    for item in items:
        if isinstance(item, str) and item in by_name:
            idx = by_name[item]
        else:
            is_int = isinstance(item, (int, np.integer)) and not isinstance(item, bool)
            is_int_str = isinstance(item, str) and re.fullmatch(r"[+-]?\d+", item.strip()) is not None
            pos = int(item) if is_int or is_int_str else None
            if pos is None or not -n <= pos < n:
                names = ", ".join(f"'{b.name}'" for b in blocks)
                raise ConfigError(f"unknown block {item!r} for strategy 'manual': valid indices are "
                                  f"{indices[0]}..{indices[-1]} (negative counts from the end), valid names are "
                                  f"{names}")
            idx = indices[pos]
        if idx not in out:
            out.append(idx)
    return out


def rank_manual(blocks: Sequence[BlockLike], manual: Sequence[int | str] | int | str | None) -> Ranking:
    """Exactly the user's blocks, in the given order."""
    order = resolve_manual(blocks, manual)
    return Ranking(order=order, scores={i: float(len(order) - pos) for pos, i in enumerate(order)},
                   rationale=f"manual: blocks {_fmt_blocks(sorted(order))} chosen by the user.", exact=True)


def _block_values(blocks: Sequence[BlockLike], values: Mapping[int, float], what: str) -> tuple[set[int], dict]:
    """``(block indices, {index: float value})`` for precomputed per-block values, which must cover every block.

    Raises:
        ConfigError: values for unknown blocks, or blocks without a value.
    """
    out = {int(k): float(v) for k, v in values.items()}
    idx = {b.index for b in blocks}
    if set(out) != idx:
        raise ConfigError(f"{what} do not match the backbone's blocks {min(idx)}..{max(idx)}: "
                          f"missing {sorted(idx - set(out))}, unknown {sorted(set(out) - idx)}")
    return idx, out


def rank_auto_rgn(blocks: Sequence[BlockLike], rgn_scores: Mapping[int, float] | None) -> Ranking:
    """Blocks by precomputed Auto-RGN score (see :func:`auto_rgn_scores`), highest first, ties to the deeper block.

    Raises:
        ConfigError: no scores, scores for unknown blocks, or blocks without a score.
    """
    blocks = _sorted_blocks(blocks)
    if rgn_scores is None:
        raise ConfigError("strategy 'auto_rgn' needs per-block scores: compute them with "
                          "nc_finetune.select.auto_rgn_scores(model, blocks, batches) and pass rgn_scores=...")
    idx, scores = _block_values(blocks, rgn_scores, "rgn_scores")
    scores = {i: (s if math.isfinite(s) else -math.inf) for i, s in scores.items()}
    order = _sort_desc(idx, scores)
    return Ranking(order=order, scores=scores,
                   rationale="auto_rgn: blocks ordered by their mean relative gradient norm ||dCE/dθ|| / ||θ|| over "
                             "a few downstream mini-batches (surgical fine-tuning's Auto-RGN, aggregated per block "
                             "and normalised by the maximum): the blocks the task loss pulls on hardest, relative "
                             f"to their size, are tuned first; block {order[0]} leads.")


# ---------------------------------------------------------------------------------------------------------- rivals


def rank_cka(blocks: Sequence[BlockLike], cka: Mapping[int, float] | None) -> Ranking:
    """Blocks by how much they change the representation: score ``1 - CKA(input, output)``, highest first.

    Blocks with NaN CKA (a side without variance) get ``-inf`` and are ranked last; ties go to the deeper block.

    Raises:
        ConfigError: no CKA values, or values for unknown / missing blocks.
    """
    blocks = _sorted_blocks(blocks)
    if cka is None:
        raise ConfigError("strategy 'cka' needs per-block CKA values: compute them with "
                          "nc_finetune.select.cka.block_cka(backbone, split) and pass cka_scores=...")
    idx, values = _block_values(blocks, cka, "cka_scores")
    scores = {i: (1.0 - v if math.isfinite(v) else -math.inf) for i, v in values.items()}
    order = _sort_desc(idx, scores)
    bad = [i for i in order if not math.isfinite(scores[i])]
    shown = ", ".join(f"{i}: {values[i]:.3f}" for i in order[:3] if math.isfinite(scores[i]))
    note = f" Blocks {_fmt_blocks(sorted(bad))} have undefined CKA (no variance): ranked last." if bad else ""
    return Ranking(order=order, scores=scores,
                   rationale=f"cka: label-free. Linear CKA between each block's mean-pooled input and output on the "
                             f"probe data (1 = the block only rotates or rescales its input); the blocks that change "
                             f"the representation most (lowest CKA; score 1 - CKA) are tuned first. Lowest CKA "
                             f"(block: CKA): {shown or 'none finite'}.{note}")


def rank_lisa(blocks: Sequence[BlockLike], seed: int = 0) -> Ranking:
    """LISA's interval-0 draw: the blocks in the order of :func:`~nc_finetune.select.lisa.lisa_permutation`."""
    blocks = _sorted_blocks(blocks)
    order = [blocks[k].index for k in lisa_permutation(len(blocks), seed, 0)]
    return Ranking(order=order, scores={i: float(len(order) - pos) for pos, i in enumerate(order)},
                   rationale=f"lisa: LISA's uniform random draw of blocks (seed {seed}, interval 0); no data is looked "
                             "at. With adapt.method=lisa these are the blocks of the first selection.lisa_interval "
                             "steps, after which the trainer redraws as many blocks uniformly, every interval, while "
                             "everything outside the blocks and the head always train. With any other adapt method "
                             "this is the selection-only variant: one fixed seeded uniform sample (a random_k control "
                             "drawn with LISA's generator).")


# ---------------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Strategy:
    description: str
    rank: Callable[..., Ranking]
    needs_probe: bool = False


_REGISTRY: dict[str, _Strategy] = {
    "knee": _Strategy("NC-guided, training-free: the block whose downstream NC1 decrease falls furthest behind the "
                      "fitted equi-separation rate", lambda b, p, o: rank_knee(b, p, o["knee_residual"]),
                      needs_probe=True),
    "stall": _Strategy("NC-guided, training-free: the blocks right after downstream collapse stalls, in forward "
                       "order", lambda b, p, o: rank_stall(b, p, o["stall_fraction"], o["stall_reference"]),
                       needs_probe=True),
    "last_k": _Strategy("baseline: the deepest blocks", lambda b, p, o: rank_last_k(b)),
    "first_k": _Strategy("baseline: the shallowest blocks (input-level shift)", lambda b, p, o: rank_first_k(b)),
    "random_k": _Strategy("baseline: a seeded random order of blocks", lambda b, p, o: rank_random_k(b, o["seed"])),
    "all": _Strategy("baseline: every block, budgets ignored (full fine-tuning)", lambda b, p, o: rank_all(b)),
    "manual": _Strategy("the blocks listed by the user (indices or names)",
                        lambda b, p, o: rank_manual(b, o["manual"])),
    "auto_rgn": _Strategy("surgical fine-tuning's Auto-RGN: blocks by relative gradient norm on a few batches",
                          lambda b, p, o: rank_auto_rgn(b, o["rgn_scores"])),
    "trial": _Strategy("NC-guided, trained (Li et al.): the block whose short trial fine-tune most reduces the "
                       "held-out last-layer NC1 per parameter", lambda b, p, o: _rank_trial(b, o)),
    "shift": _Strategy("NC-guided, training-free: the block where collapse first degrades from the reference data "
                       "to the target data, and its neighbours", lambda b, p, o: _rank_shift(b, p, o),
                       needs_probe=True),
    "cka": _Strategy("label-free: the blocks whose output differs most from their input (lowest linear CKA)",
                     lambda b, p, o: rank_cka(b, o["cka_scores"])),
    "lisa": _Strategy("LISA: a seeded uniform draw of blocks (redrawn during training with adapt.method=lisa)",
                      lambda b, p, o: rank_lisa(b, o["seed"])),
}

def _rank_trial(blocks: Sequence[BlockLike], o: Mapping[str, Any]) -> Ranking:
    from nc_finetune.select.trial import rank_trial  # lazy: trial.py imports this module

    return rank_trial(blocks, o.get("trial_results"), o.get("trial_score", "nc1_drop_per_param"))


def _rank_shift(blocks: Sequence[BlockLike], probe_result: ProbeResult | None, o: Mapping[str, Any]) -> Ranking:
    from nc_finetune.select.shift import rank_shift  # lazy: shift.py imports this module

    return rank_shift(blocks, o.get("reference_probe"), probe_result, jump=o.get("shift_jump", 0.5))


#: Strategy name -> one-line description.
STRATEGIES: dict[str, str] = {name: s.description for name, s in _REGISTRY.items()}


def strategy_needs_probe(strategy: str) -> bool:
    """Whether ``strategy`` ranks from the collapse probe (so its cost includes the probe's)."""
    return _REGISTRY[strategy].needs_probe


def rank_blocks(
    strategy: str,
    blocks: Sequence[BlockLike],
    probe_result: ProbeResult | None = None,
    *,
    manual: Sequence[int | str] | int | str | None = None,
    seed: int = 0,
    rgn_scores: Mapping[int, float] | None = None,
    stall_fraction: float = 0.1,
    stall_reference: str = "last",
    knee_residual: str = "shortfall",
    trial_results: Mapping[str, Any] | None = None,
    trial_score: str = "nc1_drop_per_param",
    reference_probe: ProbeResult | None = None,
    shift_jump: float = 0.5,
    cka_scores: Mapping[int, float] | None = None,
) -> Ranking:
    """Rank blocks with one strategy (no budget applied).

    The keyword options are those of :func:`nc_finetune.select.select_blocks`; each strategy reads its own.

    Raises:
        ConfigError: unknown strategy (the message lists them), or a strategy's own input error.
    """
    if strategy not in _REGISTRY:
        raise ConfigError(f"unknown selection strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    opts = {"manual": manual, "seed": seed, "rgn_scores": rgn_scores, "stall_fraction": stall_fraction,
            "stall_reference": stall_reference, "knee_residual": knee_residual, "trial_results": trial_results,
            "trial_score": trial_score, "reference_probe": reference_probe, "shift_jump": shift_jump,
            "cka_scores": cka_scores}
    return _REGISTRY[strategy].rank(blocks, probe_result, opts)


# ---------------------------------------------------------------------------------------------------------- Auto-RGN

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
# Norm layers defined outside torch (LlamaRMSNorm, T5LayerNorm, FrozenBatchNorm2d, timm LayerNorm2d, ...).
_NORM_NAME = re.compile(r"norm\d*d?$", re.IGNORECASE)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or bool(_NORM_NAME.search(type(module).__name__))


def rgn_tensors(model: nn.Module, block: BlockLike, prefix: str = "backbone.") -> list[tuple[str, nn.Parameter]]:
    """The parameter tensors of one block that Auto-RGN scores.

    Excluded, as in the surgical fine-tuning code: tensors whose backbone-relative name contains ``"bn"``; also
    parameters of normalisation layers (any norm type, whatever its name) and all-zero tensors (RGN undefined).

    Raises:
        ConfigError: the block is not a module of ``model``.
    """
    module = _get_block_module(model, block, prefix)
    out: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        if _is_norm(mod):
            continue
        for p_name, p in mod.named_parameters(recurse=False):
            full = ".".join(x for x in (block.name, mod_name, p_name) if x)
            if "bn" in full or id(p) in seen:
                continue
            seen.add(id(p))
            if float(p.detach().norm()) > 0:
                out.append((full, p))
    return out


def _get_block_module(model: nn.Module, block: BlockLike, prefix: str) -> nn.Module:
    try:
        return model.get_submodule(prefix + block.name)
    except AttributeError:
        raise ConfigError(f"block {block.index} '{prefix + block.name}' is not a module of the model") from None


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def auto_rgn_scores(
    model: nn.Module,
    blocks: Sequence[BlockLike],
    batches: Iterable[tuple[Mapping[str, Any], torch.Tensor]],
    num_batches: int = 5,
    prefix: str = "backbone.",
) -> dict[int, float]:
    """Per-block Auto-RGN scores (surgical fine-tuning, Lee et al. ICLR 2023), normalised to a maximum of 1.

    For each of the first ``num_batches`` mini-batches ``(inputs, labels)`` the mean cross-entropy of
    ``model(**inputs)`` is differentiated w.r.t. every scored tensor θ of every block (see :func:`rgn_tensors`);
    ``RGN(θ) = ||g||_2 / ||θ||_2`` is averaged over the batches. A block's score is the mean RGN over its tensors,
    divided by the largest block score. The model runs in eval mode (BN running statistics and dropout untouched);
    gradients are taken with ``torch.autograd.grad``, so no ``.grad`` is written. Afterwards every parameter,
    ``requires_grad`` flag, ``.grad`` and module train/eval mode is exactly as before.

    Args:
        model: The classifier (backbone under ``prefix``, returning logits or an object with ``.logits``).
        blocks: The backbone's blocks.
        batches: Iterable of ``(inputs: dict, labels: Tensor)``; only the first ``num_batches`` are used.
        num_batches: How many mini-batches to average over (the paper uses 5 of batch size 64).
        prefix: Attribute path of the backbone inside ``model``.

    Returns:
        Block index -> score in [0, 1] (0 only for a block without scorable tensors or with zero gradient).

    Raises:
        ConfigError: a block is not in the model, or ``num_batches < 1``.
        DataError: no batch was given, or every gradient is zero.
    """
    if num_batches < 1:
        raise ConfigError(f"num_batches must be >= 1, got {num_batches}")
    blocks = _sorted_blocks(blocks)
    per_block = {b.index: rgn_tensors(model, b, prefix) for b in blocks}
    tensors: list[nn.Parameter] = []
    slot: dict[int, int] = {}
    for items in per_block.values():
        for _, p in items:
            if id(p) not in slot:
                slot[id(p)] = len(tensors)
                tensors.append(p)
    if not tensors:
        raise ConfigError("no block has a parameter tensor that Auto-RGN can score (all are norm/bn or zero)")
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:  # e.g. a backbone left on the GPU by the probe under a new head built on the CPU
        raise ValueError(f"auto_rgn_scores needs the whole model on one device; found {sorted(map(str, devices))}")
    device = devices.pop()
    norms = torch.stack([p.detach().double().norm() for p in tensors])
    sums = torch.zeros(len(tensors), dtype=torch.float64, device=device)

    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    used = 0
    try:
        model.eval()
        for p in tensors:
            p.requires_grad_(True)
        with torch.enable_grad():
            for inputs, labels in itertools.islice(batches, num_batches):
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
                y = torch.as_tensor(labels, dtype=torch.long, device=device)
                loss = F.cross_entropy(_logits(model(**inputs)).float(), y)
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                # An unused tensor (off the forward path) has zero gradient.
                gn = torch.stack([g.detach().double().norm() if g is not None else sums.new_zeros(()) for g in grads])
                sums += gn / norms
                used += 1
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
    if used == 0:
        raise DataError("auto_rgn_scores got no mini-batch")
    rgn = (sums / used).cpu().numpy()
    raw = {i: (float(np.mean([rgn[slot[id(p)]] for _, p in items])) if items else 0.0)
           for i, items in per_block.items()}
    top = max(raw.values())
    if not (top > 0 and math.isfinite(top)):
        raise DataError("Auto-RGN: every block gradient is zero or non-finite on the given batches")
    return {i: v / top for i, v in raw.items()}
