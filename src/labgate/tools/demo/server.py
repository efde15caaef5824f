"""The ``demo`` tool: a small web app that proves an instance works end to end.

It serves, under its base URL, a page (``/``), a JSON endpoint (``/api/info``),
a health endpoint (``/api/health``), a file probe (``GET``/``PUT``
``/api/file?path=``, which lets tests see what the sandbox exposes), a
download (``GET /api/download?path=``: a whole file, streamed, for tests of
large transfers) and a WebSocket echo (``/ws``). ``POST /api/claim`` is its
warm-pool hook: the agent says which user it now serves and where their
workspace is (:mod:`labgate.backends.claim`). When ``LABGATE_INSTANCE_TOKEN`` is set it
answers only requests that carry ``Authorization: token <it>`` (the router
adds it), like a real tool should.

Environment knobs make the test doubles of the style guide out of the same
tool: ``DEMO_START_DELAY`` (seconds before listening: a slow tool),
``DEMO_NEVER_READY`` (health always 503), ``DEMO_CRASH`` (exit 3 at start,
after printing a reason), ``DEMO_BUSY_START`` (seconds of CPU work before
listening: a tool still busy starting when its budget ends).

It is its own HTTP/1.1 and WebSocket server, on the standard library alone:
the demo is the tool labgate starts most often (every test, every benchmark),
and without asyncio, Starlette or uvicorn to import it is ready in about a
third of the time and CPU (about 45 ms against 120 ms), which is most of what
50 launches at once cost on a small machine. One thread per connection, with
keep-alive, ``Content-Length`` and chunked request bodies, ``HEAD``, and
WebSockets (RFC 6455: masking, fragments, ping and close). It listens on
``--port`` or, where the site serves instances on Unix sockets, on
``--socket PATH`` (the tool's ``socket_command``). Router tests run
:class:`Server` in a thread of their own process.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import html
import json
import os
import signal
import socketserver
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from labgate.tools.demo.page import PAGE

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 64 * 1024
#: Stack of each connection's thread. The default (8 MiB) counts against the
#: instance's address-space limit (RLIMIT_AS = its memory, 512 MiB by default),
#: which let the demo hold only about 13 connections at once; with 256 KiB,
#: about 140 (the handlers never recurse deeply).
THREAD_STACK = 256 * 1024
REASONS = {
    101: "Switching Protocols",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class Reply:
    """A response: status, content type and body."""

    __slots__ = ("body", "content_type", "status")

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        self.status, self.body, self.content_type = status, body, content_type

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Reply:
        """A JSON reply."""
        return cls(status, json.dumps(data).encode(), "application/json")


class Demo:
    """What the demo answers, independent of the transport."""

    def __init__(self, base_url: str) -> None:
        self.base = "/" + base_url.strip("/") + "/" if base_url.strip("/") else "/"
        self.started = time.time()
        self.never_ready = bool(os.environ.get("DEMO_NEVER_READY"))
        token = os.environ.get("LABGATE_INSTANCE_TOKEN")
        self.expected = f"token {token}".encode() if token else None

    def allowed(self, headers: dict[str, str]) -> bool:
        """Whether the request carries the instance token (when there is one)."""
        if self.expected is None:
            return True
        given = headers.get("authorization", "").encode("latin-1")
        return hmac.compare_digest(given, self.expected)

    def route(self, path: str) -> str | None:
        """The path below the base URL, or None when outside it."""
        prefix = self.base.rstrip("/")
        if not prefix:
            return path or "/"
        if path == prefix or path.startswith(prefix + "/"):
            return path[len(prefix) :] or "/"
        return None

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Reply:
        """Answer one HTTP request (``HEAD`` is answered as ``GET``)."""
        parts = urlsplit(target)
        path = unquote(parts.path)
        sub = self.route(path)
        verb = "GET" if method == "HEAD" else method
        methods = {
            "/": ("GET",),
            "/api/health": ("GET",),
            "/api/info": ("GET",),
            "/api/file": ("GET", "PUT"),
            "/api/claim": ("POST",),
        }
        if sub is None or sub not in methods:
            return Reply(404, b"Not Found", "text/plain; charset=utf-8")
        if verb not in methods[sub]:
            return Reply(405, b"Method Not Allowed", "text/plain; charset=utf-8")
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if sub == "/":
            page = PAGE.format(
                instance=html.escape(os.environ.get("LABGATE_INSTANCE_ID", "")),
                user=html.escape(os.environ.get("LABGATE_USER", "")),
                base_json=json.dumps(self.base),
            )
            return Reply(200, page.encode(), "text/html; charset=utf-8")
        if sub == "/api/health":
            return Reply.json({"ready": not self.never_ready}, 503 if self.never_ready else 200)
        if sub == "/api/info":
            return Reply.json(self.info(path, headers))
        if sub == "/api/file":
            return self.file(verb, query.get("path", ""), body)
        return self.claim(body)

    def info(self, path: str, headers: dict[str, str]) -> dict[str, Any]:
        """What the instance knows about itself and the request."""
        return {
            "tool": "demo",
            "instance": os.environ.get("LABGATE_INSTANCE_ID", ""),
            "user": os.environ.get("LABGATE_USER", ""),
            "base_url": self.base,
            "path": path,
            "home": str(Path(os.environ.get("HOME", "."))),
            "cwd_files": sorted(os.listdir("."))[:100],
            "uptime": round(time.time() - self.started, 3),
            "headers": {k: v for k, v in headers.items() if k.startswith("x-")},
            # The launch parameters, as labgate passes them (labgate.tools.params).
            "params": {k: v for k, v in os.environ.items() if k.startswith("LABGATE_PARAM_")},
            "demo_env": {k: v for k, v in os.environ.items() if k.startswith("DEMO_")},
        }

    @staticmethod
    def file(verb: str, path: str, body: bytes) -> Reply:
        """Read or write a file by path: lets tests probe the sandbox."""
        try:
            if verb == "GET":
                content = Path(path).read_text(errors="replace")[:65536]
                return Reply.json({"ok": True, "content": content})
            Path(path).write_bytes(body)
            return Reply.json({"ok": True})
        except OSError as exc:
            return Reply.json(
                {"ok": False, "error": exc.__class__.__name__}, 404 if verb == "GET" else 403
            )

    @staticmethod
    def claim(body: bytes) -> Reply:
        """A warm-pool claim: serve ``user`` from now on, in ``workspace``."""
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            data = {}
        user, workspace = str(data.get("user", "")), str(data.get("workspace", ""))
        if not user or not workspace:
            return Reply.json({"error": "user and workspace are required"}, 400)
        os.chdir(workspace)  # the directory we started in is now mounted over
        os.environ.update({"LABGATE_USER": user, "HOME": workspace})
        return Reply.json({"user": user, "workspace": workspace})


class BadRequest(Exception):
    """The client sent something this server does not accept."""


class Handler(socketserver.StreamRequestHandler):
    """One client connection: requests one after another, or a WebSocket."""

    server: Server
    disable_nagle_algorithm = True

    def handle(self) -> None:
        try:
            while self.one_request():
                pass
        except (BadRequest, ConnectionError, TimeoutError):
            return

    def read_head(self) -> tuple[str, str, str, dict[str, str]] | None:
        line = self.rfile.readline(MAX_HEAD)
        if not line:
            return None
        try:
            method, target, version = line.decode("latin-1").split()
        except ValueError:
            raise BadRequest(line) from None
        headers: dict[str, str] = {}
        size = len(line)
        while True:
            line = self.rfile.readline(MAX_HEAD)
            size += len(line)
            if not line or size > MAX_HEAD:
                raise BadRequest("head too large or cut short")
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode("latin-1").partition(":")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return method, target, version, headers

    def read_body(self, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(MAX_HEAD) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(4)
        length = int(headers.get("content-length", "0") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def one_request(self) -> bool:
        head = self.read_head()
        if head is None:
            return False
        method, target, version, headers = head
        if headers.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self.read_body(headers)
        demo = self.server.demo
        keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        if not demo.allowed(headers):
            self.send(Reply.json({"error": "forbidden"}, 403), keep, method)
            return keep
        sub = demo.route(unquote(urlsplit(target).path))
        upgrade = headers.get("upgrade", "").lower() == "websocket"
        if upgrade and method == "GET" and sub == "/ws":
            self.websocket(headers)
            return False
        if sub == "/api/download" and method in ("GET", "HEAD"):
            query = parse_qs(urlsplit(target).query)
            return self.download(query.get("path", [""])[0], keep, method)
        self.send(demo.handle(method, target, headers, body), keep, method)
        return keep

    def send(self, reply: Reply, keep: bool, method: str) -> None:
        head = (
            f"HTTP/1.1 {reply.status} {REASONS.get(reply.status, 'OK')}\r\n"
            f"content-type: {reply.content_type}\r\n"
            f"content-length: {len(reply.body)}\r\n"
            f"connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
        ).encode("latin-1")
        self.wfile.write(head if method == "HEAD" else head + reply.body)

    def download(self, path: str, keep: bool, method: str) -> bool:
        """Send a whole file as it is (``sendfile``: no copy of it in memory)."""
        try:
            file = Path(path).open("rb")  # noqa: SIM115 - closed below, after sendfile
        except OSError as exc:
            self.send(Reply.json({"ok": False, "error": exc.__class__.__name__}, 404), keep, method)
            return keep
        with file:
            size = os.fstat(file.fileno()).st_size
            head = (
                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                f"content-length: {size}\r\n"
                f"connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
            ).encode("latin-1")
            self.wfile.write(head)
            if method == "GET":
                self.connection.sendfile(file)
        return keep

    # --- WebSocket echo ------------------------------------------------------------
    def websocket(self, headers: dict[str, str]) -> None:
        key = headers.get("sec-websocket-key", "").encode()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()  # noqa: S324
        self.wfile.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                f"connection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
            ).encode()
        )
        message, kind = b"", 0
        while True:
            frame = self.read_frame()
            if frame is None:
                return
            fin, opcode, payload = frame
            if opcode == 8:  # close: answer it and end
                self.write_frame(8, payload[:2])
                return
            if opcode == 9:
                self.write_frame(10, payload)
                continue
            if opcode == 10:
                continue
            if opcode in (1, 2):
                message, kind = payload, opcode
            else:  # a continuation
                message += payload
            if fin:
                self.write_frame(kind, message)
                message = b""

    def read_frame(self) -> tuple[bool, int, bytes] | None:
        head = self.rfile.read(2)
        if len(head) < 2:
            return None
        fin, opcode = bool(head[0] & 0x80), head[0] & 0x0F
        masked, length = bool(head[1] & 0x80), head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", self.rfile.read(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self.rfile.read(8))[0]
        mask = self.rfile.read(4) if masked else b""
        payload = self.rfile.read(length)
        if masked:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return fin, opcode, payload

    def write_frame(self, opcode: int, payload: bytes) -> None:
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x80 | opcode, size)
        elif size < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
        self.wfile.write(head + payload)


class Server(socketserver.ThreadingTCPServer):
    """A thread per connection; threads do not keep the process alive."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], demo: Demo) -> None:
        self.demo = demo
        super().__init__(address, Handler)


