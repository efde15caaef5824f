"""Snapshots through the API: save, launch from, share, revoke, delete.

Workspace archives (process backend) run everywhere; container images
(commit, push to a real registry, pull, launch) need Podman (tests/podman.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import podman
from helpers import tool_client, wait_for_state
from labgate.config import Settings, SiteConfig
from podman import Engine, Registry

engine = podman.engine
registry = podman.registry
deployment = podman.deployment


async def launch(client: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> str:
    response = await client.post("/api/v1/instances", json=body, headers=headers)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def running(client: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> str:
    iid = await launch(client, headers, **body)
    state = await wait_for_state(client, headers, iid, {"running", "failed"})
    assert state["state"] == "running", state
    return iid


async def take(client: httpx.AsyncClient, headers: dict[str, str], iid: str, **body: Any) -> str:
    response = await client.post(f"/api/v1/instances/{iid}/snapshot", json=body, headers=headers)
    assert response.status_code == 202, response.text
    # Saving goes on after the answer, which may already see a small workspace saved.
    assert response.json()["state"] in {"saving", "ready"}, response.text
    return str(response.json()["id"])


async def wait_snapshot(
    client: httpx.AsyncClient, headers: dict[str, str], sid: str, timeout: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = (
            await client.get(f"/api/v1/snapshots/{sid}", headers=headers)
        ).json()
        if body["state"] != "saving":
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.2)


class Tool:
    """The demo tool of one instance, reached straight at its endpoint with its token."""

    def __init__(self, endpoint: str, secret: str, iid: str) -> None:
        self.endpoint = endpoint
        self.base = f"/i/{iid}"
        self.headers = {"Authorization": f"token {secret}"}

    @classmethod
    async def of(cls, app: Any, iid: str) -> Tool:
        from labgate.db.models import Instance

        def read(session: Any) -> tuple[str, str]:
            row = session.get(Instance, iid)
            return row.endpoint, app.state.portal.box.open(iid, row.secret)

        endpoint, secret = await app.state.portal.run_db(read)
        return cls(endpoint, secret, iid)

    async def info(self) -> dict[str, Any]:
        async with tool_client(self.endpoint, timeout=10) as http:
            result: dict[str, Any] = (
                await http.get(f"{self.base}/api/info", headers=self.headers)
            ).json()
            return result

    async def read(self, path: str) -> str | None:
        async with tool_client(self.endpoint, timeout=10) as http:
            response = await http.get(
                f"{self.base}/api/file", params={"path": path}, headers=self.headers
            )
        return str(response.json()["content"]) if response.status_code == 200 else None

    async def write(self, path: str, text: str) -> None:
        async with tool_client(self.endpoint, timeout=10) as http:
            response = await http.put(
                f"{self.base}/api/file",
                params={"path": path},
                content=text.encode(),
                headers=self.headers,
            )
        assert response.json() == {"ok": True}, response.text


async def messages_of(app: Any, iid: str) -> list[str]:
    from sqlalchemy import select

    from labgate.db.models import InstanceEvent

    def read(session: Any) -> list[str]:
        query = select(InstanceEvent.message).where(InstanceEvent.instance_id == iid)
        return list(session.scalars(query.order_by(InstanceEvent.id)))

    found: list[str] = await app.state.portal.run_db(read)
    return found


# --- workspace archives (process backend) -----------------------------------------


async def test_workspace_snapshot_shared_launched_revoked_and_deleted(
    app: Any, client: httpx.AsyncClient, make_user: Any, settings: Settings, admin_headers: Any
) -> None:
    alice = await make_user("alice")
    bob = await make_user("bob")
    source = await running(client, alice, tool="demo")
    tool = await Tool.of(app, source)
    home = (await tool.info())["home"]
    await tool.write(f"{home}/results.csv", "x,y\n1,2\n")

    sid = await take(client, alice, source, name="first results", description="before the fix")
    snapshot = await wait_snapshot(client, alice, sid)
    assert snapshot["state"] == "ready", snapshot
    assert snapshot["kind"] == "archive" and snapshot["backend"] == "process"
    assert (snapshot["owner"], snapshot["tool"], snapshot["site"]) == ("alice", "demo", "local")
    assert (snapshot["name"], snapshot["source_instance"]) == ("first results", source)
    archive = settings.snapshots_dir / snapshot["reference"]
    assert snapshot["size"] == archive.stat().st_size
    assert snapshot["digest"] == "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest()
    messages = await messages_of(app, source)
    assert f"snapshot {sid}: saving" in messages and f"snapshot {sid}: ready" in messages

    # Not shared: bob can neither see nor launch it, nor share it.
    assert (await client.get("/api/v1/snapshots", headers=bob)).json() == []
    hidden = await client.get(f"/api/v1/snapshots/{sid}", headers=bob)
    assert hidden.status_code == 404 and hidden.json()["error"] == "unknown_snapshot"
    refused = await client.post("/api/v1/instances", json={"snapshot": sid}, headers=bob)
    assert refused.status_code == 404 and refused.json()["error"] == "unknown_snapshot"
    assert (await client.put(f"/api/v1/snapshots/{sid}/shares/bob", headers=bob)).status_code == 404

    # Shared: bob sees it (not who else it is shared with) and launches it.
    shared = await client.put(f"/api/v1/snapshots/{sid}/shares/bob", headers=alice)
    assert shared.status_code == 201 and shared.json()["user"] == "bob"
    again = await client.put(f"/api/v1/snapshots/{sid}/shares/bob", headers=alice)
    assert again.status_code == 200
    shares = (await client.get(f"/api/v1/snapshots/{sid}/shares", headers=alice)).json()
    assert [s["user"] for s in shares] == ["bob"]
    assert (await client.get(f"/api/v1/snapshots/{sid}", headers=alice)).json()["shared_with"] == [
        "bob"
    ]
    seen = (await client.get("/api/v1/snapshots", headers=bob)).json()
    assert [(s["id"], s["shared_with"]) for s in seen] == [(sid, [])]
    assert (await client.delete(f"/api/v1/snapshots/{sid}", headers=bob)).status_code == 403
    assert (await client.get(f"/api/v1/snapshots/{sid}/shares", headers=bob)).status_code == 403

    copy = await running(client, bob, snapshot=sid)
    body = (await client.get(f"/api/v1/instances/{copy}", headers=bob)).json()
    assert (body["tool"], body["snapshot"], body["owner"]) == ("demo", sid, "bob")
    copy_tool = await Tool.of(app, copy)
    copy_home = (await copy_tool.info())["home"]
    assert copy_home != home  # a new workspace, restored from the archive
    assert Path(copy_home) == (settings.workspaces_dir / "_restored" / copy).resolve()
    assert await copy_tool.read(f"{copy_home}/results.csv") == "x,y\n1,2\n"

    # Revoked: gone for bob; his running instance is left alone.
    revoked = await client.delete(f"/api/v1/snapshots/{sid}/shares/bob", headers=alice)
    assert revoked.status_code == 204
    assert (await client.get(f"/api/v1/snapshots/{sid}", headers=bob)).status_code == 404
    again_refused = await client.post("/api/v1/instances", json={"snapshot": sid}, headers=bob)
    assert again_refused.status_code == 404
    assert (await client.get(f"/api/v1/instances/{copy}", headers=bob)).json()["state"] == (
        "running"
    )
    gone = await client.delete(f"/api/v1/snapshots/{sid}/shares/bob", headers=alice)
    assert gone.status_code == 404

    # Admins see everyone's snapshots; others may not ask for all.
    everyone = (await client.get("/api/v1/snapshots?all=true", headers=admin_headers)).json()
    assert sid in [s["id"] for s in everyone]
    assert (await client.get("/api/v1/snapshots?all=true", headers=bob)).status_code == 403

    # Deleted: the archive goes too.
    assert (await client.delete(f"/api/v1/snapshots/{sid}", headers=alice)).status_code == 204
    assert not archive.exists()
    assert (await client.get(f"/api/v1/snapshots/{sid}", headers=alice)).status_code == 404


async def test_owner_relaunch_restores_into_a_new_workspace(
    app: Any, client: httpx.AsyncClient, make_user: Any
) -> None:
    alice = await make_user("alice")
    source = await running(client, alice, tool="demo")
    tool = await Tool.of(app, source)
    home = (await tool.info())["home"]
    await tool.write(f"{home}/notes.txt", "as saved")
    sid = await take(client, alice, source)
    assert (await wait_snapshot(client, alice, sid))["state"] == "ready"
    await tool.write(f"{home}/notes.txt", "changed later")

    copy = await running(client, alice, snapshot=sid, tool="demo")
    copy_tool = await Tool.of(app, copy)
    copy_home = (await copy_tool.info())["home"]
    assert await copy_tool.read(f"{copy_home}/notes.txt") == "as saved"
    await copy_tool.write(f"{copy_home}/notes.txt", "edited in the copy")
    assert await tool.read(f"{home}/notes.txt") == "changed later"  # the workspace is untouched


async def crashed_save(app: Any, like: str) -> str:
    """A ``saving`` snapshot row like ``like``'s, as a portal killed mid-save leaves it."""
    from labgate.db.models import Snapshot
    from labgate.security import new_id

    def add(session: Any) -> str:
        model = session.get(Snapshot, like)
        row = Snapshot(
            id=new_id(),
            owner_id=model.owner_id,
            tool=model.tool,
            site_id=model.site_id,
            backend=model.backend,
            kind=model.kind,
            source_instance_id=model.source_instance_id,
        )
        session.add(row)
        return str(row.id)

    sid: str = await app.state.portal.run_db(add)
    return sid


