"""The dataset API: register, list and search, show, update, delete, replicas, inventory, sites."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from datasets_fixtures import data_root, multi_site_settings
from helpers import ADMIN_PASSWORD, token_for
from labgate.config import Settings

DOI = "doi:10.5281/zenodo.1234"


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return multi_site_settings(tmp_path, database_url)


@pytest.fixture
async def reporter(client: Any) -> dict[str, str]:
    """A least-privilege token for a site's inventory job: sites:report only."""
    return await token_for(client, "admin", ADMIN_PASSWORD, ["sites:report"])


async def register(client: Any, headers: dict[str, str], **body: Any) -> Any:
    response = await client.post("/api/v1/datasets", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


async def test_register_show_update_delete(client: Any, make_user: Any) -> None:
    alice, bob = (
        await make_user("alice", data_provider=True),
        await make_user("bob", data_provider=True),
    )
    created = await register(
        client, alice, id="https://doi.org/10.5281/ZENODO.1234", title="Iris", size=4096
    )
    assert created["id"] == DOI and created["owner"] == "alice" and created["name"] == "zenodo.1234"
    assert created["resolver_url"] == "https://doi.org/10.5281/zenodo.1234"

    for spelling in (DOI, "https://doi.org/10.5281/zenodo.1234", quote(DOI, safe="")):
        shown = await client.get(f"/api/v1/datasets/{spelling}", headers=bob)
        assert shown.status_code == 200, (spelling, shown.text)
        assert shown.json()["title"] == "Iris"

    again = await client.post("/api/v1/datasets", json={"id": "10.5281/zenodo.1234"}, headers=bob)
    assert again.status_code == 409 and again.json()["error"] == "dataset_exists"

    refused = await client.patch(f"/api/v1/datasets/{DOI}", json={"title": "x"}, headers=bob)
    assert refused.status_code == 403
    patched = await client.patch(
        f"/api/v1/datasets/{DOI}", json={"title": "Iris v2", "license": "CC0-1.0"}, headers=alice
    )
    assert patched.json()["title"] == "Iris v2" and patched.json()["license"] == "CC0-1.0"

    assert (await client.delete(f"/api/v1/datasets/{DOI}", headers=bob)).status_code == 403
    assert (await client.delete(f"/api/v1/datasets/{DOI}", headers=alice)).status_code == 204
    gone = await client.get(f"/api/v1/datasets/{DOI}", headers=alice)
    assert gone.status_code == 404 and gone.json()["error"] == "unknown_dataset"


async def test_admins_may_change_anyones_datasets(
    client: Any, make_user: Any, admin_headers: dict[str, str]
) -> None:
    alice = await make_user("alice", data_provider=True)
    await register(client, alice, id=DOI)
    response = await client.patch(
        f"/api/v1/datasets/{DOI}", json={"size": 1}, headers=admin_headers
    )
    assert response.status_code == 200
    deleted = await client.delete(f"/api/v1/datasets/{DOI}", headers=admin_headers)
    assert deleted.status_code == 204


async def test_invalid_identifiers_are_refused_with_the_reason(client: Any, make_user: Any) -> None:
    alice = await make_user("alice", data_provider=True)
    response = await client.post("/api/v1/datasets", json={"id": "doi:10.12/x"}, headers=alice)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_identifier"
    assert "not a DOI prefix" in response.json()["detail"]
    scripted = await client.post(
        "/api/v1/datasets", json={"id": DOI, "landing_page": "javascript:alert(1)"}, headers=alice
    )
    assert scripted.status_code == 422 and "http:// or https://" in scripted.json()["detail"]
    bad_checksum = await client.post(
        "/api/v1/datasets", json={"id": DOI, "checksum": "sha256:abc"}, headers=alice
    )
    assert bad_checksum.status_code == 422
    assert "64 hex digits" in bad_checksum.json()["detail"]


async def test_scopes(client: Any, make_user: Any, reporter: dict[str, str]) -> None:
    alice = await make_user("alice", data_provider=True)
    read_only = await token_for(client, "alice", "user-password-123", ["instances:read"])
    refused = await client.post("/api/v1/datasets", json={"id": DOI}, headers=read_only)
    assert refused.status_code == 403 and refused.json()["error"] == "insufficient_scope"
    # Saying what a site holds decides what is mounted for others: admins' scope only.
    with_replica = {"id": DOI, "replicas": [{"site": "east", "path": "iris"}]}
    refused = await client.post("/api/v1/datasets", json=with_replica, headers=alice)
    assert refused.status_code == 403 and "sites:report" in refused.json()["detail"]
    grant = await client.post(
        "/api/v1/tokens",
        json={"scopes": ["sites:report"]},
        headers=alice,
    )
    assert grant.status_code == 403
    pushed = await client.post("/api/v1/sites/east/inventory", json={"replicas": []}, headers=alice)
    assert pushed.status_code == 403
    assert (
        await client.post("/api/v1/sites/east/inventory", json={"replicas": []}, headers=reporter)
    ).status_code == 200


async def test_replicas_are_registered_and_shown_with_liveness(
    client: Any, admin_headers: dict[str, str], reporter: dict[str, str]
) -> None:
    body = {"id": DOI, "replicas": [{"site": "east", "path": "zenodo/1234", "size": 10}]}
    created = await register(client, admin_headers, **body)
    (east,) = created["replicas"]
    assert (east["site"], east["path"], east["live"], east["source"]) == (
        "east",
        "zenodo/1234",
        True,
        "registered",
    )
    put = await client.put(
        f"/api/v1/datasets/{DOI}/replicas/west",
        json={"path": "mirror/iris", "checksum": "MD5:" + "A" * 32},
        headers=reporter,
    )
    assert put.status_code == 200, put.text
    assert put.json()["checksum"] == "md5:" + "a" * 32
    escape = await client.put(
        f"/api/v1/datasets/{DOI}/replicas/west", json={"path": "../../etc"}, headers=reporter
    )
    assert escape.status_code == 400
    nowhere = await client.put(
        f"/api/v1/datasets/{DOI}/replicas/north", json={"path": "x"}, headers=reporter
    )
    assert nowhere.status_code == 404 and nowhere.json()["error"] == "unknown_site"
    shown = (await client.get(f"/api/v1/datasets/{DOI}", headers=reporter)).json()
    assert [r["site"] for r in shown["replicas"]] == ["east", "west"]
    removed = await client.delete(f"/api/v1/datasets/{DOI}/replicas/east", headers=reporter)
    assert removed.status_code == 204
    shown = (await client.get(f"/api/v1/datasets/{DOI}", headers=reporter)).json()
    assert [r["site"] for r in shown["replicas"]] == ["west"]


async def test_list_and_search(client: Any, make_user: Any, reporter: dict[str, str]) -> None:
    alice = await make_user("alice", data_provider=True)
    await register(client, alice, id=DOI, title="Iris flowers")
    await register(client, alice, id="hdl:20.500.12345/penguins", title="Penguins")
    await register(client, alice, id="https://example.org/data/cars.csv", title="Cars")
    await client.put(
        "/api/v1/datasets/hdl:20.500.12345/penguins/replicas/west",
        json={"path": "penguins"},
        headers=reporter,
    )

    async def ids(**params: Any) -> list[str]:
        response = await client.get("/api/v1/datasets", params=params, headers=alice)
        assert response.status_code == 200, response.text
        assert int(response.headers["X-Total-Count"]) >= len(response.json())
        return [d["id"] for d in response.json()]

    assert await ids() == [DOI, "hdl:20.500.12345/penguins", "https://example.org/data/cars.csv"]
    assert await ids(q="flowers") == [DOI]
    assert await ids(q="https://doi.org/10.5281/ZENODO.1234") == [DOI]
    assert await ids(site="west") == ["hdl:20.500.12345/penguins"]
    assert await ids(scheme="url") == ["https://example.org/data/cars.csv"]
    assert await ids(limit=1, offset=2) == ["https://example.org/data/cars.csv"]


async def test_inventory_push_in_parts(
    client: Any, reporter: dict[str, str], admin_headers: dict[str, str]
) -> None:
    first = {
        "replicas": [
            {"id": DOI, "path": "zenodo/1234", "size": 10, "checksum": "sha256:" + "0" * 64},
            {"id": "doi:10.1234/old", "path": "old"},
        ],
        "ttl": 600,
    }
    done = await client.post("/api/v1/sites/east/inventory", json=first, headers=reporter)
    assert done.status_code == 200, done.text
    body = done.json()
    assert (body["added"], body["datasets_created"], body["replicas"], body["ttl"]) == (
        2,
        2,
        2,
        600,
    )

    part = {"replicas": [{"id": DOI, "path": "zenodo/1234"}], "push": "nightly-1", "final": False}
    one = (await client.post("/api/v1/sites/east/inventory", json=part, headers=reporter)).json()
    assert (one["updated"], one["removed"], one["replicas"]) == (1, 0, 2)
    last = {"replicas": [{"id": "bad id", "path": "x"}], "push": "nightly-1"}
    two = (await client.post("/api/v1/sites/east/inventory", json=last, headers=reporter)).json()
    assert (two["removed"], two["replicas"], two["rejected_count"]) == (1, 1, 1)
    assert two["rejected"][0]["id"] == "bad id"

    unknown = await client.post("/api/v1/sites/north/inventory", json={}, headers=reporter)
    assert unknown.status_code == 404

    sites = {
        s["name"]: s for s in (await client.get("/api/v1/sites", headers=admin_headers)).json()
    }
    east = sites["east"]
    assert east["inventory"]["replicas"] == 1 and east["inventory"]["stale"] is False
    assert east["inventory"]["reporter"] == "admin"
    assert sites["west"]["inventory"] is None


async def test_sites_show_capacity_use_labels_and_liveness(
    client: Any, make_user: Any, settings: Settings
) -> None:
    alice = await make_user("alice")
    launched = await client.post(
        "/api/v1/instances", json={"tool": "demo", "site": "east"}, headers=alice
    )
    assert launched.status_code == 202
    sites = {s["name"]: s for s in (await client.get("/api/v1/sites", headers=alice)).json()}
    east, west = sites["east"], sites["west"]
    assert east["capacity"] == {"cpu": 8.0, "memory": 16 * 1024**3, "max_instances": 10}
    assert east["use"] == {"cpu": 0.5, "memory": 512 * 1024**2, "instances": 1}
    assert east["instances"] == 1 and west["instances"] == 0
    assert east["labels"] == {"zone": "eu"} and east["live"] is True
    assert east["data_root"] == str(settings.sites[0].data_root)
    assert west["capacity"] == {"cpu": 0.0, "memory": 0, "max_instances": 0}


async def test_registering_a_dataset_needs_the_data_provider_role(
    client: Any, make_user: Any, admin_headers: dict[str, str]
) -> None:
    alice = await make_user("alice")
    body = {"id": DOI, "title": "Mine", "landing_page": "https://evil.example/"}
    refused = await client.post("/api/v1/datasets", json=body, headers=alice)
    assert refused.status_code == 403
    assert refused.json()["error"] == "not_data_provider"
    assert "data-provider role" in refused.json()["detail"]
    assert set(refused.json()) == {"error", "detail"}
    listed = await client.get("/api/v1/datasets", headers=alice)
    assert listed.json() == []  # nothing was taken

    coerced = await client.patch(
        "/api/v1/users/alice", json={"data_provider": 1}, headers=admin_headers
    )
    assert coerced.status_code in (400, 422)
    refused_self = await client.patch(
        "/api/v1/users/alice", json={"data_provider": True}, headers=alice
    )
    assert refused_self.status_code == 403  # only admins grant it
    granted = await client.patch(
        "/api/v1/users/alice", json={"data_provider": True}, headers=admin_headers
    )
    assert granted.status_code == 200 and granted.json()["data_provider"] is True
    created = await client.post("/api/v1/datasets", json=body, headers=alice)
    assert created.status_code == 201 and created.json()["owner"] == "alice"

    # Revoked: no new datasets, but what alice registered stays hers to change.
    revoked = await client.patch(
        "/api/v1/users/alice", json={"data_provider": False}, headers=admin_headers
    )
    assert revoked.json()["data_provider"] is False
    again = await client.post("/api/v1/datasets", json={"id": "doi:10.1234/b"}, headers=alice)
    assert again.status_code == 403 and again.json()["error"] == "not_data_provider"
    patched = await client.patch(f"/api/v1/datasets/{DOI}", json={"title": "v2"}, headers=alice)
    assert patched.status_code == 200 and patched.json()["owner"] == "alice"
    # Admins register without the role.
    assert (
        await client.post("/api/v1/datasets", json={"id": "doi:10.1234/c"}, headers=admin_headers)
    ).status_code == 201


async def test_replica_paths_are_resolved_on_the_site(
    client: Any, admin_headers: dict[str, str], reporter: dict[str, str], settings: Settings
) -> None:
    root = data_root(settings, "east")
    secret = root.parent / "secret"
    secret.mkdir()
    (secret / "passwd").write_text("root:x:0:0\n")
    (root / "escape").symlink_to(secret)
    (root / "etc").symlink_to("../../../../../../../../etc")
    (root / "inside").symlink_to("iris")  # stays inside, still refused: no links at all
    await register(client, admin_headers, id=DOI)

    for path in ("escape", "escape/", "etc", "inside", "missing", "iris/missing"):
        put = await client.put(
            f"/api/v1/datasets/{DOI}/replicas/east", json={"path": path}, headers=reporter
        )
        assert put.status_code == 400, (path, put.text)
        assert put.json()["error"] == "bad_replica_path"
        expected = "does not exist" if "missing" in path else "symbolic link"
        assert expected in put.json()["detail"], put.json()
    with_replica = {"id": "doi:10.1234/x", "replicas": [{"site": "east", "path": "escape"}]}
    refused = await client.post("/api/v1/datasets", json=with_replica, headers=admin_headers)
    assert refused.status_code == 400 and refused.json()["error"] == "bad_replica_path"

    # A push refuses the bad entries one by one, with the reason, and applies the rest.
    push = {
        "replicas": [
            {"id": DOI, "path": "iris"},
            {"id": "doi:10.1234/escape", "path": "escape"},
            {"id": "doi:10.1234/etc", "path": "etc/ssh"},
            {"id": "doi:10.1234/missing", "path": "nowhere"},
        ]
    }
    pushed = await client.post("/api/v1/sites/east/inventory", json=push, headers=reporter)
    assert pushed.status_code == 200, pushed.text
    result = pushed.json()
    assert (result["added"], result["rejected_count"], result["replicas"]) == (1, 3, 1)
    reasons = {r["id"]: r["reason"] for r in result["rejected"]}
    assert "symbolic link" in reasons["doi:10.1234/escape"]
    assert "symbolic link" in reasons["doi:10.1234/etc"]
    assert "does not exist" in reasons["doi:10.1234/missing"]
    shown = (await client.get(f"/api/v1/datasets/{DOI}", headers=reporter)).json()
    assert [(r["site"], r["path"]) for r in shown["replicas"]] == [("east", "iris")]
