"""The admin sites page in process: its add form, and the API calls its script makes."""

from __future__ import annotations

import re

from test_pages import HTML, check_page, sign_in

from helpers import ADMIN_PASSWORD


async def test_the_page_offers_the_add_form_with_backends_and_portal_url(app, client, make_user):
    await sign_in(client, "admin", ADMIN_PASSWORD)
    page = await client.get("/admin/sites", headers=HTML)
    assert page.status_code == 200
    parsed = check_page(page)
    assert 'id="site-form"' in page.text and "Add site" in page.text
    backends = re.findall(r'<option value="([a-z-]+)">', page.text)
    assert backends[0] == "process" and "containers" in backends
    assert {"tunnel", "direct"} <= set(backends)
    url = app.state.portal.settings.effective_public_url
    assert f'data-portal-url="{url}"' in page.text
    assert "site-token" in page.text and parsed.meta["csrf-token"]


async def test_the_pages_site_changes_need_the_session_csrf_token(client, make_user):
    csrf = await sign_in(client, "admin", ADMIN_PASSWORD)
    body = {"name": "east", "backend": "process", "capacity": {"memory": "0"}}
    refused = await client.post("/api/v1/sites", json=body)
    assert refused.status_code == 403 and refused.json()["error"] == "csrf_failed"
    header = {"X-CSRF-Token": csrf}
    added = await client.post("/api/v1/sites", json=body, headers=header)
    assert added.status_code == 201, added.text
    assert added.json()["token"].startswith("lgs_")
    for method, path in [
        ("POST", "/api/v1/sites/east/token"),
        ("DELETE", "/api/v1/sites/east/token"),
        ("DELETE", "/api/v1/sites/east"),
    ]:
        without = await client.request(method, path)
        assert without.status_code == 403 and without.json()["error"] == "csrf_failed"
        done = await client.request(method, path, headers=header)
        assert done.status_code in (200, 204), (method, path, done.text)
    # A plain user's session is refused however it asks.
    client.cookies.clear()
    await make_user("ria")
    csrf = await sign_in(client, "ria")
    plain = await client.post("/api/v1/sites", json=body, headers={"X-CSRF-Token": csrf})
    assert plain.status_code == 403 and plain.json()["error"] == "insufficient_scope"
