"""``labgate portal``: two replicas on PostgreSQL, one leads, a killed one is replaced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from helpers import ADMIN_PASSWORD
from servers import LabgateServer

needs_postgres = pytest.mark.skipif(
    not os.environ.get("LABGATE_TEST_DB_URL"),
    reason="portal replicas need PostgreSQL: set LABGATE_TEST_DB_URL (docs/development.md)",
)

LEASE = 1.5


def run_portal(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``labgate portal`` with ``env`` on top of a clean environment, to its end."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LABGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "labgate", "portal"],
        env={**clean, "LABGATE_DATA_DIR": str(tmp_path / "var"), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_portal_refuses_sqlite_in_one_line(tmp_path: Path) -> None:
    result = run_portal(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: `labgate portal` needs PostgreSQL: set database_url (LABGATE_DATABASE_URL) to "
        "postgresql+psycopg://USER:PASSWORD@HOST/DB; SQLite serves one process only "
        "(use `labgate serve`)"
    ]
    assert not (tmp_path / "var" / "labgate.db").exists()


def test_portal_refuses_sites_of_its_own(tmp_path: Path) -> None:
    result = run_portal(
        tmp_path,
        LABGATE_DATABASE_URL="postgresql+psycopg://labgate@127.0.0.1:1/none",
        LABGATE_SITES='[{"name": "box", "backend": "process"}]',
    )
    assert result.returncode == 2
    assert "`labgate portal` runs no sites of its own" in result.stderr
    assert "labgate site add" in result.stderr


def ready(server: LabgateServer) -> dict[str, object]:
    body: dict[str, object] = httpx.get(f"{server.url}/readyz", timeout=5).json()
    return body


def forwarded_for_believed(server: LabgateServer, source: str) -> bool:
    """Whether the replica takes ``X-Forwarded-For`` from a peer at ``source`` as the client.

    Four wrong passwords for one account, each naming another client: believed,
    they come from four addresses (3 allowed from each); not, from one, and the
    fourth is refused (429).
    """
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(base_url=server.url, transport=transport, timeout=10) as client:
        statuses = [
            client.post(
                "/api/v1/auth/login",
                json={"username": "admin", "password": "not-the-password"},
                headers={"X-Forwarded-For": f"203.0.113.{n}"},
            ).status_code
            for n in range(4)
        ]
    assert statuses[:3] == [401, 401, 401], statuses
    return statuses[3] == 401


@needs_postgres
def test_replicas_one_leads_a_killed_one_is_replaced_and_forwarders_are_checked(
    tmp_path: Path, database_url: str
) -> None:
    env = {
        "LABGATE_DATABASE_URL": database_url,
        "LABGATE_LEADER_LEASE_SECONDS": str(LEASE),
        "LABGATE_LOGIN_LIMIT_ACCOUNT_ADDRESS": "3/5minutes",
    }
    replicas = [
        LabgateServer(
            tmp_path / name / "var",
            ADMIN_PASSWORD,
            command="portal",
            LABGATE_REPLICA_ID=name,
            **env,
        )
        for name in ("p1", "p2")
    ]
    try:
        for server in replicas:
            server.data_dir.parent.mkdir()
            server.start(timeout=60)
        answers = {str(body["replica"]): body for body in map(ready, replicas)}
        assert [name for name, body in answers.items() if body["leading"]] == ["p1"]
        assert {str(body["leader"]) for body in answers.values()} == {"p1"}
        # Any replica serves the API, with a token made on another.
        headers = replicas[1].token("admin", ADMIN_PASSWORD)
        for server in replicas:
            me = httpx.get(f"{server.url}/api/v1/auth/session", headers=headers, timeout=5)
            assert me.status_code == 200 and me.json()["user"]["name"] == "admin"

        assert forwarded_for_believed(replicas[1], "127.0.0.1")
        assert not forwarded_for_believed(replicas[1], "127.0.0.2")

        leader = replicas[0]
        assert leader.process is not None
        leader.process.send_signal(signal.SIGKILL)  # no hand-over: the lease must run out
        leader.process.wait()
        leader.process = None
        killed = time.monotonic()
        while True:
            leading = [str(b["replica"]) for b in map(ready, replicas[1:]) if b["leading"]]
            if leading:
                break
            assert time.monotonic() - killed < LEASE + 3, "no replica took over"
            time.sleep(0.05)
        assert len(leading) == 1
        assert time.monotonic() - killed < LEASE + 3
        assert {str(ready(server)["leader"]) for server in replicas[1:]} == set(leading)
    finally:
        for server in replicas:
            server.stop()
