"""A real labgate portal on a random loopback port, served by uvicorn in a thread.

For tests of clients (the CLI, the REST client) that need real HTTP:
streaming, cookies, connection errors. Instances left running are stopped
before the server shuts down, so no process outlives the tests.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from helpers import TEST_SECRET_KEY
from labgate.config import Settings
from labgate.portal.app import create_app
from tools_fixtures import FORM_TOOL

ADMIN_PASSWORD = "admin-password-for-cli-tests"
TERMINAL = {"stopped", "failed", "lost"}

# A tool that prints a little and exits before it is ever ready.
CRASHING_TOOL = """
name = "crashy"
title = "Crashy"
description = "Exits at once, for testing failed launches."
health_path = "/"
start_timeout = 20

[process]
command = [
  "{python}", "-c",
  "print('crashy: loading'); print('crashy: no config found'); raise SystemExit(3)",
]
requires = ["python"]
"""


@dataclass(frozen=True)
class LiveServer:
    """A running portal: its URL and settings."""

    url: str
    settings: Settings

    def admin_token(self) -> str:
        """A fresh admin API token with every scope."""
        with httpx.Client(base_url=self.url) as http:
            login = http.post(
                "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            )
            login.raise_for_status()
            created = http.post(
                "/api/v1/tokens",
                json={"note": "tests", "scopes": login.json()["scopes"]},
                headers={"X-CSRF-Token": login.json()["csrf_token"]},
            )
            created.raise_for_status()
            return str(created.json()["token"])


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _stop_instances(server: LiveServer) -> None:
    token = server.admin_token()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"token {token}"}) as http:
        active = http.get("/api/v1/instances", params={"active": "true"}).json()
        for instance in active:
            http.delete(f"/api/v1/instances/{instance['id']}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = http.get("/api/v1/instances", params={"active": "true"}).json()
            if not left:
                return
            time.sleep(0.1)


@contextmanager
def live_server(tmp: Path, **overrides: Any) -> Iterator[LiveServer]:
    """Run the portal on a random port until the block ends (``overrides``: settings)."""
    tools = tmp / "tools"
    tools.mkdir(exist_ok=True)
    (tools / "crashy.toml").write_text(CRASHING_TOOL)
    (tools / "form.toml").write_text(FORM_TOOL)
    sock = _free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = Settings(
        data_dir=tmp / "var",
        admin_password=ADMIN_PASSWORD,
        secret_key=TEST_SECRET_KEY,
        public_url=url,
        tools_dir=tools,
        poll_interval=0.2,
        stop_grace_seconds=3,
        **overrides,
    )
    config = uvicorn.Config(
        create_app(settings),
        lifespan="on",
        loop="asyncio",
        log_config=None,
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    live = LiveServer(url=url, settings=settings)
    try:
        yield live
    finally:
        try:
            _stop_instances(live)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            sock.close()
