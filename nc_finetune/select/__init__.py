"""Block selection: rank the backbone's blocks (NC-guided rules or baselines) and cut the ranking to a budget."""

from __future__ import annotations

from nc_finetune.select.cka import block_cka, linear_cka
from nc_finetune.select.selection import DEFAULT_MAX_BLOCKS, Selection, fill_budget, select_blocks
from nc_finetune.select.strategies import (
    STRATEGIES,
    Ranking,
    auto_rgn_scores,
    block_log_nc1,
    rank_blocks,
    rank_knee,
    rank_stall,
    resolve_manual,
    rgn_tensors,
)

__all__ = [
    "DEFAULT_MAX_BLOCKS",
    "STRATEGIES",
    "Ranking",
    "Selection",
    "auto_rgn_scores",
    "block_cka",
    "block_log_nc1",
    "fill_budget",
    "linear_cka",
    "rank_blocks",
    "rank_knee",
    "rank_stall",
    "resolve_manual",
    "rgn_tensors",
    "select_blocks",
]
