"""What the browser tests share: the Gateway a test drives, waiting, launching by API."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from helpers import PASSWORD
from servers import LabgateServer

ADMIN_PASSWORD = "admin-password-for-ui-tests"
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-output" / "screenshots"
DOCS_IMAGES = REPO / "docs" / "images"
VIEWPORT = {"width": 1100, "height": 720}
PHONE = {"width": 390, "height": 780}
#: The executable a tool of the UI server lacks: its launches fail with this in the reason.
LOST_BINARY = "bin/start_the_research_tool_from_a_deliberately_long_path_without_any_spaces"
LOST_BINARY_TOOL = f"""
name = "lost-binary"
title = "Lost binary"
[process]
command = ["{LOST_BINARY}", "--port", "{{port}}"]
"""
INSTANCE_PAGE = re.compile(r"/instances/([a-z0-9]+)$")


def stop_all_instances(server: LabgateServer, timeout: float = 30) -> None:
    """Stop what the tests started: ``serve`` leaves instances running on exit."""
    headers = server.token("admin", ADMIN_PASSWORD, ["admin", "account"])
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        active = client.get("/api/v1/instances", params={"active": "true"}).json()
        for instance in active:
            client.delete(f"/api/v1/instances/{instance['id']}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = client.get("/api/v1/instances", params={"active": "true"}).json()
            if not left:
                return
            time.sleep(0.2)


def stop_instance(gateway: Gateway, user: str, instance_id: str) -> None:
    """Stop an instance as its owner (the session's server outlives the test)."""
    with httpx.Client(base_url=gateway.url, headers=gateway.token(user), timeout=10) as client:
        client.delete(f"/api/v1/instances/{instance_id}")


def unique_name(prefix: str) -> str:
    """A user name no other test of this session uses."""
    return f"{prefix}{time.monotonic_ns() // 1000 % 10**9}"


@dataclass
class Gateway:
    """The running labgate as a test sees it: its URL, an admin API client, browser pages."""

    server: LabgateServer
    browser: Any
    admin: httpx.Client
    contexts: list[Any] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: Pages (by id) where the browser dropped a request because the host's network changed.
    network_changed: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return self.server.url

    def create_user(self, prefix: str, *, is_admin: bool = False) -> str:
        """A new user with the tests' password; the name is unique per session."""
        name = unique_name(prefix)
        created = self.admin.post(
            "/api/v1/users", json={"name": name, "password": PASSWORD, "is_admin": is_admin}
        )
        assert created.status_code == 201, created.text
        return name

    def token(self, name: str, password: str = PASSWORD) -> dict[str, str]:
        """An API token for ``name`` (every user scope)."""
        return self.server.token(name, password)

    def page(self, *, viewport: dict[str, int] | None = None, dark: bool = False) -> Any:
        """A page in a fresh context (its own cookies) that records script errors."""
        context = self.browser.new_context(
            viewport=viewport or VIEWPORT,
            color_scheme="dark" if dark else "light",
            reduced_motion="reduce",
        )
        context.set_default_timeout(20_000)
        self.contexts.append(context)
        page = context.new_page()

        def on_error(error: Any) -> None:
            # Under /i/<id>/ the page is a tool's own (code-server, noVNC...): its
            # scripts' errors are the tool's business; each tool test checks what it does.
            # So is a page on an instance's own host (instance_host).
            where = urlsplit(page.url)
            if not where.path.startswith("/i/") and where.netloc == urlsplit(self.url).netloc:
                self.problems.append(f"page error: {error}")

        page.on("pageerror", on_error)

        def on_console(message: Any) -> None:
            text = message.text
            if message.type == "error" and "Content Security Policy" in text:
                self.problems.append(f"CSP: {text}")

        page.on("console", on_console)

        def on_request_failed(request: Any) -> None:
            # Chromium drops the requests in flight when an address comes or goes on any
            # of the host's interfaces: a container started on this machine (here, or by
            # the other test worker) adds a veth whose IPv6 address appears a second later.
            # The browser's own machine is not the sites' in real use.
            if "ERR_NETWORK_CHANGED" in (request.failure or ""):
                self.network_changed.add(id(page))

        page.on("requestfailed", on_request_failed)
        return page

    def dropped_on_network_change(self, page: Any) -> bool:
        """Whether the browser dropped some of ``page``'s requests on a network change
        since the last time this was asked."""
        dropped = id(page) in self.network_changed
        self.network_changed.discard(id(page))
        return dropped

    def sign_in(self, page: Any, name: str, password: str = PASSWORD, path: str = "/") -> None:
        """Sign in through the form, the way a person does."""
        page.goto(self.url + path)
        page.wait_for_url(re.compile(r"/login"))
        page.get_by_label("User name").fill(name)
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(lambda url: "/login" not in url)

    def shot(self, page: Any, name: str, *, docs: bool = False, full_page: bool = False) -> Path:
        """Save what the user sees now; with ``docs``, also for the user guide."""
        return screenshot(page, name, docs=docs, full_page=full_page)

    def close(self) -> None:
        for context in self.contexts:
            with contextlib.suppress(Exception):
                context.close()


@contextlib.contextmanager
def open_gateway(server: LabgateServer, browser: Any) -> Iterator[Gateway]:
    """``server`` and ``browser`` as a test sees them; fails when a page threw or broke the CSP."""
    headers = server.token("admin", ADMIN_PASSWORD, ["admin", "account"])
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as admin:
        gw = Gateway(server, browser, admin)
        try:
            yield gw
        finally:
            gw.close()
    assert gw.problems == [], gw.problems


def screenshot(page: Any, name: str, *, docs: bool = False, full_page: bool = False) -> Path:
    """Save what the user sees now; with ``docs`` (and LABGATE_DOCS_IMAGES=1), for the guide."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page, animations="disabled")
    if docs and os.environ.get("LABGATE_DOCS_IMAGES") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMAGES / f"{name}.png")
    return path


def wait_for(predicate: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def launch_via_api(
    gateway: Gateway,
    name: str,
    tool: str = "demo",
    *,
    params: dict[str, Any] | None = None,
    timeout: float = 30,
) -> str:
    """Launch ``tool`` as ``name`` through the API and wait until it runs; its id."""
    with httpx.Client(base_url=gateway.url, headers=gateway.token(name), timeout=10) as client:
        body: dict[str, Any] = {"tool": tool}
        if params:
            body["params"] = params
        created = client.post("/api/v1/instances", json=body)
        assert created.status_code == 202, created.text
        instance_id: str = created.json()["id"]

        def running() -> bool:
            state = client.get(f"/api/v1/instances/{instance_id}").json()["state"]
            assert state in ("pending", "starting", "running"), state
            return bool(state == "running")

        wait_for(running, timeout=timeout, what=f"{instance_id} to run")
    return instance_id
