"""labgate's own OpenID Connect provider: no code or access token outlives the grant behind it.

The attackers: a user with a shell in an instance (who holds its client
secret, and sees the codes and tokens of everyone who visits its tool), a
user it was shared with, and anyone a token leaked to. A code or access
token is worth what the person's sign-in and access are worth now: signing
out, ending the sessions, withdrawing a share or stopping the instance ends
it, and a code used twice takes back its token.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
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

from helpers import wait_for_state
from labgate.config import Settings


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The test portal, with one registered service besides the instances' clients."""
    return with_service(settings)


async def exchange(
    client: httpx.AsyncClient, client_id: str, secret: str, code: str, redirect_uri: str
) -> httpx.Response:
    """``POST /oauth/token`` as the client (HTTP Basic)."""
    return await client.post(
        "/oauth/token",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri},
        auth=(client_id, secret),
    )


async def access_token(
    client: httpx.AsyncClient, client_id: str, secret: str, code: str, redirect_uri: str
) -> str:
    """The access token a code is exchanged for."""
    got = await exchange(client, client_id, secret, code, redirect_uri)
    assert got.status_code == 200, got.text
    return str(got.json()["access_token"])


def assert_refused(response: httpx.Response) -> None:
    """401 ``invalid_token`` in the JSON shape of the OAuth spec, with its challenge."""
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "invalid_token"
    assert response.json()["error_description"]
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_signing_out_ends_every_code_and_token_the_provider_issued(
    app: Any, client: httpx.AsyncClient, make_user: Any
) -> None:
    """A token taken from a service (its logs, a tool it ran) is dead once its user signs out."""
    await make_user("alice")
    browser, csrf = await signed_in(app, "alice")
    try:
        token = await access_token(
            client, SERVICE, SERVICE_SECRET, await code_for(browser, SERVICE, CALLBACK), CALLBACK
        )
        pending = await code_for(browser, SERVICE, CALLBACK)
        seen = await userinfo(client, token)
        assert seen.status_code == 200 and seen.json()["preferred_username"] == "alice"

        signed_out = await browser.post("/api/v1/auth/logout", headers=csrf)
        assert signed_out.status_code == 204, signed_out.text
        assert_refused(await userinfo(client, token))
        late = await exchange(client, SERVICE, SERVICE_SECRET, pending, CALLBACK)
        assert late.status_code == 400 and late.json()["error"] == "invalid_grant", late.text
    finally:
        await browser.aclose()


async def test_ending_a_users_sessions_ends_the_providers_tokens(
    app: Any, client: httpx.AsyncClient, make_user: Any, admin_headers: dict[str, str]
) -> None:
    """A password reset (every session ended) ends the tokens issued in those sessions too."""
    await make_user("alice")
    browser, _ = await signed_in(app, "alice")
    try:
        token = await access_token(
            client, SERVICE, SERVICE_SECRET, await code_for(browser, SERVICE, CALLBACK), CALLBACK
        )
        assert (await userinfo(client, token)).status_code == 200
        reset = await client.put(
            "/api/v1/users/alice/password",
            json={"password": "a-new-password-456"},
            headers=admin_headers,
        )
        assert reset.status_code == 204, reset.text
        assert_refused(await userinfo(client, token))
    finally:
        await browser.aclose()


async def test_an_instance_clients_token_ends_with_the_visitors_access_and_the_instance(
    app: Any, client: httpx.AsyncClient, make_user: Any
) -> None:
    """Alice's tool (her shell) keeps the tokens of those who visited it: they die with the
    share she withdraws and with the instance she stops, codes still unexchanged included."""
    alice = await make_user("alice")
    await make_user("bob")
    iid, secret, callback = await instance_client(app, client, alice)
    bob_browser, _ = await signed_in(app, "bob")
    alice_browser, _ = await signed_in(app, "alice")
    try:
        shared = await client.post(
            f"/api/v1/instances/{iid}/shares", json={"user": "bob", "access": "use"}, headers=alice
        )
        assert shared.status_code == 201, shared.text
        bobs = await access_token(
            client, iid, secret, await code_for(bob_browser, iid, callback), callback
        )
        pending = await code_for(bob_browser, iid, callback)
        seen = await userinfo(client, bobs)
        assert seen.status_code == 200 and seen.json()["preferred_username"] == "bob"

        withdrawn = await client.delete(
            f"/api/v1/instances/{iid}/shares/{shared.json()['id']}", headers=alice
        )
        assert withdrawn.status_code == 204, withdrawn.text
        assert_refused(await userinfo(client, bobs))
        late = await exchange(client, iid, secret, pending, callback)
        assert late.status_code == 400 and late.json()["error"] == "invalid_grant", late.text
        # Shared again: the old token stays dead; a new sign-in gives a new one.
        again = await client.post(
            f"/api/v1/instances/{iid}/shares", json={"user": "bob", "access": "use"}, headers=alice
        )
        assert again.status_code == 201, again.text
        assert_refused(await userinfo(client, bobs))
        bobs = await access_token(
            client, iid, secret, await code_for(bob_browser, iid, callback), callback
        )
        alices = await access_token(
            client, iid, secret, await code_for(alice_browser, iid, callback), callback
        )
        assert (await userinfo(client, bobs)).status_code == 200
        assert (await userinfo(client, alices)).status_code == 200

        stopped = await client.delete(f"/api/v1/instances/{iid}", headers=alice)
        assert stopped.status_code == 202, stopped.text
        await wait_for_state(client, alice, iid, {"stopped"})
        assert_refused(await userinfo(client, bobs))
        assert_refused(await userinfo(client, alices))
    finally:
        await bob_browser.aclose()
        await alice_browser.aclose()


async def test_a_code_used_twice_takes_back_the_token_it_gave(
    app: Any, client: httpx.AsyncClient, make_user: Any
) -> None:
    """Whoever exchanged a leaked code first (the client's secret in hand), the client's own
    exchange of it then is refused and revokes that token (RFC 6749 section 4.1.2)."""
    await make_user("alice")
    browser, _ = await signed_in(app, "alice")
    try:
        code = await code_for(browser, SERVICE, CALLBACK)
        taken = await access_token(client, SERVICE, SERVICE_SECRET, code, CALLBACK)
        assert (await userinfo(client, taken)).status_code == 200
        second = await exchange(client, SERVICE, SERVICE_SECRET, code, CALLBACK)
        assert second.status_code == 400 and second.json()["error"] == "invalid_grant"
        assert_refused(await userinfo(client, taken))
    finally:
        await browser.aclose()
