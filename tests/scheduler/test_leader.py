"""Leader election on a real PostgreSQL: one replica leads, hands over, and an old one is fenced."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text

from labgate.db.session import Database
from labgate.errors import NotLeader
from labgate.scheduler.leader import LeaseElection, SoleLeader

pytestmark = pytest.mark.skipif(
    not os.environ.get("LABGATE_TEST_DB_URL"),
    reason="leader election needs PostgreSQL: set LABGATE_TEST_DB_URL (docs/development.md)",
)

LEASE = 1.0


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    yield database
    database.dispose()


async def until(condition: Any, timeout: float) -> float:
    """Seconds until ``condition()`` holds (fails after ``timeout``)."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - began


async def test_one_leads_and_the_other_takes_over_within_the_lease(db: Database) -> None:
    a, b = LeaseElection(db, "a", LEASE), LeaseElection(db, "b", LEASE)
    elected: list[str] = []
    b.on_elected(lambda: elected.append("b"))
    await a.start()
    await b.start()
    try:
        await asyncio.sleep(LEASE * 1.5)  # several renewals: a keeps it, b waits
        assert (a.leading, b.leading) == (True, False)
        assert a.term == 1 and b.term == 0 and elected == []
        a.renewing = False  # a froze (kill -STOP): it renews no more
        stopped = time.monotonic()
        await until(lambda: not a.leading, LEASE)
        await until(lambda: b.leading, LEASE * 2)
        assert time.monotonic() - stopped < LEASE + LEASE / 3 + 0.5
        assert b.term == 2 and elected == ["b"]
        assert not a.leading  # never two at once: a stopped believing before b began
        holder = await asyncio.to_thread(db.transact, b.holder)
        assert holder == "b"
    finally:
        await a.close()
        await b.close()


async def test_a_paused_leader_that_lost_its_lease_is_fenced_in_the_transaction(
    db: Database,
) -> None:
    a, b = LeaseElection(db, "a", LEASE), LeaseElection(db, "b", LEASE)
    await a.start()
    a.renewing = False
    await until(lambda: not a.leading, LEASE)
    await b.start()
    await until(lambda: b.leading, LEASE * 2)
    # A paused process wakes up inside its loop believing it still leads (the
    # moment between asking and acting): the fence in the action's transaction says no.
    a._believed_until = time.monotonic() + 60
    assert a.leading
    with pytest.raises(NotLeader):
        await asyncio.to_thread(db.transact, a.fence)
    await asyncio.to_thread(db.transact, b.fence)  # the real leader passes
    await a.close()
    await b.close()


async def test_the_fence_holds_a_takeover_until_the_action_commits(db: Database) -> None:
    a, b = LeaseElection(db, "a", LEASE), LeaseElection(db, "b", LEASE)
    await a.start()
    a.renewing = False
    with db.session() as session:
        a.fence(session)  # the action's transaction holds the lease row FOR SHARE ...
        await asyncio.sleep(LEASE * 1.2)  # ... past the lease's expiry
        taking = asyncio.create_task(b.attempt())
        await asyncio.sleep(0.3)
        assert not taking.done()  # b waits for a's action to commit
    assert await taking  # then takes over, in the next term
    assert b.term == 2
    await a.close()
    await b.close()


async def test_a_replica_that_stops_hands_over_at_once(db: Database) -> None:
    a, b = LeaseElection(db, "a", 30.0), LeaseElection(db, "b", 30.0)
    await a.start()
    await b.start()
    assert a.leading and not b.leading
    await a.close()
    assert await b.attempt()  # no 30 s wait for the lease to run out
    await b.close()
    with db.engine.connect() as conn:
        term = conn.execute(text("SELECT term FROM leader_leases")).scalar_one()
    assert term == 2


async def test_a_lone_process_always_leads_without_a_lease(db: Database) -> None:
    sole = SoleLeader("serve")
    await sole.start()
    assert sole.leading and sole.status().leading
    await asyncio.to_thread(db.transact, sole.fence)
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM leader_leases")).scalar_one() == 0
