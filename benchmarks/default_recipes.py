"""The default recipes at this checkout beside an earlier checkout: the same numbers, and not slower.

A refactor must leave results unchanged and a speed change must not cost the CPU user time. For every setting (a
recipe as it ships) this runs ``nc-finetune run`` twice, once with this checkout's code and once with the code of
``--baseline`` (a checkout of an earlier revision, e.g. ``git worktree add /tmp/base <rev>``), each as its own
process from its own tree. By default the two run **at the same time**, so both see the same machine load (on a
shared machine, back-to-back runs would compare two different loads); ``--sequential`` runs the baseline first.

Reported per setting and tree: test accuracy and loss, the selected blocks, trainable parameters, the training
seconds of ``summary.json`` and the process's wall time; then ``accuracy_diff`` (this - baseline, in points),
``same_selection`` and ``time_ratio`` (this / baseline, training seconds).

Examples:
    git worktree add /tmp/nc-base 1226671
    python benchmarks/default_recipes.py --baseline /tmp/nc-base --workdir runs/default-recipes \\
        --out benchmarks/results/cpu/default_recipes.json
    python benchmarks/run.py default_recipes --baseline /tmp/nc-base --smoke
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import harness
from common import REPO_ROOT, markdown_table, start_study, write_results

NAME = "default_recipes"
EXPERIMENT = harness.load_experiment(NAME)


def git_revision(tree: Path) -> str | None:
    """The commit a checkout is at (``None`` outside git)."""
    proc = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return proc.stdout.strip() or None


def run_in_tree(tree: Path, recipe: str, overrides: list[str], run_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    """``nc-finetune run`` with the code of ``tree`` (its package first on the path, recipes resolved there)."""
    if (run_dir / "summary.json").is_file():
        return {"run_dir": str(run_dir), "reused": True, "wall_seconds": None,
                "summary": json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))}
    if run_dir.exists():
        raise SystemExit(f"{run_dir} holds an unfinished run; remove it or use another --workdir")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "nc_finetune.cli", "run", recipe, *overrides, "--out", str(run_dir), "--quiet"]
    log = run_dir.parent / f"{run_dir.name}.log"
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, cwd=tree, env={**env, "PYTHONPATH": str(tree)}, stdout=f,
                              stderr=subprocess.STDOUT, check=False)
    rec: dict[str, Any] = {"run_dir": str(run_dir), "reused": False, "command": cmd, "log": str(log),
                           "wall_seconds": time.perf_counter() - start, "rc": proc.returncode}
    if proc.returncode == 0:
        rec["summary"] = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    else:
        lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        rec["error"] = lines[-1] if lines else f"exit status {proc.returncode}"
    return rec


def _row(rec: dict[str, Any]) -> dict[str, Any]:
    s = rec.get("summary")
    if s is None:
        return {"error": rec.get("error")}
    return {"test_accuracy": s.get("test_accuracy"), "test_loss": s.get("test_loss"),
            "selected_blocks": [b["name"] for b in (s.get("selection") or {}).get("blocks", [])],
            "trainable_params": s.get("trainable_params"), "train_seconds": s.get("train_seconds"),
            "wall_seconds": rec.get("wall_seconds"), "reused": rec.get("reused"), "run_dir": rec.get("run_dir")}


def compare(current: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Accuracy difference in points, whether the selection is the same, and the training-time ratio."""
    if "error" in current or "error" in baseline:
        return {"accuracy_diff": None, "same_selection": None, "time_ratio": None}
    ratio = (current["train_seconds"] / baseline["train_seconds"]
             if current.get("train_seconds") and baseline.get("train_seconds") else None)
    return {"accuracy_diff": 100.0 * (current["test_accuracy"] - baseline["test_accuracy"]),
            "same_selection": current["selected_blocks"] == baseline["selected_blocks"], "time_ratio": ratio}


def build_parser():
    p = harness.study_parser(EXPERIMENT, __doc__, flags=("settings", "set", "workdir", "out", "smoke", "threads"),
                             workdir=REPO_ROOT / "runs" / NAME)
    p.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                   help="a checkout of the earlier revision (its nc_finetune/ and recipes/ are used)")
    p.add_argument("--sequential", action="store_true", help="run the baseline first instead of at the same time")
    return p


def main(argv: list[str] | None = None) -> int:
    args = harness.parse_args(build_parser(), EXPERIMENT, argv)
    if args.baseline is None:
        print("default_recipes: --baseline DIR is required (a checkout of the earlier revision)", file=sys.stderr)
        return 2
    base = args.baseline.resolve()
    if not (base / "nc_finetune" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {base} is not a checkout of nc-finetune (no nc_finetune/__init__.py)")
    info, cmd = start_study("Default recipes: this checkout beside an earlier one")
    env = harness.subprocess_env(args.threads)
    trees = {"current": REPO_ROOT, "baseline": base}
    results: dict[str, Any] = {}
    for name in args.settings:
        s = EXPERIMENT.settings[name]
        overrides = [*s.get("overrides", []), *args.overrides]
        recs: dict[str, dict[str, Any]] = {}

        def one(which: str, s=s, overrides=overrides, name=name, recs=recs) -> None:
            recs[which] = run_in_tree(trees[which], s["recipe"], overrides, args.workdir / name / which, env)

        print(f"[{name}] {s['about']} ...", flush=True)
        if args.sequential:
            one("baseline")
            one("current")
        else:
            threads = [threading.Thread(target=one, args=(w,)) for w in ("baseline", "current")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        rows = {w: _row(recs[w]) for w in ("current", "baseline")}
        results[name] = {"recipe": s["recipe"], "overrides": overrides, **rows,
                         **compare(rows["current"], rows["baseline"])}
        print(json.dumps({k: results[name][k] for k in ("accuracy_diff", "same_selection", "time_ratio")}),
              flush=True)
    table = [[n, f"{100 * r['baseline'].get('test_accuracy', float('nan')):.2f}",
              f"{100 * r['current'].get('test_accuracy', float('nan')):.2f}",
              "yes" if r["same_selection"] else "no", f"{r['baseline'].get('train_seconds') or float('nan'):.0f}",
              f"{r['current'].get('train_seconds') or float('nan'):.0f}",
              f"{r['time_ratio']:.2f}" if r["time_ratio"] else "—"] for n, r in results.items()]
    print(markdown_table(["setting", "baseline acc %", "current acc %", "same blocks", "baseline train s",
                          "current train s", "ratio"], table))
    write_results(args.out, {"benchmark": NAME, "command": cmd, "machine": info, "args": harness.args_record(args),
                             "revisions": {w: git_revision(t) for w, t in trees.items()},
                             "mode": "sequential" if args.sequential else "concurrent (same load on both)",
                             "settings": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
