"""The jupyter_server extension that reports busy kernels, in a real JupyterLab behind labgate."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import websockets
from jupyter_client.session import Session

from labgate.tools.jupyter_busy import reporter_from_env
from servers import LabgateServer, launch_running

pytestmark = pytest.mark.e2e

PASSWORD = "admin-password-for-busy"
BUILTIN = Path(__file__).resolve().parents[2] / "src/labgate/tools/builtin/jupyterlab.toml"


def busy_tool(directory: Path) -> Path:
    """The built-in JupyterLab tool file, reporting every second instead of every minute."""
    directory.mkdir(parents=True, exist_ok=True)
    text = BUILTIN.read_text().replace('name = "jupyterlab"', 'name = "jupyterlab-busy"')
    text = text.replace(
        'env = { JUPYTER_TOKEN = "{instance_token}" }',
        'env = { JUPYTER_TOKEN = "{instance_token}", LABGATE_BUSY_INTERVAL = "1" }',
    )
    assert "jupyterlab-busy" in text and "LABGATE_BUSY_INTERVAL" in text
    (directory / "jupyterlab-busy.toml").write_text(text)
    return directory


def test_reporter_needs_labgates_variables() -> None:
    assert reporter_from_env(object(), {}) is None
    env = {
        "LABGATE_API_URL": "http://127.0.0.1:1/api/v1/",
        "LABGATE_INSTANCE_ID": "abc",
        "LABGATE_INSTANCE_TOKEN": "secret",
        "LABGATE_BUSY_INTERVAL": "often",
    }
    reporter = reporter_from_env(object(), env)
    assert reporter is not None
    assert reporter.url == "http://127.0.0.1:1/api/v1/instances/abc/activity"
    assert reporter.interval == 60.0  # a bad interval falls back to the default


async def start_computing(url: str, headers: dict[str, str], seconds: float) -> str:
    """Start a kernel, ask it to sleep, and hang up without waiting: nothing flows after."""
    async with httpx.AsyncClient(headers=headers, timeout=60) as client:
        created = await client.post(f"{url}api/kernels", json={"name": "python3"})
        assert created.status_code == 201, created.text
        kernel = created.json()["id"]
    session = Session(username="busy-test")
    request = session.msg(
        "execute_request",
        {"code": f"import time; time.sleep({seconds})", "silent": False, "allow_stdin": False},
    )
    request["channel"] = "shell"
    ws_url = f"{url.replace('http://', 'ws://')}api/kernels/{kernel}/channels"
    async with websockets.connect(ws_url, additional_headers=headers) as ws:
        await ws.send(json.dumps(request, default=str))
        while True:  # until the kernel says it is busy with our request
            message = json.loads(await ws.recv())
            ours = message.get("parent_header", {}).get("msg_id") == request["header"]["msg_id"]
            status = message["header"]["msg_type"] == "status"
            if ours and status and message["content"].get("execution_state") == "busy":
                break
    return str(kernel)


def cull_at(client: httpx.Client, iid: str) -> float:
    shown = client.get(f"/api/v1/instances/{iid}/keep-alive").json()
    assert shown["cull_reason"] == "idle", shown
    return datetime.fromisoformat(shown["cull_at"]).timestamp()


def test_a_computing_kernel_keeps_its_instance_from_looking_idle(tmp_path: Path) -> None:
    pytest.importorskip(
        "jupyterlab", reason="install the jupyter extra: pip install -e '.[jupyter]'"
    )
    server = LabgateServer(
        tmp_path / "var", PASSWORD, LABGATE_TOOLS_DIR=str(busy_tool(tmp_path / "tools"))
    )
    server.start()
    try:
        headers = server.token("admin", PASSWORD, ["admin", "account"])
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
            instance = launch_running(client, "jupyterlab-busy")
            iid = instance["url"].rstrip("/").rsplit("/", 1)[1]

            asyncio.run(start_computing(instance["url"], headers, 6))
            before = cull_at(client, iid)
            time.sleep(3.5)
            # Nothing went through the router meanwhile; only the kernel's reports moved it.
            during = cull_at(client, iid)
            assert during >= before + 2, (before, during)

            time.sleep(5)  # the computation ends; idle kernels report nothing
            settled = cull_at(client, iid)
            time.sleep(2.5)
            assert cull_at(client, iid) == pytest.approx(settled, abs=0.01)
    finally:
        server.stop_instances("admin", PASSWORD)
        server.stop()
