"""The rest of the portal in a real browser: resources form, tokens, password, logs,
admin instances and sites, phone-sized screens, dark mode, keyboard focus."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.sync_api import expect

from helpers import PASSWORD
from ui.support import (
    ADMIN_PASSWORD,
    INSTANCE_PAGE,
    LOST_BINARY,
    PHONE,
    launch_via_api,
    unique_name,
    wait_for,
)

pytestmark = pytest.mark.slow


def api(gateway, name: str) -> httpx.Client:
    return httpx.Client(base_url=gateway.url, headers=gateway.token(name), timeout=10)


def no_horizontal_scroll(page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def test_resources_form_checks_limits_and_launches_with_them(gateway):
    name = gateway.create_user("gil")
    page = gateway.page()
    gateway.sign_in(page, name)
    card = page.locator('li.card[data-tool="demo"]')
    card.get_by_text("Resources").click()
    memory = card.get_by_label("Memory")
    memory.fill("lots")
    card.get_by_role("button", name="Launch Demo").click()
    expect(card.get_by_role("alert")).to_have_text("Memory must be a size like 512M or 2G.")
    expect(memory).to_be_focused()
    expect(memory).to_have_attribute("aria-invalid", "true")
    card.get_by_label("CPUs").fill("3")
    memory.fill("1G")
    card.get_by_role("button", name="Launch Demo").click()
    expect(card.get_by_role("alert")).to_have_text("At most 2 CPUs.")
    gateway.shot(page, "12-resources-form", docs=True)

    card.get_by_label("CPUs").fill("1")
    card.get_by_role("button", name="Launch Demo").click()
    page.wait_for_url(INSTANCE_PAGE)
    instance_id = INSTANCE_PAGE.search(page.url).group(1)
    with api(gateway, name) as client:
        resources = client.get(f"/api/v1/instances/{instance_id}").json()["resources"]
        assert resources == {"cpu": 1.0, "memory": 1024**3}
        page.goto(gateway.url + "/")
        expect(page.locator("#quota")).to_contain_text("You have 1 of 5 instances active.")
        client.delete(f"/api/v1/instances/{instance_id}")


def test_tokens_are_shown_once_and_can_be_revoked(gateway):
    name = gateway.create_user("hana")
    page = gateway.page()
    gateway.sign_in(page, name, path="/tokens")
    expect(page.locator("#tokens-empty")).to_be_visible()
    page.get_by_label("Note").fill("laptop CLI")
    page.get_by_role("checkbox", name=re.compile("instances:write")).uncheck()
    page.get_by_label("Expires after").select_option(label="7 days")
    page.get_by_role("button", name="Create token").click()
    value = page.get_by_label("Token to copy")
    expect(value).to_have_value(re.compile(r"^lg_"))
    expect(value).to_be_focused()
    token = value.input_value()
    row = page.locator("#tokens tbody tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("laptop CLI")
    expect(row.locator("ul.scopes")).to_contain_text("instances:read")
    expect(row.locator("ul.scopes")).not_to_contain_text("instances:write")
    gateway.shot(page, "13-api-tokens", docs=True)

    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        auth = {"Authorization": f"token {token}"}
        session = client.get("/api/v1/auth/session", headers=auth).json()
        assert "instances:write" not in session["scopes"] and session["user"]["name"] == name
        page.reload()
        expect(page.get_by_label("Token to copy")).to_be_hidden()
        assert token not in page.content()
        page.once("dialog", lambda dialog: dialog.accept())
        page.locator("#tokens tbody").get_by_role("button", name=re.compile("^Revoke")).click()
        expect(page.locator("#tokens-empty")).to_be_visible()
        expect(page.get_by_role("status").first).to_contain_text("revoked")
        assert client.get("/api/v1/auth/session", headers=auth).status_code == 401


def test_password_change_keeps_this_session_and_the_new_one_works(gateway):
    name = gateway.create_user("ivo")
    page = gateway.page()
    gateway.sign_in(page, name, path="/account")
    page.get_by_label("Current password").fill("not-my-password")
    page.get_by_label("New password", exact=True).fill("brand-new-password")
    page.get_by_label("New password again").fill("brand-new-passwort")
    page.get_by_role("button", name="Change password").click()
    expect(page.get_by_role("alert")).to_have_text("The two new passwords differ.")
    page.get_by_label("New password again").fill("brand-new-password")
    page.get_by_role("button", name="Change password").click()
    expect(page.get_by_role("alert")).to_have_text("The current password is wrong.")
    expect(page.get_by_label("Current password")).to_be_focused()
    page.get_by_label("Current password").fill(PASSWORD)
    page.get_by_label("New password", exact=True).fill("qwertyuiop")
    page.get_by_label("New password again").fill("qwertyuiop")
    page.get_by_role("button", name="Change password").click()
    expect(page.get_by_role("alert")).to_have_text(re.compile("list of common passwords"))
    gateway.shot(page, "14-account")
    page.get_by_label("Current password").fill(PASSWORD)
    page.get_by_label("New password", exact=True).fill("brand-new-password")
    page.get_by_label("New password again").fill("brand-new-password")
    page.get_by_role("button", name="Change password").click()
    expect(page.locator("#password-done")).to_have_text(re.compile("password was changed"))
    # This browser is still signed in (its cookie was renewed) ...
    page.reload()
    expect(page.get_by_role("heading", name="Your account")).to_be_visible()
    # ... and the new password is the one that works.
    other = gateway.page()
    gateway.sign_in(other, name, "brand-new-password", path="/account")
    expect(other.get_by_role("heading", name="Your account")).to_be_visible()


def test_instance_page_counts_down_to_the_idle_stop_and_keeps_alive(gateway):
    name = gateway.create_user("kai")
    instance_id = launch_via_api(gateway, name)
    page = gateway.page()
    gateway.sign_in(page, name, path=f"/instances/{instance_id}")
    countdown = page.locator("#countdown")
    # demo's idle timeout is an hour; the page counts down from the server's cull_at.
    expect(countdown).to_have_text(
        re.compile(r"^Stops in (59|60) min \(at .+\) if nobody uses it\.$")
    )
    choices = page.get_by_label("Keep alive for").locator("option")
    expect(choices).to_have_text(["1 hour", "4 hours", "8 hours", "24 hours"])
    expect(page.get_by_role("button", name="End keep-alive")).to_be_hidden()

    page.get_by_label("Keep alive for").select_option(label="4 hours")
    page.get_by_role("button", name="Keep alive").click()
    expect(countdown).to_have_text(
        re.compile(r"^Kept alive until .+: stops in 3 h 59 min unless it is used\.$")
    )
    gateway.shot(page, "21-keep-alive", docs=True)
    with api(gateway, name) as client:
        shown = client.get(f"/api/v1/instances/{instance_id}/keep-alive").json()
        assert shown["cull_reason"] == "idle"
        assert 4 * 3600 - 120 < shown["cull_in"] <= 4 * 3600
        assert shown["keep_alive_until"] is not None

        page.get_by_role("button", name="End keep-alive").click()
        expect(countdown).to_have_text(re.compile(r"^Stops in (59|60) min "))
        expect(page.get_by_role("button", name="End keep-alive")).to_be_hidden()
        assert (
            client.get(f"/api/v1/instances/{instance_id}/keep-alive").json()["keep_alive_until"]
            is None
        )

        # Stopped elsewhere: the countdown goes with the running instance.
        client.delete(f"/api/v1/instances/{instance_id}")
        expect(page.locator("#ended")).to_be_visible()
        expect(page.locator("#keep-alive")).to_be_hidden()


def test_logs_page_follows_the_output(gateway):
    name = gateway.create_user("jun")
    with api(gateway, name) as client:
        instance_id = client.post("/api/v1/instances", json={"tool": "slow"}).json()["id"]
        page = gateway.page()
        gateway.sign_in(page, name, path=f"/instances/{instance_id}/logs")
        log = page.get_by_label("Output of the tool")
        expect(log).to_contain_text("waiting 1.5s before listening")
        expect(log).to_contain_text("demo: listening on", timeout=30_000)
        expect(page.locator("#state")).to_have_text("running")
        gateway.shot(page, "15-logs", docs=True)
        client.delete(f"/api/v1/instances/{instance_id}")
        expect(page.locator("#state")).to_have_text("stopped", timeout=30_000)
        expect(page.locator("#updated")).to_contain_text("last output")


def test_admin_sees_filters_and_stops_everyones_instances(gateway):
    owner = gateway.create_user("kai")
    instance_id = launch_via_api(gateway, owner)
    admin = gateway.page()
    gateway.sign_in(admin, "admin", ADMIN_PASSWORD, path="/admin/instances")
    row = admin.locator(f'tr[data-id="{instance_id}"]')
    expect(row).to_contain_text(owner)
    admin.get_by_label("User").fill(owner)
    admin.get_by_label("State").select_option("running")
    admin.get_by_role("button", name="Filter").click()
    expect(admin.locator("#instances tbody tr")).to_have_count(1)
    gateway.shot(admin, "16-admin-instances")
    admin.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name=f"Stop demo {instance_id}").click()
    admin.get_by_label("State").select_option("")
    expect(row.locator(".state")).to_have_text("stopped", timeout=30_000)

    admin.get_by_role("link", name="Sites").click()
    card = admin.locator('li.card[data-site="local"]')
    expect(card).to_contain_text("process backend")
    gateway.shot(admin, "17-admin-sites", docs=True)


def test_admin_creates_a_user_and_resets_a_password(gateway):
    admin = gateway.page()
    gateway.sign_in(admin, "admin", ADMIN_PASSWORD, path="/admin/users")
    name = unique_name("nia")
    admin.get_by_label("User name").fill(name)
    admin.get_by_role("button", name="Create user").click()
    created = admin.locator("#user-created")
    expect(created).to_contain_text(f"Created {name}.")
    generated = created.locator("code").inner_text()
    assert len(generated) >= 12
    row = admin.locator(f'tr[data-name="{name}"]')
    expect(row).to_contain_text("user")

    row.get_by_role("button", name=f"Reset password of {name}").click()
    dialog = admin.get_by_role("dialog", name="Reset password")
    expect(dialog).to_be_visible()
    dialog.get_by_label("New password").fill("short")
    dialog.get_by_role("button", name="Set password").click()
    expect(dialog.get_by_role("alert")).to_have_text("At least 8 characters.")
    dialog.get_by_label("New password").fill("reset-by-the-admin")
    dialog.get_by_role("button", name="Set password").click()
    expect(dialog).to_be_hidden()
    expect(admin.locator("#users-message")).to_contain_text(f"New password set for {name}")

    user = gateway.page()
    gateway.sign_in(user, name, "reset-by-the-admin")
    expect(user.get_by_role("heading", name="Tools", level=1)).to_be_visible()


def test_phone_sized_screens_dark_mode_and_keyboard_focus(gateway):
    name = gateway.create_user("lea")
    launch_via_api(gateway, name)
    phone = gateway.page(viewport=PHONE)
    gateway.sign_in(phone, name)
    expect(phone.get_by_role("button", name="Launch Demo")).to_be_visible()
    assert no_horizontal_scroll(phone)
    gateway.shot(phone, "18-phone-tools", docs=True)
    phone.goto(gateway.url + "/instances")
    expect(phone.locator("#instances tbody tr .state")).to_have_text("running")
    assert no_horizontal_scroll(phone)
    gateway.shot(phone, "19-phone-instances")

    dark = gateway.page(dark=True)
    gateway.sign_in(dark, name, path="/instances")
    expect(dark.locator("#instances tbody tr .state")).to_have_text("running")
    background = dark.evaluate("getComputedStyle(document.body).backgroundColor")
    channels = [int(c) for c in re.findall(r"\d+", background)[:3]]
    assert max(channels) < 60, background
    gateway.shot(dark, "20-dark-instances", docs=True)

    dark.keyboard.press("Tab")
    expect(dark.get_by_role("link", name="Skip to content")).to_be_focused()
    dark.keyboard.press("Tab")
    outline = dark.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("none", ""), outline
    with api(gateway, name) as client:
        for instance in client.get("/api/v1/instances", params={"active": "true"}).json():
            client.delete(f"/api/v1/instances/{instance['id']}")
        wait_for(
            lambda: not client.get("/api/v1/instances", params={"active": "true"}).json(),
            what="instances to stop",
        )


def test_a_failed_instance_fits_a_phone(gateway):
    name = gateway.create_user("fay")
    with api(gateway, name) as client:
        created = client.post("/api/v1/instances", json={"tool": "crashing"})
        assert created.status_code == 202, created.text
        iid = created.json()["id"]
        wait_for(
            lambda: client.get(f"/api/v1/instances/{iid}").json()["state"] == "failed",
            what="the crashing tool to fail",
        )
    phone = gateway.page(viewport=PHONE)
    gateway.sign_in(phone, name, path="/instances")
    row = phone.locator("#instances tbody tr").first  # the user's only instance
    expect(row.locator(".state")).to_have_text("failed")
    reason = row.locator(".reason")
    expect(reason).to_be_visible()
    assert no_horizontal_scroll(phone)
    box = row.bounding_box()
    reason_box = reason.bounding_box()
    assert box is not None and reason_box is not None
    assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box
    assert reason_box["x"] + reason_box["width"] <= PHONE["width"], reason_box
    gateway.shot(phone, "19b-phone-failed-instance")


# The elements wider than the screen (but for those in a table's scrolling box), for a
# failure message.
WIDE_ELEMENTS = """[...document.querySelectorAll("body *")]
  .filter(e => e.getBoundingClientRect().right > window.innerWidth && !e.closest(".table-wrap"))
  .map(e => `${e.tagName}.${e.className}#${e.id} ${Math.round(e.getBoundingClientRect().right)}`)
  .slice(0, 12)"""


def fits_its_box(locator) -> bool:
    """Whether an element's content is no wider than the element (nothing sticks out)."""
    return bool(locator.evaluate("e => e.scrollWidth <= e.clientWidth"))


