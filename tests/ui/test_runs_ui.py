"""The run page in a real browser: the graph goes live, a task's logs open, cancel works."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import expect

from ui.support import wait_for

pytestmark = pytest.mark.slow

DEFINITION = """
name = "in-the-browser"
[[stages]]
name = "quick"
[[stages.tasks]]
name = "hello"
command = "echo hello from the task; echo '{\\"n\\": 1}' > $LABGATE_RESULT"
[[stages]]
name = "slow"
[[stages.tasks]]
name = "nap"
command = "sleep 60"
where = {copies = 2}
"""


def test_the_run_page_follows_the_run_and_cancels_it(gateway):
    name = gateway.create_user("rue")
    with httpx.Client(base_url=gateway.url, headers=gateway.token(name), timeout=10) as client:
        run_id = client.post("/api/v1/runs", content=DEFINITION).json()["id"]
    page = gateway.page()
    gateway.sign_in(page, name, path=f"/runs/{run_id}")
    graph = page.locator("#run-graph")
    # Live: the page was rendered early; the second stage's copies turn running by polling.
    expect(graph.locator('li.run-task[data-task="hello"][data-state="succeeded"]')).to_be_visible(
        timeout=30_000
    )
    expect(graph.locator('li.run-task[data-task="nap#1"][data-state="running"]')).to_be_visible(
        timeout=30_000
    )
    graph.locator('li.run-task[data-task="hello"]').get_by_role("button", name="Logs").click()
    expect(page.locator("#task-log")).to_have_text("hello from the task\n")
    gateway.shot(page, "run-page", docs=True, full_page=True)
    page.get_by_role("button", name="Cancel run").click()
    expect(page.locator("#run-state")).to_have_text("cancelled", timeout=10_000)
    expect(page.get_by_role("button", name="Re-run failed tasks")).to_be_visible()
    page.goto(gateway.url + "/runs")
    expect(page.locator(f'a[href="/runs/{run_id}"]')).to_be_visible()
    with httpx.Client(base_url=gateway.url, headers=gateway.token(name), timeout=10) as client:
        wait_for(
            lambda: all(
                t["state"] == "cancelled"
                for t in client.get(f"/api/v1/runs/{run_id}").json()["stages"][1]["tasks"]
            ),
            what="the copies cancelled",
        )
