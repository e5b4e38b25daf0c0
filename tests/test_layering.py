"""The package's floors: no module imports one on a higher floor (module-level or inside a function alike).

The floors follow the data flow of a run: a stage module gets what it needs as arguments from the floor above, so
it can be used (and tested) without run directories, recipes-as-commands or the CLI, and no import circle can form
across floors. Same-floor imports are free (``select`` and ``adapt``/``train`` cooperate: trials fine-tune, LISA
draws blocks while training).
"""

from __future__ import annotations

import ast
from pathlib import Path

import nc_finetune

PACKAGE = Path(nc_finetune.__file__).parent

#: Bottom to top. 0: shared definitions; 1: what a model and a dataset are; 2: measuring collapse; 3: the stages
#: that use a probe (choose blocks, adapt, train, transfer scores, the UFM, the rivals' recipe glue); 4: figures
#: and pages; 5: run directories (read and restore finished runs, the class names a run trained on); 6: the
#: commands composed from stages; 7: the command line.
FLOORS: dict[str, int] = {
    "errors": 0, "utils": 0, "config": 0,
    "backbones": 1, "data": 1,
    "probe": 2,
    "select": 3, "adapt": 3, "train": 3, "transfer": 3, "ufm": 3, "rivals": 3,
    "report": 4,
    "runs": 5, "restore": 5, "labels": 5,
    "pipeline": 6, "sweep": 6, "export": 6, "predict": 6, "evaluate": 6,
    "cli": 7,
}
#: ``runs`` also names the artefacts (``runs.PROBE``, ...): a lower floor may use those constants, which are
#: plain strings, but nothing else of it (a :class:`~nc_finetune.runs.RunDir` reads and checks run directories).
NAMES_ONLY = "runs"


def _unit(path: Path, package: Path = PACKAGE) -> str:
    """The first component below ``nc_finetune`` of a module file (``select`` for ``select/hooks.py``)."""
    return path.relative_to(package).with_suffix("").parts[0]


def _imported_units(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, unit)`` for every ``nc_finetune`` import in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "nc_finetune":
                continue
            if len(parts) > 1:
                found.append((node.lineno, parts[1]))
            else:  # from nc_finetune import runs
                found += [(node.lineno, a.name) for a in node.names if a.name in FLOORS]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1]) for a in node.names
                      if a.name.startswith("nc_finetune.")]
    return found


def _non_name_uses_of_runs(tree: ast.AST) -> list[int]:
    """Lines where a module uses something of ``runs`` other than an upper-case artefact name."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "nc_finetune.runs":
            bad += [node.lineno for a in node.names if not a.name.isupper()]
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "runs"
              and not node.attr.isupper()):
            bad.append(node.lineno)
    return bad


def layering_violations(package: Path = PACKAGE) -> list[str]:
    """Every import in ``package`` that runs up a floor, as ``file:line: unit (floor) -> unit (floor)``."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        unit = _unit(path, package)
        if unit == "__init__":  # the package's lazy public API
            continue
        floor = FLOORS[unit]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        rel = path.relative_to(package.parent)
        for line, target in _imported_units(tree):
            if target == NAMES_ONLY and floor < FLOORS[NAMES_ONLY]:
                continue  # checked below: artefact names only
            if FLOORS[target] > floor:
                problems.append(f"{rel}:{line}: {unit} ({floor}) -> {target} ({FLOORS[target]})")
        if floor < FLOORS[NAMES_ONLY]:
            problems += [f"{rel}:{line}: {unit} ({floor}) uses runs beyond its artefact names"
                         for line in _non_name_uses_of_runs(tree)]
    return problems


def test_every_unit_has_a_floor():
    units = {_unit(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert units <= set(FLOORS), f"give these a floor in FLOORS: {sorted(units - set(FLOORS))}"


def test_no_import_runs_up_a_floor():
    assert layering_violations() == []


def test_the_check_finds_an_import_up(tmp_path):
    """The check can fail: a stage that imports the pipeline, or reads a run directory, is reported."""
    pkg = tmp_path / "nc_finetune"
    (pkg / "select").mkdir(parents=True)
    (pkg / "select" / "bad.py").write_text("def f():\n    from nc_finetune.pipeline import prepare_data\n")
    (pkg / "data").mkdir()
    (pkg / "data" / "reads.py").write_text("from nc_finetune import runs\n\n\ndef g(p):\n"
                                           "    return runs.RunDir(p) / runs.PROBE\n")
    (pkg / "train").mkdir()
    (pkg / "train" / "names.py").write_text("from nc_finetune import runs\n\nNAME = runs.METRICS\n")
    found = layering_violations(pkg)
    assert found == ["nc_finetune/data/reads.py:5: data (1) uses runs beyond its artefact names",
                     "nc_finetune/select/bad.py:2: select (3) -> pipeline (6)"]
