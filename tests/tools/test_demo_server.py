"""The demo tool's standard-library server: the endpoints, token check and WebSocket echo."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import websockets

from servers import free_port

TOKEN = {"Authorization": "token demo-secret"}


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "LABGATE_INSTANCE_TOKEN": "demo-secret",
        "LABGATE_USER": "ada",
        "LABGATE_INSTANCE_ID": "x",
        "HOME": str(tmp_path),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "labgate.tools.demo", "--port", str(port), "--base-url", "/i/x/"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url) as client:
        for _ in range(200):
            try:
                await client.get("/i/x/api/health", headers=TOKEN)
                break
            except httpx.HTTPError:
                await asyncio.sleep(0.02)
    try:
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0  # a clean exit on TERM, as uvicorn did


async def test_endpoints_and_the_token(demo: str, tmp_path: Path) -> None:
    async with httpx.AsyncClient(base_url=demo) as client:
        refused = await client.get("/i/x/api/info")
        assert refused.status_code == 403 and refused.json() == {"error": "forbidden"}
        info = (
            await client.get("/i/x/api/info", headers={**TOKEN, "X-Labgate-User": "ada"})
        ).json()
        assert info["user"] == "ada" and info["path"] == "/i/x/api/info"
        assert info["headers"] == {"x-labgate-user": "ada"} and info["base_url"] == "/i/x/"
        page = await client.get("/i/x/", headers=TOKEN)
        assert page.headers["content-type"].startswith("text/html") and "ada" in page.text
        assert (await client.head("/i/x/api/info", headers=TOKEN)).content == b""
        assert (await client.get("/i/x/nope", headers=TOKEN)).status_code == 404
        assert (await client.get("/elsewhere", headers=TOKEN)).status_code == 404
        assert (await client.post("/i/x/api/health", headers=TOKEN)).status_code == 405

        async def chunks() -> AsyncIterator[bytes]:
            yield b"written "
            yield b"in chunks"

        target = tmp_path / "note.txt"
        put = await client.put(
            "/i/x/api/file", params={"path": str(target)}, content=chunks(), headers=TOKEN
        )
        assert put.json() == {"ok": True} and target.read_text() == "written in chunks"
        got = await client.get("/i/x/api/file", params={"path": str(target)}, headers=TOKEN)
        assert got.json() == {"ok": True, "content": "written in chunks"}
        missing = await client.get("/i/x/api/file", params={"path": "/no/such"}, headers=TOKEN)
        assert missing.status_code == 404 and missing.json()["error"] == "FileNotFoundError"

        (tmp_path / "other").mkdir()
        bad = await client.post("/i/x/api/claim", json={"user": "bob"}, headers=TOKEN)
        assert bad.status_code == 400
        claimed = await client.post(
            "/i/x/api/claim",
            json={"user": "bob", "workspace": str(tmp_path / "other")},
            headers=TOKEN,
        )
        assert claimed.status_code == 200
        after = (await client.get("/i/x/api/info", headers=TOKEN)).json()
        assert after["user"] == "bob" and after["home"] == str(tmp_path / "other")


async def test_download_sends_a_whole_file_as_it_is(demo: str, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    (tmp_path / "blob").write_bytes(data)
    async with httpx.AsyncClient(base_url=demo) as client:
        params = {"path": str(tmp_path / "blob")}
        refused = await client.get("/i/x/api/download", params=params)
        assert refused.status_code == 403
        got = await client.get("/i/x/api/download", params=params, headers=TOKEN)
        assert got.status_code == 200 and got.content == data
        assert got.headers["content-type"] == "application/octet-stream"
        head = await client.head("/i/x/api/download", params=params, headers=TOKEN)
        assert head.headers["content-length"] == str(len(data)) and head.content == b""
        # The connection stays usable after a download (keep-alive).
        assert (await client.get("/i/x/api/health", headers=TOKEN)).status_code == 200
        missing = await client.get("/i/x/api/download", params={"path": "/no/such"}, headers=TOKEN)
        assert missing.status_code == 404 and missing.json()["error"] == "FileNotFoundError"


async def test_websocket_echo(demo: str) -> None:
    url = demo.replace("http", "ws", 1) + "/i/x/ws"
    async with websockets.connect(url, additional_headers=TOKEN) as socket:
        await socket.send("hello")
        assert await socket.recv() == "hello"
        big = bytes(range(256)) * 400
        await socket.send(big)
        assert await socket.recv() == big
        await socket.send(["frag", "mented"])  # one message in two frames
        assert await socket.recv() == "fragmented"
        await (await socket.ping())
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(url):
            pass


def test_many_connections_at_once_within_the_default_memory_limit(tmp_path: Path) -> None:
    """512 MiB of address space (the demo's default memory) holds 60 connections' threads."""
    import resource
    import socket

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (512 * 2**20, 512 * 2**20))

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "labgate.tools.demo", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        preexec_fn=limit,  # the limit a process backend sets
    )
    sockets: list[socket.socket] = []
    try:
        for _ in range(200):
            try:
                sockets.append(socket.create_connection(("127.0.0.1", port), 1))
                break
            except OSError:
                time.sleep(0.02)
        sockets += [socket.create_connection(("127.0.0.1", port), 5) for _ in range(59)]
        for sock in sockets:  # each held open, so each keeps its thread
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: demo\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200"), len(sockets)
    finally:
        for sock in sockets:
            sock.close()
        process.send_signal(signal.SIGTERM)
        process.wait(10)


async def test_on_a_unix_socket_it_serves_the_same_and_removes_the_socket_at_exit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tool.sock"
    path.write_text("left by an earlier run")  # replaced, not an error
    env = {**os.environ, "LABGATE_INSTANCE_TOKEN": "demo-secret", "HOME": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "labgate.tools.demo", "--socket", str(path), "--base-url", "/i/x/"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    try:
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
            for _ in range(200):
                try:
                    answer = await client.get("/i/x/api/health", headers=TOKEN)
                    break
                except httpx.HTTPError:
                    await asyncio.sleep(0.02)
            assert answer.json() == {"ready": True}
            assert (await client.get("/i/x/api/health")).status_code == 403
            data = os.urandom(300_000)
            (tmp_path / "blob").write_bytes(data)
            got = await client.get(
                "/i/x/api/download", params={"path": str(tmp_path / "blob")}, headers=TOKEN
            )
            assert got.content == data
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    assert not path.exists()


def test_it_listens_on_a_port_or_a_socket_not_both(tmp_path: Path) -> None:
    both = subprocess.run(
        [sys.executable, "-m", "labgate.tools.demo", "--port", "1", "--socket", "s"],
        capture_output=True, text=True, cwd=tmp_path, timeout=30, check=False,
    )  # fmt: skip
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
