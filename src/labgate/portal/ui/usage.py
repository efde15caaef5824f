"""The admin usage page (``/admin/usage``): usage summed by user, group, tool or site.

Rendered on the server from the same report the REST API gives
(:func:`labgate.scheduler.accounting.usage_report`): a GET form picks the
grouping, period and time range; the table shows instances, hours,
core-hours and GiB-hours; a link downloads the same report as CSV from
``/api/v1/usage``. No script is needed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from labgate.db.models import utcnow
from labgate.portal.state import Portal, get_portal
from labgate.portal.ui.render import render
from labgate.portal.ui.views import page_context, signed_in
from labgate.scheduler.accounting import (
    EARLIEST,
    KEYS,
    PERIODS,
    UsageQuery,
    period_start,
    usage_report,
)

router = APIRouter(include_in_schema=False)

#: How far back the page looks by default by days and weeks; by month or year it shows
#: the current one (an admin opening the page asks "what is used now", not "this year").
DEFAULT_SPAN = {"day": 14, "week": 8 * 7}


def default_start(now: datetime, period: str) -> datetime:
    """Where "From" starts when the form does not say: recent, by the period."""
    if period == "all":
        return EARLIEST
    if period in DEFAULT_SPAN:
        return period_start(now - timedelta(days=DEFAULT_SPAN[period]), "day")
    return period_start(now, period)


def _date(value: str | None) -> datetime | None:
    """A YYYY-MM-DD day from the form; None for none, a bad one or one out of range."""
    if not value:
        return None
    try:
        day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        return None
    # A day after it must still be a date (9999-12-31 is not), and usage began later.
    return day if EARLIEST <= day < datetime(9999, 1, 1, tzinfo=UTC) else None


@router.get("/admin/usage")
async def admin_usage(
    request: Request,
    portal: Portal = Depends(get_portal),
    by: str = "user",
    period: str = "month",
    since: str | None = None,
    until: str | None = None,
) -> Response:
    """Usage by user, group, tool or site and by period, with a CSV download."""
    caller = await signed_in(request, admin=True)
    if isinstance(caller, Response):
        return caller
    by = by if by in KEYS else "user"
    period = period if period in PERIODS else "month"
    now = utcnow()
    end = _date(until)
    end = end + timedelta(days=1) if end is not None else now
    start = _date(since) or default_start(now, period)
    if start >= end:
        start = end - timedelta(days=1)
    query = UsageQuery(since=start, until=end, by=(by,), period=period)
    report: dict[str, Any] = await portal.run_db(lambda s: usage_report(s, query))
    form = {
        "by": by,
        "period": period,
        "since": start.strftime("%Y-%m-%d"),
        "until": (end - timedelta(days=1)).strftime("%Y-%m-%d") if until else "",
    }
    csv_params = {
        "by": by,
        "period": period,
        "since": start.isoformat(),
        "until": end.isoformat(),
        "format": "csv",
    }
    context = page_context(
        portal,
        caller,
        "admin",
        section="usage",
        report=report,
        form=form,
        keys=KEYS,
        periods=PERIODS,
        csv_url="/api/v1/usage?" + urlencode(csv_params),
    )
    return render(request, "usage.html", context)
