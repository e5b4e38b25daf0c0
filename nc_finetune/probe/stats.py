"""Streaming, additive sufficient statistics for the collapse metrics of one layer.

:class:`ClassStats` keeps per-class counts and sums, one pooled scatter matrix and per-class squared norms, all in
float64 and all relative to a per-layer ``shift`` (the mean of the first batch). Subtracting the shift before
accumulating protects the second moments against catastrophic cancellation when the features carry a large constant
offset. Features of extreme size (beyond 2^±64 after the shift, e.g. ×1e200 or ×1e-200) are also divided by a
power-of-two ``scale``, exactly, so that their second moments neither overflow nor underflow; features of ordinary
size keep ``scale = 1``. The statistics are additive: batches, processes (``all_reduce``) and saved partial runs
(``merge``) combine exactly.

:class:`FeatureReservoir` keeps a bounded, uniformly sampled subset of the raw features for the metrics that need
samples rather than moments (nearest-class-centre accuracy, a linear probe).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nc_finetune.errors import DataError

_F64 = torch.float64
_PLAIN_RANGE = (2.0**-64, 2.0**64)  # centred feature sizes that need no scale (their squares stay far from the limits)


def pow2_scale(size: torch.Tensor) -> torch.Tensor:
    """The power of two nearest to ``size`` (a float64 tensor of positive magnitudes); 1 where ``size`` is 0 or not
    finite. Dividing by a power of two is exact, so rescaled computations round exactly like unscaled ones."""
    ok = torch.isfinite(size) & (size > 0)
    return torch.where(ok, torch.exp2(torch.round(torch.log2(torch.where(ok, size, 1.0)))), 1.0)


class ClassStats:
    """Additive second-order statistics of the features of one layer, per class.

    All quantities are float64 and taken relative to ``shift`` and ``scale`` (x̃ = (x − shift) / scale):

    * ``counts`` (K,): samples per class;
    * ``sums`` (K, D): per-class Σ x̃;
    * ``scatter`` (D, D): Σ x̃ x̃^T pooled over all samples;
    * ``sq_norms`` (K,): per-class Σ ‖x̃‖²;
    * ``shift`` (D,): set from the mean of the first non-empty update;
    * ``scale`` (): 1, or a power of two set from the first non-empty update when its centred features are
      larger than 2^64 or smaller than 2^-64 in magnitude;
    * ``nonfinite``: number of samples skipped because a feature was NaN or infinite.

    The moment accessors (:meth:`class_means`, :meth:`within_cov`, ...) return the original units;
    :meth:`normalised` gives the statistics of x / scale, on which scale-invariant metrics are computed.

    Args:
        num_classes: K.
        dim: Feature dimension D.
        device: Where the statistics live; features passed to :meth:`update` are moved there.
    """

    def __init__(self, num_classes: int, dim: int, device: torch.device | str | None = None) -> None:
        if num_classes < 1 or dim < 1:
            raise ValueError(f"ClassStats needs num_classes >= 1 and dim >= 1, got {num_classes} and {dim}")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        kw = {"dtype": _F64, "device": self.device}
        # count, Σ(x − c) and Σ‖x − c‖² of each class side by side, so that a batch is added with one index_add_;
        # `counts`, `sums` and `sq_norms` are views of it
        self._per_class = torch.zeros(num_classes, dim + 2, **kw)  # (K, 1 + D + 1)
        self.scatter = torch.zeros(dim, dim, **kw)  # (D, D)
        self.shift = torch.zeros(dim, **kw)  # (D,)
        self.scale = torch.ones((), **kw)  # ()
        self.shift_set = False
        # A device tensor, so that update() never waits for the device; read it through `nonfinite`.
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)

    @property
    def counts(self) -> torch.Tensor:
        """Per-class sample counts n_k, (K,) (a view)."""
        return self._per_class[:, 0]

    @counts.setter
    def counts(self, value: torch.Tensor) -> None:
        self._per_class[:, 0] = value

    @property
    def sums(self) -> torch.Tensor:
        """Per-class sums of shifted features Σ(x − c), (K, D) (a view)."""
        return self._per_class[:, 1 : self.dim + 1]

    @sums.setter
    def sums(self, value: torch.Tensor) -> None:
        self._per_class[:, 1 : self.dim + 1] = value

    @property
    def sq_norms(self) -> torch.Tensor:
        """Per-class sums of squared norms Σ‖x − c‖², (K,) (a view)."""
        return self._per_class[:, self.dim + 1]

    @sq_norms.setter
    def sq_norms(self, value: torch.Tensor) -> None:
        self._per_class[:, self.dim + 1] = value

    # ------------------------------------------------------------------ accumulation

    @property
    def nonfinite(self) -> int:
        """Number of samples skipped because they had a non-finite feature."""
        return int(self._nonfinite.item())

    @property
    def total(self) -> float:
        """N, the number of accumulated (finite) samples."""
        return float(self.counts.sum().item())

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Accumulate one batch.

        Samples with a non-finite feature are counted in ``nonfinite`` and otherwise ignored. The update does not
        synchronise with the device, so it can run inside forward hooks. Labels are range-checked only when they
        arrive on the CPU (on an accelerator an out-of-range label trips a device assert instead).

        Args:
            features: (B, D) tensor of any floating dtype.
            labels: (B,) integer class labels in [0, K).

        Raises:
            ValueError: On shape mismatches.
            DataError: On labels out of range (CPU labels only).
        """
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must have shape (B, {self.dim}), got {tuple(features.shape)}")
        if labels.shape != (features.shape[0],):
            raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
        if features.shape[0] == 0:
            return
        if labels.device.type == "cpu":
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise DataError(f"labels must lie in [0, {self.num_classes}), got values in [{lo}, {hi}]")
        x = features.detach().to(device=self.device, dtype=_F64)  # (B, D)
        y = labels.detach().to(device=self.device, dtype=torch.long)  # (B,)
        finite = torch.isfinite(x).all(dim=1)  # (B,)
        if not self.shift_set:
            # Mean of the finite rows (0 if there are none) and, for extreme sizes, a scale; without a host sync.
            kept = torch.where(finite[:, None], x, 0.0)
            self.shift = kept.sum(0) / finite.sum().clamp(min=1)  # (D,)
            size = torch.where(finite[:, None], x - self.shift, 0.0).abs().amax()  # ()
            plain = (size >= _PLAIN_RANGE[0]) & (size <= _PLAIN_RANGE[1])
            self.scale = torch.where(plain, 1.0, pow2_scale(size))  # ()
            self.shift_set = True
        x = torch.where(finite[:, None], (x - self.shift) / self.scale, 0.0)  # (B, D); skipped rows add nothing
        rows = torch.cat([finite.to(_F64)[:, None], x, x.square().sum(1, keepdim=True)], dim=1)  # (B, 1 + D + 1)
        self._per_class.index_add_(0, y, rows)  # the same additions as three separate index_add_ calls
        self.scatter.addmm_(x.T, x)  # one (D, B) @ (B, D) matmul in float64
        self._nonfinite += (~finite).sum()

    def reshift(self, new_shift: torch.Tensor) -> ClassStats:
        """Re-express the statistics relative to ``new_shift`` (exact up to rounding). In place; returns self.

        With δ = (c_old − c_new) / scale and s = Σ (x − c_old) / scale:
        Σ x̃_new x̃_new^T = S + s δ^T + δ s^T + n δ δ^T.
        """
        new_shift = new_shift.detach().to(device=self.device, dtype=_F64).reshape(self.dim)  # (D,)
        if self.shift_set:
            delta = (self.shift - new_shift) / self.scale  # (D,)
            s = self.sums.sum(0)  # (D,)
            n = self.counts.sum()
            self.scatter += torch.outer(s, delta) + torch.outer(delta, s) + n * torch.outer(delta, delta)
            self.sq_norms += 2.0 * (self.sums @ delta) + self.counts * delta.dot(delta)  # uses the old sums
            self.sums += self.counts[:, None] * delta
        self.shift = new_shift.clone()
        self.shift_set = True
        return self

    def rescale(self, new_scale: torch.Tensor | float) -> ClassStats:
        """Re-express the statistics relative to ``new_scale`` (exact for powers of two). In place; returns self."""
        new_scale = torch.as_tensor(new_scale, dtype=_F64, device=self.device).reshape(())
        ratio = self.scale / new_scale  # ()
        self.sums *= ratio
        self.scatter *= ratio * ratio
        self.sq_norms *= ratio * ratio
        self.scale = new_scale.clone()
        return self

    def normalised(self) -> ClassStats:
        """The statistics of x / scale (scale 1; shares the accumulated tensors): ratios of moments, as in every
        collapse metric, are the same as on x, and stay finite for features of any size."""
        out = ClassStats(self.num_classes, self.dim, device=self.device)
        out.counts, out.sums, out.scatter, out.sq_norms = self.counts, self.sums, self.scatter, self.sq_norms
        out.shift, out.shift_set, out._nonfinite = self.shift / self.scale, self.shift_set, self._nonfinite
        return out

    def merge(self, other: ClassStats) -> ClassStats:
        """Add the statistics of ``other`` (left unchanged) into self. In place; returns self.

        Different shifts are handled exactly: ``other`` is re-expressed relative to self's shift first.
        """
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError(
                f"cannot merge ClassStats of shape (K={other.num_classes}, D={other.dim}) "
                f"into (K={self.num_classes}, D={self.dim})"
            )
        self._nonfinite += other._nonfinite.to(self.device)
        if not other.shift_set:
            return self  # other holds no samples
        if not self.shift_set:
            self.shift = other.shift.to(self.device).clone()
            self.scale = other.scale.to(self.device).clone()
            self.shift_set = True
        self.rescale(torch.maximum(self.scale, other.scale.to(self.device)))  # the larger scale cannot overflow
        tmp = ClassStats.from_state_dict(other.state_dict(), device=self.device).rescale(self.scale)
        tmp.reshift(self.shift)
        self.counts += tmp.counts
        self.sums += tmp.sums
        self.scatter += tmp.scatter
        self.sq_norms += tmp.sq_norms
        return self

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> ClassStats:
        """Sum the statistics over all processes of ``group``; a no-op when torch.distributed is not initialised.

        The ranks first agree on a common scale (the largest) and shift (the count-weighted mean of their shifts;
        ranks without samples take no part in it), re-express their statistics, then sum. Every rank ends up with
        the global statistics, so call this once. Returns self.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        scale = self.scale.clone()
        dist.all_reduce(scale, op=dist.ReduceOp.MAX, group=group)
        self.rescale(scale)
        n = self.counts.sum()
        buf = torch.cat([self.shift * n, n.reshape(1)])  # (D + 1,)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        if buf[-1] > 0:
            self.reshift(buf[:-1] / buf[-1])
        for t in (self._per_class, self.scatter, self._nonfinite):  # contiguous buffers, as collectives need
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return self

    # ------------------------------------------------------------------ derived quantities (float64)

    def _shifted_means(self) -> torch.Tensor:
        """Class means minus the shift, (K, D); NaN rows for empty classes."""
        return self.sums / self.counts[:, None]

    def _shifted_global_mean(self) -> torch.Tensor:
        """Global (sample-weighted) mean minus the shift, (D,)."""
        return self.sums.sum(0) / self.counts.sum()

    def to_frame(self, features: torch.Tensor) -> torch.Tensor:
        """Features in the frame of the statistics, (x − shift) / scale, float64 (B, D)."""
        return (features.detach().to(device=self.device, dtype=_F64) - self.shift) / self.scale

    def frame_class_means(self) -> torch.Tensor:
        """Class means in the frame of the statistics, (μ_k − shift) / scale, (K, D); NaN rows for empty classes."""
        return self._shifted_means()

    def class_means(self) -> torch.Tensor:
        """μ_k, (K, D); NaN rows for empty classes."""
        return self._shifted_means() * self.scale + self.shift

    def global_mean(self) -> torch.Tensor:
        """μ_G, the mean over all N samples, (D,)."""
        return self._shifted_global_mean() * self.scale + self.shift

    def centered_means(self) -> torch.Tensor:
        """M̄ as rows: μ_k − μ_G, (K, D). (The shift cancels, so no large offset enters the difference.)"""
        return (self._shifted_means() - self._shifted_global_mean()) * self.scale

    def within_cov(self) -> torch.Tensor:
        """Σ_W = (1/N) Σ_k Σ_i (h − μ_k)(h − μ_k)^T, (D, D)."""
        inv_n = torch.where(self.counts > 0, 1.0 / self.counts.clamp(min=1.0), 0.0)  # (K,); empty classes add 0
        cov = (self.scatter - self.sums.T @ (inv_n[:, None] * self.sums)) / self.counts.sum()  # (D, D)
        return 0.5 * (cov + cov.T) * self.scale.square()

    def between_cov(self) -> torch.Tensor:
        """Σ_B = (1/K) M̄ M̄^T (unweighted over classes), (D, D)."""
        m = self.centered_means()  # (K, D)
        return m.T @ m / self.num_classes

    def class_variances(self) -> torch.Tensor:
        """Per-class Var_k = E‖h − μ_k‖², (K,); NaN for empty classes."""
        m = self._shifted_means()  # (K, D)
        return (self.sq_norms / self.counts - m.square().sum(1)).clamp(min=0.0) * self.scale.square()

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors (suitable for ``torch.save``)."""
        return {
            "counts": self.counts.clone(),
            "sums": self.sums.clone(),
            "scatter": self.scatter.clone(),
            "sq_norms": self.sq_norms.clone(),
            "shift": self.shift.clone(),
            "scale": self.scale.clone(),
            "shift_set": torch.tensor(self.shift_set, device="cpu"),
            "nonfinite": self._nonfinite.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: torch.device | str | None = None) -> ClassStats:
        """Rebuild from :meth:`state_dict` output."""
        num_classes, dim = state["sums"].shape
        out = cls(num_classes, dim, device=device)
        for name in ("counts", "sums", "scatter", "sq_norms", "shift"):
            setattr(out, name, state[name].to(device=out.device, dtype=_F64).clone())
        if "scale" in state:  # statistics saved before scales existed have scale 1
            out.scale = state["scale"].to(device=out.device, dtype=_F64).clone()
        out.shift_set = bool(state["shift_set"])
        out._nonfinite = state["nonfinite"].to(device=out.device, dtype=torch.int64).clone()
        return out


