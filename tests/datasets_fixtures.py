"""Helpers for dataset tests: two local sites with data roots, reading inside instances.

The sites ``east`` and ``west`` are two process sites on this machine with
different data roots; ``data_root(settings, "east")`` finds one. Instances
are probed through the demo tool's ``/api/file`` endpoint, called the way
the router calls it (with the instance token), which is how a test sees what
the tool itself can read and write.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from helpers import ADMIN_PASSWORD, TEST_SECRET_KEY, tool_client, tool_headers
from labgate.config import Settings, SiteCapacity, SiteConfig

#: Directories made in both data roots, so tests can register replicas of them.
PRESENT = ("a", "b", "c", "iris", "zenodo/1234", "mirror/iris", "penguins", "old")


def multi_site_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    """Settings with sites east and west (each with its own data root), quick polling."""
    from tools_fixtures import write_test_tools

    roots = {name: tmp_path / f"{name}-data" for name in ("east", "west")}
    for root in roots.values():
        root.mkdir(parents=True, exist_ok=True)
        # Replica paths must exist on their site: the empty directories tests name.
        for path in PRESENT:
            (root / path).mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {
        "data_dir": tmp_path / "var",
        "tools_dir": write_test_tools(tmp_path / "tools"),
        "database_url": database_url,
        "admin_password": ADMIN_PASSWORD,
        "secret_key": TEST_SECRET_KEY,
        "poll_interval": 0.2,
        "stop_grace_seconds": 3,
        "dataset_fetch_private_networks": True,
        "sites": [
            SiteConfig(
                name="east",
                data_root=roots["east"],
                labels={"zone": "eu"},
                capacity=SiteCapacity(cpu=8, memory="16G", max_instances=10),
            ),
            SiteConfig(name="west", data_root=roots["west"], labels={"zone": "us"}),
        ],
    }
    values.update(overrides)
    return Settings(**values)


def data_root(settings: Settings, site: str) -> Path:
    """The data root of a configured site."""
    root = next(s.data_root for s in settings.sites if s.name == site)
    assert root is not None
    return root


def put_files(root: Path, path: str, files: dict[str, str]) -> Path:
    """A replica directory with ``files`` in it, read-only for everyone."""
    directory = root / path
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def require_bwrap() -> None:
    """Skip when bubblewrap is missing; in CI (CI=true) that is a failure instead."""
    if shutil.which("bwrap") is not None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("bubblewrap is required in CI: apt-get install bubblewrap")
    pytest.skip("bubblewrap not installed: apt-get install bubblewrap")


async def instance_access(app: Any, instance_id: str) -> tuple[str, dict[str, str], int]:
    """The instance's endpoint, the router's header, and its tracked pid."""
    from labgate.db.models import Instance

    instance = await app.state.portal.run_db(lambda s: s.get(Instance, instance_id))
    pid = int(instance.backend_state["pid"])
    return instance.endpoint, tool_headers(app, instance), pid


async def read_in(app: Any, instance_id: str, path: str) -> str | None:
    """A file as the tool sees it, or None when the tool cannot read it."""
    endpoint, headers, _ = await instance_access(app, instance_id)
    async with tool_client(endpoint, headers=headers) as client:
        response = await client.get(f"/i/{instance_id}/api/file", params={"path": path})
    return str(response.json()["content"]) if response.status_code == 200 else None


async def write_in(app: Any, instance_id: str, path: str) -> bool:
    """Whether the tool can write ``path``."""
    endpoint, headers, _ = await instance_access(app, instance_id)
    async with tool_client(endpoint, headers=headers) as client:
        response = await client.put(
            f"/i/{instance_id}/api/file", params={"path": path}, content=b"overwritten"
        )
    return response.status_code == 200


def environment_of(pid: int) -> dict[str, str]:
    """The environment a process was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs}


class FileServer:
    """A loopback HTTP server for URL datasets: known paths, a request counter."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@contextmanager
def file_server() -> Iterator[FileServer]:
    """A :class:`FileServer` running in a thread for the duration of the block."""
    server = FileServer()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join()
