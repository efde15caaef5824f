"""Commands for a network site whose agent is connected to another portal, through PostgreSQL.

A network site's agent holds one connection, to one of the portals that
share the database. A command for it issued on another portal (a stop, the
logs, a snapshot) reaches it this way:

1. the issuing portal sends the command on the channel :data:`CALLS`
   (PostgreSQL ``NOTIFY``), to every portal;
2. the portal that holds a live connection of that site answers at once
   with an acknowledgement on :data:`RESULTS`, runs the command over its
   connection, and sends the result (or the error) on :data:`RESULTS`;
3. the issuing portal returns the result as if it had sent the command
   itself. Without an acknowledgement within :data:`ACK_TIMEOUT` seconds no
   portal holds the site: :class:`~labgate.agent.network.SiteUnavailable`
   (at once when the site's row says no agent is connected).

Every message is sealed (AES-GCM under a key derived from ``secret_key``,
:class:`~labgate.security.SecretBox`, with the message's id and kind as
associated data): any database role may LISTEN, and commands carry backend
state and logs. A command older than :data:`REPLAY_WINDOW` seconds, or one
already run, is refused. A message longer than PostgreSQL's payload limit
goes in parts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from labgate.agent.network import NetworkSiteLink, RemoteError, SiteAway, SiteUnavailable
from labgate.aio import cancel_and_wait
from labgate.db.models import Site
from labgate.errors import LabgateError
from labgate.portal.state import Portal

log = logging.getLogger(__name__)

#: Commands, to every portal.
CALLS = "labgate_site_calls"
#: Acknowledgements and results, to the portal that sent the command.
RESULTS = "labgate_site_results"
#: Seconds to wait for the portal holding the site to take a command.
ACK_TIMEOUT = 2.0
#: Seconds a command may take between two portals; older ones are refused.
REPLAY_WINDOW = 60.0
#: Characters of a sealed message per notification (PostgreSQL refuses 8000 bytes).
PART_SIZE = 7000


@dataclass
class _Waiting:
    """A command this portal relayed, until its result is in."""

    taken: asyncio.Event = field(default_factory=asyncio.Event)
    result: asyncio.Future[dict[str, Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass
class _Parts:
    """The parts of one message received so far."""

    total: int
    parts: dict[int, str] = field(default_factory=dict)
    first_seen: float = field(default_factory=time.monotonic)


def _notify(session: Session, channel: str, payloads: list[str]) -> None:
    for payload in payloads:
        session.execute(select(func.pg_notify(channel, payload)))


class SiteRelay:
    """Relays commands to sites whose agents are connected to another portal, and serves theirs."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal
        #: Names this portal as the sender and addressee of relayed messages.
        self.origin = uuid.uuid4().hex[:16]
        self._waiting: dict[str, _Waiting] = {}
        self._parts: dict[tuple[str, str, str], _Parts] = {}
        #: Ids of the commands served lately, with when (no command runs twice).
        self._served: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def channels(self) -> dict[str, Callable[[str], Awaitable[None]]]:
        """The channels to listen to, with their handlers."""
        return {CALLS: self._heard_call, RESULTS: self._heard_result}

    async def close(self) -> None:
        """Stop serving commands (those under way are cancelled)."""
        await cancel_and_wait(*self._tasks)

    # --- the issuing portal ----------------------------------------------------
    async def call(self, site: str, op: str, args: dict[str, Any], wait: float) -> Any:
        """Run ``op`` at ``site`` through the portal its agent is connected to."""
        held = await self.portal.run_db(
            lambda s: s.scalar(select(Site.connected_at).where(Site.name == site))
        )
        if held is None:  # no portal says it holds the agent: no need to ask around
            raise SiteAway(f"site {site} is not connected")
        call_id = uuid.uuid4().hex
        waiting = self._waiting[call_id] = _Waiting()
        body = {"site": site, "op": op, "args": args, "wait": wait, "t": time.time()}
        try:
            await self._send(CALLS, call_id, "call", "", body)
            try:
                async with asyncio.timeout(ACK_TIMEOUT):
                    await waiting.taken.wait()
            except TimeoutError:
                raise SiteAway(
                    f"site {site} is not connected to this portal or any other"
                ) from None
            try:
                async with asyncio.timeout(wait + ACK_TIMEOUT):
                    result = await waiting.result
            except TimeoutError:
                raise SiteUnavailable(
                    f"site {site} did not answer {op} within {wait:g} seconds"
                ) from None
        finally:
            self._waiting.pop(call_id, None)
        if result.get("ok"):
            return result.get("value")
        detail, code = str(result.get("error", "")), str(result.get("code", ""))
        if result.get("away"):
            # The holder's connection went as the command left: as for a launch on a
            # link of this portal, it is sent again when the agent connects again.
            raise SiteAway(detail)
        if code == SiteUnavailable.default_code:
            raise SiteUnavailable(detail)
        status = result.get("status")
        raise RemoteError(detail, code=code, status=status if isinstance(status, int) else 502)

    async def _heard_result(self, payload: str) -> None:
        message = self._receive(payload, to_me=True)
        if message is None:
            return
        call_id, kind, _sender, body = message
        waiting = self._waiting.get(call_id)
        if waiting is None:
            return
        if kind == "ack":
            waiting.taken.set()
        elif kind == "result" and not waiting.result.done():
            waiting.taken.set()
            waiting.result.set_result(body)

    # --- the portal holding the site ---------------------------------------------
    async def _heard_call(self, payload: str) -> None:
        message = self._receive(payload, to_me=False)
        if message is None:
            return
        call_id, kind, sender, body = message
        if kind != "call":
            return
        link = self.portal.links.get(str(body.get("site", "")))
        if not isinstance(link, NetworkSiteLink) or not link.live:
            return  # another portal holds it, or none
        now = time.time()
        self._served = {k: t for k, t in self._served.items() if now - t < REPLAY_WINDOW}
        if call_id in self._served or abs(now - float(body.get("t", 0))) > REPLAY_WINDOW:
            log.warning("refused a relayed command for site %s: stale or run before", link.site)
            return
        self._served[call_id] = now
        task = asyncio.create_task(self._serve(link, call_id, sender, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self, link: NetworkSiteLink, call_id: str, sender: str, body: dict[str, Any]
    ) -> None:
        await self._send(RESULTS, call_id, "ack", sender, {})
        op, args = str(body.get("op", "")), body.get("args") or {}
        try:
            value = await link.call(op, dict(args), float(body.get("wait") or 0) or None)
            result: dict[str, Any] = {"ok": True, "value": value}
        except LabgateError as exc:
            status = getattr(exc, "status", 500)
            result = {"ok": False, "error": exc.detail, "code": exc.code, "status": status}
            # SiteAway shares SiteUnavailable's code: said apart, or the issuer would end a
            # launch that waits for the agent's return (its type is what the callers test).
            result["away"] = isinstance(exc, SiteAway)
        log.info("relayed %s for site %s from another portal", op, link.site)
        await self._send(RESULTS, call_id, "result", sender, result)

    # --- messages ------------------------------------------------------------------
    async def _send(
        self, channel: str, call_id: str, kind: str, to: str, body: dict[str, Any]
    ) -> None:
        sealed = self.portal.box.seal(f"relay:{call_id}:{kind}", json.dumps(body))
        parts = [sealed[i : i + PART_SIZE] for i in range(0, len(sealed), PART_SIZE)]
        payloads = [
            json.dumps(
                {"o": self.origin, "to": to, "id": call_id, "k": kind, "n": n, "of": len(parts)}
                | {"p": part}
            )
            for n, part in enumerate(parts)
        ]
        # One transaction: the parts arrive together and in order.
        await self.portal.db.run(partial(_notify, channel=channel, payloads=payloads))

    def _receive(self, payload: str, *, to_me: bool) -> tuple[str, str, str, dict[str, Any]] | None:
        """A whole message once its last part is in: (id, kind, sender, body); else None."""
        try:
            envelope = json.loads(payload)
            sender, to, call_id = str(envelope["o"]), str(envelope["to"]), str(envelope["id"])
            kind, index, total = str(envelope["k"]), int(envelope["n"]), int(envelope["of"])
            part = str(envelope["p"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a relay message that is not labgate's")
            return None
        if (to_me and to != self.origin) or (not to_me and sender == self.origin):
            return None
        now = time.monotonic()
        self._parts = {k: v for k, v in self._parts.items() if now - v.first_seen < REPLAY_WINDOW}
        key = (sender, call_id, kind)
        pending = self._parts.setdefault(key, _Parts(total))
        pending.parts[index] = part
        if len(pending.parts) < pending.total:
            return None
        del self._parts[key]
        sealed = "".join(pending.parts[n] for n in range(pending.total) if n in pending.parts)
        opened = self.portal.box.open(f"relay:{call_id}:{kind}", sealed)
        if opened is None:
            log.warning("ignored a relay message that does not open with this portal's key")
            return None
        body = json.loads(opened)
        if not isinstance(body, dict):
            return None
        return call_id, kind, sender, body
