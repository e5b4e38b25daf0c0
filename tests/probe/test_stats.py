"""Streaming statistics: one-shot equivalence, merge/reshift algebra, large offsets, persistence, reservoir."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nc_finetune.errors import DataError
from nc_finetune.probe.metrics import metrics_from_stats
from nc_finetune.probe.stats import ClassStats, FeatureReservoir

from .reference import reference_moments

K, D = 5, 12


def _data(n: int = 400, seed: int = 0, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (n,), generator=gen)
    means = 3.0 * torch.randn(K, D, generator=gen, dtype=torch.float64)
    x = means[labels] + torch.randn(n, D, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 2.0, D)
    return x + offset, labels


def _one_shot(x: torch.Tensor, y: torch.Tensor) -> ClassStats:
    stats = ClassStats(K, D)
    stats.update(x, y)
    return stats


def _random_batches(x: torch.Tensor, y: torch.Tensor, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffle the samples, then cut them into batches of random sizes (empty batches included)."""
    rng = np.random.default_rng(seed)
    perm = torch.from_numpy(rng.permutation(len(y)))
    x, y = x[perm], y[perm]
    cuts = np.sort(rng.integers(0, len(y), size=30))
    bounds = [0, *cuts.tolist(), len(y)]
    return [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _assert_close(a: torch.Tensor, b, rtol: float = 1e-10) -> None:
    b = torch.as_tensor(b, dtype=torch.float64)
    scale = b.abs().max().clamp(min=1e-300)
    assert float((a - b).abs().max() / scale) < rtol


def _assert_same_moments(a: ClassStats, b: ClassStats, rtol: float = 1e-10) -> None:
    _assert_close(a.counts, b.counts, 0.0 + 1e-15)
    for name in ("class_means", "global_mean", "centered_means", "within_cov", "between_cov", "class_variances"):
        _assert_close(getattr(a, name)(), getattr(b, name)(), rtol)


def test_moments_match_reference() -> None:
    x, y = _data(offset=7.0)
    stats = _one_shot(x, y)
    ref = reference_moments(x.numpy(), y.numpy(), K)
    assert stats.counts.tolist() == np.bincount(y.numpy(), minlength=K).tolist()
    _assert_close(stats.class_means(), ref["class_means"])
    _assert_close(stats.global_mean(), ref["global_mean"])
    _assert_close(stats.within_cov(), ref["within_cov"])
    _assert_close(stats.between_cov(), ref["between_cov"])
    _assert_close(stats.class_variances(), ref["variances"])
    assert torch.equal(stats.within_cov(), stats.within_cov().T)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_streaming_equals_one_shot(dtype: torch.dtype) -> None:
    x, y = _data(seed=1, offset=-4.0)
    x = x.to(dtype)
    one = _one_shot(x, y)
    streamed = ClassStats(K, D)
    for xb, yb in _random_batches(x, y, seed=2):
        streamed.update(xb, yb)
    _assert_same_moments(streamed, one)
    m1, m2 = metrics_from_stats(streamed), metrics_from_stats(one)
    assert all(abs(m1[key] - m2[key]) <= 1e-10 * abs(m2[key]) for key in m2)


def test_merge_equals_concatenation() -> None:
    xa, ya = _data(300, seed=3, offset=100.0)
    xb, yb = _data(200, seed=4, offset=-50.0)  # a different shift
    xb, yb = xb[yb != 0], yb[yb != 0]  # and a class that only `a` has
    a, b = _one_shot(xa, ya), _one_shot(xb, yb)
    b_before = b.state_dict()
    assert not torch.equal(a.shift, b.shift)
    merged = a.merge(b)
    assert merged is a
    _assert_same_moments(a, _one_shot(torch.cat([xa, xb]), torch.cat([ya, yb])))
    assert all(torch.equal(b_before[key], value) for key, value in b.state_dict().items())  # other untouched


def test_merge_with_empty_stats() -> None:
    x, y = _data(seed=5)
    empty = ClassStats(K, D)
    a = _one_shot(x, y).merge(empty)
    _assert_same_moments(a, _one_shot(x, y))
    b = ClassStats(K, D).merge(_one_shot(x, y))
    _assert_same_moments(b, _one_shot(x, y))
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(ClassStats(K + 1, D))


def test_reshift_is_exact() -> None:
    x, y = _data(seed=6, offset=2.0)
    new_shift = torch.linspace(-3.0, 5.0, D, dtype=torch.float64)
    direct = ClassStats(K, D).reshift(new_shift)  # fixed shift before any data
    direct.update(x, y)
    moved = _one_shot(x, y).reshift(new_shift)
    assert torch.equal(moved.shift, direct.shift)
    for name in ("sums", "scatter", "sq_norms"):
        _assert_close(getattr(moved, name), getattr(direct, name))
    _assert_same_moments(moved, _one_shot(x, y))


def test_invariant_to_large_constant_offset() -> None:
    x, y = _data(seed=7)
    plain = metrics_from_stats(_one_shot(x, y))
    for xb, yb in [(x + 1e6, y), (x - 1e6 * torch.linspace(0.5, 1.5, D, dtype=torch.float64), y)]:
        stats = ClassStats(K, D)
        for batch in _random_batches(xb, yb, seed=8):
            stats.update(*batch)
        shifted = metrics_from_stats(stats)
        for key in ("nc1", "nc1_trace", "sep_fuzziness", "cdnv", "nc2"):
            assert abs(shifted[key] - plain[key]) <= 1e-8 * abs(plain[key]), key
        _assert_close(stats.within_cov(), _one_shot(x, y).within_cov(), 1e-8)


@pytest.mark.parametrize("factor", [1e200, 1e-200])
def test_features_of_extreme_size_are_scaled_exactly(factor: float) -> None:
    """×1e200 would overflow the second moments, ×1e-200 underflow them: a power-of-two scale keeps them finite, and
    the moments of the normalised statistics are those of the unscaled features divided by the scale."""
    x, y = _data(seed=17, offset=3.0)
    plain = _one_shot(x, y)
    big = ClassStats(K, D)
    for batch in _random_batches(x * factor, y, seed=18):
        big.update(*batch)
    scale = float(big.scale)
    assert scale != 1.0 and scale == 2.0 ** round(np.log2(scale))
    assert bool(torch.isfinite(big.scatter).all()) and float(big.sq_norms.min()) > 0
    _assert_close(big.class_means(), plain.class_means() * factor)
    _assert_close(big.normalised().within_cov(), plain.within_cov() * (factor / scale) ** 2)
    m_big, m_plain = metrics_from_stats(big), metrics_from_stats(plain)
    assert all(abs(m_big[key] - m_plain[key]) <= 1e-10 * abs(m_plain[key]) for key in m_plain)


def test_ordinary_features_keep_scale_one() -> None:
    x, y = _data(seed=19)
    for factor in (1e-12, 1.0, 1e12):
        assert float(_one_shot(x * factor, y).scale) == 1.0


def test_merge_of_different_scales_equals_concatenation() -> None:
    xa, ya = _data(300, seed=20)
    xb, yb = _data(200, seed=21)
    xa, xb = xa * 1e200, xb * 3e202  # first batches of different sizes: different scales
    a, b = _one_shot(xa, ya), _one_shot(xb, yb)
    assert float(a.scale) != float(b.scale)
    a.merge(b)
    both = _one_shot(torch.cat([xa, xb]), torch.cat([ya, yb]))
    _assert_close(a.class_means(), both.class_means())
    _assert_close(a.normalised().within_cov() * float(a.scale / both.scale) ** 2, both.normalised().within_cov())
    m_a, m_both = metrics_from_stats(a), metrics_from_stats(both)
    assert all(abs(m_a[key] - m_both[key]) <= 1e-9 * abs(m_both[key]) for key in m_both)


def test_state_saved_before_scales_existed_loads_with_scale_one() -> None:
    x, y = _data(seed=22)
    state = _one_shot(x, y).state_dict()
    del state["scale"]
    back = ClassStats.from_state_dict(state)
    assert float(back.scale) == 1.0
    _assert_same_moments(back, _one_shot(x, y))


def test_nonfinite_samples_are_skipped() -> None:
    x, y = _data(seed=9)
    bad = x.clone()
    bad[3, 0], bad[10, 5], bad[11] = float("nan"), float("inf"), float("-inf")
    stats = ClassStats(K, D)
    stats.update(bad[:2], y[:2])
    stats.update(bad[2:], y[2:])
    assert stats.nonfinite == 3
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[[3, 10, 11]] = False
    _assert_same_moments(stats, _one_shot(x[keep], y[keep]))


def test_first_batch_all_nonfinite() -> None:
    x, y = _data(seed=10)
    stats = ClassStats(K, D)
    stats.update(torch.full((3, D), float("nan")), y[:3])
    stats.update(x, y)
    assert stats.nonfinite == 3
    _assert_same_moments(stats, _one_shot(x, y))


def test_state_dict_round_trip(tmp_path) -> None:
    x, y = _data(seed=11)
    stats = _one_shot(x, y)
    stats.update(torch.full((1, D), float("nan")), y[:1])
    torch.save(stats.state_dict(), tmp_path / "s.pt")
    back = ClassStats.from_state_dict(torch.load(tmp_path / "s.pt"))
    assert back.nonfinite == 1 and back.shift_set
    for key, value in stats.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)