async def test_unfinished_snapshots_are_settled_at_start_and_vanished_ones_shown(
    app: Any, client: httpx.AsyncClient, make_user: Any, settings: Settings
) -> None:
    from labgate.portal.app import create_app

    alice = await make_user("alice")
    source = await running(client, alice, tool="demo")
    sid = await take(client, alice, source)
    ready = await wait_snapshot(client, alice, sid)
    assert ready["state"] == "ready"
    assert (await client.delete(f"/api/v1/instances/{source}", headers=alice)).status_code == 202
    await wait_for_state(client, alice, source, {"stopped"})

    # Killed while saving: one save had written its archive, the other had not.
    finished = await crashed_save(app, sid)
    archive = settings.snapshots_dir / ready["reference"]
    (settings.snapshots_dir / f"{finished}.tar.gz").write_bytes(archive.read_bytes())
    cut_short = await crashed_save(app, sid)
    stuck = await client.delete(f"/api/v1/snapshots/{cut_short}", headers=alice)
    assert stuck.status_code == 409  # still saving, as far as anyone knows

    # The next start settles both.
    restarted = create_app(settings)
    async with restarted.router.lifespan_context(restarted):
        pass
    done = (await client.get(f"/api/v1/snapshots/{finished}", headers=alice)).json()
    assert done["state"] == "ready", done
    assert (done["digest"], done["size"]) == (ready["digest"], ready["size"])
    failed = (await client.get(f"/api/v1/snapshots/{cut_short}", headers=alice)).json()
    assert failed["state"] == "failed" and "cut short" in failed["reason"], failed
    assert (await client.delete(f"/api/v1/snapshots/{cut_short}", headers=alice)).status_code == 204

    # A ready snapshot whose archive is gone is shown missing, and cannot be launched.
    snapshots = app.state.portal.snapshots
    snapshots.ready_check_interval = 0
    moved = archive.with_name("elsewhere")
    archive.rename(moved)
    assert await snapshots.settle() == {sid: "missing"}
    gone = (await client.get(f"/api/v1/snapshots/{sid}", headers=alice)).json()
    assert gone["state"] == "missing" and "no longer in" in gone["reason"], gone
    refused = await client.post("/api/v1/instances", json={"snapshot": sid}, headers=alice)
    assert refused.status_code == 409 and "missing" in refused.json()["detail"]
    # Back where it was: ready again.
    moved.rename(archive)
    assert await snapshots.settle() == {sid: "ready"}
    assert (await client.get(f"/api/v1/snapshots/{sid}", headers=alice)).json()["reason"] == ""


