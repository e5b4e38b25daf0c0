"""``trial``: Li et al.'s rule — tune the block whose short trial fine-tune most reduces last-layer NC1.

For every candidate block a classifier is built that trains that block and a fresh linear head (``finetune``, the
same seeded head for every block), trained for ``steps`` optimizer steps on the training split minus a stratified
held-out part, and scored on the held-out part: NC1 of the last-layer (penultimate, head-input) features and the
cross-entropy, before and after. Every trial starts from the same weights (the block is restored afterwards), sees
the same batches in the same order and uses the trainer's AdamW parameter groups at a constant learning rate. When
the frozen prefix can be cached (no augmentation; checked against the real forward, as in training), the trial runs
from the cached input of its block, so the blocks before it are computed once per sample instead of once per step.

:func:`run_trials` measures; :func:`rank_trial` (the ``trial`` strategy) ranks from the measurements by
``nc1_drop_per_param`` (NC1 before − after, per trainable block parameter), ``nc1_drop`` or ``loss_drop``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nc_finetune.errors import ConfigError, DataError
from nc_finetune.select.strategies import BlockLike, Ranking, _sort_desc, _sorted_blocks

#: Score name -> what it ranks by (higher = tune first).
TRIAL_SCORES: dict[str, str] = {
    "nc1_drop_per_param": "held-out last-layer NC1 before − after the trial, per trainable block parameter",
    "nc1_drop": "held-out last-layer NC1 before − after the trial",
    "loss_drop": "held-out cross-entropy before − after the trial",
}


def check_trial_options(steps: int, held_out_per_class: int, score: str) -> None:
    """Validate the trial options before any compute.

    Raises:
        ConfigError: fewer than one step, fewer than two held-out samples per class, or an unknown score.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"selection.trial_steps must be an integer >= 1 (a trial of {steps!r} steps measures "
                          "nothing)")
    if isinstance(held_out_per_class, bool) or not isinstance(held_out_per_class, int) or held_out_per_class < 2:
        raise ConfigError(f"selection.trial_samples must be an integer >= 2 per class; got {held_out_per_class!r}")
    if score not in TRIAL_SCORES:
        raise ConfigError(f"selection.trial_score must be one of {', '.join(TRIAL_SCORES)}; got {score!r}")


