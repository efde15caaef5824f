"""The owners' access log: who the routers let into each instance, saved now and then.

Routers note, per instance, each user who passed the access check and the
time of their last request (:class:`labgate.wire.activity.Activity`
``users``). Every ``interval`` seconds what is new is stored as
``instance_visits`` rows (first and last time per user and instance), so the
log outlives router and portal restarts. Reading an instance's shares stores
what is new first, too (:func:`labgate.portal.api.shares.sharing_out`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from labgate.aio import cancel_and_wait
from labgate.portal.sharing import record_visits
from labgate.portal.state import Portal

log = logging.getLogger(__name__)

VISIT_INTERVAL = 60.0


class VisitLog:
    """Saves the routers' per-user activity to the database periodically."""

    def __init__(self, portal: Portal, interval: float = VISIT_INTERVAL) -> None:
        self.portal = portal
        self.interval = interval
        self._saved: dict[tuple[str, int], float] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Save every ``interval`` seconds until :meth:`close`."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def flush(self) -> int:
        """Store the visits not stored yet; how many."""
        new: dict[tuple[str, int], float] = {}
        for instance_id, activity in self.portal.activity.everything().items():
            for user_id, at in activity.users.items():
                if at > self._saved.get((instance_id, user_id), 0.0):
                    new[(instance_id, user_id)] = at
        if new:
            await self.portal.run_db(lambda s: record_visits(s, new))
            self._saved.update(new)
        return len(new)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception:  # keep logging visits after a passing database error
                log.exception("saving the instances' access log failed")

    async def close(self) -> None:
        """Save what is left and stop."""
        await cancel_and_wait(self._task)
        self._task = None
        with contextlib.suppress(Exception):
            await self.flush()
