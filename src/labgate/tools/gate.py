"""A token gate in front of a tool that cannot check labgate's instance token itself.

``python -m labgate.tools.gate --port P --socket S -- COMMAND...`` starts
``COMMAND`` (which must listen on the Unix socket ``S``, in a directory only
the instance's uid can enter) and listens on the loopback port ``P`` (on
``--host``, e.g. ``0.0.0.0`` in a container, whose network namespace is its own). Each
connection's first request must carry ``Authorization: token
<LABGATE_INSTANCE_TOKEN>``, which the router adds to everything it proxies;
then the connection is spliced to the socket both ways (WebSocket upgrades
included). A connection whose first request lacks the token gets ``403`` and
is closed, so another local account that finds the port reaches nothing. The
gate ends when the command does, and stops it when told to stop.

The ``vscode`` tool runs code-server behind it (``--socket``): a code-server
reachable by other local users would be a shell in the instance's name.

With ``--upstream-port N`` the gate splices to ``127.0.0.1:N`` instead of a
socket, for tools that cannot serve on one (Shiny, Streamlit); ``auto`` picks a
free port and puts it in COMMAND's ``{upstream_port}``. That port is private
only where the loopback is the instance's own: in a container, or on the
process backend with ``private_network`` (docs/tools.md), where labgate binds
``--port`` on the host's loopback itself and hands the listening socket in
(descriptor ``$LABGATE_LISTEN_FD``) to an instance whose network namespace
holds nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

from labgate.aio import wait_for
from labgate.tools.ports import free_port

MAX_HEAD = 64 * 1024
HEAD_TIMEOUT = 30.0
CHUNK = 64 * 1024
FORBIDDEN = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 39\r\n"
    b"Connection: close\r\n\r\nonly requests through labgate get in.\r\n\r\n"
)
#: The descriptor of a socket already listening on ``--port``, when the process backend
#: bound it (in the host's network namespace) for an instance with a network of its own.
LISTEN_FD_VAR = "LABGATE_LISTEN_FD"


def authorised(head: bytes, expected: bytes) -> bool:
    """Whether a request head carries ``Authorization: token <expected>``."""
    if len(expected) < 16:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            return hmac.compare_digest(value.strip(), b"token " + expected)
    return False


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


class Gate:
    """The listening side: check each connection's first request, then splice."""

    def __init__(self, socket_path: Path, token: str, upstream_port: int = 0) -> None:
        self.socket_path = socket_path
        self.upstream_port = upstream_port
        self.expected = token.encode()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the tool: its loopback port when given, else its socket."""
        if self.upstream_port:
            return await asyncio.open_connection("127.0.0.1", self.upstream_port)
        return await asyncio.open_unix_connection(str(self.socket_path))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection."""
        try:
            head = await wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            writer.close()
            return
        if not authorised(head, self.expected):
            writer.write(FORBIDDEN)
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()
            return
        try:
            up_reader, up_writer = await self.connect()
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        up_writer.write(head)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        for side in (writer, up_writer):
            side.close()


def inherited_socket(port: int) -> socket.socket | None:
    """The listening socket labgate handed in (``$LABGATE_LISTEN_FD``), if any.

    The variable is taken out of the environment: the tool behind the gate
    neither needs nor gets it (nor the descriptor, which is not inherited).
    """
    fd = os.environ.pop(LISTEN_FD_VAR, "")
    if not fd:
        return None
    try:
        sock = socket.socket(fileno=int(fd))
        sock.set_inheritable(False)
        if sock.family == socket.AF_INET and sock.getsockname()[1] == port:
            return sock
    except (OSError, ValueError):
        pass
    sys.exit(f"gate: {LISTEN_FD_VAR}={fd} is not a socket listening on port {port}")


async def run(
    port: int,
    socket_path: Path,
    command: list[str],
    host: str = "127.0.0.1",
    upstream_port: int = 0,
) -> int:
    """Start ``command``, serve the gate on ``host:port`` until it exits; its exit code."""
    token = os.environ.get("LABGATE_INSTANCE_TOKEN", "")
    listening = inherited_socket(port)
    child = await asyncio.create_subprocess_exec(*command)
    gate = Gate(socket_path, token, upstream_port)
    if listening is not None:
        server = await asyncio.start_server(gate.handle, sock=listening, limit=MAX_HEAD)
    else:
        server = await asyncio.start_server(gate.handle, host, port, limit=MAX_HEAD)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if child.returncode is None:
            child.terminate()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    target = f"127.0.0.1:{upstream_port}" if upstream_port else str(socket_path)
    print(f"gate: {host}:{port} -> {target} ({command[0]})", flush=True)
    code = await child.wait()
    server.close()
    return code


def main(argv: list[str] | None = None) -> None:
    """Parse ``[--host H] --port P [--socket S | --upstream-port N|auto] -- COMMAND...``.

    ``{socket}`` in COMMAND is the socket's path, ``{upstream_port}`` the upstream port.
    """
    parser = argparse.ArgumentParser(description="labgate token gate")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--socket", default="")
    parser.add_argument(
        "--upstream-port",
        default="",
        help="splice to 127.0.0.1:N, not a socket; auto: a free port, {upstream_port} in COMMAND",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        sys.exit("gate: no command given")
    private = Path(tempfile.mkdtemp(prefix="labgate-gate-"))
    private.chmod(0o700)
    socket_path = Path(args.socket) if args.socket else private / "tool.sock"
    upstream = args.upstream_port
    if upstream and upstream != "auto" and not upstream.isdigit():
        sys.exit(f"gate: --upstream-port must be a port number or auto, not {upstream!r}")
    upstream_port = free_port() if upstream == "auto" else int(upstream or 0)
    command = [
        part.replace("{socket}", str(socket_path)).replace("{upstream_port}", str(upstream_port))
        for part in command
    ]
    try:
        sys.exit(asyncio.run(run(args.port, socket_path, command, args.host, upstream_port)))
    finally:
        with contextlib.suppress(OSError):
            socket_path.unlink()
        with contextlib.suppress(OSError):
            private.rmdir()


if __name__ == "__main__":
    main()
