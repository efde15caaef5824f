"""Usage API, CSV export and the admin usage page."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event, select

from helpers import ADMIN_PASSWORD
from labgate.db.models import UsageRecord, User


async def seed(app: Any) -> None:
    """Two users' finished instances, yesterday (so within any month-or-longer range)."""

    def add(session: Any) -> None:
        ids = {u.name: u.id for u in session.scalars(select(User))}
        start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
        for n, (user, group, tool, cpu, hours) in enumerate(
            [
                ("alice", "lab", "demo", 2.0, 1),
                ("alice", "lab", "jupyterlab", 1.0, 2),
                ("bob", "", "demo", 0.5, 2),
            ]
        ):
            session.add(
                UsageRecord(
                    instance_id=f"seed{n}",
                    user_id=ids[user],
                    user_name=user,
                    group_name=group,
                    tool=tool,
                    site="local",
                    cpu=cpu,
                    memory=1024**3,
                    started_at=start,
                    stopped_at=start + timedelta(hours=hours),
                    reason="stopped",
                )
            )

    await app.state.portal.run_db(add)


async def test_usage_by_user_tool_and_period(app, client, make_user, admin_headers):
    alice = await make_user("alice")
    await make_user("bob")
    await seed(app)
    since = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    report = (
        await client.get(
            "/api/v1/usage",
            params={"by": ["user", "tool"], "period": "all", "since": since},
            headers=admin_headers,
        )
    ).json()
    rows = {(r["user"], r["tool"]): r for r in report["rows"]}
    assert rows[("alice", "demo")]["core_hours"] == 2.0
    assert rows[("alice", "jupyterlab")]["hours"] == 2.0
    assert rows[("bob", "demo")]["core_hours"] == 1.0
    assert report["total"]["instances"] == 3 and report["total"]["core_hours"] == 5.0

    by_group = (
        await client.get(
            "/api/v1/usage", params={"by": "group", "since": since}, headers=admin_headers
        )
    ).json()
    assert {r["group"]: r["core_hours"] for r in by_group["rows"]} == {"lab": 4.0, "": 1.0}

    # A user sees only their own, whatever they ask for.
    own = await client.get("/api/v1/usage", params={"by": "user", "since": since}, headers=alice)
    assert [r["user"] for r in own.json()["rows"]] == ["alice"]
    other = await client.get("/api/v1/usage", params={"user": "bob"}, headers=alice)
    assert other.status_code == 403

    csv = await client.get(
        "/api/v1/usage",
        params={"by": "user", "period": "all", "since": since, "format": "csv"},
        headers=admin_headers,
    )
    assert csv.headers["content-type"].startswith("text/csv")
    lines = csv.text.splitlines()
    assert lines[0] == "period,user,instances,hours,core_hours,memory_gib_hours"
    assert "all,alice,2,3.0,4.0,3.0" in lines and "all,bob,1,2.0,1.0,2.0" in lines

    records = await client.get(
        "/api/v1/usage/records",
        params={"since": since},
        headers={**admin_headers, "Accept": "text/csv"},
    )
    assert records.text.splitlines()[0].startswith("id,instance,user,group,tool,site")
    assert len(records.text.splitlines()) == 4
    bad = await client.get("/api/v1/usage", params={"by": "colour"}, headers=admin_headers)
    assert bad.status_code == 422


async def test_admin_usage_page(app, client, make_user):
    await make_user("alice")
    await make_user("bob")
    await seed(app)
    page = await client.get("/admin/usage", follow_redirects=False)
    assert page.status_code == 303  # sign in first
    login = await client.post(
        "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
    )
    assert login.status_code == 200
    page = await client.get("/admin/usage", params={"by": "tool", "period": "all"})
    assert page.status_code == 200
    assert "Admin: usage" in page.text and "jupyterlab" in page.text
    assert "Download CSV" in page.text and "format=csv" in page.text
    # Days out of range are ignored, not overflowed.
    for until in ("9999-12-31", "0001-01-01", "2026-13-40"):
        page = await client.get("/admin/usage", params={"period": "day", "until": until})
        assert page.status_code == 200, (until, page.text[:200])
    client.cookies.clear()


async def test_period_all_covers_everything_and_far_until_is_fine(app, client, admin_headers):
    def old(session: Any) -> None:
        admin = session.scalar(select(User).where(User.name == "admin"))
        start = datetime.now(UTC) - timedelta(days=400)
        session.add(
            UsageRecord(
                instance_id="ancient",
                user_id=admin.id,
                user_name="admin",
                tool="demo",
                cpu=1.0,
                memory=0,
                started_at=start,
                stopped_at=start + timedelta(hours=3),
                reason="stopped",
            )
        )

    await app.state.portal.run_db(old)
    report = await client.get("/api/v1/usage", params={"period": "all"}, headers=admin_headers)
    assert report.status_code == 200 and report.json()["total"]["core_hours"] == 3.0
    this_month = await client.get("/api/v1/usage", headers=admin_headers)
    assert this_month.json()["total"]["core_hours"] == 0.0
    far = await client.get(
        "/api/v1/usage",
        params={"period": "year", "since": "2000-01-01T00:00:00Z", "until": "9999-12-31T00:00:00Z"},
        headers=admin_headers,
    )
    assert far.status_code == 200 and far.json()["total"]["core_hours"] == 3.0, far.text


