"""Loopback ports for tools: below the kernel's ephemeral range.

The process backend gives each instance its port from here, the containers
backend the host port it publishes a tool's port on, and the token gate
(:mod:`labgate.tools.gate`) the port of the app behind it.
"""

from __future__ import annotations

import random
import socket
import threading
import time
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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now, below the ephemeral range."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports = tool_port_range()
    for _ in range(200 if ports else 0):
        port = random.choice(ports)
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        found: int = sock.getsockname()[1]
        return found


class PortPicker:
    """Free ports on one address, none handed out twice within ``hold`` seconds.

    A port found free is only taken once the tool (or the engine) listens on
    it; starts running side by side (50 at once) were otherwise handed the
    same port.
    """

    def __init__(self, host: str = "127.0.0.1", hold: float = 60.0) -> None:
        self.host = host
        self.hold = hold
        self._recent: dict[int, float] = {}
        self._lock = threading.Lock()

    def pick(self) -> int:
        """A free port on the address, not handed out in the last ``hold`` seconds."""
        with self._lock:
            now = time.monotonic()
            for old in [p for p, at in self._recent.items() if now - at > self.hold]:
                del self._recent[old]
            port = free_port(self.host)
            for _ in range(100):
                if port not in self._recent:
                    break
                port = free_port(self.host)
            self._recent[port] = now
            return port
