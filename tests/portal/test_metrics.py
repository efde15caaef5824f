"""/metrics (Prometheus) and /readyz: the names, and values that follow what happened."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy import select

from helpers import wait_for_state
from labgate.db.models import UsageRecord
from tools_fixtures import QUICK_TOOL

SCRAPER = {"Authorization": "Bearer scrape-me"}


@pytest.fixture
def settings(settings):
    settings.metrics_token = SecretStr("scrape-me")
    (settings.tools_dir / "quick.toml").write_text(QUICK_TOOL)
    settings.cull_interval = 0.2
    settings.cull_warning = 1.0
    return settings


def sample(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """The value of the sample ``name`` with exactly ``labels`` in an exposition text."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    if default is None:
        raise AssertionError(f"no sample {name}{labels} in /metrics")
    return default


def users_instances(text: str) -> float:
    """Users' instances over every state and site in ``labgate_instances``."""
    return sum(
        found.value
        for family in text_string_to_metric_families(text)
        if family.name == "labgate_instances"
        for found in family.samples
        if found.labels["kind"] == "user"
    )


async def scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics", headers=SCRAPER)
    assert response.status_code == 200, response.text
    return response.text


async def eventually(
    client: httpx.AsyncClient, check: Callable[[str], bool], timeout: float = 10
) -> str:
    """Scrape until ``check`` holds (counters may be bumped just after a state shows)."""
    deadline = time.monotonic() + timeout
    while True:
        text = await scrape(client)
        if check(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"/metrics never got there:\n{text}")
        await asyncio.sleep(0.1)


async def launch(client: httpx.AsyncClient, headers: dict[str, str], tool: str) -> str:
    response = await client.post("/api/v1/instances", json={"tool": tool}, headers=headers)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def test_metrics_need_a_token_and_count_launches(client, make_user, admin_headers):
    alice = await make_user("alice")
    assert (await client.get("/metrics")).status_code == 401
    assert (await client.get("/metrics", headers=alice)).status_code == 403
    wrong = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401

    iid = (await client.post("/api/v1/instances", json={"tool": "demo"}, headers=alice)).json()[
        "id"
    ]
    await wait_for_state(client, alice, iid, {"running"})
    scraped = await client.get("/metrics", headers=SCRAPER)
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    text = scraped.text
    assert 'labgate_instances{kind="user",site="local",state="running"} 1.0' in text
    assert 'labgate_launch_duration_seconds_count{kind="cold",tool="demo"} 1.0' in text
    assert "labgate_pending_launches 0.0" in text
    for name in (
        "labgate_router_requests_total",
        "labgate_router_response_seconds_bucket",
        "labgate_router_bytes_total",
        "labgate_router_open_websockets",
        "labgate_culls_total",
    ):
        assert name in text, name
    assert (await client.get("/metrics", headers=admin_headers)).status_code == 200


async def test_readyz(client, app):
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    replica = app.state.portal.leader.replica
    assert ready.json() == {
        "ready": True,
        "checks": {"database": "ok", "started": "ok", "sites": "ok"},
        "sites": {"local": "ok"},
        # One process (labgate serve): it always leads.
        "replica": replica,
        "leading": True,
        "leader": replica,
    }


async def test_the_only_portal_leads(app, client):
    text = await scrape(client)
    replica = app.state.portal.leader.replica
    assert f'labgate_leader{{replica="{replica}"}} 1.0' in text.splitlines()
    assert "labgate_leader_term 0.0" in text.splitlines()


