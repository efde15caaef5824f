"""Every site link does the same: the in-process link and the network link, side by side.

The network link here is the real thing without the portal around it: a
:class:`~labgate.agent.hub.SiteHub` serving a real loopback WebSocket, and a
:class:`~labgate.agent.remote.RemoteAgent` dialing it, driving a real process
backend. Each test runs against both links.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.server import ServerConnection, serve

from helpers import tool_client
from labgate.agent.hub import SiteHub, SiteInfo
from labgate.agent.link import LocalSiteLink, SiteLink
from labgate.agent.network import ChannelClosed, NetworkSiteLink, SiteUnavailable
from labgate.agent.remote import RemoteAgent
from labgate.agent.site import Adoption
from labgate.backends import cgroups
from labgate.backends.base import LaunchSpec, Resources
from labgate.backends.claim import Claim
from labgate.backends.identity import pool_identity_number
from labgate.backends.process import ProcessBackend
from labgate.backends.registry import load_catalog
from labgate.backends.sockets import connectable
from labgate.tools.catalog import Tool
from labgate.wire.agent import Heartbeat, Hello, Welcome
from labgate.wire.launch import SnapshotRequest
from labgate.wire.site import Report
from servers import processes_with_env
from site_agents import make_agent_for, site_settings


class WsChannel:
    """A websockets server connection as the hub's channel."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws

    async def send_text(self, data: str) -> None:
        try:
            await self.ws.send(data)
        except websockets.ConnectionClosed as exc:
            raise ChannelClosed(str(exc)) from None

    async def receive(self) -> str | bytes:
        try:
            return await self.ws.recv()
        except websockets.ConnectionClosed as exc:
            raise ChannelClosed(str(exc)) from None

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)


@dataclass
class Recorder:
    """The site events and reports one link produced."""

    reports: list[Report] = field(default_factory=list)
    hellos: list[Hello] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    async def report(self, report: Report) -> None:
        self.reports.append(report)

    async def site_connected(self, site: str, hello: Hello) -> None:
        self.hellos.append(hello)
        self.disconnected.clear()
        self.connected.set()

    async def site_heartbeat(self, site: str, beat: Heartbeat) -> None:
        pass

    async def site_report(self, site: str, report: Report) -> None:
        self.reports.append(report)

    async def site_disconnected(self, site: str, reason: str) -> None:
        self.connected.clear()
        self.disconnected.set()

    def states(self, instance_id: str) -> list[str]:
        return [r.state for r in self.reports if r.instance_id == instance_id and r.kind == "state"]

    async def wait_state(self, instance_id: str, state: str, timeout: float = 90) -> None:
        """Until the site reports ``state``; fails at once on another final state, saying why."""
        try:
            async with asyncio.timeout(timeout):
                while state not in self.states(instance_id):
                    final = {"failed", "lost", "stopped"} & set(self.states(instance_id))
                    if final and state not in final:
                        break
                    await asyncio.sleep(0.02)
        except TimeoutError:
            pass
        seen = [
            (r.state, r.kind, r.message, r.log_tail[-500:])
            for r in self.reports
            if r.instance_id == instance_id
        ]
        assert state in self.states(instance_id), f"{instance_id} never {state}: {seen}"


@dataclass
class Network:
    """A hub on a loopback WebSocket and a remote agent dialing it."""

    hub: SiteHub
    remote: RemoteAgent
    task: asyncio.Task[None]
    server: Any


