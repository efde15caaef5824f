"""What ``labgate serve`` writes to its log: not every health check, and its shutdown."""

from __future__ import annotations

from pathlib import Path

import httpx

from servers import LabgateServer, launch_running

PASSWORD = "admin-password-for-logs"


def test_health_checks_are_quiet_and_shutdown_is_said(tmp_path: Path) -> None:
    server = LabgateServer(tmp_path / "var", PASSWORD)
    server.start()
    try:
        admin = server.token("admin", PASSWORD, ["admin", "account"])
        with httpx.Client(base_url=server.url, headers=admin, timeout=10) as client:
            launch_running(client, "demo")
            for _ in range(5):  # the probes a load balancer makes
                assert client.get("/healthz").status_code == 200
        server.stop_instances("admin", PASSWORD)
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "labgate serving on" in log
    # The tool's readiness checks went through httpx; none is logged at INFO.
    assert "HTTP Request" not in log, log
    assert "/healthz" not in log
    assert "labgate stopping (SIGTERM)" in log, log
    assert log.rstrip().endswith("labgate stopped"), log[-500:]
