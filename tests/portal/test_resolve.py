"""``GET /api/v1/resolve``: the dataset, its live replicas, and a launch link per tool."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import update

from datasets_fixtures import multi_site_settings
from labgate.config import Settings
from labgate.db.models import Site, SiteReport, utcnow

DOI = "doi:10.5281/zenodo.1234"


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    # Plain http: with an https:// public URL the session cookie is Secure, which this
    # http test client would not send back.
    return multi_site_settings(tmp_path, database_url, public_url="http://labgate.example.org")


async def resolve(client: Any, headers: dict[str, str], identifier: str) -> Any:
    return await client.get("/api/v1/resolve", params={"id": identifier}, headers=headers)


async def test_resolve_answers_with_live_replicas_and_launch_links(
    app: Any, client: Any, admin_headers: dict[str, str], make_user: Any, tmp_path: Path
) -> None:
    replicas = [{"site": "east", "path": "a"}, {"site": "west", "path": "b"}]
    body = {"id": DOI, "title": "Iris", "replicas": replicas}
    assert (await client.post("/api/v1/datasets", json=body, headers=admin_headers)).is_success
    # A site the data was on, no longer part of this labgate.
    retired = tmp_path / "retired-data"
    (retired / "c").mkdir(parents=True)
    options = {"data_root": str(retired)}
    await app.state.portal.run_db(
        lambda s: s.add(Site(name="retired", backend="process", options=options))
    )
    put = await client.put(
        f"/api/v1/datasets/{DOI}/replicas/retired", json={"path": "c"}, headers=admin_headers
    )
    assert put.status_code == 200, put.text
    alice = await make_user("alice")

    response = await resolve(client, alice, "https://dx.doi.org/10.5281/ZENODO.1234")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["dataset"]["id"] == DOI and answer["dataset"]["title"] == "Iris"
    assert [r["site"] for r in answer["replicas"]] == ["east", "west"]
    assert all(r["live"] for r in answer["replicas"])
    (retired,) = answer["unavailable"]
    assert retired["site"] == "retired" and "not connected" in retired["reason"]
    assert answer["fetchable"] is False

    links = {link["tool"]: link for link in answer["launch"]}
    assert {"demo", "slow", "crashing"} <= set(links)
    demo = links["demo"]
    assert demo["sites"] == ["east", "west"]
    parts = urlsplit(demo["url"])
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "http://labgate.example.org/launch"
    assert parse_qs(parts.query) == {"dataset": [DOI], "tool": ["demo"]}


async def test_stale_replicas_are_not_offered(
    app: Any, client: Any, admin_headers: dict[str, str]
) -> None:
    push = {"replicas": [{"id": DOI, "path": "a"}], "ttl": 30}
    await client.post("/api/v1/sites/east/inventory", json=push, headers=admin_headers)
    fresh = (await resolve(client, admin_headers, DOI)).json()
    assert [r["site"] for r in fresh["replicas"]] == ["east"] and fresh["launch"]

    await app.state.portal.run_db(
        lambda s: s.execute(update(SiteReport).values(reported_at=utcnow() - timedelta(minutes=5)))
    )
    stale = (await resolve(client, admin_headers, DOI)).json()
    assert stale["replicas"] == [] and stale["launch"] == []
    assert stale["unavailable"][0]["reason"].startswith("stale")
    sites = {
        s["name"]: s for s in (await client.get("/api/v1/sites", headers=admin_headers)).json()
    }
    assert sites["east"]["inventory"]["stale"] is True


async def test_a_url_dataset_without_replicas_is_fetchable(
    client: Any, admin_headers: dict[str, str]
) -> None:
    url = "https://data.example.org/files/cars.csv"
    await client.post("/api/v1/datasets", json={"id": url, "size": 100}, headers=admin_headers)
    answer = (
        await resolve(client, admin_headers, "HTTPS://DATA.example.org:443/files/cars.csv")
    ).json()
    assert answer["dataset"]["id"] == url
    assert answer["replicas"] == [] and answer["fetchable"] is True
    assert {link["tool"] for link in answer["launch"]} >= {"demo"}
    assert answer["launch"][0]["sites"] == ["east", "west"]


async def test_resolve_errors(client: Any, admin_headers: dict[str, str]) -> None:
    invalid = await resolve(client, admin_headers, "doi:10.1/x")
    assert invalid.status_code == 400 and invalid.json()["error"] == "invalid_identifier"
    unknown = await resolve(client, admin_headers, "doi:10.1234/unknown")
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_dataset"
    anonymous = await client.get("/api/v1/resolve", params={"id": DOI})
    assert anonymous.status_code == 401
    missing = await client.get("/api/v1/resolve", headers=admin_headers)
    assert missing.status_code == 422
