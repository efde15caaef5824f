"""WebSockets through the router: spliced both ways after the handshake."""

from __future__ import annotations

import asyncio
import os

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from labgate.security import SESSION_COOKIE

from .conftest import ALICE, ALICE_TOKEN, Gateway


def ws_url(gw: Gateway, instance_id: str) -> str:
    return f"ws://127.0.0.1:{gw.port}/i/{instance_id}/ws"


async def test_echo_through_router(gateway: Gateway) -> None:
    headers = {"Cookie": f"{SESSION_COOKIE}={gateway.cookie(ALICE)}"}
    async with websockets.connect(ws_url(gateway, "aaaa"), additional_headers=headers) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        payload = os.urandom(600000)  # random: permessage-deflate cannot shrink it
        await ws.send(payload)
        assert await ws.recv() == payload
        activity = gateway.router.activity("aaaa")
        assert activity is not None
        assert activity.open_websockets == 1
    for _ in range(100):
        activity = gateway.router.activity("aaaa")
        if activity is not None and activity.open_websockets == 0:
            break
        await asyncio.sleep(0.02)
    assert activity is not None
    assert activity.open_websockets == 0
    assert activity.bytes_in > 600000
    assert activity.bytes_out > 600000


async def test_token_websocket(gateway: Gateway) -> None:
    headers = {"Authorization": f"token {ALICE_TOKEN}"}
    async with websockets.connect(ws_url(gateway, "aaaa"), additional_headers=headers) as ws:
        await ws.send("t")
        assert await ws.recv() == "t"


async def test_websocket_needs_credentials_and_access(gateway: Gateway) -> None:
    with pytest.raises(InvalidStatus) as caught:
        async with websockets.connect(ws_url(gateway, "aaaa")):
            pass
    assert caught.value.response.status_code == 401
    headers = {"Cookie": f"{SESSION_COOKIE}={gateway.cookie(ALICE)}"}
    with pytest.raises(InvalidStatus) as caught:
        async with websockets.connect(ws_url(gateway, "bbbb"), additional_headers=headers):
            pass
    assert caught.value.response.status_code == 404


async def test_removing_route_closes_its_websockets(gateway: Gateway) -> None:
    headers = {"Cookie": f"{SESSION_COOKIE}={gateway.cookie(ALICE)}"}
    async with websockets.connect(ws_url(gateway, "aaaa"), additional_headers=headers) as ws:
        await ws.send("x")
        await ws.recv()
        gateway.table.remove_route("aaaa")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)


async def test_many_websockets_are_counted(gateway: Gateway) -> None:
    headers = {"Cookie": f"{SESSION_COOKIE}={gateway.cookie(ALICE)}"}
    sockets = [
        await websockets.connect(ws_url(gateway, "aaaa"), additional_headers=headers)
        for _ in range(20)
    ]
    try:
        activity = gateway.router.activity("aaaa")
        assert activity is not None
        assert activity.open_websockets == 20
        for n, ws in enumerate(sockets):
            await ws.send(str(n))
        for n, ws in enumerate(sockets):
            assert await ws.recv() == str(n)
    finally:
        for ws in sockets:
            await ws.close()