@contextlib.asynccontextmanager
async def network_link(
    tmp: Path,
    recorder: Recorder,
    catalog: list[Tool],
    *,
    heartbeat: float = 0.5,
    reach: str = "direct",
) -> AsyncIterator[tuple[NetworkSiteLink, Network]]:
    links: dict[str, SiteLink] = {}
    hub = SiteHub(
        links,
        lambda: [t.model_dump(mode="json") for t in catalog],
        heartbeat=heartbeat,
        command_timeout=10,
    )
    hub.events = recorder
    await hub.register("edge", "process", reach)
    info = SiteInfo(name="edge", backend="process")

    async def handler(ws: ServerConnection) -> None:
        await hub.serve(info, WsChannel(ws))

    settings = site_settings(tmp / "site")
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        remote = RemoteAgent(
            f"http://127.0.0.1:{port}",
            "lgs_test",
            lambda welcome, reporter: make_agent_for(settings, welcome.site, reporter),
            reconnect_base=0.05,
            reconnect_max=0.2,
        )
        task = asyncio.create_task(remote.run())
        try:
            async with asyncio.timeout(15):
                await recorder.connected.wait()
            link = links["edge"]
            assert isinstance(link, NetworkSiteLink)
            yield link, Network(hub, remote, task, server)
        finally:
            await hub.close()
            await remote.stop()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def local_link(tmp: Path, recorder: Recorder) -> AsyncIterator[LocalSiteLink]:
    settings = site_settings(tmp / "site")
    link = LocalSiteLink(make_agent_for(settings, "edge", recorder.report))
    try:
        yield link
    finally:
        await link.close()


#: A tool this site cannot run: it requires a program the machine does not have.
NEEDS_MISSING = Tool(
    name="needs-missing",
    title="Needs a missing program",
    process={"command": ["no-such-program-here"], "requires": ["no-such-program-here"]},
)


@pytest.fixture
def demo() -> Tool:
    tool = load_catalog(None).get("demo")
    assert tool is not None
    return tool


@pytest.fixture(params=["local", "network"])
async def linked(
    request: pytest.FixtureRequest, tmp_path: Path, demo: Tool
) -> AsyncIterator[tuple[SiteLink, Recorder]]:
    recorder = Recorder()
    if request.param == "local":
        async with local_link(tmp_path, recorder) as link:
            yield link, recorder
    else:
        async with network_link(tmp_path, recorder, [demo, NEEDS_MISSING]) as (net, _):
            yield net, recorder


def spec_of(tool: Tool, instance_id: str, owner: str = "alice") -> LaunchSpec:
    return LaunchSpec(
        instance_id=instance_id,
        owner=owner,
        owner_id=1,
        tool=tool,
        base_url=f"/i/{instance_id}/",
        workspace=Path(owner),
        resources=Resources(cpu=0.5, memory=256 * 1024**2),
        secret="instance-secret-" + instance_id,
    )


def endpoint_of(recorder: Recorder, instance_id: str) -> tuple[str, dict[str, Any]]:
    for report in recorder.reports:
        if report.instance_id == instance_id and report.endpoint:
            return report.endpoint, report.backend_state or {}
    raise AssertionError(f"no endpoint reported for {instance_id}")


async def test_launch_reports_running_and_the_tool_answers(linked, demo) -> None:
    link, recorder = linked
    await link.launch(spec_of(demo, "i1"))
    await recorder.wait_state("i1", "running")
    assert recorder.states("i1") == ["starting", "running"]
    endpoint, state = endpoint_of(recorder, "i1")
    async with tool_client(endpoint) as http:
        answer = await http.get("/i/i1/", headers={"Authorization": "token instance-secret-i1"})
    assert answer.status_code == 200
    assert "demo: listening on" in await link.logs("i1", state, 20)
    await link.stop("i1", state)
    await recorder.wait_state("i1", "stopped")


async def test_a_launch_delivered_twice_starts_one_instance(linked, demo) -> None:
    link, recorder = linked
    spec = spec_of(demo, "twice")
    await link.launch(spec)
    await link.launch(spec)
    await recorder.wait_state("twice", "running")
    await asyncio.sleep(0.5)
    assert recorder.states("twice") == ["starting", "running"]
    _, state = endpoint_of(recorder, "twice")
    await link.stop("twice", state)
    await recorder.wait_state("twice", "stopped")


async def test_a_launch_that_arrives_after_its_stop_starts_nothing(linked, demo) -> None:
    """A stop can overtake its instance's launch (the portal sends them from separate
    tasks): the site stops what it does not hold yet, and the late launch starts nothing."""
    link, recorder = linked
    await link.stop("overtaken", {})
    await recorder.wait_state("overtaken", "stopped")
    await link.launch(spec_of(demo, "overtaken"))
    await asyncio.sleep(1.5)
    assert recorder.states("overtaken") == ["stopped"]
    assert not processes_with_env("LABGATE_INSTANCE_ID", "overtaken")


