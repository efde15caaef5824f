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

from helpers import answer, consent_form, wait_for_state
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
            client, iid, secret, await code_for(bob_browser, iid, callback, consent=True), callback
        )
        pending = await code_for(bob_browser, iid, callback, consent=True)
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
            client, iid, secret, await code_for(bob_browser, iid, callback, consent=True), callback
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


def authorize_params(client_id: str, redirect_uri: str) -> dict[str, str]:
    """An authorization request of a tool, as its sign-in library sends it."""
    return {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": "openid",
        "state": "st&te<x>",
        "nonce": "n1",
    }


async def grants_of(app: Any, user: str) -> int:
    """How many codes and tokens the provider holds for ``user``."""
    from sqlalchemy import func, select

    from labgate.db.models import OAuthGrant, User

    def count(session: Any) -> int:
        user_id = session.scalar(select(User.id).where(User.name == user))
        where = OAuthGrant.user_id == user_id
        return int(session.scalar(select(func.count()).select_from(OAuthGrant).where(where)))

    return int(await app.state.portal.run_db(count))


async def test_someone_elses_tool_asks_before_it_learns_who_they_are(
    app: Any, client: httpx.AsyncClient, make_user: Any, admin_headers: dict[str, str]
) -> None:
    """Bob (shared) and an admin at Alice's tool see whose it is and what it would learn,
    and it gets a code only once they allow; Deny sends it ``access_denied`` and no code.
    Alice, at her own tool, is not asked."""
    alice = await make_user("alice")
    await make_user("bob")
    await make_user("root2", is_admin=True)
    for made in (
        await client.post("/api/v1/groups", json={"name": "physics"}, headers=admin_headers),
        await client.put("/api/v1/groups/physics/members/bob", headers=admin_headers),
    ):
        assert made.status_code in (200, 201, 204), made.text
    iid, secret, callback = await instance_client(app, client, alice)
    shared = await client.post(
        f"/api/v1/instances/{iid}/shares", json={"user": "bob", "access": "use"}, headers=alice
    )
    assert shared.status_code == 201, shared.text
    params = authorize_params(iid, callback)
    browsers = {name: (await signed_in(app, name))[0] for name in ("alice", "bob", "root2")}
    try:
        bob = browsers["bob"]
        page = await bob.get("/oauth/authorize", params=params)
        assert page.status_code == 200, page.text
        assert page.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"
        assert '<strong id="consent-owner">alice</strong>' in page.text
        assert "demo" in page.text and iid in page.text and "physics" in page.text
        assert await grants_of(app, "bob") == 0  # nothing issued while he is asked
        form = consent_form(page)
        assert {k: form[k] for k in params} == params  # carried through as sent

        denied = await answer(bob, page, "deny")
        assert denied.status_code == 303, denied.text
        back = httpx.URL(denied.headers["location"])
        assert str(back).startswith(callback)
        assert back.params["error"] == "access_denied" and back.params["state"] == params["state"]
        assert "code" not in back.params
        assert await grants_of(app, "bob") == 0

        allowed = await answer(bob, page, "allow")
        assert allowed.status_code == 303, allowed.text
        code = httpx.URL(allowed.headers["location"]).params["code"]
        token = await access_token(client, iid, secret, code, callback)
        seen = await userinfo(client, token)
        assert seen.json()["preferred_username"] == "bob" and seen.json()["groups"] == ["physics"]

        asked = await browsers["root2"].get("/oauth/authorize", params=params)
        assert asked.status_code == 200 and 'id="consent-heading"' in asked.text
        own = await browsers["alice"].get("/oauth/authorize", params=params)
        assert own.status_code == 303 and "code" in httpx.URL(own.headers["location"]).params
    finally:
        for browser in browsers.values():
            await browser.aclose()


async def test_an_answer_counts_only_from_labgates_page_and_for_whom_it_may(
    app: Any, client: httpx.AsyncClient, make_user: Any
) -> None:
    """A tool cannot answer for its visitor: an Allow without the page's CSRF token is
    refused; an Allow for a tool Carol may not use, or back to another address, gets no code."""
    alice = await make_user("alice")
    await make_user("bob")
    await make_user("carol")
    iid, _secret, callback = await instance_client(app, client, alice)
    shared = await client.post(
        f"/api/v1/instances/{iid}/shares", json={"user": "bob", "access": "use"}, headers=alice
    )
    assert shared.status_code == 201, shared.text
    params = authorize_params(iid, callback)
    bob, _ = await signed_in(app, "bob")
    carol, _ = await signed_in(app, "carol")
    try:
        page = await bob.get("/oauth/authorize", params=params)
        form = {**consent_form(page), "decision": "allow"}
        forged = {k: v for k, v in form.items() if k != "csrf_token"}
        assert "csrf_token" in form
        refused = await bob.post("/oauth/authorize", data=forged)
        assert refused.status_code == 403, refused.text
        # The page's token is Bob's session's: posted from another session it counts for nothing.
        stolen = await carol.post("/oauth/authorize", data=form)
        assert stolen.status_code == 403, stolen.text
        elsewhere = await bob.post(
            "/oauth/authorize", data={**form, "redirect_uri": f"{callback}/../../x"}
        )
        assert elsewhere.status_code == 400 and "location" not in elsewhere.headers
        hers = await carol.get("/oauth/authorize", params=params)
        assert hers.status_code == 404
        assert await grants_of(app, "bob") == 0 and await grants_of(app, "carol") == 0
        nonsense = await bob.post("/oauth/authorize", data={**form, "decision": "maybe"})
        assert nonsense.status_code == 400 and "location" not in nonsense.headers
    finally:
        await bob.aclose()
        await carol.aclose()


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
