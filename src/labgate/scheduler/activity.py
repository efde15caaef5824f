"""What the routers saw per instance: merged from the in-process router and reports.

Among several portal replicas each router reports to one of them, and only
the leader culls: a replica therefore also moves each instance's
``last_activity_at`` up to the last request its routers saw
(:func:`record_last_use`), which every replica's culler reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Table, bindparam, or_
from sqlalchemy.orm import Session

from labgate.db.models import Instance
from labgate.wire.activity import Activity, merge
from labgate.wire.stats import RouterStats

#: Reports older than this come from router processes that went away.
REPORT_TTL = 300.0


class ActivityBoard:
    """Per-instance activity across every router that serves this portal."""

    def __init__(self) -> None:
        self.local: Callable[[], dict[str, Activity]] | None = None
        self._reports: dict[str, tuple[float, dict[str, Activity]]] = {}
        #: The in-process router's request counts and latency, and router processes' reports.
        self.local_stats: Callable[[], RouterStats] | None = None
        self._stats: dict[str, RouterStats] = {}

    def report_stats(self, worker: str, stats: RouterStats) -> None:
        """Replace what ``worker`` reported of its requests and latency before."""
        self._stats[worker] = stats

    def stats(self) -> RouterStats:
        """Requests and latency summed over every router (kept after a worker is gone)."""
        total = RouterStats()
        for part in self._stats.values():
            total.add(part)
        if self.local_stats is not None:
            total.add(self.local_stats())
        return total

    def everything(self) -> dict[str, Activity]:
        """The activity of every instance any router has seen (for /metrics)."""
        now = time.time()
        ids = {i for at, seen in self._reports.values() if now - at < REPORT_TTL for i in seen}
        if self.local is not None:
            ids |= set(self.local())
        return {i: a for i in ids if (a := self.get(i)) is not None}

    def report(self, worker: str, activity: dict[str, Activity], now: float) -> None:
        """Replace what ``worker`` said before with its newest report."""
        self._reports[worker] = (now, activity)

    def get(self, instance_id: str) -> Activity | None:
        """Everything known about one instance, or None when it has seen no traffic."""
        now = time.time()
        parts = [
            seen[instance_id]
            for at, seen in self._reports.values()
            if now - at < REPORT_TTL and instance_id in seen
        ]
        if self.local is not None:
            local = self.local().get(instance_id)
            if local is not None:
                parts.append(local)
        return merge(parts) if parts else None


def record_last_use(session: Session, activity: dict[str, Activity]) -> int:
    """Move ``last_activity_at`` of each instance up to its last request; how many were sent.

    A plain UPDATE that never moves the time back: no row version is read or
    bumped, so it neither waits for nor undoes a state change made meanwhile.
    """
    rows = [
        {"iid": instance_id, "at": datetime.fromtimestamp(seen.last_request, UTC)}
        for instance_id, seen in activity.items()
        if seen.last_request > 0
    ]
    if rows:
        table = cast("Table", Instance.__table__)
        column = table.c.last_activity_at
        statement = (
            table.update()
            .where(table.c.id == bindparam("iid"), or_(column.is_(None), column < bindparam("at")))
            .values(last_activity_at=bindparam("at"))
        )
        session.connection().execute(statement, rows)
    return len(rows)
