"""The ``nc-finetune`` command line.

Every subcommand takes a YAML recipe (a path, or the name of a built-in recipe in ``recipes/``) followed by
optional ``dotted.key=value`` overrides. Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from importlib import resources
from pathlib import Path

from nc_finetune import __version__, runs
from nc_finetune.errors import UserError

# Package data, so `ls` and recipes by name work from an installed wheel; the top-level recipes/ is a symlink here.
RECIPES_DIR = Path(str(resources.files("nc_finetune") / "recipes"))

_EPILOG = """\
examples:
  nc-finetune ls                                         # built-in recipes, backbones and datasets
  nc-finetune validate recipes/probe-minilm-rotten-tomatoes.yaml
  nc-finetune probe probe-minilm-rotten-tomatoes --out runs/minilm-probe
  nc-finetune probe recipes/probe-effnet-lite0-fashion-mnist.yaml probe.samples_per_class=50 --out runs/p
  nc-finetune run minilm-rotten-tomatoes --out runs/minilm-rt           # probe -> select -> adapt -> train
  nc-finetune run minilm-rotten-tomatoes adapt.method=lora selection.strategy=last_k --out runs/lora
  nc-finetune run minilm-rotten-tomatoes --out runs/minilm-rt --resume  # continue a killed run
  nc-finetune rank rank-effnet-fashion-mnist --out runs/rank            # collapse vs LogME, H-score, size
  nc-finetune sweep effnet-lite0-fashion-mnist sweep.seeds=[0,1,2] --out runs/sweep  # per-block oracle, regret
  nc-finetune report runs/minilm-rt                                     # report.md + PNGs

