"""Loopback ports for tools: below the kernel's ephemeral range.

The process backend gives each instance its port from here, and the token
gate (:mod:`labgate.tools.gate`) the port of the app behind it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: How many ports below the kernel's ephemeral range tools are given ports from.
TOOL_PORTS = 10_000


def tool_port_range() -> range:
    """Ports for tools: just below the ephemeral range, which outgoing connections use.

    A port from the ephemeral range can be taken, between the moment it was
    found free and the moment the tool listens on it, by any connection the
    machine makes, even by the health check's own connection to that port (a
    TCP self-connect); the tool then cannot listen and its launch fails. Below
    the range only another listener can take it.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    start = max(1024, low - TOOL_PORTS)
    return range(start, low) if low - start >= 1000 else range(0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, below the ephemeral range."""
    ports = tool_port_range()
    for _ in range(200 if ports else 0):
        port = random.choice(ports)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        found: int = sock.getsockname()[1]
        return found
