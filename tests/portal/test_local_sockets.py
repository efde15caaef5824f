"""The local site's tools listen on Unix sockets, and the router reaches them without links.

At the portal's own site (``make run``) the router runs on the same host as
the instances: a tool with a ``socket_command`` gets a socket in a directory
only its uid enters instead of a loopback port every local account can
connect to. A shell in the instance owns that directory: a link it puts in
place of the socket is not followed by the router (root, in a real
deployment), so nothing behind it is reached.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from datasets_fixtures import require_bwrap
from helpers import wait_for_state
from labgate.db.models import Instance


async def running_demo(app: Any, client: httpx.AsyncClient, headers: dict[str, str]) -> Instance:
    """A running ``demo`` of the user's at the local site, as stored.

    Sandboxed: unsandboxed, a tool binds its socket by its host path, and the
    tests' data dirs are too deep for a socket address (the tool takes a port).
    """
    require_bwrap()
    launched = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=headers)
    assert launched.status_code == 202, launched.text
    iid = launched.json()["id"]
    await wait_for_state(client, headers, iid, {"running"})
    instance: Instance = await app.state.portal.run_db(lambda s: s.get(Instance, iid))
    return instance


async def via_router(router_url: str, headers: dict[str, str], path: str) -> httpx.Response:
    """``GET path`` through the router, as ``headers``' user."""
    async with httpx.AsyncClient(base_url=router_url, headers=headers, timeout=10) as router:
        return await router.get(path)


async def test_a_local_tool_listens_on_its_socket_and_the_router_reaches_it(
    app: Any, client: httpx.AsyncClient, make_user: Any, router_url: str
) -> None:
    alice = await make_user("alice")
    instance = await running_demo(app, client, alice)
    path = Path(instance.endpoint.removeprefix("unix:"))
    assert instance.endpoint.startswith("unix:") and path.is_socket()
    assert path.parent == app.state.portal.settings.data_dir.resolve() / "sockets" / instance.id
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert instance.backend_state["port"] == 0  # no port on the host at all

    info = await via_router(router_url, alice, f"/i/{instance.id}/api/info")
    assert info.status_code == 200, info.text
    assert info.json()["user"] == "alice"
    ws_url = router_url.replace("http://", "ws://") + f"/i/{instance.id}/ws"
    async with websockets.connect(ws_url, additional_headers=alice) as ws:
        await ws.send("through the socket")
        assert await ws.recv() == "through the socket"


async def test_the_router_follows_no_link_put_in_place_of_a_tools_socket(
    app: Any, client: httpx.AsyncClient, make_user: Any, router_url: str
) -> None:
    """A link to another socket of the host (here one the test listens on) reaches nothing."""
    alice = await make_user("alice")
    instance = await running_demo(app, client, alice)
    path = Path(instance.endpoint.removeprefix("unix:"))
    with tempfile.TemporaryDirectory(prefix="lg-") as other_dir:
        target = Path(other_dir) / "engine.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as engine:
            engine.bind(str(target))
            engine.listen(8)
            engine.setblocking(False)
            # What a shell in the instance can do: its uid owns the socket's directory.
            os.rename(path, path.with_name("moved.sock"))
            os.symlink(target, path)
            answer = await via_router(router_url, alice, f"/i/{instance.id}/api/info")
            assert answer.status_code in (502, 503), answer.text
            await asyncio.sleep(0.2)
            with pytest.raises(BlockingIOError):
                engine.accept()  # nobody connected to the link's target
            # The tool's own socket back in place: reached again.
            path.unlink()
            os.rename(path.with_name("moved.sock"), path)
            again = await via_router(router_url, alice, f"/i/{instance.id}/api/info")
            assert again.status_code == 200, again.text
