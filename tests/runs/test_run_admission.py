"""Task placements are admitted as launches are: never both in the last of a limit.

A placement counts what its owner (and the group it charges) holds, then
takes some: it runs in the instance manager's admission (a thread lock and,
on PostgreSQL, an advisory transaction lock) and holds the owner's row and
its groups' rows until it commits, so a launch or another portal's placement
counts only after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import pytest
from sqlalchemy import select

from helpers import needs_postgres
from labgate.db.models import User
from labgate.errors import QuotaExceeded
from labgate.scheduler import quotas, runrows
from labgate.scheduler.runquota import Charge, RunQuota
from labgate.wire.launch import Resources
from labgate.wire.runs import parse_definition

ONE_TASK = """
name = "{name}"
[[stages]]
name = "only"
[[stages.tasks]]
name = "hog"
command = "sleep 30"
cpu = 0.5
memory_mib = 64
"""
#: Seconds a count waits for the other one (the first of two ordered ones waits it all).
WINDOW = 4.0


async def _submit(client: Any, headers: dict[str, str], definition: str) -> str:
    answer = await client.post(
        "/api/v1/runs", content=definition, headers={**headers, "Content-Type": "text/plain"}
    )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


async def _task_ran(client: Any, headers: dict[str, str], run_id: str) -> bool:
    """Whether the run's one task gets running within 5 s."""
    for _ in range(50):
        run = (await client.get(f"/api/v1/runs/{run_id}", headers=headers)).json()
        if run["stages"][0]["tasks"][0]["state"] == "running":
            return True
        await asyncio.sleep(0.1)
    return False


@pytest.mark.parametrize("scope", ["user", "group"])
async def test_a_launch_and_a_task_placement_never_both_take_the_last_slot(
    client, make_user, admin_headers, monkeypatch, scope
):
    """One user's task and launch (``user``), or two members' (``group``), for one place."""
    alice = await make_user("alice")
    launcher = alice
    if scope == "user":
        answer = await client.put(
            "/api/v1/users/alice/limits", json={"instances": 1}, headers=admin_headers
        )
        assert answer.status_code == 200, answer.text
        counted = "user_use"
    else:
        launcher = await make_user("bob")
        made = await client.post(
            "/api/v1/groups",
            json={"name": "lab", "limits": {"instances": 1}},
            headers=admin_headers,
        )
        assert made.status_code == 201, made.text
        for user in ("alice", "bob"):
            await client.put(f"/api/v1/groups/lab/members/{user}", headers=admin_headers)
        counted = "group_use"

    # Widen the window between counting and taking, as a busy portal would: each count
    # waits (up to WINDOW s) for the other one. Admissions that are ordered never meet here
    # (the second counts only after the first committed); unordered ones both count 0.
    barrier = threading.Barrier(2)
    real = getattr(quotas, counted)

    def slow_use(*args: Any, **kwargs: Any) -> Any:
        use = real(*args, **kwargs)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=WINDOW)
        return use

    monkeypatch.setattr(quotas, counted, slow_use)
    run_id, launched = await asyncio.gather(
        _submit(client, alice, ONE_TASK.format(name="race")),
        client.post("/api/v1/instances", json={"tool": "demo"}, headers=launcher),
    )
    monkeypatch.setattr(quotas, counted, real)
    try:
        task_ran = await _task_ran(client, alice, run_id)
        instance_admitted = launched.status_code == 202
        assert task_ran or instance_admitted  # one of them has the place
        assert not (task_ran and instance_admitted), (
            f"a running task and an instance at once in a {scope} limit of 1 instance"
        )
        if not instance_admitted:
            assert launched.status_code == 429 and launched.json()["scope"] == scope
    finally:
        await client.post(f"/api/v1/runs/{run_id}/cancel", headers=alice)


@pytest.mark.postgres
@needs_postgres
async def test_a_launch_into_a_group_waits_for_an_open_task_placement_into_it(
    app, client, make_user, admin_headers
):
    """Across portal processes: a placement holds its groups' rows until it commits."""
    await make_user("carol")
    await make_user("dan")
    made = await client.post(
        "/api/v1/groups", json={"name": "lab", "limits": {"instances": 1}}, headers=admin_headers
    )
    assert made.status_code == 201, made.text
    for user in ("carol", "dan"):
        await client.put(f"/api/v1/groups/lab/members/{user}", headers=admin_headers)
    db, defaults = app.state.portal.db, app.state.portal.instances.user_defaults()
    asked = Resources(cpu=0.5, memory=64 * 2**20)

    first = db.sessionmaker()
    try:
        # Carol's placement, not yet committed: it counted the group and charges it.
        carol = first.scalar(select(User).where(User.name == "carol"))
        held = parse_definition(ONE_TASK.format(name="held"))
        run = runrows.create_run(first, carol.id, held, set())
        first.flush()
        quota = RunQuota(run, defaults)
        task = run.stages[0].tasks[0]
        assert quota.admit(first, task, asked) == Charge("lab")

        def second() -> str:
            with db.sessionmaker() as session:
                dan = session.scalar(select(User).where(User.name == "dan"))
                try:
                    quotas.admit(session, defaults, dan, asked, "lab")
                except QuotaExceeded:
                    return "refused"
                return "admitted"

        dan = asyncio.create_task(asyncio.to_thread(second))
        await asyncio.sleep(0.5)
        assert not dan.done()  # waiting for the group's row
        quota.record(first, runrows.new_id(), "alpha", asked, Charge("lab"))
        first.commit()
    finally:
        first.close()
    assert await asyncio.wait_for(dan, 10) == "refused"
