"""``labgate run``: submit (with --watch), list, show, logs, results, cancel, re-run."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from live_server import LiveServer, live_server
from test_cli import Cli


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("cli-runs-server")) as running:
        yield running


@pytest.fixture
def cli(server: LiveServer, tmp_path: Path) -> Cli:
    return Cli(server, tmp_path)


GOOD = """
name = "cli"
[[stages]]
name = "one"
[[stages.tasks]]
name = "hello"
command = "echo hello; echo hi > $LABGATE_RESULTS_DIR/hi.txt"
"""


def test_submit_watch_show_logs_and_results(cli: Cli, server: LiveServer, tmp_path: Path) -> None:
    token = server.admin_token()
    path = tmp_path / "run.toml"
    path.write_text(GOOD)
    watched = cli("run", "submit", str(path), "--watch", token=token)
    assert "hello: succeeded on local exit 0" in watched.stdout
    run_id = watched.stdout.split()[1]
    assert run_id in cli("run", "list", token=token).stdout
    shown = json.loads(cli("run", "show", run_id, "--json", token=token).stdout)
    assert shown["state"] == "succeeded"
    assert cli("run", "logs", run_id, "hello", token=token).stdout == "hello\n"
    archive = tmp_path / "out.tar.gz"
    cli("run", "results", run_id, "-o", str(archive), token=token)
    with tarfile.open(fileobj=io.BytesIO(archive.read_bytes()), mode="r:gz") as tar:
        assert "hello/hi.txt" in tar.getnames()
    refused = cli("run", "rerun", run_id, token=token, ok=False)
    assert "succeeded: it has no failed task" in refused.stderr


def test_a_bad_definition_is_one_line_naming_each_problem(
    cli: Cli, server: LiveServer, tmp_path: Path
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[stages]]\nname = "Bad Name"\n[[stages.tasks]]\nname = "t"\n')
    result = cli("run", "submit", str(path), token=server.admin_token(), ok=False)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "stages.0.name" in lines[0] and "give exactly one of command and callable" in lines[0]


def test_cancel_a_running_run(cli: Cli, server: LiveServer, tmp_path: Path) -> None:
    token = server.admin_token()
    path = tmp_path / "long.json"
    path.write_text(
        json.dumps(
            {"stages": [{"name": "one", "tasks": [{"name": "nap", "command": ["sleep", "30"]}]}]}
        )
    )
    run_id = cli("run", "submit", str(path), token=token).stdout.strip()
    cli("run", "cancel", run_id, token=token)
    assert "run " + run_id + " (run): cancelled" in cli("run", "show", run_id, token=token).stdout
