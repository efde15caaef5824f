"""The start queue: a site starts at most its start capacity at once; the rest wait queued."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from helpers import (
    ADMIN_PASSWORD,
    PASSWORD,
    serving,
    stop_everything,
    token_for,
    wait_for_state,
)
from labgate.backends.process import ProcessBackend
from labgate.backends.procfs import MARKER_VAR
from labgate.config import SiteCapacity, SiteConfig
from labgate.db.models import Instance, InstanceEvent, Site
from labgate.scheduler import startqueue
from labgate.scheduler.startqueue import fits, slots, start_capacity
from servers import processes_with_env
from tools_fixtures import costly_tool


@pytest.fixture
def settings(settings):
    (settings.tools_dir / "queued.toml").write_text(costly_tool("queued", 1))
    # One core for starts: one start of "queued" at a time, the rest wait.
    settings.sites = [SiteConfig(name="local", capacity=SiteCapacity(starts=1))]
    settings.max_instances_per_user = 3
    return settings


async def launch(client: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, Any]:
    r = await client.post("/api/v1/instances", json={"tool": "queued"}, headers=headers)
    assert r.status_code == 202, r.text
    return dict(r.json())


async def leaving_order(app: Any, ids: list[str]) -> list[str]:
    """The instances in the order they left the queue (or started without queueing)."""

    def query(session: Any) -> list[str]:
        rows = session.scalars(
            select(InstanceEvent)
            .where(InstanceEvent.instance_id.in_(ids), InstanceEvent.state == "pending")
            .order_by(InstanceEvent.id)
        ).all()
        return [row.instance_id for row in rows]

    return list(await app.state.portal.run_db(query))


async def starting_at_once(app: Any, ids: list[str]) -> int:
    """The most instances that were pending or starting at the same moment."""

    def query(session: Any) -> list[tuple[str, str]]:
        rows = session.scalars(
            select(InstanceEvent)
            .where(InstanceEvent.instance_id.in_(ids), InstanceEvent.kind == "state")
            .order_by(InstanceEvent.id)
        ).all()
        return [(row.instance_id, row.state.value) for row in rows]

    busy: set[str] = set()
    most = 0
    for instance_id, state in await app.state.portal.run_db(query):
        if state in ("pending", "starting"):
            busy.add(instance_id)
        else:
            busy.discard(instance_id)
        most = max(most, len(busy))
    return most


async def transitions(app: Any, instance_id: str) -> list[str]:
    """The states an instance went through, in order."""

    def query(session: Any) -> list[str]:
        rows = session.scalars(
            select(InstanceEvent.state)
            .where(InstanceEvent.instance_id == instance_id, InstanceEvent.kind == "state")
            .order_by(InstanceEvent.id)
        )
        return [state.value for state in rows]

    return list(await app.state.portal.run_db(query))


async def leftover_processes(instance_id: str, within: float = 5.0) -> list[int]:
    """The processes of an instance still there after ``within`` seconds (none: [])."""
    deadline = time.monotonic() + within
    while (found := processes_with_env(MARKER_VAR, instance_id)) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return found


async def test_a_burst_waits_queued_with_places_and_all_start_one_at_a_time(app, client, make_user):
    users = [await make_user(name) for name in ("ann", "ben", "cat", "dov")]
    launched = await asyncio.gather(*(launch(client, user) for user in users))
    states = sorted(body["state"] for body in launched)
    assert states == ["pending", "queued", "queued", "queued"], launched
    ids = [body["id"] for body in launched]
    await asyncio.sleep(0.3)
    places = []
    for body, user in zip(launched, users, strict=True):
        shown = (await client.get(f"/api/v1/instances/{body['id']}", headers=user)).json()
        if shown["state"] == "queued":
            assert shown["queue"]["site"] == "local"
            assert shown["queue"]["estimate"] > 0
            places.append(shown["queue"]["position"])
    assert sorted(places) == list(range(1, len(places) + 1))
    for body, user in zip(launched, users, strict=True):
        done = await wait_for_state(client, user, body["id"], {"running", "failed"})
        assert done["state"] == "running", done
    assert await starting_at_once(app, ids) == 1
    events = await app.state.portal.run_db(
        lambda s: list(
            s.scalars(select(InstanceEvent).where(InstanceEvent.instance_id.in_(ids))).all()
        )
    )
    notes = [e for e in events if e.kind == "progress" and e.state.value == "queued"]
    assert notes and all("start queue" in e.message for e in notes)
    assert all({"position", "estimate", "site"} <= set(e.data["queue"]) for e in notes)
    left = [e.message for e in events if e.state.value == "pending" and "left" in e.message]
    assert len(left) == 3, left


async def test_one_user_launching_many_does_not_push_others_back(app, client, make_user):
    ann, ben, cat = [await make_user(name) for name in ("ann", "ben", "cat")]
    first = [await launch(client, ann) for _ in range(3)]
    others = [await launch(client, ben), await launch(client, cat)]
    ids = [body["id"] for body in first + others]
    for body in first + others:
        headers = ann if body in first else (ben if body is others[0] else cat)
        await wait_for_state(client, headers, body["id"], {"running"})
    order = await leaving_order(app, ids)
    # Round robin: every user's first waiting launch before anyone's second.
    assert order == [first[0]["id"], first[1]["id"], others[0]["id"], others[1]["id"],
                     first[2]["id"]]  # fmt: skip


async def test_a_stop_leaves_the_queue_at_once_and_others_move_up(app, client, make_user):
    ann, ben, cat = [await make_user(name) for name in ("ann", "ben", "cat")]
    a, b, c = [await launch(client, user) for user in (ann, ben, cat)]
    assert [a["state"], b["state"], c["state"]] == ["pending", "queued", "queued"]
    r = await client.delete(f"/api/v1/instances/{b['id']}", headers=ben)
    assert r.status_code == 202
    assert r.json()["state"] == "stopped"  # nothing ever reached the site
    stopped = (await client.get(f"/api/v1/instances/{b['id']}", headers=ben)).json()
    assert stopped["state"] == "stopped" and stopped["started_at"] is None
    await asyncio.sleep(0.3)
    moved = (await client.get(f"/api/v1/instances/{c['id']}", headers=cat)).json()
    if moved["state"] == "queued":
        assert moved["queue"]["position"] == 1
    assert (await wait_for_state(client, cat, c["id"], {"running"}))["state"] == "running"
    backend = await app.state.portal.run_db(lambda s: s.get(Instance, b["id"]).backend_state)
    assert backend == {}


async def test_queued_launches_count_against_quotas(client, make_user):
    ann = await make_user("ann")
    bodies = [await launch(client, ann) for _ in range(3)]
    assert [b["state"] for b in bodies].count("queued") >= 1
    r = await client.post("/api/v1/instances", json={"tool": "queued"}, headers=ann)
    assert r.status_code == 429, r.text
    # Stopped here, not by the app's teardown: a queued one could start under it.
    for body in bodies:
        r = await client.delete(f"/api/v1/instances/{body['id']}", headers=ann)
        # 409: it had ended already (its start failed); anything else is a stop that was lost.
        assert r.status_code in (202, 409), r.text
    for body in bodies:
        await wait_for_state(client, ann, body["id"], {"stopped", "failed", "lost"})
    # Named here, with its instance, rather than by the session's leftover check.
    for body in bodies:
        assert await leftover_processes(body["id"]) == [], f"{body['id']} still runs"


async def test_a_launch_the_stop_of_a_dequeued_instance_overtook_starts_nothing(
    app, client, make_user, monkeypatch
):
    """The portal sends a launch and a stop from separate tasks. The launch of an
    instance that just left the queue is held here on its way to the site until the
    instance's stop has ended it there (nothing to stop yet): let through late, it
    must start nothing (a tool that ran unstopped, found by the PostgreSQL pass)."""
    ann = await make_user("ann")
    a, b = await launch(client, ann), await launch(client, ann)
    assert [a["state"], b["state"]] == ["pending", "queued"]
    link = app.state.portal.links["local"]
    send = link.launch
    held, release = asyncio.Event(), asyncio.Event()

    async def late(spec: Any) -> None:
        if spec.instance_id == b["id"]:
            held.set()
            await release.wait()
        await send(spec)

    monkeypatch.setattr(link, "launch", late)
    try:
        r = await client.delete(f"/api/v1/instances/{a['id']}", headers=ann)
        assert r.status_code == 202, r.text
        await asyncio.wait_for(held.wait(), 30)  # b left the queue; its launch is on its way
        r = await client.delete(f"/api/v1/instances/{b['id']}", headers=ann)
        assert r.status_code == 202 and r.json()["state"] == "stopping", r.text
        await wait_for_state(client, ann, b["id"], {"stopped"})
    finally:
        release.set()
    # Whatever the late launch began runs its course (a start, a health check) first.
    await asyncio.sleep(0.2)
    deadline = time.monotonic() + 30
    while b["id"] in link.agent.starting_ids() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert await leftover_processes(b["id"], within=0) == []
    shown = (await client.get(f"/api/v1/instances/{b['id']}", headers=ann)).json()
    assert shown["state"] == "stopped", shown
    assert await transitions(app, b["id"]) == ["queued", "pending", "stopping", "stopped"]
    await wait_for_state(client, ann, a["id"], {"stopped"})
    assert await leftover_processes(a["id"]) == []


async def test_a_stop_while_the_backend_starts_the_tool_stops_what_the_start_made(
    app, client, make_user, monkeypatch
):
    """The stop reaches the site while the backend is inside its start (no state to stop
    yet): the stop waits for the start and stops what it made."""
    ann = await make_user("ann")
    inside, go = threading.Event(), threading.Event()
    start = ProcessBackend._launch

    def held(self: ProcessBackend, spec: Any) -> Any:
        inside.set()
        go.wait(30)
        return start(self, spec)

    monkeypatch.setattr(ProcessBackend, "_launch", held)
    try:
        a = await launch(client, ann)
        assert await asyncio.to_thread(inside.wait, 30)  # in backend.start, nothing spawned
        r = await client.delete(f"/api/v1/instances/{a['id']}", headers=ann)
        assert r.status_code == 202 and r.json()["state"] == "stopping", r.text
        await asyncio.sleep(0.3)  # the site has the stop and waits for the start under way
        shown = (await client.get(f"/api/v1/instances/{a['id']}", headers=ann)).json()
        assert shown["state"] == "stopping", shown
    finally:
        go.set()
    done = await wait_for_state(client, ann, a["id"], {"stopped", "failed", "lost"})
    assert done["state"] == "stopped", done
    assert await leftover_processes(a["id"], within=0) == []


async def test_a_stop_committed_as_its_instance_leaves_the_queue_starts_nothing(
    app, client, make_user, monkeypatch
):
    """The owner's stop commits between the dispatch's read (queued) and its write
    (pending): the dispatch runs again on what is there now and starts nothing of it."""
    ann = await make_user("ann")
    a, b = await launch(client, ann), await launch(client, ann)
    assert [a["state"], b["state"]] == ["pending", "queued"]
    manager = app.state.portal.instances
    leave = startqueue._leave_queue
    raced: list[str] = []

    def stopped_meanwhile(session: Any, instance: Instance, now: Any) -> None:
        if instance.id == b["id"] and not raced:
            raced.append(instance.id)
            manager.db.transact(
                lambda other: manager._begin_stop(other, b["id"], "stopped", "stop requested")
            )
        leave(session, instance, now)

    monkeypatch.setattr(startqueue, "_leave_queue", stopped_meanwhile)
    r = await client.delete(f"/api/v1/instances/{a['id']}", headers=ann)
    assert r.status_code == 202, r.text  # room frees: the queue dispatches b
    await wait_for_state(client, ann, a["id"], {"stopped"})
    deadline = time.monotonic() + 10
    while not raced and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert raced == [b["id"]]
    await asyncio.sleep(0.5)  # a start sent anyway would be under way by now
    shown = (await client.get(f"/api/v1/instances/{b['id']}", headers=ann)).json()
    assert shown["state"] == "stopped" and shown["started_at"] is None, shown
    assert await transitions(app, b["id"]) == ["queued", "stopping", "stopped"]
    assert b["id"] not in app.state.portal.links["local"].agent.starting_ids()
    assert await leftover_processes(b["id"], within=0) == []


async def test_queued_launches_survive_a_portal_restart_in_order(settings):
    async with (
        serving(settings) as first,
        httpx.AsyncClient(base_url=first.state.test_url, timeout=30) as client,
    ):
        admin = await token_for(client, "admin", ADMIN_PASSWORD, ["admin", "account"])
        for name in ("ann", "ben", "cat"):
            created = await client.post(
                "/api/v1/users", json={"name": name, "password": PASSWORD}, headers=admin
            )
            assert created.status_code == 201
        users = [await token_for(client, name, PASSWORD) for name in ("ann", "ben", "cat")]
        bodies = [await launch(client, user) for user in users]
        assert [b["state"] for b in bodies] == ["pending", "queued", "queued"]
        await wait_for_state(client, users[0], bodies[0]["id"], {"running"})
    # The portal is down; the queue is in the database. A new portal starts it, in order.
    async with serving(settings) as second:
        try:
            async with httpx.AsyncClient(base_url=second.state.test_url, timeout=30) as client:
                for body, user in zip(bodies, users, strict=True):
                    done = await wait_for_state(client, user, body["id"], {"running", "failed"})
                    assert done["state"] == "running", done
            ids = [body["id"] for body in bodies]
            assert await leaving_order(second, ids) == ids
        finally:
            await stop_everything(second)


def test_start_capacity_defaults_to_the_cores_and_a_self_queueing_backend_has_none():
    local = Site(name="here", backend="process", options={}, kind="local")
    assert start_capacity(local) == float(os.cpu_count() or 1)
    local.options = {"capacity": {"starts": 0}}
    assert start_capacity(local) is None  # 0: no start queue
    remote = Site(name="far", backend="process", options={}, kind="network")
    remote.agent_info = {"cores": 16}
    assert start_capacity(remote) == 16.0  # what its agent reported
    slurm = Site(name="hpc", backend="slurm", options={}, kind="local")
    assert start_capacity(slurm) is None  # Slurm queues jobs itself
    slurm.options = {"capacity": {"starts": 4}}
    assert start_capacity(slurm) == 4.0


async def test_a_site_starts_as_many_as_its_capacity_holds_rounded_to_the_nearest(settings):
    # Two cores for starts, a tool whose start costs 0.8: three at once (2 / 0.8 = 2.5), not two.
    (settings.tools_dir / "partial.toml").write_text(costly_tool("partial", 1, cost=0.8))
    settings.sites = [SiteConfig(name="local", capacity=SiteCapacity(starts=2))]
    async with (
        serving(settings) as app,
        httpx.AsyncClient(base_url=app.state.test_url, timeout=30) as client,
    ):
        try:
            admin = await token_for(client, "admin", ADMIN_PASSWORD, ["admin", "account"])
            users = []
            for name in ("ann", "ben", "cat", "dov"):
                created = await client.post(
                    "/api/v1/users", json={"name": name, "password": PASSWORD}, headers=admin
                )
                assert created.status_code == 201
                users.append(await token_for(client, name, PASSWORD))
            bodies = []
            for user in users:
                r = await client.post("/api/v1/instances", json={"tool": "partial"}, headers=user)
                assert r.status_code == 202, r.text
                bodies.append(r.json())
            assert [b["state"] for b in bodies] == ["pending", "pending", "pending", "queued"]
            for body, user in zip(bodies, users, strict=True):
                done = await wait_for_state(client, user, body["id"], {"running", "failed"})
                assert done["state"] == "running", done
            assert await starting_at_once(app, [b["id"] for b in bodies]) == 3
        finally:
            await stop_everything(app)


def test_slots_and_fits_agree_on_how_many_starts_run_at_once():
    for capacity in (0.5, 1.0, 2.0, 3.0, 7.5, 16.0):
        for cost in (0.1, 0.25, 0.6, 0.8, 1.0, 1.5, 2.0, 5.0):
            used, busy = 0.0, 0
            while fits(capacity, used, busy, cost):
                used, busy = used + cost, busy + 1
            assert busy == slots(capacity, cost), (capacity, cost)
    assert slots(2.0, 0.65) == 3  # the built-in JupyterLab on a 2-core site
    assert slots(2.0, 1.0) == 2
    assert slots(2.0, 1.5) == 1
    assert fits(None, 99.0, 99, 1.0)  # no capacity: no queue
