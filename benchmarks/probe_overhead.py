"""What does the collapse probe cost on top of a plain forward pass?

For each case (a built-in ``probe-*`` recipe), in one process and on exactly the same samples, batch size and
``backbone.prepare`` calls:

* **wall time** -- (a) a plain no-grad, eval-mode forward of ``backbone.model`` and (b) the full probe (every block,
  every metric; the linear probe only with ``--linear-probe``), timed ``--repeats`` times in alternating order
  (forward, probe, forward, probe, ...) after one warm-up batch of each; the medians and their ratio are reported.
* **peak memory** -- each of forward / probe at ``--n-small`` and ``--n-large`` samples per class, each in a fresh
  subprocess of this script, read as the peak RSS (``ru_maxrss``) on CPU or ``torch.cuda.max_memory_allocated`` on
  CUDA. Also reported: the peak *above* the process's peak once model and data are loaded (the compute's own
  memory), and the growth from N to 10N samples (a streaming probe should stay flat).

Targets printed beside the numbers: wall ratio probe/forward <= 1.10, memory ratio probe/forward <= 1.05.

Prints Markdown tables and writes the raw numbers to ``--out`` (JSON, written atomically).

Examples:
    # the real CPU benchmark (both cases)
    python benchmarks/run.py probe_overhead
    # one case, with the linear probe, 4 threads, 5 repeats
    python benchmarks/run.py probe_overhead --cases minilm --linear-probe --threads 4 --repeats 5
    # a smoke run (seconds): the experiment file's smoke preset
    python benchmarks/run.py probe_overhead --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
from common import REPO_ROOT, check, markdown_table, median, safe_ratio, start_study, usable_cores

NAME = "probe_overhead"
EXPERIMENT = harness.load_experiment(NAME)
CASES = EXPERIMENT.recipes
TARGET_WALL_RATIO = 1.10
TARGET_MEMORY_RATIO = 1.05
_RESULT_MARK = "@@PROBE_OVERHEAD_RESULT@@ "


# --------------------------------------------------------------------------------------------------- workload


def _load(recipe_name: str, overrides: list[str]):
    """Recipe, prepared data (probe subset) and backbone, exactly as ``nc-finetune probe`` builds them."""
    from nc_finetune.cli import resolve_recipe_path
    from nc_finetune.config import load_recipe
    from nc_finetune.pipeline import load_recipe_backbone, prepare_data

    recipe = load_recipe(resolve_recipe_path(recipe_name), overrides)
    prepared = prepare_data(recipe)
    backbone = load_recipe_backbone(recipe)
    return recipe, prepared, backbone


def validate_recipe(recipe_name: str, overrides: list[str]) -> None:
    """Load and validate the recipe with its overrides (nothing heavy is loaded).

    Raises:
        UserError: unknown recipe, bad key or value.
    """
    from nc_finetune.cli import resolve_recipe_path
    from nc_finetune.config import load_recipe

    load_recipe(resolve_recipe_path(recipe_name), overrides)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_forward(backbone, split, batch_size: int, device, autocast: bool) -> None:
    """The baseline: the same batches and ``prepare`` calls as the probe, one no-grad eval-mode forward each."""
    import numpy as np
    import torch

    from nc_finetune.probe.runner import iter_batches

    model = backbone.model
    was_training = model.training
    model.eval().to(device)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    try:
        with torch.no_grad():
            for raw, labels in iter_batches(split, batch_size):
                inputs = {k: v.to(device, non_blocking=True) for k, v in backbone.prepare(raw).items()}
                torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)  # as the probe does
                with torch.autocast(device.type, dtype=amp_dtype, enabled=autocast):
                    model(**inputs)
        _sync(device)
    finally:
        model.train(was_training)


def run_probe(backbone, split, num_classes: int, recipe, device) -> dict[str, Any]:
    """The full probe as ``nc-finetune probe`` runs it (every block; metrics computed); returns its meta."""
    from nc_finetune.probe.runner import probe

    p = recipe.probe
    result = probe(backbone, split, num_classes, batch_size=p.batch_size, layers=p.layers, ncc_samples=p.ncc_samples,
                   linear_probe=p.linear_probe, autocast=p.autocast, device=str(device), seed=p.seed, progress=False)
    _sync(device)
    return result.meta


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _warmup_split(split, num_classes: int, batch_size: int, seed: int):
    """About one batch, stratified (so every class is present and the probe's metrics are defined)."""
    import numpy as np

    from nc_finetune.data import subsample_per_class

    per_class = max(2, batch_size // max(1, num_classes))
    idx = subsample_per_class(np.asarray(split.labels), per_class, seed)
    return split.subset(idx)


def time_case(recipe_name: str, overrides: list[str], repeats: int) -> dict[str, Any]:
    """Wall time of plain forward vs probe in this process, alternating, after a warm-up batch of each."""
    from nc_finetune.utils.env import resolve_device

    recipe, prepared, backbone = _load(recipe_name, overrides)
    device = resolve_device(recipe.probe.device)
    split, k = prepared.probe_split, prepared.data.num_classes
    bs, autocast = recipe.probe.batch_size, recipe.probe.autocast
    backbone.model.eval().to(device)

    warm = _warmup_split(split, k, bs, recipe.probe.seed)
    warm_fwd, _ = _timed(lambda: plain_forward(backbone, warm.subset(list(range(min(bs, len(warm))))), bs, device,
                                               autocast))
    warm_probe, _ = _timed(lambda: run_probe(backbone, warm, k, recipe, device))

    fwd, prb, probe_loop = [], [], []
    for _ in range(repeats):
        t, _ = _timed(lambda: plain_forward(backbone, split, bs, device, autocast))
        fwd.append(t)
        t, meta = _timed(lambda: run_probe(backbone, split, k, recipe, device))
        prb.append(t)
        probe_loop.append(meta["seconds"])
    f_med, p_med = median(fwd), median(prb)
    return {
        "samples": len(split),
        "num_classes": k,
        "batch_size": bs,
        "device": str(device),
        "autocast": autocast,
        "linear_probe": recipe.probe.linear_probe,
        "blocks": len(backbone.blocks),
        "warmup_seconds": {"forward_one_batch": warm_fwd, "probe_one_batch": warm_probe},
        "forward_seconds": fwd,
        "probe_seconds": prb,
        "probe_loop_seconds": probe_loop,
        "forward_median_s": f_med,
        "probe_median_s": p_med,
        "ratio": safe_ratio(p_med, f_med),
        "ratio_of_minimums": safe_ratio(min(prb), min(fwd)),
        "paired_ratios": [safe_ratio(p, f) for f, p in zip(fwd, prb, strict=True)],
    }


def _proc_status_mb(field: str) -> float:
    """A memory field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in MB; NaN where ``/proc`` is unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _process_peak_mb() -> float:
    """The whole process's peak RSS (``ru_maxrss``, never reset), in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _rss_mb() -> float:
    """Peak RSS of this process since the last high-water reset, in MB.

    Linux: ``VmHWM``, which ``clear_refs`` resets. Not ``ru_maxrss``: the kernel folds the high-water mark into the
    process's ``maxrss`` whenever a thread exits (torch's worker threads do), so after a reset ``ru_maxrss`` still
    reports the model-loading peak and hides the pass's own memory. Elsewhere ``ru_maxrss``.
    """
    peak = _proc_status_mb("VmHWM")
    return peak if math.isfinite(peak) else _process_peak_mb()


def _current_rss_mb() -> float:
    """Current resident set size (``VmRSS``), in MB; NaN where ``/proc`` is unavailable."""
    return _proc_status_mb("VmRSS")


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (which ``ru_maxrss`` reads) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one workload (``forward`` or ``probe``) in this fresh process and report its peak memory.

    CPU: the RSS high-water mark is reset once the model and data are loaded, so ``peak_mb`` (``ru_maxrss`` read
    after the pass) is the peak *during the pass*, model and data included, free of the one-off loading spike;
    ``process_peak_mb`` is the whole process's peak. CUDA: ``torch.cuda.max_memory_allocated`` over the pass (model
    weights included). ``compute_mb`` is the pass's own memory: the peak minus what was resident just before it.
    """
    import gc

    import torch

    from nc_finetune.utils.env import resolve_device

    torch.set_num_threads(spec["threads"])
    recipe, prepared, backbone = _load(spec["recipe"], spec["overrides"])
    device = resolve_device(recipe.probe.device)
    split, k = prepared.probe_split, prepared.data.num_classes
    backbone.model.eval().to(device)
    gc.collect()
    load_peak = _rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before, reset_ok = torch.cuda.memory_allocated(device) / 2**20, True
    else:
        before, reset_ok = _current_rss_mb(), _reset_peak_rss()
    if spec["mode"] == "forward":
        seconds, _ = _timed(lambda: plain_forward(backbone, split, recipe.probe.batch_size, device,
                                                  recipe.probe.autocast))
    else:
        seconds, _ = _timed(lambda: run_probe(backbone, split, k, recipe, device))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        metric = "torch.cuda.max_memory_allocated"
    else:
        peak = _rss_mb()
        metric = "peak RSS during the pass (VmHWM after a high-water reset)" if reset_ok else \
            "peak RSS of the process (high-water reset unavailable)"
    return {"mode": spec["mode"], "samples": len(split), "device": str(device), "metric": metric,
            "peak_mb": peak, "before_mb": before, "compute_mb": peak - before if reset_ok else float("nan"),
            "process_peak_mb": _process_peak_mb(), "load_peak_rss_mb": load_peak,
            "peak_reset": reset_ok, "seconds": seconds}


def measure_memory(recipe_name: str, overrides: list[str], mode: str, threads: int) -> dict[str, Any]:
    """Spawn this script as a fresh process for one memory measurement."""
    spec = {"recipe": recipe_name, "overrides": overrides, "mode": mode, "threads": threads}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-worker", json.dumps(spec)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    return {"mode": mode, "error": f"worker exited {proc.returncode}: {tail}"}


# --------------------------------------------------------------------------------------------------- reporting


def _f(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None or x != x else f"{x:{spec}}"


def timing_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        t = r.get("timing")
        if not t or "error" in t:
            rows.append([r["case"], "failed"] + [""] * 7)
            continue
        rows.append([r["case"], t["samples"], t["batch_size"], t["device"],
                     f"{_f(t['forward_median_s'], '.3f')}", f"{_f(t['probe_median_s'], '.3f')}",
                     f"{_f(t['ratio'], '.3f')}", check(t["ratio"] <= TARGET_WALL_RATIO if t["ratio"] == t["ratio"]
                                                       else None), f"{_f(t['ratio_of_minimums'], '.3f')}"])
    return markdown_table(["case", "samples", "batch", "device", "forward s (median)", "probe s (median)",
                           "probe/forward", f"target <= {TARGET_WALL_RATIO:.2f}", "ratio of minimums"], rows)


def summarize_memory(mem: dict[str, Any]) -> None:
    """Add the probe/forward ratios per size and the N -> 10N growth to ``mem`` (in place; skips failed cells)."""
    cells = [mem[s][m] for s in ("small", "large") for m in ("forward", "probe")]
    if any("error" in c for c in cells):
        return
    for size in ("small", "large"):
        m = mem[size]
        m["ratio"] = safe_ratio(m["probe"]["peak_mb"], m["forward"]["peak_mb"])
        m["compute_ratio"] = safe_ratio(m["probe"]["compute_mb"], m["forward"]["compute_mb"])
    mem["growth"] = {
        f"{mode}_{key}": safe_ratio(mem["large"][mode][key], mem["small"][mode][key])
        for mode in ("forward", "probe") for key in ("peak_mb", "compute_mb")
    }


def memory_tables(results: list[dict[str, Any]]) -> tuple[str, str]:
    """The peak-memory table (probe vs forward at N and 10N) and the N -> 10N growth table."""
    rows, growth = [], []
    for r in results:
        mem = r.get("memory")
        if not mem:
            continue
        for size in ("small", "large"):
            m = mem[size]
            f, p = m["forward"], m["probe"]
            if "error" in f or "error" in p:
                rows.append([r["case"], m["per_class"], "failed"] + [""] * 6)
                continue
            ratio = m.get("ratio", float("nan"))
            rows.append([r["case"], m["per_class"], f["samples"], _f(f["peak_mb"], ".0f"), _f(p["peak_mb"], ".0f"),
                         _f(ratio, ".3f"), check(ratio <= TARGET_MEMORY_RATIO if ratio == ratio else None),
                         _f(f["compute_mb"], ".1f"), _f(p["compute_mb"], ".1f")])
        if "growth" in mem:
            g, s, big = mem["growth"], mem["small"], mem["large"]
            growth.append([r["case"], f"{s['per_class']} -> {big['per_class']}",
                           _f(g["forward_peak_mb"], ".3f"), _f(g["probe_peak_mb"], ".3f"),
                           f"{_f(s['forward']['compute_mb'], '.1f')} -> {_f(big['forward']['compute_mb'], '.1f')}",
                           f"{_f(s['probe']['compute_mb'], '.1f')} -> {_f(big['probe']['compute_mb'], '.1f')}"])
    t1 = markdown_table(["case", "per class", "samples", "forward peak MB", "probe peak MB", "probe/forward",
                         f"target <= {TARGET_MEMORY_RATIO:.2f}", "forward compute MB", "probe compute MB"], rows)
    t2 = markdown_table(["case", "per class", "forward peak x", "probe peak x", "forward compute MB",
                         "probe compute MB"], growth)
    return t1, t2


# --------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = harness.study_parser(
        EXPERIMENT, __doc__, flags=("settings", "set", "out", "smoke", "device", "threads"),
        settings_alias="--cases", settings_choices=False, device="auto",
        helps={"settings": f"cases to run: {', '.join(f'{k} ({v})' for k, v in CASES.items())}; a recipe name or "
                           "path is accepted too (default: all)",
               "set": "extra recipe override, repeatable (e.g. --set backbone.image_size=96)",
               "device": "auto = CUDA when available, cpu, cuda (default auto)",
               "threads": f"torch.set_num_threads for every process (default: all usable cores, {usable_cores()} "
                          "here)",
               "out": f"JSON file for the raw results (default {harness.default_out(NAME).relative_to(REPO_ROOT)})"})
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each of forward / probe (default 3)")
    p.add_argument("--samples-per-class", type=int, default=None, metavar="N",
                   help="samples per class for the timing (default: the recipe's probe.samples_per_class)")
    p.add_argument("--n-small", type=int, default=50, metavar="N",
                   help="samples per class of the small memory measurement (default 50)")
    p.add_argument("--n-large", type=int, default=500, metavar="N",
                   help="samples per class of the large memory measurement, usually 10x --n-small (default 500)")
    p.add_argument("--skip-memory", action="store_true", help="time only; no memory subprocesses")
    p.add_argument("--skip-timing", action="store_true", help="memory only (it does not depend on other load)")
    p.add_argument("--linear-probe", action="store_true",
                   help="include the per-layer logistic-regression probe (off by default, whatever the recipe says)")
    p.add_argument("--batch-size", type=int, default=None, help="forward batch size (default: the recipe's)")
    p.add_argument("--_memory-worker", dest="memory_worker", default=None, help=argparse.SUPPRESS)
    return p


def case_recipe(case: str) -> str:
    """Short case name -> recipe name (anything else is passed through as a recipe name or path)."""
    return CASES.get(case, case)


def main(argv: list[str] | None = None) -> int:
    args = harness.parse_args(build_parser(), EXPERIMENT, argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.memory_worker is not None:
        result = memory_worker(json.loads(args.memory_worker))
        print(_RESULT_MARK + json.dumps(result), flush=True)
        return 0

    import torch

    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    extra = args.overrides
    common_over = [f"probe.linear_probe={str(args.linear_probe).lower()}", f"probe.device={args.device}"]
    if args.batch_size:
        common_over.append(f"probe.batch_size={args.batch_size}")

    for case in args.cases:  # fail in a second on a typo, not after the first case
        for n in (args.samples_per_class, args.n_small, args.n_large):
            over = common_over + extra + ([f"probe.samples_per_class={n}"] if n else [])
            try:
                validate_recipe(case_recipe(case), over)
            except Exception as e:
                raise SystemExit(f"{case}: {e}") from None

    info, cmd = start_study("Probe overhead vs a plain forward pass")

    results = []
    for case in args.cases:
        recipe = case_recipe(case)
        spc = [f"probe.samples_per_class={args.samples_per_class}"] if args.samples_per_class else []
        overrides = common_over + extra + spc
        entry: dict[str, Any] = {"case": case, "recipe": recipe, "overrides": overrides}
        if not args.skip_timing:
            print(f"[{case}] timing forward vs probe ({args.repeats} repeats) ...", file=sys.stderr, flush=True)
            try:
                entry["timing"] = time_case(recipe, overrides, args.repeats)
            except Exception as e:  # keep going: the other cases are still worth reporting
                entry["timing"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"[{case}] timing failed: {e}", file=sys.stderr)
        if not args.skip_memory:
            mem: dict[str, Any] = {}
            for size, n in (("small", args.n_small), ("large", args.n_large)):
                over = common_over + extra + [f"probe.samples_per_class={n}"]
                mem[size] = {"per_class": n, "overrides": over}
                for mode in ("forward", "probe"):
                    print(f"[{case}] peak memory: {mode} at {n}/class (fresh process) ...", file=sys.stderr,
                          flush=True)
                    mem[size][mode] = measure_memory(recipe, over, mode, threads)
            summarize_memory(mem)
            entry["memory"] = mem
        results.append(entry)

    lp = "with" if args.linear_probe else "without"
    if not args.skip_timing:
        print("### Wall time (same process, alternating forward/probe, medians)\n")
        print(timing_table(results))
        print(f"\nprobe = every block + final feature, all metrics, {lp} the linear probe; both include "
              f"backbone.prepare (tokenisation / resizing) and the same host-to-device copies. The ratio of "
              f"minimums is less sensitive to other load on the machine; all repeats are in the JSON.\n")
    if not args.skip_memory:
        t1, t2 = memory_tables(results)
        metrics = {c["metric"] for r in results for s in ("small", "large")
                   for c in (r.get("memory", {}).get(s, {}).get(m, {}) for m in ("forward", "probe")) if "metric" in c}
        print(f"### Peak memory ({'; '.join(sorted(metrics)) or 'n/a'}; one fresh process per cell)\n")
        print(t1)
        print("\npeak = model + data + the pass (the one-off loading spike excluded; the whole-process peak is in "
              "the JSON as process_peak_mb); compute MB = peak minus what was resident just before the pass.\n")
        print("### Growth from --n-small to --n-large per class (N -> 10N; a streaming probe should stay flat)\n")
        print(t2)
        print()

    harness.report(NAME, args, cmd, info, threads=threads,
                   targets={"wall_ratio_max": TARGET_WALL_RATIO, "memory_ratio_max": TARGET_MEMORY_RATIO},
                   results=results)
    failed = any("error" in (r.get("timing") or {}) for r in results) or any(
        "error" in r.get("memory", {}).get(s, {}).get(m, {}) for r in results for s in ("small", "large")
        for m in ("forward", "probe"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
