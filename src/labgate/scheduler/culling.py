"""Idle culling and lifetime limits: instances that stop by themselves, busy work spared.

Every ``cull_interval`` seconds the culler looks at each running instance
(warm-pool instances aside) and works out when it must stop:

- **idle**: the tool's ``idle_timeout`` (0: never) after its last use. Use is
  the latest of: a request through any router (``last_request``), traffic on
  an open WebSocket (routers bump ``last_request`` for tunnelled bytes, and
  any change in an instance's byte counters between two sweeps counts too,
  which also covers router processes that report every 30 s), a "busy"
  report from the tool itself (``POST /api/v1/instances/{id}/activity`` with
  the instance token), its start or claim, and the culler's own start (after a
  restart the routers' counters are new, so every instance gets a full idle
  period). An open WebSocket without traffic is not use.
- **keep-alive**: the owner may push the idle stop back to a time of their
  choosing (at most ``keep_alive_max`` ahead); the lifetime limit still holds.
- **lifetime**: the smallest of ``max_lifetime`` (settings), the tool's
  ``max_lifetime`` and the charged group's, counted from when the instance
  became ready for its owner; and the end its site gave it, when its
  backend state has ``ends_at`` (a Slurm job's wall time).

``cull_warning`` seconds before either stop a ``progress`` event with
``data.warning`` (``idle`` or ``lifetime``) and ``data.cull_at`` goes into the
instance's event stream, once per deadline. The stop itself is an ordinary
stop (TERM, then KILL after ``stop_grace_seconds``) with the reason in the
event and the usage record; the workspace is never touched.

Among several portal replicas only the leader culls
(:mod:`labgate.scheduler.leader`): a sweep of any other does nothing, and the
stop is recorded in a transaction that checks the leader's lease, so an old
leader that lost it stops nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from labgate.aio import cancel_and_wait
from labgate.db.models import Group, Instance, InstanceState, UsageRecord
from labgate.errors import LabgateError
from labgate.scheduler.leader import Leadership, SoleLeader
from labgate.scheduler.quotas import lifetime_limit
from labgate.wire.site import Report

if TYPE_CHECKING:
    from labgate.config import Settings
    from labgate.scheduler.activity import ActivityBoard
    from labgate.scheduler.control import InstanceControl

log = logging.getLogger(__name__)

#: A stop further ahead than this (a hundred years) is shown as none: it would not
#: fit a date, and no instance lives that long.
NEVER = 100 * 366 * 86400.0


class CullMetrics(Protocol):
    """Where the culler counts what it stopped (``labgate.portal.metrics.Metrics``)."""

    def culled(self, reason: str) -> None:
        """The culler stopped an instance for ``reason``."""


@dataclass(frozen=True)
class Watch:
    """What the culler needs to know of one running instance."""

    id: str
    tool: str
    owner: str
    ready: float
    last_busy: float
    keep_alive_until: float | None
    group: Group | None
    #: When the site ends the instance by itself (a batch job's wall time), if it does.
    ends_at: float | None = None


@dataclass(frozen=True)
class Deadline:
    """When an instance must stop, and why."""

    at: float
    reason: str
    message: str


def human(seconds: float) -> str:
    """``90`` → ``1m 30s``; ``7200`` → ``2h``."""
    seconds = max(0, round(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            value, seconds = divmod(seconds, size)
            parts.append(f"{value}{unit}")
    return " ".join(parts[:2])


def _ts(value: datetime | None) -> float:
    return value.timestamp() if value is not None else 0.0


class Culler:
    """Stops idle instances and instances past their lifetime, warning first."""

    def __init__(
        self,
        manager: InstanceControl,
        activity: ActivityBoard,
        settings: Settings,
        metrics: CullMetrics | None = None,
        leader: Leadership | None = None,
    ) -> None:
        self.manager = manager
        self.activity = activity
        self.settings = settings
        self.metrics = metrics
        #: Only the leader culls; ``labgate serve`` always leads.
        self.leader: Leadership = leader or SoleLeader()
        self.started = time.time()
        self._bytes: dict[str, int] = {}
        self._traffic_at: dict[str, float] = {}
        self._warned: dict[str, tuple[str, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._term = self.leader.term

    def start(self) -> None:
        """Sweep every ``cull_interval`` seconds (never when it is 0)."""
        if self.settings.cull_interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="culler")

    async def close(self) -> None:
        """Stop sweeping."""
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.cull_interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("culling sweep failed")

    # --- one sweep -----------------------------------------------------------------
    async def sweep(self, now: float | None = None) -> list[str]:
        """Warn about and stop what is due; returns the ids stopped (none unless leading)."""
        if not self.leader.leading:
            return []
        now = time.time() if now is None else now
        if self.leader.term != self._term:
            # A replica that just began leading saw only the activity routers sent it:
            # like a restart, every instance gets a full idle period from now.
            self._term = self.leader.term
            self.started = now
        watches = await self.manager.run_db(self._running)
        stopped = []
        for watch in watches:
            deadline = self.deadline(watch, self.last_use(watch, now), now)
            if deadline is None:
                continue
            if now >= deadline.at:
                if self.leader.leading and await self._cull(watch, deadline):
                    stopped.append(watch.id)
            elif now >= deadline.at - self.settings.cull_warning and self.leader.leading:
                await self._warn(watch, deadline, now)
        alive = {watch.id for watch in watches}
        for table in (self._bytes, self._traffic_at, self._warned):
            for key in [k for k in table if k not in alive]:
                del table[key]
        return stopped

    def _running(self, session: Session) -> list[Watch]:
        instances = session.scalars(
            select(Instance)
            .where(Instance.state == InstanceState.running, Instance.pool.is_(None))
            .options(selectinload(Instance.owner))
        ).all()
        charged = dict(
            session.execute(
                select(UsageRecord.instance_id, UsageRecord.group_name).where(
                    UsageRecord.stopped_at.is_(None), UsageRecord.group_name != ""
                )
            ).all()
        )
        groups = {g.name: g for g in session.scalars(select(Group))} if charged else {}
        watches = []
        for instance in instances:
            watches.append(watch_of(instance, groups.get(charged.get(instance.id, ""))))
        return watches

    def last_use(self, watch: Watch, now: float, *, look_only: bool = False) -> float:
        """The last time anything used the instance (see the module docstring).

        A sweep also notes byte counters that moved since the previous sweep;
        ``look_only`` (the API's countdowns) leaves that bookkeeping alone.
        """
        seen = self.activity.get(watch.id)
        last_request = 0.0
        if seen is not None:
            last_request = seen.last_request
            total = seen.bytes_in + seen.bytes_out
            if not look_only:
                if self._bytes.get(watch.id) not in (None, total):
                    self._traffic_at[watch.id] = now
                self._bytes[watch.id] = total
        return max(
            last_request,
            self._traffic_at.get(watch.id, 0.0),
            watch.last_busy,
            watch.ready,
            self.started,
        )

    def deadline(self, watch: Watch, last: float, now: float) -> Deadline | None:
        """The earlier of the idle and the lifetime stop, or None for neither."""
        tool = self.manager.catalog.get(watch.tool)
        candidates: list[Deadline] = []
        timeout = tool.idle_timeout if tool is not None else 0.0
        if timeout > 0:
            at = last + timeout
            message = (
                f"stopped after {human(now - last)} without use (the idle timeout of "
                f"{watch.tool} is {human(timeout)}); the workspace is kept"
            )
            if watch.keep_alive_until is not None and watch.keep_alive_until > at:
                at = watch.keep_alive_until
                message = f"stopped when its keep-alive ended, idle for {human(now - last)}"
            candidates.append(Deadline(at, "idle", message))
        limit = lifetime_limit(
            self.settings, tool.max_lifetime if tool is not None else 0.0, watch.group
        )
        if limit is not None:
            candidates.append(
                Deadline(
                    watch.ready + limit,
                    "lifetime",
                    f"stopped at its maximum lifetime of {human(limit)}; the workspace is kept",
                )
            )
        if watch.ends_at is not None:
            candidates.append(
                Deadline(
                    watch.ends_at,
                    "lifetime",
                    "stopped at the end of the wall time its site gave it; the workspace is kept",
                )
            )
        return min(candidates, key=lambda d: d.at) if candidates else None

    async def _warn(self, watch: Watch, deadline: Deadline, now: float) -> None:
        mark = (deadline.reason, int(deadline.at))
        if self._warned.get(watch.id) == mark:
            return
        self._warned[watch.id] = mark
        when = datetime.fromtimestamp(deadline.at, UTC)
        if deadline.reason == "idle":
            message = (
                f"idle: stops in {human(deadline.at - now)} unless it is used "
                "(or kept alive with `labgate keep-alive`)"
            )
        else:
            message = f"reaches its maximum lifetime and stops in {human(deadline.at - now)}"
        await self.manager.apply(
            Report(
                watch.id,
                "running",
                kind="progress",
                message=message,
                data={"warning": deadline.reason, "cull_at": when.isoformat()},
            )
        )

    async def _cull(self, watch: Watch, deadline: Deadline) -> bool:
        log.info("culling %s of %s: %s", watch.id, watch.owner, deadline.message)
        try:
            await self.manager.stop(
                watch.id,
                reason=deadline.reason,
                message=deadline.message,
                fence=self.leader.fence,
            )
        except LabgateError:
            return False  # stopped meanwhile, or this replica no longer leads
        if self.metrics is not None:
            self.metrics.culled(deadline.reason)
        return True


def watch_of(instance: Instance, group: Group | None) -> Watch:
    """The culler's view of an instance (its owner loaded) charged to ``group``."""
    return Watch(
        id=instance.id,
        tool=instance.tool,
        owner=instance.owner.name,
        ready=_ts(instance.ready_at or instance.created_at),
        last_busy=_ts(instance.last_activity_at),
        keep_alive_until=_ts(instance.keep_alive_until) if instance.keep_alive_until else None,
        group=group,
        ends_at=_ends_at(instance.backend_state),
    )


def _ends_at(state: dict[str, Any] | None) -> float | None:
    """The end a site gave an instance (``ends_at`` in its backend state), if any."""
    value = (state or {}).get("ends_at")
    return float(value) if isinstance(value, int | float) and value > 0 else None


def cull_status(culler: Culler | None, session: Session, instance: Instance) -> dict[str, Any]:
    """When and why a running instance will be stopped, for the API's countdowns."""
    if culler is None or instance.state != InstanceState.running or instance.pool is not None:
        return {"cull_at": None, "cull_reason": None, "cull_in": None}
    group_name = session.scalar(
        select(UsageRecord.group_name).where(
            UsageRecord.instance_id == instance.id, UsageRecord.stopped_at.is_(None)
        )
    )
    group = session.scalar(select(Group).where(Group.name == group_name)) if group_name else None
    watch = watch_of(instance, group)
    now = time.time()
    deadline = culler.deadline(watch, culler.last_use(watch, now, look_only=True), now)
    if deadline is None or deadline.at - now > NEVER:
        return {"cull_at": None, "cull_reason": None, "cull_in": None}
    return {
        "cull_at": datetime.fromtimestamp(deadline.at, UTC),
        "cull_reason": deadline.reason,
        "cull_in": max(0.0, round(deadline.at - now, 1)),
    }
