"""Frozen-prefix cache: compute the frozen part of the network once, then train from its outputs.

When everything before the first trainable block is frozen, in eval mode and fed without augmentation, its output
is a fixed function of each sample. :class:`PrefixCache` runs that prefix once over a split, keeps the input of the
first trainable block per sample (trimmed to the real token length for text), and during training replaces the
``forward`` of the prefix modules whose outputs only feed that input (:func:`trace_prefix`) so they return the cached
tensor instead of recomputing it; prefix modules whose outputs reach the target some other way (through plain
functions, or as another argument) keep running. Before use the cached path is checked against the real forward on
a batch; if they differ (work between modules that the trace cannot see) or the replay fails, caching is switched
off with a warning rather than training on wrong inputs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nc_finetune.backbones.hooks import ForwardStop, HookSet, input_of, output_of

log = logging.getLogger(__name__)


def _tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside a (nested) tuple / list / dict / ModelOutput."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensor_leaves(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensor_leaves(v)]
    return []


def _replace_tensors(obj: Any, value: torch.Tensor) -> Any:
    """``obj`` with every tensor replaced by ``value`` (same container types, ModelOutputs included)."""
    if isinstance(obj, torch.Tensor):
        return value
    if isinstance(obj, Mapping):
        out = copy.copy(obj)  # keeps the class (a ModelOutput stays a ModelOutput)
        for k, v in obj.items():
            out[k] = _replace_tensors(v, value)
        return out
    if isinstance(obj, tuple):
        items = [_replace_tensors(v, value) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_replace_tensors(v, value) for v in obj]
    return obj


def _hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a block receives: its first positional argument, else ``hidden_states=``/the first tensor."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return _tensor_leaves((args, kwargs))[0]


@dataclass
class PrefixPlan:
    """Which modules before the first trainable block the cache replaces, found by tracing one real forward.

    Attributes:
        before: Maximal modules that finish before the target starts (not its ancestors), in finishing order.
        skipped: The subset whose outputs flow only into other skipped modules or into the target's hidden-state
            input; these return the cached tensor during replay. The others (a ViT patch embedding followed by
            functional work, a DeBERTa relative-position norm whose output the target also reads) run for real.
        outputs: Output structure of each skipped module (tuples, ModelOutputs, ``None`` entries), so that replay
            returns what the caller unpacks.
    """

    before: list[str]
    skipped: list[str]
    outputs: dict[str, Any]


def trace_prefix(root: nn.Module, target: str, run: Callable[[], None]) -> PrefixPlan:
    """Trace one forward up to ``target`` and decide which earlier modules can be skipped.

    Data flow is followed by tensor identity: module M's output feeds module N when a tensor of M's output *is* one of
    N's inputs. A module is skipped when it feeds at least one module (or the target's hidden state) and everything
    it feeds is skipped too; work done between modules by plain functions is invisible to this rule, which is why
    :meth:`PrefixCache.verify` still compares the replay with the real forward.
    """
    calls: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    target_in: dict[str, Any] = {}
    keep: list[Any] = []  # holds every traced tensor so that no id() is reused during the trace
    target_mod = root.get_submodule(target)
    stop = ForwardStop()
    with HookSet() as hooks, stop:
        for name, m in root.named_modules():
            def pre(mod, args, kwargs, n=name):
                keep.append((args, kwargs))
                call = calls.setdefault(n, {"inputs": set(), "outputs": set()})  # a shared module may run twice
                call["inputs"] |= {id(t) for t in _tensor_leaves((args, kwargs))}

            def post(mod, args, kwargs, output, n=name):
                keep.append(output)
                calls[n]["outputs"] |= {id(t) for t in _tensor_leaves(output)}
                calls[n]["output"] = output
                order.append(n)

            hooks.on_input(m, pre, with_kwargs=True)
            hooks.on_output(m, post, with_kwargs=True)

        def at_target(mod, args, kwargs):
            keep.append((args, kwargs))
            hidden = _hidden_input(args, kwargs)
            target_in["hidden"] = id(hidden)
            target_in["other"] = {id(t) for t in _tensor_leaves((args, kwargs))} - {id(hidden)}
            stop()

        hooks.on_input(target_mod, at_target, with_kwargs=True, prepend=True)
        run()
    ancestors = {n for n in order if n == "" or target.startswith(n + ".")}
    cands = [n for n in order if n not in ancestors]
    before = [n for n in cands if not any(c != n and n.startswith(c + ".") for c in cands)]
    before = list(dict.fromkeys(before))
    # consumers of each tensor among the maximal modules; the target's non-hidden inputs are a consumer that runs
    consumers: dict[int, set[str]] = {}
    for n in before:
        for t in calls[n]["inputs"]:
            consumers.setdefault(t, set()).add(n)
    for t in target_in.get("other", ()):
        consumers.setdefault(t, set()).add("<target>")
    hidden = target_in.get("hidden")
    skipped = set(before)
    changed = True
    while changed:
        changed = False
        for n in list(skipped):
            outs = calls[n]["outputs"]
            fed = set().union(*(consumers.get(t, set()) for t in outs)) - {n}
            feeds_hidden = hidden in outs
            if not (fed or feeds_hidden) or not fed <= skipped:
                skipped.discard(n)
                changed = True
    kept = [n for n in before if n in skipped]
    return PrefixPlan(before, kept, {n: calls[n]["output"] for n in kept})


class PrefixCache:
    """Cached input of the first trainable module for every sample of one or more splits.

    Args:
        model: The classifier (or peft model) being trained.
        target: Qualified name of the first trainable block. For a frozen backbone (linear probe) pass the
            backbone's name: then the cache holds the backbone's pooled output.
        backbone_root: Qualified name of the backbone module.
    """

    def __init__(self, model: nn.Module, target: str, backbone_root: str) -> None:
        self.model = model
        self.target = target
        self.whole_backbone = target == backbone_root
        self.plan: PrefixPlan | None = None
        if self.whole_backbone:
            self.plan = PrefixPlan([backbone_root], [backbone_root], {backbone_root: None})
        self.samples: dict[str, list[tuple[dict[str, torch.Tensor], torch.Tensor]]] = {}
        self.current: torch.Tensor | None = None
        self.nbytes = 0
        # the device half of the input preparation, when the stored inputs are collated (uint8 images) batches
        self.finish: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    @property
    def prefix(self) -> list[str]:
        """The modules replay skips (empty before the first :meth:`build` batch is traced)."""
        return self.plan.skipped if self.plan is not None else []

    # -- building -----------------------------------------------------------------------------------------------
    def _capture(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the prefix on one batch and return the tensor the prefix hands to the target."""
        mod = self.model.get_submodule(self.target)
        if self.whole_backbone:
            return output_of(mod, lambda: self.model(**inputs), name=self.target).detach()
        args, kwargs = input_of(mod, lambda: self.model(**inputs), name=self.target)
        return _hidden_input(args, kwargs).detach()

    def build(self, name: str, inputs_list: Iterator[dict[str, torch.Tensor]], device: torch.device,
              finish: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> None:
        """Cache split ``name`` from an iterator of input batches (in sample order).

        Args:
            name: The split.
            inputs_list: Model inputs, or with ``finish`` collated batches (``Backbone.collate``: uint8 images).
            device: Where the prefix runs.
            finish: Turns a collated batch on ``device`` into model inputs (``Backbone.finish``); the cache then
                stores the compact collated inputs and :meth:`batch` finishes them.
        """
        store: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
        if finish is not None:
            self.finish = finish
        with torch.no_grad():
            for raw in inputs_list:
                cpu_inputs = {k: v.cpu() for k, v in raw.items()}
                inputs = {k: v.to(device) for k, v in raw.items()}
                if finish is not None:
                    inputs = finish(inputs)
                if self.plan is None:
                    self.plan = trace_prefix(self.model, self.target, lambda b=inputs: self.model(**b))
                x = self._capture(inputs).cpu()
                lengths = cpu_inputs["attention_mask"].sum(1).tolist() if "attention_mask" in cpu_inputs else None
                for i in range(x.shape[0]):
                    if lengths is not None:  # text: keep real tokens only; batches are re-padded on the fly
                        n = int(lengths[i])
                        t = cpu_inputs["attention_mask"].shape[1]
                        sample_in = {k: (v[i, :n] if v.dim() >= 2 and v.shape[1] == t else v[i])
                                     for k, v in cpu_inputs.items()}
                        # only a token tensor (B, T, D) is trimmed; a pooled (B, D) output is kept whole even if D == T
                        sample_x = x[i, :n].clone() if x.dim() >= 3 and x.shape[1] == t else x[i].clone()
                    else:
                        sample_in = {k: v[i].clone() for k, v in cpu_inputs.items()}
                        sample_x = x[i].clone()
                    self.nbytes += sample_x.numel() * sample_x.element_size()
                    store.append((sample_in, sample_x))
        self.samples[name] = store

    # -- using ------------------------------------------------------------------------------------------------
    def adopt(self, other: PrefixCache) -> None:
        """Reuse the cached tensors of ``other``, built on another model instance with the same frozen prefix
        weights and data (the caller guarantees that; :meth:`verify` still checks a batch against this model)."""
        if other.target != self.target:
            raise ValueError(f"cannot adopt a cache of {other.target!r} for {self.target!r}")
        self.plan = other.plan
        self.samples = other.samples
        self.nbytes = other.nbytes
        self.finish = other.finish

    def collate(self, name: str, indices: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``(stored inputs, cached hidden state)`` of ``indices`` of split ``name``, on the CPU, re-padded (the
        inputs are collated batches when the cache was built with ``finish``)."""
        items = [self.samples[name][i] for i in indices]
        keys = items[0][0].keys()
        return {k: _pad_stack([it[0][k] for it in items]) for k in keys}, _pad_stack([it[1] for it in items])

    def batch(self, name: str, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        """Model inputs for ``indices`` of split ``name``; sets the tensor the patched prefix will return."""
        inputs, hidden = self.collate(name, indices)
        self.current = hidden.to(device)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        return self.finish(inputs) if self.finish is not None else inputs

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Replace each prefix module's forward by one returning :attr:`current`."""
        saved = []
        for name in self.prefix:
            mod = self.model.get_submodule(name)
            saved.append((mod, mod.__dict__.get("forward")))
            mod.forward = functools.partial(self._replay_forward, self.plan.outputs[name])
        try:
            yield
        finally:
            for mod, old in saved:
                if old is None:
                    del mod.forward
                else:
                    mod.forward = old

    def _replay_forward(self, output: Any, *args, **kwargs) -> Any:
        """The skipped module's output structure with every tensor replaced by the cached hidden state."""
        assert self.current is not None, "PrefixCache.batch() must be called before the forward"
        return self.current if output is None else _replace_tensors(output, self.current)

    def verify(self, name: str, inputs: dict[str, torch.Tensor], indices: Sequence[int], device: torch.device,
               rtol: float | None = None) -> bool:
        """True when the cached path gives the same logits as the real forward on these samples.

        The check is a relative error of the logits, ``‖real − cached‖ / ‖real‖ ≤ rtol``. The default ``rtol`` is
        1e-4 on CPU and 2e-2 on CUDA, where TF32 convolutions and batch-size-dependent kernels make the two forwards
        differ at the 1e-3 level although both are equally accurate; a prefix the cache cannot replay differs at
        order 1.
        """
        from nc_finetune.adapt import eval_mode

        if rtol is None:
            rtol = 2e-2 if device.type == "cuda" else 1e-4
        with torch.no_grad(), eval_mode(self.model):
            real = self.model(**{k: v.to(device) for k, v in inputs.items()}).float()
            cached_inputs = self.batch(name, indices, device)
            try:
                with self.replay():
                    cached = self.model(**cached_inputs).float()
            except (RuntimeError, ValueError, TypeError, IndexError) as e:  # replayed shapes the model cannot take
                log.warning("prefix cache replay fails (%s: %s); training uncached", type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")
                return False
        if real.shape != cached.shape:
            log.warning("prefix cache gives logits of shape %s, the model %s; training uncached",
                        tuple(cached.shape), tuple(real.shape))
            return False
        err = float((real - cached).norm() / real.norm().clamp_min(1e-12))
        if err > rtol:
            log.warning("prefix cache does not reproduce the model's forward (relative error %.3g > %.3g); "
                        "training uncached", err, rtol)
        return err <= rtol


def _pad_stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack along a new batch dim, zero-padding dim 0 (tokens) to the longest."""
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    n = max(t.shape[0] for t in tensors)
    out = tensors[0].new_zeros((len(tensors), n, *tensors[0].shape[1:]))
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out
