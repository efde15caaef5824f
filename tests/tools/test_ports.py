"""Tool ports: a port a leftover NAT rule redirects is never handed to a tool.

Seen in CI: a Podman container whose network was never torn down leaves its
network namespace and a DNAT rule for its host port; a process tool later
given that port listened on it, but every connection to it (the agent's
health checks, the router's requests) went to the dead container's
namespace and was refused, and the launch failed after its start timeout
with "nothing listens at the tool's address".

The tests make such a rule for real, in a network namespace of their own
(root, ``ip`` and ``nft``: skipped outside CI without them), and run the
port picking inside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from labgate.tools.ports import reaches_here

IN_CI = os.environ.get("CI") == "true"


def run(*argv: str, stdin: str | None = None) -> str:
    """Run a command; its output, or a clear error with what it printed."""
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@pytest.fixture
def namespace() -> Iterator[str]:
    """A network namespace with loopback up (removed after the test)."""
    reason = None
    if os.geteuid() != 0:
        reason = "network namespaces need root"
    elif shutil.which("ip") is None or shutil.which("nft") is None:
        reason = "ip or nft missing: apt-get install iproute2 nftables"
    if reason is not None:
        if IN_CI:
            pytest.fail(f"CI must run the port tests: {reason}")
        pytest.skip(reason)
    name = f"lgports-{secrets.token_hex(3)}"
    run("ip", "netns", "add", name)
    try:
        run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        with contextlib.suppress(RuntimeError):
            run("ip", "netns", "del", name)


def redirect(namespace: str, port: int, to: int) -> None:
    """What a leftover Podman rule does: local connections to ``port`` go elsewhere (here to
    ``to`` on loopback, where nothing listens: refused, as in a dead container's namespace)."""
    run(
        "ip",
        "netns",
        "exec",
        namespace,
        "nft",
        "-f",
        "-",
        stdin=(
            "table ip leftover {\n"
            "  chain out { type nat hook output priority -100; "
            f"ip daddr 127.0.0.1 tcp dport {port} dnat to 127.0.0.1:{to}; }}\n"
            "}\n"
        ),
    )


def inside(namespace: str, script: str) -> str:
    """What a Python ``script`` (with labgate importable) prints, run inside ``namespace``."""
    return run("ip", "netns", "exec", namespace, sys.executable, "-c", script).strip()


def test_a_port_that_a_nat_rule_redirects_is_never_picked_for_a_tool(namespace: str) -> None:
    redirected, free, nowhere = 21_000, 21_001, 21_002
    redirect(namespace, redirected, nowhere)
    # The rule does what it should: a tool listening on the port is not reached through it.
    assert (
        inside(
            namespace,
            "import socket\n"
            f"s = socket.create_server(('127.0.0.1', {redirected}))\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {redirected}), timeout=1)\n"
            "    print('reached')\n"
            "except ConnectionRefusedError:\n"
            "    print('refused')\n",
        )
        == "refused"
    )
    # Binding alone does not see it (what the picking did before); reaching the port does.
    picked = inside(
        namespace,
        "import socket\n"
        "from labgate.tools import ports\n"
        f"socket.socket().bind(('127.0.0.1', {redirected}))\n"
        f"print(ports.reaches_here('127.0.0.1', {redirected}),"
        f" ports.reaches_here('127.0.0.1', {free}))\n"
        f"ports.tool_port_range = lambda: range({redirected}, {free} + 1)\n"
        "picker = ports.PortPicker(hold=0)\n"
        "picked = {picker.pick() for _ in range(40)} | {ports.free_port() for _ in range(40)}\n"
        "print(sorted(picked))\n",
    )
    assert picked.splitlines() == ["False True", f"[{free}]"]


def test_checking_a_port_leaves_it_free_for_the_tool_at_once() -> None:
    """The check's connection is reset, not closed: no TIME_WAIT keeps a tool that binds
    without SO_REUSEADDR off the port it was handed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert reaches_here("127.0.0.1", port)
    with socket.socket() as tool:  # no SO_REUSEADDR, as some tools bind
        tool.bind(("127.0.0.1", port))
        tool.listen(1)


def test_the_scan_names_redirected_ports_and_not_ones_in_use(namespace: str) -> None:
    redirected, listening, nowhere = 21_010, 21_011, 21_020
    redirect(namespace, redirected, nowhere)
    found = inside(
        namespace,
        "import socket\n"
        "from labgate.tools import ports\n"
        f"busy = socket.create_server(('127.0.0.1', {listening}))\n"
        f"scan = ports.redirected_ports(ports=range(21_005, 21_015))\n"
        "print(scan.redirected, scan.probed, scan.total)\n"
        f"print(ports.probe_port('127.0.0.1', {listening}),"
        f" ports.probe_port('127.0.0.1', {redirected}), ports.probe_port('127.0.0.1', 21_012))\n",
    )
    assert found.splitlines() == [f"[{redirected}] 10 10", "taken redirected free"]


def test_doctor_warns_of_redirected_tool_ports_with_the_fix(namespace: str) -> None:
    redirect(namespace, 21_031, 21_040)
    redirect(namespace, 21_033, 21_040)
    said = inside(
        namespace,
        "import json\n"
        "from labgate import doctor\n"
        "doctor.tool_port_range = lambda: range(21_030, 21_035)\n"
        "print(json.dumps([f.as_json() for f in doctor.check_tool_ports(None)]))\n",
    )
    (finding,) = json.loads(said)
    assert finding["level"] == "warn"
    assert finding["detail"].startswith("2 port(s) of 21030-21034 bind but a connection")
    assert "21031, 21033;" in finding["detail"]
    assert "docs/backends/containers.md" in finding["fix"]
    clean = inside(
        namespace,
        "import json\n"
        "from labgate import doctor\n"
        "doctor.tool_port_range = lambda: range(21_040, 21_045)\n"
        "print(json.dumps([f.as_json() for f in doctor.check_tool_ports(None)]))\n",
    )
    assert json.loads(clean) == [
        {
            "level": "ok",
            "subject": "tool ports",
            "detail": "no port of 21040-21044 is redirected elsewhere",
            "fix": "",
        }
    ]
