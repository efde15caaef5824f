"""Usage mistakes: one ``error:`` line on stderr and exit code 2, before any request.

Nothing listens at the URL these commands are given: a usage mistake must be
found before the CLI tries to reach a server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABGATE_")}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / "config"),
        LABGATE_URL="http://127.0.0.1:9",
        LABGATE_DATA_DIR=str(home / "data"),
    )
    return subprocess.run(
        [sys.executable, "-m", "labgate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("launch", "demo", "--memory", "lots"), ["'--memory'", "512M", "launch --help"]),
        (("keep-alive", "abc", "--for", "banana"), ["'--for'", "90m", "keep-alive --help"]),
        (("token", "create", "--expires-in", "soon"), ["'--expires-in'", "90m"]),
        (("launch", "demo", "--no-such-option"), ["--no-such-option"]),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(
    args: tuple[str, ...], words: list[str], tmp_path: Path
) -> None:
    done = run(*args, home=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0]
    assert "cannot reach" not in done.stderr