async def test_the_workspace_is_the_sites_own(linked, demo, tmp_path) -> None:
    link, recorder = linked
    await link.launch(spec_of(demo, "ws1", owner="carol"))
    await recorder.wait_state("ws1", "running")
    assert (tmp_path / "site" / "workspaces" / "carol").is_dir()
    _, state = endpoint_of(recorder, "ws1")
    await link.stop("ws1", state)
    await recorder.wait_state("ws1", "stopped")


async def test_what_the_site_can_run_comes_from_its_backend(linked, demo) -> None:
    link, _ = linked
    assert link.unavailable_reason(demo) is None
    reason = link.unavailable_reason(NEEDS_MISSING)
    assert reason is not None and "no-such-program-here" in reason


async def test_a_stopped_instance_can_be_adopted_only_while_it_runs(linked, demo) -> None:
    link, recorder = linked
    await link.launch(spec_of(demo, "ad1"))
    await recorder.wait_state("ad1", "running")
    endpoint, state = endpoint_of(recorder, "ad1")
    await link.stop("ad1", state)
    await recorder.wait_state("ad1", "stopped")
    # Adopting what is gone reports it lost, with why.
    await link.adopt(Adoption(spec_of(demo, "ad1"), "running", state, endpoint))
    await recorder.wait_state("ad1", "lost")


async def test_snapshots_are_taken_and_deleted_at_the_site(linked, demo) -> None:
    link, recorder = linked
    await link.launch(spec_of(demo, "sn1"))
    await recorder.wait_state("sn1", "running")
    _, state = endpoint_of(recorder, "sn1")
    result = await link.snapshot("sn1", state, SnapshotRequest("snap1", "sn1", "alice", "demo"))
    assert result.kind == "archive" and result.size > 0
    from labgate.wire.launch import SnapshotRef

    await link.delete_snapshot(SnapshotRef("snap1", result.kind, result.reference, result.digest))
    await link.stop("sn1", state)
    await recorder.wait_state("sn1", "stopped")


# --- what only the network link has to show -----------------------------------------


async def test_a_command_to_a_site_that_is_away_fails_at_once(tmp_path, demo) -> None:
    recorder = Recorder()
    async with network_link(tmp_path, recorder, [demo]) as (link, net):
        await net.remote.stop()
        async with asyncio.timeout(10):
            await recorder.disconnected.wait()
        assert not link.live
        with pytest.raises(SiteUnavailable, match="not connected"):
            await link.launch(spec_of(demo, "away"))
        # What it could run is still known (from its last hello) while it is away.
        assert link.unavailable_reason(demo) is None


async def test_what_the_site_can_run_is_said_again_when_it_changes(
    tmp_path, demo, monkeypatch
) -> None:
    """A program installed on the site's machine (or an image built on its engine) after
    the agent connected reaches the portal with the next heartbeat, not the next hello."""
    recorder = Recorder()
    async with network_link(tmp_path, recorder, [demo, NEEDS_MISSING]) as (link, _):
        assert "no-such-program-here" in (link.unavailable_reason(NEEDS_MISSING) or "")
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        program = bin_dir / "no-such-program-here"
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        async with asyncio.timeout(10):
            while link.unavailable_reason(NEEDS_MISSING) is not None:
                await asyncio.sleep(0.05)
        assert link.unavailable_reason(demo) is None
        assert len(recorder.hellos) == 1  # said by a heartbeat, on the same connection


async def test_the_agent_reconnects_and_reports_what_it_holds(tmp_path, demo) -> None:
    recorder = Recorder()
    async with network_link(tmp_path, recorder, [demo]) as (link, net):
        await link.launch(spec_of(demo, "held"))
        await recorder.wait_state("held", "running")
        # Drop the connection (not a revocation); the agent dials again by itself.
        for connection in list(net.server.connections):
            await connection.close(1011, "test drop")
        async with asyncio.timeout(15):
            while len(recorder.hellos) < 2 or not link.live:
                await asyncio.sleep(0.05)
        held = {h.instance_id: h.state for h in recorder.hellos[-1].instances}
        assert held == {"held": "running"}
        assert recorder.states("held") == ["starting", "running"]
        _, state = endpoint_of(recorder, "held")
        await link.stop("held", state)
        await recorder.wait_state("held", "stopped")


