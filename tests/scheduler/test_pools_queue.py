"""Warm pools and the start queue: a burst is served from the pool first, and the pool
refills behind the queued user launches, never ahead of them."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from helpers import needs_pool_sandbox, wait_for_pool, wait_for_state
from labgate.config import PoolConfig, SiteCapacity, SiteConfig
from labgate.db.models import Instance, InstanceEvent
from tools_fixtures import costly_tool

pytestmark = needs_pool_sandbox


@pytest.fixture
def settings(settings):
    (settings.tools_dir / "burst.toml").write_text(costly_tool("burst", 0.5))
    settings.sites = [SiteConfig(name="local", capacity=SiteCapacity(starts=1))]
    settings.pools = [PoolConfig(tool="burst", size=1)]
    settings.pool_check_interval = 0.2
    return settings


async def test_a_burst_takes_the_pool_first_and_the_pool_refills_after_the_queue(
    app, client, make_user, pools
):
    warm = await wait_for_pool(app, "burst")
    users = [await make_user(name) for name in ("ann", "ben", "cat", "dov")]
    responses = await asyncio.gather(
        *(client.post("/api/v1/instances", json={"tool": "burst"}, headers=u) for u in users)
    )
    bodies = [r.json() for r in responses]
    assert warm.id in [b["id"] for b in bodies]  # one of them got the warm instance
    assert sum(b["state"] == "queued" for b in bodies) >= 2, bodies
    for body, user in zip(bodies, users, strict=True):
        assert (await wait_for_state(client, user, body["id"], {"running"}))["state"] == "running"
    ids = [b["id"] for b in bodies]
    refilled = await wait_for_pool(app, "burst")
    assert refilled is not None and refilled.id != warm.id

    def timeline(session):
        user_events = session.execute(
            select(InstanceEvent.created_at, InstanceEvent.message).where(
                InstanceEvent.instance_id.in_(ids), InstanceEvent.state == "pending"
            )
        ).all()
        refills = session.scalars(
            select(Instance.created_at).where(
                Instance.pool.is_not(None), Instance.id.not_in([*ids, warm.id])
            )
        ).all()
        queued = session.scalars(
            select(InstanceEvent.created_at).where(
                InstanceEvent.instance_id.in_(ids), InstanceEvent.state == "queued"
            )
        ).all()
        left = [at for at, message in user_events if "left the start queue" in message]
        return min(queued), max(left), refills

    first_queued, last_left, refills = await app.state.portal.run_db(timeline)
    assert refills
    for created in refills:
        # No refill was admitted while user launches waited in the queue.
        assert not (first_queued <= created < last_left), (created, first_queued, last_left)
