"""What the routers saw per instance: merged from the in-process router and reports."""

from __future__ import annotations

import time
from collections.abc import Callable

from labgate.router import Activity, merge

#: Reports older than this come from router processes that went away.
REPORT_TTL = 300.0


class ActivityBoard:
    """Per-instance activity across every router that serves this portal."""

    def __init__(self) -> None:
        self.local: Callable[[], dict[str, Activity]] | None = None
        self._reports: dict[str, tuple[float, dict[str, Activity]]] = {}

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