async def test_a_reach_another_replica_changed_reconnects_the_agent_and_keeps_the_link(
    tmp_path, demo
) -> None:
    """A sync of the sites that finds a new reach is no removal: the agent is not told its
    token was revoked (it would stop); it reconnects, and what it runs carries on."""
    recorder = Recorder()
    async with network_link(tmp_path, recorder, [demo]) as (link, net):
        await link.launch(spec_of(demo, "kept"))
        await recorder.wait_state("kept", "running")
        rerouted: list[str] = []

        async def registered(name: str) -> None:
            rerouted.append(name)

        net.hub.registered = registered

        async def rows() -> dict[str, tuple[str, str]]:
            return {"edge": ("process", "tunnel")}

        await net.hub.follow(rows)
        assert net.hub.links["edge"] is link and link.reach == "tunnel"
        assert rerouted == ["edge"]
        async with asyncio.timeout(15):
            while len(recorder.hellos) < 2 or not link.live:
                await asyncio.sleep(0.05)
        assert not net.task.done()
        assert {h.instance_id: h.state for h in recorder.hellos[-1].instances} == {
            "kept": "running"
        }
        await net.hub.follow(rows)  # nothing changed: nothing happens
        assert rerouted == ["edge"] and len(recorder.hellos) == 2
        _, state = endpoint_of(recorder, "kept")
        await link.stop("kept", state)
        await recorder.wait_state("kept", "stopped")


async def test_an_agent_for_another_site_is_refused(tmp_path, demo) -> None:
    links: dict[str, SiteLink] = {}
    hub = SiteHub(links, lambda: [demo.model_dump(mode="json")], heartbeat=0.5)
    await hub.register("edge", "process", "direct")
    closed: list[tuple[int, str]] = []

    class Liar:
        async def send_text(self, data: str) -> None:
            assert Welcome.model_validate_json(data).site == "edge"

        async def receive(self) -> str:
            return Hello(
                site="other", agent_version="x", boot="b", backend="process"
            ).model_dump_json()

        async def close(self, code: int, reason: str) -> None:
            closed.append((code, reason))

    await hub.serve(SiteInfo(name="edge", backend="process"), Liar())
    assert closed and "site 'other'" in closed[0][1]
    assert not links["edge"].live


@contextlib.asynccontextmanager
async def file_server(body: bytes, served: list[int] | None = None) -> AsyncIterator[str]:
    """A loopback HTTP server answering every GET with ``body`` (counted in ``served``)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if served is not None:
            served.append(1)
            await asyncio.sleep(0.2)  # long enough for a second request to come meanwhile
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/iris.csv"
    finally:
        server.close()


async def test_a_url_dataset_is_fetched_and_checked_by_the_site(linked, tmp_path) -> None:
    import hashlib

    from labgate.agent.fetch import FetchError
    from labgate.wire.launch import FetchRequest

    link, _ = linked
    body = b"sepal,petal\n" * 1000
    checksum = "sha256:" + hashlib.sha256(body).hexdigest()
    async with file_server(body) as url:
        request = FetchRequest("f1", url, "iris-1234", 10**6, len(body), checksum, True)
        fetched = await link.fetch_dataset(request)
        # In the site's own cache, checked there.
        assert fetched.directory == tmp_path / "site" / "cache" / "edge" / "iris-1234"
        assert fetched.verified and not fetched.cached and fetched.size == len(body)
        assert (fetched.directory / "iris.csv").read_bytes() == body
        again = await link.fetch_dataset(request)
        assert again.cached and again.directory == fetched.directory
        wrong = FetchRequest("f2", url, "iris-5678", 10**6, None, "sha256:" + "0" * 64, True)
        with pytest.raises(FetchError, match="checksum mismatch"):
            await link.fetch_dataset(wrong)
        assert not (tmp_path / "site" / "cache" / "edge" / "iris-5678").exists()


async def test_two_requests_for_one_dataset_at_once_download_it_once(linked, tmp_path) -> None:
    """Portal replicas may each ask the site for the same dataset: one download serves both."""
    from labgate.wire.launch import FetchRequest

    link, _ = linked
    body = b"sepal,petal\n" * 1000
    served: list[int] = []
    async with file_server(body, served) as url:
        first, second = (
            FetchRequest(iid, url, "iris-twice", 10**6, len(body), "", True) for iid in ("a", "b")
        )
        results = await asyncio.gather(link.fetch_dataset(first), link.fetch_dataset(second))
    assert len(served) == 1
    assert sorted(result.cached for result in results) == [False, True]
    assert {result.directory for result in results} == {
        tmp_path / "site" / "cache" / "edge" / "iris-twice"
    }
    assert (results[0].directory / "iris.csv").read_bytes() == body


def parent_of(pid: int) -> int:
    """The parent process id of ``pid``."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


