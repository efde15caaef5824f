"""Security review of groups and group volumes: membership, deletion, names, the data dir.

Each test fails on the code before the review because of the hole it names.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from datasets_fixtures import environment_of, instance_access, require_bwrap, write_in
from helpers import wait_for_state
from labgate.config import Settings, SiteCapacity, SiteConfig
from labgate.datadir import UnsafeSetup, prepare_data_dir
from labgate.db.models import Group, GroupMember, InstanceEvent, Site, User
from labgate.scheduler.group_volumes import group_mounts
from tools_fixtures import costly_tool


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    groups = tmp_path / "groups"
    (groups / "physics").mkdir(parents=True)
    (groups / "physics").chmod(0o1777)  # each user's tools run under their own uid here
    groups.chmod(0o700)  # bound by what labgate opened: no local account need pass through
    assert settings.tools_dir is not None
    (settings.tools_dir / "slow.toml").write_text(costly_tool("slow", 2))
    # One start at a time: a second launch waits queued behind the first.
    site = SiteConfig(name="local", group_root=groups, capacity=SiteCapacity(starts=1))
    return settings.model_copy(update={"sites": [site], "max_instances_per_user": 3})


async def make_group(
    client: httpx.AsyncClient, admin: dict[str, str], name: str, *members: str
) -> None:
    made = await client.post("/api/v1/groups", json={"name": name}, headers=admin)
    assert made.status_code == 201, made.text
    for member in members:
        added = await client.put(f"/api/v1/groups/{name}/members/{member}", headers=admin)
        assert added.status_code == 201, added.text


async def launch(client: httpx.AsyncClient, headers: dict[str, str], tool: str = "demo") -> str:
    response = await client.post("/api/v1/instances", json={"tool": tool}, headers=headers)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def messages(app: Any, instance_id: str) -> list[str]:
    """The messages of an instance's events."""

    def query(session: Any) -> list[str]:
        rows = session.scalars(
            select(InstanceEvent.message).where(InstanceEvent.instance_id == instance_id)
        )
        return list(rows)

    return list(await app.state.portal.run_db(query))


