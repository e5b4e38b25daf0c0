"""Run directories: what an nc-finetune command writes, under which names, and the rules for writing them.

Every command that writes (``probe``, ``select``, ``run``, ``rank``, ``sweep``, ``ufm``) owns one directory. A
:class:`RunDir` names its artefacts (nothing else in the package types a file name by hand), refuses to clobber a
finished result, checks that ``--resume`` continues the same recipe, holds an exclusive lock while a command writes
(two commands on one ``--out`` would interleave ``metrics.jsonl``), refuses artefact paths that are symbolic links
(a write would land wherever the link points), and reads a finished run back (recipe, probe, selection, summary).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nc_finetune.errors import UserError

RESOLVED = "resolved.yaml"
PROBE = "probe.json"
PROBE_PLOT = "probe.png"
SELECTION = "selection.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint"
WEIGHTS = "trainable.safetensors"
BEST_WEIGHTS = "best.safetensors"
ADAPTER = "adapter"
SUMMARY = "summary.json"
RANK = "rank.json"
RANK_PLOT = "rank.png"
SWEEP = "sweep.json"
SWEEP_PLOT = "sweep.png"
UFM = "ufm.json"
UFM_PLOT = "ufm.png"
LOCK = ".nc-finetune.lock"
#: The ``backbone.init_from`` run a directory started from, as path and weights digest: a source moved or copied
#: elsewhere (another workdir, another machine) is still recognised as the same model.
SOURCE = "init_from.json"

#: What a training run writes; one of these present means the directory already holds a run.
RUN_ARTEFACTS = (SUMMARY, CHECKPOINT, METRICS, SELECTION, PROBE)
#: What a finished training run must hold to be evaluated, restored (``backbone.init_from``) or exported.
FINISHED_RUN = (RESOLVED, SELECTION, PROBE, WEIGHTS, SUMMARY)
#: Every name a ``run`` writes (or appends to); none may be a symbolic link, for a fresh run or a resumed one.
RUN_WRITES = (*RUN_ARTEFACTS, RESOLVED, SOURCE, PROBE_PLOT, WEIGHTS, ADAPTER, BEST_WEIGHTS)


class RunDir:
    """One run directory.

    Args:
        path: The directory (need not exist yet).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        """Whether artefact ``name`` exists (a dangling link counts: it would be written through)."""
        p = self.path / name
        return p.exists() or p.is_symlink()

    # -------------------------------------------------------------------------------------------------- checks

    def check_writable(self, artefacts: tuple[str, ...] | list[str], overwrite: bool = False, recipe=None) -> None:
        """Refuse to clobber existing artefacts (unless ``overwrite``), to write through links, or into a file.

        Args:
            artefacts: The names the command is about to write.
            overwrite: The user's ``--overwrite``.
            recipe: The recipe the command runs with; ``--overwrite`` inside a finished training run is accepted
                only with that run's own recipe (its ``resolved.yaml`` describes the weights it trained).

        Raises:
            UserError: ``path`` is a file; an artefact exists and ``overwrite`` is false; an artefact is a symbolic
                link; ``overwrite`` inside a finished run with a different recipe.
        """
        from nc_finetune.config import recipe_to_dict

        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} is a file, not a directory")
        links = [n for n in artefacts if (self.path / n).is_symlink()]
        if links:
            raise UserError(f"{self.path / links[0]} is a symbolic link; refusing to write through it")
        existing = [n for n in artefacts if self.has(n)]
        if existing and not overwrite:
            raise UserError(f"{self.path} already holds {', '.join(existing)}; choose another --out or pass "
                            "--overwrite")
        if existing and recipe is not None and self.is_finished_run():
            diff = self.recipe_difference(recipe_to_dict(recipe))
            if diff is not None:
                raise UserError(f"{self.path} holds a finished run trained with another recipe ({diff}); "
                                "--overwrite would no longer describe its weights; choose another --out")

    def check_new_run(self) -> None:
        """A fresh ``run`` needs a directory without a run in it.

        Raises:
            UserError: the directory is a file, or already holds run artefacts.
        """
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} is a file, not a directory")
        existing = [n for n in RUN_ARTEFACTS if self.has(n)]
        if existing:
            raise UserError(f"{self.path} already holds a run ({', '.join(existing)}); continue it with --resume "
                            "or choose another --out")
        self._refuse_links(RUN_WRITES)

    def _refuse_links(self, names: tuple[str, ...]) -> None:
        links = [n for n in names if (self.path / n).is_symlink()]
        if links:
            raise UserError(f"{self.path / links[0]} is a symbolic link; refusing to write through it")

    def check_resume(self, recipe) -> None:
        """A ``--resume`` must continue the same recipe: compare with the run's ``resolved.yaml``.

        Raises:
            UserError: no run there, a damaged ``resolved.yaml``, the recipes differ (names the first differing
                key), or an artefact the run writes is a symbolic link.
        """
        from nc_finetune.config import recipe_to_dict

        if not (self.path / RESOLVED).is_file():
            raise UserError(f"--resume: {self.path} holds no run (no {RESOLVED})")
        self._refuse_links(RUN_WRITES)
        self.read_recipe()  # a file cut short is refused as damaged, not as another recipe
        diff = self.recipe_difference(recipe_to_dict(recipe))
        if diff is not None:
            raise UserError(f"--resume: {self.path} was started with a different recipe ({diff}); "
                            f"resume with the same recipe and overrides, or use another --out")

    def is_finished_run(self) -> bool:
        """Whether the directory holds a finished training run (every file of :data:`FINISHED_RUN`)."""
        return all((self.path / n).exists() for n in FINISHED_RUN)

    def require_finished_run(self, what: str) -> None:
        """Raises: UserError naming the missing files, when the directory is not a finished run."""
        missing = [n for n in FINISHED_RUN if not (self.path / n).exists()]
        if missing:
            raise UserError(f"{what}: {self.path} is not a finished nc-finetune run (missing {', '.join(missing)})")

    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold an exclusive advisory lock on the directory while ``command`` writes to it.

        The lock file is removed afterwards, and a directory that the lock created and the command left empty
        (it failed before writing) is removed too, so a refused command leaves nothing behind.

        Raises:
            UserError: another nc-finetune command holds the lock, or the directory cannot be written.
        """
        import fcntl

        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} is a file, not a directory")
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --out {self.path}: {e.strerror}") from None
        lock_path = self.path / LOCK
        if lock_path.is_symlink():
            raise UserError(f"{lock_path} is a symbolic link; refusing to use it")
        try:
            f = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the whole command
        except OSError as e:
            raise UserError(f"cannot write to --out {self.path}: {e.strerror}") from None
        with f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise UserError(f"{self.path} is in use by {holder}; wait for it or choose another --out") from None
            f.seek(0)
            f.truncate()
            f.write(f"nc-finetune {command} (pid {os.getpid()})\n")
            f.flush()
            try:
                yield
            finally:
                lock_path.unlink(missing_ok=True)
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                if created:
                    with contextlib.suppress(OSError):
                        self.path.rmdir()  # only succeeds when empty

    @contextlib.contextmanager
    def removed_on_error(self, artefacts: tuple[str, ...] | list[str]) -> Iterator[None]:
        """If the block raises, remove those of ``artefacts`` that did not exist when it started.

        A run that fails before it trains (a config error found after the probe, a broken adapter) then leaves the
        directory as it was, so a corrected rerun is accepted.
        """
        new = [n for n in artefacts if not self.has(n)]
        try:
            yield
        except BaseException:
            for name in new:
                (self.path / name).unlink(missing_ok=True)
            raise

    # -------------------------------------------------------------------------------------------------- reading

    def read_finished_recipe(self, what: str):
        """The resolved recipe of a finished run (one that :mod:`nc_finetune.restore` can start from).

        Args:
            what: How the caller refers to the directory in messages (e.g. ``backbone.init_from``).

        Raises:
            UserError: not a finished run (names the missing files).
        """
        self.require_finished_run(what)
        return self.read_recipe()

    def read_recipe(self, overrides: list[str] | None = None):
        """The run's resolved recipe, with ``overrides``.

        Raises:
            UserError: no ``resolved.yaml``; ConfigError: damaged, or it no longer validates.
        """
        from nc_finetune.config import load_resolved_recipe

        if not (self.path / RESOLVED).is_file():
            raise UserError(f"{self.path} holds no {RESOLVED}")
        return load_resolved_recipe(self.path / RESOLVED, overrides)

    def read_json(self, name: str) -> Any:
        """Parse artefact ``name``.

        Raises:
            UserError: missing, or not valid JSON (a damaged file).
        """
        path = self.path / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is damaged (not valid JSON: {e})") from None

    def read_probe(self):
        """The run's :class:`~nc_finetune.probe.result.ProbeResult`."""
        from nc_finetune.probe.result import ProbeResult

        self.read_json(PROBE)  # one line for a damaged file
        return ProbeResult.load(self.path / PROBE)

    def read_selection(self):
        """The run's :class:`~nc_finetune.select.Selection`."""
        from nc_finetune.select import Selection

        return Selection.from_dict(self.read_json(SELECTION))

    def read_final_weights(self) -> dict[str, Any]:
        """The trained tensors of ``trainable.safetensors`` (a damaged file is refused in one line)."""
        from nc_finetune.utils.io import load_safetensors

        return load_safetensors(self.path / WEIGHTS)

    def read_summary(self) -> dict[str, Any]:
        return self.read_json(SUMMARY)

    def recorded_recipe(self) -> Any:
        """The run's ``resolved.yaml`` as the schema reads it now, for comparison with a recipe.

        A key added to the schema after the file was written reads as its default (a new field's default keeps the
        old behaviour), so it does not make the same recipe look different; a file the schema no longer accepts is
        compared as written.
        """
        from nc_finetune.config import recipe_to_dict
        from nc_finetune.errors import ConfigError

        try:
            return recipe_to_dict(self.read_recipe())
        except ConfigError:
            return self._read_yaml(RESOLVED)

    def recipe_difference(self, now: dict[str, Any], ignore: tuple[str, ...] = ()) -> str | None:
        """How ``now`` (a recipe as :func:`~nc_finetune.config.recipe_to_dict` gives it) differs from the recorded one.

        ``backbone.init_from`` naming another directory is no difference when that directory holds the same weights
        as the source the run began from (the sha256 of its ``trainable.safetensors``, kept in ``init_from.json``):
        a study moved to another folder or machine, with its source model beside it, resumes.

        Args:
            now: The recipe to compare with ``resolved.yaml``.
            ignore: Top-level sections left out of the comparison (e.g. those a resumed sweep may grow).

        Returns:
            The first difference as ``key: old then, new now``; None when the recipes are the same.
        """
        before = {k: v for k, v in (self.recorded_recipe() or {}).items() if k not in ignore}
        now = {k: v for k, v in now.items() if k not in ignore}
        diff = first_difference(before, now)
        old_src, new_src = (before.get("backbone") or {}).get("init_from"), (now.get("backbone") or {}).get("init_from")
        if diff is None or not diff.startswith("backbone.init_from:") or not (old_src and new_src):
            return diff
        if not self._same_source(old_src, new_src):
            return diff
        return first_difference({**before, "backbone": {**before["backbone"], "init_from": new_src}}, now)

    def _same_source(self, old: str, new: str) -> bool:
        """Whether ``new`` holds the weights the run's source ``old`` held (recorded, or read at ``old``)."""
        recorded = self.read_json(SOURCE) if self.has(SOURCE) else {}
        old_digest = recorded.get("sha256") if recorded.get("path") == old else _weights_digest(old)
        return old_digest is not None and old_digest == _weights_digest(new)

    def _record_source(self, source: str) -> None:
        """Write ``init_from.json`` for ``source`` unless it already describes that path."""
        from nc_finetune.utils.io import write_json_atomic

        if self.has(SOURCE) and self.read_json(SOURCE).get("path") == source:
            return
        digest = _weights_digest(source)
        if digest is not None:  # no weights there: loading the backbone says so, in one line
            self._refuse_links((SOURCE,))
            write_json_atomic(self.path / SOURCE, {"path": source, "sha256": digest})

    def _read_yaml(self, name: str) -> Any:
        from nc_finetune.config import read_yaml

        return read_yaml(self.path / name, name)

    # -------------------------------------------------------------------------------------------------- writing

    def write_recipe(self, recipe) -> Path:
        """Write ``resolved.yaml`` atomically (and ``init_from.json`` for a run that starts from another run)."""
        from nc_finetune.config import dump_recipe
        from nc_finetune.utils.io import write_text_atomic

        path = write_text_atomic(self.path / RESOLVED, dump_recipe(recipe))
        if recipe.backbone.init_from:
            self._record_source(str(recipe.backbone.init_from))
        return path

    def save_final_weights(self, adapted) -> None:
        """The trained weights: peft adapter format for LoRA (loads with plain peft), safetensors otherwise.

        The adapter is written to a fresh directory renamed over ``adapter/``: peft's writer follows links, so one
        planted inside an existing ``adapter/`` would otherwise receive the weights.
        """
        import shutil

        from nc_finetune.train.checkpoint import save_weights

        if adapted.method == "lora":
            self._refuse_links((ADAPTER,))
            final, tmp = self.path / ADAPTER, self.path / f".{ADAPTER}.tmp"
            if tmp.is_symlink():
                tmp.unlink()
            shutil.rmtree(tmp, ignore_errors=True)
            adapted.model.save_pretrained(str(tmp))
            if final.is_dir():
                shutil.rmtree(final)  # removes links inside, never what they point to
            elif final.exists():
                final.unlink()
            tmp.rename(final)
        save_weights(self.path / WEIGHTS, adapted.trainable_state_dict())


def _weights_digest(run_dir: str | os.PathLike) -> str | None:
    """sha256 of a run's ``trainable.safetensors`` (what ``backbone.init_from`` loads); None when it is absent."""
    from nc_finetune.utils.io import sha256_file

    path = Path(run_dir) / WEIGHTS
    return sha256_file(path) if path.is_file() else None


def first_difference(a: object, b: object, prefix: str = "") -> str | None:
    """The first dotted key where two nested mappings differ, as ``key: old then, new now``; ``None`` if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            d = first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
            if d is not None:
                return d
        return None
    return None if a == b else f"{prefix}: {a!r} then, {b!r} now"
