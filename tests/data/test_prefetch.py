"""The background prefetcher: same batches in the same order, errors surface where they happened, an early stop
ends the worker thread."""

from __future__ import annotations

import threading

import pytest
import torch

from nc_finetune.data.prefetch import prefetch, to_device


def test_prefetch_yields_every_prepared_item_in_order() -> None:
    seen_threads = set()

    def prepare(i: int) -> dict[str, torch.Tensor]:
        seen_threads.add(threading.current_thread().name)
        return {"x": torch.full((2,), float(i))}

    out = [b["x"][0].item() for b in prefetch(range(7), prepare, depth=2)]
    assert out == [float(i) for i in range(7)]
    assert seen_threads == {"nc-finetune-prefetch"}  # prepared off the consuming thread


def test_prefetch_reraises_at_the_failing_item() -> None:
    def prepare(i: int) -> int:
        if i == 3:
            raise ValueError("bad item 3")
        return i

    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for v in prefetch(range(6), prepare):
            got.append(v)
    assert got == [0, 1, 2]


def test_an_early_stop_ends_the_worker() -> None:
    stream = prefetch(range(1000), lambda i: i, depth=1)
    assert next(stream) == 0
    stream.close()
    assert not any(t.name == "nc-finetune-prefetch" for t in threading.enumerate())


def test_to_device_keeps_structure() -> None:
    batch = ({"a": torch.ones(2)}, torch.zeros(1), None)
    moved = to_device(batch, torch.device("cpu"))
    assert isinstance(moved, tuple) and torch.equal(moved[0]["a"], torch.ones(2)) and moved[2] is None