def run_trials(backbone, split, num_classes: int, *, steps: int = 30, held_out_per_class: int = 20,
               batch_size: int = 32, lr: float = 1e-4, head_lr: float | None = None, weight_decay: float = 0.01,
               max_grad_norm: float | None = 1.0, seed: int = 0, device: str = "auto", cache_prefix: bool = True,
               freeze_bn: bool = True, candidates: Sequence[int] | None = None,
               score: str = "nc1_drop_per_param") -> dict[str, Any]:
    """Trial-fine-tune every candidate block and measure the held-out last-layer NC1 and loss.

    Args:
        backbone: The :class:`~nc_finetune.backbones.Backbone` (its weights are the same afterwards).
        split: The downstream training split (raw inputs and labels).
        num_classes: K.
        steps: Optimizer steps per trial (>= 1).
        held_out_per_class: Training samples per class kept out of the trials to measure NC1 and loss on.
        batch_size: Trial batch size.
        lr: Learning rate of the block.
        head_lr: Learning rate of the head (default ``lr``).
        weight_decay: AdamW weight decay (not on biases/norms, as in training).
        max_grad_norm: Gradient clipping (``None``: off).
        seed: Seed of the held-out draw, the head initialisation and the batch order (the same for every block).
        device: ``auto``, ``cpu``, ``cuda``...
        cache_prefix: Run each trial from the cached input of its block when that is valid.
        freeze_bn: Keep BatchNorm statistics frozen in the trained block (as ``adapt.freeze_bn``).
        candidates: Block indices to try (default: every block with parameters).
        score: Recorded with the results (see :data:`TRIAL_SCORES`).

    Returns:
        ``{"score", "steps", "batch_size", "lr", "held_out_samples", "nc1_before", "loss_before", "trials": [...],
        "cost": {...}}``; each trial has ``index``, ``name``, ``params``, ``nc1_after``, ``loss_after``,
        ``nc1_drop``, ``loss_drop``, ``seconds``, ``prefix_cache``; ``cost`` has ``seconds``, ``forward_passes``,
        ``backward_passes`` (batched calls) and ``forward_samples``, ``backward_samples``.

    Raises:
        ConfigError: invalid options or unknown candidate blocks.
        DataError: a class with fewer than ``held_out_per_class + 1`` training samples.
    """
    from nc_finetune.config import TrainConfig
    from nc_finetune.data import subsample_per_class
    from nc_finetune.select.selection import select_blocks
    from nc_finetune.utils.env import resolve_device, seed_everything

    check_trial_options(steps, held_out_per_class, score)
    blocks = _sorted_blocks(backbone.blocks)
    known = {b.index for b in blocks}
    chosen = [b.index for b in blocks if b.num_params > 0] if candidates is None else list(candidates)
    unknown = sorted(set(chosen) - known)
    if unknown:
        raise ConfigError(f"trial candidates {unknown} are not blocks of the backbone ({min(known)}..{max(known)})")
    labels = np.asarray(split.labels)
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() <= held_out_per_class:
        k = int(counts.argmin())
        raise DataError(f"selection.trial_samples={held_out_per_class} per class leaves nothing to train on: class "
                        f"{k} has {int(counts[k])} training samples")
    held_idx = np.sort(subsample_per_class(labels, held_out_per_class, seed))
    pool_idx = np.setdiff1d(np.arange(len(labels)), held_idx)
    # The same batches, in the same order, for every block: a seeded pass over the pool, repeated as needed.
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(pool_idx)) for _ in range(math.ceil(steps * batch_size /
                                                                                     len(pool_idx)))])
    batches = [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]
    used = np.unique(np.concatenate(batches))  # positions in the pool that the trials read
    pool = split.subset(pool_idx[used])
    remap = {int(p): i for i, p in enumerate(used)}
    batches = [np.asarray([remap[int(p)] for p in b]) for b in batches]
    held = split.subset(held_idx)
    held_y = torch.as_tensor(labels[held_idx], dtype=torch.long)
    pool_y = torch.as_tensor(np.asarray(pool.labels), dtype=torch.long)
    dev = resolve_device(device)
    cfg = TrainConfig(lr=lr, head_lr=head_lr, weight_decay=weight_decay)
    cost = {"seconds": 0.0, "forward_passes": 0, "backward_passes": 0, "forward_samples": 0, "backward_samples": 0}
    start = time.perf_counter()
    eval_bs = max(batch_size, 64)

    from nc_finetune.adapt import build_classifier

    flags = [(p, p.requires_grad) for p in backbone.model.parameters()]
    seed_everything(seed)
    # In place (no copy per trial): each trial's block weights and flags are restored below.
    base = build_classifier(backbone, num_classes, method="linear_probe", copy_backbone=False)
    base.model.to(dev)
    nc1_before, loss_before = _held_out(base, backbone, held, held_y, dev, eval_bs, None, cost)
    by_index = {b.index: b for b in blocks}
    trials = []
    for i in chosen:
        b = by_index[i]
        t0 = time.perf_counter()
        module = backbone.model.get_submodule(b.name)
        saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
        sel = select_blocks(None, blocks, strategy="manual", manual=[i])
        seed_everything(seed)  # the same head for every block
        adapted = build_classifier(backbone, num_classes, method="finetune", selection=sel, freeze_bn=freeze_bn,
                                   copy_backbone=False)
        model = adapted.model.to(dev)
        cache = _prefix_cache(adapted, backbone, pool, held, dev, eval_bs) if cache_prefix else None
        try:
            _train(adapted, backbone, pool, pool_y, batches, cfg, max_grad_norm, dev, cache, cost)
            nc1_after, loss_after = _held_out(adapted, backbone, held, held_y, dev, eval_bs, cache, cost)
        finally:
            module.load_state_dict(saved)
            for p, flag in flags:
                p.requires_grad_(flag)
            backbone.model.eval()
            del model, adapted
        trials.append({"index": i, "name": b.name, "params": int(b.num_params), "nc1_after": nc1_after,
                       "loss_after": loss_after, "nc1_drop": nc1_before - nc1_after,
                       "loss_drop": loss_before - loss_after, "seconds": time.perf_counter() - t0,
                       "prefix_cache": cache is not None})
    cost["seconds"] = time.perf_counter() - start
    return {"score": score, "steps": steps, "batch_size": batch_size, "lr": lr,
            "head_lr": head_lr if head_lr is not None else lr, "held_out_samples": len(held_idx),
            "train_pool_samples": len(pool_idx), "nc1_before": nc1_before, "loss_before": loss_before,
            "trials": trials, "cost": cost}


def _prefix_cache(adapted, backbone, pool, held, dev: torch.device, bs: int):
    """A verified prefix cache of the pool and held-out samples for this trial's block, or ``None``."""
    from nc_finetune.adapt import eval_mode
    from nc_finetune.train.cache import PrefixCache

    target = adapted.first_trainable_block
    if target is None:
        return None
    cache = PrefixCache(adapted.model, target, adapted.backbone_prefix)
    with eval_mode(adapted.model):
        for name, part in (("pool", pool), ("held", held)):
            cache.build(name, (backbone.collate(part.inputs[s:s + bs]) for s in range(0, len(part), bs)), dev,
                        finish=backbone.finish)
    idx = list(range(min(len(pool), 8)))
    ok = cache.verify("pool", backbone.prepare(pool.subset(idx).inputs), idx, dev)
    return cache if ok else None


def _inputs(backbone, part, name: str, idx: np.ndarray, dev: torch.device, cache) -> dict[str, torch.Tensor]:
    if cache is not None:
        return cache.batch(name, idx.tolist(), dev)
    return backbone.prepare_on(part.subset(idx).inputs, dev)


