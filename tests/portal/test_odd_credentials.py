"""A credential holding characters no real one has is a wrong credential: 401 or 403, never a 500.

``hmac.compare_digest`` raises on non-ASCII text, and text decoded from a
request can hold anything (headers are Latin-1, JSON may carry lone
surrogates), so every secret a caller sends is compared as bytes
(:func:`labgate.security.same`).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from helpers import PASSWORD
from labgate.security import ROUTER_TOKEN_PREFIX, same

ODD = ["é", "lgr_\xff", "token \x85", "\u00e9\u00e8" * 40]


def test_same_compares_any_text_in_constant_time() -> None:
    assert same("abc", "abc")
    assert same(b"abc", "abc")
    assert not same("é", "e")
    assert not same("\ud800", "x")  # a lone surrogate, as JSON can carry
    assert same("\ud800", "\ud800")


@pytest.mark.parametrize("odd", ODD)
async def test_odd_bearer_credentials_are_refused_not_errors(
    client: httpx.AsyncClient, odd: str
) -> None:
    for scheme in ("Bearer", "token"):
        value = f"{scheme} {odd}".encode("latin-1")
        for method, path in (
            ("GET", "/metrics"),
            ("GET", "/api/v1/router/stream"),
            ("POST", "/api/v1/tasks/a1/state"),
            ("POST", "/api/v1/instances/i1/activity"),
            ("GET", "/api/v1/instances"),
        ):
            answer = await client.request(method, path, headers={b"Authorization": value})
            assert answer.status_code in (401, 403), (method, path, value, answer.text)
            assert answer.json()["error"]


async def test_a_router_token_with_odd_characters_is_refused(client: httpx.AsyncClient) -> None:
    value = f"token {ROUTER_TOKEN_PREFIX}\xe9\xe9".encode("latin-1")
    answer = await client.get("/api/v1/router/stream", headers={b"Authorization": value})
    assert answer.status_code in (401, 403)


async def test_an_odd_csrf_token_is_refused(client: httpx.AsyncClient, make_user: Any) -> None:
    await make_user("olga")
    signed_in = await client.post(
        "/api/v1/auth/login", json={"username": "olga", "password": PASSWORD}
    )
    assert signed_in.status_code == 200
    refused = await client.post(
        "/api/v1/tokens", json={"note": "x"}, headers={b"X-CSRF-Token": "\xe9".encode("latin-1")}
    )
    assert refused.status_code == 403
    assert refused.json()["error"] == "csrf_failed"
