"""Every built-in tool, launched through the API and used through the router in Chromium.

Each test does one real thing in its tool: VS Code runs a command in its
terminal and opens the file it wrote; the desktop shows a non-blank screen
and a keystroke reaches its xterm; Streamlit and Shiny render a value
computed from an input; JupyterLab runs a cell in Python and in R. The
launch form is tested here too: its fields, a refusal naming the field, and
the last values offered again.

A tool this machine cannot run is skipped with the install command (the
API's ``unavailable_reason``); with ``CI=true`` it fails instead, and
``.ci/run`` installs them all.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from ui.support import INSTANCE_PAGE, Gateway, launch_via_api, stop_instance
from ui.tool_steps import USES, use_tool

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def require_tool(gateway: Gateway, tool: str) -> None:
    """Skip (fail in CI) when this machine cannot run ``tool``, saying what to install."""
    shown = gateway.admin.get(f"/api/v1/tools/{tool}").json()
    if shown.get("available"):
        return
    reason = shown.get("unavailable_reason") or shown
    if os.environ.get("CI") == "true":
        pytest.fail(f"{tool} cannot run: {reason}")
    pytest.skip(f"{tool} cannot run here: {reason}")


def workspace(gateway: Gateway, user: str) -> Path:
    """The user's workspace on the local site, made if it is not there yet."""
    path = gateway.server.data_dir / "workspaces" / user
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_the_launch_form_sends_params_refuses_bad_ones_and_remembers(gateway: Gateway) -> None:
    name = gateway.create_user("flo")
    page = gateway.page()
    gateway.sign_in(page, name)
    card = page.locator('li.card[data-tool="form"]')
    expect(card.get_by_label("Screen size")).to_have_value("1280x800")
    expect(card.get_by_label("App file")).to_have_value("app.py")
    card.get_by_label("Screen size").select_option("1920x1080")
    card.get_by_label("gpus").fill("9")
    card.get_by_role("button", name="Launch").click()
    # The API refuses it and names the field; the form marks it.
    expect(card.locator(".form-error")).to_contain_text("at most 4")
    expect(card.get_by_label("gpus")).to_have_attribute("aria-invalid", "true")
    gateway.shot(page, "tools-launch-form-refused")

    card.get_by_label("gpus").fill("2")
    card.get_by_label("App file").fill("apps/dash.py")
    card.get_by_role("button", name="Launch").click()
    page.wait_for_url(INSTANCE_PAGE)
    instance_id = INSTANCE_PAGE.search(page.url).group(1)  # type: ignore[union-attr]
    page.wait_for_url(re.compile(rf"/i/{instance_id}/$"), timeout=30_000)
    info = page.request.get(f"{gateway.url}/i/{instance_id}/api/info").json()
    assert info["params"]["LABGATE_PARAM_SIZE"] == "1920x1080"
    assert info["params"]["LABGATE_PARAM_GPUS"] == "2"
    assert info["demo_env"]["DEMO_APP"] == "apps/dash.py"

    # The next launch form offers the values chosen last.
    page.goto(gateway.url + "/")
    card = page.locator('li.card[data-tool="form"]')
    expect(card.get_by_label("Screen size")).to_have_value("1920x1080")
    expect(card.get_by_label("App file")).to_have_value("apps/dash.py")
    card.scroll_into_view_if_needed()
    gateway.shot(page, "tools-launch-form", docs=True)
    stop_instance(gateway, name, instance_id)


@pytest.mark.parametrize("tool", list(USES))
def test_each_tool_does_one_real_thing_through_the_router(gateway: Gateway, tool: str) -> None:
    """VS Code's terminal and editor, the desktop's screen and xterm, Streamlit and Shiny apps."""
    require_tool(gateway, tool)
    name = gateway.create_user(tool[:4])
    instance_id = use_tool(
        gateway, name, USES[tool], lambda: workspace(gateway, name), f"tool-{tool}", docs=True
    )
    stop_instance(gateway, name, instance_id)


def _run_cell(page: Any, code: str) -> None:
    # Wait for the kernel (the status bar says "<kernel> | Idle"): a cell run before is lost.
    idle = page.get_by_role("button", name=re.compile(r"\| Idle$"))
    expect(idle).to_be_visible(timeout=60_000)
    cell = page.locator(".jp-Notebook .jp-Cell .cm-content").first
    expect(cell).to_be_visible(timeout=60_000)
    # A new notebook may still be settling: type again until the cell holds the code.
    for _ in range(5):
        cell.click()
        page.keyboard.type(code)
        if code in (cell.text_content() or ""):
            break
        time.sleep(1)
    expect(cell).to_have_text(code)
    page.keyboard.press("Shift+Enter")


@pytest.mark.parametrize(
    ("kernel", "code", "output"), [("Python 3", "6*7", "42"), ("R", "6*7", "42")]
)
def test_jupyterlab_runs_a_cell(gateway: Gateway, kernel: str, code: str, output: str) -> None:
    require_tool(gateway, "jupyterlab")
    name = gateway.create_user("jo")
    instance_id = launch_via_api(gateway, name, "jupyterlab", timeout=120)
    page = gateway.page()
    gateway.sign_in(page, name, path=f"/i/{instance_id}/lab")
    launcher = page.locator(".jp-Launcher-section").first
    expect(launcher).to_be_visible(timeout=60_000)
    card = page.locator(f'.jp-LauncherCard[title^="{kernel}"]').first
    if kernel == "R" and card.count() == 0:
        if os.environ.get("CI") == "true":
            pytest.fail("no R kernel in JupyterLab: apt-get install r-cran-irkernel")
        pytest.skip("no R kernel in JupyterLab: apt-get install r-cran-irkernel")
    card.click()
    expect(page.locator(".jp-Notebook").first).to_be_visible()
    _run_cell(page, code)
    out = page.locator(".jp-OutputArea-output").first
    try:
        expect(out).to_contain_text(output, timeout=30_000)
    except AssertionError:  # the kernel restarted under the first run: run the cell again
        page.locator(".jp-Notebook .jp-Cell .cm-content").first.click()
        page.keyboard.press("Control+Enter")
        expect(out).to_contain_text(output, timeout=60_000)
    # Named as in labgate, not "Anonymous <moon>".
    me = page.request.get(f"{gateway.url}/i/{instance_id}/api/me").json()
    assert me["identity"]["username"] == name, me
    no_news = page.get_by_role("button", name="No", exact=True)
    if no_news.count():  # JupyterLab's news prompt (docs/tools.md): answer it for the picture
        no_news.click()
    gateway.shot(page, f"tool-jupyterlab-{'r' if kernel == 'R' else 'python'}", docs=True)
    stop_instance(gateway, name, instance_id)
