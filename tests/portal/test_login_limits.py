"""Sign-in rate limits: per account and address, per account, per address; bounded hashing.

The portal here is served by uvicorn directly, which believes ``X-Forwarded-For``
from 127.0.0.1 (its default, as `labgate serve` believes the router): the tests
use it to sign in "from" several client addresses.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest

from helpers import PASSWORD, login_form_token
from labgate.config import Settings

LOGIN = "/api/v1/auth/login"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Small limits, so each one is reached in a few tries; one hashing thread."""
    return settings.model_copy(
        update={
            "login_limit_account_address": "3/minute",
            "login_limit_account": "5/minute",
            "login_limit_address": "7/minute",
            "password_hash_workers": 1,
        }
    )


async def attempt(
    client: httpx.AsyncClient, name: str, password: str, address: str
) -> httpx.Response:
    return await client.post(
        LOGIN,
        json={"username": name, "password": password},
        headers={"X-Forwarded-For": address},
    )


async def test_one_address_guessing_one_account_is_stopped_but_not_the_owner(client, make_user):
    await make_user("ada")
    for _ in range(3):
        assert (await attempt(client, "ada", "wrong-guess", "10.0.0.1")).status_code == 401
    over = await attempt(client, "ada", PASSWORD, "10.0.0.1")
    assert over.status_code == 429
    assert over.json()["error"] == "too_many_requests"
    assert "too many failed sign-ins" in over.json()["detail"]
    assert 1 <= int(over.headers["Retry-After"]) <= 60
    # The owner, elsewhere, signs in as usual.
    assert (await attempt(client, "ada", PASSWORD, "10.0.0.2")).status_code == 200


async def test_a_success_starts_the_count_again_for_that_address(client, make_user):
    await make_user("bo")
    for _ in range(2):
        for _ in range(2):
            assert (await attempt(client, "bo", "typo-typo", "10.0.1.1")).status_code == 401
        assert (await attempt(client, "bo", PASSWORD, "10.0.1.1")).status_code == 200


async def test_guesses_spread_over_addresses_hit_the_account_limit(client, make_user):
    await make_user("cleo")
    for n in range(5):
        assert (await attempt(client, "cleo", "wrong-guess", f"10.0.2.{n}")).status_code == 401
    # The trade-off: past the looser per-account limit nobody signs in with a
    # password for a while, the owner included (tokens and sessions go on).
    assert (await attempt(client, "cleo", PASSWORD, "10.0.2.99")).status_code == 429


async def test_one_address_trying_many_accounts_hits_the_address_limit(client, make_user):
    await make_user("dov")
    for n in range(7):
        assert (await attempt(client, f"user{n}", "password-1", "10.0.3.1")).status_code == 401
    assert (await attempt(client, "dov", PASSWORD, "10.0.3.1")).status_code == 429
    assert (await attempt(client, "dov", PASSWORD, "10.0.3.2")).status_code == 200


async def test_the_sign_in_form_over_the_limit_says_so_plainly(client, make_user):
    await make_user("eda")
    headers = {"X-Forwarded-For": "10.0.4.1", "Accept": "text/html"}
    form = await client.get("/login", headers=headers)
    token = login_form_token(form.text)
    for expected in (401, 401, 401, 429):
        page = await client.post(
            "/login",
            data={"username": "eda", "password": "wrong-guess", "login_token": token},
            headers=headers,
        )
        assert page.status_code == expected
    assert page.headers["content-type"].startswith("text/html")
    assert "Too many failed sign-ins; try again in" in page.text
    assert int(page.headers["Retry-After"]) >= 1


async def test_a_login_flood_waits_for_the_hashing_thread_not_other_work(
    app: Any, client, make_user, real_password_hashes
):
    """30 sign-ins at once queue for the one hashing thread; an API call meanwhile does not."""
    headers = await make_user("fitz")
    flood = [
        asyncio.create_task(attempt(client, f"nobody{n}", "wrong-guess", f"10.1.{n}.1"))
        for n in range(30)
    ]
    await asyncio.sleep(0.2)  # the flood is queued
    answer = await client.get("/api/v1/instances", headers=headers)
    pending = sum(not task.done() for task in flood)
    hashers = [t for t in threading.enumerate() if t.name.startswith("labgate-password")]
    results = await asyncio.gather(*flood)
    assert answer.status_code == 200
    # Hashing on the shared default pool, the API call would wait behind the flood.
    assert pending >= 15, f"only {pending} of 30 sign-ins were still waiting"
    assert len(hashers) == app.state.portal.passwords.size == 1
    assert {r.status_code for r in results} <= {401, 429}
