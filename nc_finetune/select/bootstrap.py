"""Bootstrap of the zero-cost rules: how stable is a rule's pick under resampling of the probe subset?

The probe keeps only additive per-class statistics, so a resample needs the per-sample features: one more no-grad
forward pass over the probe subset keeps every block's pooled features (:func:`collect_block_features`). Each
replicate draws, per class, as many samples as the class has, with replacement (a stratified bootstrap, so every
class keeps its size and NC1 stays defined), and recomputes NC1 per block from those samples with the probe's own
statistics code (:func:`bootstrap_probes`). This is the resampling distribution of the probe at its own sample size,
which is what "a different probe sample of the same size" means; B disjoint sub-probes would instead measure
stability at 1/B of the sample size, where NC1 is noisier and biased. Resampling with replacement duplicates samples
(shrinking within-class spread by about (n−1)/n per class, equally at every block), which leaves the rules' picks,
which compare blocks, unaffected.

:func:`bootstrap_ranking` applies a rule to every replicate, cuts each ranking with the same budget filler and ranks
the blocks by how often they are picked: the most frequent selection (the most stable pick) becomes the selection.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from nc_finetune.errors import ConfigError
from nc_finetune.probe.metrics import metrics_from_stats
from nc_finetune.probe.result import ProbeResult
from nc_finetune.probe.stats import ClassStats
from nc_finetune.select.strategies import BlockLike, Ranking, rank_blocks


def collect_block_features(backbone, split, *, layers: str | Sequence[int] = "all", batch_size: int = 64,
                           device: str = "auto") -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Pooled features of every probed block for every sample of ``split`` (one no-grad forward pass).

    Args:
        backbone: The :class:`~nc_finetune.backbones.Backbone`.
        split: The probe subset (raw inputs and labels).
        layers: The probe's ``layers`` setting (``all`` or block indices).
        batch_size: Forward batch size.
        device: ``auto``, ``cpu``, ``cuda``...

    Returns:
        ``({block index: (N, D_l) float32 CPU tensor}, labels (N,) int64)``.
    """
    from nc_finetune.probe.runner import iter_batches, resolve_taps, tapped
    from nc_finetune.utils.env import resolve_device

    dev = resolve_device(device)
    taps = [t for t in resolve_taps(backbone, layers) if t.is_block]
    model = backbone.model
    was_training = model.training
    model.eval().to(dev)
    store: dict[str, torch.Tensor] = {}
    inputs_ref: dict[str, Any] = {}
    chunks: dict[int, list[torch.Tensor]] = {t.index: [] for t in taps}
    try:
        with tapped(backbone, taps, store, inputs_ref) as stop, torch.no_grad():
            for raw, _ in iter_batches(split, batch_size):
                inputs = backbone.prepare_on(raw, dev)
                inputs_ref["inputs"] = inputs
                store.clear()
                with stop:
                    model(**inputs)
                for t in taps:
                    chunks[t.index].append(store[t.name].float().cpu())  # (B, D_l)
    finally:
        model.train(was_training)
    labels = torch.as_tensor(np.asarray(split.labels), dtype=torch.long)
    return {i: torch.cat(c) for i, c in chunks.items()}, labels


def bootstrap_probes(features: Mapping[int, torch.Tensor], labels: torch.Tensor, blocks: Sequence[BlockLike],
                     num_classes: int, replicates: int, seed: int = 0) -> list[ProbeResult]:
    """NC1 per block on ``replicates`` stratified bootstrap resamples of the samples.

    Args:
        features: Block index -> (N, D_l) features of the same N samples (:func:`collect_block_features`).
        labels: (N,) labels in ``[0, num_classes)``.
        blocks: The backbone's blocks (names and sizes for the records).
        num_classes: K.
        replicates: Number of resamples B (>= 1).
        seed: numpy seed of the resampling.

    Returns:
        B probe results holding ``nc1`` per block (the blocks ``features`` has), as the rules read them.

    Raises:
        ConfigError: ``replicates < 1``.
    """
    if replicates < 1:
        raise ConfigError(f"bootstrap replicates must be >= 1, got {replicates}")
    y = labels.numpy()
    by_class = [np.flatnonzero(y == k) for k in range(num_classes)]
    rng = np.random.default_rng(seed)
    by_index = {b.index: b for b in blocks}
    out = []
    for _ in range(replicates):
        idx = np.concatenate([rng.choice(c, size=len(c), replace=True) for c in by_class if len(c)])
        idx_t = torch.as_tensor(idx)
        layers = []
        for i, feats in sorted(features.items()):
            st = ClassStats(num_classes, feats.shape[1])
            st.update(feats[idx_t], labels[idx_t])
            nc1 = metrics_from_stats(st, name=by_index[i].name)["nc1"]
            layers.append({"index": i, "name": by_index[i].name, "is_block": True, "dim": int(feats.shape[1]),
                           "num_params": int(by_index[i].num_params), "nc1": nc1})
        out.append(ProbeResult(layers=layers, meta={"bootstrap": True, "samples": len(idx)}))
    return out


