"""API and OAuth answers are ``Cache-Control: no-store`` unless they choose otherwise.

Answers of ``/api/`` and ``/oauth/`` carry secrets (a new API token, the
session's CSRF token, OAuth tokens) or someone's own data; RFC 6749 asks
``no-store`` of every answer with a credential, and without it a shared proxy
or a browser's disk cache may keep them. ``NoStoreMiddleware`` adds the
header to the start of the answer only, so streamed answers (events, the
route stream, downloads) still stream.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from helpers import PASSWORD
from labgate.portal.apidocs import ASSETS_PATH, version
from labgate.portal.hsts import NoStoreMiddleware


def cache_controls(answer: httpx.Response) -> list[str]:
    return answer.headers.get_list("cache-control")


async def test_answers_with_a_secret_are_no_store(
    client: httpx.AsyncClient, make_user: Any
) -> None:
    await make_user("cass")
    login = await client.post("/api/v1/auth/login", json={"username": "cass", "password": PASSWORD})
    assert login.status_code == 200 and login.json()["csrf_token"]
    made = await client.post(
        "/api/v1/tokens",
        json={"note": "x"},
        headers={"X-CSRF-Token": login.json()["csrf_token"]},
    )
    assert made.status_code == 201 and made.json()["token"].startswith("lg_")
    listed = await client.get("/api/v1/tokens")
    refused = await client.post("/api/v1/auth/login", json={"username": "cass", "password": "x"})
    assert refused.status_code == 401
    client.cookies.clear()
    anonymous = await client.get("/api/v1/tokens")
    assert anonymous.status_code == 401
    oauth = await client.post("/oauth/token", data={"grant_type": "authorization_code"})
    assert oauth.status_code >= 400
    for name, answer in (
        ("login", login),
        ("new token", made),
        ("token list", listed),
        ("failed login", refused),
        ("unauthenticated", anonymous),
        ("oauth token error", oauth),
    ):
        assert cache_controls(answer) == ["no-store"], (name, answer.headers)


async def test_answers_that_choose_their_caching_keep_it(
    client: httpx.AsyncClient, make_user: Any
) -> None:
    """An endpoint's own Cache-Control stands; pages outside the API keep theirs."""
    asset = await client.get(f"{ASSETS_PATH}/start.js", params={"v": version()})
    assert asset.status_code == 200
    assert cache_controls(asset) == ["public, max-age=31536000, immutable"]
    page = await client.get("/login", headers={"Accept": "text/html"})
    assert cache_controls(page) == ["no-store"]
    # Server-sent events keep no-cache, and still stream (read before the stream ends).
    alice = await make_user("alice")
    launched = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=alice)
    assert launched.status_code == 202, launched.text
    events = f"/api/v1/instances/{launched.json()['id']}/events"
    async with client.stream("GET", events, headers=alice) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert cache_controls(stream) == ["no-cache"]
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                break  # the first event arrived while the instance still runs
    stopped = await client.delete(f"/api/v1/instances/{launched.json()['id']}", headers=alice)
    assert stopped.status_code == 202


async def test_the_middleware_passes_a_streamed_answer_through_unbuffered() -> None:
    """Each piece reaches the client before the app writes the next: nothing is held."""
    sent: list[dict[str, Any]] = []
    first_piece_out = asyncio.Event()

    async def streaming_app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"one", "more_body": True})
        await asyncio.wait_for(first_piece_out.wait(), 5)  # would hang if buffered
        await send({"type": "http.response.body", "body": b"two", "more_body": False})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message.get("body") == b"one":
            first_piece_out.set()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    middleware = NoStoreMiddleware(streaming_app)
    await middleware({"type": "http", "path": "/api/v1/instances/x/events"}, receive, send)
    assert [m.get("body") for m in sent] == [None, b"one", b"two"]
    assert (b"cache-control", b"no-store") in sent[0]["headers"]

    # Outside /api/ and /oauth/, and for an answer with its own Cache-Control: untouched.
    for path, headers in (
        ("/instances", []),
        ("/api/v1/x", [(b"Cache-Control", b"no-cache")]),
    ):
        sent.clear()

        async def app(scope: Any, receive: Any, send: Any, headers: Any = headers) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        await NoStoreMiddleware(app)({"type": "http", "path": path}, receive, send)
        assert sent[0]["headers"] == headers, path
