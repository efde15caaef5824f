"""labgate's OpenID Connect provider behind a load balancer: any replica answers for any other.

Two portals on one database, as the replicas of a split deployment are: a
code one gave out is exchanged at the other, an access token one gave out is
answered by the other's ``/oauth/userinfo``, and every rule of a single
portal still holds across the two (single use, PKCE, the first token taken
back when a code is used twice). On SQLite two portals on one file do; with
``LABGATE_TEST_DB_URL`` the same tests run on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet
from oauth_service import (
    CALLBACK,
    SERVICE,
    SERVICE_SECRET,
    code_for,
    instance_client,
    signed_in,
    userinfo,
    with_service,
)

from helpers import PASSWORD, replica
from labgate.config import Settings
from labgate.security import pkce_challenge


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Replica A, with one registered service."""
    return with_service(settings)


@pytest.fixture
async def other(app: Any, settings: Settings, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client of replica B: the same database, keys and services as ``app``, its own data."""
    async with (
        replica(settings.model_copy(update={"data_dir": tmp_path / "var-b"})) as b,
        httpx.AsyncClient(base_url=b.state.test_url, timeout=30) as client,
    ):
        yield client


@pytest.fixture
async def browser(app: Any, make_user: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Alice's browser, signed in to replica A."""
    await make_user("alice")
    alice, _ = await signed_in(app, "alice")
    yield alice
    await alice.aclose()


async def exchange(client: httpx.AsyncClient, code: str, **extra: str) -> httpx.Response:
    """``POST /oauth/token`` as the service (HTTP Basic)."""
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK, **extra}
    return await client.post("/oauth/token", data=form, auth=(SERVICE, SERVICE_SECRET))


def refused_grant(response: httpx.Response) -> bool:
    return response.status_code == 400 and response.json()["error"] == "invalid_grant"


async def test_a_code_from_one_replica_is_exchanged_at_another_and_its_token_good_at_both(
    client: httpx.AsyncClient, other: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    """The service's browser went to replica A, its back channel reaches replica B."""
    verifier = secrets.token_urlsafe(32)
    code = await code_for(
        browser, code_challenge=pkce_challenge(verifier), code_challenge_method="S256", nonce="n1"
    )
    got = await exchange(other, code, code_verifier=verifier)
    assert got.status_code == 200, got.text
    keys = KeySet.import_key_set((await client.get("/oauth/jwks")).json())
    id_token = jwt.decode(got.json()["id_token"], keys, algorithms=["ES256"])
    assert id_token.claims["preferred_username"] == "alice"
    assert id_token.claims["nonce"] == "n1"
    token = got.json()["access_token"]
    for replica_client in (client, other):
        seen = await userinfo(replica_client, token)
        assert seen.status_code == 200, seen.text
        assert seen.json()["preferred_username"] == "alice"


async def test_a_code_is_good_once_across_replicas_and_its_reuse_takes_back_the_first_token(
    client: httpx.AsyncClient, other: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    """A code exchanged at A and again at B: refused, and A's token dies on both replicas."""
    code = await code_for(browser)
    first = await exchange(client, code)
    assert first.status_code == 200, first.text
    token = first.json()["access_token"]
    assert (await userinfo(other, token)).status_code == 200

    again = await exchange(other, code)
    assert refused_grant(again), again.text
    for replica_client in (client, other):
        seen = await userinfo(replica_client, token)
        assert seen.status_code == 401 and seen.json()["error"] == "invalid_token", seen.text


async def test_of_two_exchanges_at_once_on_two_replicas_one_wins_and_its_token_is_taken_back(
    client: httpx.AsyncClient, other: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    """The same code at A and B at the same moment: one token, at once revoked by the other."""
    for _ in range(5):
        code = await code_for(browser)
        answers = await asyncio.gather(exchange(client, code), exchange(other, code))
        assert sorted(a.status_code for a in answers) == [200, 400], [a.text for a in answers]
        (won,) = [a for a in answers if a.status_code == 200]
        assert (await userinfo(other, won.json()["access_token"])).status_code == 401


async def test_pkce_and_the_redirect_uri_bind_a_code_across_replicas(
    client: httpx.AsyncClient, other: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    """At B, a code from A needs A's verifier and redirect URI, and a failed try spends it."""
    verifier = secrets.token_urlsafe(32)
    challenge = {"code_challenge": pkce_challenge(verifier), "code_challenge_method": "S256"}
    code = await code_for(browser, **challenge)
    assert refused_grant(await exchange(other, code, code_verifier="x" * 43))
    assert refused_grant(await exchange(client, code, code_verifier=verifier))

    code = await code_for(browser, **challenge)
    wrong = {"redirect_uri": CALLBACK + "/elsewhere", "code_verifier": verifier}
    assert refused_grant(await exchange(other, code, **wrong))
    assert refused_grant(await exchange(client, code, code_verifier=verifier))


@pytest.mark.parametrize("odd", [{"nonce": "a\x00b"}, {"code_challenge": "c\x00" * 22}])
async def test_what_the_database_cannot_keep_is_an_invalid_request(
    browser: httpx.AsyncClient, odd: dict[str, str]
) -> None:
    """A nonce or challenge PostgreSQL cannot store goes back to the client as an OAuth error."""
    params = {"response_type": "code", "client_id": SERVICE, "redirect_uri": CALLBACK}
    back = await browser.get("/oauth/authorize", params={**params, "scope": "openid", **odd})
    assert back.status_code == 303, back.text
    location = httpx.URL(back.headers["location"])
    assert location.params.get("error") == "invalid_request" and "code" not in location.params


async def test_a_token_one_replica_found_ended_stays_dead_on_every_replica(
    app: Any, client: httpx.AsyncClient, other: httpx.AsyncClient, make_user: Any
) -> None:
    """Bob's token for Alice's tool, refused at B once the share is gone, is not good
    again at A when she shares the instance with him again."""
    alice = await make_user("alice")
    await make_user("bob")
    iid, secret, callback = await instance_client(app, client, alice)
    share = {"user": "bob", "access": "use"}
    shared = await client.post(f"/api/v1/instances/{iid}/shares", json=share, headers=alice)
    assert shared.status_code == 201, shared.text
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=30) as bob_browser:
        login = await bob_browser.post(
            "/api/v1/auth/login", json={"username": "bob", "password": PASSWORD}
        )
        assert login.status_code == 200, login.text
        code = await code_for(bob_browser, iid, callback, consent=True)
    got = await other.post(
        "/oauth/token",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": callback},
        auth=(iid, secret),
    )
    assert got.status_code == 200, got.text
    token = got.json()["access_token"]
    assert (await userinfo(client, token)).status_code == 200

    withdrawn = await client.delete(
        f"/api/v1/instances/{iid}/shares/{shared.json()['id']}", headers=alice
    )
    assert withdrawn.status_code == 204, withdrawn.text
    assert (await userinfo(other, token)).status_code == 401
    again = await client.post(f"/api/v1/instances/{iid}/shares", json=share, headers=alice)
    assert again.status_code == 201, again.text
    assert (await userinfo(client, token)).status_code == 401
    assert (await userinfo(other, token)).status_code == 401
