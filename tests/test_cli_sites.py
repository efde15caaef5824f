"""``labgate site``: add a network site, its token shown once, list, show, rotate, revoke, rm."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from live_server import LiveServer, live_server
from test_cli import Cli


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("cli-sites-server")) as running:
        yield running


@pytest.fixture
def cli(server: LiveServer, tmp_path: Path) -> Cli:
    return Cli(server, tmp_path)


TOKEN = re.compile(r"enrolment token \(shown only this once\): (lgs_\S+)")


def test_add_prints_the_token_once_and_the_agent_command(cli: Cli, server: LiveServer) -> None:
    admin = server.admin_token()
    added = cli(
        "site",
        "add",
        "east",
        "--backend",
        "containers",
        "--option",
        "pull=never",
        "--option",
        "timeout=30",
        "--cpu",
        "8",
        "--memory",
        "64G",
        "--max-instances",
        "4",
        "--label",
        "zone=lab",
        "--data-root",
        "/srv/data",
        token=admin,
    ).stdout
    match = TOKEN.search(added)
    assert match, added
    token = match.group(1)
    assert f"labgate agent --portal {server.url} --token {token}" in added

    listed = cli("site", "list", token=admin).stdout
    assert token not in listed
    row = re.search(r"^east\s+network\s+containers\s+tunnel\s+waiting\s.*$", listed, re.M)
    assert row, listed
    assert "cpu=8 memory=64G instances=4" in row.group(0)
    assert re.search(r"^local\s+local\s+process\s+direct\s+local\s", listed, re.M), listed

    shown = json.loads(cli("site", "show", "east", "--json", token=admin).stdout)
    assert "token" not in shown
    assert shown["options"] == {"pull": "never", "timeout": 30}
    assert shown["labels"] == {"zone": "lab"} and shown["data_root"] == "/srv/data"
    table = cli("site", "show", "east", token=admin).stdout
    assert re.search(r"^status\s+waiting$", table, re.M) and "option pull" in table

    rotated = cli("site", "token", "east", token=admin).stdout
    new = TOKEN.search(rotated)
    assert new and new.group(1) != token and f"--token {new.group(1)}" in rotated
    assert "revoked" in cli("site", "revoke", "east", token=admin).stdout
    assert json.loads(cli("site", "show", "east", "--json", token=admin).stdout)["status"] == (
        "revoked"
    )
    assert "removed" in cli("site", "rm", "east", "--yes", token=admin).stdout
    assert "east" not in cli("site", "list", token=admin).stdout


def test_mistakes_are_one_line(cli: Cli, server: LiveServer) -> None:
    admin = server.admin_token()
    for args, words in [
        (["site", "add", "west", "--backend", "nope"], "unknown backend"),
        (["site", "add", "west", "--backend", "process", "--option", "x=1"], "options.x"),
        (["site", "add", "local", "--backend", "process"], "exists"),
        (["site", "rm", "local", "--yes"], "settings"),
        (["site", "token", "nowhere"], "no site called"),
    ]:
        failed = cli(*args, token=admin, ok=False)
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), failed.stderr
        assert words in lines[0], (args, lines)
    usage = cli(
        "site", "add", "west", "--backend", "process", "--label", "x", token=admin, ok=False
    )
    assert usage.exit_code == 2 and "KEY=VALUE" in usage.stderr


def test_set_changes_only_what_is_given(cli: Cli, server: LiveServer) -> None:
    admin = server.admin_token()
    cli("site", "add", "north", "--backend", "process", "--cpu", "8", "--memory", "64G",
        "--label", "zone=lab", token=admin)  # fmt: skip
    said = cli("site", "set", "north", "--reach", "direct", "--cpu", "4", token=admin).stdout
    assert "site 'north': direct, capacity cpu=4 memory=64G" in said, said
    shown = json.loads(cli("site", "show", "north", "--json", token=admin).stdout)
    assert shown["reach"] == "direct" and shown["labels"] == {"zone": "lab"}
    assert shown["capacity"] == {"cpu": 4, "memory": 64 * 2**30, "max_instances": 0}
    cli("site", "set", "north", "--label", "gpu=a100", "--start-cores", "1.5", "--memory", "0",
        token=admin)  # fmt: skip
    shown = json.loads(cli("site", "show", "north", "--json", token=admin).stdout)
    assert shown["labels"] == {"gpu": "a100"} and shown["start_capacity"] == 1.5
    assert shown["capacity"] == {"cpu": 4, "memory": 0, "max_instances": 0}
    # Back to the default start queue: the cores the site's agent reports (with no agent
    # yet, this machine's).
    cli("site", "set", "north", "--start-cores", "default", token=admin)
    shown = json.loads(cli("site", "show", "north", "--json", token=admin).stdout)
    assert shown["start_capacity"] == os.cpu_count()
    for args, words in [
        (["site", "set", "north"], "give at least one thing to change"),
        (["site", "set", "north", "--reach", "sideways"], "tunnel or direct"),
        (["site", "set", "north", "--start-cores", "many"], "a number of cores or 'default'"),
        (["site", "set", "north", "--start-cores", "-1"], "a number of cores or 'default'"),
    ]:
        usage = cli(*args, token=admin, ok=False)
        assert usage.exit_code == 2 and words in usage.stderr, usage.stderr
    for args, words in [
        (["site", "set", "local", "--cpu", "1"], "settings"),
        (["site", "set", "nowhere", "--cpu", "1"], "no site called"),
        (["site", "set", "north", "--option", "x=1"], "options.x"),
    ]:
        failed = cli(*args, token=admin, ok=False)
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), failed.stderr
        assert words in lines[0], (args, lines)
    assert "removed" in cli("site", "rm", "north", "--yes", token=admin).stdout
