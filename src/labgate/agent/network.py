"""The link to a site whose agent runs elsewhere and dials in: :class:`NetworkSiteLink`.

The agent holds one connection (:mod:`labgate.wire.agent`); while it is up,
the link sends commands over it and waits for their results, each with a
timeout, so the portal never waits on a dead connection. While it is down
every command fails at once with :class:`SiteUnavailable` (503), the site is
not ``live``, and placement sends new launches elsewhere.

What the site can run (per tool) and whether it takes claims and snapshots
come from the agent's hello, so placement never asks a backend on the
portal's machine.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from labgate.agent import convert
from labgate.agent.fetch import FetchError
from labgate.agent.link import Adoption, SiteLink
from labgate.agent.task_ops import TaskCalls
from labgate.aio import wait_for
from labgate.backends.claim import ClaimError
from labgate.backends.registry import tool_unavailable_reason
from labgate.errors import LabgateError
from labgate.wire.agent import Command, FetchedMsg, Hello, Result, SnapshotResultMsg, dump

if TYPE_CHECKING:
    from labgate.agent.fetch import Fetched
    from labgate.backends.base import LaunchSpec, SnapshotRef, SnapshotRequest, SnapshotResult
    from labgate.backends.claim import Claim
    from labgate.tools.catalog import Tool
    from labgate.wire.launch import FetchRequest
    from labgate.wire.runs import TaskSpec

log = logging.getLogger(__name__)

#: Snapshots copy whole images or workspaces: they get this many command timeouts.
SNAPSHOT_TIMEOUT_FACTOR = 60


class ChannelClosed(Exception):
    """An agent connection is gone."""


class SiteUnavailable(LabgateError):
    """The site's agent is not connected, or did not answer in time."""

    status = 503
    default_code = "site_unavailable"


class SiteAway(SiteUnavailable):
    """The site's agent is not connected here, or its connection broke mid-command.

    Unlike a command that got no answer in time from a connected agent, what
    such a command asked for is settled when the agent connects again: the
    portal's reconcile (:mod:`labgate.scheduler.liveness`) compares what the
    agent holds with the database.
    """


#: The statuses a site's refusal may give an API answer (its own errors' statuses).
#: Anything else (a 2xx or 3xx, a 401 that would read as "your session ended",
#: a status no error has) is answered as a 502: the site, not the caller, failed.
SITE_STATUSES: Final = frozenset({400, 404, 409, 413, 422, 429, 502, 503})
#: What an error code from a site may look like (``snapshot_unsupported``...).
SITE_CODE_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
#: The longest explanation of a site's that reaches a user; the rest is cut.
MAX_SITE_DETAIL: Final = 2000


class RemoteError(LabgateError):
    """A command failed at the site; ``code`` and ``status`` are the site's, within bounds.

    The agent is not trusted: its status is kept only when it is one a site's
    own errors have (:data:`SITE_STATUSES`), its code only when it looks like
    a code, and its detail is cut at :data:`MAX_SITE_DETAIL` characters.
    """

    def __init__(self, detail: str, *, code: str, status: int) -> None:
        if len(detail) > MAX_SITE_DETAIL:
            detail = detail[:MAX_SITE_DETAIL] + "…"
        if not SITE_CODE_RE.fullmatch(code):
            code = "site_error"
        super().__init__(detail, code=code)
        # The API answers as the site did (409 for a snapshot a site cannot take...).
        object.__setattr__(self, "status", status if status in SITE_STATUSES else 502)


#: Puts one text message on the agent's connection; raises when it is gone.
Sender = Callable[[str], Awaitable[None]]
#: Sends a command to the site's agent through another portal that holds its connection:
#: (site, op, args, wait) -> the result's value; raises like :meth:`NetworkSiteLink.call`.
Relay = Callable[[str, str, dict[str, Any], float], Awaitable[Any]]


@dataclass
class Session:
    """One connection of the site's agent, as the link uses it."""

    send: Sender
    hello: Hello
    pending: dict[str, asyncio.Future[Result]] = field(default_factory=dict)
    closed: bool = False
    #: When the hello came: what went starting since was sent over this connection.
    opened_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def resolve(self, result: Result) -> None:
        """Hand a result to the command waiting for it (a late or unknown one is dropped)."""
        future = self.pending.pop(result.id, None)
        if future is not None and not future.done():
            future.set_result(result)

    def fail_all(self, reason: str) -> None:
        """The connection is gone: every waiting command fails now."""
        self.closed = True
        for future in self.pending.values():
            if not future.done():
                future.set_exception(SiteAway(reason))
        self.pending.clear()


