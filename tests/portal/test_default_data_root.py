"""Datasets out of the box: the default local site has a data root under the data dir.

These steps are those of docs/datasets.md ("Try it on make run"), through the API.
"""

from __future__ import annotations

from typing import Any

from labgate.config import Settings


async def test_the_local_site_holds_replicas_without_settings(
    client: Any, admin_headers: dict[str, str], settings: Settings
) -> None:
    assert not settings.sites
    root = (settings.data_dir / "datasets").resolve()
    assert root.is_dir()  # made at start, like logs/ and workspaces/
    sites = (await client.get("/api/v1/sites", headers=admin_headers)).json()
    assert [(s["name"], s["data_root"]) for s in sites] == [("local", str(root))]

    (root / "iris").mkdir()
    (root / "iris" / "iris.csv").write_text("sepal_length,species\n5.1,setosa\n")
    response = await client.post(
        "/api/v1/datasets",
        json={
            "id": "https://example.org/iris",
            "name": "iris",
            "title": "Iris",
            "replicas": [{"site": "local", "path": "iris"}],
        },
        headers=admin_headers,
    )
    assert response.status_code == 201, response.text
    found = await client.get(
        "/api/v1/resolve", params={"id": "https://example.org/iris"}, headers=admin_headers
    )
    assert found.status_code == 200, found.text
    assert "local" in found.text