async def test_a_command_delivered_twice_is_done_once(tmp_path, demo) -> None:
    from labgate.agent.convert import spec_msg
    from labgate.wire.agent import Command, dump
    from servers import processes_with_env

    recorder = Recorder()
    async with network_link(tmp_path, recorder, [demo]) as (link, _):
        assert link.session is not None
        spec = spec_of(demo, "dup1")
        command = Command(id="same-id", op="launch", args={"spec": spec_msg(spec).model_dump()})
        await link.session.send(dump(command))
        await link.session.send(dump(command))
        await recorder.wait_state("dup1", "running")
        await asyncio.sleep(0.5)
        assert recorder.states("dup1") == ["starting", "running"]
        # One process tree (the sandbox's, the tool's), not two.
        pids = set(processes_with_env("LABGATE_INSTANCE_ID", "dup1"))
        roots = [pid for pid in pids if parent_of(pid) not in pids]
        assert len(roots) == 1, pids
        _, state = endpoint_of(recorder, "dup1")
        await link.stop("dup1", state)
        await recorder.wait_state("dup1", "stopped")


async def test_a_report_sent_again_is_applied_once(tmp_path, demo) -> None:
    from labgate.wire.agent import ReportEnvelope, ReportMsg

    links: dict[str, SiteLink] = {}
    recorder = Recorder()
    hub = SiteHub(links, lambda: [demo.model_dump(mode="json")], heartbeat=0.5)
    hub.events = recorder
    await hub.register("edge", "process", "direct")
    running = ReportMsg(instance_id="r1", state="running", message="ready")
    script = [
        Hello(site="edge", agent_version="x", boot="boot-1", backend="process").model_dump_json(),
        ReportEnvelope(seq=1, report=running).model_dump_json(),
        # After a reconnect the agent sends what was not acknowledged: the same report.
        ReportEnvelope(seq=1, report=running).model_dump_json(),
    ]
    acks: list[str] = []

    class Replaying:
        async def send_text(self, data: str) -> None:
            if '"ack"' in data:
                acks.append(data)

        async def receive(self) -> str:
            if script:
                return script.pop(0)
            raise ChannelClosed("done")

        async def close(self, code: int, reason: str) -> None:
            pass

    await hub.serve(SiteInfo(name="edge", backend="process"), Replaying())
    assert [r.state for r in recorder.reports] == ["running"]
    assert len(acks) == 2  # both acknowledged, so the agent stops sending it


async def test_a_command_the_site_refuses_fails_with_the_sites_code_and_status() -> None:
    import json as jsonlib

    from labgate.agent.network import RemoteError, Session
    from labgate.wire.agent import Result

    link = NetworkSiteLink("edge", "process")

    async def send(text: str) -> None:
        command = jsonlib.loads(text)
        refused = Result(
            id=command["id"],
            ok=False,
            error="this site takes no snapshots",
            code="snapshot_unsupported",
            status=409,
        )
        session.resolve(refused)

    session = Session(send, Hello(site="edge", agent_version="x", boot="b", backend="process"))
    link.attach(session)
    with pytest.raises(RemoteError) as caught:
        await link.logs("i1", {}, 10)
    error = caught.value
    assert (error.status, error.code, error.detail) == (
        409,
        "snapshot_unsupported",
        "this site takes no snapshots",
    )
    assert error.body() == {
        "error": "snapshot_unsupported",
        "detail": "this site takes no snapshots",
    }


