"""In Chromium: signing in through an OpenID Connect provider's own page, and sharing.

The provider is npm's oidc-provider (started here, see tests/servers.py); the
browser clicks labgate's button, signs in on the provider's page, and comes
back signed in. Sharing: an owner shares from the instance page, the other
user opens the tool, and stopping the share cuts them off.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from playwright.sync_api import expect

from servers import LabgateServer, OIDCProvider
from ui.support import ADMIN_PASSWORD, Gateway, launch_via_api, screenshot

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def oidc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabgateServer]:
    """``labgate serve`` with an OpenID Connect provider next to local passwords."""
    missing = OIDCProvider.missing()
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    base = tmp_path_factory.mktemp("ui-oidc")
    server = LabgateServer(base / "var", ADMIN_PASSWORD)
    provider = OIDCProvider([f"{server.url}/login/uni/callback"])
    provider.start()
    server.env["LABGATE_IDENTITY_PROVIDERS"] = json.dumps(
        [
            {
                "name": "uni",
                "kind": "oidc",
                "label": "Sign in with Uni (single sign-on)",
                "first_login": "open",
                "group_map": {"physics": "physics"},
                "options": provider.options(),
            },
            {"name": "local", "label": "labgate account"},
        ]
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()
        provider.stop()


def test_sign_in_through_the_providers_own_page(
    playwright_browser: Any, oidc_server: LabgateServer
) -> None:
    context = playwright_browser.new_context(viewport={"width": 1100, "height": 720})
    errors: list[str] = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(oidc_server.url + "/instances")
        expect(page).to_have_url(re.compile(r"/login"))
        button = page.get_by_role("link", name="Sign in with Uni (single sign-on)")
        expect(button).to_be_visible()
        expect(page.get_by_label("User name")).to_be_visible()  # local passwords too
        screenshot(page, "23-sign-in-providers", docs=True)
        button.click()
        # The provider's own page, on its own origin.
        page.wait_for_url(re.compile(r"^http://127\.0\.0\.1:\d+/interaction/"))
        assert not page.url.startswith(oidc_server.url)
        page.locator("input[name=login]").fill("a-1f3e")
        page.locator("input[name=password]").fill("whatever")
        page.get_by_role("button", name="Sign-in").click()
        # Back in labgate, signed in as alice, where she was going.
        page.wait_for_url(oidc_server.url + "/instances")
        expect(page.get_by_role("link", name="alice")).to_be_visible()
        assert errors == []
    finally:
        context.close()


def test_owner_shares_from_the_instance_page_and_stops_sharing(gateway: Gateway) -> None:
    owner, friend = gateway.create_user("olive"), gateway.create_user("felix")
    instance_id = launch_via_api(gateway, owner)
    page = gateway.page()
    gateway.sign_in(page, owner, path=f"/instances/{instance_id}")
    page.goto(f"{gateway.url}/instances/{instance_id}")
    page.get_by_label("User or group").fill(friend)
    page.get_by_label("Access").select_option("use")
    page.get_by_role("button", name="Share", exact=True).click()
    row = page.locator("#shares tbody tr", has_text=friend)
    expect(row).to_be_visible()
    expect(page.locator("#shared-badge")).to_be_visible()
    gateway.shot(page, "22-sharing", docs=True, full_page=True)

    other = gateway.page()
    gateway.sign_in(other, friend, path="/instances")
    expect(other.get_by_text(f"shared by {owner} (use)")).to_be_visible()
    other.goto(f"{gateway.url}/instances/{instance_id}")
    expect(other.locator("#shared-with-you")).to_contain_text(owner)
    expect(other.locator("#stop")).to_have_count(0)
    # Without instance_host the tool would run on the portal's origin with felix's session:
    # it opens in the browser for its owner only, and the page and the router say why.
    expect(other.locator("#open")).to_have_count(0)
    expect(other.locator("#opens-for-owner")).to_contain_text("instance_host")
    response = other.goto(f"{gateway.url}/i/{instance_id}/")
    assert response is not None and response.status == 403
    expect(other.get_by_role("heading", name="Another user's instance")).to_be_visible()

    page.locator("#shares").get_by_role("button", name="Stop sharing").click()
    expect(page.locator("#shares tbody")).to_contain_text("Not shared with anyone")
    response = other.goto(f"{gateway.url}/i/{instance_id}/")
    assert response is not None and response.status == 404


def test_a_visitor_is_asked_before_someone_elses_tool_learns_who_they_are(
    gateway: Gateway,
) -> None:
    """A tool of a shared instance sends its visitor to labgate's provider: the visitor
    sees whose tool asks and what it would learn; Deny and Allow each go back to the tool."""
    owner, friend = gateway.create_user("opal"), gateway.create_user("fern")
    instance_id = launch_via_api(gateway, owner)
    with httpx.Client(base_url=gateway.url, headers=gateway.token(owner), timeout=10) as client:
        shared = client.post(
            f"/api/v1/instances/{instance_id}/shares", json={"user": friend, "access": "use"}
        )
        assert shared.status_code == 201, shared.text
    callback = f"{gateway.url}/i/{instance_id}/oauth/callback"
    query = urlencode(
        {
            "response_type": "code",
            "client_id": instance_id,
            "redirect_uri": callback,
            "scope": "openid",
            "state": "xyz",
        }
    )
    page = gateway.page()
    gateway.sign_in(page, friend, path=f"/oauth/authorize?{query}")
    heading = page.get_by_role("heading", name=f"Tell {owner}'s demo who you are?")
    expect(heading).to_be_visible()
    expect(page.locator("#consent-owner")).to_have_text(owner)
    expect(page.locator("#consent-claims")).to_contain_text(friend)
    gateway.shot(page, "24-tool-asks-who-you-are")
    page.get_by_role("button", name="Deny").click()
    page.wait_for_url(re.compile(re.escape(callback)))
    # Back at the tool (which, on the portal's origin, opens for its owner only).
    denied = parse_qs(urlsplit(page.url).query)
    assert denied["error"] == ["access_denied"] and "code" not in denied

    page.goto(f"{gateway.url}/oauth/authorize?{query}")
    page.get_by_role("button", name="Allow").click()
    page.wait_for_url(re.compile(re.escape(callback)))
    allowed = parse_qs(urlsplit(page.url).query)
    assert allowed["state"] == ["xyz"] and allowed["code"][0]
