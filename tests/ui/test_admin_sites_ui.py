"""The admin sites page in a browser: add a network site, its token once, its reach, revoke,
rotate, rm."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from ui.support import ADMIN_PASSWORD, unique_name

pytestmark = pytest.mark.slow


def test_admin_adds_revokes_rotates_and_removes_a_network_site(gateway):
    admin = gateway.page()
    gateway.sign_in(admin, "admin", ADMIN_PASSWORD, path="/admin/sites")
    name = unique_name("east")
    admin.get_by_label("Site name").fill(name)
    admin.get_by_label("Labels").fill("zone")
    admin.get_by_role("button", name="Add site").click()
    expect(admin.locator("#site-error")).to_contain_text("key=value")
    admin.get_by_label("Labels").fill("zone=lab")
    admin.get_by_label("Memory").fill("8G")
    admin.get_by_label("Group volumes root").fill("/srv/groups")
    admin.get_by_role("button", name="Add site").click()
    shown = admin.locator("#site-token")
    expect(shown).to_contain_text(f"Added {name}")
    command = admin.locator("#site-agent-command").inner_text()
    assert command.startswith(f"labgate agent --portal {gateway.url} --token lgs_"), command
    first = command.rsplit(" ", 1)[1]
    card = admin.locator(f'li.card[data-site="{name}"]')
    expect(card).to_contain_text("waiting for its agent")
    expect(card).to_contain_text("network site, reach tunnel")
    expect(card).to_contain_text("Group volumes/srv/groups")  # its agent reported none yet
    gateway.shot(admin, "17b-admin-site-added")

    admin.on("dialog", lambda dialog: dialog.accept())
    card.get_by_role("button", name=f"Change the reach of {name}").click()
    expect(card).to_contain_text("network site, reach direct")
    expect(card.get_by_role("button", name=f"Change the reach of {name}")).to_have_text(
        "Reach through its agent"
    )
    card.get_by_role("button", name=f"Revoke the token of {name}").click()
    expect(card).to_contain_text("token revoked")
    card.get_by_role("button", name=f"New token for {name}").click()
    expect(shown).to_contain_text(f"New token for {name}")
    second = admin.locator("#site-agent-command").inner_text().rsplit(" ", 1)[1]
    assert second.startswith("lgs_") and second != first
    expect(card).to_contain_text("waiting for its agent")
    card.get_by_role("button", name=f"Remove site {name}").click()
    expect(card).to_have_count(0)
    expect(admin.locator('li.card[data-site="local"]')).to_contain_text("in process")
