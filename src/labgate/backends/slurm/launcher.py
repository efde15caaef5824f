"""The body of a labgate Slurm job: pick ports on the node, report them, relay, become the tool.

This file is copied into each job's script (the compute node needs a Python 3,
not labgate), so it imports only the standard library and nothing of labgate.
It reads the job's ``launch.json`` (command, environment and working directory,
with :data:`PORT_MARK` where the port goes), finds a free loopback port for the
tool and opens a listening socket on the node's address (``endpoint_host`` when
the site sets it, else the address of the node's hostname). A forked child
relays each connection to that socket on to the tool's loopback port, so the
tool itself only ever listens on 127.0.0.1 while the router, on another host,
reaches it. The launcher writes ``endpoint.json`` (node, address, relay port,
job id) next to ``launch.json``, atomically (the agent watches for it), and
``exec``\\ s the tool, which so becomes the job's own process: Slurm's signals,
time limit and accounting apply to it directly. The relay ends when the tool
does (it watches its parent) or when Slurm ends the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import random
import signal
import socket
import sys

#: Stands for the port in the command and environment until the node has picked one.
PORT_MARK = "@@LABGATE_PORT@@"

#: Bytes read at once by the relay.
_CHUNK = 65536


def bind_port(host: str, low: int, high: int) -> socket.socket:
    """A TCP socket bound on ``host`` to a free port from ``[low, high)`` when given, else any.

    Like :func:`labgate.tools.ports.free_port`, but on the node and without
    labgate: this file runs where labgate is not installed. A range is kept to
    (the agent takes no port outside it): OSError when all of it is taken.
    """
    if high <= low:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((host, 0))
        return sock
    tries = [random.randrange(low, high) for _ in range(200)]
    for port in [*tries, *range(low, high)]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return sock
    raise OSError(errno.EADDRINUSE, f"no free port on {host} in {low}-{high - 1}")


def node_address(endpoint_host: str) -> str:
    """The IPv4 address the relay listens on: ``endpoint_host``'s, else the node hostname's."""
    name = endpoint_host or socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return "0.0.0.0"


def relay_listener(address: str, low: int, high: int) -> tuple[socket.socket, str]:
    """The relay's listening socket and the address it is reachable on."""
    try:
        sock = bind_port(address, low, high)
    except OSError:  # not an address of this node (an endpoint_host for another): all of them
        address = "0.0.0.0"
        sock = bind_port(address, low, high)
    sock.listen(128)
    # Bound on every address: the router finds the node by its name.
    return sock, socket.gethostname() if address == "0.0.0.0" else address


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` until the end, then half-close ``writer``."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


async def _relay_one(
    port: int, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
) -> None:
    """Relay one connection to the tool's loopback ``port``, both ways."""
    try:
        tool_reader, tool_writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:  # the tool does not listen yet: the caller retries
        client_writer.close()
        return
    try:
        await asyncio.gather(_pipe(client_reader, tool_writer), _pipe(tool_reader, client_writer))
    finally:
        for writer in (tool_writer, client_writer):
            writer.close()


async def relay(listener: socket.socket, port: int, parent: int) -> None:
    """Relay connections on ``listener`` to the tool's loopback ``port`` while ``parent`` lives."""
    server = await asyncio.start_server(
        lambda r, w: _relay_one(port, r, w), sock=listener, limit=_CHUNK
    )
    async with server:
        # Nothing signals a parent's end portably: a changed parent pid says the tool ended.
        while os.getppid() == parent:  # noqa: ASYNC110
            await asyncio.sleep(1)


def start_relay(listener: socket.socket, port: int) -> None:
    """Fork the relay child; the parent, which becomes the tool, keeps no relay socket."""
    parent = os.getpid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        with contextlib.suppress(BaseException):
            asyncio.run(relay(listener, port, parent))
        os._exit(0)
    listener.close()


def main(state_dir: str) -> None:
    """Start the tool of the job whose files are in ``state_dir``, behind its relay."""
    with open(os.path.join(state_dir, "launch.json"), encoding="utf-8") as handle:
        launch = json.load(handle)
    low, high = (int(n) for n in launch.get("ports", [0, 0]))
    with bind_port("127.0.0.1", low, high) as probe:
        port = str(probe.getsockname()[1])
    listener, address = relay_listener(node_address(launch.get("endpoint_host", "")), low, high)
    argv = [part.replace(PORT_MARK, port) for part in launch["argv"]]
    env = {key: value for key, value in os.environ.items() if key.startswith("SLURM")}
    env.update({key: value.replace(PORT_MARK, port) for key, value in launch["env"].items()})
    report = {
        "node": socket.gethostname(),
        "host": address,
        "port": int(listener.getsockname()[1]),
        "tool_port": int(port),
        "job_id": os.environ.get("SLURM_JOB_ID", ""),
        "pid": os.getpid(),
    }
    workdir = launch.get("workdir") or state_dir
    os.makedirs(workdir, exist_ok=True)
    sys.stdout.flush()
    start_relay(listener, int(port))
    part = os.path.join(state_dir, "endpoint.json.part")
    with open(part, "w", encoding="utf-8") as handle:
        json.dump(report, handle)
    os.replace(part, os.path.join(state_dir, "endpoint.json"))
    os.chdir(workdir)
    print(
        f"--- labgate: starting {argv[0]} on {report['node']} port {port}"
        f" (reached at {address}:{report['port']})",
        flush=True,
    )
    try:
        # The tool becomes the job's process: Slurm signals, limits and accounts it directly.
        os.execvpe(argv[0], argv, env)  # noqa: S606
    except OSError as exc:
        print(f"--- labgate: cannot start {argv[0]}: {exc}", flush=True)
        sys.exit(127)


if __name__ == "__main__":
    main(sys.argv[1])
