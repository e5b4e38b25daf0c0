"""The README's Python API block runs as written, with a tiny local model and CSV in place of the hub ids."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(heading: str) -> str:
    """The first ```python block after ``heading`` in the README."""
    text = README.read_text(encoding="utf-8")
    assert heading in text, f"README lost its '{heading}' section"
    match = re.search(r"```python\n(.*?)```", text[text.index(heading):], flags=re.S)
    assert match, f"no python block under '{heading}'"
    return match.group(1)


def test_readme_python_api_block_runs(bert_dir, text_csv, capsys) -> None:
    code = python_block("### Python API")
    offline = {  # hub id -> local stand-in; each must appear exactly once, so an edit of the README is noticed
        '"hf:bert-base-uncased"': repr(f"hf:{bert_dir}"),
        'load_data("hf:stanfordnlp/sst2", text_column="sentence", test_split="validation")':
            f"load_data('csv', data_files={dict(text_csv)!r})",
    }
    for hub, local in offline.items():
        assert code.count(hub) == 1, hub
        code = code.replace(hub, local)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    out = capsys.readouterr().out
    for printed in ("ClassificationData(name='csv'", "strategy: stall", "'modules_to_save': ['nc_head']"):
        assert printed in out
    assert len(namespace["table"]) == len(namespace["result"].layers)
    assert namespace["adapted"].method == "lora"
