"""``labgate agent``: a site agent in its own process, dialing out to the portal.

The agent opens one WebSocket to the portal's public address (through the
router), authenticated by the site's token, and keeps it: on any failure it
reconnects after a jittered, growing pause (full jitter: a random pause up
to ``min(cap, base * 2**attempt)``), so a portal restart does not bring a
thousand agents back in the same second. It needs no inbound port, no
database and no portal secret.

Per connection: the portal's welcome says what the site is and what the
catalog holds; the agent builds its backend on the first one, answers with
a hello (what it can run and every instance it holds), then runs commands
and sends reports and heartbeats; for a tunneled site it dials the tunnel's
data connections to the router with the tickets the portal sends
(:class:`~labgate.agent.tunnel.TunnelDialer`). Commands are idempotent by id; reports
wait in an outbox until the portal acknowledges them, and go again after a
reconnect. A refused token ends the agent (exit status 2): a revoked site
must not keep knocking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection, connect

from labgate import __version__
from labgate.agent import convert, task_ops
from labgate.agent.site import SiteAgent
from labgate.agent.tunnel import TunnelDialer
from labgate.aio import wait_for
from labgate.backends.groups import group_dirs
from labgate.errors import LabgateError
from labgate.tools.catalog import Tool
from labgate.wire.agent import (
    CONNECT_PATH,
    AdoptionMsg,
    ClaimMsg,
    Command,
    FetchRequestMsg,
    Heartbeat,
    Held,
    Hello,
    LaunchSpecMsg,
    ProtocolError,
    ReportEnvelope,
    Result,
    SnapshotRefMsg,
    SnapshotRequestMsg,
    TunnelTicket,
    Welcome,
    dump,
    parse,
)
from labgate.wire.site import Report

log = logging.getLogger("labgate.agent")

#: Results kept for commands seen again (a command delivered twice is answered twice, run once).
REMEMBERED_COMMANDS = 2048
#: State reports kept while the portal is away; progress notes are not kept at all then.
MAX_OUTBOX = 10_000
#: Largest message accepted (a welcome carries the whole catalog).
MAX_MESSAGE = 16 * 1024 * 1024
#: Seconds a listing of the site's group volumes may take before a heartbeat goes without it.
GROUP_SCAN_TIMEOUT = 5.0


class TokenRefused(Exception):
    """The portal refused the site's token: revoked, rotated or never valid."""


def connect_url(portal: str) -> str:
    """The agent endpoint of a portal address (``https://gw`` → ``wss://gw/api/v1/agent/connect``)."""
    parts = urlsplit(portal.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"the portal address must be http(s)://HOST[:PORT], not {portal!r}")
    path = parts.path.rstrip("/") + CONNECT_PATH
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def backoff(attempt: int, base: float, cap: float) -> float:
    """A random pause before reconnect ``attempt`` (0, 1, ...): full jitter, at most ``cap``."""
    return random.uniform(0, min(cap, base * 2**attempt))


AgentFactory = Callable[[Welcome, Callable[[Report], Any]], SiteAgent]
"""Builds the site agent (and its backend) from the first welcome and a reporter."""


