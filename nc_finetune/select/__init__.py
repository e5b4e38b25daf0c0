"""Block selection: rank the backbone's blocks (NC-guided rules or baselines) and cut the ranking to a budget."""

from __future__ import annotations

from nc_finetune.select.bootstrap import bootstrap_probes, collect_block_features
from nc_finetune.select.cka import block_cka, linear_cka
from nc_finetune.select.selection import DEFAULT_MAX_BLOCKS, FILL_POLICIES, Selection, fill_budget, select_blocks
from nc_finetune.select.shift import rank_shift, shift_curves
from nc_finetune.select.strategies import (
    KNEE_RESIDUALS,
    STALL_REFERENCES,
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
from nc_finetune.select.trial import TRIAL_SCORES, rank_trial, run_trials

__all__ = [
    "DEFAULT_MAX_BLOCKS",
    "FILL_POLICIES",
    "KNEE_RESIDUALS",
    "STALL_REFERENCES",
    "STRATEGIES",
    "TRIAL_SCORES",
    "Ranking",
    "Selection",
    "auto_rgn_scores",
    "block_cka",
    "block_log_nc1",
    "bootstrap_probes",
    "collect_block_features",
    "fill_budget",
    "linear_cka",
    "rank_blocks",
    "rank_knee",
    "rank_shift",
    "rank_stall",
    "rank_trial",
    "resolve_manual",
    "rgn_tensors",
    "run_trials",
    "select_blocks",
    "shift_curves",
]
