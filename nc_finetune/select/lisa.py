"""LISA's layer draw (Pan et al., NeurIPS 2024): a uniform random subset of the blocks per interval.

The draw for interval ``j`` is the first ``γ`` entries of ``numpy.random.default_rng([seed, j]).permutation(n)``:
uniform over the γ-subsets, a pure function of (seed, j), so a resumed run redraws exactly what it drew before.
The ``lisa`` selection strategy ranks the blocks by the interval-0 permutation, so a block budget of γ selects the
blocks that ``adapt.method=lisa`` trains first.
"""

from __future__ import annotations

import numpy as np


def lisa_permutation(num_blocks: int, seed: int, interval: int) -> list[int]:
    """Block positions ``0..num_blocks-1`` in the seeded random order of one interval."""
    return [int(i) for i in np.random.default_rng([int(seed), int(interval)]).permutation(num_blocks)]


def lisa_draw(num_blocks: int, gamma: int, seed: int, interval: int) -> list[int]:
    """The ``gamma`` block positions trained during ``interval``, in forward order."""
    if not 1 <= gamma <= num_blocks:
        raise ValueError(f"LISA draws 1..{num_blocks} blocks, got {gamma}")
    return sorted(lisa_permutation(num_blocks, seed, interval)[:gamma])