@pytest.mark.parametrize(
    ("status", "code", "detail", "answered"),
    [
        (200, "ok", "fine", (502, "ok", "fine")),  # a refusal is never a success
        (302, "moved", "elsewhere", (502, "moved", "elsewhere")),
        (401, "unauthorized", "sign in again", (502, "unauthorized", "sign in again")),
        (418, "teapot", "no", (502, "teapot", "no")),
        (409, "Bad Code!", "x", (409, "site_error", "x")),
        (409, "a" * 65, "x", (409, "site_error", "x")),
        (0, "", "y" * 5000, (502, "site_error", "y" * 2000 + "…")),
    ],
    ids=["2xx", "3xx", "401", "unknown-status", "bad-code", "long-code", "long-detail"],
)
async def test_a_lying_sites_refusal_is_held_to_a_sites_statuses_codes_and_length(
    status: int, code: str, detail: str, answered: tuple[int, str, str]
) -> None:
    """What an agent says about its failure reaches the API only within a site's bounds."""
    import json as jsonlib

    from labgate.agent.network import RemoteError, Session
    from labgate.wire.agent import Result

    link = NetworkSiteLink("edge", "process")

    async def send(text: str) -> None:
        command = jsonlib.loads(text)
        session.resolve(Result(id=command["id"], ok=False, error=detail, code=code, status=status))

    session = Session(send, Hello(site="edge", agent_version="x", boot="b", backend="process"))
    link.attach(session)
    with pytest.raises(RemoteError) as caught:
        await link.logs("i1", {}, 10)
    error = caught.value
    assert (error.status, error.code, error.detail) == answered


async def test_a_start_cut_short_by_closing_the_agent_is_recorded_and_adopted(
    tmp_path, demo
) -> None:
    """What a backend started while its agent closed is reported, never orphaned."""
    recorder = Recorder()
    settings = site_settings(tmp_path / "site")
    agent = make_agent_for(settings, "edge", recorder.report)
    real_start, entered = agent.backend.start, asyncio.Event()

    async def slow_start(spec: LaunchSpec) -> Any:
        entered.set()
        await asyncio.sleep(0.5)  # the agent closes in here
        return await real_start(spec)

    agent.backend.start = slow_start  # type: ignore[method-assign]
    link = LocalSiteLink(agent)
    await link.launch(spec_of(demo, "cut1"))
    await entered.wait()
    await link.close()
    endpoint, state = endpoint_of(recorder, "cut1")
    assert state["pid"] > 0
    # The next agent adopts it from that state, and can stop it.
    again = LocalSiteLink(make_agent_for(settings, "edge", recorder.report))
    try:
        await again.adopt(Adoption(spec_of(demo, "cut1"), "starting", state, endpoint, 60.0))
        await recorder.wait_state("cut1", "running")
        await again.stop("cut1", state)
        await recorder.wait_state("cut1", "stopped")
    finally:
        await again.close()


@contextlib.asynccontextmanager
async def after_a_killed_start(
    tmp_path: Path, demo: Tool, instance_id: str
) -> AsyncIterator[tuple[LocalSiteLink, Recorder]]:
    """The tool of ``instance_id`` runs, started by an agent killed before it said so;
    the block gets the link to the next agent of the site."""
    recorder = Recorder()
    settings = site_settings(tmp_path / "site")
    killed = make_agent_for(settings, "edge", recorder.report)
    await killed.backend.start(spec_of(demo, instance_id))  # its state reaches no one
    # The tool's process has its environment once it has exec'd, a moment after start.
    async with asyncio.timeout(10):
        while not processes_with_env("LABGATE_INSTANCE_ID", instance_id):
            await asyncio.sleep(0.05)
    link = LocalSiteLink(make_agent_for(settings, "edge", recorder.report))
    try:
        yield link, recorder
    finally:
        await link.close()
        await killed.backend.close()


