"""Shared group volumes: every member's instances get the group's directory, read-write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from datasets_fixtures import environment_of, instance_access, read_in, require_bwrap, write_in
from helpers import wait_for_state
from labgate.config import Settings, SiteConfig


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    groups = tmp_path / "groups"
    (groups / "physics").mkdir(parents=True)
    (groups / "physics").chmod(0o1777)  # each user's tools run under their own uid here
    (groups / "chemistry").mkdir()
    site = SiteConfig(name="local", group_root=groups)
    return settings.model_copy(update={"sites": [site]})


async def running(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    response = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=headers)
    assert response.status_code == 202, response.text
    iid = str(response.json()["id"])
    assert (await wait_for_state(client, headers, iid, {"running", "failed"}))["state"] == "running"
    return iid


async def test_members_share_their_groups_volume_read_write_and_others_do_not_see_it(
    app: Any,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    make_user: Any,
    tmp_path: Path,
) -> None:
    require_bwrap()
    alice, bob, carol = [await make_user(name) for name in ("alice", "bob", "carol")]
    for group, members in (("physics", ["alice", "bob"]), ("ghosts", ["alice"])):
        assert (
            await client.post("/api/v1/groups", json={"name": group}, headers=admin_headers)
        ).status_code == 201
        for member in members:
            added = await client.put(
                f"/api/v1/groups/{group}/members/{member}", headers=admin_headers
            )
            assert added.status_code in (200, 201), added.text

    first = await running(client, alice)
    shown = (await client.get(f"/api/v1/instances/{first}", headers=alice)).json()
    # Only groups with a directory on the site ("ghosts" has none there).
    assert shown["mounts"] == [
        {"group": "physics", "target": "/groups/physics", "read_only": False}
    ]
    _, _, pid = await instance_access(app, first)
    where = environment_of(pid)["LABGATE_DATA_PHYSICS"]
    assert await write_in(app, first, f"{where}/results.csv")
    assert (tmp_path / "groups" / "physics" / "results.csv").read_text() == "overwritten"

    second = await running(client, bob)
    _, _, pid = await instance_access(app, second)
    assert await read_in(
        app, second, f"{environment_of(pid)['LABGATE_DATA_PHYSICS']}/results.csv"
    ) == ("overwritten")
    assert await write_in(app, second, f"{environment_of(pid)['LABGATE_DATA_PHYSICS']}/bob.txt")

    third = await running(client, carol)
    _, _, pid = await instance_access(app, third)
    assert "LABGATE_DATA_PHYSICS" not in environment_of(pid)
    assert await read_in(app, third, f"{where}/results.csv") is None
    assert (await client.get(f"/api/v1/instances/{third}", headers=carol)).json()["mounts"] == []
