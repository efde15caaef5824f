"""Instance tunnel benchmark: an HTTP server reached through the router directly and through
the tunnel, one run.

Everything runs on loopback and stops by itself::

    .venv/bin/python benchmarks/tunnel.py                      # about 1 minute
    .venv/bin/python benchmarks/tunnel.py --duration 2 --window 524288 --frame 32768

Processes (all on uvloop): an HTTP/1.1 server (``/small`` answers 12 bytes,
``/mib`` 1 MiB), the labgate router (the tunnel's near end: it takes the
agent's data connection and has two routes, ``direct`` to the server's TCP
port and ``tunnel`` through the data connection), the agent's tunnel end
(dials the router with a ticket, connects to the server) and a load client.
The client keeps ``-c`` connections busy with one request at a time each
(keep-alive), for ``--duration`` seconds; it counts requests/s and MiB/s.
``--window`` and ``--frame`` override the tunnel's window and largest DATA
payload in both ends, to choose them by measurement. Results: a table on
stdout and JSON in benchmarks/results/tunnel-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PY = sys.executable
MiB = 1 << 20
SMALL = b"hello world\n"
ROUTER_KEY = "tunnel-bench-signing-key"
BIG = b"x" * MiB


# --------------------------------------------------------------------------- the server
class ServerProtocol(asyncio.Protocol):
    """GET /small and GET /mib, keep-alive; requests carry no body."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            body = BIG if b"/mib " in head.split(b"\r\n", 1)[0] else SMALL
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            self.transport.write(body)


