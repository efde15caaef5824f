"""Spies: raw WebSocket clients speaking the agent protocol, recording all the portal sends.

They stand in for a compromised site's agent (tests/agent/test_agent_security.py)
and for an agent whose tickets a test uses itself (tests/agent/test_tunnel_routers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets

from labgate.wire.agent import (
    CONNECT_PATH,
    Hello,
    ReportEnvelope,
    ReportMsg,
    Result,
    Welcome,
    dump,
    parse,
)


@dataclass
class Spy:
    """An agent that says it can run everything and records all it is sent.

    It answers every command ``ok`` and a stop with a ``stopped`` report, so a
    test that stops its instances while the spy is connected leaves none behind.
    """

    site: str
    ws: Any = None
    received: list[str] = field(default_factory=list)
    commands: list[dict] = field(default_factory=list)
    tickets: list[str] = field(default_factory=list)
    #: The routers each ticket named.
    routers: list[list[str]] = field(default_factory=list)
    #: The sequence number of the last report sent: the portal drops one not above it.
    seq: int = 0

    @property
    def text(self) -> str:
        return "\n".join(self.received)

    async def report(self, report: ReportMsg) -> None:
        """Send ``report`` with the next sequence number."""
        self.seq += 1
        await self.ws.send(dump(ReportEnvelope(seq=self.seq, report=report)))


@contextlib.asynccontextmanager
async def spy_agent(url: str, site: str, token: str) -> AsyncIterator[Spy]:
    spy = Spy(site)
    ws_url = url.replace("http://", "ws://") + CONNECT_PATH
    async with websockets.connect(
        ws_url, additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        spy.ws = ws
        welcome = parse(await ws.recv())
        assert isinstance(welcome, Welcome)
        spy.received.append(welcome.model_dump_json())
        tools = {str(t["name"]): None for t in welcome.tools}
        await ws.send(
            dump(Hello(site=site, agent_version="spy", boot="b", backend="process", tools=tools))
        )

        async def listen() -> None:
            async for raw in ws:
                text = raw if isinstance(raw, str) else raw.decode(errors="replace")
                spy.received.append(text)
                message = json.loads(text)
                if message.get("type") == "tunnel":
                    spy.tickets.append(message["ticket"])
                    spy.routers.append(message.get("routers", []))
                if message.get("type") == "command":
                    spy.commands.append(message)
                    await ws.send(dump(Result(id=message["id"], ok=True)))
                    if message["op"] == "stop":
                        iid = message["args"]["instance_id"]
                        await spy.report(
                            ReportMsg(instance_id=iid, state="stopped", message="stopped")
                        )

        task = asyncio.create_task(listen())
        try:
            yield spy
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
                await task


async def add_site(client: httpx.AsyncClient, headers: dict[str, str], name: str) -> str:
    created = await client.post(
        "/api/v1/sites",
        json={"name": name, "backend": "process", "reach": "tunnel"},
        headers=headers,
    )
    assert created.status_code == 201, created.text
    return str(created.json()["token"])


async def wait_until(check: Any, timeout: float = 10.0) -> None:
    """Poll ``check`` until true (fail after ``timeout`` seconds)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)
