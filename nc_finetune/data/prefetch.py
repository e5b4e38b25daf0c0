"""Batches prepared off the critical path: a background thread turns the next raw batches into tensors (decoding,
tokenising, resizing) while the current batch runs on the device, and pins them so the copy to a GPU is asynchronous.

Only deterministic preparation may run here: torch's global RNG is shared between threads, so a random augmentation
prepared in the background would draw in an order that depends on thread timing.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterable[T], prepare: Callable[[T], R], *, depth: int = 2, pin: bool = False) -> Iterator[R]:
    """Yield ``prepare(item)`` for every item, in order, computed up to ``depth`` items ahead in a worker thread.

    Args:
        items: The raw batches (or batch indices).
        prepare: Item -> prepared batch (tensors, or dicts/tuples of tensors), run in the worker thread.
        depth: How many prepared batches may wait (bounds the memory held ahead).
        pin: Pin every tensor of a prepared batch (page-locked memory), for asynchronous host-to-GPU copies.

    Raises:
        Whatever ``prepare`` raised, in the consuming thread, at the position of the failing item.
    """
    out: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(value: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                batch = prepare(item)
                if pin:
                    batch = pin_tensors(batch)
                if not put(batch):
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(_Failure(e))
            return
        put(_DONE)

    thread = threading.Thread(target=work, name="nc-finetune-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            value = out.get()
            if value is _DONE:
                return
            if isinstance(value, _Failure):
                raise value.error
            yield value
    finally:  # the consumer stopped early (or failed): let the worker exit
        stop.set()
        thread.join()


def pin_tensors(batch: Any) -> Any:
    """``batch`` with every CPU tensor in page-locked memory (dicts, tuples and lists are walked)."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory() if batch.device.type == "cpu" else batch
    if isinstance(batch, dict):
        return {k: pin_tensors(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(pin_tensors(v) for v in batch)
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of ``batch`` to ``device``; asynchronous for pinned tensors."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
