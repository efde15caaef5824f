"""Sharing an instance: users and groups, use and view, links; the router's access list."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import websockets
from websockets.exceptions import ConnectionClosed

from helpers import wait_for_state


async def running_demo(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    launched = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=headers)
    assert launched.status_code == 202, launched.text
    iid = str(launched.json()["id"])
    await wait_for_state(client, headers, iid, {"running"})
    return iid


async def through_router(router_url: str, iid: str, headers: dict[str, str]) -> int:
    async with httpx.AsyncClient(timeout=10) as browser:
        response = await browser.get(f"{router_url}/i/{iid}/api/info", headers=headers)
    return response.status_code


async def test_use_reaches_the_tool_view_only_sees_it_and_revoking_cuts_off(
    client: httpx.AsyncClient, make_user: Any, router_url: str
) -> None:
    ada, bo, cy = await make_user("ada"), await make_user("bo"), await make_user("cy")
    iid = await running_demo(client, ada)
    assert await through_router(router_url, iid, bo) == 404
    shared = await client.post(
        f"/api/v1/instances/{iid}/shares", json={"user": "bo", "access": "use"}, headers=ada
    )
    assert shared.status_code == 201, shared.text
    viewed = await client.post(
        f"/api/v1/instances/{iid}/shares", json={"user": "cy", "access": "view"}, headers=ada
    )
    assert viewed.status_code == 201
    assert await through_router(router_url, iid, bo) == 200
    assert await through_router(router_url, iid, cy) == 404  # view does not reach the tool
    # Both see it, its owner, and that it is shared; neither can stop or reshare it.
    for who, access in ((bo, "use"), (cy, "view")):
        listed = (await client.get("/api/v1/instances", headers=who)).json()
        assert [(i["id"], i["owner"], i["shared"], i["access"]) for i in listed] == [
            (iid, "ada", True, access)
        ]
        assert (await client.get(f"/api/v1/instances/{iid}/logs", headers=who)).status_code == 200
        assert (await client.delete(f"/api/v1/instances/{iid}", headers=who)).status_code == 404
        again = await client.post(
            f"/api/v1/instances/{iid}/shares", json={"user": "cy", "access": "use"}, headers=who
        )
        assert again.status_code == 403
    # Revoked: the next request is refused.
    await client.delete(f"/api/v1/instances/{iid}/shares/{shared.json()['id']}", headers=ada)
    assert await through_router(router_url, iid, bo) == 404
    assert (await client.get(f"/api/v1/instances/{iid}", headers=bo)).status_code == 404


async def test_revoking_closes_open_websockets_within_a_second(
    client: httpx.AsyncClient, make_user: Any, router_url: str
) -> None:
    ada, bo = await make_user("ada"), await make_user("bo")
    iid = await running_demo(client, ada)
    shared = await client.post(
        f"/api/v1/instances/{iid}/shares", json={"user": "bo", "access": "use"}, headers=ada
    )
    ws_url = router_url.replace("http://", "ws://") + f"/i/{iid}/ws"
    async with (
        websockets.connect(ws_url, additional_headers=bo) as bo_ws,
        websockets.connect(ws_url, additional_headers=ada) as ada_ws,
    ):
        await bo_ws.send("hello")
        assert await bo_ws.recv() == "hello"
        started = time.monotonic()
        await client.delete(f"/api/v1/instances/{iid}/shares/{shared.json()['id']}", headers=ada)
        try:
            await asyncio.wait_for(bo_ws.recv(), timeout=1.0)
            raise AssertionError("the WebSocket stayed open after the share was revoked")
        except ConnectionClosed:
            pass
        assert time.monotonic() - started < 1.0
        # The owner's own WebSocket is untouched.
        await ada_ws.send("still here")
        assert await ada_ws.recv() == "still here"


async def test_group_shares_follow_membership(
    client: httpx.AsyncClient, make_user: Any, admin_headers: dict[str, str], router_url: str
) -> None:
    ada, bo = await make_user("ada"), await make_user("bo")
    created = await client.post("/api/v1/groups", json={"name": "lab"}, headers=admin_headers)
    assert created.status_code == 201, created.text
    iid = await running_demo(client, ada)
    shared = await client.post(
        f"/api/v1/instances/{iid}/shares", json={"group": "lab", "access": "use"}, headers=ada
    )
    assert shared.status_code == 201, shared.text
    assert await through_router(router_url, iid, bo) == 404
    await client.put("/api/v1/groups/lab/members/bo", headers=admin_headers)
    assert await through_router(router_url, iid, bo) == 200
    await client.delete("/api/v1/groups/lab/members/bo", headers=admin_headers)
    assert await through_router(router_url, iid, bo) == 404


async def test_a_share_link_gives_use_until_revoked(
    client: httpx.AsyncClient, make_user: Any, router_url: str
) -> None:
    ada, bo = await make_user("ada"), await make_user("bo")
    iid = await running_demo(client, ada)
    link = await client.post(f"/api/v1/instances/{iid}/links", json={}, headers=ada)
    assert link.status_code == 201, link.text
    body = link.json()
    assert body["url"].endswith(f"/share/{body['token']}") and body["token"].startswith("lgl_")
    # A mistyped link gives nothing.
    bad = await client.post("/api/v1/shares/redeem", json={"token": "lgl_nope-nope"}, headers=bo)
    assert bad.status_code == 404
    taken = await client.post("/api/v1/shares/redeem", json={"token": body["token"]}, headers=bo)
    assert taken.status_code == 200 and taken.json()["instance"] == iid
    assert await through_router(router_url, iid, bo) == 200
    listed = (await client.get(f"/api/v1/instances/{iid}/shares", headers=ada)).json()
    assert listed["links"][0]["used_by"] == ["bo"]
    assert (await client.get(f"/api/v1/instances/{iid}/shares", headers=bo)).status_code == 403
    await client.delete(f"/api/v1/instances/{iid}/links/{body['id']}", headers=ada)
    assert await through_router(router_url, iid, bo) == 404
    again = await client.post("/api/v1/shares/redeem", json={"token": body["token"]}, headers=bo)
    assert again.status_code == 404


async def test_an_expired_share_link_gives_nothing(
    app: Any, client: httpx.AsyncClient, make_user: Any
) -> None:
    from datetime import timedelta

    from labgate.db.models import ShareLink, utcnow

    ada, bo = await make_user("ada"), await make_user("bo")
    iid = await running_demo(client, ada)
    link = (await client.post(f"/api/v1/instances/{iid}/links", json={}, headers=ada)).json()

    def expire(session: Any) -> None:
        row = session.get(ShareLink, link["id"])
        row.expires_at = utcnow() - timedelta(seconds=1)

    await app.state.portal.run_db(expire)
    taken = await client.post("/api/v1/shares/redeem", json={"token": link["token"]}, headers=bo)
    assert taken.status_code == 404


async def test_the_owner_sees_who_used_it_and_when(
    app: Any, client: httpx.AsyncClient, make_user: Any, router_url: str
) -> None:
    from labgate.db.models import InstanceVisit

    ada, bo = await make_user("ada"), await make_user("bo")
    iid = await running_demo(client, ada)
    await client.post(
        f"/api/v1/instances/{iid}/shares", json={"user": "bo", "access": "use"}, headers=ada
    )
    before = time.time()
    assert await through_router(router_url, iid, bo) == 200
    assert await through_router(router_url, iid, ada) == 200
    # Saved in the background, so the log outlives restarts (here: at once).
    assert await app.state.visits.flush() == 2
    rows = await app.state.portal.run_db(
        lambda s: s.query(InstanceVisit).filter_by(instance_id=iid).count()
    )
    assert rows == 2
    log = (await client.get(f"/api/v1/instances/{iid}/shares", headers=ada)).json()["visits"]
    assert sorted(v["user"] for v in log) == ["ada", "bo"]
    from datetime import datetime

    for visit in log:
        assert datetime.fromisoformat(visit["last_at"]).timestamp() >= before - 1


async def test_opening_a_share_link_shares_nothing_until_confirmed(
    app: Any, client: httpx.AsyncClient, make_user: Any
) -> None:
    """A page of another site can send a visitor to a link, not make them take it up."""
    from helpers import PASSWORD

    ada = await make_user("ada")
    await make_user("bo")
    iid = await running_demo(client, ada)
    link = (await client.post(f"/api/v1/instances/{iid}/links", json={}, headers=ada)).json()
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=10) as browser:
        login = await browser.post(
            "/api/v1/auth/login", json={"username": "bo", "password": PASSWORD}
        )
        page = await browser.get(f"/share/{link['token']}")
        assert page.status_code == 200 and "ada" in page.text
        mine = (await browser.get("/api/v1/instances")).json()
        assert mine == []  # seeing the offer shared nothing
        forged = await browser.post(f"/share/{link['token']}", data={})
        assert forged.status_code == 403  # no CSRF token: another site's form
        assert (await browser.get("/api/v1/instances")).json() == []
        csrf = login.json()["csrf_token"]
        taken = await browser.post(f"/share/{link['token']}", data={"csrf_token": csrf})
        assert taken.status_code == 303 and taken.headers["location"] == f"/instances/{iid}"
        assert [i["id"] for i in (await browser.get("/api/v1/instances")).json()] == [iid]


async def test_the_route_table_reloaded_from_the_database_keeps_every_access_list(
    app: Any, client: httpx.AsyncClient, make_user: Any, admin_headers: dict[str, str]
) -> None:
    """A start reads every access list at once: users with use, group members, not view."""
    ada, _bo, _cy = await make_user("ada"), await make_user("bo"), await make_user("cy")
    await make_user("dee")
    await client.post("/api/v1/groups", json={"name": "lab"}, headers=admin_headers)
    await client.post("/api/v1/groups", json={"name": "seen"}, headers=admin_headers)
    await client.put("/api/v1/groups/lab/members/cy", headers=admin_headers)
    await client.put("/api/v1/groups/seen/members/dee", headers=admin_headers)
    first, second, alone = [await running_demo(client, ada) for _ in range(3)]
    for iid, share in (
        (first, {"user": "bo", "access": "use"}),
        (first, {"group": "lab", "access": "use"}),
        (first, {"group": "seen", "access": "view"}),
        (second, {"user": "dee", "access": "view"}),
    ):
        shared = await client.post(f"/api/v1/instances/{iid}/shares", json=share, headers=ada)
        assert shared.status_code == 201, shared.text
    hub = app.state.portal.routes
    kept = {iid: hub.table.routes[iid].access for iid in (first, second, alone)}
    users = {user.name: user.id for user in hub.table.users.values()}
    assert kept == {first: {users["bo"], users["cy"]}, second: frozenset(), alone: frozenset()}
    await app.state.portal.run_db(hub.load)
    assert {iid: hub.table.routes[iid].access for iid in kept} == kept
    assert hub.access == {first: kept[first]}


async def test_deleting_a_user_takes_them_off_every_access_list_at_once(
    app: Any,
    client: httpx.AsyncClient,
    make_user: Any,
    admin_headers: dict[str, str],
    router_url: str,
) -> None:
    """A deleted user's shares leave the router with them: no id of theirs opens anything."""
    ada, cy = await make_user("ada"), await make_user("cy")
    bo = await make_user("bo")  # the newest account: SQLite would hand its id on
    await client.post("/api/v1/groups", json={"name": "lab"}, headers=admin_headers)
    for member in ("bo", "cy"):
        await client.put(f"/api/v1/groups/lab/members/{member}", headers=admin_headers)
    iid = await running_demo(client, ada)
    for share in ({"user": "bo", "access": "use"}, {"group": "lab", "access": "use"}):
        shared = await client.post(f"/api/v1/instances/{iid}/shares", json=share, headers=ada)
        assert shared.status_code == 201, shared.text
    assert await through_router(router_url, iid, bo) == 200
    assert await through_router(router_url, iid, cy) == 200
    table = app.state.portal.routes.table
    ids = {user.name: user.id for user in table.users.values()}
    assert (await client.delete("/api/v1/users/bo", headers=admin_headers)).status_code == 204
    # What the router checks, at once: bo's id is on no access list, no token is theirs.
    assert table.routes[iid].access == {ids["cy"]}
    assert ids["bo"] not in {info.user_id for info in table.tokens.values()}
    assert await through_router(router_url, iid, bo) in (401, 404)
    assert await through_router(router_url, iid, cy) == 200
    # The next account, shared nothing, reaches nothing.
    mallory = await make_user("mallory")
    assert (await client.get(f"/api/v1/instances/{iid}", headers=mallory)).status_code == 404
    assert await through_router(router_url, iid, mallory) == 404
