"""Two portals on one PostgreSQL database: events and route changes cross replicas.

Both portals run in this process on the test's database (each with its own
data directory), as two replicas of a split deployment would. A router (the
real one, in process) follows replica B's route stream while changes are
made through replica A. Needs PostgreSQL: LABGATE_TEST_DB_URL (docs/development.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from helpers import ADMIN_PASSWORD, needs_postgres, replica, token_for, wait_for_state
from labgate.config import Settings
from labgate.portal.api import instances as instances_api
from labgate.router.server import Router, start_router
from labgate.router.sync import RouteSync
from labgate.security import router_token
from labgate.wire.routes import RouteTable

pytestmark = [
    pytest.mark.postgres,
    needs_postgres,
]


@pytest.fixture
def settings_b(settings: Settings, tmp_path: Path) -> Settings:
    """Replica B: the same database and keys as the ``settings`` of replica A, its own data."""
    return settings.model_copy(update={"data_dir": tmp_path / "var-b"})


@pytest.fixture
async def pair(settings: Settings, settings_b: Settings) -> AsyncIterator[tuple[Any, Any]]:
    """Replicas A and B on one database."""
    async with replica(settings) as a, replica(settings_b) as b:
        yield a, b


async def wait_until(check: Callable[[], Any], timeout: float = 10.0) -> float:
    """Poll ``check`` until true; the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true after {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def launch_running(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    r = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=headers)
    assert r.status_code == 202, r.text
    instance_id = str(r.json()["id"])
    body = await wait_for_state(client, headers, instance_id, {"running", "failed"})
    assert body["state"] == "running", body
    return instance_id


@contextlib.asynccontextmanager
async def router_following(app: Any, settings: Settings) -> AsyncIterator[tuple[Router, RouteSync]]:
    """The real router, fed by a :class:`RouteSync` that follows ``app``'s route stream."""
    table = RouteTable()
    token = router_token(settings.signing_key())
    sync = RouteSync(table, app.state.test_url, token, read_timeout=5.0, max_backoff=0.3)
    task = asyncio.create_task(sync.run())
    router = await start_router(table, "127.0.0.1", 0, app.state.test_url, settings)
    try:
        await asyncio.wait_for(sync.synced.wait(), 10)
        yield router, sync
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await router.close()


async def test_event_written_on_one_replica_wakes_a_reader_on_another(
    pair: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Readers poll the database every 30 s here: only a wake-up can be prompt.
    monkeypatch.setattr(instances_api, "SSE_WAKE_TIMEOUT", 30.0)
    a, b = pair
    async with (
        httpx.AsyncClient(base_url=a.state.test_url, timeout=30) as client_a,
        httpx.AsyncClient(base_url=b.state.test_url, timeout=30) as client_b,
    ):
        admin = await token_for(client_a, "admin", ADMIN_PASSWORD, ["admin", "account"])
        instance_id = await launch_running(client_a, admin)
        path = f"/api/v1/instances/{instance_id}/events"
        async with client_b.stream("GET", path, headers=admin) as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            async for line in lines:  # the stored events, up to the running one
                if line.startswith("data: ") and json.loads(line[6:])["state"] == "running":
                    break
            stopped_at = time.monotonic()
            r = await client_a.delete(f"/api/v1/instances/{instance_id}", headers=admin)
            assert r.status_code == 202, r.text
            async with asyncio.timeout(10):
                async for line in lines:
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        if event["kind"] == "state" and event["state"] == "stopping":
                            break
            delay = time.monotonic() - stopped_at
    assert delay < 1.0, f"replica B's reader saw the stop after {delay:.2f} s"


async def test_changes_through_one_replica_reach_a_router_following_another(
    pair: tuple[Any, Any], settings_b: Settings
) -> None:
    a, b = pair
    async with (
        httpx.AsyncClient(base_url=a.state.test_url, timeout=30) as client_a,
        router_following(b, settings_b) as (router, _),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.port}", timeout=30) as via_router,
    ):
        table = router.table
        admin = await token_for(client_a, "admin", ADMIN_PASSWORD, ["admin", "account"])
        r = await client_a.post("/api/v1/users", json={"name": "alice"}, headers=admin)
        assert r.status_code == 201, r.text
        await wait_until(lambda: any(u.name == "alice" for u in table.users.values()))
        (alice_id,) = [u.id for u in table.users.values() if u.name == "alice"]
        scopes = ["instances:read", "instances:write", "instances:access", "account"]
        alice = await token_for(client_a, "alice", r.json()["password"], scopes)
        instance_id = await launch_running(client_a, alice)
        await wait_until(lambda: table.routes.get(instance_id, None) is not None)
        await wait_until(lambda: table.routes[instance_id].state == "running")
        page = f"/i/{instance_id}/"
        assert (await via_router.get(page, headers=alice)).status_code == 200

        # A token revoked on A stops opening the instance through B's router.
        tokens = await client_a.get("/api/v1/tokens", headers=alice)
        (token,) = tokens.json()
        r = await client_a.delete(f"/api/v1/tokens/{token['id']}", headers=alice)
        assert r.status_code == 204
        await wait_until(lambda: len(table.tokens) == 1, timeout=2.0)  # the admin's is left
        assert (await via_router.get(page, headers=alice)).status_code != 200

        # An instance stopped on A is no longer routed by B's router.
        r = await client_a.delete(f"/api/v1/instances/{instance_id}", headers=admin)
        assert r.status_code == 202
        await wait_until(lambda: instance_id not in table.routes, timeout=2.0)
        assert (await via_router.get(page, headers=admin)).status_code != 200

        # A user disabled on A is known disabled to B's router.
        r = await client_a.patch("/api/v1/users/alice", json={"disabled": True}, headers=admin)
        assert r.status_code == 200, r.text
        await wait_until(lambda: table.users[alice_id].disabled, timeout=2.0)


async def test_router_that_reconnects_resyncs_what_it_missed(
    settings: Settings, settings_b: Settings
) -> None:
    async with replica(settings) as a, httpx.AsyncClient(base_url=a.state.test_url) as client_a:
        admin = await token_for(client_a, "admin", ADMIN_PASSWORD, ["admin", "account"])
        r = await client_a.post("/api/v1/users", json={"name": "bob"}, headers=admin)
        bob = await token_for(client_a, "bob", r.json()["password"], ["account"])
        first_b = contextlib.AsyncExitStack()
        b = await first_b.enter_async_context(replica(settings_b))
        port = int(b.state.test_url.rsplit(":", 1)[1])
        async with router_following(b, settings_b) as (router, sync):
            table = router.table
            assert len(table.tokens) == 2
            # Replica B goes away; meanwhile bob's token is revoked through A.
            await first_b.aclose()
            await wait_until(lambda: not sync.connected)
            tokens = (await client_a.get("/api/v1/tokens", headers=bob)).json()
            r = await client_a.delete(f"/api/v1/tokens/{tokens[0]['id']}", headers=bob)
            assert r.status_code == 204
            await asyncio.sleep(0.5)
            assert len(table.tokens) == 2  # nobody told this router
            snapshots = sync.snapshots
            async with replica(settings_b, port):
                # B is back at its address: the router reconnects and resyncs.
                await wait_until(lambda: sync.snapshots > snapshots, timeout=10.0)
                assert len(table.tokens) == 1


async def test_replica_that_lost_its_listening_connection_reloads(
    pair: tuple[Any, Any], settings_b: Settings
) -> None:
    a, b = pair
    listener = b.state.replicas.listener
    listener.min_backoff = 2.0  # a gap long enough for a change to fall into
    async with (
        httpx.AsyncClient(base_url=a.state.test_url, timeout=30) as client_a,
        router_following(b, settings_b) as (router, _),
    ):
        admin = await token_for(client_a, "admin", ADMIN_PASSWORD, ["admin", "account"])
        await wait_until(lambda: len(router.table.tokens) == 1)
        await b.state.portal.run_db(
            lambda s: s.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'labgate-listen' AND datname = current_database()"
                )
            )
        )
        await wait_until(lambda: not listener.listening.is_set())
        # Made while B is not listening: its announcement never reaches B.
        tokens = (await client_a.get("/api/v1/tokens", headers=admin)).json()
        await client_a.delete(f"/api/v1/tokens/{tokens[0]['id']}", headers=admin)
        assert listener.connects == 1
        await wait_until(lambda: listener.connects == 2, timeout=10.0)
        await wait_until(lambda: len(router.table.tokens) == 0, timeout=2.0)


