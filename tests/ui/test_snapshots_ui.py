"""Snapshots in a real browser: save one from the instance page, share, launch, delete;
and the API docs page, which must work with no Internet (every asset from labgate)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import expect

from ui.support import launch_via_api, wait_for

pytestmark = pytest.mark.slow


def test_snapshot_saved_shared_launched_and_deleted_in_the_browser(gateway):
    owner = gateway.create_user("sia")
    friend = gateway.create_user("fox")
    instance_id = launch_via_api(gateway, owner)
    page = gateway.page()
    gateway.sign_in(page, owner, path=f"/instances/{instance_id}")

    page.get_by_label("Snapshot name").fill("after setup")
    page.get_by_role("button", name="Save a snapshot").click()
    panel = page.locator("#instance-snapshots")
    row = panel.locator("tr[data-snapshot]").first
    expect(row).to_contain_text("after setup")
    # Saving, then ready: the row follows the save without a reload.
    expect(row.locator(".state")).to_have_text("ready", timeout=60_000)
    snapshot_id = row.get_attribute("data-snapshot")
    expect(row.get_by_role("button", name="Launch")).to_be_enabled()

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Snapshots").click()
    page.wait_for_url(re.compile(r"/snapshots$"))
    row = page.locator(f'#snapshots tr[data-snapshot="{snapshot_id}"]')
    expect(row.locator(".state")).to_have_text("ready")
    row.get_by_label(re.compile("Share .* with user")).fill(friend)
    row.get_by_role("button", name="Share", exact=True).click()
    expect(row.get_by_role("button", name=f"Stop sharing with {friend}")).to_be_visible()
    gateway.shot(page, "21-snapshots", docs=True)

    # The friend sees it shared and launches from it; they cannot delete it.
    other = gateway.page()
    gateway.sign_in(other, friend, path="/snapshots")
    theirs = other.locator(f'#snapshots tr[data-snapshot="{snapshot_id}"]')
    expect(theirs).to_contain_text("shared with you")
    expect(theirs.get_by_role("button", name="Delete")).to_have_count(0)
    theirs.get_by_role("button", name="Launch").click()
    other.wait_for_url(re.compile(r"/instances/[a-z0-9]+$"))
    launched_id = urlsplit(other.url).path.rsplit("/", 1)[-1]
    assert launched_id != instance_id
    # Running: the owner's instance page takes them into the tool.
    other.wait_for_url(re.compile(rf"/i/{launched_id}/$"), timeout=60_000)
    with httpx.Client(base_url=gateway.url, headers=gateway.token(friend), timeout=10) as client:
        shown = client.get(f"/api/v1/instances/{launched_id}").json()
        assert shown["snapshot"] == snapshot_id and shown["owner"] == friend
        client.delete(f"/api/v1/instances/{launched_id}")

    # Stop sharing, then delete: the list is empty again.
    row.get_by_role("button", name=f"Stop sharing with {friend}").click()
    expect(row.get_by_role("button", name=f"Stop sharing with {friend}")).to_have_count(0)
    page.locator(f'#snapshots tr[data-snapshot="{snapshot_id}"]').get_by_role(
        "button", name="Delete"
    ).click()
    expect(page.locator(f'#snapshots tr[data-snapshot="{snapshot_id}"]')).to_have_count(0)
    expect(page.locator("#snapshots")).to_contain_text("No snapshots yet.")
    with httpx.Client(base_url=gateway.url, headers=gateway.token(owner), timeout=10) as client:
        assert client.get("/api/v1/snapshots").json() == []
        client.delete(f"/api/v1/instances/{instance_id}")


def test_api_docs_page_renders_with_no_internet(gateway):
    page = gateway.page()
    local = urlsplit(gateway.url).netloc
    outside: list[str] = []

    def only_labgate(route):
        if urlsplit(route.request.url).netloc == local:
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_labgate)
    page.goto(gateway.url + "/static/favicon.svg")  # a page on labgate's origin first
    page.goto(gateway.url + "/api/v1/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("labgate", timeout=30_000)
    expect(page.locator("#operations-tag-snapshots")).to_be_visible()
    assert outside == []
    wait_for(lambda: page.locator(".opblock").count() > 20, what="the operations listed")
