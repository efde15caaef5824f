"""Quotas: users' and groups' limits on instances, CPU, memory and monthly core-hours."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from helpers import needs_postgres
from labgate.db.models import Instance, InstanceState, Site, UsageRecord, User, utcnow
from labgate.errors import QuotaExceeded
from labgate.scheduler import quotas
from labgate.security import new_id
from labgate.wire.launch import Resources


def hold(app: Any, user: str, cpu: float = 1.0, memory: int = 1024**3, group: str = "") -> None:
    """Record a running instance of ``user`` in the database (no process behind it)."""

    def add(session: Any) -> None:
        owner = session.scalar(select(User).where(User.name == user))
        site = session.scalar(select(Site))
        instance = Instance(
            id=new_id(),
            owner_id=owner.id,
            tool="demo",
            site=site,
            state=InstanceState.running,
            resources={"cpu": cpu, "memory": memory},
        )
        session.add(instance)
        session.add(
            UsageRecord(
                instance_id=instance.id,
                user_id=owner.id,
                user_name=user,
                group_name=group,
                tool="demo",
                site=site.name,
                cpu=cpu,
                memory=memory,
            )
        )

    return app.state.portal.run_db(add)


async def refused(client: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> dict:
    response = await client.post(
        "/api/v1/instances", json={"tool": "demo", **body}, headers=headers
    )
    assert response.status_code == 429, response.text
    return dict(response.json())


async def count(app: Any) -> int:
    return await app.state.portal.run_db(
        lambda s: s.scalar(select(func.count()).select_from(Instance))
    )


async def test_user_limits_say_which_limit_and_the_use(app, client, make_user, admin_headers):
    alice = await make_user("alice")
    await hold(app, "alice", cpu=1.5, memory=3 * 1024**3)
    limits = {"cpu": 2, "memory": "4G", "instances": 3}
    set_ = await client.put("/api/v1/users/alice/limits", json=limits, headers=admin_headers)
    assert set_.status_code == 200, set_.text
    assert set_.json()["effective"]["memory"] == 4 * 1024**3
    before = await count(app)

    body = await refused(client, alice, resources={"cpu": 1})
    assert (body["quota"], body["scope"], body["limit"], body["current"]) == ("cpu", "user", 2, 1.5)
    assert "2.5 of 2 allowed CPUs" in body["detail"] and "1.5 in use" in body["detail"]
    body = await refused(client, alice, resources={"cpu": 0.5, "memory": "2G"})
    assert body["quota"] == "memory" and "of 4 GiB allowed memory" in body["detail"]
    await hold(app, "alice", cpu=0.1, memory=1)
    await hold(app, "alice", cpu=0.1, memory=1)
    body = await refused(client, alice, resources={"cpu": 0.1, "memory": "16M"})
    assert body["quota"] == "instances" and "3 of 3 allowed instances" in body["detail"]
    assert await count(app) == before + 2  # the two held; nothing recorded, nothing started

    # null removes a limit: the settings' default applies again.
    cleared = await client.put(
        "/api/v1/users/alice/limits", json={"instances": None}, headers=admin_headers
    )
    assert cleared.json()["limits"]["instances"] is None
    assert cleared.json()["effective"]["instances"] == 5
    mine = (await client.get("/api/v1/users/me/limits", headers=alice)).json()
    assert mine["use"]["instances"] == 3 and mine["use"]["cpu"] == 1.7
    assert (
        await client.put("/api/v1/users/alice/limits", json={"cpu": 9}, headers=alice)
    ).status_code == 403


async def test_monthly_core_hours(app, client, make_user, admin_headers):
    bob = await make_user("bob")

    def history(session: Any) -> None:
        owner = session.scalar(select(User).where(User.name == "bob"))
        now = utcnow()
        # 2 CPUs for 5 hours, ended an hour ago (this month unless it is the 1st's first hours).
        start = max(now - timedelta(hours=6), now.replace(day=1, hour=0, minute=0, second=0))
        session.add(
            UsageRecord(
                instance_id="old",
                user_id=owner.id,
                user_name="bob",
                tool="demo",
                cpu=2.0,
                memory=0,
                started_at=start,
                stopped_at=start + timedelta(hours=5),
                reason="stopped",
            )
        )

    await app.state.portal.run_db(history)
    use = (await client.get("/api/v1/users/bob/limits", headers=admin_headers)).json()["use"]
    await client.put(
        "/api/v1/users/bob/limits", json={"core_hours": use["core_hours"]}, headers=admin_headers
    )
    body = await refused(client, bob)
    assert body["quota"] == "core_hours" and "core-hours allowed this month" in body["detail"]


async def test_group_limits_cap_members_together(app, client, make_user, admin_headers):
    carol, dan = await make_user("carol"), await make_user("dan")
    created = await client.post(
        "/api/v1/groups",
        json={"name": "physics", "limits": {"instances": 2, "cpu": 4}},
        headers=admin_headers,
    )
    assert created.status_code == 201, created.text
    for user in ("carol", "dan"):
        await client.put(f"/api/v1/groups/physics/members/{user}", headers=admin_headers)
    await hold(app, "carol", group="physics")
    await hold(app, "dan", group="physics")
    body = await refused(client, carol)
    assert (body["quota"], body["scope"], body["group"]) == ("instances", "group", "physics")
    assert "group physics has 2 of 2 allowed instances" in body["detail"]
    shown = (await client.get("/api/v1/groups/physics", headers=dan)).json()
    assert shown["use"]["instances"] == 2 and shown["members"] == ["carol", "dan"]

    # A second group with room takes the launch; naming a full one is refused.
    await client.post("/api/v1/groups", json={"name": "spare"}, headers=admin_headers)
    await client.put("/api/v1/groups/spare/members/carol", headers=admin_headers)
    body = await refused(client, carol, group="physics")
    assert body["group"] == "physics"
    launched = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=carol)
    assert launched.status_code == 202, launched.text
    group = await app.state.portal.run_db(
        lambda s: s.scalar(
            select(UsageRecord.group_name).where(UsageRecord.instance_id == launched.json()["id"])
        )
    )
    assert group == "spare"
    wrong = await client.post(
        "/api/v1/instances", json={"tool": "demo", "group": "spare"}, headers=dan
    )
    assert wrong.status_code == 403 and wrong.json()["error"] == "not_a_member"


async def test_simultaneous_launches_never_overshoot_a_limit(app, client, make_user, admin_headers):
    # Four members of a group that may hold 3 instances, 12 launches at the same moment:
    # each admission must count what the ones before it committed.
    await client.post(
        "/api/v1/groups", json={"name": "rush", "limits": {"instances": 3}}, headers=admin_headers
    )
    members = []
    for n in range(4):
        members.append(await make_user(f"rush{n}"))
        await client.put(f"/api/v1/groups/rush/members/rush{n}", headers=admin_headers)

    async def launch(headers: dict[str, str]) -> httpx.Response:
        return await client.post(
            "/api/v1/instances", json={"tool": "demo", "group": "rush"}, headers=headers
        )

    answers = await asyncio.gather(*(launch(h) for h in members for _ in range(3)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [202] * 3 + [429] * 9, [a.text for a in answers if a.status_code >= 500]
    assert all(a.json()["quota"] == "instances" for a in answers if a.status_code == 429)
    held = await app.state.portal.run_db(
        lambda s: s.scalar(
            select(func.count())
            .select_from(UsageRecord)
            .where(UsageRecord.group_name == "rush", UsageRecord.stopped_at.is_(None))
        )
    )
    assert held == 3


@pytest.mark.postgres
@needs_postgres
async def test_a_group_admission_waits_for_another_open_admission_into_the_group(
    app, client, make_user, admin_headers
):
    """Another portal process admitting into a group counts only after the first commits.

    Each process orders its own launches; across processes the group's row lock
    does, or two portals each see room for one and both admit.
    """
    await make_user("carol")
    await make_user("dan")
    made = await client.post(
        "/api/v1/groups", json={"name": "lab", "limits": {"instances": 1}}, headers=admin_headers
    )
    assert made.status_code == 201, made.text
    for user in ("carol", "dan"):
        await client.put(f"/api/v1/groups/lab/members/{user}", headers=admin_headers)
    db, defaults = app.state.portal.db, app.state.portal.instances.user_defaults()
    asked = Resources(cpu=0.5, memory=256 * 1024**2)

    def admit_as(session: Any, name: str) -> str:
        user = session.scalar(select(User).where(User.name == name))
        try:
            quotas.admit(session, defaults, user, asked, "lab")
        except QuotaExceeded:
            return "refused"
        return "admitted"

    first = db.sessionmaker()
    try:
        assert admit_as(first, "carol") == "admitted"  # carol's launch, not yet committed

        def second() -> str:
            with db.sessionmaker() as session:
                return admit_as(session, "dan")

        dan = asyncio.create_task(asyncio.to_thread(second))
        await asyncio.sleep(0.5)
        assert not dan.done()  # waiting for the group's row
        carol = first.scalar(select(User).where(User.name == "carol"))
        site = first.scalar(select(Site))
        instance = Instance(
            id=new_id(),
            owner_id=carol.id,
            tool="demo",
            site=site,
            state=InstanceState.pending,
            resources=asked.as_json(),
        )
        first.add(instance)
        first.add(
            UsageRecord(
                instance_id=instance.id,
                user_id=carol.id,
                user_name="carol",
                group_name="lab",
                tool="demo",
                site=site.name,
                cpu=asked.cpu,
                memory=asked.memory,
            )
        )
        first.commit()
    finally:
        first.close()
    assert await asyncio.wait_for(dan, 10) == "refused"
