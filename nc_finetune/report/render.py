"""A self-contained Markdown report (``report.md`` plus the PNGs it shows) for a probe, run, rank or UFM directory.

What is rendered depends on the files found (each piece is optional, missing ones are skipped):

* ``probe.json`` (``probe.png``): header, per-layer collapse table and the probe plot (regenerated if missing);
* ``selection.json`` (or ``summary.json``'s ``selection``): the chosen blocks, parameter counts and the rationale;
* ``metrics.jsonl``: ``training.png`` (loss against step, val/test accuracy per epoch) and the evaluation table;
* ``summary.json``: costs (accuracy, trainable parameters, time, peak memory, prefix cache);
* ``rank.json`` (``rank.png``): the candidate rows and the per-score rank correlations τ / τ_w;
* ``ufm.json`` (``ufm.png``): the unconstrained feature model, closed form against reached values.

Non-finite or missing numbers are shown as ``nan``. Every file is written atomically.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from nc_finetune import runs
from nc_finetune.errors import UserError
from nc_finetune.utils.io import atomic_write, write_text_atomic

#: Files whose presence makes a directory renderable.
MARKERS = (runs.PROBE, runs.SUMMARY, runs.RANK, runs.SWEEP, runs.UFM)

# Per-layer columns after index/name/dim: (key, format), shown when any layer has the key.
_LAYER_COLUMNS = (
    ("nc1", ".4g"),
    ("nc1_trace", ".4g"),
    ("cdnv", ".4g"),
    ("nc2", ".4g"),
    ("ncc_accuracy", ".3f"),
    ("lp_accuracy", ".3f"),
)

_CORRELATION_HEADERS = {"tau": "τ", "tau_w": "τ_w"}


def render_report(run_dir: Path, out: Path | None = None) -> Path:
    """Render ``report.md`` for a probe, run, rank or UFM directory.

    Args:
        run_dir: The directory holding the artefacts (``probe.json``, ``summary.json``, ``rank.json`` or
            ``ufm.json``, plus whatever else is there).
        out: Where to write: a directory (``report.md`` and the PNGs go into it; PNGs already in ``run_dir`` are
            copied so the page is self-contained), or a path ending in ``.md`` (the report itself, PNGs next to it).
            Defaults to ``run_dir``.

    Returns:
        The path of the written ``report.md``.

    Raises:
        UserError: ``run_dir`` is not a directory, holds none of the marker files, or holds an unreadable JSON file.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory")
    if not any((run_dir / m).is_file() for m in MARKERS):
        raise UserError(f"{run_dir} is not a probe, run, rank, sweep or ufm directory "
                        f"(expected {', '.join(MARKERS[:-1])} or {MARKERS[-1]})")
    if out is None:
        report = run_dir / "report.md"
    else:
        out = Path(out)
        report = out if out.suffix.lower() == ".md" else out / "report.md"
    probe = _load_probe(run_dir / runs.PROBE)
    summary = _load_json(run_dir / runs.SUMMARY)
    selection = _load_json(run_dir / runs.SELECTION) or (summary or {}).get("selection")
    if not isinstance(selection, Mapping):
        selection = None
    rank = _load_json(run_dir / runs.RANK)
    sweep = _load_json(run_dir / runs.SWEEP)
    ufm = _load_json(run_dir / runs.UFM)
    metrics_path = run_dir / runs.METRICS
    metrics = _load_jsonl(metrics_path) if metrics_path.is_file() else None
    page = _Page(run_dir, report.parent)
    page.dest.mkdir(parents=True, exist_ok=True)

    lines = _header(run_dir, probe, summary, rank, ufm, sweep)
    if sweep is not None:
        lines += _sweep_section(page, sweep)
    if probe is not None:
        lines += _probe_section(page, probe, selection)
    if selection:
        lines += _selection_section(selection, trained=summary is not None and "trainable_params" in summary)
    if metrics is not None:
        lines += _training_section(page, *metrics)
    if summary is not None:
        lines += _costs_section(summary)
        lines += _class_metrics_section(summary, probe.meta.get("class_names") if probe is not None else None)
    if rank is not None:
        lines += _rank_section(page, rank)
    if ufm is not None:
        lines += _ufm_section(page, ufm)
    return write_text_atomic(report, "\n".join(lines).rstrip("\n") + "\n")


