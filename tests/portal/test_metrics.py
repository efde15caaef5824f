"""/metrics (Prometheus) and /readyz."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from helpers import wait_for_state


@pytest.fixture
def settings(settings):
    settings.metrics_token = SecretStr("scrape-me")
    return settings


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
    scraped = await client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
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


async def test_readyz(client):
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "checks": {"database": "ok", "started": "ok", "sites": "ok"},
    }
