"""Usage accounting: records opened and closed with instances, and reports over them."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select

from helpers import wait_for_state
from labgate.db.models import UsageRecord
from labgate.scheduler.accounting import UsageQuery, aggregate, split, to_csv


def record(**values: object) -> UsageRecord:
    defaults: dict[str, object] = {
        "instance_id": "i1",
        "user_name": "alice",
        "group_name": "",
        "tool": "demo",
        "site": "local",
        "cpu": 2.0,
        "memory": 1024**3,
        "reason": "",
    }
    return UsageRecord(**{**defaults, **values})


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_split_cuts_at_period_boundaries():
    pieces = list(split(at("2026-10-31T22:00"), at("2026-11-01T03:00"), "month"))
    assert [(label, b - a) for label, a, b in pieces] == [
        ("2026-10", at("2026-11-01T00:00") - at("2026-10-31T22:00")),
        ("2026-11", at("2026-11-01T03:00") - at("2026-11-01T00:00")),
    ]
    weeks = [label for label, _, _ in split(at("2026-11-22T00:00"), at("2026-11-24T00:00"), "week")]
    assert weeks == ["2026-W47", "2026-W48"]
    assert [p[0] for p in split(at("2026-12-31T23:00"), at("2027-01-01T01:00"), "year")] == [
        "2026",
        "2027",
    ]


def test_aggregate_by_user_and_tool_per_day():
    records = [
        record(started_at=at("2026-11-20T22:00"), stopped_at=at("2026-11-21T02:00")),
        record(
            instance_id="i2",
            user_name="bob",
            tool="jupyterlab",
            cpu=1.0,
            started_at=at("2026-11-21T10:00"),
            stopped_at=None,
        ),
    ]
    query = UsageQuery(
        since=at("2026-11-20T00:00"),
        until=at("2026-11-22T00:00"),
        by=("user", "tool"),
        period="day",
    )
    rows = [r.as_json() for r in aggregate(records, query, now=at("2026-11-21T12:00"))]
    assert rows == [
        {
            "period": "2026-11-20",
            "user": "alice",
            "tool": "demo",
            "instances": 1,
            "hours": 2.0,
            "core_hours": 4.0,
            "memory_gib_hours": 2.0,
        },
        {
            "period": "2026-11-21",
            "user": "alice",
            "tool": "demo",
            "instances": 1,
            "hours": 2.0,
            "core_hours": 4.0,
            "memory_gib_hours": 2.0,
        },
        {
            "period": "2026-11-21",
            "user": "bob",
            "tool": "jupyterlab",
            "instances": 1,
            "hours": 2.0,  # still running: counted until now
            "core_hours": 2.0,
            "memory_gib_hours": 2.0,
        },
    ]
    text = to_csv(rows, ["period", "user", "core_hours"])
    assert text.splitlines() == [
        "period,user,core_hours",
        "2026-11-20,alice,4.0",
        "2026-11-21,alice,4.0",
        "2026-11-21,bob,2.0",
    ]


async def test_records_follow_launch_stop_and_failure(app, client, make_user):
    alice = await make_user("alice")
    ok = (await client.post("/api/v1/instances", json={"tool": "demo"}, headers=alice)).json()
    bad = (await client.post("/api/v1/instances", json={"tool": "crashing"}, headers=alice)).json()
    await wait_for_state(client, alice, ok["id"], {"running"})
    await client.delete(f"/api/v1/instances/{ok['id']}", headers=alice)
    await wait_for_state(client, alice, ok["id"], {"stopped"})
    await wait_for_state(client, alice, bad["id"], {"failed"})
    rows = await app.state.portal.run_db(
        lambda s: {
            r.instance_id: r
            for r in s.scalars(select(UsageRecord).where(UsageRecord.user_name == "alice"))
        }
    )
    assert rows[ok["id"]].reason == "stopped" and rows[ok["id"]].stopped_at is not None
    assert rows[ok["id"]].cpu == 0.5 and rows[ok["id"]].site == "local"
    assert rows[bad["id"]].reason == "failed" and rows[bad["id"]].stopped_at is not None
