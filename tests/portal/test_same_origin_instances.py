"""Without ``instance_host`` (the default), a user's tool runs on the portal's origin.

Instances are served under ``/i/<id>/`` on the portal's own host, so the
JavaScript a tool serves (a notebook's output, an HTML file, anything the
instance's owner writes) runs on the portal's origin with its *visitor's*
session cookie: it could read any portal page (the CSRF token is in every
page's ``<meta name="csrf-token">``) and call the API in the visitor's name.
An admin who opened a user's tool that way (the admin instances page offered
"Open" on each) made its owner admin; a ``use`` share (or a share link)
handed the owner the account of whoever opened it.

So there a portal session opens only its own user's instances (the
router's ``Authenticator.may_access``); admins and shares reach other
users' instances with an API token or on instance hosts, unless the
operator opts in (``share_on_portal_origin``). These tests play the tool's
script as the browser would run it: same origin, the visitor's cookie.
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from helpers import ADMIN_PASSWORD, PASSWORD, wait_for_state

CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')
HTML = {"Accept": "text/html"}


async def running_demo(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    launched = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=headers)
    assert launched.status_code == 202, launched.text
    iid = str(launched.json()["id"])
    await wait_for_state(client, headers, iid, {"running"})
    return iid


async def sign_in(browser: httpx.AsyncClient, name: str, password: str) -> None:
    """Sign the browser in to the portal through the router (the one public origin)."""
    done = await browser.post("/api/v1/auth/login", json={"username": name, "password": password})
    assert done.status_code == 200, done.text


async def script_on_the_tools_page(browser: httpx.AsyncClient, iid: str, page: str) -> str:
    """What a script served by the tool at /i/<iid>/ does: fetch a portal page (same origin,
    the visitor's cookie goes along) and take its CSRF token."""
    read = await browser.get(
        page,
        headers={
            "Accept": "text/html",
            "Sec-Fetch-Site": "same-origin",
            "Sec-Fetch-Mode": "cors",
            "Referer": f"{browser.base_url}i/{iid}/",
        },
    )
    assert read.status_code == 200, read.text
    match = CSRF_META.search(read.text)
    assert match is not None
    return match.group(1)


def same_origin_headers(browser: httpx.AsyncClient, iid: str, csrf: str) -> dict[str, str]:
    origin = str(browser.base_url).rstrip("/")
    return {
        "X-CSRF-Token": csrf,
        "Origin": origin,
        "Referer": f"{origin}/i/{iid}/",
        "Sec-Fetch-Site": "same-origin",
        "Sec-Fetch-Mode": "cors",
    }


def refused_for_its_origin(opened: httpx.Response) -> None:
    """The router's answer to another user's portal session: 403, saying why."""
    assert opened.status_code == 403, opened.text
    assert opened.headers["content-type"].startswith("text/html")
    assert "is not yours" in opened.text and "instance_host" in opened.text


async def test_a_users_tool_opened_by_an_admin_cannot_make_its_owner_admin(
    app: Any,
    client: httpx.AsyncClient,
    make_user: Any,
    admin_headers: dict[str, str],
    router_url: str,
) -> None:
    mallory = await make_user("mallory")
    iid = await running_demo(client, mallory)
    assert not app.state.portal.settings.instance_host  # the default: /i/<id>/ paths

    async with httpx.AsyncClient(base_url=router_url, timeout=15) as admin:
        await sign_in(admin, "admin", ADMIN_PASSWORD)
        # The admin opens mallory's tool (a link mallory sent): it is not served to them.
        opened = await admin.get(f"/i/{iid}/", headers=HTML)
        refused_for_its_origin(opened)
        if opened.status_code == 200 and opened.headers["content-type"].startswith("text/html"):
            # Were it served, mallory's page would run as the admin on the portal's origin.
            csrf = await script_on_the_tools_page(admin, iid, "/admin/users")
            await admin.patch(
                "/api/v1/users/mallory",
                json={"is_admin": True},
                headers=same_origin_headers(admin, iid, csrf),
            )
    me = await client.get("/api/v1/users/mallory", headers=admin_headers)
    assert me.json()["is_admin"] is False, (
        f"admin opened /i/{iid}/ (HTTP {opened.status_code}) on the portal's origin, and the "
        "tool's script made its owner an admin"
    )
    # The admin still reaches it with a token (not ambient: no page can make a browser send it).
    async with httpx.AsyncClient(base_url=router_url, timeout=15) as script:
        by_token = await script.get(f"/i/{iid}/api/info", headers=admin_headers)
    assert by_token.status_code == 200, by_token.text


async def test_a_shared_tool_cannot_take_over_the_account_of_whoever_opens_it(
    app: Any, client: httpx.AsyncClient, make_user: Any, router_url: str
) -> None:
    mallory = await make_user("mallory")
    victim_token = await make_user("victim")
    iid = await running_demo(client, mallory)
    shared = await client.post(
        f"/api/v1/instances/{iid}/shares", json={"user": "victim", "access": "use"}, headers=mallory
    )
    assert shared.status_code == 201, shared.text
    stolen = None
    async with httpx.AsyncClient(base_url=router_url, timeout=15) as victim:
        await sign_in(victim, "victim", PASSWORD)
        opened = await victim.get(f"/i/{iid}/", headers=HTML)
        refused_for_its_origin(opened)
        if opened.status_code == 200:
            csrf = await script_on_the_tools_page(victim, iid, "/tokens")
            made = await victim.post(
                "/api/v1/tokens",
                json={"note": "sync", "scopes": ["account", "instances:read"]},
                headers=same_origin_headers(victim, iid, csrf),
            )
            if made.status_code == 201:
                stolen = made.json()["token"]
        # The share itself holds: with a token the victim uses the tool.
        by_token = await victim.get(f"/i/{iid}/api/info", headers=victim_token)
        assert by_token.status_code == 200, by_token.text
    assert stolen is None, "the shared tool's script minted an API token in its visitor's name"


async def test_the_pages_offer_open_only_for_instances_that_open(
    app: Any, client: httpx.AsyncClient, make_user: Any
) -> None:
    """No "Open" for other users' instances (the router would refuse it), and a word on why."""
    ada = await make_user("ada")
    await make_user("bo")
    iid = await running_demo(client, ada)
    shared = await client.post(
        f"/api/v1/instances/{iid}/shares", json={"user": "bo", "access": "use"}, headers=ada
    )
    assert shared.status_code == 201, shared.text
    link = await client.post(f"/api/v1/instances/{iid}/links", json={}, headers=ada)
    assert link.status_code == 201, link.text
    settings = app.state.portal.settings
    async with (
        httpx.AsyncClient(base_url=app.state.test_url, timeout=15) as bo,
        httpx.AsyncClient(base_url=app.state.test_url, timeout=15) as owner,
    ):
        await sign_in(bo, "bo", PASSWORD)
        await sign_in(owner, "ada", PASSWORD)
        mine = await owner.get(f"/instances/{iid}", headers=HTML)
        assert 'id="open"' in mine.text and 'id="opens-for-owner"' not in mine.text
        assert 'data-others-open="false"' in mine.text  # instances.js hides others' "Open"
        theirs = await bo.get(f"/instances/{iid}", headers=HTML)
        assert theirs.status_code == 200
        assert 'id="open"' not in theirs.text and 'id="opens-for-owner"' in theirs.text
        offer = await bo.get(f"/share/{link.json()['token']}", headers=HTML)
        assert "Accept ada's demo" in offer.text and "instance_host" in offer.text
        # Where other users' instances do open (the opt-in, or instance hosts), so does "Open".
        settings.share_on_portal_origin = True
        theirs = await bo.get(f"/instances/{iid}", headers=HTML)
        assert 'id="open"' in theirs.text and 'id="opens-for-owner"' not in theirs.text
        assert 'data-others-open="true"' in theirs.text
        offer = await bo.get(f"/share/{link.json()['token']}", headers=HTML)
        assert "Open ada's demo" in offer.text


async def test_the_operator_may_let_shares_in_on_the_portal_origin(
    app: Any, client: httpx.AsyncClient, make_user: Any, settings: Any
) -> None:
    """``share_on_portal_origin = true``: the old behaviour, the operator's choice."""
    from labgate.router import start_router

    ada = await make_user("ada")
    await make_user("bo")
    iid = await running_demo(client, ada)
    shared = await client.post(
        f"/api/v1/instances/{iid}/shares", json={"user": "bo", "access": "use"}, headers=ada
    )
    assert shared.status_code == 201, shared.text
    portal = app.state.portal
    opted_in = settings.model_copy(update={"share_on_portal_origin": True})
    router = await start_router(portal.routes.table, "127.0.0.1", 0, app.state.test_url, opted_in)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{router.port}") as bo:
            await sign_in(bo, "bo", PASSWORD)
            opened = await bo.get(f"/i/{iid}/api/info")
            assert opened.status_code == 200, opened.text
            assert opened.json()["headers"]["x-labgate-user"] == "bo"
    finally:
        await router.close()
