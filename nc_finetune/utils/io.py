"""Atomic writes, so a run directory never holds a half-written artefact (a write that fails because the disk is
full or read-only is a one-line :class:`~nc_finetune.errors.UserError` and leaves the previous file), and readers
that turn a damaged one (cut short, overwritten, not what its name says) into a one-line ``UserError`` naming the file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nc_finetune.errors import UserError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write a file atomically: ``write(tmp_path)`` then rename over ``path``.

    Args:
        path: Final destination.
        write: Callback that writes the complete content to the temporary path it is given.

    Returns:
        The destination path.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_failure(path, e) or e from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        failure = write_failure(path, e) if isinstance(e, Exception) else None  # before the cleanup frees space
        if os.path.exists(tmp):
            os.unlink(tmp)
        if failure is not None:
            raise failure from None
        raise
    return path


#: Write failures caused by where a file goes, not by what is written: the user fixes them (one line, exit 2).
WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EFBIG: "file too large for the file system"}


def disk_error(err: BaseException) -> str | None:
    """Why an operation failed when the disk is to blame (an entry of :data:`WRITE_ERRNOS`), else ``None``.

    safetensors (and so peft and transformers) reports the OS error only in its message.
    """
    code = err.errno if isinstance(err, OSError) else None
    if code is None and ("No space left on device" in str(err) or "os error 28" in str(err)):
        code = errno.ENOSPC
    return WRITE_ERRNOS.get(code)


def write_failure(path: str | os.PathLike, err: BaseException) -> UserError | None:
    """The one-line :class:`UserError` for a write to ``path`` that failed because of the disk (full, quota,
    read-only, no permission), or ``None`` when ``err`` is something else.

    ``torch.save`` says no more than that the write failed: that counts as a full disk when the file system has
    (almost) no space left. Call it before deleting the partial file.
    """
    reason = disk_error(err)
    if reason is None and isinstance(err, RuntimeError):  # torch's writer: "file write failed", "unexpected pos"
        where = Path(path)
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            if shutil.disk_usage(where).free < 2**20:
                reason = WRITE_ERRNOS[errno.ENOSPC]
        except OSError:
            pass
    return None if reason is None else UserError(f"cannot write {path}: {reason}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, _write)


# (resolved path, size, mtime_ns) -> sha256: a file read again in one process (a backbone's weights at every load,
# a source model at every sweep cell) is hashed once; a rewritten file has another size or mtime
_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (remembered for the process while its size and mtime stay)."""
    import hashlib

    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically; NaN/inf are written as ``null``."""
    return write_text_atomic(path, json.dumps(_finite(obj), indent=2, sort_keys=False) + "\n")


def _finite(obj: Any) -> Any:
    """Replace non-finite floats by None so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _damaged(path: Path, what: str, err: BaseException) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"{path} is damaged: not {what} ({first[:200]})")


def read_json(path: str | os.PathLike) -> Any:
    """The content of a JSON file.

    Raises:
        UserError: missing, unreadable, not UTF-8 or not valid JSON (e.g. cut short by a kill or a full disk).
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, "valid JSON", e) from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def read_json_object(path: str | os.PathLike, parse: Callable[[dict], Any], what: str) -> Any:
    """``parse`` applied to a JSON file that must hold an object written by nc-finetune (``probe.json`` ...).

    Raises:
        UserError: as :func:`read_json`, or content that ``parse`` cannot read (missing keys, wrong types).
    """
    path = Path(path)
    obj = read_json(path)
    try:
        if not isinstance(obj, dict):
            raise TypeError(f"a JSON object was expected, got {type(obj).__name__}")
        return parse(obj)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path} is damaged: not {what} ({type(e).__name__}: {e})") from None


def load_safetensors(path: str | os.PathLike) -> dict:
    """Tensors of a safetensors file, on the CPU.

    Raises:
        UserError: missing or not a complete safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _damaged(path, "a complete safetensors file", e) from None


def load_torch_state(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (tensors and plain containers only, nothing unpickled).

    Raises:
        UserError: missing, cut short, or holding objects that ``weights_only`` refuses.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as e:
        raise _damaged(path, "a complete torch state file", e) from None
