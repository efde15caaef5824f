"""Quotas: what a user and their groups may hold at once and use per month.

Four limits, for users and for groups alike: concurrent instances, CPU cores
and memory held at once, and core-hours per calendar month (UTC). A user's
own limits (``user_limits``) replace the settings' defaults field by field; a
group's limits cap what its members charge to it *together*. Every launch is
charged to at most one group: the one it names, else the first of the user's
groups (by name) whose limits admit it. Batch task attempts hold their share
too, as open usage records (:mod:`labgate.scheduler.runquota`), charged to a
group the same way.

:func:`admit` runs inside the instance manager's admission lock, in the same
transaction that inserts the instance, so concurrent launches cannot overshoot.
A refusal is a :class:`~labgate.errors.QuotaExceeded` (429) whose message says
which limit and the current use, with ``quota``, ``scope``, ``limit`` and
``current`` in the error body.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from labgate.db.models import (
    ACTIVE_STATES,
    Group,
    GroupMember,
    Instance,
    UsageRecord,
    User,
    UserLimits,
    utcnow,
)
from labgate.errors import Forbidden, NotFound, QuotaExceeded

if TYPE_CHECKING:
    from labgate.backends.base import Resources
    from labgate.config import Settings

#: The limit fields, as stored (``max_<name>``) and as shown.
LIMIT_NAMES = ("instances", "cpu", "memory", "core_hours")
#: The ``tool`` of a batch task attempt's usage record starts with this (then the run's
#: name); an open one is a task holding its share of the owner's limits.
TASK_TOOL_PREFIX = "run:"


@dataclass(frozen=True)
class Limits:
    """One set of limits; None means no limit."""

    instances: int | None = None
    cpu: float | None = None
    memory: int | None = None
    core_hours: float | None = None

    def as_json(self) -> dict[str, Any]:
        """Plain JSON form."""
        return {name: getattr(self, name) for name in LIMIT_NAMES}


@dataclass(frozen=True)
class Use:
    """What is held now and used this month."""

    instances: int = 0
    cpu: float = 0.0
    memory: int = 0
    core_hours: float = 0.0

    def as_json(self) -> dict[str, Any]:
        """Plain JSON form (core-hours rounded to 0.001)."""
        return {
            "instances": self.instances,
            "cpu": round(self.cpu, 3),
            "memory": self.memory,
            "core_hours": round(self.core_hours, 3),
        }


def stored_limits(row: Group | UserLimits | None) -> Limits:
    """The limits of a group or user row (all None without a row)."""
    if row is None:
        return Limits()
    return Limits(row.max_instances, row.max_cpu, row.max_memory, row.max_core_hours)


def store_limits(row: Group | UserLimits, values: dict[str, Any]) -> None:
    """Set the limits named in ``values`` (None clears one) on a group or user row."""
    for name, value in values.items():
        if name not in LIMIT_NAMES:
            raise ValueError(f"unknown limit {name!r}")
        setattr(row, f"max_{name}", value)


def default_limits(settings: Settings) -> Limits:
    """The settings' per-user defaults (0 means no limit, except for instances)."""
    return Limits(
        instances=settings.max_instances_per_user,
        cpu=settings.max_cpu_per_user or None,
        memory=settings.max_memory_per_user or None,
        core_hours=settings.max_core_hours_per_user or None,
    )


def user_limits(session: Session, default: Limits, user_id: int) -> Limits:
    """A user's effective limits: their own where set, else ``default``."""
    own = stored_limits(session.get(UserLimits, user_id))
    return Limits(
        **{
            name: getattr(own, name) if getattr(own, name) is not None else getattr(default, name)
            for name in LIMIT_NAMES
        }
    )


def month_start(now: datetime) -> datetime:
    """Midnight UTC on the first of ``now``'s month."""
    now = now.astimezone(UTC)
    return datetime(now.year, now.month, 1, tzinfo=UTC)


def core_hours(records: list[UsageRecord], since: datetime, until: datetime) -> float:
    """Core-hours of ``records`` that fall between ``since`` and ``until``."""
    total = 0.0
    for record in records:
        start = max(record.started_at, since)
        end = min(record.stopped_at or until, until)
        if end > start:
            total += record.cpu * (end - start).total_seconds() / 3600
    return total


def _month_records(session: Session, now: datetime, *where: Any) -> list[UsageRecord]:
    since = month_start(now)
    stmt = select(UsageRecord).where(
        UsageRecord.started_at < now,
        (UsageRecord.stopped_at.is_(None)) | (UsageRecord.stopped_at > since),
        *where,
    )
    return list(session.scalars(stmt))


def _held(instances: list[Instance]) -> tuple[int, float, int]:
    cpu = sum(float((i.resources or {}).get("cpu", 0)) for i in instances)
    memory = sum(int((i.resources or {}).get("memory", 0)) for i in instances)
    return len(instances), cpu, memory


def _open_tasks(session: Session, *where: Any) -> tuple[int, float, int]:
    """Batch task attempts under way (their usage records are open): count, CPUs, memory."""
    count, cpu, memory = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(UsageRecord.cpu), 0.0),
            func.coalesce(func.sum(UsageRecord.memory), 0),
        ).where(
            UsageRecord.stopped_at.is_(None),
            UsageRecord.tool.startswith(TASK_TOOL_PREFIX),
            *where,
        )
    ).one()
    return int(count), float(cpu), int(memory)


