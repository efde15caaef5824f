"""Loopback ports for tools: below the kernel's ephemeral range.

The process backend gives each instance its port from here, the containers
backend the host port it publishes a tool's port on, and the token gate
(:mod:`labgate.tools.gate`) the port of the app behind it.

A port is free when it can be bound *and* a connection to it then reaches
that listener: a firewall rule that redirects the port elsewhere (a Podman
DNAT rule left behind, with its network namespace, by a container whose
network was never torn down catches every local connection to its host
port) would otherwise swallow the tool's traffic, and its launch would fail
with nothing listening at its address.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: How many ports below the kernel's ephemeral range tools are given ports from.
TOOL_PORTS = 10_000
#: Seconds a connection to a candidate port has to reach the listener put on it for the
#: check (well under a millisecond on this host; a redirected port never does).
REACHED_WITHIN = 0.25
#: Seconds :func:`redirected_ports` may probe the range for (all of it takes about one).
SCAN_BUDGET = 20.0

PortState = Literal["free", "taken", "redirected"]


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
    """A TCP port on ``host`` below the ephemeral range that nothing listens on or redirects
    right now (:func:`reaches_here`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports = tool_port_range()
    for _ in range(200 if ports else 0):
        port = random.choice(ports)
        if reaches_here(host, port):
            return port
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        found: int = sock.getsockname()[1]
        return found


def reaches_here(host: str, port: int, timeout: float = REACHED_WITHIN) -> bool:
    """Whether a connection to ``port`` on ``host`` reaches a listener on it there.

    Listens on the port for a moment and connects to it: a rule that
    redirects the port (a NAT rule to an address in a leftover network
    namespace, where the connection is refused) keeps the connection from
    arriving. False also when the port cannot be bound. The probe is closed
    with a reset, so neither end lingers in TIME_WAIT to block the tool's
    own bind.
    """
    return probe_port(host, port, timeout) == "free"


def probe_port(host: str, port: int, timeout: float = REACHED_WITHIN) -> PortState:
    """``free`` (:func:`reaches_here`), ``taken`` (it cannot be bound: something listens on
    it) or ``redirected`` (bound, but a connection to it does not arrive)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    target = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        try:
            listener.bind((host, port))
            listener.listen(1)
        except OSError:
            return "taken"
        listener.settimeout(timeout)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            probe.settimeout(timeout)
            try:
                probe.connect((target, port))
                accepted, _ = listener.accept()
            except OSError:
                return "redirected"
            accepted.close()
    return "free"


@dataclass(frozen=True)
class PortScan:
    """What :func:`redirected_ports` found."""

    #: The ports of the tool range that bind but are not reached (a NAT rule takes them).
    redirected: list[int]
    #: How many ports were probed, of how many in the range (fewer: the time ran out).
    probed: int
    total: int


def redirected_ports(
    host: str = "127.0.0.1", ports: range | None = None, budget: float = SCAN_BUDGET
) -> PortScan:
    """Every port of the tool range (or ``ports``) that a firewall rule sends elsewhere.

    These are the ports :func:`free_port` skips; many of them mean stale NAT
    rules (Podman's, say) that an operator should clear. A port something
    listens on is in use, not redirected. Probing stops after ``budget``
    seconds (a rule that drops connections makes each probe wait out its
    timeout).
    """
    ports = tool_port_range() if ports is None else ports
    deadline = time.monotonic() + budget
    found: list[int] = []
    probed = 0
    for port in ports:
        if time.monotonic() > deadline:
            break
        probed += 1
        if probe_port(host, port) == "redirected":
            found.append(port)
    return PortScan(found, probed, len(ports))


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
