"""``labgate snapshot``: save an instance, list, show, share, launch from it, delete."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from live_server import LiveServer, live_server
from test_cli import Cli, make_user, one_error_line


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("cli-snapshots")) as running:
        yield running


@pytest.fixture
def cli(server: LiveServer, tmp_path: Path) -> Cli:
    return Cli(server, tmp_path)


def test_snapshot_create_list_share_launch_delete(cli: Cli, server: LiveServer) -> None:
    admin = server.admin_token()
    owner = make_user(cli, admin, "sara", "sara-password-1")
    friend = make_user(cli, admin, "finn", "finn-password-1")
    url = cli("launch", "demo", token=owner).stdout.strip()
    instance_id = url.rstrip("/").rsplit("/", 1)[-1]

    created = cli("snapshot", "create", instance_id, "--name", "set up", token=owner)
    snapshot_id = created.stdout.strip()
    assert re.fullmatch(r"[a-z0-9]+", snapshot_id), created.stdout
    assert f"snapshot {snapshot_id} of {instance_id}: ready" in created.stderr

    table = cli("snapshot", "list", token=owner).stdout
    assert re.search(rf"^{snapshot_id}\s+set up\s+demo\s+sara\s+ready\s", table, re.M), table
    assert "no snapshots" in cli("snapshot", "list", token=friend).stderr
    hidden = cli("snapshot", "show", snapshot_id, token=friend, ok=False)
    assert one_error_line(hidden) == f"error: no snapshot '{snapshot_id}' (unknown_snapshot)"

    shared = cli("snapshot", "share", snapshot_id, "finn", token=owner)
    assert f"snapshot {snapshot_id} is shared with finn" in shared.stderr
    shown = json.loads(cli("snapshot", "show", snapshot_id, "--json", token=owner).stdout)
    assert shown["shared_with"] == ["finn"] and shown["source_instance"] == instance_id
    details = cli("snapshot", "show", snapshot_id, token=owner).stdout
    assert re.search(r"^shared_with\s+finn$", details, re.M), details
    assert re.search(r"^kind\s+archive$", details, re.M), details

    # finn sees it, launches from it, but cannot delete or share it.
    assert snapshot_id in cli("snapshot", "list", "--tool", "demo", token=friend).stdout
    assert cli("snapshot", "list", "--tool", "jupyterlab", token=friend).stdout == ""
    launched = cli("snapshot", "launch", snapshot_id, "--no-wait", "--json", token=friend)
    from_snapshot = json.loads(launched.stdout)
    assert from_snapshot["snapshot"] == snapshot_id and from_snapshot["owner"] == "finn"
    refused = cli("snapshot", "delete", snapshot_id, token=friend, ok=False)
    assert one_error_line(refused).endswith("(forbidden)")
    cli("stop", from_snapshot["id"], "--wait", token=friend)

    cli("snapshot", "unshare", snapshot_id, "finn", token=owner)
    gone = cli("snapshot", "launch", snapshot_id, token=friend, ok=False)
    assert one_error_line(gone).endswith("(unknown_snapshot)")
    again = cli("snapshot", "unshare", snapshot_id, "finn", token=owner, ok=False)
    assert one_error_line(again).endswith("(not_found)")

    deleted = cli("snapshot", "delete", snapshot_id, token=owner)
    assert f"snapshot {snapshot_id} deleted" in deleted.stderr
    assert "no snapshots" in cli("snapshot", "list", token=owner).stderr
    cli("stop", instance_id, token=owner)


def test_snapshot_of_a_stopped_instance_is_one_line(cli: Cli, server: LiveServer) -> None:
    owner = make_user(cli, server.admin_token(), "stan", "stan-password-1")
    instance_id = cli("launch", "demo", "--no-wait", token=owner).stdout.strip()
    cli("stop", instance_id, "--wait", token=owner)
    refused = cli("snapshot", "create", instance_id, token=owner, ok=False)
    assert one_error_line(refused).endswith("(invalid_state)")
    assert refused.exit_code == 1
    missing = cli("snapshot", "create", "nosuchinstance", token=owner, ok=False)
    assert one_error_line(missing) == "error: no instance 'nosuchinstance' (unknown_instance)"