async def running(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    iid = await launch(client, headers)
    assert (await wait_for_state(client, headers, iid, {"running", "failed"}))["state"] == "running"
    return iid


async def test_a_member_taken_out_of_a_group_keeps_no_access_to_its_volume_in_a_running_instance(
    app: Any, client: httpx.AsyncClient, admin_headers: dict[str, str], make_user: Any
) -> None:
    """Removal ends the member's read-write access: the instance that mounts it is stopped."""
    require_bwrap()
    alice, bob = await make_user("alice"), await make_user("bob")
    await make_group(client, admin_headers, "physics", "alice", "bob")
    mine, theirs = await running(client, alice), await running(client, bob)
    _, _, pid = await instance_access(app, mine)
    where = environment_of(pid)["LABGATE_DATA_PHYSICS"]
    assert await write_in(app, mine, f"{where}/before.txt")  # a member writes

    removed = await client.delete("/api/v1/groups/physics/members/alice", headers=admin_headers)
    assert removed.status_code == 204, removed.text

    # Her instance that mounts the volume read-write is stopped, with the reason;
    # bob, still a member, keeps his.
    shown = await wait_for_state(client, alice, mine, {"stopping", "stopped"}, timeout=10)
    assert shown["state"] in ("stopping", "stopped")
    assert any("physics" in message for message in await messages(app, mine))
    assert (await client.get(f"/api/v1/instances/{theirs}", headers=bob)).json()[
        "state"
    ] == "running"
    # And a new launch of hers does not get it.
    again = await running(client, alice)
    assert (await client.get(f"/api/v1/instances/{again}", headers=alice)).json()["mounts"] == []


async def test_an_instance_waiting_to_start_does_not_get_a_volume_its_owner_lost(
    app: Any, client: httpx.AsyncClient, admin_headers: dict[str, str], make_user: Any
) -> None:
    """An instance queued before the removal starts without the group's volume."""
    require_bwrap()
    alice = await make_user("alice")
    await make_group(client, admin_headers, "physics", "alice")
    first = await launch(client, alice, "slow")
    waiting = await launch(client, alice, "slow")
    shown = (await client.get(f"/api/v1/instances/{waiting}", headers=alice)).json()
    assert shown["state"] == "queued", shown
    assert shown["mounts"] == [
        {"group": "physics", "target": "/groups/physics", "read_only": False}
    ]

    removed = await client.delete("/api/v1/groups/physics/members/alice", headers=admin_headers)
    assert removed.status_code == 204, removed.text

    shown = (await client.get(f"/api/v1/instances/{waiting}", headers=alice)).json()
    assert shown["mounts"] == [], shown
    done = await wait_for_state(client, alice, waiting, {"running", "failed"}, timeout=60)
    assert done["state"] == "running", done
    _, _, pid = await instance_access(app, waiting)
    assert "LABGATE_DATA_PHYSICS" not in environment_of(pid)
    assert first  # the first one (started with the volume) is not the point here


async def test_deleting_a_group_never_hands_its_volume_to_a_later_group_of_that_name(
    app: Any,
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    make_user: Any,
    tmp_path: Path,
) -> None:
    """A group whose volume is still on a site is not deleted (409 naming it); files stay.

    Deleting it anyway would leave ``<group_root>/physics`` to whoever is put in a
    group made later with the same name: they would read the old members' files.
    Once the operator moved the directory away the delete goes through, and the
    former members' instances that still mount the moved directory are stopped.
    """
    require_bwrap()
    alice = await make_user("alice")
    await make_group(client, admin_headers, "physics", "alice")
    volume = tmp_path / "groups" / "physics"
    (volume / "secret.txt").write_text("old members' data")
    mine = await running(client, alice)

    refused = await client.delete("/api/v1/groups/physics", headers=admin_headers)
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["error"] == "group_volume_exists" and str(volume) in body["detail"], body
    assert (await client.get("/api/v1/groups/physics", headers=admin_headers)).status_code == 200
    assert (volume / "secret.txt").read_text() == "old members' data"  # nothing lost

    volume.rename(tmp_path / "physics-archived")
    deleted = await client.delete("/api/v1/groups/physics", headers=admin_headers)
    assert deleted.status_code == 204, deleted.text
    # Her instance still had the (moved) directory bound read-write: it is stopped.
    shown = await wait_for_state(client, alice, mine, {"stopping", "stopped"}, timeout=10)
    assert shown["state"] in ("stopping", "stopped")


async def test_only_plain_group_names_get_a_volume(
    app: Any, client: httpx.AsyncClient, make_user: Any, tmp_path: Path
) -> None:
    """A group named other than ``GROUP_NAME`` (an operator's ``group_map``) mounts nothing.

    ``physics/private`` would otherwise mount a folder inside the ``physics``
    volume for people who are not in ``physics``; ``Physics`` is the ``physics``
    volume on a file system that ignores case.
    """
    await make_user("mallory")
    (tmp_path / "groups" / "physics" / "private").mkdir()
    (tmp_path / "groups" / "Physics").mkdir()

    def check(session: Any) -> list[dict[str, Any]]:
        user = session.scalar(select(User).where(User.name == "mallory"))
        for name in ("physics/private", "Physics"):
            group = Group(name=name, description="")
            session.add(group)
            session.flush()
            session.add(GroupMember(group_id=group.id, user_id=user.id))
        session.flush()
        site = session.scalar(select(Site).where(Site.name == "local"))
        return group_mounts(session, user, site)

    assert await app.state.portal.run_db(check) == []


def test_a_data_dir_of_another_account_is_refused(tmp_path: Path) -> None:
    """Its owner could swap ``workspaces/<user>`` for a link that root then chowns."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give the data dir to another account")
    data = tmp_path / "var"
    data.mkdir(mode=0o700)
    os.chown(data, 65534, 65534)
    with pytest.raises(UnsafeSetup, match="owned by uid 65534"):
        prepare_data_dir(data)


def test_a_workspaces_dir_others_may_write_is_refused(tmp_path: Path) -> None:
    """``workspaces`` linked to a shared folder: another account could plant ``<user>`` there."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    data = tmp_path / "var"
    data.mkdir(mode=0o700)
    (data / "workspaces").symlink_to(shared)
    with pytest.raises(UnsafeSetup, match="workspaces"):
        prepare_data_dir(data)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777  # refused, not changed behind a link


def test_a_data_dir_in_a_folder_others_may_write_is_refused(tmp_path: Path) -> None:
    """Anyone may rename it away there and put a folder of theirs in its place."""
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)  # no sticky bit
    with pytest.raises(UnsafeSetup, match="others may write"):
        prepare_data_dir(open_parent / "var")


async def test_membership_lost_outside_the_api_keeps_the_volume_from_a_waiting_start(
    app: Any, client: httpx.AsyncClient, admin_headers: dict[str, str], make_user: Any
) -> None:
    """A sign-in whose identity provider no longer lists the group drops the membership
    row without the API's clean-up: the launch spec of an instance still waiting to start
    keeps only the volumes of groups its owner is in now."""
    from sqlalchemy import delete

    from labgate.db.models import Instance

    require_bwrap()
    alice = await make_user("alice")
    await make_group(client, admin_headers, "physics", "alice")
    first = await launch(client, alice, "slow")
    waiting = await launch(client, alice, "slow")
    shown = (await client.get(f"/api/v1/instances/{waiting}", headers=alice)).json()
    assert shown["state"] == "queued" and shown["mounts"], shown
    portal = app.state.portal

    def leave_then_spec(session: Any) -> list[str]:
        group = session.scalar(select(Group.id).where(Group.name == "physics"))
        user = session.scalar(select(User.id).where(User.name == "alice"))
        session.execute(
            delete(GroupMember).where(GroupMember.group_id == group, GroupMember.user_id == user)
        )
        spec = portal.instances.spec_for(session.get(Instance, waiting))
        return [m.target for m in spec.mounts] + [k for k in spec.env if "PHYSICS" in k]

    assert await portal.run_db(leave_then_spec) == []
    assert first
