"""Warm-pool instances' numbers: taken from a database counter, never given twice.

The process backend runs a pool instance as ``instance_uid_base +
POOL_UID_OFFSET + its number`` (tests/backends/test_pool_uids.py holds what
that keeps apart). Here: the counter hands out each number once, across
database handles (portal replicas) and after the rows that held them are
gone; the launch spec carries the number; and a pool instance without one
(started by an older labgate, as the ``_pool`` account's uid) is never handed
to a user and is stopped when the pools are tidied.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import delete, select

from helpers import needs_pool_sandbox, wait_for_pool
from labgate.backends.identity import POOL_UID_OFFSET, pool_identity_number
from labgate.config import PoolConfig
from labgate.db import counters
from labgate.db.models import Instance, InstanceState, User
from labgate.db.session import Database
from labgate.scheduler.pools import POOL_USER


def test_the_counter_gives_each_number_once_across_replicas(database_url: str) -> None:
    """Four "replicas" (database handles), each taking numbers at once: no number twice."""
    handles = [Database(database_url) for _ in range(4)]
    taken: list[list[int]] = [[] for _ in handles]

    def take_many(db: Database, into: list[int]) -> None:
        for _ in range(25):
            into.append(db.transact(lambda s: counters.take(s, counters.POOL_UID)))

    try:
        handles[0].migrate()
        threads = [
            threading.Thread(target=take_many, args=(db, into))
            for db, into in zip(handles, taken, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        numbers = [n for into in taken for n in into]
        assert sorted(numbers) == list(range(1, 101))
        for into in taken:  # each replica saw its own numbers go up
            assert into == sorted(into)
    finally:
        for db in handles:
            db.dispose()


def test_a_number_is_not_given_again_once_its_instance_is_gone(database_url: str) -> None:
    db = Database(database_url)
    try:
        db.migrate()

        def record(session: Any) -> int:
            owner = User(name=POOL_USER, password_hash="!", disabled=True)
            session.add(owner)
            session.flush()
            number = counters.take(session, counters.POOL_UID)
            session.add(
                Instance(
                    id="p1",
                    owner_id=owner.id,
                    tool="demo",
                    state=InstanceState.stopped,
                    pool="demo@local",
                    pool_uid=number,
                )
            )
            return number

        first = db.transact(record)
        db.transact(lambda s: s.execute(delete(Instance)))
        # A restart reads the counter, not the rows: the next number is a new one.
        db.dispose()
        db = Database(database_url)
        assert db.transact(lambda s: counters.take(s, counters.POOL_UID)) == first + 1
    finally:
        db.dispose()


def test_pool_numbers_are_their_own_uid_range() -> None:
    assert pool_identity_number(1) == POOL_UID_OFFSET + 1
    # Below the offset: user ids; above: pool instances. Within 32 bits at the largest base.
    assert 4_000_000_000 + POOL_UID_OFFSET * 2 < 2**32 - 2


# --- with the pool manager (root and bubblewrap: pools are kept) -----------------------


@pytest.fixture
def settings(settings):
    settings.pools = [PoolConfig(tool="demo", size=1)]
    settings.pool_check_interval = 0.2
    return settings


@needs_pool_sandbox
async def test_each_pool_instance_has_a_number_and_its_spec_carries_it(
    app, make_user, settings
) -> None:
    await make_user("alice")
    warm = await wait_for_pool(app, "demo")
    manager, pools = app.state.portal.instances, app.state.pools
    try:

        def look(session: Any) -> tuple[Any, Any]:
            instance = session.get(Instance, warm.id)
            return instance.pool_uid, manager.spec_for(instance)

        number, spec = await app.state.portal.run_db(look)
        assert number is not None
        assert spec.owner == POOL_USER and spec.owner_id == POOL_UID_OFFSET + number
        assert warm.backend_state["own_uid"] is True
        assert warm.backend_state["uid"] == settings.instance_uid_base + spec.owner_id
    finally:
        await pools.close()


@needs_pool_sandbox
async def test_a_pool_instance_without_a_number_is_never_claimed_and_is_tidied(
    app, client, make_user
) -> None:
    """One of an older labgate: it runs as the _pool account's uid, which all such share."""
    alice = await make_user("alice")
    pools = app.state.pools
    await wait_for_pool(app, "demo")
    await pools.close()  # no refills meanwhile

    def unnumber(session: Any) -> list[str]:
        rows = list(session.scalars(select(Instance).where(Instance.pool.is_not(None))))
        for row in rows:
            row.pool_uid = None
        return [row.id for row in rows]

    ids = await app.state.portal.run_db(unnumber)
    assert ids
    launched = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=alice)
    assert launched.status_code == 202, launched.text
    body = launched.json()
    assert body["id"] not in ids and body["state"] in ("pending", "queued"), body  # cold
    leftovers = await app.state.portal.run_db(pools._leftovers)
    assert set(ids) <= set(leftovers)
