"""Groups API: admins create groups, manage members and limits; members can look."""

from __future__ import annotations


async def test_group_lifecycle_and_visibility(client, make_user, admin_headers):
    alice, bob = await make_user("alice"), await make_user("bob")
    body = {
        "name": "lab-a",
        "description": "Lab A",
        "limits": {"instances": 4, "memory": "8G"},
        "max_lifetime": 28800,
    }
    created = await client.post("/api/v1/groups", json=body, headers=admin_headers)
    assert created.status_code == 201, created.text
    group = created.json()
    assert group["limits"] == {
        "instances": 4,
        "cpu": None,
        "memory": 8 * 1024**3,
        "core_hours": None,
    }
    assert group["max_lifetime"] == 28800 and group["members"] == []
    again = await client.post("/api/v1/groups", json={"name": "lab-a"}, headers=admin_headers)
    assert again.status_code == 409 and again.json()["error"] == "group_exists"
    bad = await client.post("/api/v1/groups", json={"name": "Lab A"}, headers=admin_headers)
    assert bad.status_code == 422
    assert (
        await client.post("/api/v1/groups", json={"name": "x"}, headers=alice)
    ).status_code == 403

    added = await client.put("/api/v1/groups/lab-a/members/alice", headers=admin_headers)
    assert added.status_code == 201 and added.json()["members"] == ["alice"]
    assert (
        await client.put("/api/v1/groups/lab-a/members/alice", headers=admin_headers)
    ).status_code == 200
    missing = await client.put("/api/v1/groups/lab-a/members/nobody", headers=admin_headers)
    assert missing.status_code == 404 and missing.json()["error"] == "unknown_user"

    # Members see their groups; others do not even learn it exists.
    assert [g["name"] for g in (await client.get("/api/v1/groups", headers=alice)).json()] == [
        "lab-a"
    ]
    assert (await client.get("/api/v1/groups", headers=bob)).json() == []
    assert (await client.get("/api/v1/groups/lab-a", headers=alice)).status_code == 200
    hidden = await client.get("/api/v1/groups/lab-a", headers=bob)
    assert hidden.status_code == 404 and hidden.json()["error"] == "unknown_group"

    # PATCH: named limits change, null removes one, the others stay.
    patched = await client.patch(
        "/api/v1/groups/lab-a",
        json={"limits": {"cpu": 16, "memory": None}, "max_lifetime": None},
        headers=admin_headers,
    )
    assert patched.json()["limits"] == {
        "instances": 4,
        "cpu": 16,
        "memory": None,
        "core_hours": None,
    }
    assert patched.json()["max_lifetime"] is None
    limits = (await client.get("/api/v1/users/alice/limits", headers=admin_headers)).json()
    assert [g["name"] for g in limits["groups"]] == ["lab-a"]

    removed = await client.delete("/api/v1/groups/lab-a/members/alice", headers=admin_headers)
    assert removed.status_code == 204
    assert (
        await client.delete("/api/v1/groups/lab-a/members/alice", headers=admin_headers)
    ).status_code == 404
    assert (await client.delete("/api/v1/groups/lab-a", headers=admin_headers)).status_code == 204
    assert (await client.get("/api/v1/groups/lab-a", headers=admin_headers)).status_code == 404


async def test_deleting_a_user_takes_them_out_of_groups(client, make_user, admin_headers):
    await make_user("carol")
    await client.post("/api/v1/groups", json={"name": "g"}, headers=admin_headers)
    await client.put("/api/v1/groups/g/members/carol", headers=admin_headers)
    assert (await client.delete("/api/v1/users/carol", headers=admin_headers)).status_code == 204
    assert (await client.get("/api/v1/groups/g", headers=admin_headers)).json()["members"] == []


async def test_limits_out_of_range_are_refused_not_overflowed(client, make_user, admin_headers):
    await make_user("erin")
    for limits in (
        {"instances": 10**30},
        {"cpu": 1e300},
        {"memory": "9" * 400},
        {"memory": 2**70},
        {"core_hours": 1e300},
    ):
        answer = await client.put("/api/v1/users/erin/limits", json=limits, headers=admin_headers)
        assert answer.status_code == 422, (limits, answer.text)
        assert answer.json()["error"] == "validation_error"
    made = await client.post(
        "/api/v1/groups", json={"name": "eons", "max_lifetime": 1e20}, headers=admin_headers
    )
    assert made.status_code == 422 and "max_lifetime" in made.text
    made = await client.post(
        "/api/v1/groups",
        json={"name": "eons", "limits": {"memory": "1024T"}, "max_lifetime": 86400},
        headers=admin_headers,
    )
    assert made.status_code == 201, made.text
    assert made.json()["limits"]["memory"] == 1024**5
