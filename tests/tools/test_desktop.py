"""The desktop tool's launcher: nothing reaches the desktop without the instance token."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from servers import free_port, terminate

TOKEN = "desktop-test-token-0123456789abcdef"


def test_the_desktop_answers_only_with_the_instance_token() -> None:
    missing = [p for p in ("Xtigervnc", "openbox", "xterm", "websockify") if not shutil.which(p)]
    if missing:
        install = "apt-get install tigervnc-standalone-server openbox xterm websockify novnc"
        if os.environ.get("CI") == "true":
            pytest.fail(f"missing {missing}: {install}")
        pytest.skip(f"missing {missing}: {install}")
    port = free_port()
    desktop = subprocess.Popen(
        [sys.executable, "-m", "labgate.tools.desktop", "--port", str(port)],
        env={**os.environ, "LABGATE_INSTANCE_TOKEN": TOKEN},
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        good = {"Authorization": f"token {TOKEN}"}
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/", headers=good, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the desktop did not come up"
            time.sleep(0.2)
        assert "vnc.html" in httpx.get(f"{url}/labgate-desktop.js", headers=good).text
        for path in ("/", "/vnc.html", "/websockify"):
            assert httpx.get(f"{url}{path}", timeout=5).status_code == 403, path
            bad = {"Authorization": "token nope"}
            assert httpx.get(f"{url}{path}", headers=bad, timeout=5).status_code == 403, path
    finally:
        terminate(desktop, 10)
