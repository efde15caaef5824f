"""CLI operations commands (group, quota, usage, keep-alive, pool) against a real portal."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from live_server import LiveServer, live_server
from test_cli import Cli


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("cli-ops-server")) as running:
        yield running


@pytest.fixture
def cli(server: LiveServer, tmp_path: Path) -> Cli:
    return Cli(server, tmp_path)


def test_groups_quotas_usage_keep_alive_and_pools(cli: Cli, server: LiveServer) -> None:
    admin = server.admin_token()
    cli(
        "group",
        "create",
        "lab",
        "--instances",
        "3",
        "--memory",
        "8G",
        "--max-lifetime",
        "8h",
        token=admin,
    )
    cli("group", "add", "lab", "admin", token=admin)
    shown = json.loads(cli("group", "show", "lab", "--json", token=admin).stdout)
    assert shown["members"] == ["admin"] and shown["limits"]["instances"] == 3
    assert shown["max_lifetime"] == 8 * 3600
    cli("group", "set", "lab", "--instances", "none", "--cpu", "4", token=admin)
    listed = cli("group", "list", token=admin).stdout
    assert "lab" in listed and "cpu=4" in listed and "memory=8G" in listed

    cli("quota", "set", "admin", "--core-hours", "100", token=admin)
    quota = json.loads(cli("quota", "show", "--json", token=admin).stdout)
    assert quota["limits"]["core_hours"] == 100 and quota["groups"][0]["name"] == "lab"
    assert "core_hours=100" in cli("quota", "show", token=admin).stdout
    bad = cli("quota", "set", "admin", token=admin, ok=False)
    assert "give at least one" in bad.stderr

    launched = json.loads(cli("launch", "demo", "--json", token=admin).stdout)
    iid = launched["id"]
    countdown = cli("keep-alive", iid, token=admin).stdout
    assert "if unused" in countdown
    kept = json.loads(cli("keep-alive", iid, "--for", "2h", "--json", token=admin).stdout)
    assert kept["keep_alive_until"] and kept["capped"] is False
    assert "kept alive until" in cli("keep-alive", iid, token=admin).stdout
    assert (
        json.loads(cli("keep-alive", iid, "--off", "--json", token=admin).stdout)[
            "keep_alive_until"
        ]
        is None
    )
    cli("keep-alive", iid, "--for", "1h", "--off", token=admin, ok=False)
    cli("stop", iid, "--wait", token=admin)

    table = cli("usage", "--by", "user", "--by", "group", token=admin).stdout
    assert "admin" in table and "lab" in table
    rows = list(
        csv.DictReader(io.StringIO(cli("usage", "--by", "tool", "--csv", token=admin).stdout))
    )
    assert rows and rows[0]["tool"] == "demo" and rows[0]["instances"] == "1"
    records = json.loads(cli("usage", "--records", "--json", token=admin).stdout)
    assert records[0]["instance"] == iid and records[0]["reason"] == "stopped"
    assert iid in cli("usage", "--records", token=admin).stdout

    assert "no warm pools" in cli("pool", "list", token=admin).stderr
    cli("group", "remove", "lab", "admin", token=admin)
    cli("group", "delete", "lab", token=admin)
    assert "no groups" in cli("group", "list", token=admin).stderr
