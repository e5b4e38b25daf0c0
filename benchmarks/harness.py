"""The benchmark harness: experiment files, the shared command line and the run plan every study uses.

A *study* is a script in this folder with a ``main(argv)`` (see :data:`STUDIES`). What it runs -- its settings
(tasks, cases, models), modes, seeds and smoke preset -- is data in ``experiments/<study>.yaml``, read by
:func:`load_experiment`; the flags every study shares (``--out``, ``--workdir``, ``--seeds``, ``--smoke``, ``--set``,
``--settings`` ...) are defined once in :func:`study_parser`, and a study adds only its own. Studies that train
through ``nc-finetune run`` share :func:`validate_plan` and :func:`run_plan`. Studies import nothing from each other.

Run a study as ``python benchmarks/run.py STUDY [options]`` or as ``python benchmarks/STUDY.py [options]``.

Experiment file (YAML; unknown top-level keys are refused)::

    settings:          # name -> {recipe, overrides, about, ...study-specific keys}; order = listing order
    default_settings:  # the settings run when none is named (default: all, in file order)
    modes:             # name -> recipe overrides of that mode
    seeds:             # default seeds
    params:            # study-specific constants (budgets, source overrides, grids ...)
    smoke:             # argument values of --smoke (by destination; list flags such as --set are prepended)
    anchors:           # YAML anchors only (&name), never read

Lists of overrides may nest (``[data.name=mnist-5k, *small]``): they are flattened in order.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import BENCH_DIR, REPO_ROOT, default_out, write_results

if str(REPO_ROOT) not in sys.path:  # a source checkout runs the studies without installing the package
    sys.path.insert(0, str(REPO_ROOT))

#: Every study, in the order of benchmarks/README.md.
STUDIES = ("probe_overhead", "finetune_efficiency", "gpu_speed", "progressive_collapse", "layer_selection",
           "data_scarce", "input_shift", "selection_regret", "streaming_memory", "default_recipes")
EXPERIMENTS_DIR = BENCH_DIR / "experiments"
SMOKE_DIR = BENCH_DIR / "out" / "smoke"
#: The flags :func:`study_parser` can add; a study names the ones it takes.
COMMON_FLAGS = ("settings", "modes", "seeds", "set", "workdir", "out", "smoke", "device", "threads", "cache_prefix",
                "dry_run")
_TOP_KEYS = {"settings", "default_settings", "modes", "seeds", "params", "smoke", "anchors"}
_SUMMARY_KEYS = ("test_accuracy", "test_loss", "test_samples", "trainable_params", "total_params", "head_params",
                 "trainable_fraction", "train_seconds", "seconds_per_epoch", "steps", "epochs_run", "peak_memory_mb",
                 "device", "world_size", "prefix_cache", "method", "train_samples")


# --------------------------------------------------------------------------------------------------- experiments


class ExperimentError(ValueError):
    """An experiment file that does not follow the schema (one line naming the file and the key)."""


@dataclass(frozen=True)
class Experiment:
    """One study's experiment file.

    Attributes:
        study: The study's name (the file's stem).
        path: The file.
        settings: ``{name: {"recipe", "overrides", "about", ...}}`` in file order (overrides flattened).
        default_settings: The settings run when none is named.
        modes: ``{name: [override, ...]}`` in file order.
        seeds: Default seeds (empty: the study takes none).
        params: Study-specific constants.
        smoke: Argument values of ``--smoke``, by argparse destination.
    """

    study: str
    path: Path
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_settings: list[str] = field(default_factory=list)
    modes: dict[str, list[str]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    smoke: dict[str, Any] = field(default_factory=dict)

    @property
    def recipes(self) -> dict[str, str]:
        """``{setting: recipe}`` of the settings that name a recipe."""
        return {name: s["recipe"] for name, s in self.settings.items() if "recipe" in s}

    def listing(self) -> str:
        """The settings and modes, one per line (what ``--list-settings`` prints)."""
        lines = [f"settings of {self.study} (recipe + overrides, applied before --set and the mode's own keys):"]
        for name, s in self.settings.items():
            mark = "*" if name in self.default_settings else " "
            lines.append(f" {mark}{name:<24} {s.get('about', '')}")
            recipe = s.get("recipe") or s.get("model")
            if recipe:
                lines.append(f"  {'':<24} {recipe} {' '.join(s.get('overrides', []))}".rstrip())
        if self.modes:
            lines.append("modes:")
            lines += [f"  {name:<24} {' '.join(over)}" for name, over in self.modes.items()]
        if self.seeds:
            lines.append(f"seeds: {' '.join(map(str, self.seeds))}")
        lines.append("(* = run by default)")
        return "\n".join(lines)


def experiment_path(study: str) -> Path:
    """``benchmarks/experiments/<study>.yaml``."""
    return EXPERIMENTS_DIR / f"{study}.yaml"


def load_experiment(study: str, path: Path | None = None) -> Experiment:
    """Read and check a study's experiment file.

    Args:
        study: The study's name.
        path: The file (default :func:`experiment_path`).

    Returns:
        The parsed experiment.

    Raises:
        ExperimentError: a missing file, an unknown key, a wrong type, an override without ``=``, a default setting
            or smoke setting that is not defined.
    """
    import yaml

    path = path or experiment_path(study)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ExperimentError(f"{path}: {e}") from None
    where = path.name
    if not isinstance(raw, dict):
        raise ExperimentError(f"{where}: expected a mapping at the top level")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ExperimentError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")

    settings = {}
    for name, s in _mapping(raw.get("settings"), f"{where}: settings").items():
        s = dict(_mapping(s, f"{where}: settings.{name}"))
        if not isinstance(s.get("about"), str):
            raise ExperimentError(f"{where}: settings.{name}.about: a one-line description is required")
        if "overrides" in s:
            s["overrides"] = _overrides(s["overrides"], f"{where}: settings.{name}.overrides")
        settings[str(name)] = s
    modes = {str(m): _overrides(o, f"{where}: modes.{m}")
             for m, o in _mapping(raw.get("modes"), f"{where}: modes").items()}
    defaults = raw.get("default_settings", list(settings))
    if not isinstance(defaults, list) or any(d not in settings for d in defaults):
        raise ExperimentError(f"{where}: default_settings must list defined settings ({', '.join(settings)}); "
                              f"got {defaults!r}")
    seeds = raw.get("seeds", [])
    if not isinstance(seeds, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise ExperimentError(f"{where}: seeds must be a list of integers; got {seeds!r}")
    smoke = dict(_mapping(raw.get("smoke"), f"{where}: smoke"))
    if "overrides" in smoke:
        smoke["overrides"] = _overrides(smoke["overrides"], f"{where}: smoke.overrides")
    return Experiment(study=study, path=path, settings=settings, default_settings=list(defaults), modes=modes,
                      seeds=list(seeds), params=dict(_mapping(raw.get("params"), f"{where}: params")), smoke=smoke)


def _mapping(value: Any, where: str) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ExperimentError(f"{where}: expected a mapping; got {type(value).__name__}")
    return value


def flatten(items: Iterable[Any]) -> list[Any]:
    """Nested lists (from YAML aliases) flattened in order."""
    out: list[Any] = []
    for item in items:
        out.extend(flatten(item) if isinstance(item, list) else [item])
    return out


def _overrides(value: Any, where: str) -> list[str]:
    if not isinstance(value, list):
        raise ExperimentError(f"{where}: expected a list of KEY=VALUE overrides; got {value!r}")
    items = flatten(value)
    for item in items:
        if not isinstance(item, str) or "=" not in item or item.startswith("="):
            raise ExperimentError(f"{where}: expected KEY=VALUE; got {item!r}")
    return items


# --------------------------------------------------------------------------------------------------- command line


def override(text: str) -> str:
    """argparse type of ``--set``: a ``key=value`` recipe override (the recipe loader checks key and value later)."""
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"expects key=value (e.g. train.max_steps=5); got {text!r}")
    return text


def seed_list(text: str) -> list[int]:
    """argparse type of ``--seeds``: an integer, or a YAML list of integers (``"[0, 1, 2]"``)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise argparse.ArgumentTypeError(f"a seed is an integer (or a YAML list of them); got {text!r}")
    return values