async def test_sharing_through_one_replica_reaches_a_router_following_another(
    pair: tuple[Any, Any], settings_b: Settings
) -> None:
    a, b = pair
    async with (
        httpx.AsyncClient(base_url=a.state.test_url, timeout=30) as client_a,
        router_following(b, settings_b) as (router, _),
    ):
        table = router.table
        admin = await token_for(client_a, "admin", ADMIN_PASSWORD, ["admin", "account"])
        r = await client_a.post("/api/v1/users", json={"name": "bob"}, headers=admin)
        assert r.status_code == 201, r.text
        await wait_until(lambda: any(u.name == "bob" for u in table.users.values()))
        (bob_id,) = [u.id for u in table.users.values() if u.name == "bob"]
        instance_id = await launch_running(client_a, admin)
        await wait_until(lambda: instance_id in table.routes)
        assert not table.routes[instance_id].allows(bob_id)

        # Shared with a group on A, then bob joins it on A: B's router lets bob in.
        r = await client_a.post("/api/v1/groups", json={"name": "team"}, headers=admin)
        assert r.status_code == 201, r.text
        shares = f"/api/v1/instances/{instance_id}/shares"
        r = await client_a.post(shares, json={"group": "team"}, headers=admin)
        assert r.status_code == 201, r.text
        r = await client_a.put("/api/v1/groups/team/members/bob", headers=admin)
        assert r.status_code == 201, r.text
        await wait_until(lambda: table.routes[instance_id].allows(bob_id), timeout=2.0)

        # Bob leaves the group on A: B's router no longer lets him in.
        r = await client_a.delete("/api/v1/groups/team/members/bob", headers=admin)
        assert r.status_code == 204
        await wait_until(lambda: not table.routes[instance_id].allows(bob_id), timeout=2.0)

        # Shared with bob himself, then bob is deleted on A: B's router drops him at once.
        r = await client_a.post(shares, json={"user": "bob", "access": "use"}, headers=admin)
        assert r.status_code == 201, r.text
        await wait_until(lambda: table.routes[instance_id].allows(bob_id), timeout=2.0)
        r = await client_a.delete("/api/v1/users/bob", headers=admin)
        assert r.status_code == 204
        await wait_until(lambda: bob_id not in table.users, timeout=2.0)
        await wait_until(lambda: not table.routes[instance_id].allows(bob_id), timeout=2.0)


