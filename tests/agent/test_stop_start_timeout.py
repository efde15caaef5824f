"""A start that times out and cannot be stopped is not forgotten, and a shutdown says so.

The tool here never answers its health check and cannot be killed: it reads a
file of a FUSE file system that never answers (``backends/fuse_stall.py``),
asleep uninterruptibly as on a hung NFS server. The agent's stop after the
start timeout fails (the process backend says which process survived SIGKILL).

The agent swallowed that failure and reported the start ``failed`` (final: no
stop would ever be sent again) while the processes ran on; ``stop_everything``
gave up on such an instance after 30 s without a word.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import helpers
from backends.fuse_stall import Stall, stalled
from helpers import stop_everything, wait_for_state
from labgate.backends import process as process_module
from labgate.config import Settings

#: Reads a file of the stalled file system given as its last argument: asleep for good.
STALLED_READER = """\
import sys
open(sys.argv[-1] + "/file")
"""

__all__ = ["stalled"]  # the fixture, for this module's tests


def running_with(*words: str) -> list[int]:
    """Live processes whose command line holds ``words``."""
    needle = "\0".join(words).encode()
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_bytes()
            if (
                stat.split(b") ")[-1][:1] not in b"ZX"
                and needle in (entry / "cmdline").read_bytes()
            ):
                found.append(int(entry.name))
    return found


@pytest.fixture
def token() -> Iterator[str]:
    """The word on the command line of the test's tool; its processes killed after."""
    word = f"lgstuck-{uuid.uuid4().hex}"
    yield word
    for pid in running_with(word):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def settings(settings: Settings, tmp_path: Path, token: str, stalled: Stall) -> Settings:
    """Unsandboxed (the tool reads the host's mount), with the ``stuck`` tool."""
    script = tmp_path / "reader.py"
    script.write_text(STALLED_READER)
    (settings.tools_dir / "stuck.toml").write_text(
        'name = "stuck"\ntitle = "stuck"\nhealth_path = "/health"\n'
        "start_timeout = 3\nstart_grace = 0\n\n"
        f'[process]\ncommand = ["{{python}}", "{script}", "{token}", "{stalled.path}"]\n'
    )
    return settings.model_copy(update={"sandbox": "none", "stop_grace_seconds": 0.2})


@pytest.fixture(autouse=True)
def quick_kill_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """About a second of SIGKILL rounds before a stop says processes survived."""
    monkeypatch.setattr(process_module, "_KILL_ROUNDS", 20)


async def launch_stuck(
    app: Any, client: httpx.AsyncClient, headers: dict[str, str], stalled: Stall
) -> str:
    """Launch ``stuck`` and wait until its failed start leaves it ``stopping``; its id."""
    app.state.portal.links["local"].agent.stop_retry_first = 0.2
    response = await client.post("/api/v1/instances", json={"tool": "stuck"}, headers=headers)
    assert response.status_code == 202, response.text
    iid = str(response.json()["id"])
    await asyncio.to_thread(stalled.wait_held)  # the tool reads, before its 3 s are over
    body = await wait_for_state(client, headers, iid, {"stopping", "failed", "stopped"}, 60)
    assert body["state"] == "stopping", (body["state"], body["reason"])
    return iid


async def test_a_timed_out_start_whose_stop_fails_stays_stopping_and_is_retried(
    app: Any,
    client: httpx.AsyncClient,
    make_user: Any,
    token: str,
    stalled: Stall,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ann = await make_user("ann")
    caplog.set_level(logging.ERROR, logger="labgate.agent.site")
    iid = await launch_stuck(app, client, ann, stalled)

    deadline = time.monotonic() + 20
    while True:
        body = (await client.get(f"/api/v1/instances/{iid}", headers=ann)).json()
        if "stop failed" in body["reason"]:
            break
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)
    # Its reason says both: the start never answered, and stopping it failed.
    assert body["state"] == "stopping", body
    assert body["reason"].startswith("never answered: not ready within 3s"), body
    assert "survived SIGKILL" in body["reason"], body
    assert "state D: uninterruptible sleep" in body["reason"], body
    assert any(
        iid in record.getMessage() and "stopping it failed" in record.getMessage()
        for record in caplog.records
    ), caplog.text
    assert running_with(token)  # true: it is there, and labgate does not say otherwise

    # Still the agent's: its stop is tried again, and ends the instance once it can.
    stalled.release()
    body = await wait_for_state(client, ann, iid, {"stopped", "failed", "lost"}, 60)
    assert body["state"] == "stopped", body
    assert running_with(token) == []


async def test_stop_everything_names_what_it_could_not_stop_and_returns_in_time(
    app: Any,
    client: httpx.AsyncClient,
    make_user: Any,
    token: str,
    stalled: Stall,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ben = await make_user("ben")
    iid = await launch_stuck(app, client, ben, stalled)
    monkeypatch.setattr(helpers, "STOP_EVERYTHING_TIMEOUT", 1.0, raising=False)

    began = time.monotonic()
    left = await stop_everything(app)

    assert isinstance(left, list), left
    assert [(item.instance_id, item.state) for item in left] == [(iid, "stopping")]
    assert left[0].why, left
    assert any(
        iid in record.getMessage() for record in caplog.records if record.levelname == "ERROR"
    )
    assert time.monotonic() - began < 10
    stalled.release()
    assert await stop_everything(app) == []
    assert running_with(token) == []
