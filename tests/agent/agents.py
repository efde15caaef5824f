"""Real ``labgate agent`` processes for tests, dialing a real ``labgate serve``."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from servers import LabgateServer, terminate

ADMIN_PASSWORD = "network-sites-admin-pw"


@contextlib.contextmanager
def labgate_server(directory: Path, **env: str) -> Iterator[LabgateServer]:
    """``labgate serve`` on ``directory`` with ``env``; afterwards its instances are stopped,
    then it."""
    srv = LabgateServer(directory, ADMIN_PASSWORD, **env)
    srv.start()
    try:
        yield srv
    finally:
        try:
            srv.stop_instances("admin", ADMIN_PASSWORD)
        finally:
            srv.stop()


class AgentProcess:
    """``labgate agent`` in a subprocess with its own data dir (the site's machine)."""

    def __init__(
        self, data_dir: Path, portal: str, token: str, *, prefix: list[str] | None = None
    ) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"agent-{data_dir.name}.log"
        self.prefix = prefix or []
        self.env = {
            **os.environ,
            "LABGATE_DATA_DIR": str(data_dir),
            "LABGATE_AGENT_PORTAL": portal,
            "LABGATE_AGENT_TOKEN": token,
            "LABGATE_POLL_INTERVAL": "0.2",
            "LABGATE_AGENT_RECONNECT_MAX": "1",
        }
        self.env.pop("LABGATE_CONFIG", None)
        self.env.pop("LABGATE_SECRET_KEY", None)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it (it dials out by itself)."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "labgate", "agent"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        """SIGKILL: the agent dies at once, its instances keep running."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM and wait."""
        if self.process is None:
            return
        terminate(self.process, timeout)
        self.process = None

    def log(self) -> str:
        """What it printed."""
        return self.log_path.read_text() if self.log_path.exists() else ""


def add_site(server: LabgateServer, headers: dict[str, str], name: str, **body: Any) -> str:
    """Add a network site through the API; its token."""
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        created = client.post("/api/v1/sites", json={"name": name, "backend": "process", **body})
        assert created.status_code == 201, created.text
        return str(created.json()["token"])


def wait_site(
    server: LabgateServer, headers: dict[str, str], name: str, status: str, timeout: float = 30
) -> dict[str, Any]:
    """Poll the site through the API until its status is ``status``."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        while True:
            body: dict[str, Any] = client.get(f"/api/v1/sites/{name}").json()
            if body.get("status") == status:
                return body
            assert time.monotonic() < deadline, body
            time.sleep(0.1)


def wait_run_ended(
    client: httpx.Client, run_id: str, agent: AgentProcess, timeout: float = 60
) -> dict[str, Any]:
    """Poll a run until it is no longer running; its last view."""
    deadline = time.monotonic() + timeout
    while (run := client.get(f"/api/v1/runs/{run_id}").json())["state"] in ("pending", "running"):
        assert time.monotonic() < deadline, (run, agent.log())
        time.sleep(0.1)
    found: dict[str, Any] = run
    return found


def result_names(client: httpx.Client, run_id: str) -> list[str]:
    """The names in a run's results archive."""
    archive = client.get(f"/api/v1/runs/{run_id}/results")
    assert archive.status_code == 200, archive.text
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        return tar.getnames()