# ---------------------------------------------------------------------------------------------------------- sections


class _Page:
    """Where the report goes and how its images get there."""

    def __init__(self, run_dir: Path, dest: Path) -> None:
        self.run_dir = run_dir
        self.dest = dest

    def same_dir(self) -> bool:
        return self.run_dir.resolve() == self.dest.resolve()

    def existing_image(self, name: str) -> bool:
        """Make ``run_dir/name`` available next to the report; False if there is no such image."""
        src = self.run_dir / name
        if not src.is_file():
            return False
        if not self.same_dir():
            atomic_write(self.dest / name, lambda tmp: shutil.copyfile(src, tmp))
        return True


def _header(run_dir: Path, probe: Any, summary: dict | None, rank: dict | None, ufm: dict | None,
            sweep: dict | None = None) -> list[str]:
    kinds = ["sweep"] if sweep is not None else []
    if summary is not None:
        kinds.append("run")
    elif (run_dir / runs.METRICS).is_file():
        kinds.append("run (unfinished: no summary.json)")
    elif probe is not None:
        kinds.append("probe")
    if rank is not None:
        kinds.append("rank")
    if ufm is not None:
        kinds.append("ufm")
    meta = dict(probe.meta) if probe is not None else {}
    s = summary or {}
    recipe = _load_yaml(run_dir / runs.RESOLVED)
    backbone = s.get("backbone") or meta.get("backbone") or _dig(recipe, "backbone", "name") or (rank or {}).get(
        "backbone") or (sweep or {}).get("backbone")
    dataset = s.get("dataset") or meta.get("dataset") or _dig(recipe, "data", "name") or (rank or {}).get("dataset")
    lines = [f"# nc-finetune report: `{run_dir.name or run_dir}`", "", f"- kind: {' + '.join(kinds)}"]
    if backbone:
        lines.append(f"- backbone: `{backbone}`")
    init_from, cut = _dig(recipe, "backbone", "init_from"), _dig(recipe, "backbone", "truncate_at")
    if init_from:
        lines.append(f"- started from the weights of run `{init_from}`")
    if cut is not None:
        lines.append(f"- truncated after block `{cut}`")
    if dataset:
        corruption = _dig(recipe, "data", "corruption")
        shift = f" corrupted by `{corruption}` (severity {_dig(recipe, 'data', 'corruption_severity')})" \
            if corruption else ""
        lines.append(f"- dataset: `{dataset}`{shift}")
    if probe is not None:
        counts = meta.get("class_counts")
        detail = f" (per class: {', '.join(str(c) for c in counts)})" if isinstance(counts, list) and counts else ""
        lines.append(f"- probe samples: {_fmt(meta.get('samples'))}{detail}, classes: {_fmt(meta.get('num_classes'))}"
                     + (f", pooling: {meta['pooling']}" if meta.get("pooling") else ""))
    if "train_samples" in s or "test_samples" in s:
        lines.append(f"- train samples: {_fmt(s.get('train_samples'))}, test samples: {_fmt(s.get('test_samples'))}")
    if s.get("method"):
        lines.append(f"- method: `{s['method']}`")
    device = s.get("device") or meta.get("device")
    if device:
        lines.append(f"- device: {device}" + (f" × {s['world_size']}" if (s.get("world_size") or 1) > 1 else ""))
    versions = s.get("versions") or meta.get("versions") or (ufm or {}).get("versions") or (rank or {}).get(
        "versions")
    if isinstance(versions, Mapping) and versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return [*lines, ""]


