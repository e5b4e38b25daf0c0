"""The probe: one streaming, no-grad pass of downstream training data with every block tapped.

Forward hooks pool each tapped block's output to one vector per sample and feed it into that layer's additive
float64 statistics; no N x D feature matrix is kept (only a bounded reservoir per layer for NCC / linear-probe
accuracy). The forward stops right after the deepest tapped block. Under ``torch.distributed`` every rank probes
its own shard and the statistics are all-reduced, so the result equals a single-process run.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from nc_finetune.backbones import Backbone
from nc_finetune.backbones.hooks import ForwardStop, HookSet
from nc_finetune.data import Split
from nc_finetune.data.prefetch import prefetch, to_device
from nc_finetune.errors import ConfigError, DataError
from nc_finetune.probe.metrics import equi_separation_fit, linear_probe_accuracy, metrics_from_stats
from nc_finetune.probe.result import ProbeResult
from nc_finetune.probe.stats import ClassStats, FeatureReservoir
from nc_finetune.utils.env import library_versions, resolve_device

if TYPE_CHECKING:
    from nc_finetune.config import ProbeConfig

LayerScorer = Callable[[ClassStats, torch.Tensor, torch.Tensor], Mapping[str, float]]
"""Extra per-layer scores: ``(stats, reservoir features (n, D), their labels (n,)) -> {name: value}``."""


@dataclass(frozen=True)
class Tap:
    """One tapped module: a block, or the final pooled feature (``is_block=False``)."""

    index: int
    name: str
    is_block: bool
    num_params: int


def resolve_taps(backbone: Backbone, layers: str | Sequence[int] = "all") -> list[Tap]:
    """The taps for a probe, in forward order.

    Args:
        backbone: The model.
        layers: ``"all"`` (every block plus the final feature) or block indices (negative = from the end).

    Raises:
        ConfigError: an index outside the backbone's blocks.
    """
    n = len(backbone.blocks)
    if layers == "all":
        chosen = list(range(n))
    elif isinstance(layers, str):
        raise ConfigError(f"probe.layers must be 'all' or a list of block indices; got {layers!r}")
    else:
        chosen = []
        for i in layers:
            if not -n <= i < n:
                raise ConfigError(f"probe.layers: block index {i} does not exist; "
                                  f"{backbone.spec} has blocks 0..{n - 1}")
            chosen.append(i % n)
        chosen = sorted(set(chosen))
    taps = [Tap(b.index, b.name, True, b.num_params) for b in backbone.blocks if b.index in chosen]
    if layers == "all" and backbone.final_tap is not None:
        taps.append(Tap(n, backbone.final_tap, False, 0))
    return taps


def iter_batches(split: Split, batch_size: int) -> Iterator[tuple[Sequence, np.ndarray]]:
    """Consecutive (raw inputs, labels) batches of a split."""
    for start in range(0, len(split), batch_size):
        stop = min(start + batch_size, len(split))
        yield split.inputs[start:stop], split.labels[start:stop]


@contextlib.contextmanager
def tapped(backbone: Backbone, taps: list[Tap], store: dict[str, torch.Tensor], inputs_ref: dict[str, Any],
           stop_early: bool = True) -> Iterator[ForwardStop]:
    """Tap ``taps``; each forward writes ``store[name] = pooled output (B, D)``.

    ``inputs_ref["inputs"]`` must hold the current batch's model inputs (the pooler needs the attention mask).
    Yields the :class:`~nc_finetune.backbones.hooks.ForwardStop` that the deepest tap calls (``stop_early``):
    run the forward as ``with stop: model(**inputs)``. The taps are always removed, so the model is unchanged
    afterwards.
    """
    deepest = taps[-1].name if taps else None
    stop = ForwardStop()

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            store[name] = backbone.pool(output, inputs_ref["inputs"])
            if stop_early and name == deepest and name != "":
                stop()  # nothing after the deepest tap is needed

        return hook

    with HookSet() as hooks:
        for tap in taps:
            module = backbone.model if tap.name == "" else backbone.model.get_submodule(tap.name)
            hooks.on_output(module, make_hook(tap.name))
        yield stop


def probe(
    backbone: Backbone,
    split: Split,
    num_classes: int,
    *,
    batch_size: int = 64,
    layers: str | Sequence[int] = "all",
    ncc_samples: int = 4096,
    linear_probe: bool = False,
    autocast: bool = False,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    scorers: Sequence[LayerScorer] = (),
    cfg: ProbeConfig | None = None,
) -> ProbeResult:
    """Measure collapse at every tapped block in one pass over ``split``.

    Args:
        backbone: From :func:`nc_finetune.load_backbone`.
        split: Downstream *training* data (already subsampled); labels in ``[0, num_classes)``.
        num_classes: K.
        batch_size: Forward batch size.
        layers: ``"all"`` or block indices.
        ncc_samples: Reservoir size per layer for NCC / linear-probe accuracy (memory stays bounded).
        linear_probe: Also fit a logistic-regression probe per layer (``lp_accuracy``; ``nc3`` on the last tap).
        autocast: Forward under autocast (bf16 on CPU, fp16 on CUDA); statistics stay float64.
        device: ``auto``, ``cpu``, ``cuda``...
        seed: Reservoir sampling seed.
        progress: Show a tqdm bar (rank 0 only).
        meta: Extra provenance merged into ``ProbeResult.meta``.
        scorers: Extra per-layer scores merged into each record, e.g.
            ``(nc_finetune.transfer.scores.scores_from_stats,)`` for LogME, H-score and the raw NCTI terms. Each
            gets the layer's global (all-reduced) statistics and its reservoir; under ``torch.distributed`` the
            reservoir is each rank's *local* one (not reduced), so scores computed from it differ by rank.
        cfg: A recipe's probe section, taken whole: when given, its ``batch_size``, ``layers``, ``ncc_samples``,
            ``linear_probe``, ``autocast``, ``device`` and ``seed`` replace those keyword arguments (change one with
            ``dataclasses.replace(cfg, ...)``).

    Returns:
        The per-layer table.

    Raises:
        DataError: empty split or labels out of range (checked before any forward pass).
    """
    if cfg is not None:
        batch_size, layers, ncc_samples, linear_probe = cfg.batch_size, cfg.layers, cfg.ncc_samples, cfg.linear_probe
        autocast, device, seed = cfg.autocast, cfg.device, cfg.seed
    labels_all = np.asarray(split.labels)
    if len(split) == 0:
        raise DataError("probe: the training split is empty")
    if labels_all.min() < 0 or labels_all.max() >= num_classes:
        raise DataError(f"probe: labels must lie in [0, {num_classes}); found {labels_all.min()}..{labels_all.max()}")
    dev = resolve_device(device, "probe.device")
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)
    shard = split.subset(np.arange(rank, len(split), world)) if world > 1 else split

    taps = resolve_taps(backbone, layers)
    model = backbone.model
    was_training = model.training
    home = next(model.parameters()).device
    model.eval().to(dev)
    stats: dict[str, ClassStats] = {}
    # Never more room than samples: a huge probe.ncc_samples must not allocate for samples that do not exist (a
    # reservoir with room for all of them holds them in order and draws nothing, so the result is the same).
    capacity = max(1, min(ncc_samples // world, len(shard)))
    reservoirs = {t.name: FeatureReservoir(capacity, seed=seed + rank) for t in taps}
    store: dict[str, torch.Tensor] = {}
    inputs_ref: dict[str, Any] = {}
    amp_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    bar = tqdm(total=len(shard), desc=f"probe {backbone.spec}", unit="sample", disable=not progress or rank != 0,
               leave=False)
    start = time.perf_counter()
    try:
        with tapped(backbone, taps, store, inputs_ref) as stop, torch.no_grad():
            def prepare(batch: tuple[Sequence, np.ndarray]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
                raw, labels = batch
                return backbone.collate(raw), torch.as_tensor(np.asarray(labels), dtype=torch.long, device="cpu")

            # the next batches are collated (uint8 images, token ids; on CUDA pinned) in a background thread while
            # this one runs; resize and normalisation run on the device
            for inputs, y in prefetch(iter_batches(shard, batch_size), prepare, pin=dev.type == "cuda"):
                inputs, y = backbone.finish(to_device(inputs, dev)), to_device(y, dev)
                inputs_ref["inputs"] = inputs
                store.clear()
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=autocast), stop:
                    model(**inputs)
                for tap in taps:
                    feats = store[tap.name]  # (B, D_l)
                    if tap.name not in stats:
                        stats[tap.name] = ClassStats(num_classes, feats.shape[1], device=dev)
                    stats[tap.name].update(feats, y)
                    reservoirs[tap.name].add(feats, y)
                bar.update(len(y))
    finally:
        bar.close()
        model.train(was_training).to(home)  # later stages find the backbone where the loader left it
    seconds = time.perf_counter() - start

    if world > 1:  # a rank that saw no sample still needs each layer's dimension to join the all-reduce
        dims = torch.tensor([stats[t.name].dim if t.name in stats else 0 for t in taps], device=dev)
        dist.all_reduce(dims, op=dist.ReduceOp.MAX)
        for tap, d in zip(taps, dims.tolist(), strict=True):
            stats.setdefault(tap.name, ClassStats(num_classes, int(d), device=dev))
    records = []
    for tap in taps:
        st = stats[tap.name]
        st.all_reduce()
        name = tap.name or "output"
        rec: dict[str, Any] = {"index": tap.index, "name": tap.name or "output", "is_block": tap.is_block,
                               "dim": int(st.sums.shape[1]), "num_params": tap.num_params}
        weight = bias = None
        res = reservoirs[tap.name]
        if linear_probe and len(res.labels) > 0:
            acc, weight, bias = linear_probe_accuracy(res.features, res.labels, num_classes, seed=seed)
            rec["lp_accuracy"] = _all_mean(acc, len(res.labels), dev)
        with_w = weight is not None and tap is taps[-1]
        rec.update(metrics_from_stats(st, weight=weight if with_w else None, bias=bias if with_w else None, name=name))
        correct, total = res.ncc_correct(st.class_means())
        rec["ncc_accuracy"] = _all_sum_ratio(correct, total, dev)
        for scorer in scorers:
            rec.update(scorer(st, res.features, res.labels))  # reservoir terms are rank-local
        records.append(rec)

    block_nc1 = [r["nc1"] for r in records if r["is_block"]]
    fit = {"metric": "nc1", **equi_separation_fit(block_nc1)}
    n_total = len(split)
    info = {
        "backbone": backbone.spec,
        "num_classes": num_classes,
        "samples": n_total,
        "class_counts": np.bincount(labels_all, minlength=num_classes).tolist(),
        "pooling": backbone.pooling,
        "seed": seed,
        "batch_size": batch_size,
        "autocast": autocast,
        "device": str(dev),
        "world_size": world,
        "ncc_samples": ncc_samples,
        "seconds": seconds,
        "samples_per_second": n_total / seconds if seconds > 0 else math.nan,
        "versions": library_versions(),
    }
    info.update(meta or {})
    return ProbeResult(layers=records, fit=fit, meta=info)


def _all_sum_ratio(correct: int, total: int, device: torch.device) -> float:
    """correct / total summed over ranks."""
    t = torch.tensor([float(correct), float(total)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else math.nan


def _all_mean(value: float, weight: int, device: torch.device) -> float:
    """Weighted mean of a per-rank value over ranks."""
    return _all_sum_ratio(value * weight, weight, device)
