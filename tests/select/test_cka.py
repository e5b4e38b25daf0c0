"""Linear CKA against its closed forms and a numpy brute force; the ``cka`` strategy on a backbone whose answer is
known (a block that only rotates its input, a block that replaces it by noise); the pass on a real HF model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from nc_finetune.backbones.base import Backbone, make_block_infos
from nc_finetune.data import Split
from nc_finetune.errors import ConfigError, DataError
from nc_finetune.select import select_blocks
from nc_finetune.select.cka import block_cka, linear_cka
from nc_finetune.select.strategies import rank_cka


def _brute_cka(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC form with the centring matrix H = I - 11ᵀ/N and linear kernels (Kornblith et al., eq. 3-4)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h)) / (n - 1) ** 2

    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


@pytest.mark.parametrize(("n", "d1", "d2"), [(20, 5, 7), (10, 30, 4), (50, 3, 3)])  # feature and Gram paths
def test_linear_cka_matches_brute_force(n: int, d1: int, d2: int) -> None:
    rng = np.random.default_rng(n + d1)
    x = rng.normal(size=(n, d1)) + 5.0
    y = np.tanh(x @ rng.normal(size=(d1, d2))) + 0.3 * rng.normal(size=(n, d2))
    assert linear_cka(x, y) == pytest.approx(_brute_cka(x, y), rel=1e-10)
    assert linear_cka(torch.tensor(x), torch.tensor(y)) == pytest.approx(_brute_cka(x, y), rel=1e-10)


def test_linear_cka_closed_forms() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)  # orthogonal transform
    assert linear_cka(x, 7.5 * x + 3.0) == pytest.approx(1.0, abs=1e-12)  # isotropic scaling (and a shift)
    y = rng.normal(size=(100, 4))
    assert linear_cka(0.01 * x, 300.0 * y) == pytest.approx(linear_cka(x, y), rel=1e-12)
    noise = np.random.default_rng(1)
    a, b = noise.normal(size=(4000, 3)), noise.normal(size=(4000, 3))
    assert linear_cka(a, b) < 0.01  # independent: E[CKA] ~ d1·d2/N
    # Anisotropic scaling is not an invariance: the rule sees it as a change.
    assert linear_cka(x, x * np.array([1, 1, 1, 1, 1, 50.0])) < 0.9
    assert math.isnan(linear_cka(np.ones((5, 2)), rng.normal(size=(5, 2))))
    with pytest.raises(DataError):
        linear_cka(x, y[:50])


class _Rotate(nn.Module):
    def __init__(self, d: int, seed: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
        self.q = nn.Parameter(q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * x @ self.q


class _Noise(nn.Module):
    """Output independent of the input (seeded, so the test is deterministic)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.gen) + 0 * self.w


class _Toy(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(nn.Sequential(nn.Linear(d, d), nn.Tanh()), _Rotate(d, 1), _Noise(d),
                                    nn.Sequential(nn.Linear(d, d), nn.Tanh()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def _toy_backbone() -> Backbone:
    model = _Toy().eval()
    names = [f"blocks.{i}" for i in range(4)]
    return Backbone(spec="toy", model=model, modality="image", blocks=make_block_infos(model, names), feature_dim=8,
                    pooling="mean", final_tap=None,
                    preprocess=lambda raw, train=False: {"x": torch.as_tensor(np.asarray(raw), dtype=torch.float32)})


def test_cka_strategy_finds_the_block_that_replaces_its_input() -> None:
    bb = _toy_backbone()
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    split = Split(list(x), np.zeros(300, dtype=np.int64))
    cka = block_cka(bb, split, batch_size=64, max_samples=256, device="cpu")
    assert cka[1] == pytest.approx(1.0, abs=1e-6)  # a scaled rotation changes nothing CKA can see
    assert cka[2] < 0.05  # noise: nothing of the input is left
    assert 0.2 < cka[0] < 1.0 and 0.2 < cka[3] < 1.0
    sel = select_blocks(None, bb.blocks, strategy="cka", cka_scores=cka, max_blocks=1)
    assert sel.indices == [2]
    assert sel.ranking[0] == 2 and sel.ranking[-1] == 1
    assert sel.scores[2] == pytest.approx(1.0 - cka[2])
    assert "cka" in sel.rationale and "2: " in sel.rationale
    assert "lowest linear CKA" in sel.explain()
    # The pass leaves no hook and keeps the model's mode.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in bb.model.modules())


def test_rank_cka_input_errors_and_nan() -> None:
    bb = _toy_backbone()
    with pytest.raises(ConfigError, match="cka_scores"):
        select_blocks(None, bb.blocks, strategy="cka")
    with pytest.raises(ConfigError, match="missing"):
        rank_cka(bb.blocks, {0: 0.5})
    r = rank_cka(bb.blocks, {0: 0.5, 1: float("nan"), 2: 0.9, 3: 0.5})
    assert r.order == [3, 0, 2, 1] and r.scores[1] == -math.inf
    with pytest.raises(ConfigError, match="cka_samples"):
        block_cka(bb, Split([np.zeros(8)] * 3, np.zeros(3, dtype=np.int64)), max_samples=1)


def test_block_cka_on_a_transformer(bert_dir, text_data) -> None:
    pytest.importorskip("transformers")
    from tests.conftest import load_bert

    bb = load_bert(bert_dir)
    cka = block_cka(bb, text_data["train"], batch_size=8, max_samples=12, device="cpu")
    assert set(cka) == {b.index for b in bb.blocks}
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in cka.values())
