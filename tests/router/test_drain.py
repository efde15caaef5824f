"""A stopping router answers the requests in flight before it goes (``Router.drain``)."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route as StarletteRoute

from labgate.router.server import Router
from labgate.security import SessionSigner
from labgate.wire.routes import RouteTable

from .conftest import KEY, serve_asgi


def slow_portal() -> Starlette:
    """A stand-in portal whose ``/slow`` answers after a second."""

    async def slow(request: Request) -> Response:
        await asyncio.sleep(1.0)
        return PlainTextResponse("done")

    async def quick(request: Request) -> Response:
        return PlainTextResponse("quick")

    return Starlette(routes=[StarletteRoute("/slow", slow), StarletteRoute("/quick", quick)])


async def test_draining_answers_requests_in_flight_and_takes_no_new_connections() -> None:
    portal = await serve_asgi(slow_portal())
    router = Router(RouteTable(), SessionSigner(KEY, 3600), portal.url)
    await router.listen("127.0.0.1", 0)
    base = f"http://127.0.0.1:{router.port}"
    try:
        async with (
            httpx.AsyncClient(base_url=base, timeout=10) as busy,
            httpx.AsyncClient(base_url=base, timeout=10) as idle,
        ):
            assert (await idle.get("/quick")).text == "quick"  # a keep-alive connection, idle now
            in_flight = asyncio.get_running_loop().create_task(busy.get("/slow"))
            await asyncio.sleep(0.3)
            began = asyncio.get_running_loop().time()
            await router.drain(5.0)
            waited = asyncio.get_running_loop().time() - began
            answer = await in_flight
            assert answer.status_code == 200 and answer.text == "done"
            assert 0.4 < waited < 3.0
            # The router listens no more.
            async with httpx.AsyncClient(base_url=base) as late:
                with pytest.raises(httpx.ConnectError):
                    await late.get("/quick")
    finally:
        await router.close()
        await portal.stop()


async def test_a_drain_gives_up_after_its_timeout() -> None:
    portal = await serve_asgi(slow_portal())
    router = Router(RouteTable(), SessionSigner(KEY, 3600), portal.url)
    await router.listen("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.port}") as client:
            in_flight = asyncio.get_running_loop().create_task(client.get("/slow"))
            await asyncio.sleep(0.3)
            began = asyncio.get_running_loop().time()
            await router.drain(0.2)
            assert asyncio.get_running_loop().time() - began < 0.6
            await router.close()
            with contextlib.suppress(httpx.TransportError):
                await in_flight
    finally:
        await router.close()
        await portal.stop()
