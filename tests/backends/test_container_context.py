"""What a tool image carries of labgate: every module its command runs, and what they import."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from labgate.backends.container_build import LABGATE_FILES, PACKAGE, write_context

BUILTIN = PACKAGE / "tools" / "builtin"


def labgate_modules_run_by_images() -> set[str]:
    """The ``python -m labgate.…`` modules of the commands of images labgate builds."""
    found: set[str] = set()
    for tool_file in sorted(BUILTIN.glob("*.toml")):
        section = tomllib.loads(tool_file.read_text()).get("container", {})
        if not section.get("build"):  # an image built elsewhere (the demo's) carries its own
            continue
        for word in [*section.get("args", []), *section.get("command", [])]:
            if re.fullmatch(r"labgate(\.\w+)+", word):
                found.add(word)
    return found


def test_the_images_commands_find_their_modules_in_the_context():
    modules = labgate_modules_run_by_images()
    assert {"labgate.tools.gate", "labgate.tools.jupyter_start"} <= modules
    for module in modules:
        assert module.removeprefix("labgate.").replace(".", "/") + ".py" in LABGATE_FILES


def test_labgate_modules_in_the_context_import_only_each_other():
    """A labgate import the context lacks would fail only inside the image, at launch."""
    for name in LABGATE_FILES:
        tree = ast.parse((PACKAGE / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("labgate"):
                path = node.module.removeprefix("labgate").lstrip(".").replace(".", "/")
                assert f"{path}.py" in LABGATE_FILES or f"{path}/__init__.py" in LABGATE_FILES, (
                    name,
                    node.module,
                )


@pytest.mark.parametrize("module", ["labgate.tools.gate", "labgate.tools.jupyter_start"])
def test_a_stdlib_only_entry_imports_from_the_context_alone(tmp_path: Path, module: str):
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "Containerfile").write_text("FROM scratch\n")
    write_context(recipe, tmp_path / "context")
    # -S: no site-packages, so the installed labgate cannot stand in for the copy.
    code = f"import sys; sys.path.insert(0, sys.argv[1]); import {module}"
    done = subprocess.run(
        [sys.executable, "-S", "-c", code, str(tmp_path / "context")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
