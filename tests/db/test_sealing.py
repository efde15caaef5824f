"""Instance secrets at rest: sealed in the database, opened only with the signing key."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from helpers import TEST_SECRET_KEY, tool_client, wait_for_state
from labgate.config import Settings
from labgate.db.models import Instance
from labgate.portal.app import build_portal
from labgate.security import SecretBox


def test_a_sealed_secret_opens_only_with_its_key_and_its_instance() -> None:
    box = SecretBox(TEST_SECRET_KEY)
    secret = secrets.token_urlsafe(32)
    sealed = box.seal("abc", secret)
    assert secret not in sealed and len(sealed) <= 128  # the column's width
    assert box.open("abc", sealed) == secret
    assert box.open("abd", sealed) is None  # copied onto another instance's row
    assert SecretBox(secrets.token_urlsafe(32)).open("abc", sealed) is None  # another key
    assert box.open("abc", secret) is None  # a plain value is not a sealed one
    assert box.open("abc", sealed[:-2]) is None  # garbled
    assert box.seal("abc", secret) != sealed  # a fresh nonce every time


async def stored(app: Any, instance_id: str) -> str:
    row = await app.state.portal.run_db(lambda s: s.get(Instance, instance_id))
    return str(row.secret)


async def running_instance(
    app: Any, client: httpx.AsyncClient, headers: dict[str, str]
) -> tuple[str, str]:
    """A running demo: its id and the tool's own address (the router's upstream)."""
    launched = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=headers)
    assert launched.status_code == 202, launched.text
    iid = launched.json()["id"]
    await wait_for_state(client, headers, iid, {"running"})
    row = await app.state.portal.run_db(lambda s: s.get(Instance, iid))
    return iid, str(row.endpoint)


async def tool_answers(endpoint: str, instance_id: str, secret: str) -> int:
    """What the tool says to a request carrying ``secret``, sent past the router."""
    async with tool_client(endpoint, timeout=10) as tool:
        response = await tool.get(
            f"/i/{instance_id}/api/info", headers={"Authorization": f"token {secret}"}
        )
    return response.status_code


async def test_the_database_never_holds_an_instance_secret(
    app: Any, client: httpx.AsyncClient, make_user: Any, settings: Settings, router_url: str
) -> None:
    alice = await make_user("alice")
    iid, endpoint = await running_instance(app, client, alice)
    route = app.state.portal.routes.table.routes[iid]
    secret = route.upstream_token
    # The router holds the real secret: the tool takes it, and takes nothing else.
    assert await tool_answers(endpoint, iid, secret) == 200
    assert await tool_answers(endpoint, iid, await stored(app, iid)) in (401, 403)
    # Nowhere in the database's files, its WAL included.
    data = settings.data_dir
    for path in data.glob("labgate.db*"):
        assert secret.encode() not in path.read_bytes(), path
    async with httpx.AsyncClient(timeout=10) as browser:
        through = await browser.get(f"{router_url}/i/{iid}/api/info", headers=alice)
    assert through.status_code == 200, through.text


async def test_plain_secrets_from_before_sealing_are_sealed_on_start(
    app: Any, client: httpx.AsyncClient, make_user: Any, settings: Settings
) -> None:
    bob = await make_user("bob")
    iid, endpoint = await running_instance(app, client, bob)
    secret = app.state.portal.routes.table.routes[iid].upstream_token
    # The row as an older labgate left it: the secret in plain text.
    with app.state.portal.db.engine.begin() as conn:
        conn.execute(
            text("UPDATE instances SET secret = :s WHERE id = :i"), {"s": secret, "i": iid}
        )

    portal = build_portal(settings)  # what the next start does first
    try:
        with portal.db.session() as session:
            row = session.get(Instance, iid)
            assert row is not None and row.secret != secret
            assert portal.box.open(iid, row.secret) == secret
            route = portal.routes.route_for(row) if portal.routes is not None else None
        # The running tool, started with the old secret, is still reachable.
        assert route is not None and route.upstream_token == secret
        assert await tool_answers(endpoint, iid, route.upstream_token) == 200
    finally:
        portal.db.dispose()


def test_a_stored_secret_sealed_under_another_key_opens_to_nothing(tmp_path: Path) -> None:
    other = SecretBox(secrets.token_urlsafe(32))
    assert SecretBox(TEST_SECRET_KEY).open("x", other.new_secret("x")) is None
