"""Peak memory of a streaming probe as the number of rows grows (issue 10's streaming target).

Target: *streaming probe over 1M rows with 50 samples per class: peak memory within 100 MB of a 10k-row run.*

A local CSV of short texts (``--classes`` classes, shuffled) is written to a temporary directory at each size
(``--sizes``, default 10k and 1M rows), with a small test file beside it. Each measurement runs in a fresh
subprocess of this script: it builds a tiny random-init BERT (hidden 16, 2 blocks, word-level tokenizer; written to
the temporary directory once), loads it, resets the kernel's RSS high-water mark (``/proc/self/clear_refs``) and then
runs ``prepare_data`` + the probe stage of a recipe with ``data.streaming=true``, ``data.labels`` and
``probe.samples_per_class``. The reported memory is the pass's own peak: ``VmHWM`` after the pass minus ``VmRSS``
before it, so the model and the interpreter are not counted. With ``--in-memory`` the largest size is also measured
without streaming (the same recipe, ``data.streaming=false``) for context.

Examples:
    # the committed measurement (about 3 minutes on 2 shared cores)
    python benchmarks/streaming_memory.py --in-memory --out benchmarks/results/cpu/streaming_memory.json
    # any sizes; a smoke run (seconds)
    python benchmarks/run.py streaming_memory --sizes 10000 100000
    python benchmarks/run.py streaming_memory --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
from common import REPO_ROOT, command_line, machine_info, markdown_table, print_header, write_results

_RESULT_MARK = "@@STREAMING_MEMORY_RESULT@@ "
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "fast", "slow", "red", "big", "sun", "sea", "sky",
         "car", "bus", "tree", "leaf", "rock"]
EXPERIMENT = harness.load_experiment("streaming_memory")
TARGET_MB = float(EXPERIMENT.params["target_mb"])


def write_csv(path: Path, rows: int, classes: int, seed: int) -> None:
    """``rows`` short texts (3..8 words; class ``k`` always contains the word ``WORDS[k]``) with string labels."""
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write("text,label\n")
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            labels = rng.integers(0, classes, size=n)
            words = rng.integers(0, len(WORDS), size=(n, 7))
            lengths = rng.integers(2, 8, size=n)
            f.write("".join(f"{WORDS[k]} {' '.join(WORDS[w] for w in ws[:m])},c{k}\n"
                            for k, ws, m in zip(labels, words, lengths, strict=True)))


def write_tiny_bert(path: Path) -> None:
    """A random-init BERT (hidden 16, 2 blocks) with a word-level tokenizer, written with ``save_pretrained``."""
    import torch
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(path)
    transformers.BertTokenizer(vocab_file=str(path / "vocab.txt")).save_pretrained(path)


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this fresh process: load the model, reset the high-water mark, prepare data + probe."""
    import gc

    import torch

    from nc_finetune.config import load_recipe
    from nc_finetune.pipeline import load_recipe_backbone, prepare_data, run_probe_stage

    torch.set_num_threads(spec["threads"])
    recipe = load_recipe(None, spec["overrides"])
    backbone = load_recipe_backbone(recipe)
    gc.collect()
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    prepared = prepare_data(recipe)
    result = run_probe_stage(recipe, None, progress=False, prepared=prepared, backbone=backbone)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    return {"rows_probed": result.meta["samples"], "class_counts": result.meta["class_counts"],
            "before_mb": before, "peak_mb": peak, "pass_mb": peak - before, "seconds": seconds,
            "nc1_last_block": [r["nc1"] for r in result.blocks()][-1]}


def measure(overrides: list[str], threads: int, cache: Path) -> dict[str, Any]:
    """Spawn this script as a fresh process for one measurement (Arrow files of an in-memory load go to ``cache``)."""
    spec = {"overrides": overrides, "threads": threads}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    return {"error": f"worker exited {proc.returncode}: {tail}"}


