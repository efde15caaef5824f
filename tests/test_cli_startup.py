"""The CLI starts fast: ``--help``, ``version`` and ``ls`` import only what they need.

Wall-clock limits are flaky on a shared machine, so these tests hold the cause
instead: which heavy modules each command loads. ``benchmarks/cli_startup.py``
measures the time itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
print(json.dumps(sorted(k for k, v in sys.modules.items() if v is not None)), file=sys.stderr)
"""
HEAVY = (
    "httpx",
    "pydantic",
    "pydantic_settings",
    "sqlalchemy",
    "fastapi",
    "starlette",
    "limits",
    "asyncio",
    "rich",  # typer's Rich help, and labgate's tables, are not needed to say this much
)
# The command groups, imported only when one is named on the command line.
GROUP_MODULES = (
    "labgate.cli.users",
    "labgate.cli.sites",
    "labgate.cli.shares",
    "labgate.cli.datasets",
    "labgate.cli.images",
    "labgate.cli.runs",
    "labgate.cli.snapshots",
)
NEVER_IN_THE_CLI = (
    "sqlalchemy",
    "fastapi",
    "starlette",
    "labgate.db",
    "labgate.backends",
    "labgate.portal",
)


def probe(*args: str, tmp_path: Path, url: str) -> tuple[str, set[str]]:
    """What ``labgate *args`` prints on stdout (a pipe), and the modules it loads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABGATE_")}
    env.update(
        HOME=str(tmp_path),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        LABGATE_URL=url,
        LABGATE_TOKEN="lg_startup_test",
    )
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    return done.stdout, set(json.loads(done.stderr.strip().splitlines()[-1]))


def loaded_by(*args: str, tmp_path: Path) -> set[str]:
    # Nothing listens at the URL: `ls` fails fast, after its imports.
    return probe(*args, tmp_path=tmp_path, url="http://127.0.0.1:9")[1]


def top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules} | modules


@pytest.mark.parametrize("args", [("--help",), ("version",), ("ls", "--help")])
def test_help_and_version_import_nothing_heavy(args: tuple[str, ...], tmp_path: Path) -> None:
    loaded = top_level(loaded_by(*args, tmp_path=tmp_path))
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert "labgate.client" not in loaded
    assert "labgate.config" not in loaded
    assert not loaded & set(GROUP_MODULES), sorted(loaded & set(GROUP_MODULES))


def test_ls_imports_the_client_but_no_server_parts(tmp_path: Path) -> None:
    loaded = loaded_by("ls", tmp_path=tmp_path)
    assert "httpx" in loaded  # it did run far enough to call the server
    server_side = {m for m in loaded if m.startswith(NEVER_IN_THE_CLI)}
    assert not server_side, sorted(server_side)
    assert "limits" not in loaded
    # Only url and token are read (labgate.configfile), not all settings.
    assert "pydantic_settings" not in loaded and "labgate.config" not in loaded
    # typer 0.29 and later import pydantic to convert option values (pinned below it).
    assert "pydantic" not in loaded
    # httpx's own command line (click, Pygments, Rich) is not imported with httpx.
    assert not {"click", "pygments", "rich"} & top_level(loaded)
    assert not loaded & set(GROUP_MODULES), sorted(loaded & set(GROUP_MODULES))


class _Instances(BaseHTTPRequestHandler):
    """A stand-in portal: every GET answers two running instances."""

    def do_GET(self) -> None:
        rows = [
            {
                "id": f"i-{n}",
                "tool": "demo",
                "owner": "ada",
                "site": "local",
                "state": "running",
                "created_at": "2026-12-02T10:00:00+00:00",
                "url": f"http://127.0.0.1:8000/i/i-{n}/",
                "reason": None,
            }
            for n in range(2)
        ]
        body = json.dumps(rows).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def portal_with_instances() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Instances)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_a_piped_table_is_printed_without_rich(portal_with_instances: str, tmp_path: Path) -> None:
    printed, loaded = probe("ls", tmp_path=tmp_path, url=portal_with_instances)
    assert printed.splitlines()[0].split() == [
        "ID",
        "TOOL",
        "OWNER",
        "SITE",
        "STATE",
        "CREATED",
        "URL",
        "/",
        "REASON",
    ]
    assert [line.split()[0] for line in printed.splitlines()[1:]] == ["i-0", "i-1"]
    assert "rich" not in top_level(loaded)


def test_a_group_is_loaded_when_it_is_named(tmp_path: Path) -> None:
    loaded = loaded_by("dataset", "replica", "--help", tmp_path=tmp_path)
    assert "labgate.cli.datasets" in loaded
    assert not loaded & (set(GROUP_MODULES) - {"labgate.cli.datasets"})


def labgate(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABGATE_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"), COLUMNS="200")
    return subprocess.run(
        [str(Path(sys.executable).with_name("labgate")), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_help_lists_the_groups_with_their_help(tmp_path: Path) -> None:
    from labgate.cli import RootGroup

    text = labgate("--help", tmp_path=tmp_path).stdout
    for name, (_, help_text) in RootGroup.lazy_groups.items():
        assert re.search(rf"^  {name} +{re.escape(help_text)}$", text, re.MULTILINE), name


def test_a_group_has_its_help_and_commands(tmp_path: Path) -> None:
    done = labgate("dataset", "--help", tmp_path=tmp_path)
    assert done.returncode == 0
    assert "Usage: labgate dataset [OPTIONS] COMMAND [ARGS]..." in done.stdout
    assert "Datasets: register them, say where replicas are" in done.stdout
    assert re.search(r"^  replica +Replicas of a dataset on sites", done.stdout, re.MULTILINE)


def test_a_group_without_a_command_prints_its_help(tmp_path: Path) -> None:
    done = labgate("user", tmp_path=tmp_path)
    assert done.returncode == 2
    assert "Usage: labgate user [OPTIONS] COMMAND [ARGS]..." in done.stderr
    assert "error:" not in done.stderr


def test_a_misspelt_group_is_suggested(tmp_path: Path) -> None:
    done = labgate("snapshots", "list", tmp_path=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: No such command 'snapshots'. Did you mean 'snapshot'? (see `labgate --help`)"
    ]
