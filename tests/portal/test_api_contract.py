"""The API contract: strict request bodies, bounded numbers, and errors as the document says.

The fuzzer (test_fuzz_api.py) sends what the OpenAPI document allows; these
tests pin the rules it relies on with requests written by hand.
"""

from __future__ import annotations

from typing import Any

import pytest

from labgate.security import router_token

HUGE = 2**80


def assert_422(response: Any, field: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "validation_error"
    assert field in body["detail"], body


# --- strict types: no coercion in request bodies -------------------------------------


@pytest.mark.parametrize(
    ("path", "method", "body", "field"),
    [
        ("/api/v1/users", "POST", {"name": "zed", "is_admin": 0}, "is_admin"),
        ("/api/v1/users", "POST", {"name": "zed", "is_admin": "true"}, "is_admin"),
        ("/api/v1/users/me", "PATCH", {"disabled": 1}, "disabled"),
        ("/api/v1/users", "POST", {"name": 5}, "name"),
        ("/api/v1/users/me/limits", "PUT", {"core_hours": False}, "core_hours"),
        ("/api/v1/users/me/limits", "PUT", {"instances": "5"}, "instances"),
        ("/api/v1/users/me/limits", "PUT", {"instances": 5.0}, "instances"),
        ("/api/v1/users/me/limits", "PUT", {"memory": True}, "memory"),
        ("/api/v1/groups", "POST", {"name": "g", "max_lifetime": "3600"}, "max_lifetime"),
        ("/api/v1/tokens", "POST", {"expires_in": "60"}, "expires_in"),
        ("/api/v1/tokens", "POST", {"note": 7}, "note"),
        ("/api/v1/instances", "POST", {"tool": "demo", "labels": {"zone": 1}}, "labels"),
        ("/api/v1/datasets", "POST", {"id": "doi:10.1/x", "size": "10"}, "size"),
        ("/api/v1/datasets", "POST", {"id": "doi:10.1/x", "title": None}, "title"),
        ("/api/v1/sites/local/inventory", "POST", {"final": "yes"}, "final"),
        (
            "/api/v1/sites",
            "POST",
            {"name": "x", "backend": "process", "labels": {"a": 1}},
            "labels",
        ),
        (
            "/api/v1/sites",
            "POST",
            {"name": "x", "backend": "process", "capacity": {"cpu": "2"}},
            "cpu",
        ),
        ("/api/v1/sites/local", "PATCH", {"reach": True}, "reach"),
        (
            "/api/v1/sites/local/inventory",
            "POST",
            {"replicas": [{"id": "doi:10.1/x", "path": "x", "verified_at": 1700000000}]},
            "verified_at",
        ),
        ("/api/v1/instances/nope/keep-alive", "PUT", {"for": "60"}, "for"),
        ("/api/v1/instances/nope/keep-alive", "PUT", {"until": 1700000000}, "until"),
    ],
)
async def test_wrong_json_types_are_refused(client, admin_headers, path, method, body, field):
    response = await client.request(method, path, json=body, headers=admin_headers)
    assert_422(response, field)


async def test_right_types_are_taken(client, admin_headers):
    """Numbers where numbers belong (an int for a float too), ISO text for times."""
    limits = await client.put(
        "/api/v1/users/me/limits",
        json={"instances": 3, "cpu": 2, "memory": "4G", "core_hours": 10.5},
        headers=admin_headers,
    )
    assert limits.status_code == 200, limits.text
    assert limits.json()["limits"]["memory"] == 4 * 1024**3
    pushed = await client.post(
        "/api/v1/sites/local/inventory",
        json={
            "mode": "merge",
            "replicas": [{"id": "doi:10.1/x", "path": "x", "verified_at": "2026-11-22T18:00:00Z"}],
        },
        headers=admin_headers,
    )
    assert pushed.status_code == 200, pushed.text


# --- numbers the database cannot hold are a 422, not a 500 -----------------------------


async def test_huge_numbers_are_422_not_500(client, admin_headers):
    assert_422(await client.delete(f"/api/v1/tokens/{HUGE}", headers=admin_headers), "token_id")
    assert_422(
        await client.get("/api/v1/datasets", params={"offset": HUGE}, headers=admin_headers),
        "offset",
    )
    assert_422(
        await client.get(
            "/api/v1/instances/nope/events", params={"after": HUGE}, headers=admin_headers
        ),
        "after",
    )
    assert_422(
        await client.post(
            "/api/v1/datasets", json={"id": "doi:10.1/big", "size": HUGE}, headers=admin_headers
        ),
        "size",
    )


async def test_a_huge_inventory_ttl_is_refused_and_sites_still_list(client, admin_headers):
    pushed = await client.post(
        "/api/v1/sites/local/inventory",
        json={"replicas": [], "ttl": 10**15},
        headers=admin_headers,
    )
    assert_422(pushed, "ttl")
    sites = await client.get("/api/v1/sites", headers=admin_headers)
    assert sites.status_code == 200, sites.text


async def test_router_activity_reports_are_typed(client, settings):
    router = {"Authorization": f"token {router_token(settings.signing_key())}"}
    good = {
        "worker": "w1",
        "activity": {"abc": {"last_request": 1700000000.5, "bytes_in": 10}},
        "stats": {"requests": 3, "buckets": [0] * 14, "latency_sum": 0.5},
    }
    accepted = await client.post("/api/v1/router/activity", json=good, headers=router)
    assert accepted.status_code == 204, accepted.text
    for activity, field in [
        ({"abc": {"bytes_in": "many"}}, "bytes_in"),
        ({"abc": {"last_request": 1e300}}, "last_request"),
        ({"abc": {"colour": 1}}, "colour"),
        ({"abc": []}, "abc"),
    ]:
        refused = await client.post(
            "/api/v1/router/activity",
            json={"worker": "w1", "activity": activity},
            headers=router,
        )
        assert_422(refused, field)


# --- the OpenAPI document describes the errors that are sent -----------------------------


async def test_the_document_has_the_one_error_body(client):
    document = (await client.get("/api/v1/openapi.json")).json()
    schemas = document["components"]["schemas"]
    error = schemas["Error"]
    assert error["required"] == ["error", "detail"]
    assert error["additionalProperties"] is False
    assert {"quota", "scope", "limit", "current", "replicas"} <= set(error["properties"])
    # FastAPI's own 422 shape is not what labgate sends: it is gone.
    assert "HTTPValidationError" not in schemas
    # Every 4xx and 5xx is the Error body, but the two probes' "not ready" answers.
    own_bodies = {("/readyz", "503"), ("/metrics", "503")}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400 and (path, status) not in own_bodies:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, method)


