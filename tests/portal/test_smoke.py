from __future__ import annotations

from conftest import wait_for_state


async def test_launch_demo_and_stop(client, make_user):
    alice = await make_user("alice")
    r = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=alice)
    assert r.status_code == 202, r.text
    iid = r.json()["id"]
    body = await wait_for_state(client, alice, iid, {"running", "failed"})
    assert body["state"] == "running", body
    r = await client.delete(f"/api/v1/instances/{iid}", headers=alice)
    assert r.status_code == 202
    body = await wait_for_state(client, alice, iid, {"stopped"})
