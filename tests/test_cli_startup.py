"""The CLI starts fast: ``--help``, ``version`` and ``ls`` import only what they need.

Wall-clock limits are flaky on a shared machine, so these tests hold the cause
instead: which heavy modules each command loads. ``benchmarks/cli_startup.py``
measures the time itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# What a command run loads, printed as JSON after the command exits.
_PROBE = """
import json, sys
sys.argv = ["labgate", *sys.argv[1:]]
try:
    from labgate.cli import main
    main()
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""
HEAVY = ("httpx", "pydantic_settings", "sqlalchemy", "fastapi", "starlette", "limits", "asyncio")
NEVER_IN_THE_CLI = (
    "sqlalchemy",
    "fastapi",
    "starlette",
    "labgate.db",
    "labgate.backends",
    "labgate.portal",
)


def loaded_by(*args: str, tmp_path: Path) -> set[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABGATE_")}
    env.update(
        HOME=str(tmp_path),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        LABGATE_URL="http://127.0.0.1:9",  # nothing listens: `ls` fails fast, after its imports
    )
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


def top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules} | modules


@pytest.mark.parametrize("args", [("--help",), ("version",), ("ls", "--help")])
def test_help_and_version_import_nothing_heavy(args: tuple[str, ...], tmp_path: Path) -> None:
    loaded = top_level(loaded_by(*args, tmp_path=tmp_path))
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert "labgate.client" not in loaded
    assert "labgate.config" not in loaded


def test_ls_imports_the_client_but_no_server_parts(tmp_path: Path) -> None:
    loaded = loaded_by("ls", tmp_path=tmp_path)
    assert "httpx" in loaded  # it did run far enough to call the server
    server_side = {m for m in loaded if m.startswith(NEVER_IN_THE_CLI)}
    assert not server_side, sorted(server_side)
    assert "limits" not in loaded
    # Only url and token are read (labgate.configfile), not all settings.
    assert "pydantic_settings" not in loaded and "labgate.config" not in loaded
