"""A portal start hands every unfinished instance back to its site, and none stops it starting.

Seen in CI: a portal that went down while a start was under way left an
instance ``starting`` with no saved state; the next portal's restore asked the
backend about it, the backend could not read the empty state, and the portal
did not start at all. Such an instance fails, and what its start had spawned
is stopped by its instance id.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from typing import Any

from helpers import recorded_instance, serving
from labgate.db.models import Instance, InstanceEvent, utcnow


async def state_and_message(app: Any, instance_id: str) -> tuple[str, str]:
    def read(session: Any) -> tuple[str, str]:
        instance = session.get(Instance, instance_id)
        last = (
            session.query(InstanceEvent)
            .filter(InstanceEvent.instance_id == instance_id, InstanceEvent.kind == "state")
            .order_by(InstanceEvent.id.desc())
            .first()
        )
        return instance.state.value, last.message if last is not None else ""

    return await app.state.portal.run_db(read)


async def test_a_start_cut_off_or_an_unreadable_state_does_not_stop_the_portal(settings):
    async with serving(settings) as first:
        cut_off = recorded_instance(first, "starting", backend_state={}, started_at=utcnow())
        garbled = recorded_instance(
            first,
            "running",
            backend_state={"nonsense": 1},
            endpoint="http://127.0.0.1:9",
            started_at=utcnow(),
            ready_at=utcnow(),
        )
    # What the cut-off start had spawned runs on; only its marker says whose it is.
    spawned = subprocess.Popen(
        ["sleep", "60"], env={**os.environ, "LABGATE_INSTANCE_ID": cut_off}, start_new_session=True
    )
    async with serving(settings) as second:
        state, message = await state_and_message(second, cut_off)
        assert state == "failed"
        assert "portal restarted before the instance had started" in message
        async with asyncio.timeout(20):  # and nothing of it is left running
            while spawned.poll() is None:
                await asyncio.sleep(0.05)
        for _ in range(100):  # the adoption's report comes from the site, a moment later
            state, message = await state_and_message(second, garbled)
            if state != "running":
                break
            await asyncio.sleep(0.05)
        assert state == "lost"
        assert "saved state is unreadable" in message


async def test_restore_in_small_batches_settles_each_instance_as_in_one(settings, monkeypatch):
    """The list is read light and the instances going back to a site whole, a batch at a time."""
    from labgate.db.models import Site
    from labgate.scheduler import instances as manager_module

    monkeypatch.setattr(manager_module, "RESTORE_BATCH", 2)
    async with serving(settings) as first:
        cut_off = recorded_instance(first, "starting", backend_state={}, started_at=utcnow())
        queued_away = recorded_instance(first, "queued")
        running_away = recorded_instance(
            first, "running", backend_state={"pid": 1}, endpoint="http://127.0.0.1:9"
        )
        garbled = recorded_instance(
            first,
            "running",
            backend_state={"nonsense": 1},
            endpoint="http://127.0.0.1:9",
            started_at=utcnow(),
            ready_at=utcnow(),
        )

        def to_a_site_no_longer_configured(session: Any) -> None:
            gone = Site(name="gone", backend="process")
            session.add(gone)
            session.flush()
            for instance_id in (queued_away, running_away):
                session.get(Instance, instance_id).site_id = gone.id

        await first.state.portal.run_db(to_a_site_no_longer_configured)
    async with serving(settings) as second:
        assert (await state_and_message(second, cut_off))[0] == "failed"
        assert (await state_and_message(second, queued_away))[0] == "failed"
        assert await state_and_message(second, running_away) == (
            "lost",
            "site gone is not configured",
        )
        for _ in range(100):  # the adoption's report comes from the site, a moment later
            state, _message = await state_and_message(second, garbled)
            if state != "running":
                break
            await asyncio.sleep(0.05)
        assert state == "lost"
