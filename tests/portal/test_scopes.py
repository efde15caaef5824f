"""Every operation of the OpenAPI document, called by a plain user, an admin and a router.

The tables below say what a plain user's API token (and, separately, a plain
user's session with its CSRF token) gets from each operation, called on real
objects of another user (Bob's instance, token, snapshot, dataset, group). A
scope that leaks into user credentials, or a new operation without a check,
changes an answer and fails :func:`test_plain_user_walks_every_operation`;
an operation added to the API without a row here fails it too.

"May call" means the handler ran: bodies are valid, so a 2xx or a handler's
own refusal (404 for someone else's object, 409 for a state) shows that the
scope check let the caller through, while 401/403 show it did not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from helpers import PASSWORD, wait_for_state
from labgate.security import router_token

DOI = "10.5555/scope-walk"

#: Valid bodies, so that "may call" means the handler ran (not a 422 from validation).
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/api/v1/auth/login"): {"username": "alice", "password": PASSWORD},
    ("POST", "/api/v1/users"): {"name": "mallory", "password": PASSWORD},
    ("PATCH", "/api/v1/users/{name}"): {"is_admin": True},
    ("PUT", "/api/v1/users/{name}/password"): {"password": "a-new-password-for-bob"},
    ("POST", "/api/v1/tokens"): {"note": "walk"},
    ("POST", "/api/v1/instances"): {"tool": "no-such-tool"},
    ("POST", "/api/v1/datasets"): {"id": "10.5555/walk-new"},
    ("PUT", "/api/v1/datasets/{identifier}/replicas/{site}"): {"path": "scope-walk"},
    ("PATCH", "/api/v1/datasets/{identifier}"): {"title": "changed by the walk"},
    ("POST", "/api/v1/sites/{site}/inventory"): {"replicas": []},
    ("POST", "/api/v1/sites"): {"name": "walk-site", "backend": "process"},
    ("PATCH", "/api/v1/sites/{name}"): {"labels": {}},
    ("POST", "/api/v1/instances/{instance_id}/snapshot"): {},
    ("POST", "/api/v1/router/activity"): {"worker": "walk"},
    ("POST", "/api/v1/groups"): {"name": "walkers"},
    ("PATCH", "/api/v1/groups/{name}"): {"description": "changed by the walk"},
    ("PUT", "/api/v1/users/{name}/limits"): {"instances": 1},
    ("PUT", "/api/v1/instances/{instance_id}/keep-alive"): {"for": 3600},
    ("POST", "/api/v1/instances/{instance_id}/shares"): {"user": "alice", "access": "use"},
    ("POST", "/api/v1/instances/{instance_id}/links"): {},
    ("POST", "/api/v1/shares/redeem"): {"token": "lgl_not-a-real-link"},
    ("POST", "/api/v1/runs"): {"stages": []},
    ("POST", "/api/v1/runs/validate"): {"stages": []},
}

#: Required query parameters.
QUERIES: dict[tuple[str, str], dict[str, str]] = {
    ("GET", "/api/v1/resolve"): {"id": DOI},
    ("GET", "/api/v1/runs/{run_id}/logs"): {"task": "t"},
}

#: Run last: they end the caller's session (the session walk) or change no one's state.
LAST = [("POST", "/api/v1/auth/logout")]

#: What a plain user's API token gets from each operation, called on Bob's objects.
#: 401/403: refused by authentication or scope; anything else: the handler ran.
USER_TOKEN: dict[tuple[str, str], int] = {
    ("POST", "/api/v1/auth/login"): 200,
    ("GET", "/api/v1/auth/session"): 200,
    ("GET", "/api/v1/users"): 403,
    ("POST", "/api/v1/users"): 403,
    ("GET", "/api/v1/users/{name}"): 403,
    ("PATCH", "/api/v1/users/{name}"): 403,
    ("DELETE", "/api/v1/users/{name}"): 403,
    ("PUT", "/api/v1/users/{name}/password"): 403,
    ("DELETE", "/api/v1/users/{name}/identities/{provider}"): 403,
    ("POST", "/api/v1/tokens"): 201,
    ("GET", "/api/v1/tokens"): 200,
    ("DELETE", "/api/v1/tokens/{token_id}"): 404,
    ("GET", "/api/v1/tools"): 200,
    ("GET", "/api/v1/tools/{name}"): 200,
    ("GET", "/api/v1/sites"): 200,
    ("POST", "/api/v1/sites"): 403,
    ("GET", "/api/v1/sites/{name}"): 404,
    ("PATCH", "/api/v1/sites/{name}"): 403,
    ("DELETE", "/api/v1/sites/{name}"): 403,
    ("POST", "/api/v1/sites/{name}/token"): 403,
    ("DELETE", "/api/v1/sites/{name}/token"): 403,
    ("POST", "/api/v1/instances"): 404,
    ("GET", "/api/v1/instances"): 200,
    ("GET", "/api/v1/instances/{instance_id}"): 404,
    ("DELETE", "/api/v1/instances/{instance_id}"): 404,
    ("GET", "/api/v1/instances/{instance_id}/logs"): 404,
    # Bob's run does not exist for Alice; hers is refused as invalid (the handler ran).
    ("POST", "/api/v1/runs"): 400,
    ("POST", "/api/v1/runs/validate"): 400,
    ("GET", "/api/v1/runs"): 200,
    ("GET", "/api/v1/runs/{run_id}"): 404,
    ("GET", "/api/v1/runs/{run_id}/events"): 404,
    ("POST", "/api/v1/runs/{run_id}/cancel"): 404,
    ("POST", "/api/v1/runs/{run_id}/rerun"): 404,
    ("GET", "/api/v1/runs/{run_id}/logs"): 404,
    ("GET", "/api/v1/runs/{run_id}/results"): 404,
    ("GET", "/api/v1/instances/{instance_id}/events"): 404,
    ("GET", "/api/v1/datasets"): 200,
    ("POST", "/api/v1/datasets"): 403,
    ("PUT", "/api/v1/datasets/{identifier}/replicas/{site}"): 403,
    ("DELETE", "/api/v1/datasets/{identifier}/replicas/{site}"): 403,
    ("GET", "/api/v1/datasets/{identifier}"): 200,
    ("PATCH", "/api/v1/datasets/{identifier}"): 403,
    ("DELETE", "/api/v1/datasets/{identifier}"): 403,
    ("POST", "/api/v1/sites/{site}/inventory"): 403,
    ("GET", "/api/v1/resolve"): 200,
    ("POST", "/api/v1/instances/{instance_id}/snapshot"): 404,
    ("GET", "/api/v1/snapshots"): 200,
    ("GET", "/api/v1/snapshots/{snapshot_id}"): 404,
    ("DELETE", "/api/v1/snapshots/{snapshot_id}"): 404,
    ("GET", "/api/v1/snapshots/{snapshot_id}/shares"): 404,
    ("PUT", "/api/v1/snapshots/{snapshot_id}/shares/{user}"): 404,
    ("DELETE", "/api/v1/snapshots/{snapshot_id}/shares/{user}"): 404,
    ("GET", "/api/v1/router/stream"): 403,
    ("POST", "/api/v1/router/activity"): 403,
    ("GET", "/api/v1/groups"): 200,
    ("POST", "/api/v1/groups"): 403,
    ("GET", "/api/v1/groups/{name}"): 404,
    ("PATCH", "/api/v1/groups/{name}"): 403,
    ("DELETE", "/api/v1/groups/{name}"): 403,
    ("PUT", "/api/v1/groups/{name}/members/{user}"): 403,
    ("DELETE", "/api/v1/groups/{name}/members/{user}"): 403,
    ("GET", "/api/v1/users/{name}/limits"): 403,
    ("PUT", "/api/v1/users/{name}/limits"): 403,
    ("GET", "/api/v1/usage"): 200,
    ("GET", "/api/v1/usage/records"): 200,
    ("GET", "/api/v1/instances/{instance_id}/keep-alive"): 404,
    ("PUT", "/api/v1/instances/{instance_id}/keep-alive"): 404,
    ("DELETE", "/api/v1/instances/{instance_id}/keep-alive"): 404,
    ("POST", "/api/v1/instances/{instance_id}/activity"): 401,
    ("POST", "/api/v1/tasks/{attempt_id}/events"): 401,
    ("POST", "/api/v1/tasks/{attempt_id}/state"): 401,
    ("GET", "/api/v1/instances/{instance_id}/shares"): 404,
    ("POST", "/api/v1/instances/{instance_id}/shares"): 404,
    ("DELETE", "/api/v1/instances/{instance_id}/shares/{share_id}"): 404,
    ("POST", "/api/v1/instances/{instance_id}/links"): 404,
    ("DELETE", "/api/v1/instances/{instance_id}/links/{link_id}"): 404,
    ("POST", "/api/v1/shares/redeem"): 404,
    ("GET", "/api/v1/pools"): 403,
    ("GET", "/api/v1"): 200,
    ("GET", "/readyz"): 200,
    ("GET", "/metrics"): 403,
    ("POST", "/api/v1/auth/logout"): 204,
}

#: A plain user's session (with its CSRF token) gets what their token gets.
USER_SESSION = USER_TOKEN

#: What an admin's API token may not do: the route stream and activity reports.
ROUTER_ONLY = [("GET", "/api/v1/router/stream"), ("POST", "/api/v1/router/activity")]


@dataclass
class World:
    """Bob's real objects, which Alice's calls name."""

    instance_id: str
    token_id: int
    snapshot_id: str
    group: str
    run_id: str


def operations(openapi: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (method, path) of the OpenAPI document, logout last."""
    found = [
        (method.upper(), path)
        for path, item in openapi["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    ]
    return [op for op in found if op not in LAST] + [op for op in LAST if op in found]


def fill(path: str, world: World) -> str:
    """``path`` with its parameters set to Bob's objects."""
    values = {
        "name": "bob",
        "user": "bob",
        "instance_id": world.instance_id,
        "token_id": str(world.token_id),
        "snapshot_id": world.snapshot_id,
        "identifier": DOI,
        "site": "local",
        # Bob's instance has no shares or links: any id is someone else's.
        "share_id": "1",
        "provider": "uni",
        "link_id": "1",
        "run_id": world.run_id,
        # A task attempt's gateway takes its task token only: any other credential is refused.
        "attempt_id": "0123456789abcdef0123456789abcdef",
    }
    if path.startswith("/api/v1/tools/"):
        values["name"] = "demo"
    if path.startswith("/api/v1/groups/"):
        values["name"] = world.group
    return path.format(**values)


async def call(
    client: httpx.AsyncClient, op: tuple[str, str], world: World, headers: dict[str, str]
) -> httpx.Response:
    """One operation on Bob's objects, with a valid body."""
    method, path = op
    kwargs: dict[str, Any] = {"headers": headers, "params": QUERIES.get(op, {})}
    if op in BODIES:
        kwargs["json"] = BODIES[op]
    if path == "/api/v1/router/stream":
        # A stream that was let through never ends: the status line is the answer.
        async with client.stream(method, fill(path, world), **kwargs) as response:
            return response
    return await client.request(method, fill(path, world), **kwargs)


async def walk(
    client: httpx.AsyncClient, openapi: dict[str, Any], world: World, headers: dict[str, str]
) -> dict[tuple[str, str], int]:
    """The status of every operation called with ``headers`` (and the client's cookie)."""
    statuses = {}
    session = "X-CSRF-Token" in headers
    for op in operations(openapi):
        response = await call(client, op, world, headers)
        statuses[op] = response.status_code
        if op == ("POST", "/api/v1/auth/login") and response.status_code == 200:
            if session:  # signing in again starts a new session, with a new CSRF token
                headers = {"X-CSRF-Token": response.json()["csrf_token"]}
            else:  # the token walk stays a token walk
                client.cookies.clear()
    return statuses


async def bobs_world(
    client: httpx.AsyncClient, admin: dict[str, str], bob: dict[str, str]
) -> World:
    """Bob's running instance, his token, a snapshot, a dataset and a group he is in."""
    launched = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=bob)
    assert launched.status_code == 202, launched.text
    instance_id = launched.json()["id"]
    await wait_for_state(client, bob, instance_id, {"running"})
    snapshot = await client.post(f"/api/v1/instances/{instance_id}/snapshot", json={}, headers=bob)
    assert snapshot.status_code == 202, snapshot.text
    tokens = (await client.get("/api/v1/tokens", headers=bob)).json()
    dataset = await client.post("/api/v1/datasets", json={"id": DOI}, headers=bob)
    assert dataset.status_code == 201, dataset.text
    group = await client.post("/api/v1/groups", json={"name": "bobs-lab"}, headers=admin)
    assert group.status_code == 201, group.text
    member = await client.put("/api/v1/groups/bobs-lab/members/bob", headers=admin)
    assert member.status_code == 201, member.text
    run = await client.post(
        "/api/v1/runs",
        json={"stages": [{"name": "s", "tasks": [{"name": "t", "command": "true"}]}]},
        headers=bob,
    )
    assert run.status_code == 201, run.text
    return World(instance_id, tokens[0]["id"], snapshot.json()["id"], "bobs-lab", run.json()["id"])


def differences(got: dict[tuple[str, str], int], expected: dict[tuple[str, str], int]) -> list[str]:
    """Readable lines for every operation whose answer is not the expected one."""
    lines = [
        f"{method} {path}: got {got.get((method, path))}, expected {expected.get((method, path))}"
        for method, path in sorted(set(got) | set(expected))
        if got.get((method, path)) != expected.get((method, path))
    ]
    return lines


async def session_headers(client: httpx.AsyncClient, name: str) -> dict[str, str]:
    """Sign ``name`` in: the cookie stays in the client, the CSRF token goes in a header."""
    login = await client.post("/api/v1/auth/login", json={"username": name, "password": PASSWORD})
    assert login.status_code == 200, login.text
    return {"X-CSRF-Token": login.json()["csrf_token"]}


async def test_plain_user_walks_every_operation(
    app: Any, client: httpx.AsyncClient, make_user: Any, admin_headers: dict[str, str]
) -> None:
    alice = await make_user("alice")
    bob = await make_user("bob", data_provider=True)
    world = await bobs_world(client, admin_headers, bob)
    openapi = (await client.get("/api/v1/openapi.json")).json()

    got = await walk(client, openapi, world, alice)
    assert differences(got, USER_TOKEN) == []

    # The same walk with Alice's browser session: cookie plus CSRF header.
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=30) as browser:
        csrf = await session_headers(browser, "alice")
        got = await walk(browser, openapi, world, csrf)
    assert differences(got, USER_SESSION) == []


