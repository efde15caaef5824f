"""The Slurm job's launcher on its own (no cluster): the tool behind the node's relay.

The launcher is what runs on a compute node. Here it runs as the real script,
with the relay on a non-loopback address of this machine (the default route's
interface, as a node's address would be): the demo tool is reached through the
relay, listens itself only on 127.0.0.1, refuses a request without its
instance token (what protects it on the node's network), and the relay ends
with the tool.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from labgate.backends.slurm import launcher
from labgate.backends.slurm.launcher import PORT_MARK

TOKEN = "relay-test-instance-token"


def refused(host: str, port: int) -> bool:
    """Whether nothing accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return False
    except OSError:
        return True


@pytest.fixture
def job(tmp_path: Path, node_address: str) -> Iterator[dict[str, object]]:
    """The launcher started as a job's body would be; its endpoint report."""
    launch = {
        "argv": [sys.executable, "-m", "labgate.tools.demo", "--port", PORT_MARK],
        "env": {"LABGATE_INSTANCE_TOKEN": TOKEN, "PATH": os.environ["PATH"]},
        "workdir": str(tmp_path / "work"),
        "ports": [0, 0],
        "endpoint_host": node_address,
    }
    (tmp_path / "launch.json").write_text(json.dumps(launch))
    log = (tmp_path / "job.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, launcher.__file__, str(tmp_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "SLURM_JOB_ID": "42"},
    )
    endpoint = tmp_path / "endpoint.json"
    deadline = time.monotonic() + 20
    while not endpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert endpoint.exists(), (tmp_path / "job.log").read_text()
    report: dict[str, object] = json.loads(endpoint.read_text())
    report["proc"] = proc
    report["workdir"] = launch["workdir"]
    yield report
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)
    log.close()


def get(host: str, port: int, path: str, **headers: str) -> httpx.Response:
    """GET ``path`` from ``host:port``, retrying while the tool starts."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return httpx.get(f"http://{host}:{port}{path}", headers=headers, timeout=5)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_the_tool_is_reached_through_the_relay_and_listens_only_on_loopback(job, node_address):
    assert job["host"] == node_address and job["job_id"] == "42"
    port, tool_port = int(job["port"]), int(job["tool_port"])  # type: ignore[call-overload]
    r = get(node_address, port, "/api/health", authorization=f"token {TOKEN}")
    assert r.status_code == 200, r.text
    # The tool answers on the node's loopback only; the node's address is the relay's.
    assert get("127.0.0.1", tool_port, "/api/health", authorization=f"token {TOKEN}").is_success
    assert refused(node_address, tool_port)
    # A body larger than the relay's chunk, both ways, on one kept-alive connection.
    big = os.urandom(300_000)
    path = str(Path(str(job["workdir"])) / "big.bin")
    with httpx.Client(
        base_url=f"http://{node_address}:{port}", headers={"authorization": f"token {TOKEN}"}
    ) as client:
        assert client.put("/api/file", params={"path": path}, content=big).is_success
        for _ in range(2):
            assert client.get("/api/download", params={"path": path}).content == big


def test_through_the_relay_the_tool_wants_its_instance_token_and_the_relay_ends_with_it(
    job, node_address
):
    port = int(job["port"])  # type: ignore[call-overload]
    # On the node's network anyone can connect: the instance token is what the tool checks.
    assert get(node_address, port, "/api/health").status_code == 403
    wrong = get(node_address, port, "/api/health", authorization="token not-the-one")
    assert wrong.status_code == 403
    # The launcher became the tool (same pid): when it ends, the relay stops listening.
    assert job["pid"] == job["proc"].pid  # type: ignore[attr-defined]
    os.kill(int(job["pid"]), signal.SIGTERM)  # type: ignore[call-overload]
    job["proc"].wait(10)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while not refused(node_address, port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert refused(node_address, port)


def test_the_launcher_keeps_to_the_sites_port_range():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        # The range's only port is taken: no port outside it (the agent would ignore it).
        with pytest.raises(OSError, match="no free port"):
            launcher.bind_port("127.0.0.1", port, port + 1)
    with launcher.bind_port("127.0.0.1", port, port + 1) as sock:
        assert sock.getsockname()[1] == port
