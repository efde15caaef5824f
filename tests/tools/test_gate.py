"""The token gate: only connections whose first request carries the instance token get through."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from servers import free_port, terminate

# A tiny HTTP server on the Unix socket the gate names, or on a loopback port (a number):
# answers "hi" and the path.
TOOL = """
import asyncio, sys
async def handle(reader, writer):
    while True:
        try:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
        except Exception:
            break
        path = head.split(b" ")[1]
        body = b"hi " + path
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body) + body)
        await writer.drain()
    writer.close()
async def main():
    where = sys.argv[1]
    if where.isdigit():
        server = await asyncio.start_server(handle, "127.0.0.1", int(where))
    else:
        server = await asyncio.start_unix_server(handle, where)
    await server.serve_forever()
asyncio.run(main())
"""
TOKEN = "a-long-enough-instance-token-0123456789"


@pytest.mark.parametrize("upstream", ["socket", "loopback port"])
def test_only_requests_with_the_instance_token_reach_the_tool(upstream: str) -> None:
    """Through a Unix socket (the process backend) or a loopback port (in a container)."""
    port = free_port()
    env = {**os.environ, "LABGATE_INSTANCE_TOKEN": TOKEN}
    options: list[str] = []
    tool = [sys.executable, "-c", TOOL, "{socket}"]
    if upstream == "loopback port":
        inner = free_port()
        options = ["--upstream-port", str(inner)]
        tool = [sys.executable, "-c", TOOL, str(inner)]
    gate = subprocess.Popen(
        [sys.executable, "-m", "labgate.tools.gate", "--port", str(port), *options, "--", *tool],
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}/x"
        deadline = time.monotonic() + 20
        while True:
            try:
                answer = httpx.get(url, headers={"Authorization": f"token {TOKEN}"}, timeout=2)
                if answer.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the gate did not come up"
            time.sleep(0.1)
        assert answer.text == "hi /x"
        # Keep-alive: more requests on the same connection, as the router sends them.
        with httpx.Client(headers={"Authorization": f"token {TOKEN}"}) as client:
            assert [client.get(f"{url}{n}").text for n in range(3)] == [
                "hi /x0",
                "hi /x1",
                "hi /x2",
            ]
        assert httpx.get(url, timeout=2).status_code == 403
        wrong = httpx.get(url, headers={"Authorization": "token nope"}, timeout=2)
        assert wrong.status_code == 403
    finally:
        terminate(gate, 10)
    assert gate.returncode is not None


def test_the_gate_serves_on_a_socket_labgate_bound_and_picks_the_apps_port() -> None:
    """As the process backend runs it for ``private_network`` tools (``$LABGATE_LISTEN_FD``)."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    env = {
        **os.environ,
        "LABGATE_INSTANCE_TOKEN": TOKEN,
        "LABGATE_LISTEN_FD": str(listener.fileno()),
    }
    command = [sys.executable, "-m", "labgate.tools.gate", "--port", str(port)]
    tool = ["--", sys.executable, "-c", TOOL, "{upstream_port}"]
    gate = subprocess.Popen(
        [*command, "--upstream-port", "auto", *tool],
        env=env,
        pass_fds=[listener.fileno()],
        stdout=subprocess.PIPE,
        text=True,
    )
    listener.close()  # the gate holds the only copy now
    try:
        assert gate.stdout is not None
        line = gate.stdout.readline()  # gate: 127.0.0.1:P -> 127.0.0.1:N (python)
        upstream = int(line.split("-> 127.0.0.1:")[1].split()[0])
        assert upstream != port
        url = f"http://127.0.0.1:{port}/y"
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.get(url, headers={"Authorization": f"token {TOKEN}"}, timeout=2)
                if answer.status_code == 200:
                    break
            assert time.monotonic() < deadline, "the gate did not come up"
            time.sleep(0.1)
        assert answer.text == "hi /y"
        assert httpx.get(url, timeout=2).status_code == 403
    finally:
        terminate(gate, 10)

    # A descriptor that does not listen on --port, one not open, and a bad --upstream-port
    # stop it with a plain message.
    other = socket.create_server(("127.0.0.1", 0))
    for fd in (str(other.fileno()), "999", "x"):
        wrong = subprocess.run(
            [*command, *tool],
            env={**env, "LABGATE_LISTEN_FD": fd},
            pass_fds=[other.fileno()],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert wrong.returncode != 0, fd
        assert f"LABGATE_LISTEN_FD={fd} is not a socket listening on port {port}" in wrong.stderr
        assert "Traceback" not in wrong.stderr
    other.close()
    bad = subprocess.run(
        [*command, "--upstream-port", "soon", *tool], capture_output=True, text=True, timeout=20
    )
    assert bad.returncode != 0 and "must be a port number or auto" in bad.stderr
    assert "Traceback" not in bad.stderr
