"""The start budget: a busy start gets its tool's grace; a failure says which it was."""

from __future__ import annotations

import asyncio

import pytest

from helpers import wait_for_state
from tools_fixtures import DEMO_COMMAND


def tool(name: str, env: str, *, timeout: float, grace: float) -> str:
    return (
        f'name = "{name}"\ntitle = "{name}"\nhealth_path = "/api/health"\n'
        f"start_timeout = {timeout}\nstart_grace = {grace}\n\n"
        f"[process]\n{DEMO_COMMAND}\nenv = {{ {env} }}\n"
    )


@pytest.fixture
def settings(settings):
    tools = settings.tools_dir
    # Busy (using CPU) for longer than its budget, then ready: the grace saves it.
    (tools / "busy.toml").write_text(tool("busy", 'DEMO_BUSY_START = "2.5"', timeout=1, grace=60))
    # Alive but idle and never healthy: no grace, whatever it declares.
    (tools / "idle.toml").write_text(tool("idle", 'DEMO_NEVER_READY = "1"', timeout=1, grace=60))
    # Not listening yet when its budget ends (asleep: no grace either).
    (tools / "deaf.toml").write_text(tool("deaf", 'DEMO_START_DELAY = "30"', timeout=1, grace=60))
    (tools / "absent.toml").write_text(
        'name = "absent"\ntitle = "absent"\n[process]\ncommand = ["/nonexistent/labgate-tool"]\n'
    )
    return settings


async def launch(client, headers, tool_name: str) -> str:
    r = await client.post("/api/v1/instances", json={"tool": tool_name}, headers=headers)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def test_a_start_still_using_cpu_gets_the_tools_grace(client, make_user, app):
    ann = await make_user("ann")
    iid = await launch(client, ann, "busy")
    body = await wait_for_state(client, ann, iid, {"running", "failed"}, timeout=90)
    assert body["state"] == "running", body
    notes = await app.state.portal.run_db(lambda s: _messages(s, iid))
    assert any("using CPU" in message for message in notes), notes


async def test_an_idle_start_gets_no_grace_and_never_answered_says_so(client, make_user):
    ben = await make_user("ben")
    iid = await launch(client, ben, "idle")
    body = await wait_for_state(client, ben, iid, {"running", "failed"}, timeout=40)
    assert body["state"] == "failed"
    assert body["reason"].startswith("never answered: not ready within 1s")
    assert "grace" not in body["reason"]


async def test_a_tool_not_listening_yet_is_probed_and_the_reason_says_so(client, make_user):
    """Until its address accepts connections the agent only connects (no HTTP request),
    and a start that never got that far says so."""
    dan = await make_user("dan")
    iid = await launch(client, dan, "deaf")
    body = await wait_for_state(client, dan, iid, {"running", "failed"}, timeout=40)
    assert body["state"] == "failed"
    assert body["reason"].startswith("never answered: not ready within 1s"), body
    assert "nothing listens at the tool's address yet" in body["reason"], body


async def test_the_listening_probe_tells_an_open_address_from_a_closed_one(tmp_path):
    from labgate.agent.site import listening, probe_address

    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    unix = await asyncio.start_unix_server(lambda r, w: w.close(), str(tmp_path / "tool.sock"))
    try:
        assert await listening(probe_address(f"http://127.0.0.1:{port}"))
        assert await listening(probe_address(f"unix:{tmp_path / 'tool.sock'}"))
        assert not await listening(probe_address(f"unix:{tmp_path / 'absent.sock'}"))
    finally:
        for s in (server, unix):
            s.close()
            await s.wait_closed()
    assert not await listening(probe_address(f"http://127.0.0.1:{port}"))  # closed now
    # An endpoint the agent cannot probe is asked over HTTP straight away.
    assert probe_address("tunnel:site/id") is None and await listening(None)


async def test_a_crash_and_a_start_that_never_happened_say_which(client, make_user, app):
    cat = await make_user("cat")
    crashed = await launch(client, cat, "crashing")
    never = await launch(client, cat, "absent")
    body = await wait_for_state(client, cat, crashed, {"running", "failed"})
    assert body["reason"].startswith("crashed: the tool exited with code 3"), body
    body = await wait_for_state(client, cat, never, {"running", "failed"})
    assert body["state"] == "failed"
    assert body["reason"].startswith("never started: "), body
    kinds = await app.state.portal.run_db(lambda s: [_failure(s, crashed), _failure(s, never)])
    assert kinds == ["crashed", "never_started"]


def _messages(session, instance_id: str) -> list[str]:
    from sqlalchemy import select

    from labgate.db.models import InstanceEvent

    return list(
        session.scalars(
            select(InstanceEvent.message).where(InstanceEvent.instance_id == instance_id)
        )
    )


def _failure(session, instance_id: str) -> str:
    from sqlalchemy import select

    from labgate.db.models import InstanceEvent

    data = session.scalars(
        select(InstanceEvent.data).where(
            InstanceEvent.instance_id == instance_id, InstanceEvent.state == "failed"
        )
    ).first()
    return str((data or {}).get("failure"))
