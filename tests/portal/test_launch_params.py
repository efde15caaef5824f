"""Launch parameters through the API and the CLI's body: checked, stored, passed, remembered."""

from __future__ import annotations

from helpers import tool_client, tool_headers, wait_for_state


async def test_bad_params_are_422_naming_the_parameter_and_start_nothing(app, client, make_user):
    alice = await make_user("alice")
    for params, name in [
        ({"size": "800x600"}, "size"),
        ({"gpus": 9}, "gpus"),
        ({"app": "../../etc/passwd"}, "app"),
        ({"colour": "red"}, "colour"),
    ]:
        r = await client.post(
            "/api/v1/instances", json={"tool": "form", "params": params}, headers=alice
        )
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "invalid_param"
        assert r.json()["param"] == name
        assert r.json()["detail"].startswith(f"params.{name}: ")
    assert (await client.get("/api/v1/instances", headers=alice)).json() == []


async def test_params_reach_the_tool_and_are_remembered(app, client, make_user):
    alice = await make_user("alice")
    tool = (await client.get("/api/v1/tools/form", headers=alice)).json()
    assert list(tool["params"]) == ["size", "gpus", "app", "verbose", "note"]
    assert tool["params"]["size"]["choices"] == ["1280x800", "1920x1080"]
    assert tool["last_params"] == {}

    r = await client.post(
        "/api/v1/instances",
        json={"tool": "form", "params": {"size": "1920x1080", "gpus": "2", "app": "x/dash.py"}},
        headers=alice,
    )
    assert r.status_code == 202, r.text
    body = await wait_for_state(client, alice, r.json()["id"], {"running", "failed"})
    assert body["state"] == "running", body
    chosen = {
        "size": "1920x1080",
        "gpus": "2",
        "app": "x/dash.py",
        "verbose": "false",
        "note": "",
    }
    assert body["params"] == chosen

    def stored(session):
        from labgate.db.models import Instance

        return session.get(Instance, body["id"])

    instance = await app.state.portal.run_db(stored)
    async with tool_client(instance.endpoint) as raw:
        info = (
            await raw.get(
                f"/i/{instance.id}/api/info",
                headers=tool_headers(app, instance),
            )
        ).json()
    # As the environment variables every tool gets, and through the tool's own templates.
    assert info["params"]["LABGATE_PARAM_SIZE"] == "1920x1080"
    assert info["params"]["LABGATE_PARAM_GPUS"] == "2"
    assert info["demo_env"] == {"DEMO_SIZE": "1920x1080", "DEMO_APP": "x/dash.py"}

    # The next form offers the same values; other users see only their own.
    assert (await client.get("/api/v1/tools/form", headers=alice)).json()["last_params"] == chosen
    bob = await make_user("bob")
    listed = {t["name"]: t for t in (await client.get("/api/v1/tools", headers=bob)).json()}
    assert listed["form"]["last_params"] == {}
