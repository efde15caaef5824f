"""Snapshots against the threat model: a site agent that lies, quotas, secrets in archives.

A site's agent reports what it saved (kind, reference, digest, size), and the
portal hands that reference to every later launch, share and delete, on any
site of the backend. The portal must therefore take from a site only the
reference it asked for: ``<snapshot id>.tar.gz`` for an archive,
``<registry or localhost/labgate-snapshots>/<owner>/<tool>:<snapshot id>``
for an image; never another user's image or archive, another snapshot's tag,
a digest in place of the tag, a path with ``..`` or capitals, a negative size.
"""

from __future__ import annotations

import asyncio
import tarfile
from typing import Any

import httpx
import pytest
from test_snapshots import Tool, running, take, wait_snapshot

from labgate.backends.base import SnapshotResult
from labgate.config import Settings


def site_link(app: Any, name: str = "local") -> Any:
    return app.state.portal.snapshots.links[name]


async def ready_snapshot(app: Any, client: httpx.AsyncClient, headers: dict[str, str]) -> dict:
    iid = await running(client, headers, tool="demo")
    tool = await Tool.of(app, iid)
    home = (await tool.info())["home"]
    await tool.write(f"{home}/private.txt", "only mine")
    sid = await take(client, headers, iid)
    snapshot = await wait_snapshot(client, headers, sid)
    assert snapshot["state"] == "ready", snapshot
    snapshot["instance"] = iid
    return snapshot


