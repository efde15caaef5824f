"""A router in front of several portal replicas: a replica that is down is stood in for.

``labgate router --portal A --portal B``: portal traffic, the route stream and
the activity reports use one replica and move to the next when it refuses
connections (restarting, dead), so a rolling restart of the portals loses no
request and no route update.
"""

from __future__ import annotations

import asyncio

import httpx

from labgate.router.activity import Activity
from labgate.router.server import Router
from labgate.router.sync import ActivityReporter, RouteSync
from labgate.security import SessionSigner
from labgate.wire.routes import Route, RouteTable

from .conftest import KEY, nothing_listens, portal_app, serve_asgi
from .test_sync import STREAM_TOKEN, PortalServer, sample_publisher, wait_for


async def test_portal_traffic_moves_to_the_next_replica_when_one_refuses() -> None:
    down = nothing_listens()
    portal = await serve_asgi(portal_app())
    router = Router(RouteTable(), SessionSigner(KEY, 3600), down, other_portals=(portal.url,))
    await router.listen("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.port}") as client:
            # A body too: nothing of it was sent to the replica that refused.
            for method in ("GET", "POST"):
                answer = await client.request(method, "/api/v1/anything", content=b"{}")
                assert answer.status_code == 200, answer.text
                assert answer.json()["path"] == "/api/v1/anything"
        assert str(router.ctx.portal) == str(router.ctx.portals[1])
    finally:
        await router.close()
        await portal.stop()


async def test_a_router_with_one_portal_answers_502_when_it_is_down() -> None:
    router = Router(RouteTable(), SessionSigner(KEY, 3600), nothing_listens())
    await router.listen("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.port}") as client:
            answer = await client.get("/api/v1/anything")
        assert answer.status_code == 502
        assert "The portal cannot be reached" in answer.text
    finally:
        await router.close()


async def test_the_route_stream_and_activity_move_to_a_replica_that_answers() -> None:
    publisher = sample_publisher()
    portal = PortalServer(publisher)
    await portal.start()
    down = nothing_listens()
    table = RouteTable()
    sync = RouteSync(table, down, STREAM_TOKEN, max_backoff=0.2, other_portals=[portal.url])
    reporter = ActivityReporter(
        lambda: {"aaaa": Activity(1.0, 2, 3, 0, {})},
        down,
        STREAM_TOKEN,
        interval=0.05,
        other_portals=[portal.url],
    )
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(sync.run()), loop.create_task(reporter.run())]
    try:
        await asyncio.wait_for(sync.synced.wait(), 10)
        assert set(table.routes) == {"aaaa"}
        assert sync.portal_url == portal.url
        publisher.add_route(Route("bbbb", "http://127.0.0.1:10", 1))
        await wait_for(lambda: "bbbb" in table.routes)
        await wait_for(lambda: bool(portal.reports))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await portal.stop()