def _probe_section(page: _Page, probe: Any, selection: Mapping[str, Any] | None) -> list[str]:
    from nc_finetune.report.plots import plot_probe

    rows = probe.layers
    cols = [(k, spec) for k, spec in _LAYER_COLUMNS if any(k in r for r in rows)]
    chosen = {b.get("name") for b in (selection or {}).get("blocks", [])}
    header = ["index", "name", "dim", *(k for k, _ in cols)] + (["tuned"] if selection else [])
    body = []
    for r in rows:
        cells = [str(r.get("index")) if r.get("is_block", True) else "-", f"`{r.get('name') or 'output'}`",
                 _fmt(r.get("dim")), *(_fmt(r.get(k), spec) for k, spec in cols)]
        if selection:
            cells.append("yes" if r.get("is_block", True) and r.get("name") in chosen else "")
        body.append(cells)
    lines = ["## Layer-wise collapse (probe)", "",
             "Collapse metrics of every tapped layer on the downstream training split (lower = more collapsed); "
             "NCC accuracy on the training split, linear-probe accuracy held out.", "", *_table(header, body)]
    fit = probe.fit or {}
    if fit:
        lines += ["", f"Equi-separation fit of log {fit.get('metric', 'nc1')} over blocks: "
                      f"ρ = {_fmt(fit.get('rho'), '.4f')} per block, R² = {_fmt(fit.get('r2'), '.3f')}."]
    if not page.existing_image("probe.png"):
        plot_probe(probe, page.dest / "probe.png")
    return [*lines, "", "![probe](probe.png)", ""]


def _selection_section(sel: Mapping[str, Any], trained: bool = False) -> list[str]:
    """The chosen blocks, budget and evidence.

    Args:
        sel: ``selection.json``.
        trained: Whether ``summary.json`` counts the trainable parameters. The selection counts whole blocks
            (what finetuning them trains); a LoRA run trains far fewer, so when the run's own count exists the
            costs table shows the one trainable fraction and this section gives the blocks' size only.
    """
    blocks = list(sel.get("blocks", []))
    modules = list(sel.get("module_names", []))
    lines = ["## Chosen blocks", ""]
    if sel.get("strategy"):
        of = f" of {sel['num_blocks']}" if sel.get("num_blocks") else ""
        lines += [f"Strategy `{sel['strategy']}`: {len(blocks)}{of} blocks tuned.", ""]
    if blocks:
        header = ["index", "block", "module", "params"]
        body = [[str(b.get("index")), f"`{b.get('name')}`", f"`{modules[i]}`" if i < len(modules) else "",
                 _int(b.get("num_params"))] for i, b in enumerate(blocks)]
        lines += [*_table(header, body), ""]
    if trained and "block_params" in sel:
        lines += [f"Parameters in the chosen blocks: {_int(sel['block_params'])} "
                  "(trainable parameters as trained: see Costs).", ""]
    elif trained:
        lines += ["Trainable parameters as trained: see Costs.", ""]
    elif "trainable_params" in sel or "trainable_fraction" in sel:
        parts = f" = blocks {_int(sel['block_params'])} + head {_int(sel['head_params'])}" if (
            "block_params" in sel and "head_params" in sel) else ""
        lines += [f"Trainable parameters: {_int(sel.get('trainable_params'))} of {_int(sel.get('total_params'))} "
                  f"({_pct(sel.get('trainable_fraction'))}){parts}.", ""]
    budget = sel.get("budget") or {}
    if budget.get("ignored"):
        lines += ["Budget: ignored (strategy `all`).", ""]
    elif budget:
        note = " (default: no budget given)" if budget.get("defaulted") else ""
        limits = ", ".join(f"{k} = {'none' if budget.get(k) is None else _fmt(budget.get(k))}"
                           for k in ("max_blocks", "max_param_fraction"))
        fill = f" Fill policy `{budget['fill']}`." if budget.get("fill") else ""
        counts = (f" The fraction counts {budget['counts']}." if budget.get("counts") and
                  budget.get("max_param_fraction") is not None else "")
        stopped = f" Stopped at `{budget['stopped_at']}` (over the budget)." if budget.get("stopped_at") else ""
        lines += [f"Budget: {limits}{note}.{fill}{counts}{stopped}"
                  + (f" Skipped (over the fraction budget): {', '.join(map(str, budget['skipped']))}."
                     if budget.get("skipped") else ""), ""]
    if sel.get("ranking"):
        lines += ["Ranking (tune first → last): " + " > ".join(str(i) for i in sel["ranking"]), ""]
    if sel.get("rationale"):
        lines += [f"**Rationale.** {sel['rationale']}", ""]
    if sel.get("details"):
        from nc_finetune.select.selection import explain_details

        evidence = explain_details(sel["details"])
        if evidence:
            lines += ["**Evidence.**", "", "```", *evidence, "```", ""]
    return lines