async def test_a_lying_site_cannot_pass_off_another_users_archive_as_a_snapshot(
    app: Any,
    client: httpx.AsyncClient,
    make_user: Any,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The site answers alice's save with bob's archive: alice must not get bob's files,
    nor delete bob's archive by deleting her snapshot."""
    alice = await make_user("alice")
    bob = await make_user("bob")
    bobs = await ready_snapshot(app, client, bob)

    link = site_link(app)

    async def lying_snapshot(instance_id: str, state: Any, request: Any) -> SnapshotResult:
        return SnapshotResult("archive", bobs["reference"], bobs["digest"], bobs["size"])

    monkeypatch.setattr(link, "snapshot", lying_snapshot)
    source = await running(client, alice, tool="demo")
    asked = await client.post(f"/api/v1/instances/{source}/snapshot", json={}, headers=alice)
    # The lying site answers at once: the 202 may already see the save refused.
    assert asked.status_code == 202 and asked.json()["state"] in {"saving", "failed"}, asked.text
    sid = asked.json()["id"]
    mine = await wait_snapshot(client, alice, sid)
    assert mine["state"] == "failed", mine  # not "ready" with bob's archive
    assert mine["reference"] != bobs["reference"], mine
    assert "reference" in mine["reason"], mine
    refused = await client.post("/api/v1/instances", json={"snapshot": sid}, headers=alice)
    assert refused.status_code == 409, refused.text

    # Deleting her failed snapshot leaves bob's archive where it is.
    assert (await client.delete(f"/api/v1/snapshots/{sid}", headers=alice)).status_code == 204
    assert (settings.snapshots_dir / bobs["reference"]).exists()


async def test_a_lying_site_cannot_settle_a_save_with_another_users_archive(
    app: Any, client: httpx.AsyncClient, make_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save cut short is looked for at its site: the answer is held to the same rule."""
    from test_snapshots import crashed_save

    alice = await make_user("alice")
    bob = await make_user("bob")
    bobs = await ready_snapshot(app, client, bob)
    alices = await ready_snapshot(app, client, alice)
    unfinished = await crashed_save(app, alices["id"])

    link = site_link(app)
    honest = link.find_snapshot

    async def lying_find(request: Any, reference: str = "") -> SnapshotResult | None:
        if request.snapshot_id == unfinished:
            return SnapshotResult("archive", bobs["reference"], bobs["digest"], bobs["size"])
        return await honest(request, reference)

    monkeypatch.setattr(link, "find_snapshot", lying_find)
    await app.state.portal.snapshots.settle()
    settled = (await client.get(f"/api/v1/snapshots/{unfinished}", headers=alice)).json()
    assert settled["state"] == "failed", settled
    assert settled["reference"] != bobs["reference"], settled


def forged_references(sid: str, other: str) -> list[tuple[str, str, str, int]]:
    """(kind, reference, digest, size) a lying site may report for alice's snapshot ``sid``."""
    host = "registry.example.org/labgate"
    good = "sha256:" + "c" * 64
    climbing = f"sha256:{'0' * 64}/../../../../bob/demo/manifests/sha256:{'a' * 64}"
    return [
        ("image", f"{host}/bob/demo:{other}", good, 10),  # another user's image
        ("image", f"{host}/bob/demo:{sid}", good, 10),  # another user's repository
        ("image", f"{host}/alice/demo:{other}", good, 10),  # another snapshot's tag
        ("image", f"{host}/alice/jupyterlab:{sid}", good, 10),  # another tool
        ("image", f"{host}/alice/demo@sha256:{'a' * 64}", good, 10),  # a digest for the tag
        ("image", f"{host}/alice/demo:{sid}@sha256:{'a' * 64}", good, 10),  # a digest as well
        ("image", f"{host}/alice/../bob/demo:{sid}", good, 10),  # climbing out
        ("image", f"{host}/ALICE/demo:{sid}", good, 10),  # capitals
        ("image", f"alice/demo:{sid}", good, 10),  # no registry: Docker Hub's docker.io/alice
        ("image", f" {host}/alice/demo:{sid}", good, 10),  # spaces
        ("image", f"{host}/alice/demo:{sid}", good, -(10**15)),  # a size that frees quota
        ("image", f"{host}/alice/demo:{sid}", climbing, 10),  # a digest that climbs out
        ("archive", f"{sid}.tar.gz", good, 10),  # another kind than the site's
    ]


async def test_a_lying_site_cannot_name_another_image_for_a_snapshot(
    app: Any, client: httpx.AsyncClient, make_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image site must report ``<registry>/<owner>/<tool>:<snapshot id>``, nothing else."""
    alice = await make_user("alice")
    await make_user("bob")
    link = site_link(app)
    monkeypatch.setattr(link, "snapshot_kind", "image")
    source = await running(client, alice, tool="demo")
    forged: dict[str, tuple[str, str, str, int]] = {}
    # The snapshot id is known only once taken: each save waits until its forgery is set.
    gates: list[asyncio.Event] = []

    async def lying_snapshot(instance_id: str, state: Any, request: Any) -> SnapshotResult:
        if gates:
            await gates[-1].wait()
        sid = request.snapshot_id
        if sid not in forged:  # honest answers: the reference alice's snapshot should have
            return SnapshotResult(
                "image", f"registry.example.org/labgate/alice/demo:{sid}", "sha256:" + "b" * 64, 7
            )
        kind, reference, digest, size = forged[sid]
        return SnapshotResult(kind, reference, digest, size)

    monkeypatch.setattr(link, "snapshot", lying_snapshot)
    accepted = []
    for n, (kind, template, digest, size) in enumerate(forged_references("SID", "OTHER")):
        gates.append(asyncio.Event())
        sid = await take(client, alice, source, name=f"forgery {n}")
        reference = template.replace("SID", sid).replace("OTHER", "k3x9k3x9k3x9")
        forged[sid] = (kind, reference, digest, size)
        gates[-1].set()
        result = await wait_snapshot(client, alice, sid)
        if result["state"] != "failed" or result["reference"] == reference:
            accepted.append((forged[sid], result["state"]))
    gates.clear()
    assert accepted == []

    # The reference it asked for is taken, in a registry or kept on the engine.
    monkeypatch.setattr(link, "snapshot", lying_snapshot)
    sid = await take(client, alice, source)
    fine = await wait_snapshot(client, alice, sid)
    assert fine["state"] == "ready", fine
    assert fine["reference"] == f"registry.example.org/labgate/alice/demo:{sid}"

    async def local_snapshot(instance_id: str, state: Any, request: Any) -> SnapshotResult:
        reference = f"localhost/labgate-snapshots/alice/demo:{request.snapshot_id}"
        return SnapshotResult("image", reference, "sha256:" + "d" * 64, 7)

    monkeypatch.setattr(link, "snapshot", local_snapshot)
    sid = await take(client, alice, source)
    assert (await wait_snapshot(client, alice, sid))["state"] == "ready"


async def test_saves_under_way_cannot_take_a_user_past_their_snapshot_storage(
    app: Any, client: httpx.AsyncClient, make_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """snapshot_storage_per_user counts what a user keeps, and a save under way has no
    size yet: five saves started before the first one finished each passed a check
    that counted the others as 0 bytes, so the limit bounded nothing."""
    snapshots = app.state.portal.snapshots
    monkeypatch.setattr(snapshots, "storage_per_user", 10**9)  # snapshot_storage_per_user
    alice = await make_user("alice")
    iid = await running(client, alice, tool="demo")
    link = site_link(app)
    honest = link.snapshot
    gate = asyncio.Event()

    async def slow_snapshot(instance_id: str, state: Any, request: Any) -> SnapshotResult:
        await gate.wait()  # a long push
        return await honest(instance_id, state, request)

    monkeypatch.setattr(link, "snapshot", slow_snapshot)
    first = await take(client, alice, iid)
    answers = await asyncio.gather(
        *(client.post(f"/api/v1/instances/{iid}/snapshot", headers=alice) for _ in range(5))
    )
    gate.set()
    statuses = [answer.status_code for answer in answers]
    assert statuses == [429] * 5, [answer.text for answer in answers]
    body = answers[0].json()
    assert (body["error"], body["quota"]) == ("quota_exceeded", "snapshot_storage")
    assert (await wait_snapshot(client, alice, first))["state"] == "ready"
    # Once saved and below the limit, the next one may go.
    await take(client, alice, iid)


# --- secrets in a workspace archive -------------------------------------------------


@pytest.fixture
def with_jupyter(settings: Settings) -> Settings:
    pytest.importorskip("jupyterlab", reason="install the jupyter extra")
    return settings


async def test_a_jupyterlab_workspace_snapshot_carries_no_instance_token(
    app: Any, client: httpx.AsyncClient, make_user: Any, settings: Settings, with_jupyter: Any
) -> None:
    """JupyterLab writes its server info (with its token, the instance token) and its
    kernels' connection files (their keys) under ``$HOME/.local/share/jupyter/runtime``,
    and ``$HOME`` is the workspace. A snapshot shared with bob must not hand him the
    token of alice's running instance (which he could use against its loopback port
    from his own instance): the archive holds no file with it."""
    alice = await make_user("alice")
    iid = await running(client, alice, tool="jupyterlab")
    secret = (await Tool.of(app, iid)).headers["Authorization"].removeprefix("token ")
    sid = await take(client, alice, iid)
    snapshot = await wait_snapshot(client, alice, sid)
    assert snapshot["state"] == "ready", snapshot
    carrying = []
    archive = settings.snapshots_dir / snapshot["reference"]
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile():
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                if secret.encode() in data:
                    carrying.append(member.name)
    assert carrying == [], f"the archive carries the instance token in {carrying}"


# --- the registry API: a digest or name that climbs out of its repository ------------


async def test_a_manifest_digest_cannot_climb_into_another_users_repository() -> None:
    """The digest of a snapshot comes from its site's report; a "digest" with ``/../``
    is normalised away by the HTTP client, so deleting alice's snapshot would delete
    bob's image (with labgate's registry credentials) on whichever site deletes it."""
    from labgate.backends.images import Registry

    paths: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        paths.append(head.split(b" ", 2)[1].decode())
        writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        registry = Registry.parse(f"http://127.0.0.1:{port}/labgate")
        assert registry is not None
        alices = f"127.0.0.1:{port}/labgate/alice/demo"
        bobs_digest = "sha256:" + "a" * 64
        forged = [
            (alices, f"sha256:{'0' * 64}/../../../../bob/demo/manifests/{bobs_digest}"),
            (alices, "sha256:x/../../../../bob/demo/manifests/" + bobs_digest),
            (f"127.0.0.1:{port}/labgate/alice/../bob/demo", bobs_digest),
            (f"127.0.0.1:{port}/labgate/Bob/demo", bobs_digest),
            ("elsewhere.example/labgate/bob/demo", bobs_digest),
            (alices, "latest"),  # a delete takes a digest, never a tag
        ]
        for repository, digest in forged:
            with pytest.raises(ValueError):
                await registry.delete_manifest(repository, digest)
            with pytest.raises(ValueError):
                await registry.find_manifest(repository, digest.replace("latest", "../x"))
        assert paths == []
        # What is well formed is asked for as before.
        assert await registry.delete_manifest(alices, bobs_digest)
        assert paths == [f"/v2/labgate/alice/demo/manifests/{bobs_digest}"]
    finally:
        server.close()
        await server.wait_closed()


def test_registry_credentials_in_its_url_are_refused_not_shown_in_references() -> None:
    """``snapshot_registry = "https://user:token@host/ns"`` put the credentials in the host
    of every image reference: in each snapshot's ``reference`` every user it is shared
    with reads, and in the progress notes of the instance's events."""
    from labgate.backends.images import Registry

    with pytest.raises(ValueError) as refused:
        Registry.parse("https://labgate:s3cret-token@registry.example.org/labgate")
    assert "s3cret-token" not in str(refused.value)
    assert "snapshot_registry_username" in str(refused.value)
    parsed = Registry.parse("https://registry.example.org/labgate", "labgate", "s3cret-token")
    assert parsed is not None
    assert "s3cret-token" not in parsed.repository("alice", "demo")
