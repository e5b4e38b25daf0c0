"""The training loop, on accelerate: one CPU, one GPU, or many processes through ``accelerate launch``/torchrun.

AdamW with linear warmup and cosine decay, gradient accumulation, clipping, autocast, evaluation after every
epoch, early stopping on a validation split, ``metrics.jsonl`` logging, atomic checkpoints, and exact resume.
The data order is a pure function of (seed, epoch), and the RNG states are checkpointed, so a resumed run
replays the uninterrupted one step for step.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nc_finetune import runs
from nc_finetune.adapt import AdaptedModel, eval_mode, is_head_param
from nc_finetune.config import TrainConfig
from nc_finetune.data import Split, StreamSplit
from nc_finetune.data.prefetch import prefetch, to_device
from nc_finetune.data.streaming import micro_batch_count
from nc_finetune.errors import ConfigError, UserError
from nc_finetune.train.cache import PrefixCache
from nc_finetune.train.checkpoint import load_checkpoint, save_checkpoint, save_weights, set_rng_state
from nc_finetune.train.hooks import HookContext, make_train_hook
from nc_finetune.train.metrics import (
    balanced_class_weights,
    confusion_counts,
    imbalance_message,
    metrics_from_confusion,
)
from nc_finetune.train.nc1_penalty import NC1Penalty
from nc_finetune.train.tracking import PROJECT, accelerate_trackers, check_trackers, scalars, tracker_config
from nc_finetune.utils.io import load_safetensors, write_text_atomic

#: Keys of :func:`~nc_finetune.train.metrics.metrics_from_confusion` copied to the summary per split.
_CLASS_METRICS = ("macro_f1", "per_class_accuracy", "confusion_matrix")


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and x.is_floating_point() else x


class StopTraining(Exception):
    """Raised by the ``stop_after_steps`` test hook to simulate a kill right after a checkpoint."""


@dataclass
class TrainData:
    """Splits used by the trainer (``val`` optional)."""

    train: Split
    test: Split
    val: Split | None = None


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters: head (``head_lr``) vs the rest (``lr``); no decay on biases/norms."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((is_head_param(name), p.ndim <= 1), []).append(p)
    param_groups = []
    for (is_head, no_decay), params in sorted(groups.items()):
        lr = (cfg.head_lr if cfg.head_lr is not None else cfg.lr) if is_head else cfg.lr
        param_groups.append({"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    if not param_groups:
        raise UserError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(param_groups)


def warmup_cosine(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warmup over ``warmup_ratio`` of the steps, then cosine decay to 0."""
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def epoch_batches(n: int, batch_size: int, world: int, rank: int, seed: int, epoch: int) -> list[np.ndarray]:
    """This rank's micro-batches for one epoch: a seeded permutation cut into global batches of
    ``batch_size * world``, each split evenly over ranks (a tail smaller than ``world`` samples is dropped)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    out = []
    for start in range(0, n, batch_size * world):
        chunk = perm[start:start + batch_size * world]
        if len(chunk) < world:
            break
        out.append(np.array_split(chunk, world)[rank])
    return out


def resolve_precision(requested: str, device_type: str) -> tuple[str, str]:
    """The autocast precision to use on ``device_type`` (``"no"`` = fp32) and why.

    ``auto`` picks bf16 on a CUDA device that supports it and fp32 elsewhere: bf16 autocast on a CPU runs several
    times slower than fp32 (6.8x on the development CPU). fp16 autocast is GPU-only, so it becomes bf16 on a CPU.
    """
    if requested == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU supports bf16"
        if device_type == "cuda":
            return "no", "auto: this GPU has no bf16; fp32 (set train.precision=fp16 for fp16 autocast)"
        return "no", f"auto: fp32 on {device_type} (bf16 autocast is slower than fp32 there)"
    if requested == "fp16" and device_type == "cpu":
        return "bf16", "fp16 autocast is GPU-only: bf16 on the CPU"
    return requested, "as configured"


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _read_log(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` pairs of ``metrics.jsonl``. A cut-off last line (a kill during its append) is dropped; a
    damaged line before it is refused (UserError naming it)."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line]
    rows = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if i == len(lines) - 1:
                break
            raise UserError(f"{path} is damaged: line {i + 1} is not a JSON record")
        rows.append((line, record))
    return rows


class Trainer:
    """Trains an :class:`~nc_finetune.adapt.AdaptedModel` and writes metrics and checkpoints to ``out``.

    Args:
        adapted: Model with its trainable set.
        backbone: The backbone (for ``prepare``).
        data: Train / val / test splits.
        cfg: Training configuration.
        out: Run directory (``metrics.jsonl``, ``checkpoint/``, ``best.safetensors``).
        progress: tqdm bars on rank 0.
        stop_after_steps: Test hook: raise :class:`StopTraining` once this many optimizer steps are done and
            checkpointed (simulates a kill).
        cache_store: Prefix caches shared with other trainers of the same data and frozen weights (a sweep's
            learning-rate grid), keyed by target block: reused when present (after the same check against the real
            forward), added when built.
    """

    def __init__(self, adapted: AdaptedModel, backbone, data: TrainData, cfg: TrainConfig, out: Path, *,
                 progress: bool = True, stop_after_steps: int | None = None,
                 cache_store: dict[str, PrefixCache] | None = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.adapted, self.backbone, self.data, self.cfg, self.out = adapted, backbone, data, cfg, Path(out)
        self.progress = progress
        self.stop_after_steps = stop_after_steps
        cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        device_type = "cpu" if cpu else torch.device("cuda" if cfg.device == "auto" else cfg.device).type
        precision, why = resolve_precision(cfg.precision, device_type)
        self.precision_info = {"requested": cfg.precision, "used": "fp32" if precision == "no" else precision,
                               "reason": why}
        if cfg.gradient_checkpointing:
            backbone.set_grad_checkpointing(True)
        check_trackers(cfg.report_to)
        log_with = accelerate_trackers(cfg.report_to) or None
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=precision, log_with=log_with,
                                       project_dir=str(self.out) if log_with else None,
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
        self.device = self.accelerator.device
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.cache: PrefixCache | None = None
        self.cache_store = cache_store
        if not (isinstance(cfg.nc1_penalty, (int, float)) and math.isfinite(cfg.nc1_penalty) and cfg.nc1_penalty >= 0):
            raise UserError(f"train.nc1_penalty must be a finite number >= 0, got {cfg.nc1_penalty!r}")
        # The adapt mode's optimiser hook (auto_rgn, lisa) and the optional NC1 loss term.
        self.hook = make_train_hook(adapted)
        self.penalty = NC1Penalty.for_adapted(adapted, backbone) if cfg.nc1_penalty > 0 else None
        # the head's weight is a parameter, or a buffer for the fixed ETF head
        self.num_classes = next(int(v.shape[0]) for n, v in adapted.model.state_dict().items()
                                if "nc_head" in n.split(".") and n.endswith("weight"))
        self.streamed = isinstance(data.train, StreamSplit)  # trains on the whole stream, one shuffled pass an epoch
        if self.streamed:
            if adapted.method == "auto_rgn":  # its hook measures gradients on index batches of each epoch
                raise ConfigError("adapt.method=auto_rgn needs random access to the training data; with "
                                  "data.streaming=true set data.max_train_samples")
            if data.train.num_rows is None:
                data.train.count()  # one label-only pass: the schedule needs the epoch length
        self.class_weights = None
        if cfg.class_weights == "balanced":
            self.class_weights = torch.as_tensor(balanced_class_weights(None, self.num_classes,
                                                                        self._train_counts()),
                                                 dtype=torch.float32, device=self.device)
        # Forwards of training (the prepared, possibly DDP-wrapped model) and of evaluation (the plain model: a DDP
        # forward would sync buffers across ranks that run different numbers of evaluation batches).
        self._forward: nn.Module = adapted.model
        self._eval_forward: nn.Module = torch.compile(adapted.model) if cfg.compile else adapted.model

    # -- data ---------------------------------------------------------------------------------------------------
    def _train_counts(self) -> np.ndarray:
        """Training examples per class, shape (K,)."""
        if self.streamed:
            return self.data.train.class_counts
        return np.bincount(np.asarray(self.data.train.labels, dtype=np.int64), minlength=self.num_classes)

    def _micro_batches(self, epoch: int) -> list[np.ndarray] | None:
        """This rank's index batches of ``epoch`` (``None`` for a streamed training split)."""
        if self.streamed:
            return None
        return epoch_batches(len(self.data.train), self.cfg.batch_size, self.world, self.rank, self.cfg.seed, epoch)

    def _batches(self, split_name: str, split: Split, index_batches: Sequence[np.ndarray],
                 train: bool) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """``(inputs, labels)`` on the device for each index batch. Collated (uint8 images, token ids) a batch
        ahead in a background thread and pinned for an asynchronous copy to a GPU; resized, normalised and augmented
        on the device (``Backbone.finish``), in this thread, so the flips draw from torch's RNG in a fixed order."""
        labels = np.asarray(split.labels)
        cached = self.cache is not None and split_name in self.cache.samples

        def prepare(idx: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
            y = torch.as_tensor(labels[idx], dtype=torch.long, device="cpu")
            if cached:
                inputs, hidden = self.cache.collate(split_name, idx.tolist())
                return inputs, y, hidden
            return self.backbone.collate(split.subset(idx).inputs), y, None

        for inputs, y, hidden in prefetch(index_batches, prepare, pin=self.device.type == "cuda"):
            inputs, y = to_device(inputs, self.device), to_device(y, self.device)
            if hidden is not None:
                self.cache.current = to_device(hidden, self.device)
            inputs = self.backbone.finish(inputs, train=train)
            if self.cfg.channels_last:
                inputs = {k: _channels_last(v) for k, v in inputs.items()}
            yield inputs, y

    def _stream_batches(self, raw_batches: Iterable[tuple[list, np.ndarray]], train: bool = False
                        ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """``(inputs, labels)`` on the device for batches read from a stream (``StreamSplit.batches`` or
        ``shuffled_batches``): read and collated a batch ahead in a background thread, finished (and with ``train``
        augmented) on the device."""
        def prepare(batch: tuple[list, np.ndarray]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            raw, labels = batch
            return self.backbone.collate(raw), torch.as_tensor(labels, dtype=torch.long, device="cpu")

        for inputs, y in prefetch(raw_batches, prepare, pin=self.device.type == "cuda"):
            inputs, y = to_device(inputs, self.device), to_device(y, self.device)
            inputs = self.backbone.finish(inputs, train=train)
            if self.cfg.channels_last:
                inputs = {k: _channels_last(v) for k, v in inputs.items()}
            yield inputs, y

    def _split_passes(self, epochs_run: int) -> dict[str, int]:
        """Forward passes the run makes over each split: one per epoch, plus the final test after reloading the best
        validation model (without validation the last epoch's test evaluation is the final one)."""
        passes = {"train": epochs_run, "test": epochs_run + (1 if self.data.val is not None else 0)}
        if self.data.val is not None:
            passes["val"] = epochs_run
        return passes

    def _schedule(self) -> tuple[int, int]:
        """``(steps_per_epoch, total_steps)`` of this run (``max_steps`` included)."""
        cfg = self.cfg
        micro_per_epoch = micro_batch_count(len(self.data.train), cfg.batch_size, self.world)
        steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.grad_accum_steps))
        # As in HF Trainer, max_steps wins over epochs: training runs as many epochs as the steps need.
        total_steps = cfg.max_steps if cfg.max_steps is not None else steps_per_epoch * cfg.epochs
        return steps_per_epoch, total_steps

    def _setup_cache(self) -> dict[str, Any]:
        cfg, a = self.cfg, self.adapted
        steps_per_epoch, total_steps = self._schedule()
        epochs_run = math.ceil(total_steps / steps_per_epoch)  # the same for a resumed run: resume stays exact
        target = a.first_trainable_block if a.method != "linear_probe" else a.backbone_prefix
        splits = {"train": self.data.train, "test": self.data.test}
        if self.data.val is not None:
            splits["val"] = self.data.val
        streamed = any(isinstance(v, StreamSplit) for v in splits.values())
        splits = {k: v for k, v in splits.items() if not isinstance(v, StreamSplit)}  # a stream is never held
        passes = self._split_passes(epochs_run)
        if cfg.cache_prefix == "auto":  # building costs one forward per split: it pays on splits read twice or more
            splits = {k: v for k, v in splits.items() if passes[k] >= 2}
        reason = None
        if cfg.cache_prefix == "off":
            reason = "train.cache_prefix=off"
        elif cfg.augment:
            reason = "augmentation makes the prefix non-deterministic"
        elif a.method == "full" or target is None:
            reason = "no frozen prefix"
        elif not splits and streamed:
            reason = "the splits are streamed (data.streaming): they are read from the stream, not cached"
        elif not splits:
            reason = (f"every split is read once ({epochs_run} epoch): building the cache costs the forward it would "
                      "save")
        if reason:
            return {"enabled": False, "reason": reason}
        start = time.perf_counter()
        cache = PrefixCache(self.adapted.model, target, a.backbone_prefix)
        shared = self.cache_store.get(target) if self.cache_store is not None else None
        bs = cfg.eval_batch_size
        if shared is not None and set(shared.samples) == set(splits):
            cache.adopt(shared)
        else:
            shared = None
            # under the training autocast: the cached prefix outputs are what the uncached forward would compute
            with eval_mode(self.adapted.model), self.accelerator.autocast():
                for name, split in splits.items():
                    batches = prefetch(range(0, len(split), bs),
                                       lambda i, s=split: self.backbone.collate(s.inputs[i:i + bs]),
                                       pin=self.device.type == "cuda")
                    cache.build(name, batches, self.device, finish=self.backbone.finish)
        if not cache.prefix:
            return {"enabled": False, "reason": "no module before the first trainable block can be skipped"}
        first = next(iter(splits))
        probe_idx = np.arange(min(len(splits[first]), 8))
        raw_inputs = self.backbone.prepare(splits[first].subset(probe_idx).inputs)
        with self.accelerator.autocast():
            same = cache.verify(first, raw_inputs, probe_idx.tolist(), self.device)
        if not same:
            if cfg.cache_prefix == "on":
                raise UserError("train.cache_prefix=on but the cached prefix does not reproduce the model's "
                                "forward for this architecture; use train.cache_prefix=auto or off")
            return {"enabled": False, "reason": "cached path differs from the real forward"}
        self.cache = cache
        if self.cache_store is not None:
            self.cache_store[target] = cache
        return {"enabled": True, "target": target, "prefix_modules": cache.prefix, "splits": list(splits),
                "shared": shared is not None,
                "megabytes": cache.nbytes / 2**20, "build_seconds": time.perf_counter() - start}

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, split_name: str, split: Split) -> dict[str, Any]:
        """Accuracy, mean CE loss, macro-F1, per-class accuracy and the confusion matrix on a split (sharded over
        ranks; the loss sum and the K x K confusion matrix are summed across ranks)."""
        model = self.adapted.model
        K = self.num_classes
        cm = torch.zeros(K, K, dtype=torch.int64, device=self.device)
        loss = torch.zeros(1, dtype=torch.float64, device=self.device)  # summed on the device: one read at the end
        bs = self.cfg.eval_batch_size
        if isinstance(split, StreamSplit):  # read batch by batch, never held in memory
            batches = self._stream_batches(split.batches(bs, self.rank, self.world))
        else:
            idx_all = np.arange(self.rank, len(split), self.world)
            batches = self._batches(split_name, split, [idx_all[s:s + bs] for s in range(0, len(idx_all), bs)],
                                    train=False)
        with torch.no_grad(), eval_mode(model), self._replay(split_name):
            for inputs, y in batches:
                with self.accelerator.autocast():
                    logits = self._eval_forward(**inputs)
                loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
                cm += confusion_counts(y, logits.argmax(1), K)
        if self.world > 1:
            cm, loss = self.accelerator.reduce(cm, reduction="sum"), self.accelerator.reduce(loss, reduction="sum")
        cm = cm.cpu()
        total = int(cm.sum())
        m = metrics_from_confusion(cm)
        mean_loss = float(loss.cpu()[0]) / total if total else math.nan
        return {"accuracy": m.pop("accuracy"), "loss": mean_loss, "samples": total, **m}

    def _rank_mean(self, values: list[float]) -> list[float]:
        """Element-wise mean over ranks (every rank holds as many values: the same micro-batch count)."""
        if self.world == 1 or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return (self.accelerator.reduce(t, reduction="sum") / self.world).tolist()

    def _hook_batch(self, idx: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A training batch without augmentation, for hooks that measure the model (Auto-RGN)."""
        return next(iter(self._batches("train", self.data.train, [np.asarray(idx)], train=False)))

    def _replay(self, split_name: str):
        cached = self.cache is not None and split_name in self.cache.samples
        return self.cache.replay() if cached else contextlib.nullcontext()

    # -- logging ------------------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.out / runs.METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.cfg.report_to:
            self.accelerator.log(scalars(record), step=record["step"])

    def _truncate_log(self, step: int) -> None:
        """On resume, drop log lines written after the checkpoint so the log matches an uninterrupted run."""
        path = self.out / runs.METRICS
        if self.rank != 0 or not path.exists():
            return
        rows = _read_log(path)
        # A checkpoint at an epoch end is written after that epoch's evaluation lines, which are kept; the final test
        # line comes after the last checkpoint and is written again by the resumed run.
        keep = [line for line, r in rows if r.get("step", 0) <= step and r.get("split") != "final_test"]
        write_text_atomic(path, "".join(line + "\n" for line in keep))

    # -- main loop ----------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train; return the summary (test accuracy, parameter counts, time, peak memory, cache info)."""
        cfg, acc = self.cfg, self.accelerator
        warning = imbalance_message(None, self.num_classes, cfg.class_weights, self._train_counts())
        if warning and self.rank == 0:
            warnings.warn(warning, UserWarning, stacklevel=2)
        self.out.mkdir(parents=True, exist_ok=True)
        model = self.adapted.model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)  # 4-D weights only; others are unaffected
        cache_info = self._setup_cache()
        optimizer = self.hook.make_optimizer(model, cfg) if self.hook else make_optimizer(model, cfg)
        n_train = len(self.data.train)
        steps_per_epoch, total_steps = self._schedule()
        num_epochs = math.ceil(total_steps / steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup_ratio))
        model, optimizer = acc.prepare(model, optimizer)
        # The compiled module shares the parameters; checkpoints and state dicts keep using the plain module.
        self._forward = torch.compile(model) if cfg.compile else model
        if cfg.report_to:
            acc.init_trackers(PROJECT, config=tracker_config(cfg))

        # Everything needed to continue exactly where a checkpoint left off (saved as position.json).
        pos = {"epoch": 0, "micro": 0, "step": 0, "best_val": None, "bad_evals": 0, "stopped_early": False,
               "train_seconds": 0.0, "epoch_seconds": [], "running": [], "last_test": None}
        ckpt_dir = self.out / runs.CHECKPOINT
        if resume:
            weights, state, pos = load_checkpoint(ckpt_dir)
            missing = set(weights) - set(acc.unwrap_model(model).state_dict())
            if missing:
                raise UserError(f"checkpoint in {ckpt_dir} does not match this model (e.g. {sorted(missing)[0]})")
            acc.unwrap_model(model).load_state_dict(weights, strict=False)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            pos.setdefault("last_test", None)
            self._truncate_log(pos["step"])
        elif self.rank == 0:  # a fresh run: no log lines or best model of an earlier run in this directory
            for stale in (runs.METRICS, runs.BEST_WEIGHTS):
                (self.out / stale).unlink(missing_ok=True)

        # Losses since the last log line: summed on the device (reading a loss every step would make the host wait
        # for the GPU), moved into `pos["running"]` (sum, count) when logged or checkpointed.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_count = 0
        if len(pos["running"]) != 2 or not isinstance(pos["running"][1], int):  # an older checkpoint: a list of losses
            pos["running"] = [float(sum(pos["running"])), len(pos["running"])]

        def flush_losses() -> None:
            nonlocal loss_sum, loss_count
            mean_sum = self._rank_mean([float(loss_sum)])[0]  # every rank ran as many micro-batches: average them
            pos["running"] = [pos["running"][0] + mean_sum, pos["running"][1] + loss_count]
            loss_sum, loss_count = torch.zeros_like(loss_sum), 0

        def checkpoint() -> None:
            flush_losses()
            if self.rank == 0:
                weights = self.adapted.trainable_state_dict()
                save_checkpoint(ckpt_dir, weights, optimizer.state_dict(), scheduler.state_dict(), pos)
            acc.wait_for_everyone()

        hook_ctx = None
        if self.hook is not None:
            hook_ctx = HookContext(model=acc.unwrap_model(model), optimizer=getattr(optimizer, "optimizer", optimizer),
                                   scheduler=scheduler, accelerator=acc, cfg=cfg, batch=self._hook_batch)
            self.hook.on_fit_start(hook_ctx, pos)
        if self.penalty is not None:
            self.penalty.attach()
        bar = tqdm(total=total_steps, initial=pos["step"], desc="train", unit="step",
                   disable=not self.progress or self.rank != 0, leave=False)
        stopped_early = bool(pos.get("stopped_early", False))  # a resumed run that had stopped early stays stopped
        bad_loss = torch.zeros((), dtype=torch.bool, device=self.device)  # a non-finite loss since the last step
        try:
            # An epoch that max_steps cut short still owes its evaluation, also when a run killed right after the
            # checkpoint of its last step resumes (micro > 0 marks the unfinished epoch).
            while pos["epoch"] < num_epochs and (pos["step"] < total_steps or pos["micro"] > 0) and not stopped_early:
                epoch = pos["epoch"]
                batches = self._micro_batches(epoch)
                n_micro = micro_batch_count(n_train, cfg.batch_size, self.world)
                if self.hook is not None and pos["micro"] == 0:
                    with self._replay("train"):
                        self.hook.on_epoch_start(hook_ctx, epoch, batches, pos)
                self.adapted.train_mode()
                t0 = time.perf_counter()
                if batches is None:
                    stream = self._stream_batches(self.data.train.shuffled_batches(
                        cfg.batch_size, cfg.seed, epoch, self.rank, self.world, skip=pos["micro"]), train=cfg.augment)
                else:
                    stream = self._batches("train", self.data.train, batches[pos["micro"]:], train=cfg.augment)
                with self._replay("train"):
                    for inputs, y in stream:
                        if pos["step"] >= total_steps:
                            break
                        sync = (pos["micro"] + 1) % cfg.grad_accum_steps == 0 or pos["micro"] + 1 == n_micro
                        ctx = acc.no_sync(model) if not sync and self.world > 1 else contextlib.nullcontext()
                        with ctx, acc.autocast():
                            if self.penalty is None:
                                loss = F.cross_entropy(self._forward(**inputs).float(), y, weight=self.class_weights)
                            else:
                                with self.penalty.capture(inputs):
                                    logits = self._forward(**inputs)
                                loss = F.cross_entropy(logits.float(), y, weight=self.class_weights) \
                                    + cfg.nc1_penalty * self.penalty.value(y)
                            acc.backward(loss / cfg.grad_accum_steps)
                        loss_sum += loss.detach().double()
                        loss_count += 1
                        bad_loss |= ~torch.isfinite(loss.detach())
                        pos["micro"] += 1
                        if not sync:
                            continue
                        # one flag read per optimizer step: stop before non-finite gradients are applied
                        if bool(bad_loss) or self.world > 1:
                            self._stop_on_bad_loss(math.nan if bool(bad_loss) else None, pos["step"] + 1)
                        if cfg.max_grad_norm is not None:
                            acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                cfg.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        pos["step"] += 1
                        if self.hook is not None:
                            self.hook.on_step_end(hook_ctx, pos)
                        bar.update(1)
                        if pos["step"] % cfg.log_every == 0 or pos["step"] == total_steps:
                            flush_losses()
                            mean_loss = pos["running"][0] / max(1, pos["running"][1])
                            self._log({"step": pos["step"], "epoch": epoch, "loss": mean_loss,
                                       "lr": scheduler.get_last_lr()[-1]})
                            bar.set_postfix(loss=f"{mean_loss:.4f}")
                            pos["running"] = [0.0, 0]
                        if pos["step"] % cfg.checkpoint_every == 0 and pos["micro"] < n_micro:
                            pos["train_seconds"] += time.perf_counter() - t0
                            t0 = time.perf_counter()
                            checkpoint()
                            if self.stop_after_steps is not None and pos["step"] >= self.stop_after_steps:
                                raise StopTraining
                pos["train_seconds"] += time.perf_counter() - t0
                pos["epoch_seconds"].append(time.perf_counter() - t0)
                last = epoch + 1 >= num_epochs or pos["step"] >= total_steps
                if last or (epoch + 1) % cfg.eval_every_epochs == 0:
                    stopped_early = pos["stopped_early"] = self._end_of_epoch(epoch, pos)
                pos["epoch"] += 1
                pos["micro"] = 0
                checkpoint()
                if self.stop_after_steps is not None and pos["step"] >= self.stop_after_steps:
                    raise StopTraining
        finally:
            if self.penalty is not None:
                self.penalty.detach()
            bar.close()

        if (self.out / runs.BEST_WEIGHTS).exists():
            best = load_safetensors(self.out / runs.BEST_WEIGHTS)
            acc.unwrap_model(model).load_state_dict(best, strict=False)
            test = self.evaluate("test", self.data.test)
        elif pos["last_test"] is not None and pos["last_test"]["step"] == pos["step"]:
            test = pos["last_test"]["result"]  # the model has not changed since the last epoch's test evaluation
        else:
            test = self.evaluate("test", self.data.test)
        counts = self.adapted.parameter_counts()
        summary = {
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "test_samples": test["samples"],
            **{f"test_{k}": test[k] for k in _CLASS_METRICS},
            **counts,
            "trainable_fraction": counts["trainable_params"] / counts["total_params"],
            "train_seconds": pos["train_seconds"],
            "seconds_per_epoch": pos["train_seconds"] / max(1, len(pos["epoch_seconds"])),
            "steps": pos["step"],
            "epochs_run": pos["epoch"],
            "stopped_early": stopped_early,
            "peak_memory_mb": peak_memory_mb(self.device),
            "device": str(self.device),
            "world_size": self.world,
            "prefix_cache": cache_info,
            "precision": self.precision_info,
        }
        if pos.get("hook"):
            summary["train_hook"] = pos["hook"]
        if self.data.val is not None:  # the returned model's (the best one's when early stopping kept it)
            val = self.evaluate("val", self.data.val)
            summary.update({f"val_{k}": val[k] for k in ("accuracy", "loss", "samples", *_CLASS_METRICS)})
        self._log({"step": pos["step"], "epoch": pos["epoch"], "split": "final_test", **test})
        if cfg.report_to:
            acc.end_training()
        return summary

    def _stop_on_bad_loss(self, bad_loss: float | None, step: int) -> None:
        """Stop, before the optimizer applies non-finite gradients, when any rank saw a NaN/inf loss in this step.

        Raises:
            UserError: naming the step; the last checkpoint stays as it is.
        """
        bad = bad_loss is not None
        if self.world > 1:  # every rank must stop at the same step, or the others wait forever
            flag = torch.tensor(float(bad), device=self.device)
            bad = float(self.accelerator.reduce(flag, reduction="sum")) > 0
        if bad:
            cfg = self.cfg
            clip = "" if cfg.max_grad_norm is not None else " or set train.max_grad_norm (clipping is off)"
            raise UserError(f"train: loss is {bad_loss if bad_loss is not None else 'not finite on another rank'} "
                            f"at step {step}; lower train.lr (now {cfg.lr:g}){clip}, or check the data")

    def _end_of_epoch(self, epoch: int, pos: dict[str, Any]) -> bool:
        """Evaluate val/test, track the best validation model; return True to stop early."""
        cfg = self.cfg
        if self.data.val is not None:
            val = self.evaluate("val", self.data.val)
            self._log({"step": pos["step"], "epoch": epoch, "split": "val", **val})
            if pos["best_val"] is None or val["accuracy"] > pos["best_val"]:
                pos["best_val"], pos["bad_evals"] = val["accuracy"], 0
                if self.rank == 0:
                    save_weights(self.out / runs.BEST_WEIGHTS, self.adapted.trainable_state_dict())
            else:
                pos["bad_evals"] += 1
        test = self.evaluate("test", self.data.test)
        pos["last_test"] = {"step": pos["step"], "result": test}
        self._log({"step": pos["step"], "epoch": epoch, "split": "test", **test})
        patience = cfg.early_stopping_patience
        return patience is not None and self.data.val is not None and pos["bad_evals"] >= patience