def build_parser() -> argparse.ArgumentParser:
    p = harness.study_parser(EXPERIMENT, __doc__, flags=("settings", "out", "smoke", "threads"),
                             helps={"threads": "torch threads of each measuring process (default 1)"})
    p.add_argument("--sizes", type=int, nargs="+", default=None, metavar="ROWS",
                   help="training rows per run, instead of the settings' sizes")
    p.add_argument("--classes", type=int, default=EXPERIMENT.params["classes"])
    p.add_argument("--samples-per-class", type=int, default=EXPERIMENT.params["samples_per_class"])
    p.add_argument("--in-memory", action="store_true", help="also measure the largest size without streaming")
    p.add_argument("--_worker", dest="worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = harness.parse_args(build_parser(), EXPERIMENT, argv)
    if args.sizes is None:
        args.sizes = [EXPERIMENT.settings[name]["rows"] for name in args.settings]
    args.threads = args.threads or 1
    if args.worker is not None:
        print(_RESULT_MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    cmd = command_line()
    info = machine_info()
    print_header("streaming probe: peak memory vs rows", info, cmd)
    names = [f"c{k}" for k in range(args.classes)]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nc-stream-bench-") as tmp:
        tmp_path = Path(tmp)
        bert = tmp_path / "bert"
        write_tiny_bert(bert)
        test = tmp_path / "test.csv"
        write_csv(test, 1_000, args.classes, seed=1)
        cases = [(n, True) for n in args.sizes] + ([(max(args.sizes), False)] if args.in_memory else [])
        for rows, streaming in cases:
            train = tmp_path / f"train_{rows}.csv"
            if not train.exists():
                t0 = time.perf_counter()
                write_csv(train, rows, args.classes, seed=0)
                print(f"wrote {rows} rows ({train.stat().st_size / 2**20:.1f} MB) in {time.perf_counter() - t0:.1f}s",
                      flush=True)
            overrides = [f"backbone.name=hf:{bert}", "backbone.max_length=16", "data.name=csv",
                         f"data.data_files={{train: {train}, test: {test}}}",
                         f"data.streaming={str(streaming).lower()}",
                         f"probe.samples_per_class={args.samples_per_class}", "probe.batch_size=64",
                         "probe.device=cpu"]
            if streaming:
                overrides.append(f"data.labels=[{', '.join(names)}]")
            r = {"rows": rows, "streaming": streaming, "file_mb": train.stat().st_size / 2**20,
                 **measure(overrides, args.threads, tmp_path / "hf-cache")}
            print(json.dumps(r), flush=True)
            runs.append(r)
    streamed = {r["rows"]: r for r in runs if r["streaming"] and "error" not in r}
    small, large = min(args.sizes), max(args.sizes)
    growth = streamed[large]["pass_mb"] - streamed[small]["pass_mb"] if small in streamed and large in streamed \
        else float("nan")
    target = {"name": f"streaming probe over {large} rows, {args.samples_per_class}/class: peak within "
                      f"{TARGET_MB:.0f} MB of a {small}-row run", "measured_growth_mb": growth,
              "limit_mb": TARGET_MB, "met": bool(growth <= TARGET_MB)}
    rows = [[r["rows"], "yes" if r["streaming"] else "no", f"{r['file_mb']:.1f}",
             r.get("rows_probed", "-"), f"{r.get('pass_mb', float('nan')):.1f}",
             f"{r.get('seconds', float('nan')):.1f}"] for r in runs]
    print(markdown_table(["rows", "streaming", "file MB", "probed", "pass peak MB", "seconds"], rows))
    print(f"growth {small} -> {large} rows: {growth:.1f} MB (target <= {TARGET_MB:.0f}): "
          f"{'met' if target['met'] else 'NOT met'}")
    write_results(args.out, {"benchmark": "streaming_memory", "command": cmd, "machine": info, "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "worker"},
        "metric": "VmHWM after the pass minus VmRSS before it (high-water mark reset with /proc/self/clear_refs "
                  "after the model is loaded); data loading, stream sampling and the probe are inside the pass",
        "runs": runs, "target": target})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