def bootstrap_ranking(strategy: str, blocks: Sequence[BlockLike], base: Ranking, probes: Sequence[ProbeResult],
                      cut: Callable[[Ranking], list[int]], options: Mapping[str, Any]) -> Ranking:
    """Rank blocks by how often ``strategy`` picks them on the resampled ``probes``.

    Each replicate is ranked with ``strategy`` and cut with ``cut`` (the budget filler). The most frequent selection
    (ties: the one the full-sample ranking ``base`` selects, else the first seen) is the stable selection: its blocks
    lead the ranking in ``base`` order, the other blocks follow by pick frequency (ties in ``base`` order). Scores are
    pick frequencies. ``details["bootstrap"]`` records every block's frequency and the stability (share of replicates
    choosing the stable selection).

    Raises:
        ConfigError: a strategy other than ``knee``/``stall``, or no probe replicate.
    """
    if strategy not in ("knee", "stall"):
        raise ConfigError(f"bootstrap applies to the knee and stall rules, not to strategy '{strategy}'")
    if not probes:
        raise ConfigError("bootstrap needs at least one resampled probe")
    start = time.perf_counter()
    names = {b.index: b.name for b in blocks}
    full = tuple(cut(base))
    picks: Counter[tuple[int, ...]] = Counter()
    counts: Counter[int] = Counter()
    failed = 0
    for p in probes:
        try:
            sel = tuple(cut(rank_blocks(strategy, blocks, p, **options)))
        except ConfigError:  # e.g. a resample with fewer than two finite NC1 values
            failed += 1
            continue
        picks[sel] += 1
        counts.update(sel)
    if not picks:
        raise ConfigError(f"bootstrap: the {strategy} rule failed on every one of the {len(probes)} resampled probes")
    top = max(picks.values())
    tied = [s for s, c in picks.items() if c == top]
    stable = full if full in tied else tied[0]
    pos = {i: k for k, i in enumerate(base.order)}
    b = len(probes)
    freq = {i: counts[i] / b for i in base.order}
    rest = sorted((i for i in base.order if i not in stable), key=lambda i: (-freq[i], pos[i]))
    order = sorted(stable, key=lambda i: pos[i]) + rest
    stability = top / b
    details = dict(base.details)
    details["bootstrap"] = {
        "replicates": b,
        "failed": failed,
        "pick_frequency": {names[i]: freq[i] for i in sorted(freq, key=lambda i: (-freq[i], pos[i])) if freq[i] > 0},
        "selections": [{"blocks": [names[i] for i in s], "frequency": c / b} for s, c in picks.most_common()],
        "full_sample_selection": [names[i] for i in full],
        "stable_selection": [names[i] for i in sorted(stable)],
        "stable_indices": sorted(stable),
        "stability": stability,
        "seconds": time.perf_counter() - start,
    }
    same = "the same as" if stable == full else "different from"
    rationale = (f"{base.rationale} Bootstrap over {b} stratified resamples of the probe subset: the selection "
                 f"{', '.join(names[i] for i in sorted(stable))} is picked in {stability:.0%} of them (the most "
                 f"stable pick, {same} the full-sample pick); blocks are ranked by how often they are picked.")
    scores = {i: (freq[i] if math.isfinite(freq[i]) else -math.inf) for i in base.order}
    return Ranking(order=order, scores=scores, rationale=rationale, details=details)
