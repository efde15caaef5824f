"""Wake-ups for event stream readers.

Events live in the database (the source of truth, replayed with
``Last-Event-ID``); this bus only tells waiting readers in this process that
something new was written, so they do not have to poll fast. Writes made by
another portal process on the same PostgreSQL database arrive as
notifications (labgate.portal.replicas calls :meth:`EventBus.notify` for
them); readers still poll slowly, which covers anything missed.

A reader takes :meth:`EventBus.version` *before* reading the database and
waits for it to move, so a notification between the read and the wait is
never missed.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict


class EventBus:
    """Per-instance change counters with wake-up signals."""

    def __init__(self) -> None:
        self._versions: defaultdict[str, int] = defaultdict(int)
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)

    def version(self, instance_id: str) -> int:
        """How many changes of ``instance_id`` this process has seen."""
        return self._versions.get(instance_id, 0)

    def notify(self, instance_id: str) -> None:
        """Record a change of ``instance_id`` and wake its readers."""
        self._versions[instance_id] += 1
        for waiter in self._waiters.get(instance_id, ()):
            waiter.set()

    def notify_all(self) -> None:
        """Wake every waiting reader (notifications may have been missed: they read again)."""
        for instance_id in list(self._waiters):
            self.notify(instance_id)

    async def wait(self, instance_id: str, seen: int, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until the version passes ``seen`` or ``timeout`` passes; True when it moved."""
        if self.version(instance_id) != seen:
            return True
        waiter = asyncio.Event()
        self._waiters[instance_id].add(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter.wait()
            return True
        except TimeoutError:
            return False
        finally:
            waiters = self._waiters.get(instance_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[instance_id]