def _training_section(page: _Page, records: list[dict[str, Any]], skipped: int) -> list[str]:
    train = [r for r in records if "split" not in r and "loss" in r]
    evals = [r for r in records if "split" in r]
    lines = ["## Training", ""]
    if skipped:
        lines += [f"({skipped} unreadable line(s) of metrics.jsonl skipped.)", ""]
    if not train and not evals:
        return [*lines, "metrics.jsonl holds no records.", ""]
    if train:
        last = train[-1]
        lines += [f"{len(train)} loss records; last: step {last.get('step')}, loss {_fmt(last.get('loss'))}, "
                  f"lr {_fmt(last.get('lr'), '.3g')}.", ""]
    plot_training(records, page.dest / "training.png")
    lines += ["![training](training.png)", ""]
    if evals:
        body = [[_fmt(r.get("step")), _fmt(_epochs_done(r)), str(r.get("split")), _fmt(r.get("accuracy"), ".4f"),
                 _fmt(r.get("loss"), ".4f"), _fmt(r.get("samples"))] for r in evals]
        lines += [*_table(["step", "epochs done", "split", "accuracy", "loss", "samples"], body), ""]
    return lines


def _costs_section(s: Mapping[str, Any]) -> list[str]:
    rows: list[list[str]] = []
    if "test_accuracy" in s:
        rows.append(["test accuracy", _fmt(s.get("test_accuracy"), ".4f")])
    if "test_loss" in s:
        rows.append(["test loss", _fmt(s.get("test_loss"), ".4f")])
    if "trainable_params" in s or "total_params" in s:
        frac = s.get("trainable_fraction")
        if frac is None and _finite(s.get("trainable_params")) and _finite(s.get("total_params")) and s[
                "total_params"]:
            frac = s["trainable_params"] / s["total_params"]
        rows.append(["trainable / total params (as trained)",
                     f"{_int(s.get('trainable_params'))} / {_int(s.get('total_params'))} ({_pct(frac)})"])
    if "head_params" in s:
        rows.append(["head params", _int(s.get("head_params"))])
    for key, label, spec in (("train_seconds", "train seconds", ".1f"),
                             ("seconds_per_epoch", "seconds per epoch", ".2f"), ("steps", "optimizer steps", ""),
                             ("epochs_run", "epochs run", ""), ("stopped_early", "stopped early", ""),
                             ("peak_memory_mb", "peak memory (MB)", ".1f")):
        if key in s:
            rows.append([label, _fmt(s.get(key), spec)])
    if "prefix_cache" in s:
        rows.append(["prefix cache", _prefix_cache(s.get("prefix_cache"))])
    if not rows:
        return []
    return ["## Costs", "", *_table(["quantity", "value"], rows), ""]


def _class_metrics_section(s: Mapping[str, Any], class_names: Any) -> list[str]:
    """Macro-F1, per-class accuracy and the confusion matrix of the test (and validation) split."""
    lines: list[str] = []
    for split in ("test", "val"):
        cm = s.get(f"{split}_confusion_matrix")
        if not isinstance(cm, list) or not cm:
            continue
        K = len(cm)
        names = [str(n) for n in class_names] if isinstance(class_names, list) and len(class_names) == K else \
            [str(k) for k in range(K)]
        per_class = s.get(f"{split}_per_class_accuracy") or [None] * K
        acc, f1 = _fmt(s.get(f"{split}_accuracy"), ".4f"), _fmt(s.get(f"{split}_macro_f1"), ".4f")
        lines += [f"### {'Test' if split == 'test' else 'Validation'} split", "",
                  f"accuracy {acc}, macro-F1 {f1} (rows: true class, columns: predicted class)", ""]
        rows = [[names[k], *(_int(c) for c in cm[k]), _int(sum(cm[k])), _fmt(per_class[k], ".4f")] for k in range(K)]
        lines += [*_table(["true / predicted", *names, "samples", "class accuracy"], rows), ""]
    return ["## Classification metrics", "", *lines] if lines else []