async def test_two_portals_admitting_into_one_group_never_go_over_its_limit(pair) -> None:
    """Launches of a group's members through both portals at once: at most its limit runs."""
    a, b = pair
    async with (
        httpx.AsyncClient(base_url=a.state.test_url, timeout=60) as on_a,
        httpx.AsyncClient(base_url=b.state.test_url, timeout=60) as on_b,
    ):
        admin = await token_for(on_a, "admin", ADMIN_PASSWORD, ["admin", "account"])
        made = await on_a.post(
            "/api/v1/groups", json={"name": "lab", "limits": {"instances": 3}}, headers=admin
        )
        assert made.status_code == 201, made.text
        members = [f"m{n}" for n in range(8)]
        for name in members:
            created = await on_a.post(
                "/api/v1/users", json={"name": name, "password": "member-password-1"}, headers=admin
            )
            assert created.status_code == 201, created.text
            await on_a.put(f"/api/v1/groups/lab/members/{name}", headers=admin)
        tokens = [await token_for(on_a, name, "member-password-1") for name in members]

        async def launch(n: int) -> int:
            client = on_a if n % 2 else on_b
            answer = await client.post(
                "/api/v1/instances", json={"tool": "demo", "group": "lab"}, headers=tokens[n]
            )
            return answer.status_code

        codes = await asyncio.gather(*(launch(n) for n in range(len(members))))
    assert sorted(codes) == [202] * 3 + [429] * 5, codes
