"""The process backend's stop ends every process of an instance, or says it could not.

Real processes, unsandboxed (the cases here are about what a stop finds in
/proc; under bubblewrap the PID namespace's end kills them all anyway):

- a process whose main thread exited while another thread runs on shows ``Z``
  in /proc like a zombie, and has no environment under its own pid: the stop
  took it for dead and left it running, and poll called such a tool gone;
- a process SIGKILL cannot end (here: asleep uninterruptibly on a FUSE file
  system that never answers, as on a hung NFS server) made the stop return
  as if it had ended it, and the instance was reported ``stopped`` with its
  process still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from backends.fuse_stall import Stall, stalled
from labgate.backends import process as process_module
from labgate.backends.base import LaunchSpec, Started
from labgate.backends.process import ProcessBackend
from labgate.config import Settings
from labgate.errors import BackendError
from labgate.tools.catalog import ProcessSpec, Tool

#: The ``exit`` system call (this thread only, unlike ``exit_group``) by machine.
SYS_EXIT = {"x86_64": 60, "aarch64": 93}

# role "tool": starts a child ("thread" role) unless THREAD_TOOL asks it to be one itself.
# role "thread": ignores TERM, runs a second thread, and ends its main thread alone.
THREADS = """\
import ctypes, os, signal, subprocess, sys, threading, time
token, role = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "tool"
if role == "tool" and not os.environ.get("THREAD_TOOL"):
    subprocess.Popen([sys.executable, __file__, token, "thread"])
    time.sleep(600)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
open(f"{role}.ready", "w").close()
ctypes.CDLL(None).syscall(int(os.environ["SYS_EXIT"]), 0)  # the main thread only
"""

#: Reads a file of the stalled file system given as its last argument: asleep for good.
STALLED_READER = """\
import sys
open(sys.argv[-1] + "/file")
"""

#: Starts a script as a tool: its Started, its LaunchSpec and the token on its command line.
Launch = Callable[..., Awaitable[tuple[Started, LaunchSpec, str]]]

__all__ = ["stalled"]  # the fixture, for this module's tests


def read_bytes(path: str) -> bytes:
    """The file's bytes, or b"" when it cannot be read (process gone)."""
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def running_with(*words: str) -> dict[int, str]:
    """Processes with a running thread whose command line holds ``words``: pid -> state.

    Looked for thread by thread: a process whose main thread has exited has an
    empty command line under its own pid, but not under its other threads'.
    """
    needle = "\0".join(words).encode()
    found: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{name}/task"):
                stat = read_bytes(f"/proc/{name}/task/{tid}/stat")
                state = stat[stat.rindex(b")") + 2 :][:1].decode() if stat else "X"
                if state not in "ZX" and needle in read_bytes(f"/proc/{name}/task/{tid}/cmdline"):
                    found[int(name)] = (
                        read_bytes(f"/proc/{name}/stat").split(b") ")[-1][:1].decode()
                    )
                    break
    return found


async def wait_until(predicate: Callable[[], object], timeout: float = 15) -> None:
    """Poll ``predicate`` until it is truthy."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Unsandboxed settings on a private data dir."""
    return Settings(data_dir=tmp_path / "data", sandbox="none")


@pytest.fixture
def backend(settings: Settings) -> ProcessBackend:
    """A process backend on the test's settings."""
    return ProcessBackend(settings)


@pytest.fixture
async def launch(settings: Settings, backend: ProcessBackend) -> AsyncIterator[Launch]:
    """Start a script as a tool; whatever carries its token is killed when the test ends."""
    tokens: list[str] = []

    async def start(
        script: str, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> tuple[Started, LaunchSpec, str]:
        workspace = settings.workspaces_dir / "alice"
        workspace.mkdir(parents=True, exist_ok=True)
        (workspace / "tool.py").write_text(script)
        token = f"lgstop-{uuid.uuid4().hex}"
        tokens.append(token)
        command = ["{python}", "{workspace}/tool.py", token, *args]
        tool = Tool(name="t", title="T", process=ProcessSpec(command=command))
        instance_id = f"t{uuid.uuid4().hex[:12]}"
        spec = LaunchSpec(
            instance_id=instance_id,
            owner="alice",
            owner_id=None,
            tool=tool,
            base_url=f"/i/{instance_id}/",
            workspace=workspace,
            resources=tool.resources.default(),
            secret=uuid.uuid4().hex,
            env=env or {},
        )
        return await backend.start(spec), spec, token

    yield start
    for token in tokens:
        for pid in running_with(token):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def sys_exit() -> str:
    number = SYS_EXIT.get(platform.machine())
    if number is None:
        pytest.skip(f"no exit system call number known for {platform.machine()}")
    return str(number)


async def test_stop_kills_a_child_whose_main_thread_exited(
    launch: Launch, backend: ProcessBackend
) -> None:
    started, spec, token = await launch(THREADS, {"SYS_EXIT": sys_exit()})
    await wait_until(lambda: (spec.workspace / "thread.ready").exists())
    # The child's main thread is gone: /proc shows it as a zombie, its other thread runs.
    await wait_until(lambda: list(running_with(token, "thread").values()) == ["Z"])

    await backend.stop(started.state, grace=0.5)

    assert running_with(token) == {}


async def test_poll_calls_a_tool_whose_main_thread_exited_alive(
    launch: Launch, backend: ProcessBackend
) -> None:
    started, spec, token = await launch(THREADS, {"SYS_EXIT": sys_exit(), "THREAD_TOOL": "1"})
    await wait_until(lambda: (spec.workspace / "tool.ready").exists())
    await wait_until(lambda: list(running_with(token).values()) == ["Z"])

    status = await backend.poll(started.state)
    assert status.alive, status

    await backend.stop(started.state, grace=0.5)
    assert running_with(token) == {}
    assert not (await backend.poll(started.state)).alive


async def test_a_stop_that_cannot_end_every_process_says_so(
    launch: Launch,
    backend: ProcessBackend,
    stalled: Stall,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(process_module, "_KILL_ROUNDS", 20)  # about a second of SIGKILLs
    started, spec, token = await launch(STALLED_READER, args=(str(stalled.path),))
    await asyncio.to_thread(stalled.wait_held)

    with pytest.raises(BackendError) as caught:
        await backend.stop(started.state, grace=0.2)

    detail = caught.value.detail
    assert f"instance {spec.instance_id} is not stopped" in detail
    assert f"{started.state['pid']} (python" in detail
    assert "state D: uninterruptible sleep" in detail, detail
    assert spec.instance_id in caplog.text
    assert list(running_with(token).values()) == ["D"]  # true: it is there
    stalled.release()  # it can die now: the next stop ends it
    await backend.stop(started.state, grace=0.2)
    assert running_with(token) == {}
