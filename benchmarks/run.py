"""Run one benchmark study: ``python benchmarks/run.py STUDY [options]`` (``STUDY --help`` for its options).

Every study takes the shared flags (``--settings``, ``--seeds``, ``--set KEY=VALUE``, ``--workdir``, ``--out``,
``--smoke``, ``--list-settings`` ...; see ``harness.py``) and reads what it runs from
``benchmarks/experiments/<study>.yaml``. ``python benchmarks/STUDY.py [options]`` is the same command.
"""

from __future__ import annotations

import ast
import importlib
import sys

from common import BENCH_DIR
from harness import STUDIES


def studies_listing() -> str:
    """One line per study: its name and the first line of its docstring (read, not imported: no torch)."""
    lines = ["usage: python benchmarks/run.py STUDY [options]   (STUDY --help for its options)", "", "studies:"]
    for name in STUDIES:
        source = (BENCH_DIR / f"{name}.py").read_text(encoding="utf-8")
        doc = (ast.get_docstring(ast.parse(source)) or "").splitlines()
        lines.append(f"  {name:<22} {doc[0] if doc else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print(studies_listing())
        return 0
    study, rest = argv[0], argv[1:]
    if study not in STUDIES:
        print(f"unknown study {study!r}; choose from {', '.join(STUDIES)}", file=sys.stderr)
        return 2
    return importlib.import_module(study).main(rest)


if __name__ == "__main__":
    sys.exit(main())
