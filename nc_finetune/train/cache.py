"""Frozen-prefix cache: compute the frozen part of the network once, then train from its outputs.

When everything before the first trainable block is frozen, in eval mode and fed without augmentation, its output
is a fixed function of each sample. :class:`PrefixCache` runs that prefix once over a split, keeps the input of the
first trainable block per sample (its real tokens only for text, wherever the padding was), and during training
replaces the prefix modules' ``forward`` so they return the cached tensor instead of recomputing it; a pre-hook on
the first trainable block then hands it the cached tensor exactly, so functional work between prefix modules (GPT-2's
sum of token and position embeddings, Gemma's embedding scale) does not corrupt it.

Only prefix modules whose output is the per-sample stream (a tensor of the cached input's rank and batch size, or a
tuple of it and ``None``) are replayed. Side computations that the later layers receive as arguments (the rotary
position embeddings Llama/Qwen2 compute once at model level and pass to every layer, DeBERTa's normalised relative
embeddings) keep running for real: they are cheap and depend on the batch's positions, not on the cached tensor.

Before use the cached path is checked against the real forward on a batch; if they differ (an architecture whose
prefix outputs reach later layers in a way the cache cannot replay) caching is switched off with a warning rather
than training on wrong inputs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


def _trace_prefix(root: nn.Module, target: str, run: Callable[[], None]) -> list[tuple[str, Any]]:
    """Maximal modules that finish before ``target`` starts and are not its ancestors, in finishing order, each with
    its (last) output."""
    events: list[tuple[str, str, Any]] = []
    handles = []
    target_mod = root.get_submodule(target)
    try:
        for name, m in root.named_modules():
            handles.append(m.register_forward_pre_hook(lambda mod, args, n=name: events.append(("start", n, None))))
            handles.append(m.register_forward_hook(lambda mod, args, out, n=name: events.append(("end", n, out))))

        def stop(mod, args):
            raise _Stop

        handles.append(target_mod.register_forward_pre_hook(stop))
        with contextlib.suppress(_Stop):
            run()
    finally:
        for h in handles:
            h.remove()
    outputs = {n: out for kind, n, out in events if kind == "end"}
    ended = [n for kind, n, _ in events if kind == "end"]
    ancestors = {n for n in ended if n == "" or target.startswith(n + ".")}
    cands = [n for n in ended if n not in ancestors]
    maximal = [n for n in cands if not any(c != n and n.startswith(c + ".") for c in cands)]
    seen: list[str] = []
    for n in maximal:
        if n not in seen:
            seen.append(n)
    return [(n, outputs[n]) for n in seen]


def _stream_arity(output: Any, like: torch.Tensor) -> int | None:
    """How a prefix module's output carries the per-sample stream that ends in ``like`` (the cached input):
    0 = a tensor with ``like``'s rank and batch size, n = a length-n tuple of such a tensor followed by ``None``
    (a transformers layer with no attention output); None = it does not. Shapes may change along the stream
    (a CNN stem), but side computations do not look like it: rotary position embeddings come as a (cos, sin) pair,
    DeBERTa's relative embeddings have no batch dimension."""
    def is_stream(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() == like.dim() and t.shape[0] == like.shape[0]

    if is_stream(output):
        return 0
    if isinstance(output, tuple) and output and is_stream(output[0]) and all(o is None for o in output[1:]):
        return len(output)
    return None


def _hidden_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a block receives: its first positional argument, or ``hidden_states=``."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError("the first trainable block was called without a positional input or hidden_states=")


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
        self.prefix: list[str] = [backbone_root] if self.whole_backbone else []
        self.arity: dict[str, int] = {}  # prefix module -> how its replayed output is shaped (see _stream_arity)
        self.samples: dict[str, list[tuple[dict[str, torch.Tensor], torch.Tensor]]] = {}
        self.current: torch.Tensor | None = None
        self.nbytes = 0

    # -- building -----------------------------------------------------------------------------------------------
    def _capture(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the prefix on one batch and return the tensor the prefix hands to the target."""
        out: dict[str, torch.Tensor] = {}
        mod = self.model.get_submodule(self.target)
        if self.whole_backbone:
            def hook(m, args, output):
                out["x"] = output
                raise _Stop
            h = mod.register_forward_hook(hook)
        else:
            def hook(m, args, kwargs):
                out["x"] = _hidden_input(args, kwargs)
                raise _Stop
            h = mod.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with contextlib.suppress(_Stop):
                self.model(**inputs)
        finally:
            h.remove()
        return out["x"].detach()

    def build(self, name: str, inputs_list: Iterator[dict[str, torch.Tensor]], device: torch.device) -> None:
        """Cache split ``name`` from an iterator of prepared input batches (in sample order)."""
        store: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
        with torch.no_grad():
            for inputs in inputs_list:
                inputs = {k: v.to(device) for k, v in inputs.items()}
                traced = None
                if not self.prefix:
                    traced = _trace_prefix(self.model, self.target, lambda b=inputs: self.model(**b))
                x = self._capture(inputs)
                if traced is not None:
                    self.arity = {n: a for n, out in traced if (a := _stream_arity(out, x)) is not None}
                    self.prefix = list(self.arity)
                x = x.cpu()
                cpu_inputs = {k: v.cpu() for k, v in inputs.items()}
                mask = cpu_inputs.get("attention_mask")
                for i in range(x.shape[0]):
                    if mask is not None:  # text: keep real tokens only (left or right padded); re-padded on the fly
                        keep = mask[i] > 0  # (T,)
                        t = mask.shape[1]
                        sample_in = {k: (v[i][keep] if v.dim() >= 2 and v.shape[1] == t else v[i])
                                     for k, v in cpu_inputs.items()}
                        # only a token tensor (B, T, D) is trimmed; a pooled (B, D) output is kept whole even if D == T
                        sample_x = x[i][keep].clone() if x.dim() >= 3 and x.shape[1] == t else x[i].clone()
                    else:
                        sample_in = {k: v[i].clone() for k, v in cpu_inputs.items()}
                        sample_x = x[i].clone()
                    self.nbytes += sample_x.numel() * sample_x.element_size()
                    store.append((sample_in, sample_x))
        self.samples[name] = store

    def adopt(self, other: PrefixCache) -> None:
        """Reuse the cached tensors of ``other``, built on another model instance with the same frozen prefix
        weights and data (the caller guarantees that; :meth:`verify` still checks a batch against this model)."""
        if other.target != self.target:
            raise ValueError(f"cannot adopt a cache of {other.target!r} for {self.target!r}")
        self.prefix = list(other.prefix)
        self.samples = other.samples
        self.nbytes = other.nbytes

    # -- using ------------------------------------------------------------------------------------------------
    def batch(self, name: str, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        """Model inputs for ``indices`` of split ``name``; sets the tensor the patched prefix will return."""
        items = [self.samples[name][i] for i in indices]
        keys = items[0][0].keys()
        inputs = {k: _pad_stack([it[0][k] for it in items]).to(device) for k in keys}
        self.current = _pad_stack([it[1] for it in items]).to(device)
        return inputs

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Replace each prefix module's forward by one returning :attr:`current`, and feed :attr:`current` to the
        first trainable block whatever the model computed between the two."""
        saved = []
        handle = None
        try:
            for name in self.prefix:
                mod = self.model.get_submodule(name)
                saved.append((mod, mod.__dict__.get("forward")))
                mod.forward = functools.partial(self._replay_forward, arity=self.arity.get(name, 0))
            if not self.whole_backbone:
                handle = self.model.get_submodule(self.target).register_forward_pre_hook(self._feed_target,
                                                                                       with_kwargs=True)
            yield
        finally:
            if handle is not None:
                handle.remove()
            for mod, old in saved:
                if old is None:
                    del mod.forward
                else:
                    mod.forward = old

    def _replay_forward(self, *args, arity: int = 0, **kwargs) -> Any:
        assert self.current is not None, "PrefixCache.batch() must be called before the forward"
        return self.current if arity == 0 else (self.current, *([None] * (arity - 1)))

    def _feed_target(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if args:
            return (self.current, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.current}

    def verify(self, name: str, inputs: dict[str, torch.Tensor], indices: Sequence[int], device: torch.device,
               rtol: float | None = None) -> bool:
        """True when the cached path gives the same logits as the real forward on these samples.

        The check is a relative error of the logits, ``‖real − cached‖ / ‖real‖ ≤ rtol``. The default ``rtol`` is
        1e-4 on CPU and 2e-2 on CUDA, where TF32 convolutions and batch-size-dependent kernels make the two forwards
        differ at the 1e-3 level although both are equally accurate; a prefix the cache cannot replay differs at
        order 1, or makes the cached forward fail (False as well).
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
            except Exception as e:  # noqa: BLE001 - a forward the replay breaks can fail in any way; the real one ran
                log.warning("prefix cache cannot replay this model's forward (%s: %s); training uncached",
                            type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
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