async def test_an_idle_cull_counts_once(app, client, make_user):
    alice = await make_user("alice")
    start = await scrape(client)
    before = sample(start, "labgate_culls_total", 0.0, reason="idle")
    lifetime = sample(start, "labgate_culls_total", 0.0, reason="lifetime")
    iid = await launch(client, alice, "quick")
    await wait_for_state(client, alice, iid, {"running"})
    await wait_for_state(client, alice, iid, {"stopped"}, timeout=30)
    culled = await app.state.portal.run_db(
        lambda s: s.scalar(select(UsageRecord.reason).where(UsageRecord.instance_id == iid))
    )
    assert culled == "idle"
    await eventually(
        client, lambda t: sample(t, "labgate_culls_total", 0.0, reason="idle") >= before + 1
    )
    await asyncio.sleep(1.0)  # several more sweeps: a stopped instance is not culled again
    text = await scrape(client)
    assert sample(text, "labgate_culls_total", reason="idle") == before + 1
    assert sample(text, "labgate_culls_total", 0.0, reason="lifetime") == lifetime


async def test_router_traffic_is_counted(client, make_user, router_url):
    alice = await make_user("alice")
    iid = await launch(client, alice, "demo")
    await wait_for_state(client, alice, iid, {"running"})
    before = await scrape(client)
    n = 7
    body_bytes = 0
    async with httpx.AsyncClient(base_url=router_url, headers=alice, timeout=10) as router:
        for _ in range(n):
            response = await router.get(f"/i/{iid}/api/info")
            assert response.status_code == 200, response.text
            assert "content-encoding" not in response.headers
            body_bytes += len(response.content)

    def grew(name: str, text: str, **labels: str) -> float:
        return sample(text, name, **labels) - sample(before, name, **labels)

    after = await eventually(
        client,
        lambda t: (
            grew("labgate_router_response_seconds_count", t) >= n
            and grew("labgate_router_bytes_total", t, direction="out") >= body_bytes
        ),
    )
    assert grew("labgate_router_requests_total", after) >= n
    assert grew("labgate_router_response_seconds_count", after) >= n
    assert grew("labgate_router_response_seconds_sum", after) > 0
    assert grew("labgate_router_response_seconds_bucket", after, le="+Inf") >= n
    assert grew("labgate_router_bytes_total", after, direction="in") >= n * len("GET / HTTP/1.1")
    assert grew("labgate_router_bytes_total", after, direction="out") >= body_bytes > 0
    # Counters never go back between scrapes.
    again = await scrape(client)
    for name, labels in (
        ("labgate_router_requests_total", {}),
        ("labgate_router_bytes_total", {"direction": "in"}),
        ("labgate_router_bytes_total", {"direction": "out"}),
    ):
        assert sample(again, name, **labels) >= sample(after, name, **labels), name


async def test_instances_gauge_and_cold_launch_count(client, make_user):
    alice = await make_user("alice")
    running = {"state": "running", "site": "local", "kind": "user"}
    cold = {"tool": "demo", "kind": "cold"}
    text = await scrape(client)
    idle_running = sample(text, "labgate_instances", **running)
    idle_total = users_instances(text)
    launched = sample(text, "labgate_launch_duration_seconds_count", 0.0, **cold)
    for round_ in (1, 2):
        iid = await launch(client, alice, "demo")
        await wait_for_state(client, alice, iid, {"running"})
        text = await eventually(
            client,
            lambda t, r=round_: (
                sample(t, "labgate_launch_duration_seconds_count", 0.0, **cold) >= launched + r
            ),
        )
        assert sample(text, "labgate_instances", **running) == idle_running + 1
        assert sample(text, "labgate_launch_duration_seconds_count", **cold) == launched + round_
        assert sample(text, "labgate_launch_duration_seconds_sum", **cold) > 0
        assert sample(text, "labgate_pending_launches") == 0
        stopped = await client.delete(f"/api/v1/instances/{iid}", headers=alice)
        assert stopped.status_code == 202, stopped.text
        await wait_for_state(client, alice, iid, {"stopped"})
        text = await scrape(client)
        assert sample(text, "labgate_instances", **running) == idle_running
        assert sample(text, "labgate_instances", **{**running, "state": "stopping"}) == 0
        assert users_instances(text) == idle_total  # a stopped instance is in no state
        # Stopping is no launch.
        assert sample(text, "labgate_launch_duration_seconds_count", **cold) == launched + round_