class _ExtendFlat(argparse.Action):
    """``--seeds 0 1 2`` and ``--seeds "[0, 1, 2]"`` both give ``[0, 1, 2]``."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, flatten(values))


def study_parser(exp: Experiment, doc: str, *, flags: Sequence[str] = COMMON_FLAGS,
                 settings_alias: str | None = None, settings_choices: bool = True, settings_type=None,
                 settings_default: list[Any] | None = None, workdir: Path | str | None = None,
                 out: Path | None = None, device: str | None = None, cache_prefix: str = "recipe",
                 helps: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The parser of one study with the shared flags it names; the study adds its own flags to it.

    Args:
        exp: The study's experiment (settings, defaults).
        doc: The study's module docstring: the text before ``Examples:`` is the description, the rest the epilog.
        flags: Which of :data:`COMMON_FLAGS` the study takes.
        settings_alias: The study's own name of ``--settings`` (``--tasks``, ``--cases`` ...); its destination is
            the alias's name, and ``--list-<alias>`` lists the experiment file.
        settings_choices: Refuse names that are not settings of the experiment.
        settings_type: argparse type of a setting name (e.g. a parser of ``name:severity``).
        settings_default: Default of ``--settings`` (default: the experiment's default settings).
        workdir: Default of ``--workdir`` (``None``: a temporary directory, deleted at the end).
        out: Default of ``--out`` (default ``benchmarks/out/<study>.json``).
        device: Default of ``--device`` (``None``: the recipe's).
        cache_prefix: Default of ``--cache-prefix`` (``recipe``: keep the recipe's ``train.cache_prefix``).
        helps: Help texts replacing the shared ones, by flag destination.

    Returns:
        The parser.
    """
    unknown = sorted(set(flags) - set(COMMON_FLAGS))
    if unknown:
        raise ValueError(f"unknown common flag(s) {unknown}")
    helps = helps or {}
    intro, _, examples = doc.partition("Examples:")
    p = argparse.ArgumentParser(prog=f"python benchmarks/run.py {exp.study}", description=intro.rstrip(),
                                epilog=exp.listing() + ("\n\nExamples:" + examples if examples else ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ["--settings"] + ([settings_alias] if settings_alias else [])
    dest = settings_alias.lstrip("-").replace("-", "_") if settings_alias else "settings"
    if "settings" in flags:
        choices = list(exp.settings) if settings_choices and exp.settings else None
        default = exp.default_settings if settings_default is None else settings_default
        p.add_argument(*names, dest=dest, nargs="+", default=default, choices=choices, type=settings_type,
                       metavar="NAME", help=helps.get("settings", f"settings to run, of {', '.join(exp.settings)} "
                                                                  f"(default: {' '.join(map(str, default))})"))
        p.add_argument(*[f"--list-{n.lstrip('-')}" for n in names], dest=f"list_{dest}", action="store_true",
                       help="print the experiment file's settings, modes and seeds, then exit")
    if "modes" in flags:
        p.add_argument("--modes", nargs="+", default=list(exp.modes), choices=list(exp.modes), metavar="MODE",
                       help=helps.get("modes", f"modes, of {', '.join(exp.modes)} (default: all)"))
    if "seeds" in flags:
        p.add_argument("--seeds", nargs="+", type=seed_list, action=_ExtendFlat, default=exp.seeds, metavar="SEED",
                       help=helps.get("seeds", f"seeds; each sets train.seed and selection.seed (default: "
                                               f"{' '.join(map(str, exp.seeds))})"))
    if "set" in flags:
        p.add_argument("--set", dest="overrides", action="append", type=override, default=[], metavar="KEY=VALUE",
                       help=helps.get("set", "recipe override of every run, after the setting's own, repeatable"))
    if "workdir" in flags:
        p.add_argument("--workdir", type=Path, default=workdir,
                       help=helps.get("workdir", "keep the run directories here; a finished identical run found "
                                                 "there is reused, so an interrupted study continues"
                                                 + ("" if workdir else " (default: a temporary directory, deleted)")))
    if "out" in flags:
        default_path = out or default_out(exp.study)
        p.add_argument("--out", type=Path, default=default_path,
                       help=helps.get("out", f"JSON of the raw results (default {_shown(default_path)}); a figure "
                                             "goes next to it with the suffix .png"))
    if "smoke" in flags:
        p.add_argument("--smoke", action="store_true",
                       help=f"a tiny run to check the pipeline (the experiment file's smoke preset; flags given "
                            f"still win); --out and --workdir default to {_shown(SMOKE_DIR)}/")
    if "device" in flags:
        shown = device or "the recipe's"
        p.add_argument("--device", default=device, metavar="DEVICE",
                       help=helps.get("device", f"auto, cpu or cuda[:N]: sets train.device and probe.device "
                                                f"(default: {shown})"))
    if "threads" in flags:
        p.add_argument("--threads", type=int, default=None,
                       help=helps.get("threads", "OMP/MKL threads of each run (default: unset, torch uses all "
                                                 "cores)"))
    if "cache_prefix" in flags:
        p.add_argument("--cache-prefix", choices=["off", "auto", "on", "recipe"], default=cache_prefix,
                       help=helps.get("cache_prefix", f"train.cache_prefix of every run (default {cache_prefix!r}; "
                                                      "'recipe' keeps the recipe's)"))
    if "dry_run" in flags:
        p.add_argument("--dry-run", action="store_true",
                       help="validate every run's recipe, print the runs and exit")
    return p


def _shown(path: Path) -> str:
    try:
        return str(Path(path).relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def parse_args(parser: argparse.ArgumentParser, exp: Experiment,
               argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a study's arguments; ``--smoke`` applies the experiment's smoke preset under the flags given.

    Lists of settings, modes and seeds lose their repeats (order kept). ``--smoke`` makes the preset's values the
    defaults (``--set``-style lists: the preset's items first, then the given ones), and sends ``--out`` and
    ``--workdir`` to ``benchmarks/out/smoke/`` unless they are given.

    Returns:
        The arguments.

    Raises:
        SystemExit: after ``--help`` or ``--list-...`` (status 0) or a bad argument (status 2).
    """
    args = parser.parse_args(argv)
    if getattr(args, "smoke", False):
        dests = {a.dest: a for a in parser._actions}
        unknown = sorted(set(exp.smoke) - set(dests))
        if unknown:
            raise ExperimentError(f"{exp.path.name}: smoke sets unknown argument(s) {unknown}")
        given = vars(args)
        preset = {}
        for key, value in exp.smoke.items():
            action = dests[key]
            value = _typed(action, value)
            if isinstance(action, argparse._AppendAction):  # --set and the like: the given items come last, win
                preset[key] = [*value, *given[key]]
            elif given[key] == action.default:
                preset[key] = value
        if "out" in dests and given["out"] == dests["out"].default:
            preset["out"] = SMOKE_DIR / f"{exp.study}.json"
        if "workdir" in dests and given["workdir"] == dests["workdir"].default:
            preset["workdir"] = SMOKE_DIR / exp.study
        args = argparse.Namespace(**{**given, **preset})
    listing = next((a.dest for a in parser._actions if a.dest.startswith("list_")), None)
    if listing and getattr(args, listing):
        print(exp.listing())
        raise SystemExit(0)
    for dest in {_settings_dest(parser), "modes", "seeds"}:
        value = getattr(args, dest, None)
        if isinstance(value, list):
            setattr(args, dest, list(dict.fromkeys(value)))
    return args


def _typed(action: argparse.Action, value: Any) -> Any:
    """A preset value as the flag's type would have parsed it from text (strings only)."""
    if action.type is None:
        return value
    if isinstance(value, list):
        value = [action.type(v) if isinstance(v, str) else v for v in value]
        return flatten(value) if isinstance(action, _ExtendFlat) else value
    return action.type(value) if isinstance(value, str) else value


def _settings_dest(parser: argparse.ArgumentParser) -> str:
    for a in parser._actions:
        if "--settings" in a.option_strings:
            return a.dest
    return "settings"


def args_record(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as JSON-ready values (paths as strings), for a study's raw results."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def device_overrides(device: str | None) -> list[str]:
    """``train.device`` and ``probe.device`` set to ``device`` (none when ``None``: the recipe's)."""
    return [] if device is None else [f"train.device={device}", f"probe.device={device}"]


def shared_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides ``--device`` and ``--cache-prefix`` give every run (none where they keep the recipe's)."""
    over = device_overrides(getattr(args, "device", None))
    if getattr(args, "cache_prefix", "recipe") != "recipe":
        over.append(cache_override(args.cache_prefix))
    return over


def report(study: str, args: argparse.Namespace, cmd: str, info: dict[str, Any], **fields: Any) -> Path:
    """Write a study's raw results to ``args.out`` and say where they (and a ``figure``) are.

    The JSON holds the study's name, the command line, the machine and the arguments, then ``fields`` in the order
    given (paths as strings).

    Returns:
        The written path.
    """
    fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()}
    path = write_results(args.out, {"benchmark": study, "command": cmd, "machine": info, "args": args_record(args),
                                    **fields})
    print(f"raw results: {path}" + (f"; figure: {fields['figure']}" if fields.get("figure") else ""))
    return path


def cache_override(value: str) -> str:
    """``train.cache_prefix=<value>``, quoted: override values are YAML and YAML 1.1 reads bare on/off as booleans."""
    return f"train.cache_prefix='{value}'"


# --------------------------------------------------------------------------------------------------- running


def resolve_recipe(recipe: str, overrides: list[str]) -> dict[str, Any]:
    """The fully resolved recipe as a dict (validates every override before anything runs).

    Raises:
        UserError: unknown recipe, bad key or value.
    """
    from nc_finetune.cli import resolve_recipe_path
    from nc_finetune.config import load_recipe, recipe_to_dict

    return recipe_to_dict(load_recipe(resolve_recipe_path(recipe), overrides))


def _normalised(recipe: dict[str, Any] | None) -> dict[str, Any] | None:
    """A recipe dict read back from an older run, with keys added to the schema since then at their defaults."""
    from nc_finetune.config import Recipe, from_dict, recipe_to_dict
    from nc_finetune.errors import ConfigError

    try:
        return recipe_to_dict(from_dict(Recipe, recipe, "")) if recipe is not None else None
    except ConfigError:
        return recipe


def subprocess_env(threads: int | None) -> dict[str, str]:
    """Environment of the runs: quiet tokenizers, and ``OMP/MKL_NUM_THREADS`` when ``threads`` is given."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        import torch

        torch.set_num_threads(threads)  # so the header shows what the runs use
    return env


def run_mode(recipe: str, overrides: list[str], run_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``nc-finetune run`` in a fresh process (or reuse a finished identical run in ``run_dir``).

    Returns:
        ``{"command", "run_dir", "rc", "wall_seconds", "summary" | "error", "reused"}``.
    """
    import json

    cmd = [sys.executable, "-m", "nc_finetune.cli", "run", recipe, *overrides, "--out", str(run_dir), "--quiet"]
    rec: dict[str, Any] = {"command": cmd, "run_dir": str(run_dir), "reused": False}
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if _normalised(summary.get("recipe")) == resolve_recipe(recipe, overrides):
            return rec | {"rc": 0, "wall_seconds": None, "summary": summary, "reused": True}
        raise SystemExit(f"{run_dir} holds a run made with a different recipe; use another --workdir")
    if run_dir.exists():  # an interrupted run of an earlier benchmark: start it again
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env, check=False)
    rec |= {"rc": proc.returncode, "wall_seconds": time.perf_counter() - start, "log": str(log)}
    if proc.returncode == 0 and summary_path.is_file():
        rec["summary"] = json.loads(summary_path.read_text(encoding="utf-8"))
    else:
        lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        rec["error"] = lines[-1] if lines else f"exit status {proc.returncode}"
        rec["log_tail"] = lines[-20:]
    return rec


def slim(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary keys the studies read, plus the selected blocks and the selection strategy."""
    out = {k: summary.get(k) for k in _SUMMARY_KEYS}
    sel = summary.get("selection") or {}
    out["selected_blocks"] = [b["name"] for b in sel.get("blocks", [])]
    out["selection_strategy"] = sel.get("strategy")
    return out


def validate_plan(plan: list[dict[str, Any]]) -> None:
    """Resolve every run's recipe into ``item["resolved"]`` before anything trains (a typo fails in a second).

    Raises:
        SystemExit: an override that the recipe schema rejects.
    """
    for item in plan:
        try:
            item["resolved"] = resolve_recipe(item["recipe"], item["overrides"])
        except Exception as e:
            raise SystemExit(f"{item['recipe']} {' '.join(item['overrides'])}: {e}") from None


def print_plan(plan: list[dict[str, Any]]) -> None:
    """One line per planned run: its directory, recipe and overrides (``--dry-run``)."""
    for item in plan:
        print(f"{item['path']}: {item['recipe']} {' '.join(item['overrides'])}")


def plan_only(plan: list[dict[str, Any]], args: argparse.Namespace) -> bool:
    """Validate every planned run (:func:`validate_plan`); under ``--dry-run`` print the plan and return True."""
    validate_plan(plan)
    if getattr(args, "dry_run", False):
        print_plan(plan)
        return True
    return False


def run_plan(plan: list[dict[str, Any]], workdir: Path | None, env: dict[str, str], prefix: str,
             keep_summary: bool = False) -> list[dict[str, Any]]:
    """Run every planned ``nc-finetune run`` in a fresh process (reusing finished identical runs in ``workdir``).

    Args:
        plan: Items with ``recipe``, ``overrides`` and ``path`` (the run directory relative to the workdir), plus
            any labels (copied into the record).
        workdir: Keep the run directories here; ``None``: a temporary directory deleted at the end.
        env: Environment of the subprocesses.
        prefix: Name prefix of the temporary directory.
        keep_summary: Keep each run's whole ``summary`` in its record besides the slim ``result``.

    Returns:
        One record per item: the labels, ``command``, ``rc``, ``wall_seconds``, ``reused`` and ``result`` (the
        summary keys the studies read, :func:`slim`) or ``error``.
    """
    tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix=f"nc_{prefix}_")) if tmp else workdir
    records = []
    try:
        for i, item in enumerate(plan, 1):
            print(f"[{i}/{len(plan)}] {item['path']} ...", file=sys.stderr, flush=True)
            rec = run_mode(item["recipe"], item["overrides"], root / item["path"], env)
            wall = f"{rec['wall_seconds']:.0f} s" if rec["wall_seconds"] is not None else "reused"
            print(f"    {'ok' if 'summary' in rec else 'FAILED: ' + rec['error']} ({wall})", file=sys.stderr,
                  flush=True)
            rec |= {k: v for k, v in item.items() if k != "resolved"}
            if "summary" in rec:
                rec["result"] = slim(rec["summary"] if keep_summary else rec.pop("summary"))
            records.append(rec)
    finally:
        if tmp:
            shutil.rmtree(root, ignore_errors=True)
    return records


def by_mode(records: list[dict[str, Any]], modes: Iterable[str], key=lambda r: r["mode"],
            label=lambda r: f"{r['mode']} (seed {r['seed']})") -> tuple[dict[Any, dict[int, dict[str, Any]]],
                                                                      dict[str, str]]:
    """Finished runs grouped ``{key: {seed: result}}`` (every mode present, maybe empty) and the failures.

    Args:
        records: Records of :func:`run_plan` (of one setting).
        modes: Keys that get an entry even without a finished run.
        key: The group of a record (default its mode).
        label: How a failed record is named (default ``"mode (seed s)"``).

    Returns:
        ``(groups, {label: error})``.
    """
    groups: dict[Any, dict[int, dict[str, Any]]] = {m: {} for m in modes}
    failures = {}
    for r in records:
        if "result" in r:
            groups.setdefault(key(r), {})[r["seed"]] = r["result"]
        else:
            failures[label(r)] = r["error"]
    return groups, failures
