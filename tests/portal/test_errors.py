"""Bad input gets a 4xx in the one JSON error shape, never a 500 or a traceback."""

from __future__ import annotations

import pytest


def assert_error(response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "detail"}
    assert "Traceback" not in response.text
    if code is not None:
        assert body["error"] == code


async def test_missing_auth_is_401_json(client):
    assert_error(await client.get("/api/v1/instances"), 401, "unauthorized")
    assert_error(
        await client.get("/api/v1/instances", headers={"Authorization": "token nope"}),
        401,
        "invalid_token",
    )


async def test_malformed_json_is_400(client, admin_headers):
    r = await client.post(
        "/api/v1/instances",
        content=b'{"tool": "demo",',
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    assert_error(r, 400, "invalid_json")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"tool": 5},
        {"tool": "demo", "resources": "lots"},
        {"tool": "demo", "colour": "blue"},
        [1, 2, 3],
    ],
)
async def test_wrong_shapes_are_422(client, admin_headers, body):
    r = await client.post("/api/v1/instances", json=body, headers=admin_headers)
    assert_error(r, 422, "validation_error")


@pytest.mark.parametrize(
    ("resources", "fragment"),
    [
        ({"cpu": 1000}, "at most"),
        ({"cpu": -1}, "positive"),
        # Below a container engine's resolution its limit would be none at all.
        ({"cpu": 1e-10}, "at least 0.01"),
        ({"memory": "1"}, "at least 16 MiB"),
        ({"memory": "lots"}, "memory"),
        ({"memory": "900G"}, " GiB of memory, asked for 900 GiB"),  # sizes as people write them
        ({"gpus": 1}, "unknown resources"),
    ],
)
async def test_bad_resources_are_400(client, admin_headers, resources, fragment):
    r = await client.post(
        "/api/v1/instances", json={"tool": "demo", "resources": resources}, headers=admin_headers
    )
    assert_error(r, 400)
    assert fragment in r.json()["detail"]


async def test_unknown_tool_and_ids_are_404(client, admin_headers):
    assert_error(
        await client.post("/api/v1/instances", json={"tool": "nope"}, headers=admin_headers),
        404,
        "unknown_tool",
    )
    assert_error(await client.get("/api/v1/instances/zzz", headers=admin_headers), 404)
    assert_error(await client.delete("/api/v1/instances/zzz", headers=admin_headers), 404)
    assert_error(await client.get("/api/v1/instances/zzz/logs", headers=admin_headers), 404)
    assert_error(await client.get("/api/v1/instances/zzz/events", headers=admin_headers), 404)
    assert_error(await client.get("/api/v1/users/nobody", headers=admin_headers), 404)
    assert_error(await client.get("/api/v1/tools/nope", headers=admin_headers), 404)
    assert_error(await client.delete("/api/v1/tokens/not-a-number", headers=admin_headers), 422)


async def test_unknown_route_and_method_are_json(client, admin_headers):
    assert_error(await client.get("/api/v1/nothing-here", headers=admin_headers), 404, "not_found")
    assert_error(
        await client.put("/api/v1/tools", headers=admin_headers), 405, "method_not_allowed"
    )


async def test_oversize_body_is_413(client, admin_headers, settings):
    big = b'{"tool": "' + b"a" * (settings.max_request_body + 10) + b'"}'
    r = await client.post(
        "/api/v1/instances",
        content=big,
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    assert_error(r, 413, "payload_too_large")


async def test_streamed_oversize_body_is_413(client, admin_headers, settings):
    async def chunks():
        for _ in range(settings.max_request_body // 1024 + 5):
            yield b"x" * 1024

    r = await client.post(
        "/api/v1/instances",
        content=chunks(),
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    assert_error(r, 413, "payload_too_large")


async def test_openapi_is_published(client):
    r = await client.get("/api/v1/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for path in ("/api/v1/instances", "/api/v1/instances/{instance_id}/events", "/api/v1/tokens"):
        assert path in paths


async def test_bad_user_names_are_refused(client, admin_headers):
    for name in ("Admin", "a b", "", "x" * 40, "../x"):
        r = await client.post("/api/v1/users", json={"name": name}, headers=admin_headers)
        assert_error(r, 422)
    r = await client.post("/api/v1/users", json={"name": "admin"}, headers=admin_headers)
    assert_error(r, 409, "user_exists")


async def test_an_over_long_text_is_described_in_characters(client, admin_headers):
    """A length limit on an optional checked text (``LineText | None``) said "Value should
    have at most 500 items after validation"."""
    patch = await client.patch(
        "/api/v1/datasets/doi:10.1234/x", json={"title": "t" * 501}, headers=admin_headers
    )
    assert_error(patch, 422, "validation_error")
    detail = patch.json()["detail"]
    assert detail == "title: Text should have at most 500 characters, not 501", detail