recipes are YAML files with sections backbone, data, probe, selection, adapt, train, rank, sweep (recipes/*.yaml);
any key can be overridden on the command line as section.key=value (values are parsed as YAML: 32, null,
[0, 3], true). Bad input exits with status 2 and one line that names the problem.
"""


def resolve_recipe_path(name: str) -> Path:
    """A recipe argument is a file path, or the stem of a built-in recipe in ``recipes/``."""
    path = Path(name)
    if path.is_file():
        return path
    builtin = RECIPES_DIR / f"{name}.yaml"
    if builtin.is_file():
        return builtin
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))) or "(none found)"
    raise UserError(f"recipe '{name}' is neither a file nor a built-in recipe; built-in recipes: {known}")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file, or the name of a built-in recipe (see `nc-finetune ls`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. probe.batch_size=32")
    _add_print_config(p)


def _add_print_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved recipe (YAML, overrides applied) and exit without loading anything")


def _add_out_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="run directory")
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {what}")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nc-finetune",
        description="Measure layer-wise neural collapse of pretrained backbones on downstream data, "
                    "and fine-tune only the blocks it points to.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nc-finetune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("probe", help="one streaming pass: collapse metrics at every block -> probe.json, probe.png",
                       description="Probe every block of the recipe's backbone on its downstream training data. "
                                   "Writes DIR/probe.json (per-layer metrics + provenance), DIR/probe.png and "
                                   "DIR/resolved.yaml, and prints the per-layer table.")
    _add_recipe_args(p)
    _add_out_args(p, "probe.json / probe.png")

    p = sub.add_parser("select", help="probe, then choose blocks under a budget -> selection.json",
                       description="Probe (reusing DIR/probe.json when it was made with the same probe settings) "
                                   "and select blocks with selection.strategy under selection.max_blocks / "
                                   "max_param_fraction. Writes DIR/selection.json and prints the rationale.")
    _add_recipe_args(p)
    _add_out_args(p, runs.SELECTION)
    p.add_argument("--emit-peft", type=Path, default=None, metavar="FILE",
                   help="also write a peft LoraConfig (adapter_config.json format) for the plain model (no wrapper)")

    p = sub.add_parser("run", help="probe -> select -> adapt -> train -> summary.json",
                       description="The whole pipeline. Writes resolved.yaml, probe.json/png, selection.json, "
                                   "metrics.jsonl, checkpoint/, trainable.safetensors (and adapter/ for LoRA) and "
                                   "summary.json to DIR. Multi-GPU: accelerate launch -m nc_finetune.cli run ...")
    _add_recipe_args(p)
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="run directory (must be new unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue a killed run in DIR from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("eval", help="reload a finished run and score a split",
                       description="Rebuild the model of a finished run from DIR (resolved.yaml, selection.json, "
                                   "trainable.safetensors) and report accuracy on a split. data.* overrides score "
                                   "it on other data with the same classes, e.g. a shifted test set: "
                                   "nc-finetune eval runs/x data.corruption=gaussian_noise data.corruption_severity=5")
    p.add_argument("run_dir", type=Path, metavar="DIR")
    p.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE",
                   help="change the run's data section (other sections describe the trained model and stay)")
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--batch-size", type=int, default=None)
    _add_print_config(p)

    p = sub.add_parser("predict", help="per-sample predictions and probabilities of a finished run on new data",
                       description="Rebuild the model of a finished run from DIR and write one row per input of DATA "
                                   "to --out (.csv or .jsonl): predicted class name and id, its probability and "
                                   "every class's probability (and the label when DATA has the run's label column). "
                                   "DATA: a table (.csv .tsv .json .jsonl .parquet) with a text column for a text "
                                   "model; an image file or a directory of images for an image model.")
    p.add_argument("run_dir", type=Path, metavar="DIR")
    p.add_argument("data", type=Path, metavar="DATA")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="predictions file (.csv or .jsonl)")
    p.add_argument("--column", default=None, help="text column of DATA (default: the run's data.text_column, "
                                                  "else text/sentence/content/review)")
    p.add_argument("--batch-size", type=int, default=None)

    p = sub.add_parser("export", help="write a finished run's model in its library's format (transformers, timm, peft)",
                       description="Write the model of a finished run so that transformers / timm / peft load it "
                                   "without nc-finetune: a save_pretrained directory with id2label (Hugging Face), "
                                   "a timm local-dir checkpoint, or a peft adapter for LoRA runs (--merge: a plain "
                                   "model). SCL-FT and truncated backbones: weights + nc_finetune.export.load_export. "
                                   "DIR/nc_export.json says how to load it.")
    p.add_argument("run_dir", type=Path, metavar="RUN")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="new export directory")
    p.add_argument("--merge", action="store_true", help="LoRA runs: merge the adapter into the weights")

    p = sub.add_parser("rank", help="rank candidate backbones and their layers by downstream collapse -> rank.json",
                       description="Probe every backbone in rank.candidates on the recipe's data (one pass each: "
                                   "NC1, trace ratio, CDNV, LogME, H-score, NCTI terms, size) and correlate each "
                                   "score with the ground truth (rank.finetune runs, or the linear probe): Kendall "
                                   "tau and weighted tau. Writes DIR/rank.json, DIR/rank.png, DIR/candidates/.")
    _add_recipe_args(p)
    _add_out_args(p, runs.RANK)

    p = sub.add_parser("sweep", help="tune each block alone per seed and lr: oracle block, regret of every strategy",
                       description="Fine-tune every candidate block set alone (sweep.candidates: blocks, pairs or a "
                                   "list) for every seed in sweep.seeds and rate in sweep.lr_grid (chosen on "
                                   "validation, train.val_fraction > 0), each cell an ordinary run directory under "
                                   "DIR/cells/. Every selection strategy picks blocks under each of sweep.budgets "
                                   "from the same seed's probe; its regret is the oracle's test accuracy minus its "
                                   "pick's, paired per seed, with a 95% interval. Writes DIR/sweep.json and "
                                   "DIR/sweep.png. Rerun the same command to resume a killed sweep: finished cells "
                                   "are kept, an interrupted one continues from its checkpoint.")
    _add_recipe_args(p)
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="sweep directory (resumed if it holds a "
                   "sweep of the same recipe)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (the one line per cell stays)")

    p = sub.add_parser("report", help="render report.md (+ PNGs) for a probe, run, rank or ufm directory",
                       description="Render a self-contained Markdown page with PNGs from a run directory's JSON "
                                   "artefacts: per-layer curves, the chosen blocks and why, training curves, costs.")
    p.add_argument("run_dir", type=Path, metavar="DIR")
    p.add_argument("--out", type=Path, default=None, help="output directory or .md path (default: DIR/report.md)")

    p = sub.add_parser("ufm", help="train the unconstrained feature model and compare with its closed-form optimum",
                       description="Train the unconstrained feature model (Zhu et al. 2021) with L-BFGS and show NC1, "
                                   "NC2, NC3 falling to the closed-form global optimum. Refuses parameters with "
                                   "K*sqrt(n*lambda_w*lambda_h) >= 1, where the optimum is W = H = 0.")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="writes DIR/ufm.json and DIR/ufm.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing ufm.json / ufm.png")
    p.add_argument("--classes", type=int, default=4, help="K (default 4)")
    p.add_argument("--per-class", type=int, default=5, help="n samples per class (default 5)")
    p.add_argument("--dim", type=int, default=8, help="feature dimension d >= K-1 (default 8)")
    p.add_argument("--lambda-w", type=float, default=5e-3)
    p.add_argument("--lambda-h", type=float, default=5e-3)
    p.add_argument("--lambda-b", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-iter", type=int, default=2000)

    p = sub.add_parser("validate", help="check a recipe (keys, types, allowed values) without loading anything")
    _add_recipe_args(p)

    sub.add_parser("ls", help="list built-in recipes, backbones and datasets")
    return parser


def _load_recipe(args: argparse.Namespace):
    """The command's recipe; under torchrun / accelerate launch also the process group (before the probe)."""
    from nc_finetune.config import load_recipe
    from nc_finetune.utils.dist import check_launch, start_distributed

    check_launch()
    recipe = load_recipe(resolve_recipe_path(args.recipe), args.overrides)
    start_distributed(recipe.train.device)
    return recipe


def _cmd_probe(args: argparse.Namespace) -> int:
    from nc_finetune.pipeline import run_probe_stage

    recipe = _load_recipe(args)
    result = run_probe_stage(recipe, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(result.format_table())
    m = result.meta
    print(f"{m['samples']} samples in {m['seconds']:.1f} s ({m['samples_per_second']:.1f}/s); "
          f"wrote {args.out / 'probe.json'} and {args.out / 'probe.png'}")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from nc_finetune.pipeline import probe_and_select

    recipe = _load_recipe(args)
    if args.emit_peft is not None and args.emit_peft.is_dir():
        raise UserError(f"--emit-peft {args.emit_peft} is a directory; give a file name (e.g. adapter_config.json)")
    selection = probe_and_select(recipe, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(selection.explain())
    print(f"wrote {args.out / 'selection.json'}")
    if args.emit_peft is not None:
        from nc_finetune.export import write_peft_config

        print(f"wrote {write_peft_config(recipe, selection, args.emit_peft)}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from nc_finetune.pipeline import run_pipeline

    recipe = _load_recipe(args)
    s = run_pipeline(recipe, args.out, resume=args.resume, progress=not args.quiet)
    print(f"{s['method']} on {s['dataset']}: test accuracy {s['test_accuracy']:.4f}; "
          f"{s['trainable_params']:,} of {s['total_params']:,} parameters trained "
          f"({100 * s['trainable_fraction']:.2f}%, head {s['head_params']:,}); "
          f"{s['train_seconds']:.1f} s training, peak memory {s['peak_memory_mb']:.0f} MB")
    print(f"blocks: {', '.join(b['name'] for b in s['selection']['blocks']) or '(head only)'}; "
          f"wrote {args.out / 'summary.json'}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from nc_finetune.pipeline import eval_stage

    r = eval_stage(args.run_dir, split=args.split, batch_size=args.batch_size, data_overrides=args.overrides)
    shifted = f" ({' '.join(args.overrides)})" if args.overrides else ""
    print(f"{args.run_dir} {r['split']}{shifted}: accuracy {r['accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}, "
          f"loss {r['loss']:.4f} on {r['samples']} samples")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from nc_finetune.predict import predict_stage

    r = predict_stage(args.run_dir, args.data, args.out, column=args.column, batch_size=args.batch_size)
    acc = f"; accuracy {r['accuracy']:.4f} against its labels" if r.get("accuracy") is not None else ""
    print(f"wrote {r['rows']} predictions over {len(r['class_names'])} classes to {r['out']}{acc}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from nc_finetune.export import export_run

    m = export_run(args.run_dir, args.out, merge=args.merge)
    print(f"wrote {args.out} ({m['format']}, {len(m['class_names'])} classes); load it with:\n"
          + m["load"].replace("DIR", repr(str(args.out))))
    return 0


def _cmd_rank(args: argparse.Namespace) -> int:
    from nc_finetune.pipeline import rank_stage

    recipe = _load_recipe(args)
    report = rank_stage(recipe, args.out, overwrite=args.overwrite, progress=not args.quiet)
    truth = report["truth_key"]
    print(f"{len(report['rows'])} candidates on {report['dataset']}; ground truth: {truth}")
    for row in report["rows"]:
        print(f"  {row['name']:<36} {truth} {row.get(truth, float('nan')):.4f}  nc1 {row.get('nc1', float('nan')):.4g}"
              f"  logme {row.get('logme', float('nan')):.4g}  params {row['params']:,}")
    for score, c in report["correlations"].items():
        print(f"  {score:<14} Kendall tau {c['kendall_tau']:+.3f}  weighted tau {c['weighted_tau']:+.3f}")
    print(f"wrote {args.out / 'rank.json'} and {args.out / 'rank.png'}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from nc_finetune.config import load_recipe
    from nc_finetune.sweep import format_sweep, sweep_stage

    recipe = load_recipe(resolve_recipe_path(args.recipe), args.overrides)
    report = sweep_stage(recipe, args.out, progress=not args.quiet, echo=lambda line: print(line, flush=True))
    print(format_sweep(report))
    print(f"wrote {args.out / 'sweep.json'} and {args.out / 'sweep.png'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from nc_finetune.report.render import render_report

    print(f"wrote {render_report(args.run_dir, args.out)}")
    return 0


def _cmd_ufm(args: argparse.Namespace) -> int:
    from nc_finetune.report.ufm_report import format_ufm, run_ufm

    runs.RunDir(args.out).check_writable([runs.UFM, runs.UFM_PLOT], args.overwrite)
    summary = run_ufm(args.out, num_classes=args.classes, n_per_class=args.per_class, dim=args.dim,
                      lambda_w=args.lambda_w, lambda_h=args.lambda_h, lambda_b=args.lambda_b, seed=args.seed,
                      max_iter=args.max_iter)
    print(format_ufm(summary))
    print(f"wrote {args.out / 'ufm.json'} and {args.out / 'ufm.png'}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from nc_finetune.config import load_recipe

    path = resolve_recipe_path(args.recipe)
    load_recipe(path, args.overrides)
    print(f"{path}: ok")
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    import yaml

    from nc_finetune.backbones import BUILTIN_BACKBONES
    from nc_finetune.data import BUILTIN_DATASETS

    print("recipes (nc-finetune <command> NAME):")
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        try:
            desc = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        except yaml.YAMLError:
            desc = "(invalid YAML)"
        print(f"  {path.stem:<40} {desc}")
    print("built-in backbones (backbone.name; also timm:<model>, hf:<hub id or path>):")
    for name, desc in BUILTIN_BACKBONES.items():
        print(f"  {name:<40} {desc}")
    print("built-in datasets (data.name; also hf:<hub id>, csv, json, parquet, imagefolder):")
    for name, desc in BUILTIN_DATASETS.items():
        print(f"  {name:<40} {desc}")
    return 0


def _silence_library_progress_bars() -> None:
    """``--quiet``: also turn off the progress bars that datasets / transformers / huggingface_hub write to stderr
    (through the environment for libraries not imported yet, through their switches for those already imported)."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    switches = (("datasets", "disable_progress_bars"), ("transformers.utils.logging", "disable_progress_bar"),
                ("huggingface_hub.utils", "disable_progress_bars"))
    for module, switch in switches:
        if module in sys.modules:
            getattr(sys.modules[module], switch)()


_COMMANDS = {"probe": _cmd_probe, "select": _cmd_select, "run": _cmd_run, "eval": _cmd_eval, "export": _cmd_export,
             "predict": _cmd_predict, "rank": _cmd_rank, "sweep": _cmd_sweep, "report": _cmd_report, "ufm": _cmd_ufm,
             "validate": _cmd_validate, "ls": _cmd_ls}

#: Commands that write into ``--out``: they hold its lock while they run (rank 0 of a distributed launch).
_WRITING_COMMANDS = ("probe", "select", "run", "rank", "ufm", "sweep")
def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse with ``key=value`` overrides accepted anywhere (before or after options); ``--print-config`` needs no
    ``--out``. (argparse's ``parse_intermixed_args`` does not support subcommands.)"""
    if "--print-config" in argv:
        for sub in parser._subparsers._group_actions[0].choices.values():  # every subcommand's parser
            for a in sub._actions:
                a.required = a.required and a.dest != "out"
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _print_config(args: argparse.Namespace) -> int:
    """``--print-config``: the resolved recipe as YAML (a run directory's for ``eval``)."""
    from nc_finetune.config import dump_recipe, load_recipe

    path = args.run_dir / runs.RESOLVED if args.command == "eval" else resolve_recipe_path(args.recipe)
    if not path.is_file():
        raise UserError(f"{args.run_dir} holds no run (no resolved.yaml)")
    if args.command == "eval":  # as eval_stage: the other sections describe the trained model
        bad = next((o for o in args.overrides if not o.split("=", 1)[0].strip().startswith("data.")), None)
        if bad is not None:
            raise UserError(f"eval accepts only data.* overrides (the rest describes the trained model); got {bad!r}")
    print(dump_recipe(load_recipe(path, args.overrides)), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nc-finetune`` console script."""
    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "quiet", False):
        _silence_library_progress_bars()
    try:
        if getattr(args, "print_config", False):
            return _print_config(args)
        from nc_finetune.utils.dist import launch_rank

        rank = launch_rank()
        with open(os.devnull, "w") if rank != 0 else contextlib.nullcontext(sys.stdout) as stdout, \
                contextlib.redirect_stdout(stdout):  # several processes: only rank 0 prints
            if args.command in _WRITING_COMMANDS and rank == 0:
                from nc_finetune.runs import RunDir

                with RunDir(args.out).lock(args.command):
                    return _COMMANDS[args.command](args)
            return _COMMANDS[args.command](args)
    except UserError as e:
        print(f"nc-finetune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nc-finetune {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output was piped into a reader that closed (`nc-finetune ls | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except Exception as e:  # a full or read-only disk met outside the atomic writers (a log append, an export)
        from nc_finetune.utils.io import disk_error

        reason = disk_error(e)
        if reason is None:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"nc-finetune {args.command}: error: {where}{reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
