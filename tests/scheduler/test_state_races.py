"""Concurrent changes to one instance: none is lost to another made from an older read.

Seen in CI: ``labgate stop`` on an instance that was just launched left it
``starting`` for good. The stop moved it from ``pending`` to ``stopping`` while
the site's "starting" report, read as ``pending`` a moment before, was being
applied; the report's write then put ``starting`` back over the stop. Every
update of an instance now checks the row's version, and a transaction that
lost the race runs again on what is there now.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from helpers import recorded_instance
from labgate.db.models import Instance, InstanceEvent, InstanceState
from labgate.wire.site import Report


async def test_a_report_read_before_a_stop_does_not_undo_the_stop(app: Any) -> None:
    manager = app.state.portal.instances
    instance_id = recorded_instance(app)
    runs = 0

    def report_racing_a_stop(session: Any) -> Any:
        nonlocal runs
        runs += 1
        read = session.get(Instance, instance_id)  # the report reads the instance: pending
        if runs == 1:
            # The user's stop commits in between, from another transaction.
            manager.db.transact(
                lambda other: manager._begin_stop(other, instance_id, "stopped", "stop requested")
            )
        applied = manager.apply_in(session, Report(instance_id, "starting", message="starting"))
        del read  # held until here: the session's identity map keeps only weak references
        return applied

    await manager.run_db(report_racing_a_stop)

    def states(session: Any) -> tuple[InstanceState, list[str]]:
        instance = session.get(Instance, instance_id)
        events = session.scalars(
            select(InstanceEvent.state)
            .where(InstanceEvent.instance_id == instance_id, InstanceEvent.kind == "state")
            .order_by(InstanceEvent.id)
        )
        return instance.state, [state.value for state in events]

    state, transitions = await manager.run_db(states)
    assert runs == 2  # the report lost the race and was applied again, to a stopping instance
    assert state == InstanceState.stopping
    assert transitions == ["stopping"]
    # The stop was recorded but never sent: the site's report ends the record instead.
    await manager.apply(Report(instance_id, "stopped", message="stopped"))


async def test_updates_from_one_read_each_still_all_land(app: Any) -> None:
    """Two transactions that each change a different field of the same row both keep theirs."""
    manager = app.state.portal.instances
    instance_id = recorded_instance(app)
    runs = 0

    def set_reason(session: Any) -> None:
        nonlocal runs
        runs += 1
        instance = session.get(Instance, instance_id)
        if runs == 1:

            def set_endpoint(other: Any) -> None:
                other.get(Instance, instance_id).endpoint = "http://127.0.0.1:9"

            manager.db.transact(set_endpoint)
        instance.reason = "waiting for a node"

    await manager.run_db(set_reason)
    instance = await manager.run_db(lambda s: s.get(Instance, instance_id))
    assert runs == 2
    assert (instance.reason, instance.endpoint) == ("waiting for a node", "http://127.0.0.1:9")
    assert instance.version == 3