async def test_a_stop_without_a_state_removes_the_instance_by_its_id(tmp_path, demo) -> None:
    """A start whose state was never recorded (its agent was killed) is found by its id."""
    async with after_a_killed_start(tmp_path, demo, "orphan1") as (link, recorder):
        await link.stop("orphan1", {})
        await recorder.wait_state("orphan1", "stopped")
        assert not processes_with_env("LABGATE_INSTANCE_ID", "orphan1")


async def test_a_launch_sent_again_after_a_killed_agent_runs_the_tool_once(tmp_path, demo) -> None:
    """The chaos run's find: a start whose agent was killed, launched again, ran twice.

    The killed agent's reports never reached the portal, which still saw the
    instance pending and sent the launch to the next agent.
    """
    async with after_a_killed_start(tmp_path, demo, "twice1") as (link, recorder):
        await link.launch(spec_of(demo, "twice1"))
        await recorder.wait_state("twice1", "running")
        pids = set(processes_with_env("LABGATE_INSTANCE_ID", "twice1"))
        roots = [pid for pid in pids if parent_of(pid) not in pids]
        assert len(roots) == 1, pids
        _, state = endpoint_of(recorder, "twice1")
        if cgroups.hierarchy() is not None:  # as root: the killed start's cgroups went first
            assert state["limits"]["cgroup"], "the tool runs without its cgroup limits"
        await link.stop("twice1", state)
        await recorder.wait_state("twice1", "stopped")
        assert not processes_with_env("LABGATE_INSTANCE_ID", "twice1")


async def test_an_unreadable_saved_state_is_reported_lost(tmp_path, demo) -> None:
    recorder = Recorder()
    async with local_link(tmp_path, recorder) as link:
        await link.adopt(Adoption(spec_of(demo, "bad1"), "running", {"nonsense": 1}, "", 60.0))
        await recorder.wait_state("bad1", "lost")
    assert any("unreadable" in r.message for r in recorder.reports if r.state == "lost")


async def ask_over_socket(endpoint: str, path: str, secret: str) -> httpx.Response:
    """A request to a tool on its Unix socket, the way the agent makes it."""
    with connectable(endpoint.removeprefix("unix:")) as where:
        transport = httpx.AsyncHTTPTransport(uds=where)
        async with httpx.AsyncClient(transport=transport, timeout=10) as http:
            return await http.get(
                f"http://tool{path}", headers={"Authorization": f"token {secret}"}
            )


async def test_a_tunneled_sites_warm_instance_on_its_socket_is_claimed(
    tmp_path: Path, demo: Tool
) -> None:
    """At a tunneled site the demo takes a socket; the claim hook reaches it there too."""
    reason = ProcessBackend(site_settings(tmp_path / "probe")).claim_support(demo)
    if reason is not None:
        pytest.skip(f"claims need root and bubblewrap (apt-get install bubblewrap): {reason}")
    recorder = Recorder()
    async with network_link(tmp_path, recorder, [demo], reach="tunnel") as (link, _):
        number = pool_identity_number(98_000_000 + os.getpid() % 1_000_000)
        spec = replace(
            spec_of(demo, "warm1", owner="_pool"), owner_id=number, workspace=Path("_pool/warm1")
        )
        await link.launch(spec)
        await recorder.wait_state("warm1", "running")
        endpoint, state = endpoint_of(recorder, "warm1")
        directory = tmp_path / "site" / "sockets" / "warm1"
        assert endpoint == f"unix:{directory / 'tool.sock'}"
        before = await ask_over_socket(endpoint, "/i/warm1/api/info", spec.secret)
        assert before.json()["user"] == "_pool"
        claimed = await link.claim("warm1", Claim("warm1", "bob", Path("bob"), 2))
        after = await ask_over_socket(endpoint, "/i/warm1/api/info", spec.secret)
        assert after.json()["user"] == "bob"
        await link.stop("warm1", {**state, **claimed})
        await recorder.wait_state("warm1", "stopped")
        assert not directory.exists()
