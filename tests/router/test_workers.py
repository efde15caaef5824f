"""Separate router processes: N workers on one port, each following the route stream."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from labgate.router.workers import WorkerConfig, spawn_workers, stop_workers
from labgate.security import SESSION_COOKIE, SessionSigner
from labgate.wire.routes import Route, UserInfo
from labgate.wire.stream import RoutePublisher

from .conftest import ALICE, KEY, ok_handler
from .test_sync import STREAM_TOKEN, PortalServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def get_status(client: httpx.AsyncClient, url: str, cookie: str) -> int:
    try:
        # A fresh connection each time, so the kernel may pick either worker.
        response = await client.get(
            url, headers={"Cookie": f"{SESSION_COOKIE}={cookie}", "Connection": "close"}
        )
    except httpx.HTTPError:
        return 0
    return response.status_code


@pytest.mark.slow
async def test_two_workers_share_a_port_and_follow_the_stream(recording) -> None:  # type: ignore[no-untyped-def]
    upstream = await recording(ok_handler("a"))
    publisher = RoutePublisher(heartbeat=1.0)
    publisher.set_user(UserInfo(ALICE, "alice"))
    publisher.add_route(Route("aaaa", upstream.url, ALICE))
    portal = PortalServer(publisher)
    await portal.start()
    port = free_port()
    config = WorkerConfig(
        host="127.0.0.1",
        port=port,
        portal_url=portal.url,
        stream_token=STREAM_TOKEN,
        signing_key=KEY,
        session_max_age=3600,
        activity_interval=0.2,
    )
    processes = await asyncio.to_thread(spawn_workers, config, 2)
    cookie = SessionSigner(KEY, 3600).issue(ALICE)[0]
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            deadline = time.monotonic() + 60
            while (
                publisher.subscriber_count < 2
                or await get_status(client, "/i/aaaa/", cookie) != 200
            ):
                assert time.monotonic() < deadline, "workers did not come up"
                await asyncio.sleep(0.1)
            publisher.add_route(Route("cccc", upstream.url, ALICE))
            # Every worker learns the new route: many fresh connections all succeed.
            deadline = time.monotonic() + 30
            while True:
                codes = [await get_status(client, "/i/cccc/", cookie) for _ in range(20)]
                if codes == [200] * 20:
                    break
                assert time.monotonic() < deadline, codes
                await asyncio.sleep(0.1)
            # Workers report activity to the portal.
            deadline = time.monotonic() + 30
            while not any(r.get("activity") for r in portal.reports):
                assert time.monotonic() < deadline, "no activity reports"
                await asyncio.sleep(0.1)
            # Portal traffic goes to the portal upstream (the stand-in answers 404).
            assert await get_status(client, "/nothing-here", cookie) == 404
    finally:
        await asyncio.to_thread(stop_workers, processes)
        await portal.stop()
    assert all(p.exitcode is not None for p in processes)
