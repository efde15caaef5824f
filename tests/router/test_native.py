"""The router's compiled hot path: used when built and current, else the Python sources.

The rest of tests/router runs against whichever the checkout has: compiled by
``make test`` (CI), and again with ``LABGATE_ROUTER_PURE=1`` in CI, so both
builds are held to the same behaviour.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from labgate.router import _native

SRC = Path(_native.__file__).resolve().parents[2]
PROBE = (
    "import labgate.router._native as n, labgate.router.proxy as p, labgate.router.upstream as u;"
    "print(n.STATE); print(p.__file__); print(u.__file__)"
)


def compiled_or_skip() -> None:
    state = _native.check(honour_env=False)
    if state == "compiled":
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must test the compiled router: {state}")
    pytest.skip(f"the router is not compiled here ({state}): make compile")


def probe(src: Path, **env: str) -> list[str]:
    """What a fresh interpreter with ``src`` first on its path loads: state, two files."""
    environment = {k: v for k, v in os.environ.items() if k != _native.PURE_ENV}
    environment |= {"PYTHONPATH": str(src), **env}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=environment, capture_output=True, text=True, check=True
    )
    return done.stdout.split("\n")[:3]


def test_the_router_loads_its_compiled_modules_unless_told_to_run_python():
    compiled_or_skip()
    state, proxy, upstream = probe(SRC)
    assert state == "compiled"
    for loaded in (proxy, upstream):
        # (A module first imported by another compiled one names a path below the directory.)
        assert Path(loaded).is_relative_to(_native.NATIVE_DIR)
        assert loaded.endswith(tuple(EXTENSION_SUFFIXES))
    state, proxy, upstream = probe(SRC, **{_native.PURE_ENV: "1"})
    assert state.startswith("pure Python") and _native.PURE_ENV in state
    assert proxy.endswith("router/proxy.py") and upstream.endswith("router/upstream.py")


def test_a_source_edited_after_compiling_runs_as_python_not_the_stale_build(tmp_path):
    compiled_or_skip()
    copy = tmp_path / "src"
    shutil.copytree(SRC / "labgate", copy / "labgate", ignore=shutil.ignore_patterns("__pycache__"))
    edited = copy / "labgate/router/upstream.py"
    edited.write_text(edited.read_text() + "\n# edited after compiling\n")
    state, proxy, upstream = probe(copy)
    assert "sources changed" in state
    assert proxy == str(copy / "labgate/router/proxy.py")
    assert upstream == str(edited)


def test_a_build_whose_c_source_is_gone_is_not_used(tmp_path):
    """An installed copy without ``_heads.c`` cannot be checked against the manifest."""
    compiled_or_skip()
    copy = tmp_path / "src"
    shutil.copytree(SRC / "labgate", copy / "labgate", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "labgate/router/_heads.c").unlink()
    state, proxy, _ = probe(copy)
    assert "source is missing" in state
    assert proxy == str(copy / "labgate/router/proxy.py")


def test_without_a_build_the_router_runs_python(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(
        SRC / "labgate",
        copy / "labgate",
        ignore=shutil.ignore_patterns("__pycache__", _native.NATIVE_DIR.name),
    )
    state, proxy, _ = probe(copy)
    assert "not compiled" in state
    assert proxy == str(copy / "labgate/router/proxy.py")
