"""A site behind NAT, for real: a network namespace that can dial out but not be dialled into.

:class:`NatSite` makes a namespace, a veth pair and a private ``/30`` used only
inside what it made (``10.213.N.M``: the host end ``.1``, the site end ``.2``
of the block), a default route from the site to the host end, and nftables in
the site's namespace dropping new inbound connections. Processes run inside
with :attr:`NatSite.prefix` (``ip netns exec NAME``). :meth:`NatSite.cut` and
:meth:`NatSite.restore` take the host end of the link down and up again.

It needs root, ``ip`` (iproute2) and ``nft`` (nftables). Outside CI the tests
skip when they are missing; with ``CI=true`` they fail instead.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

IN_CI = os.environ.get("CI") == "true"
#: The private range the namespaces take their /30 from (never routed off this machine).
RANGE = ipaddress.ip_network("10.213.0.0/16")


def missing() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    tools = [name for name in ("ip", "nft") if shutil.which(name) is None]
    if tools:
        return f"{' and '.join(tools)} missing: apt-get install iproute2 nftables"
    return None


def require_nat() -> None:
    """Skip (fail in CI) when this machine cannot make a NATed site."""
    reason = missing()
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"CI must run the NAT tests: {reason}")
    pytest.skip(reason)


def run(*argv: str, check: bool = True, stdin: str | None = None) -> str:
    """Run one command; its output (a clear error with stderr when it fails)."""
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _free_block() -> ipaddress.IPv4Network:
    """A /30 of :data:`RANGE` that no address on this machine is in yet."""
    used = run("ip", "-o", "-4", "addr", "show")
    for _ in range(100):
        block = ipaddress.ip_network(
            (int(RANGE.network_address) + 4 * secrets.randbelow(RANGE.num_addresses // 4), 30)
        )
        if str(block.network_address).rsplit(".", 1)[0] + "." not in used:
            return block
    raise RuntimeError("no free /30 in 10.213.0.0/16")


class NatSite:
    """A network namespace behind NAT: it reaches :attr:`host_addr`, nothing reaches it."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name = f"lgnat-{tag}"
        self.host_veth = f"lgh{tag}"  # interface names have at most 15 characters
        self.site_veth = f"lgs{tag}"
        self.block = _free_block()
        hosts = list(self.block.hosts())
        self.host_addr, self.site_addr = str(hosts[0]), str(hosts[1])
        self.created = False

    @property
    def prefix(self) -> list[str]:
        """Put this before a command to run it inside the site."""
        return ["ip", "netns", "exec", self.name]

    def create(self) -> None:
        """Make the namespace, the link, the route out and the firewall."""
        run("ip", "netns", "add", self.name)
        self.created = True
        ns = ("ip", "-n", self.name)
        run("ip", "link", "add", self.host_veth, "type", "veth", "peer", "name", self.site_veth)
        run("ip", "link", "set", self.site_veth, "netns", self.name)
        run("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_veth)
        run("ip", "link", "set", self.host_veth, "up")
        run(*ns, "addr", "add", f"{self.site_addr}/30", "dev", self.site_veth)
        run(*ns, "link", "set", self.site_veth, "up")
        run(*ns, "link", "set", "lo", "up")
        run(*ns, "route", "add", "default", "via", self.host_addr)
        # What a NAT gateway does for the site: answers to its own connections come
        # in, new connections from outside do not.
        run(
            *self.prefix,
            "nft",
            "-f",
            "-",
            stdin=(
                "table inet f {\n"
                "  chain in { type filter hook input priority 0; "
                f'iifname "{self.site_veth}" ct state new drop; }}\n'
                "}\n"
            ),
        )

    def destroy(self) -> None:
        """End what still runs inside, remove the namespace and the link (never raises)."""
        if not self.created:
            return
        with contextlib.suppress(Exception):
            for pid in run("ip", "netns", "pids", self.name, check=False).split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        run("ip", "netns", "del", self.name, check=False)
        run("ip", "link", "del", self.host_veth, check=False)  # gone with the peer, usually
        self.created = False

    def cut(self) -> None:
        """The site's link goes dead (the host end down: nothing passes either way)."""
        run("ip", "link", "set", self.host_veth, "down")

    def restore(self) -> None:
        """The link is back."""
        run("ip", "link", "set", self.host_veth, "up")

    # --- checks --------------------------------------------------------------------
    def host_reaches_site(self, timeout: float = 1.5) -> bool:
        """Whether a connection from the host to a listener inside the site gets through."""
        listener = subprocess.Popen(
            [*self.prefix, sys.executable, "-c", _LISTEN, self.site_addr],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert listener.stdout is not None
            port = int(listener.stdout.readline())
            try:
                with socket.create_connection((self.site_addr, port), timeout):
                    return True
            except OSError:
                return False
        finally:
            listener.kill()
            listener.wait()

    def site_reaches_host(self, timeout: float = 5) -> bool:
        """Whether a connection from inside the site to a listener on the host end gets through."""
        with socket.socket() as server:
            server.bind((self.host_addr, 0))
            server.listen()
            port = server.getsockname()[1]
            dial = subprocess.run(
                [*self.prefix, sys.executable, "-c", _DIAL, self.host_addr, str(port)],
                capture_output=True,
                timeout=timeout + 5,
            )
            return dial.returncode == 0

    def assert_nat(self) -> None:
        """The site reaches the host; the host cannot connect into the site."""
        assert self.site_reaches_host(), "the site cannot reach the host end"
        assert not self.host_reaches_site(), "the host could connect into the site"


_LISTEN = """
import socket, sys, time
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen()
print(s.getsockname()[1], flush=True)
time.sleep(60)
"""

_DIAL = """
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), 5).close()
"""


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1
) -> None:
    """Poll ``predicate`` (a callable) until it is true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
