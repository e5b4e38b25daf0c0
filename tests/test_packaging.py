"""Packaging: the wheel ships every built-in recipe, and an installed copy lists and resolves them by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nc_finetune.cli import RECIPES_DIR

REPO = Path(__file__).resolve().parent.parent


def _build_wheel(tmp_path: Path) -> Path:
    """Build from a copy of the sources, so the build leaves no build/ or egg-info in the checkout."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy2(REPO / "pyproject.toml", src)
    shutil.copy2(REPO / "README.md", src)
    shutil.copytree(REPO / "nc_finetune", src / "nc_finetune", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("*.whl")
    return wheel


def test_recipes_dir_is_package_data_and_top_level_folder_points_there() -> None:
    assert RECIPES_DIR.resolve().parent == (REPO / "nc_finetune").resolve()
    assert (REPO / "recipes").resolve() == RECIPES_DIR.resolve()
    assert sorted(RECIPES_DIR.glob("*.yaml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_contains_every_recipe(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"nc_finetune/recipes/{p.name}" for p in RECIPES_DIR.glob("*.yaml")}
    assert expected and expected <= names, sorted(expected - names)


def test_installed_wheel_lists_and_resolves_recipes_by_name(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    code = (
        "import nc_finetune, nc_finetune.cli as cli\n"
        f"assert nc_finetune.__file__.startswith({str(target)!r}), nc_finetune.__file__\n"
        "print(sorted(p.stem for p in cli.RECIPES_DIR.glob('*.yaml')))\n"
        "print(cli.resolve_recipe_path('minilm-rotten-tomatoes'))\n"
    )
    # Run outside the checkout, with only the install on the path, so nothing can come from the source tree.
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True).stdout.splitlines()
    assert out[0] == str(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    assert out[1] == str(target / "nc_finetune" / "recipes" / "minilm-rotten-tomatoes.yaml")


def test_wheel_declares_the_license_as_an_spdx_expression(wheel: Path) -> None:
    # The table form (license = {text = ...}) is deprecated by setuptools; the SPDX string becomes License-Expression.
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        headers = zf.read(meta).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: Apache-2.0" in headers
