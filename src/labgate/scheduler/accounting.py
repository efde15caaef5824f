"""Usage accounting: a record per instance and owner, and reports over them.

A record opens when a launch is admitted (or a warm-pool instance is claimed)
and closes when the instance ends, with the reason: ``stopped`` (by a person),
``idle`` or ``lifetime`` (culled), ``failed``, ``lost``, ``claimed`` (a pool
record handed over to a user), ``claim_failed``. Records copy names (user,
group, tool, site) so they outlive what they name.

Reports (:func:`usage_report`) aggregate records by any of user, group, tool
and site and by period (day, week, month, year, or all), splitting a record
that spans periods at their boundaries: an instance running across midnight
counts in both days, each with its share.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.db.models import Instance, InstanceState, UsageRecord, User, utcnow

PERIODS = ("day", "week", "month", "year", "all")
KEYS = ("user", "group", "tool", "site")
#: Why an instance ended, by terminal state, when the stop did not say.
END_REASONS = {
    InstanceState.stopped: "stopped",
    InstanceState.failed: "failed",
    InstanceState.lost: "lost",
}


# --- recording ----------------------------------------------------------------------


def open_record(
    session: Session,
    instance: Instance,
    user: User,
    group: str = "",
    now: datetime | None = None,
) -> UsageRecord:
    """Start accounting ``instance`` to ``user`` (and ``group``)."""
    resources = instance.resources or {}
    record = UsageRecord(
        instance_id=instance.id,
        user_id=user.id,
        user_name=user.name,
        group_name=group,
        tool=instance.tool,
        site=instance.site.name if instance.site is not None else "",
        cpu=float(resources.get("cpu", 0.0)),
        memory=int(resources.get("memory", 0)),
        started_at=now or utcnow(),
    )
    session.add(record)
    return record


def open_records(session: Session, instance_id: str) -> list[UsageRecord]:
    """The records of an instance still open (normally one)."""
    return list(
        session.scalars(
            select(UsageRecord).where(
                UsageRecord.instance_id == instance_id, UsageRecord.stopped_at.is_(None)
            )
        )
    )


def close_records(
    session: Session, instance_id: str, reason: str, now: datetime | None = None
) -> None:
    """Stop accounting an instance: its open records end now, with ``reason``."""
    now = now or utcnow()
    for record in open_records(session, instance_id):
        record.stopped_at = now
        record.reason = record.reason or reason


def on_transition(
    session: Session, instance: Instance, target: InstanceState, data: dict[str, Any]
) -> None:
    """Called with every state transition: note stop reasons, close records at the end."""
    if target == InstanceState.stopping:
        reason = str(data.get("reason") or "stopped")
        for record in open_records(session, instance.id):
            record.reason = record.reason or reason
    elif target.terminal:
        session.flush()
        close_records(session, instance.id, END_REASONS.get(target, target.value))


# --- reports ------------------------------------------------------------------------


#: Where a report over "all" time starts when it names no start: before any labgate.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)


def period_start(moment: datetime, period: str) -> datetime:
    """The start of the period (UTC) that ``moment`` falls in."""
    moment = moment.astimezone(UTC)
    day = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    if period == "year":
        return day.replace(month=1, day=1)
    raise ValueError(f"unknown period {period!r} (known: {', '.join(PERIODS)})")


def next_period(start: datetime, period: str) -> datetime:
    """The start of the period after the one starting at ``start``."""
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    if period == "month":
        return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    if period == "year":
        return start.replace(year=start.year + 1)
    raise ValueError(f"unknown period {period!r}")


def period_label(start: datetime, period: str) -> str:
    """How a period is named in reports: 2026-11-22, 2026-W47, 2026-11, 2026."""
    if period == "day":
        return start.strftime("%Y-%m-%d")
    if period == "week":
        year, week, _ = start.isocalendar()
        return f"{year}-W{week:02d}"
    if period == "month":
        return start.strftime("%Y-%m")
    if period == "year":
        return start.strftime("%Y")
    return "all"


def split(start: datetime, end: datetime, period: str) -> Iterator[tuple[str, datetime, datetime]]:
    """``[start, end)`` cut at period boundaries: (label, from, to) pieces."""
    if period == "all":
        yield "all", start, end
        return
    cursor = start
    while cursor < end:
        boundary = next_period(period_start(cursor, period), period)
        piece_end = min(boundary, end)
        yield period_label(period_start(cursor, period), period), cursor, piece_end
        cursor = piece_end


@dataclass
class UsageRow:
    """One line of a usage report."""

    period: str
    keys: dict[str, str]
    instances: set[str] = field(default_factory=set)
    hours: float = 0.0
    core_hours: float = 0.0
    memory_gib_hours: float = 0.0

    def as_json(self) -> dict[str, Any]:
        """Plain JSON form, rounded to 0.001."""
        return {
            "period": self.period,
            **self.keys,
            "instances": len(self.instances),
            "hours": round(self.hours, 3),
            "core_hours": round(self.core_hours, 3),
            "memory_gib_hours": round(self.memory_gib_hours, 3),
        }


@dataclass(frozen=True)
class UsageQuery:
    """What a report covers and how it groups.

    ``user`` filters by the name a record copied (admins' filter: it also
    finds a deleted user's records); ``user_id`` by the account itself, which
    is how a plain user's own usage is pinned: ids are never given out again,
    names are, and a deleted user's records (their ``user_id`` now NULL)
    match no id.
    """

    since: datetime
    until: datetime
    by: tuple[str, ...] = ()
    period: str = "month"
    user: str | None = None
    user_id: int | None = None
    group: str | None = None
    tool: str | None = None
    site: str | None = None


def records_between(
    session: Session, query: UsageQuery, limit: int | None = None
) -> list[UsageRecord]:
    """Records overlapping ``[since, until)`` that match the query's filters, oldest first.

    ``limit`` keeps the first (oldest) that many, in the query itself: a big
    database is not read whole to answer a short page.
    """
    stmt = select(UsageRecord).where(
        UsageRecord.started_at < query.until,
        (UsageRecord.stopped_at.is_(None)) | (UsageRecord.stopped_at > query.since),
    )
    if query.user is not None:
        stmt = stmt.where(UsageRecord.user_name == query.user)
    if query.user_id is not None:
        stmt = stmt.where(UsageRecord.user_id == query.user_id)
    if query.group is not None:
        stmt = stmt.where(UsageRecord.group_name == query.group)
    if query.tool is not None:
        stmt = stmt.where(UsageRecord.tool == query.tool)
    if query.site is not None:
        stmt = stmt.where(UsageRecord.site == query.site)
    stmt = stmt.order_by(UsageRecord.started_at, UsageRecord.id)
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(session.scalars(stmt))


def _key_value(record: UsageRecord, key: str) -> str:
    return {
        "user": record.user_name,
        "group": record.group_name,
        "tool": record.tool,
        "site": record.site,
    }[key]


def aggregate(
    records: Iterable[UsageRecord], query: UsageQuery, now: datetime | None = None
) -> list[UsageRow]:
    """Sum records into rows by period and the query's keys, in period then key order."""
    now = now or utcnow()
    rows: dict[tuple[str, tuple[str, ...]], UsageRow] = {}
    for record in records:
        start = max(record.started_at, query.since)
        end = min(record.stopped_at or now, query.until, now)
        if end <= start:
            continue
        keys = tuple(_key_value(record, key) for key in query.by)
        for label, piece_start, piece_end in split(start, end, query.period):
            row = rows.get((label, keys))
            if row is None:
                row = rows[(label, keys)] = UsageRow(label, dict(zip(query.by, keys, strict=True)))
            hours = (piece_end - piece_start).total_seconds() / 3600
            row.instances.add(record.instance_id)
            row.hours += hours
            row.core_hours += hours * record.cpu
            row.memory_gib_hours += hours * record.memory / 1024**3
    return [rows[key] for key in sorted(rows)]


def usage_report(session: Session, query: UsageQuery) -> dict[str, Any]:
    """The report as JSON: the query, its rows and their total."""
    rows = aggregate(records_between(session, query), query)
    total = UsageRow("all", {})
    for row in rows:
        total.instances |= row.instances
        total.hours += row.hours
        total.core_hours += row.core_hours
        total.memory_gib_hours += row.memory_gib_hours
    return {
        "since": query.since,
        "until": query.until,
        "period": query.period,
        "by": list(query.by),
        "rows": [row.as_json() for row in rows],
        "total": {k: v for k, v in total.as_json().items() if k != "period"},
    }


def record_json(record: UsageRecord, now: datetime | None = None) -> dict[str, Any]:
    """One record as JSON, with its duration and core-hours so far."""
    end = record.stopped_at or now or utcnow()
    hours = max((end - record.started_at).total_seconds(), 0.0) / 3600
    return {
        "id": record.id,
        "instance": record.instance_id,
        "user": record.user_name,
        "group": record.group_name,
        "tool": record.tool,
        "site": record.site,
        "cpu": record.cpu,
        "memory": record.memory,
        "started_at": record.started_at.isoformat(),
        "stopped_at": record.stopped_at.isoformat() if record.stopped_at else None,
        "reason": record.reason,
        "hours": round(hours, 4),
        "core_hours": round(hours * record.cpu, 4),
    }


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as CSV text with a header line."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return out.getvalue()