async def run_server(port_file: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(ServerProtocol, "127.0.0.1", 0)
    Path(port_file).write_text(str(server.sockets[0].getsockname()[1]))
    await asyncio.Event().wait()


# --------------------------------------------------------------------------- tunnel ends
def tune(window: int, frame: int) -> None:
    from labgate.wire import tunnel

    tunnel.WINDOW = window
    tunnel.GRANT_AT = window // 2
    tunnel.MAX_DATA = frame


async def run_agent(router_port: int, upstream: str, window: int, frame: int) -> None:
    from labgate.agent.tunnel import dial
    from labgate.security import TunnelTickets

    tune(window, frame)
    ticket = TunnelTickets(ROUTER_KEY).issue("bench", "e1", 3600)
    agent = await dial(f"http://127.0.0.1:{router_port}", ticket, {"tunnel": upstream}.get)
    await agent.closed


async def run_router(port_file: str, direct: str, window: int, frame: int) -> None:
    """The labgate router with two routes: ``direct`` (TCP) and ``tunnel`` (site ``bench``)."""
    from labgate.router.server import Router
    from labgate.security import SessionSigner
    from labgate.wire.routes import Route, RouteTable, UserInfo

    tune(window, frame)
    table = RouteTable()
    routes = [Route("direct", f"http://{direct}", 1), Route("tunnel", "tunnel:bench/tunnel", 1)]
    table.load(users=[UserInfo(1, "bench")], routes=routes)
    table.set_tunnel_site("bench", "e1")
    router = Router(table, SessionSigner(ROUTER_KEY, 3600), "unix:/nonexistent/portal.sock")
    await router.listen("127.0.0.1", 0)
    Path(port_file).write_text(str(router.port))
    await asyncio.Event().wait()


def router_cookie() -> str:
    from labgate.security import SESSION_COOKIE, SessionSigner

    return f"{SESSION_COOKIE}={SessionSigner(ROUTER_KEY, 3600).issue(1)[0]}"


# --------------------------------------------------------------------------- load
class ClientProtocol(asyncio.Protocol):
    """One request at a time on a kept-alive connection, until told to stop."""

    def __init__(self, request: bytes, stats: dict[str, float]) -> None:
        self.request = request
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.left = -1  # body bytes still to come; -1: reading the head
        self.stop = False
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.left < 0:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            length = int(self.head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
            self.left = length - (len(self.head) - end - 4)
            self.head = b""
        else:
            self.left -= len(data)
        self.stats["bytes"] += len(data)
        if self.left == 0:
            self.stats["requests"] += 1
            self.left = -1
            assert self.transport is not None
            if self.stop:
                self.transport.close()
            else:
                self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def run_load(
    target: str, path: str, conns: int, duration: float, cookie: str
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    extra = f"Cookie: {cookie}\r\n" if cookie else ""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n{extra}\r\n".encode()
    stats = {"requests": 0.0, "bytes": 0.0}
    protocols: list[ClientProtocol] = []
    for _ in range(conns):
        if target.startswith("unix:"):
            _, proto = await loop.create_unix_connection(
                lambda: ClientProtocol(request, stats), target[5:]
            )
        else:
            host, port = target.rsplit(":", 1)
            _, proto = await loop.create_connection(
                lambda: ClientProtocol(request, stats), host, int(port)
            )
        protocols.append(proto)
    await asyncio.sleep(min(1.0, duration / 4))  # warm up
    before = dict(stats)
    started = time.perf_counter()
    await asyncio.sleep(duration)
    elapsed = time.perf_counter() - started
    after = dict(stats)
    for proto in protocols:
        proto.stop = True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(p.closed for p in protocols)), 10)
    return {
        "req_s": (after["requests"] - before["requests"]) / elapsed,
        "mib_s": (after["bytes"] - before["bytes"]) / elapsed / MiB,
    }


# --------------------------------------------------------------------------- orchestration
def wait_file(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise RuntimeError(f"{path} never appeared")


def spawn(*argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PY, __file__, *argv])


def load(target: str, path: str, conns: int, duration: float, cookie: str = "") -> dict[str, float]:
    out = subprocess.run(
        [PY, __file__, "_load", target, path, str(conns), str(duration), cookie],
        check=True,
        capture_output=True,
    ).stdout
    return dict(json.loads(out))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="lg-tunnel-bench-") as tmp:
        work = Path(tmp)
        try:
            procs.append(spawn("_server", str(work / "server.port")))
            direct = f"127.0.0.1:{wait_file(work / 'server.port')}"
            window, frame = str(args.window), str(args.frame)
            procs.append(spawn("_router", str(work / "router.port"), direct, window, frame))
            router_port = wait_file(work / "router.port")
            router = f"127.0.0.1:{router_port}"
            procs.append(spawn("_agent", router_port, f"http://{direct}", window, frame))
            time.sleep(0.5)
            cookie = router_cookie()
            rows = []
            for name, path in (("small", "small"), ("1 MiB", "mib")):
                for conns in args.connections:
                    row: dict[str, Any] = {"via": "router", "response": name, "connections": conns}
                    for _ in range(args.rounds):  # interleaved; the best round counts
                        for mode in ("direct", "tunnel"):
                            got = load(router, f"/i/{mode}/{path}", conns, args.duration, cookie)
                            best = row.get(mode)
                            if best is None or got["req_s"] > best["req_s"]:
                                row[mode] = got
                    rows.append(row)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)
    return {
        "window": args.window,
        "frame": args.frame,
        "duration": args.duration,
        "cpus": os.cpu_count(),
        "rows": rows,
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        f"tunnel window {results['window'] // 1024} KiB, frames of {results['frame'] // 1024} KiB",
        "",
        "| via | response | conns | direct req/s | tunnel req/s | ratio | direct MiB/s "
        "| tunnel MiB/s | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        d, t = row["direct"], row["tunnel"]
        lines.append(
            f"| {row['via']} | {row['response']} | {row['connections']} "
            f"| {d['req_s']:,.0f} | {t['req_s']:,.0f} "
            f"| {t['req_s'] / d['req_s']:.2f} | {d['mib_s']:,.1f} | {t['mib_s']:,.1f} "
            f"| {t['mib_s'] / max(d['mib_s'], 1e-9):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        helper(sys.argv[1], sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=4, help="seconds per run (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, the best counts (default 2)")
    parser.add_argument(
        "-c",
        "--connections",
        type=int,
        nargs="+",
        default=[1, 16],
        help="client connections (default 1 16)",
    )
    parser.add_argument("--window", type=int, default=0, help="tunnel window in bytes")
    parser.add_argument("--frame", type=int, default=0, help="largest DATA payload in bytes")
    args = parser.parse_args()
    from labgate.wire import tunnel

    args.window = args.window or tunnel.WINDOW
    args.frame = args.frame or tunnel.MAX_DATA
    results = measure(args)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"tunnel-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nJSON: {path}")


def helper(name: str, argv: list[str]) -> None:
    """The benchmark's own subprocesses (BENCH_PROFILE=_agent: profile that one)."""
    if os.environ.get("BENCH_PROFILE") == name:
        import cProfile
        import signal

        profile = cProfile.Profile()

        def dump(*_: Any) -> None:
            profile.disable()
            profile.dump_stats(f"/tmp/bench{name}.prof")
            os._exit(0)

        signal.signal(signal.SIGTERM, dump)
        profile.enable()
    _helper(name, argv)


def _helper(name: str, argv: list[str]) -> None:
    import uvloop

    if name == "_server":
        uvloop.run(run_server(argv[0]))
    elif name == "_agent":
        uvloop.run(run_agent(int(argv[0]), argv[1], int(argv[2]), int(argv[3])))
    elif name == "_load":
        target, path, conns, duration, cookie = argv
        got = uvloop.run(run_load(target, path, int(conns), float(duration), cookie))
        print(json.dumps(got))
    elif name == "_router":
        uvloop.run(run_router(argv[0], argv[1], int(argv[2]), int(argv[3])))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
