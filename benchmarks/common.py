"""Helpers shared by the benchmark studies: machine description, Markdown tables, statistics, atomic JSON output.

Imported as a sibling module (``from common import ...``): the scripts are run as files
(``python benchmarks/<name>.py``), which puts this directory first on ``sys.path``.
"""

from __future__ import annotations

import math
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_OUT_DIR = BENCH_DIR / "out"


def default_out(name: str) -> Path:
    """Default JSON path of a benchmark: ``benchmarks/out/<name>.json``."""
    return DEFAULT_OUT_DIR / f"{name}.json"


def command_line() -> str:
    """The exact command line of this process, shell-quoted (interpreter included)."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return shlex.join(argv)


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (falls back to :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: CPU, cores, torch threads, GPU, library versions."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_usable": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        from nc_finetune.utils.env import library_versions

        info["versions"] = library_versions()
    except ImportError:  # pragma: no cover - the package is installed in the venv
        pass
    return info


def print_header(title: str, info: dict[str, Any], cmd: str) -> None:
    """Print the benchmark title, the machine and the command line (Markdown)."""
    print(f"## {title}\n")
    gpu = info.get("gpu") or "none (CUDA unavailable)"
    print(f"- machine: {info['cpu']}; {info['cores_usable']} usable cores ({info['cores_logical']} logical); "
          f"torch threads {info['torch_threads']}; GPU: {gpu}")
    print(f"- torch {info['torch']}, python {info['python']}, {info['platform']}")
    print(f"- command: `{cmd}`\n")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """Render a GitHub-flavoured Markdown table.

    Args:
        headers: Column titles.
        rows: Cells (converted with ``str``).
        align: Per column ``"l"`` or ``"r"`` (default: first column left, the rest right).

    Returns:
        The table text, one line per row, no trailing newline.
    """
    align = align or ["l"] + ["r"] * (len(headers) - 1)
    cells = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def fmt(row: Sequence[str]) -> str:
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align, strict=True)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join((":" + "-" * (w + 1)) if a == "l" else ("-" * (w + 1) + ":")
                          for w, a in zip(widths, align, strict=True)) + "|"
    return "\n".join([fmt(headers), rule] + [fmt(r) for r in cells])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs are dropped (all NaN -> NaN, NaN)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_stat(values: Sequence[float], spec: str = ".2f", suffix: str = "") -> str:
    """``mean`` for one value (or several equal ones), ``mean ± std`` otherwise, ``n/a`` when nothing is finite.

    Args:
        values: The samples (``None`` / NaN ignored).
        spec: Format spec of the mean (a ``+`` sign flag is not applied to the std).
        suffix: Appended after the last number (e.g. ``"x"``).
    """
    vals = [v for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return "n/a"
    m, s = mean_std(vals)
    if len(set(vals)) == 1:
        return f"{m:{spec}}{suffix}"
    return f"{m:{spec}} ± {s:{spec.replace('+', '')}}{suffix}"


def median(values: Sequence[float]) -> float:
    """Median, NaN for an empty sequence."""
    return statistics.median(values) if values else math.nan


def safe_ratio(a: float | None, b: float | None) -> float:
    """``a / b``, NaN when either is missing or ``b`` is not positive."""
    if a is None or b is None or not b > 0 or math.isnan(a):
        return math.nan
    return a / b


def check(ok: bool | None) -> str:
    """A pass / fail / unknown mark for a target column."""
    if ok is None:
        return "?"
    return "PASS" if ok else "FAIL"


def start_study(title: str) -> tuple[dict[str, Any], str]:
    """Print a study's header (title, machine, command line); return the machine description and the command line."""
    info, cmd = machine_info(), command_line()
    print_header(title, info, cmd)
    return info, cmd


def finish_figure(fig: Any, title: str, path: Path) -> Path:
    """A study figure's end: its title, a tight layout and the PNG, written atomically."""
    from nc_finetune.report.plots import save_figure

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def write_results(path: Path, payload: dict[str, Any]) -> Path:
    """Write the raw results as JSON atomically (NaN/inf become ``null``)."""
    from nc_finetune.utils.io import write_json_atomic

    return write_json_atomic(path, payload)


def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """``a[s] - b[s]`` for every seed in both."""
    return [a[s] - b[s] for s in sorted(a) if s in b]


def wtl(diffs: list[float], tol: float = 1e-9) -> str:
    """Wins-ties-losses of paired differences, e.g. ``2-0-1``."""
    w = sum(d > tol for d in diffs)
    t = sum(abs(d) <= tol for d in diffs)
    return f"{w}-{t}-{len(diffs) - w - t}"


def accuracies(runs: dict[int, dict[str, Any]]) -> dict[int, float]:
    """Test accuracy in % per seed."""
    return {s: 100 * r["test_accuracy"] for s, r in runs.items()}
