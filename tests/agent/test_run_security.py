"""Who may see a run, and what a site may say of tasks: the rules of docs/security.md."""

from __future__ import annotations

import asyncio

from test_agent_security import add_site, spy_agent

from labgate.wire.agent import ReportEnvelope, ReportMsg, dump

RUN = """
[[stages]]
name = "one"
[[stages.tasks]]
name = "east-only"
command = "true"
where = {site = "east"}
"""


async def _command(spy, op: str) -> dict:
    for _ in range(200):
        for command in spy.commands:
            if command["op"] == op:
                return command
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {op} command: {spy.commands}")


async def test_a_site_cannot_report_on_another_sites_task(app, client, admin_headers):
    import websockets

    from labgate.wire.agent import CONNECT_PATH, Hello, Welcome, parse

    east = await add_site(client, admin_headers, "east")
    west = await add_site(client, admin_headers, "west")
    async with spy_agent(app.state.test_url, "east", east) as east_spy:
        for _ in range(100):
            if app.state.portal.links["east"].live:
                break
            await asyncio.sleep(0.02)
        created = await client.post("/api/v1/runs", content=RUN, headers=admin_headers)
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        command = await _command(east_spy, "run_task")
        attempt = command["args"]["spec"]["attempt_id"]

        # West's agent claims east's task succeeded: refused, the run goes on running.
        ws_url = app.state.test_url.replace("http://", "ws://") + CONNECT_PATH
        async with websockets.connect(
            ws_url, additional_headers={"Authorization": f"Bearer {west}"}
        ) as ws:
            assert isinstance(parse(await ws.recv()), Welcome)
            await ws.send(
                dump(Hello(site="west", agent_version="liar", boot="x", backend="process"))
            )
            lie = ReportMsg(
                instance_id=attempt, state="succeeded", kind="task", data={"result": 666}
            )
            await ws.send(dump(ReportEnvelope(seq=1, report=lie)))
            for _ in range(50):  # acknowledged (read and dropped), not applied
                if '"ack"' in await ws.recv():
                    break
        run = (await client.get(f"/api/v1/runs/{run_id}", headers=admin_headers)).json()
        assert run["state"] == "running"
        assert run["stages"][0]["tasks"][0]["result"] is None

        # The same report from east, whose task it is, is applied.
        truth = ReportMsg(instance_id=attempt, state="succeeded", kind="task", data={"result": 7})
        await east_spy.ws.send(dump(ReportEnvelope(seq=100, report=truth)))
        for _ in range(100):
            run = (await client.get(f"/api/v1/runs/{run_id}", headers=admin_headers)).json()
            if run["state"] != "running":
                break
            await asyncio.sleep(0.05)
        assert run["state"] == "succeeded"
        assert run["stages"][0]["tasks"][0]["result"] == 7


async def test_only_the_owner_and_admins_see_cancel_or_download_a_run(
    client, make_user, admin_headers
):
    alice = await make_user("alice")
    bob = await make_user("bob")
    definition = '[[stages]]\nname = "one"\n[[stages.tasks]]\nname = "nap"\ncommand = "sleep 30"\n'
    created = await client.post("/api/v1/runs", content=definition, headers=alice)
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    for method, path in [
        ("GET", f"/api/v1/runs/{run_id}"),
        ("GET", f"/api/v1/runs/{run_id}/events"),
        ("GET", f"/api/v1/runs/{run_id}/results"),
        ("GET", f"/api/v1/runs/{run_id}/logs?task=nap"),
        ("POST", f"/api/v1/runs/{run_id}/cancel"),
        ("POST", f"/api/v1/runs/{run_id}/rerun"),
    ]:
        answer = await client.request(method, path, headers=bob)
        assert answer.status_code == 404, (path, answer.text)
        assert answer.json()["error"] == "unknown_run"
    assert (await client.get("/api/v1/runs", headers=bob)).json() == []
    assert [r["id"] for r in (await client.get("/api/v1/runs", headers=admin_headers)).json()] == [
        run_id
    ]
    assert (
        await client.get(f"/api/v1/runs/{run_id}/results", headers=admin_headers)
    ).status_code == 200
    cancelled = await client.post(f"/api/v1/runs/{run_id}/cancel", headers=admin_headers)
    assert cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["reason"] == "cancelled by admin"
