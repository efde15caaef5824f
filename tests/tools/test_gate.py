"""The token gate: only connections whose first request carries the instance token get through."""

from __future__ import annotations

import os
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
