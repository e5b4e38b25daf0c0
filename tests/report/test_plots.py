"""The probe plot: which curves it draws, read back from the figure's lines (no pixels compared)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from nc_finetune.probe.result import ProbeResult
from nc_finetune.report import plots

NC1 = [4.0, 1.0, 0.25]


def _probe(num_classes: int, nc2: float) -> ProbeResult:
    layers = [{"index": i, "name": f"blocks.{i}", "is_block": True, "dim": 8, "num_params": 10, "nc1": v,
               "nc1_trace": v / 2, "cdnv": v / 4, "nc2": nc2, "ncc_accuracy": 0.9, "lp_accuracy": 0.8}
              for i, v in enumerate(NC1)]
    return ProbeResult(layers=layers, meta={"backbone": "b", "dataset": "d", "num_classes": num_classes})


def _plotted(result: ProbeResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[float]]:
    """Draw through plot_probe, keep the figure open, and return the log axis' curves by legend label."""
    kept: list[Figure] = []
    close = plt.close
    monkeypatch.setattr(plt, "close", kept.append)
    plots.plot_probe(result, tmp_path / "probe.png")
    (fig,) = kept
    try:
        log_ax = fig.axes[0]
        return {line.get_label(): [float(y) for y in line.get_ydata()] for line in log_ax.get_lines()}
    finally:
        close(fig)


def test_two_classes_leave_nc2_off_the_shared_log_axis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    curves = _plotted(_probe(num_classes=2, nc2=1e-16), tmp_path, monkeypatch)
    assert not any(label.startswith("NC2") for label in curves)
    assert curves["NC1  tr(Σ_W Σ_B⁺)/K"] == NC1
    assert min(min(ys) for ys in curves.values()) == pytest.approx(NC1[-1] / 4)  # CDNV is the lowest curve left


def test_more_classes_keep_nc2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    curves = _plotted(_probe(num_classes=3, nc2=0.5), tmp_path, monkeypatch)
    assert curves["NC2 (class-mean ETF distance)"] == [0.5] * 3
    assert curves["NC1  tr(Σ_W Σ_B⁺)/K"] == NC1
