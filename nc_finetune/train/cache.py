"""Frozen-prefix cache: compute the frozen part of the network once, then train from its outputs.

When everything before the first trainable block is frozen, in eval mode and fed without augmentation, its output
is a fixed function of each sample. :class:`PrefixCache` runs that prefix once over a split, keeps the input of the
first trainable block per sample (trimmed to the real token length for text), and during training replaces the
prefix modules' ``forward`` so they return the cached tensor instead of recomputing it. Before use the cached path
is checked against the real forward on a batch; if they differ (an architecture with work between prefix modules
that the cache cannot replay) caching is switched off with a warning rather than training on wrong inputs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


def _trace_prefix(root: nn.Module, target: str, run: Callable[[], None]) -> list[str]:
    """Maximal modules that finish before ``target`` starts and are not its ancestors, in finishing order."""
    events: list[tuple[str, str]] = []
    handles = []
    target_mod = root.get_submodule(target)
    try:
        for name, m in root.named_modules():
            handles.append(m.register_forward_pre_hook(lambda mod, args, n=name: events.append(("start", n))))
            handles.append(m.register_forward_hook(lambda mod, args, out, n=name: events.append(("end", n))))

        def stop(mod, args):
            raise _Stop

        handles.append(target_mod.register_forward_pre_hook(stop))
        with contextlib.suppress(_Stop):
            run()
    finally:
        for h in handles:
            h.remove()
    ended = [n for kind, n in events if kind == "end"]
    ancestors = {n for n in ended if n == "" or target.startswith(n + ".")}
    cands = [n for n in ended if n not in ancestors]
    maximal = [n for n in cands if not any(c != n and n.startswith(c + ".") for c in cands)]
    seen: list[str] = []
    for n in maximal:
        if n not in seen:
            seen.append(n)
    return seen


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
            def hook(m, args):
                out["x"] = args[0]
                raise _Stop
            h = mod.register_forward_pre_hook(hook)
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
                if not self.prefix:
                    self.prefix = _trace_prefix(self.model, self.target, lambda b=inputs: self.model(**b))
                x = self._capture(inputs).cpu()
                cpu_inputs = {k: v.cpu() for k, v in inputs.items()}
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
        """Replace each prefix module's forward by one returning :attr:`current`."""
        saved = []
        for name in self.prefix:
            mod = self.model.get_submodule(name)
            saved.append((mod, mod.__dict__.get("forward")))
            mod.forward = self._replay_forward
        try:
            yield
        finally:
            for mod, old in saved:
                if old is None:
                    del mod.forward
                else:
                    mod.forward = old

    def _replay_forward(self, *args, **kwargs) -> torch.Tensor:
        assert self.current is not None, "PrefixCache.batch() must be called before the forward"
        return self.current

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
            with self.replay():
                cached = self.model(**cached_inputs).float()
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