class UnixHandler(Handler):
    """A connection on the Unix socket (no Nagle to turn off)."""

    disable_nagle_algorithm = False


class UnixServer(socketserver.ThreadingUnixStreamServer):
    """:class:`Server` on a Unix socket (``--socket``); the socket file is removed at exit."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, path: str, demo: Demo) -> None:
        self.demo = demo
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by an earlier run of the same instance
        super().__init__(path, UnixHandler)

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(OSError):
            os.unlink(self.server_address)  # type: ignore[arg-type]


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def serve(host: str, port: int, base_url: str, socket_path: str = "") -> None:
    """Serve the demo (on ``socket_path`` when given, else ``host:port``) until TERM or INT,
    then exit cleanly (exit code 0)."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    threading.stack_size(THREAD_STACK)
    demo = Demo(base_url)
    server = UnixServer(socket_path, demo) if socket_path else Server((host, port), demo)
    with server:
        server.serve_forever(poll_interval=3600)


def main(argv: list[str] | None = None) -> None:
    """Run the demo tool: ``python -m labgate.tools.demo --port P --base-url /i/x/``.

    The endpoints and environment knobs are in the module docstring.
    """
    import argparse

    parser = argparse.ArgumentParser(description="labgate demo tool")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int)
    where.add_argument("--socket", default="", help="listen on this Unix socket instead")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--base-url", default="/")
    args = parser.parse_args(argv)

    if os.environ.get("DEMO_CRASH"):
        print("demo: crashing on purpose (DEMO_CRASH is set)", flush=True)
        sys.exit(3)
    busy = float(os.environ.get("DEMO_BUSY_START", "0") or 0)
    if busy > 0:
        print(f"demo: working {busy}s before listening", flush=True)
        until = time.monotonic() + busy
        while time.monotonic() < until:
            sum(range(10_000))
    delay = float(os.environ.get("DEMO_START_DELAY", "0") or 0)
    if delay > 0:
        print(f"demo: waiting {delay}s before listening", flush=True)
        time.sleep(delay)
    address = args.socket or f"{args.host}:{args.port}"
    print(f"demo: listening on {address} under {args.base_url}", flush=True)
    serve(args.host, args.port or 0, args.base_url, args.socket)