class RemoteAgent:
    """One site's agent process: the connection loop around a :class:`SiteAgent`."""

    def __init__(
        self,
        portal: str,
        token: str,
        make_agent: AgentFactory,
        *,
        reconnect_base: float = 0.5,
        reconnect_max: float = 30.0,
    ) -> None:
        self.url = connect_url(portal)
        self.portal = portal
        self.token = token
        self.make_agent = make_agent
        self.reconnect_base = reconnect_base
        self.reconnect_max = reconnect_max
        self.boot = uuid.uuid4().hex
        self.agent: SiteAgent | None = None
        self.welcome: Welcome | None = None
        self.tools: dict[str, Tool] = {}
        #: The tools' reasons as the portal last heard them (hello or heartbeat).
        self._said_tools: dict[str, str | None] = {}
        #: The site's group_root (from the latest welcome) and the group volumes there as
        #: the portal last heard them.
        self._group_root: str | None = None
        self._said_groups: list[str] | None = None
        self._scan: asyncio.Future[list[str]] | None = None
        #: The instance tunnel's data connections to the router (tunneled sites).
        self.tunnel = TunnelDialer(portal, self._endpoint_of)
        self.connections = 0
        self._ws: ClientConnection | None = None
        #: The connection reports go on directly: set once the hello and the outbox went.
        self._reporting: ClientConnection | None = None
        self._seq = 0
        self._outbox: OrderedDict[int, Report] = OrderedDict()
        self._commands: OrderedDict[str, asyncio.Task[Result]] = OrderedDict()
        self._stopping = asyncio.Event()

    # --- the connection loop ---------------------------------------------------
    async def run(self) -> None:
        """Connect, serve, reconnect, until :meth:`stop` or a refused token."""
        attempt = 0
        try:
            while not self._stopping.is_set():
                started = time.monotonic()
                try:
                    await self._connect_once()
                except TokenRefused:
                    raise
                except (OSError, TimeoutError, websockets.WebSocketException, ProtocolError) as exc:
                    log.warning("agent: connection to %s failed: %s", self.url, exc)
                if self._stopping.is_set():
                    break
                # A connection that lasted a while starts the pauses from the beginning.
                attempt = 0 if time.monotonic() - started > 60 else attempt + 1
                pause = backoff(attempt, self.reconnect_base, self.reconnect_max)
                log.info("agent: reconnecting in %.1f s", pause)
                with contextlib.suppress(TimeoutError):
                    await wait_for(self._stopping.wait(), pause)
        finally:
            await self.tunnel.stop()
            if self.agent is not None:
                await self.agent.close()

    async def stop(self) -> None:
        """End the loop; instances keep running."""
        self._stopping.set()
        if self._ws is not None:
            await self._ws.close()

    async def _connect_once(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            ws = await connect(
                self.url,
                additional_headers=headers,
                max_size=MAX_MESSAGE,
                compression=None,  # small JSON messages: deflate buys nothing
                ping_interval=None,  # the protocol's own heartbeats watch the connection
                open_timeout=15,
                user_agent_header=f"labgate-agent/{__version__}",
            )
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise TokenRefused(
                    f"the portal refused this site's token (HTTP {status}): it was revoked or "
                    "rotated, or belongs to no site; ask an admin for `labgate site token NAME`"
                ) from None
            raise
        self._ws = ws
        if self._stopping.is_set():  # stopped while connecting
            await ws.close()
            self._ws = None
            return
        try:
            await self._session(ws)
        except websockets.ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == 4401:
                raise TokenRefused(f"the portal cut the connection: {exc.rcvd.reason}") from None
            log.warning("agent: connection closed (%s)", exc)
        finally:
            self._ws = None
            await self.tunnel.stop()

    async def _session(self, ws: ClientConnection) -> None:
        welcome = parse(await wait_for(ws.recv(), 30))
        if not isinstance(welcome, Welcome):
            raise ProtocolError("the portal's first message was not a welcome")
        self._welcomed(welcome)
        agent = self.agent
        if agent is None:  # _welcomed builds it
            raise ProtocolError("no site agent")
        await agent.refresh_tools(list(self.tools.values()))
        hello = self._hello(agent, await self._groups())
        self._said_tools, self._said_groups = hello.tools, hello.groups
        await ws.send(dump(hello))
        self.connections += 1
        log.info("agent: connected to %s as site %s", self.url, welcome.site)
        # What the portal has not acknowledged goes again, in order; reports made
        # meanwhile join the outbox and go in this loop, then new ones go directly.
        sent = 0
        while pending := [(s, r) for s, r in self._outbox.items() if s > sent]:
            for seq, report in pending:
                await ws.send(dump(ReportEnvelope(seq=seq, report=convert.report_msg(report))))
                sent = seq
        self._reporting = ws
        loop = asyncio.get_running_loop()
        heard = [loop.time()]
        beats = asyncio.create_task(self._beat(ws, welcome.heartbeat, heard))
        try:
            while not self._stopping.is_set():
                # No timeout per message: the heartbeat task closes a silent connection.
                raw = await ws.recv()
                heard[0] = loop.time()
                message = parse(raw)
                if isinstance(message, Command):
                    self._command(ws, message)
                elif isinstance(message, TunnelTicket):
                    self.tunnel.update(message.ticket, message.routers)
                elif isinstance(message, Welcome):
                    self._rewelcomed(message)
                elif isinstance(message, ReportEnvelope | Heartbeat):
                    continue
                elif message.type == "ack":
                    for seq in [s for s in self._outbox if s <= message.seq]:
                        del self._outbox[seq]
        finally:
            self._reporting = None
            beats.cancel()

    def _welcomed(self, welcome: Welcome) -> None:
        self._settings(welcome)
        self._group_root = welcome.group_root
        self.tools = {}
        for raw in welcome.tools:
            try:
                tool = Tool(**raw)
            except ValueError as exc:
                log.warning(
                    "agent: tool %s from the portal is invalid here: %s", raw.get("name"), exc
                )
                continue
            self.tools[tool.name] = tool
        if self.agent is None:
            self.agent = self.make_agent(welcome, self._report)

    def _settings(self, welcome: Welcome) -> None:
        """Keep the first welcome's backend and options (the site agent was built with them);
        say when the portal's differ now."""
        if self.welcome is not None and (
            welcome.backend != self.welcome.backend or welcome.options != self.welcome.options
        ):
            log.warning(
                "agent: the site's backend or options changed at the portal; "
                "restart the agent to apply them"
            )
        self.welcome = self.welcome or welcome

    def _rewelcomed(self, welcome: Welcome) -> None:
        """The site's settings changed at the portal while connected: take the group root now.

        The next heartbeat lists the new root and sends the listing whatever it
        holds (the portal dropped the old one).
        """
        self._settings(welcome)
        if welcome.group_root != self._group_root:
            log.info("agent: group volumes are now under %s", welcome.group_root or "(none)")
            self._group_root = welcome.group_root
            self._said_groups = None
            self._scan = None

    async def _groups(self) -> list[str] | None:
        """The group volumes under the site's ``group_root`` now (None: it has none).

        A listing that takes longer than :data:`GROUP_SCAN_TIMEOUT` (a file system
        that hangs) is not waited for: the portal keeps what it last heard, and the
        heartbeats go on. One listing runs at a time.
        """
        root = self._group_root
        if not root:
            return None
        scan = self._scan
        if scan is None or scan.done():
            scan = self._scan = asyncio.ensure_future(asyncio.to_thread(group_dirs, Path(root)))
        try:
            return await wait_for(asyncio.shield(scan), GROUP_SCAN_TIMEOUT)
        except TimeoutError:
            log.warning("agent: listing the group volumes in %s takes too long", root)
            return self._said_groups

    def _hello(self, agent: SiteAgent, groups: list[str] | None = None) -> Hello:
        held = [
            Held(
                instance_id=iid,
                state="running" if watched.running else "starting",
                backend_state=watched.backend_state,
                endpoint=watched.endpoint,
            )
            for iid, watched in agent.watched.items()
        ]
        starting = [iid for iid in agent.starting_ids() if iid not in agent.watched]
        held += [
            Held(instance_id=i, state="starting", backend_state={}, endpoint="") for i in starting
        ]
        return Hello(
            site=agent.site,
            agent_version=__version__,
            hostname=socket.gethostname(),
            boot=self.boot,
            backend=agent.backend.name,
            snapshot_kind=agent.snapshot_kind,
            cores=os.cpu_count() or 0,
            tools=self._tool_reasons(agent),
            claims={name: agent.claim_support(tool) for name, tool in self.tools.items()},
            instances=held,
            groups=groups,
        )

    def _tool_reasons(self, agent: SiteAgent) -> dict[str, str | None]:
        """Per tool of the catalog: why it cannot run here, or None when it can."""
        return {name: agent.unavailable_reason(tool) for name, tool in self.tools.items()}

    async def _beat(self, ws: ClientConnection, interval: float, heard: list[float]) -> None:
        """Send a heartbeat every interval; reconnect when the portal is silent for three.

        A beat carries the tools' reasons when they changed since the hello or
        the last beat that carried them (an image built on the site's engine),
        and the group volumes when they changed (a directory made or removed
        under ``group_root``).
        """
        loop = asyncio.get_running_loop()
        while True:
            agent = self.agent
            count = len(agent.watched) if agent is not None else 0
            health = (await agent.health() or "") if agent is not None else ""
            tools = self._tool_reasons(agent) if agent is not None else self._said_tools
            changed = tools if tools != self._said_tools else None
            self._said_tools = tools
            groups = await self._groups()
            moved = groups if groups != self._said_groups else None
            self._said_groups = groups
            beat = Heartbeat(
                time=time.time(),
                instances=count,
                health=health,
                tools=changed,
                groups=moved,
            )
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(dump(beat))
            await asyncio.sleep(interval)
            if loop.time() - heard[0] > interval * 3:
                log.warning("agent: the portal is silent; reconnecting")
                await ws.close(4408, "no heartbeat")
                return

    # --- reports -----------------------------------------------------------------
    async def _report(self, report: Report) -> None:
        ws = self._reporting
        if report.kind == "progress" and ws is None:
            return  # a note for a screen nobody can see now
        self._seq += 1
        seq = self._seq
        if report.kind != "progress":
            self._outbox[seq] = report
            while len(self._outbox) > MAX_OUTBOX:
                self._outbox.popitem(last=False)
        if ws is not None:
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(dump(ReportEnvelope(seq=seq, report=convert.report_msg(report))))

    # --- commands ----------------------------------------------------------------
    def _command(self, ws: ClientConnection, command: Command) -> None:
        task = self._commands.get(command.id)
        if task is None:
            task = asyncio.create_task(self._run_command(command), name=f"command-{command.op}")
            self._commands[command.id] = task
            while len(self._commands) > REMEMBERED_COMMANDS:
                self._commands.popitem(last=False)
        task.add_done_callback(lambda t: asyncio.ensure_future(self._answer(ws, t)))

    async def _answer(self, ws: ClientConnection, task: asyncio.Task[Result]) -> None:
        if task.cancelled():
            return
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(dump(task.result()))

    async def _run_command(self, command: Command) -> Result:
        try:
            value = await self._execute(command.op, command.args)
        except LabgateError as exc:
            return Result(
                id=command.id, ok=False, error=exc.detail, code=exc.code, status=exc.status
            )
        except Exception as exc:
            log.exception("agent: %s failed", command.op)
            return Result(
                id=command.id, ok=False, error=f"{command.op} failed: {exc}", code="site_error"
            )
        return Result(id=command.id, ok=True, value=value)

    async def _execute(self, op: str, args: dict[str, Any]) -> Any:
        agent = self.agent
        if agent is None:
            raise ProtocolError("a command before the welcome")
        if op in task_ops.TASK_OPS:
            return await task_ops.execute(agent.tasks, op, args)
        if op == "launch":
            spec = convert.spec_of(LaunchSpecMsg.model_validate(args["spec"]), self.tools)
            agent.launch(spec)
            return None
        if op == "stop":
            await agent.stop(str(args["instance_id"]), dict(args.get("backend_state") or {}))
            return None
        if op == "adopt":
            adoption = convert.adoption_of(AdoptionMsg.model_validate(args["adoption"]), self.tools)
            await agent.adopt(adoption)
            return None
        if op == "logs":
            return await agent.logs(dict(args.get("backend_state") or {}), int(args["lines"]))
        if op == "snapshot":
            request = convert.snapshot_request_of(
                SnapshotRequestMsg.model_validate(args["request"])
            )
            result = await agent.snapshot(dict(args.get("backend_state") or {}), request)
            return convert.snapshot_result_msg(result).model_dump()
        if op == "collect_snapshots":
            return await agent.collect_snapshots({str(k) for k in args.get("known") or []})
        if op == "find_snapshot":
            request = convert.snapshot_request_of(
                SnapshotRequestMsg.model_validate(args["request"])
            )
            found = await agent.find_snapshot(request, str(args.get("reference") or ""))
            return None if found is None else convert.snapshot_result_msg(found).model_dump()
        if op == "delete_snapshot":
            await agent.delete_snapshot(
                convert.snapshot_ref_of(SnapshotRefMsg.model_validate(args["ref"]))
            )
            return None
        if op == "reconcile":
            return await agent.reconcile({str(k) for k in args.get("known") or []})
        if op == "fetch_dataset":
            wanted = convert.fetch_request_of(FetchRequestMsg.model_validate(args["request"]))
            return convert.fetched_msg(await agent.fetch_dataset(wanted)).model_dump()
        if op == "claim":
            claim = convert.claim_of(ClaimMsg.model_validate(args["claim"]))
            return await agent.claim(str(args["instance_id"]), claim)
        raise ProtocolError(f"unknown command {op!r}")

    def _endpoint_of(self, instance_id: str) -> str | None:
        return self.agent.endpoint_of(instance_id) if self.agent is not None else None