async def test_each_operation_lists_what_it_can_answer(client):
    document = (await client.get("/api/v1/openapi.json")).json()
    paths = document["paths"]

    def statuses(path: str, method: str) -> set[int]:
        return {int(s) for s in paths[path][method]["responses"]}

    # Derived from the route: credentials, scope, CSRF, path, body, parameters.
    assert statuses("/api/v1/auth/session", "get") == {200, 401}
    assert statuses("/api/v1/users", "get") == {200, 401, 403}
    assert statuses("/api/v1/tokens/{token_id}", "delete") == {204, 401, 403, 404, 422}
    assert {400, 401, 403, 413, 422} <= statuses("/api/v1/groups", "post")
    # Declared by the route: what its own code raises.
    assert {401, 429} <= statuses("/api/v1/auth/login", "post")
    assert {404, 409, 429} <= statuses("/api/v1/instances", "post")
    assert {200, 201} <= statuses("/api/v1/groups/{name}/members/{user}", "put")
    assert {201, 400, 401, 403, 409, 422} <= statuses("/api/v1/sites", "post")
    assert {204, 401, 403, 404, 409} <= statuses("/api/v1/sites/{name}", "delete")
    # Every operation that reads credentials says so (a wrong token is always a 401).
    public = {("/api/v1", "get"), ("/readyz", "get"), ("/api/v1/auth/login", "post")}
    for path, operations in paths.items():
        for method in operations:
            if (path, method) not in public:
                assert 401 in statuses(path, method), (path, method)


async def test_a_quota_refusal_matches_the_error_schema(client, admin_headers, make_user):
    alice = await make_user("alice")
    limited = await client.put(
        "/api/v1/users/alice/limits", json={"instances": 0}, headers=admin_headers
    )
    assert limited.status_code == 200, limited.text
    refused = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=alice)
    assert refused.status_code == 429, refused.text
    from labgate.portal.openapi import ErrorOut

    body = ErrorOut.model_validate(refused.json())
    assert (body.error, body.quota, body.scope, body.limit) == (
        "quota_exceeded",
        "instances",
        "user",
        0,
    )


async def test_text_the_database_cannot_store_is_refused_not_500(client, admin_headers):
    """PostgreSQL stores no NUL character: 422 there, taken by SQLite; never a 500."""
    created = await client.post(
        "/api/v1/groups", json={"name": "nul", "description": "a\x00b"}, headers=admin_headers
    )
    assert created.status_code in (201, 422), created.text
    found = await client.get("/api/v1/datasets", params={"q": "a\x00b"}, headers=admin_headers)
    assert found.status_code in (200, 422), found.text
    # A row id beyond the 32-bit id columns is refused before any query.
    assert_422(await client.delete(f"/api/v1/tokens/{2**40}", headers=admin_headers), "token_id")
