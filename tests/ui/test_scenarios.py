"""The web portal as users meet it: launch, use, stop, fail, isolation, disable.

Each scenario runs in real Chromium against ``labgate serve`` and saves
screenshots of what the user saw.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from helpers import PASSWORD
from ui.support import ADMIN_PASSWORD, INSTANCE_PAGE, launch_via_api

pytestmark = pytest.mark.slow


def test_new_user_launches_demo_and_uses_it_through_the_router(gateway):
    name = gateway.create_user("ada")
    page = gateway.page()
    page.goto(gateway.url + "/")
    expect(page).to_have_url(re.compile(r"/login$"))
    gateway.shot(page, "01-sign-in", docs=True)
    gateway.sign_in(page, name)
    expect(page.get_by_role("heading", name="Tools", level=1)).to_be_visible()
    expect(page.get_by_role("heading", name="Demo")).to_be_visible()
    gateway.shot(page, "02-tools", docs=True)

    page.get_by_role("button", name="Launch Demo").click()
    page.wait_for_url(INSTANCE_PAGE)
    instance_id = INSTANCE_PAGE.search(page.url).group(1)
    expect(page.get_by_role("list", name="Launch progress")).to_be_visible()
    gateway.shot(page, "03-launch-progress", docs=True)

    # Ready: the progress page opens the tool through the router by itself.
    page.wait_for_url(re.compile(rf"/i/{instance_id}/$"), timeout=30_000)
    expect(page.locator("#instance")).to_have_text(instance_id)
    expect(page.locator("#user")).to_have_text(name)
    expect(page.locator("#echo")).to_have_text("hello from the browser")
    gateway.shot(page, "04-inside-the-tool", docs=True)

    # Back in labgate, the instance page shows it running, without opening it again.
    page.go_back()
    expect(page.locator("#state")).to_have_text("running")
    expect(page.get_by_role("link", name="Open Demo")).to_be_visible()
    assert INSTANCE_PAGE.search(page.url)

    # My instances shows what the router saw of it.
    page.get_by_role("link", name="My instances").first.click()
    row = page.locator(f'tr[data-id="{instance_id}"]')
    expect(row.locator(".state")).to_have_text("running")
    expect(row.locator('td[data-label="Last activity"]')).to_have_text(
        re.compile(r"just now|ago|in use now")
    )


def test_stop_from_my_instances_updates_without_reload(gateway):
    name = gateway.create_user("bea")
    instance_id = launch_via_api(gateway, name)
    page = gateway.page()
    gateway.sign_in(page, name, path="/instances")
    row = page.locator(f'tr[data-id="{instance_id}"]')
    expect(row.locator(".state")).to_have_text("running")
    expect(row.get_by_role("link", name=f"Open demo {instance_id}")).to_be_visible()
    gateway.shot(page, "05-my-instances", docs=True)

    page.evaluate("window.__sameDocument = true")
    row.get_by_role("button", name=f"Stop demo {instance_id}").click()
    expect(row.locator(".state")).to_have_text(re.compile("stopping|stopped"))
    expect(row.locator(".state")).to_have_text("stopped", timeout=30_000)
    expect(page.get_by_role("status")).to_contain_text(f"({instance_id}) is stopped")
    expect(row.get_by_role("button", name=f"Stop demo {instance_id}")).to_be_hidden()
    assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
    gateway.shot(page, "06-stopped")


def test_failing_tool_shows_reason_and_log_lines(gateway):
    name = gateway.create_user("cy")
    page = gateway.page()
    gateway.sign_in(page, name)
    page.get_by_role("button", name="Launch crashing").click()
    page.wait_for_url(INSTANCE_PAGE)
    first = page.url
    failure = page.locator("#failure")
    expect(failure).to_be_visible(timeout=30_000)
    expect(page.locator("#state")).to_have_text("failed")
    expect(page.locator("#reason")).to_contain_text("exited")
    expect(page.locator("#log-tail")).to_contain_text("crashing on purpose")
    expect(page.locator('[data-step][data-status="failed"]')).to_have_count(1)
    expect(page.locator("#failure-heading")).to_be_focused()
    gateway.shot(page, "07-launch-failed", docs=True)

    page.get_by_role("button", name="Try again").click()
    page.wait_for_url(lambda url: url != first and INSTANCE_PAGE.search(url) is not None)
    expect(page.locator("#failure")).to_be_visible(timeout=30_000)


def test_another_user_never_reaches_the_tool(gateway):
    owner = gateway.create_user("dora")
    other = gateway.create_user("eve")
    instance_id = launch_via_api(gateway, owner)
    tool_url = f"{gateway.url}/i/{instance_id}/"

    mine = gateway.page()
    gateway.sign_in(mine, owner, path=f"/i/{instance_id}/")
    expect(mine).to_have_url(tool_url)
    expect(mine.locator("#echo")).to_have_text("hello from the browser")

    theirs = gateway.page()
    gateway.sign_in(theirs, other)
    answer = theirs.goto(tool_url)
    assert answer is not None and answer.status in (401, 403, 404), answer.status
    expect(theirs.locator("#echo")).to_have_count(0)
    expect(theirs.get_by_text("labgate demo")).to_have_count(0)
    gateway.shot(theirs, "08-not-yours")

    page = theirs.goto(f"{gateway.url}/instances/{instance_id}")
    assert page is not None and page.status == 404
    expect(theirs.get_by_role("heading", name="Not found")).to_be_visible()
    gateway.shot(theirs, "09-error-page", docs=True)

    anonymous = gateway.page()
    anonymous.goto(tool_url)
    expect(anonymous).to_have_url(re.compile(r"/login\?next="))
    expect(anonymous.locator("#echo")).to_have_count(0)


def test_admin_disables_a_user_who_is_then_signed_out(gateway):
    name = gateway.create_user("finn")
    user = gateway.page()
    gateway.sign_in(user, name, path="/instances")
    expect(user.get_by_role("heading", name="My instances")).to_be_visible()

    admin = gateway.page()
    gateway.sign_in(admin, "admin", ADMIN_PASSWORD, path="/admin/users")
    row = admin.locator(f'tr[data-name="{name}"]')
    admin.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name=f"Disable {name}").click()
    expect(admin.get_by_role("status").first).to_contain_text(f"{name} is disabled")
    expect(admin.locator(f'tr[data-name="{name}"] .state')).to_have_text("disabled")
    admin.evaluate("window.scrollTo(0, 0)")
    gateway.shot(admin, "10-admin-users", docs=True)

    user.reload()
    expect(user).to_have_url(re.compile(r"/login\?next=%2Finstances$"))
    expect(user.get_by_role("status")).to_have_text(re.compile("session has ended"))
    user.get_by_label("User name").fill(name)
    user.get_by_label("Password").fill(PASSWORD)
    user.get_by_role("button", name="Sign in").click()
    expect(user.get_by_role("alert")).to_have_text(re.compile("disabled"))
    gateway.shot(user, "11-account-disabled")
