"""Chromium opens an instance on its own host name, ``<id>.localhost:<port>``.

Chromium resolves every ``*.localhost`` name to the loopback address
itself, so a real browser goes through the whole hand-off: the instance
host sends it to the portal's sign-in and authorization, the portal back
with a code, and the router gives it the instance's own cookie.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import pytest

from servers import LabgateServer
from tools_fixtures import write_test_tools
from ui.support import (
    ADMIN_PASSWORD,
    PASSWORD,
    Gateway,
    launch_via_api,
    open_gateway,
    stop_all_instances,
)


@pytest.fixture(scope="module")
def hosts_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabgateServer]:
    """``labgate serve`` with ``instance_host = "{id}.localhost"``."""
    base = tmp_path_factory.mktemp("ui-hosts")
    server = LabgateServer(
        base / "var",
        ADMIN_PASSWORD,
        LABGATE_TOOLS_DIR=str(write_test_tools(base / "tools")),
        LABGATE_INSTANCE_HOST="{id}.localhost",
    )
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            stop_all_instances(server)
        server.stop()


@pytest.fixture
def hosts_gateway(playwright_browser: Any, hosts_server: LabgateServer) -> Iterator[Gateway]:
    with open_gateway(hosts_server, playwright_browser) as gw:
        yield gw


def test_chromium_opens_an_instance_on_its_own_host(hosts_gateway: Gateway) -> None:
    gw = hosts_gateway
    name = gw.create_user("hosted")
    instance_id = launch_via_api(gw, name)
    host = f"{instance_id}.localhost:{gw.server.port}"
    page = gw.page()
    # Straight to the instance's address: the portal asks who this is, then hands over.
    page.goto(f"http://{host}/")
    page.wait_for_url(re.compile(r"/login"))
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"http://{host}/")
    assert page.locator("#user").inner_text() == name
    assert page.locator("#instance").inner_text() == instance_id
    # The tool's WebSocket goes to its own host, with the instance cookie.
    page.locator("#echo").filter(has_text="hello from the browser").wait_for()
    cookies = {c["name"]: c for c in page.context.cookies(f"http://{host}/")}
    assert "labgate-session" not in cookies
    instance_cookie = cookies["labgate-instance"]
    assert instance_cookie["httpOnly"] and instance_cookie["sameSite"] == "Lax"
    assert instance_cookie["domain"] == f"{instance_id}.localhost"  # host-only
    # The portal's own cookie stays on the portal's host.
    portal = {c["name"] for c in page.context.cookies(gw.url + "/")}
    assert "labgate-session" in portal and "labgate-instance" not in portal
    gw.shot(page, "instance-on-its-own-host")
    # The portal's page for the instance links to its own host.
    page.goto(f"{gw.url}/instances/{instance_id}")
    assert page.locator("#open").get_attribute("href") == f"http://{host}/"


def test_jupyterlab_runs_a_cell_on_its_own_host(hosts_gateway: Gateway) -> None:
    """JupyterLab at ``/`` of its host (base_url "/"): kernel WebSocket and all."""
    from playwright.sync_api import expect

    from ui.test_tools_ui import _run_cell, require_tool

    gw = hosts_gateway
    require_tool(gw, "jupyterlab")
    name = gw.create_user("hostedlab")
    instance_id = launch_via_api(gw, name, "jupyterlab", timeout=120)
    host = f"{instance_id}.localhost:{gw.server.port}"
    page = gw.page()
    gw.sign_in(page, name)
    # Signed in to the portal already: the hand-off needs no form, only redirects.
    page.goto(f"http://{host}/lab")
    page.wait_for_url(re.compile(rf"^http://{re.escape(host)}/lab"))
    launcher = page.locator(".jp-Launcher-section").first
    expect(launcher).to_be_visible(timeout=60_000)
    page.locator('.jp-LauncherCard[title^="Python 3"]').first.click()
    expect(page.locator(".jp-Notebook").first).to_be_visible()
    _run_cell(page, "6*7")
    out = page.locator(".jp-OutputArea-output").first
    try:
        expect(out).to_contain_text("42", timeout=30_000)
    except AssertionError:  # the kernel restarted under the first run: run the cell again
        page.locator(".jp-Notebook .jp-Cell .cm-content").first.click()
        page.keyboard.press("Control+Enter")
        expect(out).to_contain_text("42", timeout=60_000)
    # Asked from the page (Chromium resolves *.localhost; Playwright's own client does not).
    me = page.evaluate("fetch('/api/me').then((answer) => answer.json())")
    assert me["identity"]["username"] == name, me