async def test_records_limit_keeps_the_oldest_in_the_query(app, client, make_user, admin_headers):
    """``limit`` keeps the oldest records (the order the endpoint answers in), in the SQL."""
    await make_user("alice")
    await make_user("bob")
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=10)
    # Inserted out of order; "r2a" and "r2b" start together (the id, in insert order, decides).
    starts = {"r3": 3, "r0": 0, "r2a": 2, "r4": 4, "r1": 1, "r2b": 2}

    def add(session: Any) -> None:
        ids = {u.name: u.id for u in session.scalars(select(User))}
        for name, hours in starts.items():
            user = "bob" if name == "r1" else "alice"
            session.add(
                UsageRecord(
                    instance_id=name,
                    user_id=ids[user],
                    user_name=user,
                    tool="demo",
                    cpu=1.0,
                    memory=0,
                    started_at=base + timedelta(hours=hours),
                    stopped_at=base + timedelta(hours=hours, minutes=30),
                    reason="stopped",
                )
            )

    await app.state.portal.run_db(add)
    since = (base - timedelta(days=1)).isoformat()

    async def records(**params: Any) -> list[str]:
        answer = await client.get(
            "/api/v1/usage/records", params={"since": since, **params}, headers=admin_headers
        )
        assert answer.status_code == 200, answer.text
        return [r["instance"] for r in answer.json()]

    everything = await records()
    assert everything == ["r0", "r1", "r2a", "r2b", "r3", "r4"]
    # The first of the same order, whatever the limit; the limit counts after the filters.
    for limit in (1, 2, 3, 6, 100):
        assert await records(limit=limit) == everything[:limit], limit
    assert await records(limit=2, user="alice") == [i for i in everything if i != "r1"][:2]
    csv = await client.get(
        "/api/v1/usage/records",
        params={"since": since, "limit": 3, "format": "csv"},
        headers=admin_headers,
    )
    assert [line.split(",")[1] for line in csv.text.splitlines()[1:]] == everything[:3]
    for bad in (0, -1, 100001):
        answer = await client.get(
            "/api/v1/usage/records", params={"limit": bad}, headers=admin_headers
        )
        assert answer.status_code == 422, bad

    # The database does the limiting: the records' SELECT carries a LIMIT.
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM usage_records" in statement:
            statements.append(statement)

    engine = app.state.portal.db.engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        assert await records(limit=2) == everything[:2]
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert statements and all("LIMIT" in s.upper() for s in statements), statements


async def test_admin_usage_page_starts_at_the_current_month(app, client):
    login = await client.post(
        "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
    )
    assert login.status_code == 200
    page = await client.get("/admin/usage")
    assert page.status_code == 200
    first = datetime.now(UTC).strftime("%Y-%m-01")
    assert f'name="since" type="date" value="{first}"' in page.text
    client.cookies.clear()


async def test_a_new_account_named_like_a_deleted_user_sees_none_of_their_usage(
    app, client, make_user, admin_headers
):
    """A plain user's usage is pinned by user id: names are given out again, ids never.

    The deleted bob's records keep his name (admins still find them, by name or
    in full) but their user id becomes NULL, which matches no account; the next
    account called ``bob`` sees only its own.
    """
    await make_user("alice")
    await make_user("bob")
    await seed(app)  # seed0, seed1 alice's; seed2 the first bob's
    deleted = await client.delete("/api/v1/users/bob", headers=admin_headers)
    assert deleted.status_code == 204, deleted.text
    new_bob = await make_user("bob")

    def own_record(session: Any) -> None:
        user = session.scalar(select(User).where(User.name == "bob"))
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
        session.add(
            UsageRecord(
                instance_id="newbob",
                user_id=user.id,
                user_name="bob",
                tool="demo",
                cpu=1.0,
                memory=0,
                started_at=start,
                stopped_at=start + timedelta(minutes=30),
                reason="stopped",
            )
        )

    await app.state.portal.run_db(own_record)
    orphaned = await app.state.portal.run_db(
        lambda s: s.scalar(select(UsageRecord.user_id).where(UsageRecord.instance_id == "seed2"))
    )
    assert orphaned is None  # the deleted user's records lose the id, keep the name

    since = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    for params in ({"since": since}, {"since": since, "user": "bob"}):
        records = await client.get("/api/v1/usage/records", params=params, headers=new_bob)
        assert records.status_code == 200, records.text
        assert [r["instance"] for r in records.json()] == ["newbob"], (params, records.text)
        csv = await client.get(
            "/api/v1/usage/records", params={**params, "format": "csv"}, headers=new_bob
        )
        assert [line.split(",")[1] for line in csv.text.splitlines()[1:]] == ["newbob"]
        report = await client.get(
            "/api/v1/usage", params={**params, "period": "all", "by": "user"}, headers=new_bob
        )
        assert report.status_code == 200, report.text
        assert report.json()["total"]["instances"] == 1, report.text
        assert report.json()["total"]["core_hours"] == 0.5, report.text

    # Admins still find the deleted bob's records, by name and in full.
    by_name = await client.get(
        "/api/v1/usage/records", params={"since": since, "user": "bob"}, headers=admin_headers
    )
    assert sorted(r["instance"] for r in by_name.json()) == ["newbob", "seed2"]
    everything = await client.get(
        "/api/v1/usage/records", params={"since": since}, headers=admin_headers
    )
    assert len(everything.json()) == 4
