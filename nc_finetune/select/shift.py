"""``shift``: locate the distribution shift along depth from two probes (reference data vs target data).

Both probes use the same backbone and probe settings. Per usable block ``l`` (finite positive NC1 in both):

* ``a_l = ln NC1_target(l) − ln NC1_ref(l)``: how much less collapsed the target is (the degradation);
* ``c_l = NCC_ref(l) − NCC_target(l)``: the drop of nearest-class-centre accuracy (0 when either is missing).

The jump of block ``l`` is how much the degradation grows at that block, ``Δa_l = a_l − a_p`` and
``Δc_l = c_l − c_p`` with ``p`` the previous usable block (before the first block: 0, the input itself is where an
input-level shift enters). Both are scaled by their largest absolute jump and summed, ``J_l = Δa_l/max|Δa| +
Δc_l/max|Δc|``. The shift is located at the shallowest block with ``J_l >= jump · max J``: an input-level shift
(noise, contrast) degrades collapse from the first block on, so it is located early; a label-level change leaves
the early, generic features as they were and degrades the late, task-specific ones, so it is located late. That
block is ranked first and its neighbours follow by distance (ties to the deeper one): surgical fine-tuning's finding
that the block to tune is where the shift enters. If no block degrades (``max J <= 0``) the target is no harder than
the reference at any depth, and the last block leads (the head-side default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from nc_finetune.errors import ConfigError
from nc_finetune.probe.result import ProbeResult
from nc_finetune.select.strategies import BlockLike, Ranking, _fmt_blocks, _sorted_blocks, block_log_nc1


def _ncc(blocks: Sequence[BlockLike], probe: ProbeResult) -> dict[int, float]:
    out = {b.index: math.nan for b in blocks}
    for rec in probe.blocks():
        v = rec.get("ncc_accuracy")
        out[int(rec["index"])] = math.nan if v is None else float(v)
    return out


def shift_curves(blocks: Sequence[BlockLike], reference: ProbeResult | None,
                 target: ProbeResult | None) -> list[dict[str, Any]]:
    """Per usable block: ln NC1 and NCC accuracy of both probes, the degradation and its jump (see module doc).

    Raises:
        ConfigError: a probe is missing or comes from a different backbone, or fewer than one usable block.
    """
    if reference is None:
        raise ConfigError("strategy 'shift' needs a probe of the reference data: set selection.reference (data "
                          "overrides or 'source'), or pass reference_probe=...")
    blocks = _sorted_blocks(blocks)
    zr = block_log_nc1(blocks, reference, "shift")
    zt = block_log_nc1(blocks, target, "shift")
    nr, nt = _ncc(blocks, reference), _ncc(blocks, target)
    good = [b for b in blocks if math.isfinite(zr[b.index]) and math.isfinite(zt[b.index])]
    if not good:
        raise ConfigError("strategy 'shift' needs a block with finite NC1 in both the reference and the target probe")
    rows = []
    prev_a = prev_c = 0.0
    for b in good:
        i = b.index
        a = zt[i] - zr[i]
        c = nr[i] - nt[i] if math.isfinite(nr[i]) and math.isfinite(nt[i]) else 0.0
        rows.append({"index": i, "name": b.name, "log_nc1_ref": zr[i], "log_nc1_target": zt[i],
                     "delta_log_nc1": a, "ncc_ref": nr[i], "ncc_target": nt[i], "ncc_drop": c,
                     "jump_log_nc1": a - prev_a, "jump_ncc": c - prev_c})
        prev_a, prev_c = a, c
    scale_a = max(abs(r["jump_log_nc1"]) for r in rows)
    scale_c = max(abs(r["jump_ncc"]) for r in rows)
    for r in rows:
        r["jump"] = (r["jump_log_nc1"] / scale_a if scale_a > 0 else 0.0) + \
            (r["jump_ncc"] / scale_c if scale_c > 0 else 0.0)
    return rows


def rank_shift(blocks: Sequence[BlockLike], reference: ProbeResult | None, target: ProbeResult | None,
               jump: float = 0.5, reference_label: str = "") -> Ranking:
    """Rank the block where collapse first degrades from reference to target first, then its neighbours.

    Args:
        blocks: The backbone's blocks.
        reference: Probe of the reference (source / clean) data.
        target: Probe of the target (downstream training) data, same backbone and probe settings.
        jump: The shift is at the shallowest block whose jump reaches this share of the largest, in (0, 1].
        reference_label: How the reference was given, for the record.

    Raises:
        ConfigError: missing probes, different backbones, no usable block, or ``jump`` outside (0, 1].
    """
    if not (isinstance(jump, (int, float)) and 0.0 < jump <= 1.0):
        raise ConfigError(f"shift_jump must be in (0, 1], got {jump!r}")
    blocks = _sorted_blocks(blocks)
    rows = shift_curves(blocks, reference, target)
    top_jump = max(r["jump"] for r in rows)
    good = [r["index"] for r in rows]
    bad = [b.index for b in blocks if b.index not in good]
    if top_jump > 0:
        located = next(r for r in rows if r["jump"] >= jump * top_jump)
        loc = located["index"]
        why = (f"from the reference to the target, ln NC1 grows by {located['delta_log_nc1']:+.3g} and NCC accuracy "
               f"drops by {located['ncc_drop']:+.3g} at block {loc} '{located['name']}', the first block where the "
               f"degradation jumps (jump {located['jump']:.3g}, >= {jump:g} of the largest, {top_jump:.3g}): the "
               "shift enters there, so that block is tuned first and its neighbours follow by distance (ties to the "
               "deeper one)")
    else:
        loc = good[-1]
        why = ("collapse does not degrade from the reference to the target at any block (no positive jump): the "
               f"target is no harder than the reference along depth, so the last block ({loc}) leads and the others "
               "follow by distance")
    order = sorted(good, key=lambda i: (abs(i - loc), -i)) + sorted(bad, reverse=True)
    scores = {i: float(len(good) - pos) for pos, i in enumerate(order[:len(good)])}
    scores.update({i: -math.inf for i in bad})
    note = f" Blocks {_fmt_blocks(bad)} lack a finite NC1 in one of the probes: ranked last." if bad else ""
    label = reference_label or str(reference.meta.get("reference") or reference.meta.get("dataset") or "data")
    details = {"shift": {"reference": label,
                         "located": loc, "jump_fraction": jump, "blocks": rows}}
    return Ranking(order=order, scores=scores, rationale=f"shift: {why}.{note}", details=details)