def user_use(
    session: Session, user_id: int, now: datetime | None = None, *, core_hours_too: bool = True
) -> Use:
    """What a user holds now (pending, starting, running) and used this month.

    ``core_hours_too=False`` leaves the month's core-hours at 0 (they read every
    record of the month): for a check against limits that have none.
    """
    now = now or utcnow()
    active = list(
        session.scalars(
            select(Instance).where(Instance.owner_id == user_id, Instance.state.in_(ACTIVE_STATES))
        )
    )
    count, cpu, memory = _held(active)
    tasks, task_cpu, task_memory = _open_tasks(session, UsageRecord.user_id == user_id)
    count, cpu, memory = count + tasks, cpu + task_cpu, memory + task_memory
    if not core_hours_too:
        return Use(count, cpu, memory, 0.0)
    records = _month_records(session, now, UsageRecord.user_id == user_id)
    return Use(count, cpu, memory, core_hours(records, month_start(now), now))


def group_use(
    session: Session, group: str, now: datetime | None = None, *, core_hours_too: bool = True
) -> Use:
    """What the launches and task attempts charged to a group hold now and used this month.

    ``core_hours_too=False`` leaves the month's core-hours at 0, as for :func:`user_use`.
    """
    now = now or utcnow()
    active = list(
        session.scalars(
            select(Instance)
            .join(UsageRecord, UsageRecord.instance_id == Instance.id)
            .where(
                UsageRecord.group_name == group,
                UsageRecord.stopped_at.is_(None),
                UsageRecord.user_id == Instance.owner_id,
                Instance.state.in_(ACTIVE_STATES),
            )
        )
    )
    count, cpu, memory = _held(active)
    tasks, task_cpu, task_memory = _open_tasks(session, UsageRecord.group_name == group)
    count, cpu, memory = count + tasks, cpu + task_cpu, memory + task_memory
    if not core_hours_too:
        return Use(count, cpu, memory, 0.0)
    records = _month_records(session, now, UsageRecord.group_name == group)
    return Use(count, cpu, memory, core_hours(records, month_start(now), now))


def _gib(value: float) -> str:
    return f"{value / 1024**3:.3g} GiB"


def check(who: str, limits: Limits, use: Use, asked: Resources, scope: str) -> None:
    """Refuse (429) when holding ``asked`` more would break one of ``limits``."""
    if limits.instances is not None and use.instances + 1 > limits.instances:
        raise QuotaExceeded(
            f"{who} has {use.instances} of {limits.instances} allowed instances; "
            "stop one before launching another",
            limit=limits.instances,
            current=use.instances,
            quota="instances",
            scope=scope,
        )
    if limits.cpu is not None and use.cpu + asked.cpu > limits.cpu + 1e-9:
        raise QuotaExceeded(
            f"{who} would hold {use.cpu + asked.cpu:g} of {limits.cpu:g} allowed CPUs "
            f"({use.cpu:g} in use, {asked.cpu:g} asked for)",
            limit=limits.cpu,
            current=round(use.cpu, 3),
            quota="cpu",
            scope=scope,
        )
    if limits.memory is not None and use.memory + asked.memory > limits.memory:
        raise QuotaExceeded(
            f"{who} would hold {_gib(use.memory + asked.memory)} of {_gib(limits.memory)} "
            f"allowed memory ({_gib(use.memory)} in use, {_gib(asked.memory)} asked for)",
            limit=limits.memory,
            current=use.memory,
            quota="memory",
            scope=scope,
        )
    if limits.core_hours is not None and use.core_hours >= limits.core_hours:
        raise QuotaExceeded(
            f"{who} has used {use.core_hours:.2f} of {limits.core_hours:g} core-hours "
            "allowed this month",
            limit=limits.core_hours,
            current=round(use.core_hours, 3),
            quota="core_hours",
            scope=scope,
        )


def groups_of(session: Session, user_id: int) -> list[Group]:
    """The user's groups, by name."""
    return list(
        session.scalars(
            select(Group)
            .join(GroupMember, GroupMember.group_id == Group.id)
            .where(GroupMember.user_id == user_id)
            .order_by(Group.name)
        )
    )


def admit(
    session: Session, defaults: Limits, user: User, asked: Resources, group: str | None
) -> Group | None:
    """Check the user's and a group's limits for one more launch; the group charged, if any."""
    own = user_limits(session, defaults, user.id)
    check(user.name, own, user_use(session, user.id), asked, "user")
    mine = groups_of(session, user.id)
    if group is not None:
        named = session.scalar(select(Group).where(Group.name == group))
        if named is None:
            raise NotFound(f"no group called {group!r}", code="unknown_group")
        if named not in mine:
            raise Forbidden(f"{user.name} is not a member of group {group!r}", code="not_a_member")
        mine = [named]
    first_refusal: QuotaExceeded | None = None
    for candidate in mine:
        # Row-locked until the launch commits: another portal process admitting
        # into this group counts after it (in-process launches are ordered anyway).
        session.execute(select(Group.id).where(Group.id == candidate.id).with_for_update())
        try:
            check(
                f"group {candidate.name}",
                stored_limits(candidate),
                group_use(session, candidate.name),
                asked,
                "group",
            )
        except QuotaExceeded as exc:
            exc.extra["group"] = candidate.name
            first_refusal = first_refusal or exc
            continue
        return candidate
    if first_refusal is not None:
        raise first_refusal
    return None


def lifetime_limit(settings: Settings, tool_limit: float, group: Group | None) -> float | None:
    """Seconds an instance may run: the smallest of the settings', tool's and group's."""
    limits = [settings.max_lifetime, tool_limit, (group.max_lifetime if group else None) or 0]
    positive = [value for value in limits if value and value > 0]
    return min(positive) if positive else None
