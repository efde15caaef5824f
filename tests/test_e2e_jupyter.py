"""End to end: JupyterLab launched through the API runs real code over the kernel WebSocket."""

from __future__ import annotations

import asyncio

import pytest

from helpers import tool_client, wait_for_state
from jupyter_client_util import execute
from labgate.db.models import Instance
from servers import processes_with_env

pytestmark = pytest.mark.e2e


async def test_jupyterlab_runs_code_and_leaves_nothing_behind(app, client, make_user, router_url):
    pytest.importorskip(
        "jupyterlab", reason="install the jupyter extra: pip install -e '.[jupyter]'"
    )
    alice = await make_user("alice")
    r = await client.post("/api/v1/instances", json={"tool": "jupyterlab"}, headers=alice)
    assert r.status_code == 202, r.text
    iid = r.json()["id"]
    body = await wait_for_state(client, alice, iid, {"running", "failed"}, timeout=120)
    assert body["state"] == "running", body

    # Through the router, as a browser's code cell runs: alice's token, the router's check.
    base = f"{router_url}/i/{iid}/"
    assert await execute(base, base.replace("http://", "ws://"), alice, "1+1") == "2"

    # Past the router, without the instance token, the server refuses: only proxied traffic
    # gets in (the tool listens on a socket in a directory only its uid enters).
    endpoint = await app.state.portal.run_db(lambda s: s.get(Instance, iid).endpoint)
    async with tool_client(endpoint) as raw:
        assert (await raw.get(f"/i/{iid}/api/kernels")).status_code == 403

    assert (await client.delete(f"/api/v1/instances/{iid}", headers=alice)).status_code == 202
    await wait_for_state(client, alice, iid, {"stopped"}, timeout=60)
    for _ in range(50):
        if not processes_with_env("LABGATE_INSTANCE_ID", iid):
            break
        await asyncio.sleep(0.1)
    assert processes_with_env("LABGATE_INSTANCE_ID", iid) == []
