"""Router benchmark: labgate's router beside nginx and configurable-http-proxy, one run.

Everything runs on loopback and stops by itself::

    .venv/bin/python benchmarks/router.py                 # full run, about 3 minutes
    .venv/bin/python benchmarks/router.py --duration 2 --quick

See benchmarks/README.md for what is measured and how. Results: a table on
stdout and JSON in benchmarks/results/router-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
PY = sys.executable
TOKEN = "bench-stream-token"
KEY = "bench-signing-key"
CHP_TOKEN = "bench-chp-token"


# --------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def ensure_tools() -> dict[str, str]:
    """Find nginx, wrk and configurable-http-proxy, installing what is missing."""
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()) or not shutil.which("wrk"):
        subprocess.run(["apt-get", "install", "-y", "nginx", "wrk"], check=True)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    chp = CACHE / "node_modules" / ".bin" / "configurable-http-proxy"
    if not chp.exists():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CACHE),
             "configurable-http-proxy"],
            check=True,
        )
    return {"nginx": nginx, "wrk": shutil.which("wrk") or "wrk", "chp": str(chp)}


# --------------------------------------------------------------------------- wrk
def parse_duration(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        return float("nan")
    value, unit = float(match[1]), match[2]
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_size(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)([KMGT]?B)", text)
    if not match:
        return float("nan")
    return float(match[1]) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}[match[2]]


async def wrk(tools: dict[str, str], url: str, args: argparse.Namespace, header: str = "",
              connections: int | None = None) -> dict[str, float]:
    cmd = [tools["wrk"], "-t2", f"-c{connections or args.connections}", f"-d{args.duration}s",
           "--latency", "--timeout", "5s"]
    if header:
        cmd += ["-H", header]
    proc = await asyncio.create_subprocess_exec(
        *cmd, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out = (await proc.communicate())[0].decode()
    result: dict[str, float] = {}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        result["rps"] = float(m[1])
    if m := re.search(r"Transfer/sec:\s+(\S+)", out):
        result["mib_s"] = parse_size(m[1]) / 2**20
    for pct in ("50", "99"):
        if m := re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M):
            result[f"p{pct}_ms"] = parse_duration(m[1])
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(errors[1]) if errors else 0.0
    if "rps" not in result:
        raise RuntimeError(f"wrk failed:\n{out}")
    return result


# --------------------------------------------------------------------------- WebSocket bits
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_accept(key: str) -> str:
    import hashlib

    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


async def ws_upstream(port: int) -> None:
    """A minimal WebSocket echo server (the same upstream for every proxy)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            key = re.search(rb"(?i)sec-websocket-key:\s*(\S+)", head)
            if not key:
                writer.close()
                return
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + ws_accept(key[1].decode()).encode() + b"\r\n\r\n"
            )
            while True:
                b0, b1 = await reader.readexactly(2)
                length = b1 & 0x7F
                if length == 126:
                    length = struct.unpack("!H", await reader.readexactly(2))[0]
                elif length == 127:
                    length = struct.unpack("!Q", await reader.readexactly(8))[0]
                mask = await reader.readexactly(4) if b1 & 0x80 else b""
                data = await reader.readexactly(length)
                if mask:
                    data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
                if b0 & 0x0F == 8:
                    break
                writer.write(bytes([b0, len(data)]) + data)  # payloads here are < 126 bytes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def ws_request(port: int, path: str, cookie: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    extra = f"Cookie: labgate-session={cookie}\r\n" if cookie else ""
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    ).encode()


async def ws_open(port: int, path: str, cookie: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(ws_request(port, path, cookie))
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"no WebSocket: {head[:80]!r}")
    return reader, writer


FRAME = bytes([0x81, 0x80 | 5]) + b"\x01\x02\x03\x04" + bytes(c ^ m for c, m in zip(b"hello", b"\x01\x02\x03\x04\x01", strict=True))


async def ws_echo(port: int, path: str, cookie: str, conns: int, duration: float) -> dict[str, float]:
    """Round trips per second over ``conns`` WebSockets, one message in flight on each."""
    count = 0
    stop = time.monotonic() + duration

    async def one() -> None:
        nonlocal count
        reader, writer = await ws_open(port, path, cookie)
        while time.monotonic() < stop:
            writer.write(FRAME)
            await reader.readexactly(7)
            count += 1
        writer.close()

    start = time.monotonic()
    await asyncio.gather(*(one() for _ in range(conns)))
    return {"roundtrips_s": count / (time.monotonic() - start)}


async def ws_idle(port: int, path: str, cookie: str, count: int) -> None:
    """Open ``count`` WebSockets, say so, hold them until stdin closes."""
    sockets = []
    for start in range(0, count, 200):
        sockets += await asyncio.gather(
            *(ws_open(port, path, cookie) for _ in range(min(200, count - start)))
        )
    print(f"open {len(sockets)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


# --------------------------------------------------------------------------- the peers
def nginx_conf(work: Path, name: str, body: str) -> Path:
    conf = work / f"{name}.conf"
    conf.write_text(
        f"worker_processes auto;\ndaemon off;\npid {work}/{name}.pid;\nerror_log {work}/{name}.err;\n"
        "worker_rlimit_nofile 20000;\nevents {{ worker_connections 16384; }}\n"
        f"http {{\n access_log off;\n keepalive_requests 1000000;\n client_body_temp_path {work}/tmp;\n"
        f" proxy_temp_path {work}/tmp;\n{body}\n}}\n".replace("{{", "{").replace("}}", "}")
    )
    return conf


class Peers:
    """Starts and stops the processes of one run."""

    def __init__(self, tools: dict[str, str], work: Path) -> None:
        self.tools = tools
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        wait_port(port)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
