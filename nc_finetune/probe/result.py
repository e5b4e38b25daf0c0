"""ProbeResult: the per-layer collapse table plus provenance, with its JSON form (``probe.json``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nc_finetune.errors import UserError
from nc_finetune.utils.io import read_json_object, write_json_atomic

# Columns shown by `format_table`, in order: (key, header, format).
_TABLE_COLUMNS = (
    ("nc1", "NC1", "{:.4g}"),
    ("nc1_trace", "trace", "{:.4g}"),
    ("cdnv", "CDNV", "{:.4g}"),
    ("nc2", "NC2", "{:.3f}"),
    ("ncc_accuracy", "NCC acc", "{:.3f}"),
    ("lp_accuracy", "LP acc", "{:.3f}"),
)


@dataclass
class ProbeResult:
    """Collapse metrics for every tapped layer of one backbone on one dataset.

    Attributes:
        layers: One record per tapped layer in forward order, each with ``index``, ``name``, ``is_block``,
            ``dim``, ``num_params`` and the metric keys (``nc1``, ``nc1_trace``, ``cdnv``, ``nc2``,
            ``ncc_accuracy``, ...). NaN marks a degenerate layer.
        fit: Equi-separation fit of ``log nc1`` against block depth: ``rho`` (per-block decay factor), ``r2``.
        meta: Provenance: backbone, dataset, sample counts, seed, library versions, timing.
    """

    layers: list[dict[str, Any]]
    fit: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def metric(self, key: str, blocks_only: bool = True) -> list[float]:
        """Values of one metric across layers (NaN where missing)."""
        rows = self.blocks() if blocks_only else self.layers
        return [float(r.get(key, math.nan)) if r.get(key) is not None else math.nan for r in rows]

    def blocks(self) -> list[dict[str, Any]]:
        """The records of tunable blocks (drops the final pooled-feature tap)."""
        return [r for r in self.layers if r.get("is_block", True)]

    def to_dict(self) -> dict[str, Any]:
        return {**self.meta, "fit": self.fit, "layers": self.layers}

    def to_pandas(self):
        """The per-layer table as a ``pandas.DataFrame``: one row per tapped layer, one column per key."""
        try:
            import pandas as pd
        except ImportError:
            raise UserError("ProbeResult.to_pandas needs pandas: pip install pandas") from None
        return pd.DataFrame(self.layers)

    def __repr__(self) -> str:
        m = self.meta
        nc1 = [v for v in self.metric("nc1") if not math.isnan(v)]
        trend = f", nc1={nc1[0]:.4g}->{nc1[-1]:.4g}" if nc1 else ""
        fit = f", rho={self.fit['rho']:.3f}" if isinstance(self.fit.get("rho"), float) else ""
        return (f"ProbeResult(backbone={m.get('backbone')!r}, dataset={m.get('dataset')!r}, "
                f"samples={m.get('samples')}, layers={len(self.layers)}{trend}{fit})")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        meta = {k: v for k, v in d.items() if k not in ("fit", "layers")}
        layers = [{k: (math.nan if v is None and k not in _NON_METRIC else v) for k, v in r.items()}
                  for r in d["layers"]]
        return cls(layers=layers, fit=dict(d.get("fit", {})), meta=meta)

    def save(self, path: str | Path) -> Path:
        """Write ``probe.json`` atomically (NaN is stored as ``null``)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ProbeResult:
        """Read ``probe.json``.

        Raises:
            UserError: a missing or damaged file (one line naming it).
        """
        return read_json_object(path, cls.from_dict, "a probe.json written by nc-finetune")

    def format_table(self) -> str:
        """A plain-text per-layer table for the terminal."""
        cols = [c for c in _TABLE_COLUMNS if any(c[0] in r for r in self.layers)]
        header = ["#", "layer", "dim"] + [c[1] for c in cols]
        rows = []
        for r in self.layers:
            cells = [str(r["index"]) if r.get("is_block", True) else "-", r["name"] or "(output)", str(r["dim"])]
            for key, _, fmt in cols:
                v = r.get(key)
                cells.append("nan" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v))
            rows.append(cells)
        widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
        def fmt_row(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

        lines = [fmt_row(header)] + [fmt_row(row) for row in rows]
        if self.fit:
            lines.append(f"equi-separation fit of log NC1 over blocks: rho = {self.fit.get('rho', math.nan):.3f} "
                         f"per block, R^2 = {self.fit.get('r2', math.nan):.3f}")
        return "\n".join(lines)


_NON_METRIC = {"index", "name", "is_block", "dim", "num_params"}