async def test_only_the_router_token_reads_the_stream_and_reports_activity(
    app: Any, client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    world = World("none", 0, "none", "none", "none")
    for op in ROUTER_ONLY:
        refused = await call(client, op, world, admin_headers)
        assert refused.status_code == 403, op
    stream = await client.get("/api/v1/router/stream", headers=admin_headers)
    assert stream.json()["error"] == "insufficient_scope"
    assert "router" in stream.json()["detail"]

    # The router token gets these two and nothing else.
    token = router_token(app.state.portal.signer.key)
    router = {"Authorization": f"token {token}"}
    openapi = (await client.get("/api/v1/openapi.json")).json()
    for op in operations(openapi):
        status = (await call(client, op, world, router)).status_code
        if op in ROUTER_ONLY:
            assert status in (200, 204), op
        elif op[1] not in ("/api/v1/auth/login", "/api/v1", "/readyz"):
            assert status in (401, 403), (op, status)
    # Nor is it anyone on the web pages.
    for page in ("/", "/instances", "/admin"):
        assert (await client.get(page, headers=router)).status_code == 403, page


@pytest.mark.parametrize("scopes", [["router"], ["account", "router"]])
async def test_no_token_carries_the_router_scope(
    client: httpx.AsyncClient, make_user: Any, admin_headers: dict[str, str], scopes: list[str]
) -> None:
    alice = await make_user("alice")
    for headers in (alice, admin_headers):
        refused = await client.post("/api/v1/tokens", json={"scopes": scopes}, headers=headers)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] == "reserved_scope"
    session = (await client.get("/api/v1/auth/session", headers=admin_headers)).json()
    assert "router" not in session["scopes"]
    default = await client.post("/api/v1/tokens", json={}, headers=alice)
    assert "router" not in default.json()["scopes"]