def _train(adapted, backbone, pool, pool_y, batches, cfg, max_grad_norm, dev, cache, cost) -> None:
    from nc_finetune.train.loop import make_optimizer

    model = adapted.model
    optimizer = make_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    adapted.train_mode()
    with cache.replay() if cache is not None else contextlib.nullcontext(), torch.enable_grad():
        for idx in batches:
            inputs = _inputs(backbone, pool, "pool", idx, dev, cache)
            loss = F.cross_entropy(model(**inputs).float(), pool_y[idx].to(dev))
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            cost["forward_passes"] += 1
            cost["backward_passes"] += 1
            cost["forward_samples"] += len(idx)
            cost["backward_samples"] += len(idx)
    model.eval()


def _held_out(adapted, backbone, held, held_y, dev, bs: int, cache, cost) -> tuple[float, float]:
    """NC1 of the head's input features and the mean cross-entropy on the held-out samples."""
    from nc_finetune.adapt import eval_mode
    from nc_finetune.backbones.hooks import HookSet
    from nc_finetune.probe.metrics import metrics_from_stats
    from nc_finetune.probe.stats import ClassStats

    model = adapted.model
    head = next(m for n, m in model.named_modules() if n.split(".")[-1] == "nc_head")
    feats: list[torch.Tensor] = []
    loss_sum = 0.0
    with HookSet() as hooks, torch.no_grad(), eval_mode(model), \
            cache.replay() if cache is not None else contextlib.nullcontext():
        hooks.on_input(head, lambda m, args: feats.append(args[0].detach().double()))  # the head's input (B, D)
        for s in range(0, len(held), bs):
            idx = np.arange(s, min(s + bs, len(held)))
            logits = model(**_inputs(backbone, held, "held", idx, dev, cache)).float()
            loss_sum += float(F.cross_entropy(logits, held_y[idx].to(dev), reduction="sum"))
            cost["forward_passes"] += 1
            cost["forward_samples"] += len(idx)
    x = torch.cat(feats)  # (N_held, D)
    stats = ClassStats(int(held_y.max()) + 1 if len(held_y) else 0, x.shape[1], device=x.device)
    stats.update(x, held_y.to(x.device))
    return float(metrics_from_stats(stats, name="trial head input")["nc1"]), loss_sum / len(held)


def rank_trial(blocks: Sequence[BlockLike], results: Mapping[str, Any] | None,
               score: str = "nc1_drop_per_param") -> Ranking:
    """Rank blocks by their measured trial (see :func:`run_trials`), highest ``score`` first, ties to the deeper block.

    Blocks without a trial (no parameters, not a candidate) or with a non-finite score get ``-inf`` and are ranked
    last.

    Raises:
        ConfigError: no trial results, an unknown score, or trials of blocks the backbone does not have.
    """
    blocks = _sorted_blocks(blocks)
    if score not in TRIAL_SCORES:
        raise ConfigError(f"selection.trial_score must be one of {', '.join(TRIAL_SCORES)}; got {score!r}")
    if not results or not results.get("trials"):
        raise ConfigError("strategy 'trial' needs trial results: run nc_finetune.select.trial.run_trials(backbone, "
                          "split, num_classes, ...) and pass trial_results=...")
    by_index = {b.index: b for b in blocks}
    scores = {b.index: -math.inf for b in blocks}
    for t in results["trials"]:
        i = int(t["index"])
        if i not in by_index:
            raise ConfigError(f"trial results hold block {i}, which the backbone does not have")
        v = {"nc1_drop_per_param": t["nc1_drop"] / t["params"] if t["params"] else math.nan,
             "nc1_drop": t["nc1_drop"], "loss_drop": t["loss_drop"]}[score]
        scores[i] = float(v) if v is not None and math.isfinite(v) else -math.inf
    order = _sort_desc(by_index, scores)
    top = order[0]
    t = next(t for t in results["trials"] if int(t["index"]) == top)
    c = results["cost"]
    untried = [i for i in order if scores[i] == -math.inf]
    note = f" Blocks {', '.join(map(str, untried))} have no usable trial: ranked last." if untried else ""
    rationale = (
        f"trial (Li et al.): each of {len(results['trials'])} blocks was fine-tuned with a fresh head for "
        f"{results['steps']} steps, then the last-layer NC1 and the loss were measured on "
        f"{results['held_out_samples']} held-out training samples (before: NC1 {results['nc1_before']:.4g}, loss "
        f"{results['loss_before']:.4g}). Block {top} '{t['name']}' reduces NC1 to {t['nc1_after']:.4g} (drop "
        f"{t['nc1_drop']:.4g}, loss drop {t['loss_drop']:.4g}) with {t['params']:,} parameters, the best "
        f"{TRIAL_SCORES[score]}: tuning it collapses the downstream features most, so it is tuned first; the others "
        f"follow by the same score (ties to the deeper block). The trials cost {c['seconds']:.1f} s, "
        f"{c['forward_passes']} forward and {c['backward_passes']} backward passes.{note}"
    )
    return Ranking(order=order, scores=scores, rationale=rationale, details={"trial": dict(results, score=score)})
