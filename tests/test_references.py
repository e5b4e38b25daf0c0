"""The package cites only what a user has: papers, reference repositories and files shipped in this repository."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nc_finetune"
# Design notes kept outside the repository; a citation of them leads a reader nowhere.
EXTERNAL_NOTES = re.compile(r"\b(method|anchors|field|style|offline-assets)\.md\b")


def test_no_citation_of_documents_outside_the_repository() -> None:
    hits = [f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}"
            for path in sorted(PACKAGE.rglob("*.py"))
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if EXTERNAL_NOTES.search(line)]
    assert hits == []
