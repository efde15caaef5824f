"""The snapshot parts of the web UI, in process: the snapshots page and the instance page."""

from __future__ import annotations

import re
from typing import Any

import httpx
from test_pages import HTML, check_page, sign_in
from test_snapshots import take, wait_snapshot

from helpers import ADMIN_PASSWORD, wait_for_state


async def test_snapshots_page_and_instance_panel(
    client: httpx.AsyncClient, make_user: Any, admin_headers: dict[str, str]
) -> None:
    owner = await make_user("nell")
    await make_user("otto")
    launched = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=owner)
    iid = launched.json()["id"]
    assert (await wait_for_state(client, owner, iid, {"running", "failed"}))["state"] == "running"
    sid = await take(client, owner, iid, name="tidy <state>")
    assert (await wait_snapshot(client, owner, sid))["state"] == "ready"
    shared = await client.put(f"/api/v1/snapshots/{sid}/shares/otto", headers=owner)
    assert shared.status_code == 201

    await sign_in(client, "nell")
    page = await client.get("/snapshots", headers=HTML)
    assert page.status_code == 200
    check_page(page)
    assert '<a href="/snapshots" aria-current="page">Snapshots</a>' in page.text
    row = re.search(rf'<tr data-snapshot="{sid}" data-state="ready">.*?</tr>', page.text, re.S)
    assert row is not None, page.text
    # The name is escaped; the owner may launch, delete, share and unshare.
    assert "tidy &lt;state&gt;" in row.group(0)
    for control in ("launch-snapshot", "delete-snapshot", "share-snapshot", "unshare-snapshot"):
        assert control in row.group(0), control
    assert 'data-user="otto"' in row.group(0)

    instance = await client.get(f"/instances/{iid}", headers=HTML)
    check_page(instance)
    assert 'id="take-snapshot"' in instance.text and 'id="instance-snapshots"' in instance.text
    assert f'data-snapshot="{sid}"' in instance.text

    # otto sees it shared with him: he may launch it, not delete or share it.
    client.cookies.clear()
    await sign_in(client, "otto")
    theirs = await client.get("/snapshots", headers=HTML)
    row = re.search(rf'<tr data-snapshot="{sid}".*?</tr>', theirs.text, re.S)
    assert row is not None and "launch-snapshot" in row.group(0)
    assert "delete-snapshot" not in row.group(0) and "share-snapshot" not in row.group(0)
    assert "shared with you" in row.group(0)

    # An admin's own list is empty; everyone's has it, without a Launch (not shared).
    client.cookies.clear()
    await sign_in(client, "admin", ADMIN_PASSWORD)
    assert f'data-snapshot="{sid}"' not in (await client.get("/snapshots", headers=HTML)).text
    everyone = await client.get("/snapshots?all=true", headers=HTML)
    check_page(everyone)
    row = re.search(rf'<tr data-snapshot="{sid}".*?</tr>', everyone.text, re.S)
    assert row is not None and "delete-snapshot" in row.group(0)
    assert "launch-snapshot" not in row.group(0)


async def test_snapshots_page_needs_a_session(client: httpx.AsyncClient) -> None:
    response = await client.get("/snapshots", headers=HTML)
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Fsnapshots"
