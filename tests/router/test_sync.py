"""The route stream: publisher, wire format, and a router following it across restarts."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as StarletteRoute

from labgate.router.activity import Activity
from labgate.router.sync import ActivityReporter, RouteSync
from labgate.wire.routes import Route, RouteTable, TokenInfo, UserInfo
from labgate.wire.stream import (
    ACTIVITY_PATH,
    STREAM_MEDIA_TYPE,
    STREAM_PATH,
    RoutePublisher,
    apply_message,
)

STREAM_TOKEN = "router-stream-secret"


def portal_with_stream(publisher: RoutePublisher, reports: list[dict[str, object]]) -> Starlette:
    """What the lead mounts in the portal, minimally."""

    def authorized(request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {STREAM_TOKEN}"

    async def stream(request: Request) -> Response:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized", "detail": "no"}, status_code=401)
        return StreamingResponse(publisher.subscribe(), media_type=STREAM_MEDIA_TYPE)

    async def activity(request: Request) -> Response:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized", "detail": "no"}, status_code=401)
        reports.append(await request.json())
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            StarletteRoute(STREAM_PATH, stream),
            StarletteRoute(ACTIVITY_PATH, activity, methods=["POST"]),
        ]
    )


class PortalServer:
    """The stand-in portal on one port that can be stopped and started again."""

    def __init__(self, publisher: RoutePublisher) -> None:
        self.publisher = publisher
        self.reports: list[dict[str, object]] = []
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.server: uvicorn.Server | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        config = uvicorn.Config(
            portal_with_stream(self.publisher, self.reports),
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=0.5,
        )
        self.server = uvicorn.Server(config)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        assert self.server is not None and self.task is not None
        # The portal process would die with its connections; here they share a loop.
        self.publisher.disconnect_all()
        self.server.should_exit = True
        self.server.force_exit = True
        await asyncio.wait_for(self.task, 10)


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def sample_publisher() -> RoutePublisher:
    publisher = RoutePublisher(heartbeat=0.2)
    publisher.set_user(UserInfo(1, "alice"))
    publisher.set_token("h" * 64, TokenInfo(1, frozenset({"instances:access"})))
    publisher.add_route(Route("aaaa", "http://127.0.0.1:9", 1, upstream_token="t"))
    return publisher


async def test_subscribe_starts_with_snapshot_then_deltas() -> None:
    publisher = sample_publisher()
    stream = publisher.subscribe()
    first = json.loads(await anext(stream))
    assert first["op"] == "snapshot"
    assert [r["instance_id"] for r in first["state"]["routes"]] == ["aaaa"]
    publisher.remove_route("aaaa")
    publisher.revoke_session("s1", 123.0)
    second = json.loads(await anext(stream))
    third = json.loads(await anext(stream))
    assert second == {"op": "remove_route", "instance_id": "aaaa", "seq": second["seq"]}
    assert third["op"] == "revoke_session"
    assert third["seq"] == second["seq"] + 1
    ping = json.loads(await anext(stream))
    assert ping["op"] == "ping"
    await stream.aclose()
    assert publisher.subscriber_count == 0


async def test_apply_every_op_matches_snapshot() -> None:
    publisher = RoutePublisher()
    mirror = RouteTable()
    stream = publisher.subscribe()
    apply_message(mirror, json.loads(await anext(stream)))
    publisher.set_user(UserInfo(1, "alice", is_admin=True))
    publisher.set_user(UserInfo(2, "bob"))
    publisher.remove_user(2)
    publisher.set_token("x" * 64, TokenInfo(1, frozenset({"admin"}), 99.0))
    publisher.set_token("y" * 64, TokenInfo(1, frozenset()))
    publisher.remove_token("y" * 64)
    publisher.add_route(Route("r1", "unix:/tmp/r1.sock", 1, frozenset({2}), "starting", False, "k"))
    publisher.add_route(Route("r2", "http://127.0.0.1:1", 1))
    publisher.remove_route("r2")
    publisher.revoke_session("sess", 1e12)
    for _ in range(10):
        apply_message(mirror, json.loads(await anext(stream)))
    assert mirror.snapshot() == publisher.snapshot()
    publisher.resync({"version": 1, "routes": [], "users": [], "tokens": []})
    apply_message(mirror, json.loads(await anext(stream)))
    assert mirror.snapshot() == publisher.snapshot()
    assert mirror.routes == {}
    await stream.aclose()


async def test_slow_subscriber_is_dropped_not_buffered_forever() -> None:
    publisher = RoutePublisher(queue_limit=5)
    stream = publisher.subscribe()
    await anext(stream)
    for n in range(20):
        publisher.set_user(UserInfo(n, f"u{n}"))
    lines = [line async for line in stream]
    assert len(lines) == 5  # then the stream ended: the router reconnects and resyncs


async def test_router_follows_stream_across_portal_restart() -> None:
    publisher = sample_publisher()
    portal = PortalServer(publisher)
    await portal.start()
    table = RouteTable()
    applied: list[int] = []
    sync = RouteSync(
        table,
        portal.url,
        STREAM_TOKEN,
        read_timeout=2.0,
        max_backoff=0.3,
        on_snapshot=lambda: applied.append(len(table.routes)),
    )
    task = asyncio.get_running_loop().create_task(sync.run())
    try:
        await asyncio.wait_for(sync.synced.wait(), 10)
        assert set(table.routes) == {"aaaa"}
        publisher.add_route(Route("bbbb", "http://127.0.0.1:10", 1))
        await wait_for(lambda: "bbbb" in table.routes)

        await portal.stop()
        # Changes while the router is cut off...
        publisher.remove_route("aaaa")
        publisher.add_route(Route("cccc", "http://127.0.0.1:11", 1))
        publisher.set_user(UserInfo(1, "alice", disabled=True))
        snapshots = sync.snapshots
        await portal.start()
        # ...arrive with the full resync after the reconnect.
        await wait_for(lambda: sync.snapshots > snapshots)
        await wait_for(lambda: table.snapshot() == publisher.snapshot())
        assert set(table.routes) == {"bbbb", "cccc"}
        assert table.users[1].disabled
        assert applied == [1, 2]  # called after each snapshot was applied
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await portal.stop()


async def test_a_request_reaching_the_restarted_portal_resyncs_the_router_at_once() -> None:
    """The chaos run's find: a router waited out its backoff while its portal answered again.

    Meanwhile its table was stale: instances launched after the portal's restart
    were 404 at the router. A connection to the portal (a user's request) ends the wait.
    """
    publisher = sample_publisher()
    portal = PortalServer(publisher)
    await portal.start()
    table = RouteTable()
    sync = RouteSync(table, portal.url, STREAM_TOKEN, min_backoff=60, max_backoff=60)
    task = asyncio.get_running_loop().create_task(sync.run())
    try:
        await asyncio.wait_for(sync.synced.wait(), 10)
        await portal.stop()
        await wait_for(lambda: not sync.connected)
        publisher.add_route(Route("dddd", "http://127.0.0.1:12", 1))
        await portal.start()
        await asyncio.sleep(0.5)
        assert "dddd" not in table.routes  # still waiting out its 30 s or more
        sync.portal_answered()
        await wait_for(lambda: "dddd" in table.routes)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await portal.stop()


async def test_wrong_token_keeps_retrying() -> None:
    publisher = sample_publisher()
    portal = PortalServer(publisher)
    await portal.start()
    table = RouteTable()
    sync = RouteSync(table, portal.url, "wrong", max_backoff=0.1)
    task = asyncio.get_running_loop().create_task(sync.run())
    try:
        await wait_for(lambda: "401" in sync.last_error)
        assert not sync.synced.is_set()
        assert table.routes == {}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await portal.stop()


async def test_activity_reporter_posts() -> None:
    publisher = sample_publisher()
    portal = PortalServer(publisher)
    await portal.start()
    reporter = ActivityReporter(
        lambda: {"aaaa": Activity(1.0, 2, 3, 4, {7: 1.0})}, portal.url, STREAM_TOKEN, interval=0.05
    )
    task = asyncio.get_running_loop().create_task(reporter.run())
    try:
        await wait_for(lambda: bool(portal.reports))
        report = portal.reports[0]
        assert report["activity"] == {
            "aaaa": {
                "last_request": 1.0,
                "bytes_in": 2,
                "bytes_out": 3,
                "open_websockets": 4,
                "users": {"7": 1.0},
            }
        }
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await portal.stop()
