"""Readers of run artefacts: a file cut short (a kill, a full disk) is one line naming it, never a traceback."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from nc_finetune.errors import UserError
from nc_finetune.utils.io import load_safetensors, load_torch_state, read_json, read_json_object, sha256_file


def _cut(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_safetensors(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(300.0)}, str(path))
    assert torch.equal(load_safetensors(path)["a"], torch.arange(300.0))
    _cut(path)
    with pytest.raises(UserError, match=r"w.safetensors is damaged: not a complete safetensors file \("):
        load_safetensors(path)
    with pytest.raises(UserError, match="missing"):
        load_safetensors(tmp_path / "none.safetensors")


def test_torch_state(tmp_path) -> None:
    path = tmp_path / "s.pt"
    torch.save({"x": torch.ones(500), "n": 3}, path)
    assert load_torch_state(path)["n"] == 3
    _cut(path)
    with pytest.raises(UserError, match=r"s.pt is damaged: not a complete torch state file"):
        load_torch_state(path)


def test_json(tmp_path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"layers": [{"a": 1}] * 20}))
    assert read_json(path)["layers"][0] == {"a": 1}
    _cut(path)
    with pytest.raises(UserError, match=r"p.json is damaged: not valid JSON \(.*line 1 column"):
        read_json(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(UserError, match="not valid JSON"):
        read_json(path)


def test_json_object_of_the_wrong_shape(tmp_path) -> None:
    path = tmp_path / "selection.json"
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match=r"selection.json is damaged: not a thing \(TypeError: a JSON object"):
        read_json_object(path, dict, "a thing")
    path.write_text("{}")
    with pytest.raises(UserError, match=r"not a thing \(KeyError: 'blocks'\)"):
        read_json_object(path, lambda d: d["blocks"], "a thing")


def test_sha256_file_is_the_digest_of_the_bytes_and_follows_a_rewritten_file(tmp_path) -> None:
    import hashlib
    import os

    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 3_000_000)  # more than one 1 MiB block
    assert sha256_file(path) == hashlib.sha256(b"a" * 3_000_000).hexdigest()
    assert sha256_file(str(path)) == sha256_file(path)  # remembered, same answer
    st = path.stat()
    path.write_bytes(b"b" * 3_000_000)  # same size: the new mtime alone must invalidate the memo
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert sha256_file(path) == hashlib.sha256(b"b" * 3_000_000).hexdigest()
