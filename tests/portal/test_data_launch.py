"""Launch near the data: placement on a replica's site, a read-only mount, fetch into a cache."""

from __future__ import annotations

import hashlib
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from datasets_fixtures import (
    data_root,
    environment_of,
    file_server,
    instance_access,
    multi_site_settings,
    put_files,
    read_in,
    require_bwrap,
    write_in,
)
from helpers import wait_for_state
from labgate.config import Settings
from labgate.db.models import InstanceEvent, SiteReport, utcnow

DOI = "doi:10.5281/zenodo.1234"


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path, database_url: str) -> Settings:
    overrides: dict[str, Any] = getattr(request, "param", {})
    return multi_site_settings(tmp_path, database_url, **overrides)


async def register(client: Any, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    response = await client.post("/api/v1/datasets", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def launch(client: Any, headers: dict[str, str], **body: Any) -> Any:
    return await client.post("/api/v1/instances", json={"tool": "demo", **body}, headers=headers)


async def events_of(app: Any, instance_id: str) -> list[str]:
    def read(session: Any) -> list[str]:
        rows = session.scalars(
            select(InstanceEvent)
            .where(InstanceEvent.instance_id == instance_id)
            .order_by(InstanceEvent.id)
        )
        return [f"{e.kind}:{e.state.value}:{e.message}" for e in rows]

    return list(await app.state.portal.run_db(read))


async def test_the_tool_runs_where_the_data_is_and_cannot_write_it(
    app: Any, client: Any, make_user: Any, admin_headers: dict[str, str], settings: Settings
) -> None:
    require_bwrap()
    put_files(data_root(settings, "east"), "zenodo/1234", {"iris.csv": "sepal,petal\n5.1,1.4\n"})
    put_files(data_root(settings, "west"), "secret", {"s.txt": "west only"})
    replicas = [{"site": "east", "path": "zenodo/1234"}]
    await register(client, admin_headers, id=DOI, title="Iris", replicas=replicas)
    alice = await make_user("alice")

    # Without the dataset west wins (unlimited, so less loaded); with it, east holds the data.
    response = await launch(client, alice, dataset="https://doi.org/10.5281/ZENODO.1234")
    assert response.status_code == 202, response.text
    instance = response.json()
    assert instance["site"] == "east"
    assert instance["dataset"] == DOI
    assert instance["mounts"] == [
        {"dataset": DOI, "target": "/data/zenodo.1234", "read_only": True}
    ]
    await wait_for_state(client, alice, instance["id"], {"running"})
    events = await events_of(app, instance["id"])
    assert events[0] == f"state:pending:scheduled on site east, next to {DOI}"

    iid = instance["id"]
    assert await read_in(app, iid, "/data/zenodo.1234/iris.csv") == "sepal,petal\n5.1,1.4\n"
    assert not await write_in(app, iid, "/data/zenodo.1234/iris.csv")
    assert not await write_in(app, iid, "/data/zenodo.1234/new.csv")
    host_copy = data_root(settings, "east") / "zenodo/1234/iris.csv"
    assert host_copy.read_text() == "sepal,petal\n5.1,1.4\n"
    assert not (host_copy.parent / "new.csv").exists()
    # Nothing else of the data roots is visible.
    assert await read_in(app, iid, str(data_root(settings, "west") / "secret/s.txt")) is None
    _, _, pid = await instance_access(app, iid)
    assert environment_of(pid)["LABGATE_DATA_ZENODO_1234"] == "/data/zenodo.1234"


@pytest.mark.parametrize("settings", [{"sandbox": "none"}], indirect=True)
async def test_unsandboxed_the_tool_is_told_the_host_path(
    app: Any, client: Any, admin_headers: dict[str, str], settings: Settings
) -> None:
    directory = put_files(data_root(settings, "west"), "iris", {"iris.csv": "a,b\n"})
    await register(client, admin_headers, id=DOI, replicas=[{"site": "west", "path": "iris"}])
    response = await launch(client, admin_headers, dataset=DOI)
    assert response.status_code == 202, response.text
    await wait_for_state(client, admin_headers, response.json()["id"], {"running"})
    _, _, pid = await instance_access(app, response.json()["id"])
    assert environment_of(pid)["LABGATE_DATA_ZENODO_1234"] == str(directory)
    assert await read_in(app, response.json()["id"], f"{directory}/iris.csv") == "a,b\n"


async def test_no_live_replica_is_a_409_that_says_where_the_data_is(
    app: Any, client: Any, admin_headers: dict[str, str], make_user: Any
) -> None:
    alice = await make_user("alice", data_provider=True)
    await register(client, alice, id="doi:10.1234/nowhere")
    nowhere = await launch(client, alice, dataset="doi:10.1234/nowhere")
    assert nowhere.status_code == 409 and nowhere.json()["error"] == "dataset_unavailable"
    assert "has no replica on any site" in nowhere.json()["detail"]
    assert "not a URL" in nowhere.json()["detail"]

    push = {"replicas": [{"id": DOI, "path": "zenodo/1234"}], "ttl": 60}
    pushed = await client.post("/api/v1/sites/east/inventory", json=push, headers=admin_headers)
    assert pushed.status_code == 200

    def age(session: Any) -> None:
        session.execute(update(SiteReport).values(reported_at=utcnow() - timedelta(hours=2)))

    await app.state.portal.run_db(age)
    stale = await launch(client, alice, dataset=DOI)
    assert stale.status_code == 409
    body = stale.json()
    assert body["error"] == "dataset_unavailable"
    assert "site east: stale" in body["detail"] and "valid for 60 s" in body["detail"]
    assert body["replicas"][0]["site"] == "east" and body["replicas"][0]["live"] is False

    unknown = await launch(client, alice, dataset="doi:10.1234/never-registered")
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_dataset"
    invalid = await launch(client, alice, dataset="ftp://example.org/x")
    assert invalid.status_code == 400 and invalid.json()["error"] == "invalid_identifier"


async def test_a_named_site_must_hold_the_data(
    client: Any, admin_headers: dict[str, str], settings: Settings
) -> None:
    put_files(data_root(settings, "east"), "iris", {"a": "b"})
    await register(client, admin_headers, id=DOI, replicas=[{"site": "east", "path": "iris"}])
    response = await launch(client, admin_headers, dataset=DOI, site="west")
    assert response.status_code == 409
    assert response.json()["error"] == "dataset_unavailable"
    assert "west: holds no live replica" in response.json()["detail"]
    labelled = await launch(client, admin_headers, dataset=DOI, labels={"zone": "us"})
    assert labelled.status_code == 409 and labelled.json()["error"] == "dataset_unavailable"
    assert "east: lacks the labels zone=us" in labelled.json()["detail"]


async def test_a_url_dataset_is_fetched_verified_and_cached(
    app: Any, client: Any, make_user: Any, settings: Settings
) -> None:
    payload = b"id,value\n" + b"1,2\n" * 5000
    alice, bob = await make_user("alice", data_provider=True), await make_user("bob")
    with file_server() as server:
        server.files["/files/iris.csv"] = payload
        url = f"{server.url}/files/iris.csv"
        checksum = "sha256:" + hashlib.sha256(payload).hexdigest()
        await register(client, alice, id=url, size=len(payload), checksum=checksum)

        first = await launch(client, alice, dataset=url)
        assert first.status_code == 202, first.text
        iid = first.json()["id"]
        assert first.json()["mounts"][0]["target"] == "/data/iris"
        await wait_for_state(client, alice, iid, {"running"})
        events = await events_of(app, iid)
        assert any(e.startswith("progress:pending:fetching http://127.0.0.1") for e in events)
        assert any("checksum verified" in e for e in events), events
        if shutil.which("bwrap"):  # the read-only mount itself is tested above
            assert await read_in(app, iid, "/data/iris/iris.csv") == payload.decode()
            assert not await write_in(app, iid, "/data/iris/iris.csv")

        # The next launch, by anyone, uses the cached copy.
        second = await launch(client, bob, dataset=url)
        assert second.status_code == 202
        assert second.json()["site"] == first.json()["site"]
        await wait_for_state(client, bob, second.json()["id"], {"running"})
        assert server.requests == ["/files/iris.csv"]

    shown = (await client.get(f"/api/v1/datasets/{url}", headers=alice)).json()
    (cached,) = shown["replicas"]
    assert (cached["source"], cached["checksum"], cached["size"]) == (
        "cache",
        checksum,
        len(payload),
    )
    cache_dir = settings.data_dir / "cache" / cached["site"] / cached["path"]
    assert (cache_dir / "iris.csv").read_bytes() == payload


async def test_a_checksum_mismatch_fails_the_launch_and_keeps_nothing(
    app: Any, client: Any, make_user: Any, settings: Settings
) -> None:
    alice = await make_user("alice", data_provider=True)
    with file_server() as server:
        server.files["/x.bin"] = b"tampered"
        url = f"{server.url}/x.bin"
        await register(client, alice, id=url, checksum="md5:" + hashlib.md5(b"orig").hexdigest())
        response = await launch(client, alice, dataset=url)
        assert response.status_code == 202
        failed = await wait_for_state(client, alice, response.json()["id"], {"failed", "running"})
    assert failed["state"] == "failed"
    assert "checksum mismatch" in failed["reason"]
    assert not list((settings.data_dir / "cache").rglob("x.bin"))


@pytest.mark.parametrize("settings", [{"dataset_fetch_max_bytes": 1000}], indirect=True)
async def test_too_large_to_fetch(client: Any, make_user: Any) -> None:
    alice = await make_user("alice", data_provider=True)
    with file_server() as server:
        server.files["/big.bin"] = b"x" * 5000
        declared = f"{server.url}/big.bin"
        await register(client, alice, id=declared, size=5000)
        refused = await launch(client, alice, dataset=declared)
        assert refused.status_code == 409
        assert "over the fetch limit of 1000" in refused.json()["detail"]

        undeclared = f"{server.url}/big.bin?v=2"
        server.files["/big.bin?v=2"] = b"x" * 5000
        await register(client, alice, id=undeclared)
        response = await launch(client, alice, dataset=undeclared)
        assert response.status_code == 202
        failed = await wait_for_state(client, alice, response.json()["id"], {"failed"})
    assert "over the fetch limit of 1000" in failed["reason"]


async def test_private_addresses_are_not_fetched_by_default(
    tmp_path: Path, database_url: str
) -> None:
    from labgate.agent.fetch import FetchError, FetchJob, fetch

    async def progress(done: int, total: int | None) -> None:
        return None

    job = FetchJob(url="http://127.0.0.1:9/x", directory=tmp_path / "entry", max_bytes=10)
    with pytest.raises(FetchError) as caught:
        await fetch(job, progress)
    assert "not a public address" in caught.value.detail
    assert not (tmp_path / "entry").exists()


async def test_a_replica_swapped_for_a_link_after_registration_is_not_used(
    client: Any, admin_headers: dict[str, str], make_user: Any, settings: Settings
) -> None:
    root = data_root(settings, "east")
    put_files(root, "iris", {"iris.csv": "a,b\n"})
    secret = put_files(root.parent, "secret", {"passwd": "root:x:0:0\n"})
    await register(client, admin_headers, id=DOI, replicas=[{"site": "east", "path": "iris"}])
    alice = await make_user("alice")
    # Fine when registered; now a link leading out of the data root.
    shutil.rmtree(root / "iris")
    (root / "iris").symlink_to(secret)

    refused = await launch(client, alice, dataset=DOI)
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["error"] == "dataset_unavailable"
    assert "site east: refused:" in body["detail"] and "symbolic link" in body["detail"]
    assert body["replicas"][0]["live"] is False
    assert "passwd" not in refused.text and "root:x" not in refused.text