def test_a_failure_reason_with_a_long_word_fits_a_phone(gateway):
    """A reason naming a path (no spaces to wrap at) is broken inside the word, on screen."""
    name = gateway.create_user("flo")
    with api(gateway, name) as client:
        created = client.post("/api/v1/instances", json={"tool": "lost-binary"})
        assert created.status_code == 202, created.text
        iid = created.json()["id"]
        wait_for(
            lambda: client.get(f"/api/v1/instances/{iid}").json()["state"] == "failed",
            what="the tool without its executable to fail",
        )
        assert LOST_BINARY in client.get(f"/api/v1/instances/{iid}").json()["reason"]
    phone = gateway.page(viewport=PHONE)
    gateway.sign_in(phone, name, path="/instances")
    row = phone.locator(f'#instances tbody tr[data-id="{iid}"]')
    expect(row.locator(".state")).to_have_text("failed")
    reason = row.locator(".reason")
    expect(reason).to_contain_text(LOST_BINARY[:20])
    assert no_horizontal_scroll(phone)
    # The table sits in a scrolling box: the page does not scroll, the table must not either.
    assert fits_its_box(phone.locator(".table-wrap").first)
    assert fits_its_box(reason)
    for box in (row.bounding_box(), reason.bounding_box()):
        assert box is not None
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], box
    gateway.shot(phone, "19c-phone-failure-reason-long-word")

    phone.goto(f"{gateway.url}/instances/{iid}")
    expect(phone.get_by_text(LOST_BINARY[:20], exact=False).first).to_be_visible()
    gateway.shot(phone, "19d-phone-failed-instance-page", full_page=True)
    assert no_horizontal_scroll(phone), phone.evaluate(WIDE_ELEMENTS)
