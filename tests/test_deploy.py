"""deploy/: the systemd units load (``systemd-analyze verify``) and run what exists."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "systemd"


@pytest.mark.parametrize("unit", ["labgate.service", "labgate-agent.service"])
def test_the_units_verify(unit: str, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must check the units: apt-get install systemd")
        pytest.skip("systemd-analyze is missing: apt-get install systemd")
    labgate = Path(sys.executable).with_name("labgate")
    assert labgate.exists()
    text = (DEPLOY / unit).read_text()
    assert "ExecStart=/usr/local/bin/labgate " in text
    # Where this checkout's labgate is, instead of /usr/local/bin; an empty environment file.
    env = tmp_path / "agent.env"
    env.write_text("")
    copy = tmp_path / unit
    copy.write_text(
        text.replace("/usr/local/bin/labgate", str(labgate)).replace(
            "/etc/labgate/agent.env", str(env)
        )
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False
    )
    problems = [
        line
        for line in result.stderr.splitlines()
        # Units this one names that a test machine need not have.
        if "podman.socket" not in line and "network-online.target" not in line
    ]
    assert problems == [], result.stderr


def test_the_socket_drop_in_gives_the_labgate_group_access_only() -> None:
    text = (DEPLOY / "podman.socket.d" / "labgate.conf").read_text()
    assert "SocketGroup=labgate" in text and "SocketMode=0660" in text
    assert "[Socket]" in text


def test_the_registry_gc_timer_runs_its_service() -> None:
    timer = (DEPLOY / "registry-gc.timer").read_text()
    service = (DEPLOY / "registry-gc.service").read_text()
    assert "OnCalendar=" in timer and "[Install]" in timer
    assert "garbage-collect" in service and "Type=oneshot" in service
