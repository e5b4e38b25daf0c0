"""ClassStats.all_reduce across two gloo processes on the CPU equals a single-process run on the concatenation."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nc_finetune.probe.metrics import metrics_from_stats
from nc_finetune.probe.stats import ClassStats

K, D, WORLD = 4, 6, 2


def _shards() -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per scenario, the (features, labels) of rank 0 and rank 1. Deterministic, so every process rebuilds them."""
    gen = torch.Generator().manual_seed(0)
    means = 2.0 * torch.randn(K, D, generator=gen, dtype=torch.float64)

    def sample(n: int, classes: list[int], offset: float) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=gen)]
        x = means[y] + torch.randn(n, D, generator=gen, dtype=torch.float64) + offset
        return x, y

    return {
        # Different class mixes (so different first-batch shifts), a common large offset, class 3 only on rank 1.
        "hetero": [sample(150, [0, 1, 2], 1e4), sample(90, [1, 2, 3], 1e4 + 7.0)],
        # Rank 1 has no data at all (its shift is never set).
        "empty_rank": [sample(120, [0, 1, 2, 3], -30.0), sample(0, [0], 0.0)],
        # Features of extreme size, a different power-of-two scale on each rank (they must agree on one).
        "scaled": [(x * f, y) for (x, y), f in zip((sample(100, [0, 1, 2, 3], 0.0), sample(80, [0, 1, 2, 3], 0.0)),
                                                  (1e30, 1e33), strict=True)],
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, shards in _shards().items():
            x, y = shards[rank]
            stats = ClassStats(K, D)
            for start in range(0, len(y), 32):
                stats.update(x[start : start + 32], y[start : start + 32])
            stats.all_reduce()
            results[name] = stats.state_dict()
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_matches_single_process(tmp_path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, shards in _shards().items():
        reduced = [ClassStats.from_state_dict(p[name]) for p in per_rank]
        for key, value in per_rank[0][name].items():  # every rank holds the same global statistics
            assert torch.equal(per_rank[1][name][key], value), (name, key)
        single = ClassStats(K, D)
        single.update(torch.cat([x for x, _ in shards]), torch.cat([y for _, y in shards]))
        got, want = metrics_from_stats(reduced[0]), metrics_from_stats(single)
        for key, value in want.items():
            assert math.isfinite(value)
            assert abs(got[key] - value) <= 1e-10 * abs(value), (name, key, got[key], value)
        for fn in ("class_means", "within_cov", "between_cov", "class_variances"):
            a, b = getattr(reduced[0], fn)(), getattr(single, fn)()
            assert float((a - b).abs().max()) <= 1e-10 * float(b.abs().max()), (name, fn)
        assert torch.equal(reduced[0].counts, single.counts)

