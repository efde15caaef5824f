"""The launch page of a queued launch: its place in the start queue, and a cancel."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.sync_api import expect

from ui.support import INSTANCE_PAGE

pytestmark = pytest.mark.slow


def test_a_queued_launch_shows_its_place_and_cancels_at_once(gateway):
    hogger = gateway.create_user("hogger")
    name = gateway.create_user("quinn")
    with httpx.Client(base_url=gateway.url, headers=gateway.token(hogger), timeout=10) as api:
        # A start that takes the site's whole start room: the next launch there waits.
        hog = api.post("/api/v1/instances", json={"tool": "hog"})
        assert hog.status_code == 202, hog.text
        try:
            page = gateway.page()
            gateway.sign_in(page, name)
            page.get_by_role("button", name="Launch Demo").click()
            page.wait_for_url(INSTANCE_PAGE)
            expect(page.locator("#state")).to_have_text("queued")
            expect(page.locator("#status")).to_contain_text(
                re.compile(r"Number 1 in the start queue of site \w+; starting in about")
            )
            gateway.shot(page, "08-launch-queued")
            page.get_by_role("button", name="Cancel launch").click()
            expect(page.locator("#state")).to_have_text("stopped")
            expect(page.get_by_role("button", name="Cancel launch")).to_be_hidden()
        finally:
            api.delete(f"/api/v1/instances/{hog.json()['id']}")