def _rank_section(page: _Page, rank: Mapping[str, Any]) -> list[str]:
    lines = ["## Ranking", ""]
    scalars = [(k, v) for k, v in rank.items()
               if k not in ("rows", "correlations", "versions", "backbone", "dataset") and not isinstance(
                   v, (Mapping, list))]
    lines += [f"- {k}: {_fmt(v)}" for k, v in scalars]
    if scalars:
        lines.append("")
    rows = [r for r in rank.get("rows") or [] if isinstance(r, Mapping)]
    if rows:
        keys = _union_keys(rows)
        lines += [f"### Candidates ({len(rows)})", "", *_table(keys, [[_fmt(r.get(k)) for k in keys] for r in rows]),
                  ""]
    corr = _correlation_rows(rank.get("correlations"))
    if corr:
        keys = _union_keys([c for _, c in corr])
        keys = [k for k in ("tau", "tau_w") if k in keys] + [k for k in keys if k not in ("tau", "tau_w")]
        header = ["score", *(_CORRELATION_HEADERS.get(k, k) for k in keys)]
        body = [[f"`{name}`", *(_fmt(c.get(k)) for k in keys)] for name, c in corr]
        lines += ["### Rank correlations", "", *_table(header, body), ""]
    if page.existing_image("rank.png"):
        lines += ["![rank](rank.png)", ""]
    return lines


def _sweep_section(page: _Page, sweep: Mapping[str, Any]) -> list[str]:
    """The per-block curve, the oracle and every strategy's regret per budget (``nc-finetune sweep``)."""
    lines = ["## Sweep: each block set tuned alone", "",
             f"- seeds: {', '.join(map(str, sweep.get('seeds', [])))}; learning rates: "
             f"{', '.join(f'{x:g}' for x in sweep.get('lr_grid', []))} (chosen on validation per block set)", ""]
    if page.existing_image("sweep.png"):
        lines += ["![per-block accuracy and collapse](sweep.png)", ""]
    cells = [c for c in sweep.get("cells") or [] if isinstance(c, Mapping)]
    if cells:
        rows = [[" + ".join(c.get("names", [])), c.get("kind", ""), _int(c.get("block_params")), _fmt(c.get("lr")),
                 _pct(c.get("mean_test")), _pct(c.get("sd_test")), _pct(c.get("mean_val"))] for c in cells]
        lines += [f"### Block sets ({len(cells)})", "",
                  *_table(["blocks", "kind", "block params", "lr", "test (mean)", "sd", "val (mean)"], rows), ""]
    refs = {m: r for m, r in (sweep.get("references") or {}).items() if isinstance(r, Mapping)}
    if refs:
        rows = [[m, _int(r.get("trainable_params")), _fmt(r.get("lr")), _pct(r.get("mean_test")),
                 _pct(r.get("sd_test"))] for m, r in refs.items()]
        lines += ["### References (every block, no selection)", "",
                  *_table(["method", "trainable params", "lr", "test (mean)", "sd"], rows), ""]
    for label, oracle in (sweep.get("oracle") or {}).items():
        best = oracle.get("by_test") or {}
        by_val = oracle.get("by_val") or {}
        lines += [f"### Budget {label}", "",
                  f"- oracle (best mean test accuracy of {oracle.get('searched')} block sets): "
                  f"`{' + '.join(best.get('blocks', []))}` at {_pct(best.get('mean_test'))}"
                  + (f"; best by validation: `{' + '.join(by_val.get('blocks', []))}`" if by_val else ""), ""]
        table = (sweep.get("regret") or {}).get(label) or {}
        rows = []
        for strategy, r in sorted(table.items(), key=lambda kv: (kv[1].get("mean") is None, kv[1].get("mean") or 0)):
            ci = r.get("ci95")
            picks = sorted({" + ".join(p) for p in (r.get("picks") or {}).values() if p})
            vs_refs = [(r.get("vs_references") or {}).get(m) or {} for m in refs]
            rows.append([strategy, _fmt(r.get("mean"), "+.2f"), f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "—",
                         _fmt(r.get("kendall_tau"), "+.2f"), _fmt(r.get("weighted_tau"), "+.2f"),
                         _fmt(r.get("cost_seconds"), ".1f"),
                         *(f"{_fmt(v.get('mean'), '+.2f')} ({v.get('verdict', '—')})" for v in vs_refs),
                         _pct(stab) if (stab := (r.get("bootstrap_stability") or {}).get("mean")) is not None
                         else "—", "; ".join(picks)])
        if rows:
            lines += [*_table(["strategy", "regret (points)", "95% CI", "τ", "τ_w", "cost (s)",
                               *(f"vs {m} (points)" for m in refs), "bootstrap stability", "picks"], rows), ""]
        floor_rows = []
        for name, f in ((sweep.get("floors") or {}).get(label) or {}).items():
            ci = f.get("ci95")
            vs = [f.get(k) or {} for k in ("vs_random_k", "vs_last_k")]
            floor_rows.append([name, _fmt(f.get("mean"), "+.2f"), f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "—",
                               *(f"{_fmt(v['mean'], '+.2f')} ({v['verdict']})" if v else "—" for v in vs)])
        if floor_rows:
            lines += ["Floors (hindsight choices, not rules: the regret a perfect rule could still show here): "
                      "`exhaustive_val` keeps each seed's best block set by validation, `other_seeds` the best by "
                      "the other seeds' test accuracy.", "",
                      *_table(["floor", "regret (points)", "95% CI", "vs random_k", "vs last_k"], floor_rows), ""]
    return lines


