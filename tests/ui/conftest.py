"""Browser tests: Debian's Chromium driven by Playwright against a real ``labgate serve``.

One server serves the whole session and one browser each test module (the
machine has two cores); each test gets fresh browser contexts, so cookies
never leak between users. Every scenario saves screenshots under ``test-output/screenshots/``;
with ``LABGATE_DOCS_IMAGES=1`` the ones the user guide shows are also
written to ``docs/images/``.

Outside CI the tests skip when ``/usr/bin/chromium`` is missing; with
``CI=true`` they fail instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from servers import LabgateServer
from tools_fixtures import write_test_tools
from ui.support import (
    ADMIN_PASSWORD,
    LOST_BINARY_TOOL,
    Gateway,
    open_gateway,
    stop_all_instances,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def playwright_browser() -> Iterator[Any]:
    """Headless Chromium, once per test module.

    Not once per session: Playwright's sync API keeps an event loop running
    in this thread while it is open, and pytest-asyncio cannot run the
    async tests of other modules meanwhile.
    """
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("/usr/bin/chromium is missing: apt-get install chromium")
        pytest.skip("apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabgateServer]:
    """``labgate serve`` (router in front, portal behind) with crashing and slow test tools."""
    base = tmp_path_factory.mktemp("ui")
    tools = write_test_tools(base / "tools")
    # Fails at once, with a failure reason holding one long word (the missing path).
    (tools / "lost-binary.toml").write_text(LOST_BINARY_TOOL)
    server = LabgateServer(base / "var", ADMIN_PASSWORD, LABGATE_TOOLS_DIR=str(tools))
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            stop_all_instances(server)
        server.stop()


@pytest.fixture
def gateway(playwright_browser: Any, ui_server: LabgateServer) -> Iterator[Gateway]:
    """The session's labgate and browser, with this test's contexts closed afterwards.

    A test fails when a page threw an uncaught error or broke the
    Content-Security-Policy.
    """
    with open_gateway(ui_server, playwright_browser) as gw:
        yield gw
