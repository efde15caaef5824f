"""``echo``: a third-party labgate backend that runs a tool as a plain local process.

It is what the backend contract asks of a package outside labgate: a
:class:`~labgate.backends.base.Backend` subclass registered in the
``labgate.backends`` entry-point group, the schema of its own tool table
(``[echo] argv = [...]``), the schema of its site options, and the four
engine calls. It has no sandbox, no limits and no snapshots: it is for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from labgate.backends.base import JSON, Backend, Diagnosis, LaunchSpec, Started, Status
from labgate.errors import InstanceStartError

#: What ``{placeholders}`` an ``[echo]`` argv may use.
PLACEHOLDERS = ("python", "port", "base_url")


class EchoSection(BaseModel):
    """A tool's ``[echo]`` table: the command line (``{python}``, ``{port}``, ``{base_url}``)."""

    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(min_length=1)


class EchoOptions(BaseModel):
    """A site's options for the echo backend."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"


class EchoBackend(Backend):
    """Runs each instance as a child process of the server, reached on ``host``."""

    name = "echo"
    abstract = False
    tool_section = "echo"
    tool_schema = EchoSection
    options_schema = EchoOptions

    def __init__(self, settings: Any, options: JSON | None = None) -> None:
        super().__init__(settings, options)
        assert isinstance(self.site_options, EchoOptions)
        self.host = self.site_options.host
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    @classmethod
    def check_tool(cls, spec: Any) -> str | None:
        """The argv may name only the placeholders this backend fills in."""
        try:
            [part.format(**dict.fromkeys(PLACEHOLDERS, "")) for part in spec.argv]
        except (KeyError, IndexError, ValueError) as exc:
            return f"[echo] argv uses an unknown placeholder: {exc}"
        return None

    def doctor(self) -> list[Diagnosis]:
        """Nothing to check but the loopback host."""
        return [Diagnosis("ok", f"echo engine: child processes on {self.host}")]

    async def start(self, spec: LaunchSpec) -> Started:
        """Run the argv with a fresh port in the workspace; the log goes next to it."""
        section = spec.tool.parsed(self.tool_section, EchoSection)
        if section is None:
            raise InstanceStartError(f"tool {spec.tool.name!r} has no [echo] table")
        with socket.socket() as probe:
            probe.bind((self.host, 0))
            port = probe.getsockname()[1]
        values = {"python": sys.executable, "port": str(port), "base_url": spec.base_url}
        argv = [part.format(**values) for part in section.argv]
        workspace = spec.workspace
        workspace.mkdir(parents=True, exist_ok=True)
        log_path = workspace / f".echo-{spec.instance_id}.log"
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": str(workspace),
            **spec.env,
            "LABGATE_INSTANCE_ID": spec.instance_id,
            "LABGATE_INSTANCE_TOKEN": spec.secret,
            "LABGATE_BASE_URL": spec.base_url,
        }
        with log_path.open("wb") as log:
            child = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workspace,
                env=env,
                start_new_session=True,
            )
        self._children[child.pid] = child
        return Started({"pid": child.pid, "log": str(log_path)}, f"http://{self.host}:{port}")

    async def poll(self, state: JSON) -> Status:
        """Alive while the child has not exited."""
        child = self._children.get(int(state["pid"]))
        if child is None:
            return Status(alive=False, detail="not started by this server")
        code = child.poll()
        return Status(alive=code is None, exit_code=code, detail=f"exited with code {code}")

    async def stop(self, state: JSON, grace: float) -> None:
        """SIGTERM to the child's session, SIGKILL after ``grace`` seconds."""
        child = self._children.pop(int(state["pid"]), None)
        if child is None or child.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(child.wait, grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            await asyncio.to_thread(child.wait)

    async def logs(self, state: JSON, lines: int = 100) -> str:
        """The last lines of the child's output."""
        try:
            text = Path(state["log"]).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