def _ufm_section(page: _Page, u: Mapping[str, Any]) -> list[str]:
    from nc_finetune.report.ufm_report import plot_ufm

    p, cf, r = u.get("parameters") or {}, u.get("closed_form") or {}, u.get("reached") or {}
    lines = ["## Unconstrained feature model", ""]
    if p:
        names = {"regime": "K·√(nλ_Wλ_H)"}
        lines += ["Parameters: " + ", ".join(f"{names.get(k, k)} = {_fmt(v)}" for k, v in p.items()) + ".", ""]
    body = [
        ["‖w_k‖²", _fmt(cf.get("w_norm_sq"), ".6f"), _fmt(r.get("w_norm_sq_mean"), ".6f"),
         _fmt(r.get("w_norm_sq_max_error"), ".2g")],
        ["objective f", _fmt(cf.get("f_star"), ".10f"), _fmt(r.get("loss"), ".10f"),
         _fmt(r.get("objective_gap"), ".2g")],
        ["‖W‖_F / ‖M̄‖_F", _fmt(cf.get("weight_to_mean_ratio"), ".6f"), _fmt(r.get("weight_to_mean_ratio"), ".6f"),
         _fmt(_diff(r.get("weight_to_mean_ratio"), cf.get("weight_to_mean_ratio")), ".2g")],
        *([k.upper(), "0", _fmt(r.get(k), ".2g"), _fmt(r.get(k), ".2g")] for k in ("nc1", "nc2", "nc3")),
    ]
    if "bias_max_abs" in r:
        body.append(["max |b_k|", "0", _fmt(r.get("bias_max_abs"), ".2g"), _fmt(r.get("bias_max_abs"), ".2g")])
    lines += [*_table(["quantity", "closed form", "reached", "error"], body), ""]
    if "iterations" in r:
        state = "converged" if r.get("converged") else "not converged"
        lines += [f"L-BFGS: {_fmt(r.get('iterations'))} iterations, gradient norm {_fmt(r.get('grad_norm'), '.2g')}, "
                  f"{state}.", ""]
    if not page.existing_image("ufm.png") and u.get("history"):
        plot_ufm(u, page.dest / "ufm.png")
    if (page.dest / "ufm.png").is_file():
        lines += ["![ufm](ufm.png)", ""]
    return lines


# ---------------------------------------------------------------------------------------------------------- plots