def test_all_reduce_is_noop_without_distributed() -> None:
    x, y = _data(seed=12)
    stats = _one_shot(x, y)
    before = stats.state_dict()
    assert stats.all_reduce() is stats
    assert all(torch.equal(before[key], value) for key, value in stats.state_dict().items())


def test_update_validates_input() -> None:
    stats = ClassStats(K, D)
    with pytest.raises(DataError, match=r"\[0, 5\)"):
        stats.update(torch.zeros(2, D), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="features"):
        stats.update(torch.zeros(2, D + 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        stats.update(torch.zeros(2, D), torch.tensor([0, 1, 2]))
    stats.update(torch.zeros(0, D), torch.zeros(0, dtype=torch.long))
    assert not stats.shift_set and stats.total == 0.0


def test_low_precision_inputs() -> None:
    x, y = _data(seed=13)
    for dtype in (torch.float16, torch.bfloat16):
        stats = _one_shot(x.to(dtype), y)
        _assert_same_moments(stats, _one_shot(x.to(dtype).double(), y))


# ---------------------------------------------------------------------------------------------- reservoir


def _feed(res: FeatureReservoir, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
    for start in range(0, len(y), batch):
        res.add(x[start : start + batch], y[start : start + batch])


def test_reservoir_keeps_everything_when_large_enough() -> None:
    x, y = _data(100, seed=14)
    res = FeatureReservoir(capacity=100, seed=0)
    _feed(res, x, y, batch=7)
    assert torch.equal(res.features, x.float()) and torch.equal(res.labels, y)
    big = FeatureReservoir(capacity=1000)
    _feed(big, x, y, batch=33)
    assert len(big) == 100 and torch.equal(big.features, x.float())


def test_reservoir_is_bounded_and_deterministic() -> None:
    x, y = _data(1000, seed=15)
    x[:, 0] = torch.arange(1000, dtype=torch.float64)  # make every row identifiable

    def run(seed: int) -> FeatureReservoir:
        res = FeatureReservoir(capacity=64, seed=seed)
        _feed(res, x, y, batch=50)
        return res

    a, b, c = run(0), run(0), run(1)
    assert len(a) == 64 and a.features.shape == (64, D) and a.seen == 1000
    assert a._x.shape == (64, D)  # storage never grows
    assert torch.equal(a.features, b.features) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.features, c.features)
    rows = a.features[:, 0].long()  # which rows were kept
    assert torch.equal(a.features, x[rows].float())
    assert torch.equal(a.labels, y[rows]) and len(set(rows.tolist())) == 64  # pairs stay intact, no duplicates


def test_reservoir_sampling_is_uniform() -> None:
    # Every item must be kept with probability capacity/N, whatever its position and the batch sizes.
    n, cap, trials = 20, 5, 400
    x = torch.arange(n, dtype=torch.float32)[:, None]
    y = torch.zeros(n, dtype=torch.long)
    hits = torch.zeros(n)
    for t in range(trials):
        res = FeatureReservoir(capacity=cap, seed=t)
        _feed(res, x, y, batch=7)  # several replacements per batch
        hits[res.features[:, 0].long()] += 1
    freq = hits / trials  # each ≈ 0.25 ± 0.022
    assert float((freq - cap / n).abs().max()) < 0.1


def test_ncc_correct_matches_bruteforce() -> None:
    x, y = _data(300, seed=16, offset=1e3)
    gen = torch.Generator().manual_seed(0)
    x = x + 4.0 * torch.randn(x.shape, generator=gen, dtype=torch.float64)  # enough noise for some mistakes
    res = FeatureReservoir(capacity=300)
    _feed(res, x, y, batch=64)
    means = _one_shot(x, y).class_means()
    correct, total = res.ncc_correct(means, chunk=37)
    xs = res.features.double()
    dist = ((xs[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    assert total == 300 and correct == int((dist.argmin(1) == y).sum())
    assert 0 < correct < 300


def test_ncc_ignores_the_unfilled_part_of_the_reservoir():
    # A reservoir larger than the stream must score only the samples it holds, whatever the spare rows contain.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 5, generator=g)
    y = torch.arange(12) % 3
    res = FeatureReservoir(capacity=100)
    res.add(x, y)
    means = torch.stack([x[y == k].mean(0) for k in range(3)]).double()
    res._x[12:] = 1e3  # garbage that a bug reading past the stored rows would score as correct
    res._y[12:] = torch.cdist(torch.full((1, 5), 1e3, dtype=torch.float64), means).argmin()
    pred = torch.cdist(x.double(), means).argmin(1)
    assert res.ncc_correct(means) == (int((pred == y).sum()), 12)