class FeatureReservoir:
    """A bounded uniform sample of (feature, label) pairs of one layer (reservoir sampling, Algorithm R).

    Memory is ``capacity × D`` float32 whatever N is. The random choices come from a CPU ``torch.Generator`` seeded
    by ``seed`` and never depend on the feature values, so the content is deterministic for a given seed and batch
    sequence, and filling it needs no host sync. When ``capacity >= N`` it holds every sample, in order. Rows are
    stored as given (non-finite rows included): float64 features far from the origin or of extreme size should be
    given in the frame of their statistics (:meth:`ClassStats.to_frame`), where float32 keeps their class structure.

    Args:
        capacity: Maximum number of stored samples.
        seed: Seed of the sampling generator.
        device: Storage device; defaults to the device of the first batch.
    """

    def __init__(self, capacity: int, seed: int = 0, device: torch.device | str | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"FeatureReservoir capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.device = torch.device(device) if device is not None else None
        self.seen = 0  # samples offered so far
        self._gen = torch.Generator().manual_seed(int(seed))
        self._x: torch.Tensor | None = None  # (capacity, D) float32, allocated on the first add
        self._y: torch.Tensor | None = None  # (capacity,) int64

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Offer a batch of (B, D) features with (B,) labels."""
        if features.ndim != 2 or labels.shape != (features.shape[0],):
            raise ValueError(
                f"expected features (B, D) and labels (B,), got {tuple(features.shape)} and {tuple(labels.shape)}"
            )
        b = features.shape[0]
        if b == 0:
            return
        if self._x is None:
            self.device = self.device or features.device
            self._x = torch.empty(self.capacity, features.shape[1], dtype=torch.float32, device=self.device)
            self._y = torch.empty(self.capacity, dtype=torch.long, device=self.device)
        x = features.detach().to(device=self.device, dtype=torch.float32)  # (B, D)
        y = labels.detach().to(device=self.device, dtype=torch.long)  # (B,)

        # Phase 1: fill the empty slots in order.
        n_fill = min(b, max(self.capacity - self.seen, 0))
        if n_fill:
            self._x[self.seen : self.seen + n_fill] = x[:n_fill]
            self._y[self.seen : self.seen + n_fill] = y[:n_fill]
        # Phase 2: sample t (0-based) replaces slot j ~ U{0..t} if j < capacity.
        rest = b - n_fill
        if rest:
            # the draws come from a CPU generator, so that the sample does not depend on the device
            t = torch.arange(self.seen + n_fill, self.seen + b, dtype=_F64, device="cpu")  # (rest,)
            j = (torch.rand(rest, generator=self._gen, dtype=_F64, device="cpu") * (t + 1)).floor().long()  # (rest,)
            src = torch.arange(n_fill, b, device="cpu")[j < self.capacity]
            slot = j[j < self.capacity]
            # Several rows may hit the same slot: the later one wins, as in the sequential algorithm.
            last = {int(s): int(r) for s, r in zip(slot, src, strict=True)}
            if last:
                slot_t = torch.tensor(list(last.keys()), device=self.device)
                src_t = torch.tensor(list(last.values()), device=self.device)
                self._x[slot_t] = x[src_t]
                self._y[slot_t] = y[src_t]
        self.seen += b

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    @property
    def features(self) -> torch.Tensor:
        """Stored features, (n, D) float32 with n = min(seen, capacity)."""
        if self._x is None:
            return torch.empty(0, 0)
        return self._x[: len(self)]

    @property
    def labels(self) -> torch.Tensor:
        """Stored labels, (n,) int64."""
        if self._y is None:
            return torch.empty(0, dtype=torch.long)
        return self._y[: len(self)]

    def ncc_correct(self, class_means: torch.Tensor, chunk: int = 4096) -> tuple[int, int]:
        """Nearest-class-centre (Euclidean) predictions on the stored samples.

        Args:
            class_means: (K, D) class means (float64 recommended).
            chunk: Rows scored at a time (bounds memory at ``chunk × K``).

        Returns:
            (number of correct predictions, number of stored samples).
        """
        n = len(self)
        if n == 0:
            return 0, 0
        mu = class_means.detach().to(device=self.device, dtype=_F64)  # (K, D)
        centre = mu.mean(0)  # (D,); a common origin keeps the dot products small when features carry an offset
        mu_c = mu - centre  # (K, D)
        mu_sq = mu_c.square().sum(1)  # (K,)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for start in range(0, n, chunk):
            xc = self._x[start : min(start + chunk, n)].to(_F64) - centre  # (c, D)
            # argmin_k ‖x − μ_k‖² = argmin_k (‖μ_k‖² − 2 x·μ_k); ‖x‖² is common to all k.
            pred = (mu_sq[None, :] - 2.0 * xc @ mu_c.T).argmin(1)  # (c,)
            correct += (pred == self._y[start : min(start + chunk, n)]).sum()
        return int(correct.item()), n