def plot_training(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Training loss against optimizer step and val/test accuracy per epoch, from ``metrics.jsonl`` records.

    Args:
        records: Parsed ``metrics.jsonl`` lines: loss lines (``step``, ``epoch``, ``loss``, ``lr``) and evaluation
            lines (``step``, ``epoch``, ``split``, ``accuracy``, ``loss``, ``samples``).
        path: Destination PNG (written atomically).

    Returns:
        The written path.
    """
    train = [r for r in records if "split" not in r and "loss" in r]
    fig = Figure(figsize=(11, 4))
    ax, ax2 = fig.subplots(1, 2)
    if train:
        ax.plot([_num(r.get("step")) for r in train], [_num(r.get("loss")) for r in train], lw=1, marker="o", ms=2,
                label="train loss")
        ax.legend(fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.grid(True, alpha=0.3)
    for split, style in (("val", "s-"), ("test", "o-"), ("final_test", "*")):
        rs = [r for r in records if r.get("split") == split]
        if rs:
            label = "final test" if split == "final_test" else f"{split} accuracy"
            ax2.plot([_epochs_done(r) for r in rs], [_num(r.get("accuracy")) for r in rs], style, ms=8 if
                     split == "final_test" else 4, label=label)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("epochs completed")
    ax2.set_ylabel("accuracy")
    ax2.grid(True, alpha=0.3)
    fig.suptitle("training curve")
    fig.tight_layout()
    from nc_finetune.report.plots import save_figure  # pyplot only when a figure is written

    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------- loading


def _load_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def _load_probe(path: Path) -> Any:
    from nc_finetune.probe.result import ProbeResult

    d = _load_json(path)
    if d is None:
        return None
    if not isinstance(d.get("layers"), list):
        raise UserError(f"{path} has no 'layers' list; is it a probe.json?")
    return ProbeResult.from_dict(d)


def _load_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a JSON-lines file and the number of unreadable lines (a killed run may leave a partial line)."""
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(obj, dict):
            records.append(obj)
        else:
            bad += 1
    return records, bad


def _load_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    from nc_finetune.config import read_yaml

    try:
        return read_yaml(path, "resolved recipe")  # no aliases: a planted alias bomb must not expand here either
    except UserError:  # the recipe only fills header gaps: an unreadable one is no reason to fail
        return None


# ---------------------------------------------------------------------------------------------------------- format


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(_cell(c) for c in cells) + " |"

    return [row(header), "|" + "|".join("---" for _ in header) + "|", *(row(r) for r in rows)]


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _fmt(v: Any, spec: str = ".4g") -> str:
    """One value as text: None/NaN → ``nan``, floats by ``spec``, ints as is, containers as compact JSON."""
    if v is None:
        return "nan"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return format(v, spec) if spec else repr(v)
    if isinstance(v, str):
        return v
    try:
        return json.dumps(v, separators=(",", ":"), allow_nan=True, default=str)
    except (TypeError, ValueError):
        return str(v)


def _int(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return _fmt(v)
    return f"{int(v):,}"


def _pct(v: Any) -> str:
    if not _finite(v):
        return "nan"
    pct = 100.0 * float(v)
    return f"{pct:.2f}%" if pct >= 0.01 else f"{pct:.2g}%"


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _finite(v: Any) -> bool:
    return math.isfinite(_num(v))


def _diff(a: Any, b: Any) -> float:
    return _num(a) - _num(b)


def _epochs_done(r: Mapping[str, Any]) -> float:
    """Epochs completed at an evaluation line (per-epoch lines store the 0-based epoch that just ended)."""
    e = _num(r.get("epoch"))
    return e if r.get("split") == "final_test" else e + 1


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d


def _union_keys(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [str(k) for k in r if str(k) not in keys]
    return keys


def _correlation_rows(corr: Any) -> list[tuple[str, dict[str, Any]]]:
    """Normalise ``correlations`` ({score: {tau, tau_w, ...}}, {score: value} or [{score, tau, ...}])."""
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(corr, Mapping):
        for name, v in corr.items():
            out.append((str(name), dict(v) if isinstance(v, Mapping) else {"value": v}))
    elif isinstance(corr, list):
        for i, v in enumerate(corr):
            if isinstance(v, Mapping):
                name = v.get("score", v.get("name", i))
                out.append((str(name), {k: x for k, x in v.items() if k not in ("score", "name")}))
    return out


def _prefix_cache(info: Any) -> str:
    if not isinstance(info, Mapping):
        return _fmt(info)
    if not info.get("enabled"):
        return "off" + (f" ({info['reason']})" if info.get("reason") else "")
    parts = []
    if info.get("target"):
        parts.append(f"up to `{info['target']}`")
    if isinstance(info.get("prefix_modules"), list):
        parts.append(f"{len(info['prefix_modules'])} prefix modules")
    if "megabytes" in info:
        parts.append(f"{_fmt(info.get('megabytes'), '.1f')} MB")
    if "build_seconds" in info:
        parts.append(f"built in {_fmt(info.get('build_seconds'), '.2f')} s")
    return "on" + (f" ({', '.join(parts)})" if parts else "")