async def test_a_settle_while_a_save_begins_leaves_that_save_alone(
    app: Any, client: httpx.AsyncClient, make_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconcile's settle() between the row being written and the save starting."""
    alice = await make_user("alice")
    source = await running(client, alice, tool="demo")
    snapshots = app.state.portal.snapshots
    note = snapshots._note
    settled: list[dict[str, Any]] = []
    first = [True]

    async def note_then_settle(instance_id: str, message: str, snapshot_id: str, **data: Any):
        if first[0]:  # the "saving" note: the row is written, the save not yet begun
            first[0] = False
            settled.append(await snapshots.settle())
        await note(instance_id, message, snapshot_id, **data)

    monkeypatch.setattr(snapshots, "_note", note_then_settle)
    sid = await take(client, alice, source)
    assert settled == [{}]  # the settle saw the row and left it to its save
    assert (await wait_snapshot(client, alice, sid))["state"] == "ready"


async def test_snapshot_and_launch_errors(
    app: Any, client: httpx.AsyncClient, make_user: Any, admin_headers: dict[str, str]
) -> None:
    alice = await make_user("alice")
    bob = await make_user("bob")
    iid = await running(client, alice, tool="demo")
    other = await client.post(f"/api/v1/instances/{iid}/snapshot", headers=bob)
    assert other.status_code == 404 and other.json()["error"] == "unknown_instance"
    # A name is one line of text: NUL, newlines and other control characters are refused.
    for name in ("a\x00b", "two\nlines", "bell\x07", "esc\x1b[31m"):
        bad = await client.post(
            f"/api/v1/instances/{iid}/snapshot", json={"name": name}, headers=alice
        )
        assert bad.status_code == 422, (name, bad.text)
        assert "control characters" in bad.text
    nul = await client.post(
        f"/api/v1/instances/{iid}/snapshot", json={"description": "x\x00"}, headers=alice
    )
    assert nul.status_code == 422
    sid = await take(client, alice, iid)  # no body: no name
    assert (await wait_snapshot(client, alice, sid))["name"] == ""

    wrong_tool = await client.post(
        "/api/v1/instances", json={"snapshot": sid, "tool": "jupyterlab"}, headers=alice
    )
    assert wrong_tool.status_code == 409
    nothing = await client.post("/api/v1/instances", json={}, headers=alice)
    assert nothing.status_code == 422
    unknown_user = await client.put(f"/api/v1/snapshots/{sid}/shares/nobody", headers=alice)
    assert unknown_user.status_code == 404 and unknown_user.json()["error"] == "unknown_user"

    assert (await client.delete(f"/api/v1/instances/{iid}", headers=alice)).status_code == 202
    await wait_for_state(client, alice, iid, {"stopped"})
    stopped = await client.post(f"/api/v1/instances/{iid}/snapshot", headers=alice)
    assert stopped.status_code == 409 and stopped.json()["error"] == "invalid_state"
    reader = await client.post("/api/v1/tokens", json={"scopes": ["instances:read"]}, headers=alice)
    read_only = {"Authorization": f"token {reader.json()['token']}"}
    assert (await client.delete(f"/api/v1/snapshots/{sid}", headers=read_only)).status_code == 403

    # A deleted user's snapshots go with them.
    assert (await client.delete("/api/v1/users/alice", headers=admin_headers)).status_code == 204
    everyone = (await client.get("/api/v1/snapshots?all=true", headers=admin_headers)).json()
    assert sid not in [s["id"] for s in everyone]


class TestSnapshotStorage:
    """snapshot_storage_per_user: what a user keeps, and the next snapshot refused."""

    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        return settings.model_copy(update={"snapshot_storage_per_user": 1})

    async def test_a_user_at_their_snapshot_storage_takes_no_more(
        self, app: Any, client: httpx.AsyncClient, make_user: Any
    ) -> None:
        alice = await make_user("alice")
        bob = await make_user("bob")
        iid = await running(client, alice, tool="demo")
        first = await take(client, alice, iid)
        assert (await wait_snapshot(client, alice, first))["state"] == "ready"
        refused = await client.post(f"/api/v1/instances/{iid}/snapshot", headers=alice)
        assert refused.status_code == 429, refused.text
        body = refused.json()
        assert (body["error"], body["quota"], body["scope"]) == (
            "quota_exceeded",
            "snapshot_storage",
            "user",
        )
        assert body["limit"] == 1 and body["current"] > 0
        # Per user: bob still may; and alice may again once she deleted hers.
        bobs = await running(client, bob, tool="demo")
        await take(client, bob, bobs)
        assert (await client.delete(f"/api/v1/snapshots/{first}", headers=alice)).status_code == 204
        await take(client, alice, iid)


# --- container images (containers backend, real Podman and registry) ----------------


class TestImageSnapshots:
    """Commit, push to the registry, pull, launch; share and delete."""

    @pytest.fixture
    def settings(
        self, settings: Settings, engine: Engine, registry: Registry, deployment: str
    ) -> Settings:
        sites = [
            # Podman 4.3 cannot commit a user-namespaced container usably (containers.md).
            SiteConfig.model_validate(engine.site(deployment=deployment, userns="host")),
            SiteConfig(name="local", backend="process"),
        ]
        return settings.model_copy(
            update={"sites": sites, "snapshot_registry": registry.namespace()}
        )

    async def test_snapshot_is_pushed_and_launched_with_the_files_saved(
        self,
        app: Any,
        client: httpx.AsyncClient,
        make_user: Any,
        engine: Engine,
        registry: Registry,
        settings: Settings,
    ) -> None:
        alice = await make_user("alice")
        bob = await make_user("bob")
        source = await running(client, alice, tool="demo", site="box")
        tool = await Tool.of(app, source)
        # Outside the workspace: only the image can carry it.
        await tool.write("/tmp/marker.txt", "written before the snapshot")
        await tool.write("/home/labgate/workspace.txt", "alice's workspace")

        sid = await take(client, alice, source, name="with marker")
        snapshot = await wait_snapshot(client, alice, sid)
        assert snapshot["state"] == "ready", snapshot
        assert (snapshot["kind"], snapshot["backend"], snapshot["site"]) == (
            "image",
            "containers",
            "box",
        )
        namespace = settings.snapshot_registry.removeprefix("http://")
        assert snapshot["reference"] == f"{namespace}/alice/demo:{sid}"
        assert snapshot["digest"].startswith("sha256:") and snapshot["size"] > 0
        messages = await messages_of(app, source)
        for step in ("committing the container", f"pushing to {registry.host}", "ready"):
            assert any(m.startswith(f"snapshot {sid}: {step}") for m in messages), "\n".join(
                messages
            )

        # The registry has it, under the digest recorded.
        repository, tag = snapshot["reference"].rsplit(":", 1)
        name = repository.removeprefix(registry.host + "/")
        manifest = httpx.head(
            f"{registry.url}/v2/{name}/manifests/{tag}",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        )
        assert manifest.status_code == 200
        assert manifest.headers["Docker-Content-Digest"] == snapshot["digest"]
        # The old instance's token is not in the image; labgate's labels are cleared.
        config = engine.client.api.inspect_image(snapshot["reference"])["Config"]
        env = dict(item.partition("=")[::2] for item in config["Env"])
        assert env["LABGATE_INSTANCE_TOKEN"] == ""
        assert config["Labels"]["labgate.managed"] == ""
        assert config["Labels"]["labgate.snapshot"] == sid

        # Off the engine, so the launch must pull it from the registry.
        assert (
            await client.delete(f"/api/v1/instances/{source}", headers=alice)
        ).status_code == 202
        await wait_for_state(client, alice, source, {"stopped"})
        engine.client.images.remove(snapshot["reference"])

        copy = await running(client, alice, snapshot=sid)
        copy_tool = await Tool.of(app, copy)
        assert await copy_tool.read("/tmp/marker.txt") == "written before the snapshot"
        assert await copy_tool.read("/home/labgate/workspace.txt") == "alice's workspace"
        assert f"pulling image {snapshot['reference']}" in await messages_of(app, copy)

        # An image snapshot runs on a containers site only.
        elsewhere = await client.post(
            "/api/v1/instances", json={"snapshot": sid, "site": "local"}, headers=alice
        )
        assert elsewhere.status_code == 409
        assert elsewhere.json()["error"] == "snapshot_unavailable"

        # Shared with bob: the image's files, his own (empty) workspace.
        shared = await client.put(f"/api/v1/snapshots/{sid}/shares/bob", headers=alice)
        assert shared.status_code == 201
        bobs = await running(client, bob, snapshot=sid)
        bob_tool = await Tool.of(app, bobs)
        assert await bob_tool.read("/tmp/marker.txt") == "written before the snapshot"
        assert await bob_tool.read("/home/labgate/workspace.txt") is None
        assert (await bob_tool.info())["user"] == "bob"

        # Deleted: gone from the registry.
        assert (await client.delete(f"/api/v1/snapshots/{sid}", headers=alice)).status_code == 204
        after = httpx.head(
            f"{registry.url}/v2/{name}/manifests/{snapshot['digest']}",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        )
        assert after.status_code == 404

    async def test_registry_settles_cut_short_saves_and_shows_images_gone(
        self,
        app: Any,
        client: httpx.AsyncClient,
        make_user: Any,
        engine: Engine,
        registry: Registry,
    ) -> None:
        alice = await make_user("alice")
        source = await running(client, alice, tool="demo", site="box")
        sid = await take(client, alice, source)
        ready = await wait_snapshot(client, alice, sid)
        assert ready["state"] == "ready", ready

        # Killed while saving: one push had finished (the registry holds its tag),
        # the other had not begun.
        pushed, cut_short = await crashed_save(app, sid), await crashed_save(app, sid)
        repository = ready["reference"].rsplit(":", 1)[0]
        engine.client.api.tag(ready["reference"], repository, pushed)
        for line in engine.client.api.push(repository, tag=pushed, stream=True, decode=True):
            assert "error" not in line, line
        snapshots = app.state.portal.snapshots
        snapshots.ready_check_interval = 3600  # a reconcile round: unfinished ones only
        changed = await snapshots.settle()
        assert changed == {pushed: "ready", cut_short: "failed"}, changed
        done = (await client.get(f"/api/v1/snapshots/{pushed}", headers=alice)).json()
        assert done["reference"] == f"{repository}:{pushed}"
        assert done["digest"] == ready["digest"]  # the same image, under another tag

        # The image deleted from the registry behind labgate's back: missing, with why.
        name = repository.removeprefix(registry.host + "/")
        deleted = httpx.delete(f"{registry.url}/v2/{name}/manifests/{ready['digest']}")
        assert deleted.status_code == 202, deleted.text
        snapshots.ready_check_interval = 0
        changed = await snapshots.settle()
        assert changed == {sid: "missing", pushed: "missing"}, changed
        gone = (await client.get(f"/api/v1/snapshots/{sid}", headers=alice)).json()
        assert gone["reason"] == f"its image {ready['reference']} is gone from the registry"
        # The registry cannot be asked (here: spoken to in TLS): nothing changes.
        from labgate.backends.images import Registry as SnapshotRegistry

        backend = app.state.portal.links["box"].agent.backend
        backend.registry = SnapshotRegistry.parse(f"https://{registry.host}")
        assert await snapshots.settle() == {}
        # Back, the image pushed again: ready again.
        backend.registry = SnapshotRegistry.parse(app.state.portal.settings.snapshot_registry)
        for line in engine.client.api.push(repository, tag=sid, stream=True, decode=True):
            assert "error" not in line, line
        assert await snapshots.settle() == {sid: "ready"}

    async def test_images_no_snapshot_names_are_collected_from_registry_and_engine(
        self,
        app: Any,
        client: httpx.AsyncClient,
        make_user: Any,
        engine: Engine,
        registry: Registry,
    ) -> None:
        from labgate.db.models import Snapshot

        alice = await make_user("alice")
        source = await running(client, alice, tool="demo", site="box")
        kept, forgotten = await take(client, alice, source), await take(client, alice, source)
        for sid in (kept, forgotten):
            assert (await wait_snapshot(client, alice, sid))["state"] == "ready"
        reference = (await client.get(f"/api/v1/snapshots/{forgotten}", headers=alice)).json()[
            "reference"
        ]
        repository = reference.rsplit(":", 1)[0]
        # A record gone while the registry could not be reached, and an image a save
        # left half-way (never recorded); a tag that is no snapshot's, sharing its image.
        await app.state.portal.run_db(lambda s: s.delete(s.get(Snapshot, forgotten)))
        stray = "zzzzzzzzzzzz"
        for tag in (stray, "latest"):
            engine.client.api.tag(podman.BUSYBOX_IMAGE, repository, tag)
        for tag in (stray, "latest", forgotten):
            for line in engine.client.api.push(repository, tag=tag, stream=True, decode=True):
                assert "error" not in line, line
        engine.client.images.remove(f"{repository}:latest")

        removed = await app.state.portal.snapshots.collect()
        assert f"{repository}:{forgotten}" in removed and f"{repository}:{stray}" not in removed
        name = repository.removeprefix(registry.host + "/")

        def there(tag: str) -> bool:
            from labgate.backends.images import MANIFEST_TYPES

            answer = httpx.head(
                f"{registry.url}/v2/{name}/manifests/{tag}", headers={"Accept": MANIFEST_TYPES}
            )
            return answer.status_code == 200

        assert not there(forgotten)
        assert there(kept) and there("latest") and there(stray)  # stray shares latest's image
        assert f"{repository}:{forgotten}" not in {
            tag for image in engine.client.images.list() for tag in image.tags
        }
        assert (await client.get(f"/api/v1/snapshots/{kept}", headers=alice)).json()["state"] == (
            "ready"
        )

    async def test_unreachable_registry_fails_the_snapshot_with_the_reason(
        self, app: Any, client: httpx.AsyncClient, admin_headers: dict[str, str]
    ) -> None:
        from labgate.backends.images import Registry as SnapshotRegistry

        backend = app.state.portal.links["box"].agent.backend
        backend.registry = SnapshotRegistry.parse(f"http://127.0.0.1:{podman.free_port()}/x")
        iid = await running(client, admin_headers, tool="demo", site="box")
        sid = await take(client, admin_headers, iid)
        snapshot = await wait_snapshot(client, admin_headers, sid)
        assert snapshot["state"] == "failed"
        assert "cannot push" in snapshot["reason"]
        assert any(m.startswith(f"snapshot {sid} failed") for m in await messages_of(app, iid))
        assert (
            await client.post("/api/v1/instances", json={"snapshot": sid}, headers=admin_headers)
        ).status_code == 409  # not ready
        # Nothing is left tagged on the engine.
        assert (
            await client.delete(f"/api/v1/snapshots/{sid}", headers=admin_headers)
        ).status_code == 204