class NetworkSiteLink(SiteLink):
    """Commands to a site's remote agent over its connection, when it has one."""

    remote = True

    def __init__(
        self,
        site: str,
        backend: str,
        *,
        reach: str = "direct",
        command_timeout: float = 30.0,
        relay: Relay | None = None,
    ) -> None:
        super().__init__(site, backend)
        self.reach = reach
        self.command_timeout = command_timeout
        #: Where commands go while the agent is connected to another portal, if anywhere.
        self.relay = relay
        self.session: Session | None = None
        #: The last hello: what the site can run; kept while the agent is away.
        self.hello: Hello | None = None
        #: What the agent's last heartbeat said keeps the site from working ("" none).
        self.reported_health = ""
        #: The agent is connected to another portal sharing the database (the liveness
        #: module keeps this, every heartbeat interval): commands go through the relay.
        self.held_elsewhere = False

    # --- the connection ----------------------------------------------------
    @property
    def live(self) -> bool:
        """Whether the agent is connected."""
        return self.session is not None and not self.session.closed

    @property
    def reachable(self) -> bool:
        """Connected here, or to another portal that relays this one's commands."""
        return self.live or (self.held_elsewhere and self.relay is not None)

    def attach(self, session: Session) -> None:
        """A connection of the agent is up (it said hello)."""
        if self.session is not None:
            self.session.fail_all(f"site {self.site}: replaced by a new connection")
        self.session = session
        self.hello = session.hello
        self.backend = session.hello.backend or self.backend
        self.snapshot_kind = session.hello.snapshot_kind

    def tools_changed(self, tools: dict[str, str | None]) -> None:
        """The agent's heartbeat says anew what the site can run (an image was built)."""
        if self.hello is not None:
            self.hello = self.hello.model_copy(update={"tools": tools})

    def detach(self, session: Session, reason: str) -> None:
        """That connection is gone: fail what waits on it."""
        session.fail_all(f"site {self.site} disconnected: {reason}")
        if self.session is session:
            self.session = None

    async def health(self) -> str | None:
        """Not connected, or what the agent's last heartbeat said of its backend."""
        if not self.live:
            return f"the agent of site {self.site} is not connected"
        return self.reported_health or None

    def tunnel_upstream(self, instance_id: str) -> str | None:
        """The router's upstream for a tunneled instance (``tunnel:SITE/ID``), or None (direct)."""
        return f"tunnel:{self.site}/{instance_id}" if self.reach == "tunnel" else None

    async def call(self, op: str, args: dict[str, Any], wait: float | None = None) -> Any:
        """Send one command and wait for its result (or fail after ``wait`` seconds).

        While the agent is not connected here, the command goes through the
        relay (to the portal that holds the connection), if there is one.
        """
        session = self.session
        wait = wait if wait is not None else self.command_timeout
        if session is None or session.closed:
            if self.relay is not None:
                return await self.relay(self.site, op, args, wait)
            raise SiteAway(f"site {self.site} is not connected")
        command = Command(id=uuid.uuid4().hex, op=op, args=args)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        session.pending[command.id] = future
        try:
            await session.send(dump(command))
            result = await wait_for(future, wait)
        except TimeoutError:
            raise SiteUnavailable(
                f"site {self.site} did not answer {op} within {wait:g} seconds"
            ) from None
        except (ChannelClosed, ConnectionError, RuntimeError, OSError) as exc:
            raise SiteAway(f"site {self.site}: the connection broke ({exc})") from None
        finally:
            session.pending.pop(command.id, None)
        if not result.ok:
            raise RemoteError(result.error, code=result.code, status=result.status)
        return result.value

    # --- what the site can do (from its hello) -------------------------------
    def unavailable_reason(self, tool: Tool) -> str | None:
        """Why ``tool`` cannot run on this site, as its agent said in its hello."""
        if self.hello is None:
            return f"the agent of site {self.site} has not connected yet"
        if tool.name not in self.hello.tools:
            return f"the agent of site {self.site} has not seen tool {tool.name} yet"
        return self.hello.tools[tool.name]

    def placement_reason(self, tool: Tool) -> str | None:
        """The agent's answer; before it said hello to this portal (it is held by another
        replica), the backend's answer from the tool's definition."""
        if self.hello is None:
            return tool_unavailable_reason(tool, self.backend)
        return self.unavailable_reason(tool)

    def claim_support(self, tool: Tool) -> str | None:
        """Why running instances of ``tool`` cannot be handed to users here."""
        if self.hello is None:
            return f"the agent of site {self.site} has not connected yet"
        return self.hello.claims.get(tool.name, f"site {self.site} does not know {tool.name}")

    # --- commands ------------------------------------------------------------
    async def launch(self, spec: LaunchSpec) -> None:
        """Ask the agent to start an instance."""
        # A tunneled site's instances are reached only by its agent: a Unix socket will do.
        spec = replace(spec, on_socket=self.reach == "tunnel")
        await self.call("launch", {"spec": convert.spec_msg(spec).model_dump(mode="json")})

    async def stop(self, instance_id: str, backend_state: dict[str, Any]) -> None:
        """Ask the agent to stop an instance; it reports ``stopped``."""
        args = {"instance_id": instance_id, "backend_state": backend_state}
        # Stopping waits for the tool's grace period: give it more than a quick command.
        await self.call("stop", args, self.command_timeout * 2)

    async def adopt(self, adoption: Adoption) -> None:
        """Hand an instance back to the agent."""
        await self.call("adopt", {"adoption": convert.adoption_msg(adoption).model_dump()})

    async def logs(self, instance_id: str, backend_state: dict[str, Any], lines: int) -> str:
        """The tail of an instance's output, read at the site."""
        args = {"instance_id": instance_id, "backend_state": backend_state, "lines": lines}
        return str(await self.call("logs", args))

    async def snapshot(
        self, instance_id: str, backend_state: dict[str, Any], request: SnapshotRequest
    ) -> SnapshotResult:
        """Save an instance at the site."""
        args = {
            "backend_state": backend_state,
            "request": convert.snapshot_request_msg(request).model_dump(),
        }
        value = await self.call("snapshot", args, self.command_timeout * SNAPSHOT_TIMEOUT_FACTOR)
        return convert.snapshot_result_of(SnapshotResultMsg.model_validate(value))

    async def find_snapshot(
        self, request: SnapshotRequest, reference: str = ""
    ) -> SnapshotResult | None:
        """Look for a stored snapshot at the site."""
        args = {
            "request": convert.snapshot_request_msg(request).model_dump(),
            "reference": reference,
        }
        value = await self.call("find_snapshot", args)
        if value is None:
            return None
        return convert.snapshot_result_of(SnapshotResultMsg.model_validate(value))

    async def collect_snapshots(self, known: set[str]) -> list[str]:
        """Have the site remove stored snapshots the portal does not know."""
        value = await self.call(
            "collect_snapshots",
            {"known": sorted(known)},
            self.command_timeout * SNAPSHOT_TIMEOUT_FACTOR,
        )
        return [str(v) for v in value or []]

    async def delete_snapshot(self, ref: SnapshotRef) -> None:
        """Remove a snapshot's data at the site."""
        await self.call("delete_snapshot", {"ref": convert.snapshot_ref_msg(ref).model_dump()})

    async def reconcile(self, known: set[str]) -> list[str]:
        """Let the site remove what the portal does not know; nothing while it is away."""
        if not self.live:
            return []
        value = await self.call("reconcile", {"known": sorted(known)})
        return [str(v) for v in value or []]

    async def fetch_dataset(self, request: FetchRequest) -> Fetched:
        """Have the site fetch a URL dataset into its cache; a failure is a FetchError."""
        args = {"request": convert.fetch_request_msg(request).model_dump()}
        try:
            value = await self.call(
                "fetch_dataset", args, self.command_timeout * SNAPSHOT_TIMEOUT_FACTOR
            )
        except (RemoteError, SiteUnavailable) as exc:
            raise FetchError(exc.detail) from None
        return convert.fetched_of(FetchedMsg.model_validate(value))

    async def claim(self, instance_id: str, claim: Claim) -> dict[str, Any]:
        """Hand a warm instance to a user, at the site."""
        args = {"instance_id": instance_id, "claim": convert.claim_msg(claim).model_dump()}
        try:
            value = await self.call("claim", args)
        except (RemoteError, SiteUnavailable) as exc:
            raise ClaimError(exc.detail) from None
        return dict(value or {})

    # --- batch tasks (labgate.agent.task_ops) ---------------------------------------
    @property
    def _tasks(self) -> TaskCalls:
        return TaskCalls(self.call, self.command_timeout)

    async def run_task(self, spec: TaskSpec) -> None:
        """Ask the agent to start a task attempt."""
        await self._tasks.run(spec)

    async def cancel_task(self, attempt_id: str) -> None:
        """Ask the agent to stop a task attempt."""
        await self._tasks.simple("cancel_task", attempt_id)

    async def adopt_task(self, attempt_id: str) -> None:
        """Ask the agent to watch a task attempt again."""
        await self._tasks.simple("adopt_task", attempt_id)

    async def task_logs(self, attempt_id: str, lines: int) -> str:
        """A task attempt's output, read at the site."""
        return await self._tasks.logs(attempt_id, lines)

    async def task_results(self, attempt_id: str) -> bytes:
        """A task attempt's results archive, from the site."""
        return await self._tasks.results(attempt_id)

    async def forget_task(self, attempt_id: str) -> None:
        """Ask the agent to remove a task attempt's files."""
        await self._tasks.simple("forget_task", attempt_id)

    async def close(self) -> None:
        """Portal shutdown: fail waiting commands; the agent reconnects to the next portal."""
        if self.session is not None:
            self.detach(self.session, "the portal is shutting down")
