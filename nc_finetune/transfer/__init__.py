"""Transferability estimation: LogME, H-score and NCTI as model or layer scores, and rank-correlation tooling."""

from __future__ import annotations

from nc_finetune.transfer.ranking import LOG_SCORES, SCORE_DIRECTIONS, correlations, plot_rank, rank_table
from nc_finetune.transfer.scores import (
    NCTI_TERMS,
    hscore,
    hscore_from_stats,
    logme_from_stats,
    logme_score,
    ncti_combine,
    ncti_terms,
    scores_from_stats,
)

__all__ = [
    "LOG_SCORES",
    "NCTI_TERMS",
    "SCORE_DIRECTIONS",
    "correlations",
    "hscore",
    "hscore_from_stats",
    "logme_from_stats",
    "logme_score",
    "ncti_combine",
    "ncti_terms",
    "plot_rank",
    "rank_table",
    "scores_from_stats",
]
