"""Network sites through the API: add with a token shown once, rotate, revoke, change, remove."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select

from labgate.config import SiteConfig
from labgate.db.models import Instance, InstanceState, Site, Snapshot, User, utcnow
from labgate.db.session import Database
from labgate.errors import ConfigError
from labgate.portal.app import ensure_site
from labgate.portal.routefeed import route_sources
from labgate.security import SITE_TOKEN_PREFIX, hash_token

EAST = {
    "name": "east",
    "backend": "process",
    "capacity": {"cpu": 8, "memory": "64G", "max_instances": 4},
    "labels": {"zone": "lab"},
    "data_root": "/srv/data",
}


async def add(client: httpx.AsyncClient, headers: dict[str, str], **changes: Any) -> Any:
    created = await client.post("/api/v1/sites", json={**EAST, **changes}, headers=headers)
    assert created.status_code == 201, created.text
    return created.json()


async def row(app: Any, name: str) -> Site:
    site: Site | None = await app.state.portal.run_db(
        lambda s: s.scalar(select(Site).where(Site.name == name))
    )
    assert site is not None
    return site


async def test_admin_adds_a_network_site_and_its_token_is_shown_once(app, client, admin_headers):
    created = await add(client, admin_headers)
    token = created["token"]
    assert token.startswith(SITE_TOKEN_PREFIX) and len(token) > 40
    assert created["kind"] == "network" and created["reach"] == "tunnel"
    assert created["status"] == "waiting"
    assert created["capacity"] == {"cpu": 8, "memory": 64 * 1024**3, "max_instances": 4}
    assert created["labels"] == {"zone": "lab"} and created["data_root"] == "/srv/data"
    assert created["live"] is False and created["connected_since"] is None
    # Stored hashed: the token itself is nowhere in the row.
    site = await row(app, "east")
    assert site.token_hash == hash_token(token)
    assert token not in repr(site.options) and token not in repr(site.agent_info)
    shown = (await client.get("/api/v1/sites/east", headers=admin_headers)).json()
    listed = (await client.get("/api/v1/sites", headers=admin_headers)).json()
    assert "token" not in shown and all("token" not in s for s in listed)
    assert [s["name"] for s in listed] == ["east", "local"]
    local = listed[1]
    assert (local["kind"], local["status"], local["live"]) == ("local", "local", True)


async def test_users_read_sites_without_what_the_agent_said(app, client, admin_headers, make_user):
    await add(client, admin_headers)
    await app.state.portal.run_db(
        lambda s: setattr(
            s.scalar(select(Site).where(Site.name == "east")), "agent_info", {"hostname": "n1"}
        )
    )
    alice = await make_user("alice")
    seen = (await client.get("/api/v1/sites/east", headers=alice)).json()
    assert seen["status"] == "waiting" and seen["agent"] is None and seen["options"] is None
    assert (await client.get("/api/v1/sites/east", headers=admin_headers)).json()["agent"] == {
        "hostname": "n1"
    }
    missing = await client.get("/api/v1/sites/west", headers=alice)
    assert missing.status_code == 404 and missing.json()["error"] == "unknown_site"


async def test_status_follows_the_agent_connection(app, client, admin_headers):
    await add(client, admin_headers)

    async def mark(**values: Any) -> None:
        def change(session: Any) -> None:
            site = session.scalar(select(Site).where(Site.name == "east"))
            for key, value in values.items():
                setattr(site, key, value)

        await app.state.portal.run_db(change)

    async def status() -> str:
        return str((await client.get("/api/v1/sites/east", headers=admin_headers)).json()["status"])

    now = utcnow()
    await mark(connected_at=now, last_seen_at=now, agent_version="0.2.0")
    shown = (await client.get("/api/v1/sites/east", headers=admin_headers)).json()
    assert shown["status"] == "connected" and shown["agent_version"] == "0.2.0"
    assert shown["connected_since"] and shown["last_heartbeat"]
    await mark(connected_at=None, disconnected_at=now)
    assert await status() == "disconnected"
    revoked = await client.delete("/api/v1/sites/east/token", headers=admin_headers)
    assert revoked.status_code == 204
    assert await status() == "revoked"


async def test_adding_checks_name_backend_and_options(client, admin_headers):
    async def post(**changes: Any) -> httpx.Response:
        return await client.post("/api/v1/sites", json={**EAST, **changes}, headers=admin_headers)

    taken = await post(name="local")
    assert taken.status_code == 409 and taken.json()["error"] == "site_exists"
    await add(client, admin_headers)
    again = await post()
    assert again.status_code == 409 and again.json()["error"] == "site_exists"
    unknown = await post(name="west", backend="nope")
    assert unknown.status_code == 400 and unknown.json()["error"] == "unknown_backend"
    assert "installed" in unknown.json()["detail"]
    bad = await post(name="west", backend="containers", options={"pull": "sometimes"})
    assert bad.status_code == 422, bad.text
    assert bad.json()["error"] == "invalid_options" and "options.pull" in bad.json()["detail"]
    extra = await post(name="west", options={"colour": "red"})
    assert extra.status_code == 422 and "options.colour" in extra.json()["detail"]
    for changes, field in [
        ({"name": "West"}, "name"),
        ({"reach": "sideways"}, "reach"),
        ({"data_root": "relative/path"}, "data_root"),
        ({"capacity": {"memory": "lots"}}, "memory"),
        ({"labels": {"zone": 1}}, "labels"),
    ]:
        refused = await post(**{"name": "west", **changes})
        assert refused.status_code == 422, (changes, refused.text)
        assert field in refused.json()["detail"], refused.json()
    fine = await post(name="west", backend="containers", options={"pull": "never"}, reach="direct")
    assert fine.status_code == 201, fine.text
    assert fine.json()["options"] == {"pull": "never"} and fine.json()["reach"] == "direct"


async def test_rotating_and_revoking_change_the_stored_hash(app, client, admin_headers):
    first = (await add(client, admin_headers))["token"]
    rotated = await client.post("/api/v1/sites/east/token", headers=admin_headers)
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()["token"]
    assert second.startswith(SITE_TOKEN_PREFIX) and second != first
    site = await row(app, "east")
    assert site.token_hash == hash_token(second) != hash_token(first)
    revoked = await client.delete("/api/v1/sites/east/token", headers=admin_headers)
    assert revoked.status_code == 204
    site = await row(app, "east")
    assert site.token_hash is None and site.token_issued_at is None
    # A new token brings it back, waiting for its agent.
    third = (await client.post("/api/v1/sites/east/token", headers=admin_headers)).json()
    assert third["status"] == "waiting" and third["token"] not in (first, second)


async def test_settings_sites_cannot_be_changed_from_the_api(client, admin_headers):
    for method, path, body in [
        ("POST", "/api/v1/sites/local/token", None),
        ("DELETE", "/api/v1/sites/local/token", None),
        ("DELETE", "/api/v1/sites/local", None),
        ("PATCH", "/api/v1/sites/local", {"labels": {}}),
    ]:
        refused = await client.request(method, path, json=body, headers=admin_headers)
        assert refused.status_code == 409, (method, path, refused.text)
        assert refused.json()["error"] == "local_site"
        assert "settings" in refused.json()["detail"]


async def test_patch_changes_reach_capacity_labels_and_options(client, admin_headers):
    await add(client, admin_headers)
    changed = await client.patch(
        "/api/v1/sites/east",
        json={
            "reach": "direct",
            "capacity": {"cpu": 2},
            "labels": {"gpu": "a100"},
            "options": {"pull": "always"},
        },
        headers=admin_headers,
    )
    # The site's backend is process, which takes no options.
    assert changed.status_code == 422 and "options.pull" in changed.json()["detail"]
    changed = await client.patch(
        "/api/v1/sites/east",
        json={"reach": "direct", "capacity": {"cpu": 2}, "labels": {"gpu": "a100"}},
        headers=admin_headers,
    )
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert (body["reach"], body["labels"]) == ("direct", {"gpu": "a100"})
    # The capacity's figures not given are kept; 0 given is no limit.
    assert body["capacity"] == {"cpu": 2, "memory": 64 * 2**30, "max_instances": 4}
    changed = await client.patch(
        "/api/v1/sites/east",
        json={"capacity": {"max_instances": 0, "starts": 1}},
        headers=admin_headers,
    )
    assert changed.json()["capacity"] == {"cpu": 2, "memory": 64 * 2**30, "max_instances": 0}
    assert changed.json()["start_capacity"] == 1
    assert body["data_root"] == "/srv/data"  # kept
    unknown = await client.patch("/api/v1/sites/west", json={}, headers=admin_headers)
    assert unknown.status_code == 404


async def test_removal_waits_for_instances_and_forces_only_past_snapshots(
    app, client, admin_headers
):
    await add(client, admin_headers)
    site = await row(app, "east")

    def put(session: Any) -> None:
        owner = session.scalar(select(User).where(User.name == "admin"))
        session.add(
            Instance(id="i-east", owner_id=owner.id, tool="demo", site_id=site.id, state="running")
        )
        session.add(
            Snapshot(
                id="s-east", owner_id=owner.id, tool="demo", site_id=site.id, backend="process"
            )
        )

    await app.state.portal.run_db(put)
    for query in ("", "?force=true"):
        busy = await client.delete(f"/api/v1/sites/east{query}", headers=admin_headers)
        assert busy.status_code == 409 and busy.json()["error"] == "site_in_use", busy.text

    def end(session: Any) -> None:
        session.get(Instance, "i-east").state = InstanceState.stopped

    await app.state.portal.run_db(end)
    held = await client.delete("/api/v1/sites/east", headers=admin_headers)
    assert held.status_code == 409 and held.json()["error"] == "site_has_snapshots"
    gone = await client.delete("/api/v1/sites/east?force=true", headers=admin_headers)
    assert gone.status_code == 204, gone.text
    assert (await client.get("/api/v1/sites/east", headers=admin_headers)).status_code == 404

    def after(session: Any) -> tuple[Any, ...]:
        instance, snapshot = session.get(Instance, "i-east"), session.get(Snapshot, "s-east")
        return instance.site_id, snapshot.site_id, snapshot.state, snapshot.reason

    instance_site, snapshot_site, state, reason = await app.state.portal.run_db(after)
    assert (instance_site, snapshot_site, state) == (None, None, "failed")
    assert "east" in reason
    # The name is free again.
    await add(client, admin_headers)


ADMIN_ONLY = {
    "add": ("POST", "/api/v1/sites", {**EAST, "name": "west"}),
    "rotate": ("POST", "/api/v1/sites/east/token", None),
    "revoke": ("DELETE", "/api/v1/sites/east/token", None),
    "remove": ("DELETE", "/api/v1/sites/east", None),
    "change": ("PATCH", "/api/v1/sites/east", {"labels": {}}),
}


async def only_admins(client: Any, admin: dict[str, str], make_user: Any, action: str) -> None:
    """A plain user (token or not) is refused ``action``; the site is unchanged; an admin may."""
    before = await add(client, admin)
    alice = await make_user("alice")
    method, path, body = ADMIN_ONLY[action]
    refused = await client.request(method, path, json=body, headers=alice)
    assert refused.status_code == 403, refused.text
    after = (await client.get("/api/v1/sites/east", headers=admin)).json()
    assert after["token_issued_at"] == before["token_issued_at"]
    assert after["labels"] == before["labels"]
    assert (await client.get("/api/v1/sites/west", headers=admin)).status_code == 404
    done = await client.request(method, path, json=body, headers=admin)
    assert done.status_code in (200, 201, 204), done.text


async def test_only_admins_add_sites(client, admin_headers, make_user):
    await only_admins(client, admin_headers, make_user, "add")


async def test_only_admins_rotate_site_tokens(client, admin_headers, make_user):
    await only_admins(client, admin_headers, make_user, "rotate")


async def test_only_admins_revoke_site_tokens(client, admin_headers, make_user):
    await only_admins(client, admin_headers, make_user, "revoke")


async def test_only_admins_remove_sites(client, admin_headers, make_user):
    await only_admins(client, admin_headers, make_user, "remove")


async def test_only_admins_change_sites(client, admin_headers, make_user):
    await only_admins(client, admin_headers, make_user, "change")


def test_a_settings_site_may_not_take_a_network_sites_name(database_url):
    db = Database(database_url)
    try:
        db.migrate()
        with db.session() as session:
            session.add(Site(name="east", backend="process", kind="network", token_hash="h"))
        with pytest.raises(ConfigError, match="network site"), db.session() as session:
            ensure_site(session, SiteConfig(name="east"))
        with db.session() as session:
            ensure_site(session, SiteConfig(name="local"))
        with db.session() as session:
            kinds = {name: kind for name, kind in session.execute(select(Site.name, Site.kind))}
        assert kinds == {"east": "network", "local": "local"}
    finally:
        db.dispose()


async def test_changes_reach_the_site_hub(app, client, admin_headers):
    """Adding a site gives it a link (not live until its agent dials in); removing drops it."""
    from labgate.agent.network import NetworkSiteLink

    portal = app.state.portal
    assert portal.site_hub is not None
    await add(client, admin_headers)
    link = portal.links["east"]
    assert isinstance(link, NetworkSiteLink) and not link.live and link.reach == "tunnel"
    for method, path in [
        ("POST", "/api/v1/sites/east/token"),
        ("DELETE", "/api/v1/sites/east/token"),
        ("DELETE", "/api/v1/sites/east"),
    ]:
        done = await client.request(method, path, headers=admin_headers)
        assert done.status_code in (200, 204), done.text
    assert "east" not in portal.links


async def test_an_instance_routed_before_its_sites_link_was_made_is_routed_again(
    app, client, admin_headers
):
    """A replica learns of a site another one added a sync later; its instances' routes
    made meanwhile go to their endpoints. Once the link is made they go through the tunnel:
    behind NAT nothing else reaches them."""
    await add(client, admin_headers, reach="tunnel")
    portal = app.state.portal
    site = await row(app, "east")

    def put(session: Any) -> None:
        owner = session.scalar(select(User).where(User.name == "admin"))
        session.add(
            Instance(
                id="i-east",
                owner_id=owner.id,
                tool="demo",
                site_id=site.id,
                state="running",
                endpoint="127.0.0.1:9",
            )
        )

    await portal.run_db(put)
    [source] = await portal.run_db(lambda s: route_sources(s, Site.name == "east"))
    await portal.site_hub.forget("east")  # as on a replica that has not synced it yet
    portal.routes.instance_changed(source)
    assert portal.routes.table.routes["i-east"].upstream == "127.0.0.1:9"
    await portal.site_hub.register("east", "process", "tunnel")  # what the sync does
    assert portal.routes.table.routes["i-east"].upstream == "tunnel:east/i-east"

    def end(session: Any) -> None:  # a record only: no agent could ever stop it
        session.get(Instance, "i-east").state = InstanceState.stopped

    await portal.run_db(end)
