"""Usage: who used what, where and for how long, summed or record by record, JSON or CSV.

Users see their own usage, pinned by their user id (never by name: names are
given out again, ids never, so a new account named like a deleted user reads
none of theirs); admins everyone's (``user``, ``group``, ``tool``, ``site``
filter; ``user`` is the name the records copied, and finds deleted users' too).
``by`` (repeatable) groups rows by user, group, tool or site;
``period`` cuts them by day, week, month, year (UTC) or not at all (``all``).
``format=csv`` (or ``Accept: text/csv``) answers CSV with a header line.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response

from labgate.db.models import utcnow
from labgate.errors import BadRequest
from labgate.portal.auth import Principal, require
from labgate.portal.openapi import errors
from labgate.portal.state import Portal, get_portal
from labgate.scheduler.accounting import (
    EARLIEST,
    KEYS,
    UsageQuery,
    period_start,
    record_json,
    records_between,
    to_csv,
    usage_report,
)

router = APIRouter(prefix="/usage", tags=["usage"])

Key = Literal["user", "group", "tool", "site"]
Period = Literal["day", "week", "month", "year", "all"]
Format = Literal["json", "csv"]
RECORD_COLUMNS = [
    "id",
    "instance",
    "user",
    "group",
    "tool",
    "site",
    "cpu",
    "memory",
    "started_at",
    "stopped_at",
    "reason",
    "hours",
    "core_hours",
]
TOTAL_COLUMNS = ["instances", "hours", "core_hours", "memory_gib_hours"]


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def build_query(
    caller: Principal,
    *,
    by: list[Key],
    period: Period,
    since: datetime | None,
    until: datetime | None,
    user: str | None,
    group: str | None,
    tool: str | None,
    site: str | None,
) -> UsageQuery:
    """A usage query the caller may make: their own, or anyone's for admins.

    A plain user's is pinned by their user id, not their name: a record of a
    deleted account with the same name (its ``user_id`` now NULL) is not theirs.
    """
    user_id: int | None = None
    if not caller.has("admin"):
        if user is not None and user != caller.name:
            caller.require("admin")
        user, user_id = None, caller.user_id
    now = utcnow()
    until = _aware(until) or now
    since = _aware(since) or (EARLIEST if period == "all" else period_start(now, period))
    if since >= until:
        raise BadRequest("since must be before until")
    return UsageQuery(
        since=since,
        until=until,
        by=tuple(dict.fromkeys(by)),
        period=period,
        user=user,
        user_id=user_id,
        group=group,
        tool=tool,
        site=site,
    )


def wants_csv(request: Request, fmt: Format | None) -> bool:
    """CSV when asked with ``format=csv`` or by ``Accept: text/csv``."""
    if fmt is not None:
        return fmt == "csv"
    return "text/csv" in request.headers.get("accept", "")


def csv_response(text: str, name: str) -> Response:
    """CSV text as a download."""
    return Response(
        text,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
    )


@router.get("", responses={200: {"content": {"text/csv": {}}}, **errors(400)})
async def usage(
    request: Request,
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
    by: Annotated[list[Key] | None, Query(description="Group rows by these.")] = None,
    period: Period = "month",
    since: datetime | None = Query(
        None, description="Start (default: this period's; for all, the beginning)."
    ),
    until: datetime | None = Query(None, description="End (default: now)."),
    user: str | None = None,
    group: str | None = None,
    tool: str | None = None,
    site: str | None = None,
    format: Format | None = None,
) -> Any:
    """Usage summed by period and ``by`` keys: instances, hours, core-hours, GiB-hours."""
    query = build_query(
        caller,
        by=by or [],
        period=period,
        since=since,
        until=until,
        user=user,
        group=group,
        tool=tool,
        site=site,
    )
    report = await portal.run_db(lambda s: usage_report(s, query))
    if wants_csv(request, format):
        columns = ["period", *query.by, *TOTAL_COLUMNS]
        return csv_response(to_csv(report["rows"], columns), "labgate-usage")
    return report


@router.get("/records", responses={200: {"content": {"text/csv": {}}}, **errors(400)})
async def usage_records(
    request: Request,
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
    since: datetime | None = Query(None, description="Start (default: this month's)."),
    until: datetime | None = Query(None, description="End (default: now)."),
    user: str | None = None,
    group: str | None = None,
    tool: str | None = None,
    site: str | None = None,
    limit: int = Query(10000, ge=1, le=100000),
    format: Format | None = None,
) -> Any:
    """Usage records one by one (overlapping the time range), oldest first."""
    query = build_query(
        caller,
        by=[],
        period="month",
        since=since,
        until=until,
        user=user,
        group=group,
        tool=tool,
        site=site,
    )
    rows = await portal.run_db(
        lambda s: [record_json(r) for r in records_between(s, query, limit=limit)]
    )
    if wants_csv(request, format):
        return csv_response(to_csv(rows, RECORD_COLUMNS), "labgate-usage-records")
    return rows


__all__ = ["KEYS", "router"]
