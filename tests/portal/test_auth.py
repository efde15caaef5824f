"""Sign-in, sessions, CSRF, tokens and their scopes."""

from __future__ import annotations

import httpx

from helpers import ADMIN_PASSWORD, PASSWORD, post_login_form, token_for
from labgate.security import SESSION_COOKIE


def session_cookie(client: httpx.AsyncClient, value: str | None) -> dict[str, str]:
    """Send exactly this session cookie (and no other) with one request."""
    client.cookies.clear()
    return {"Cookie": f"{SESSION_COOKIE}={value}"}


async def login(client: httpx.AsyncClient, name: str, password: str) -> str:
    response = await client.post(
        "/api/v1/auth/login", json={"username": name, "password": password}
    )
    assert response.status_code == 200, response.text
    return str(response.json()["csrf_token"])


async def test_login_sets_httponly_samesite_cookie(client):
    response = await client.post(
        "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
    )
    assert response.status_code == 200
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie
    me = await client.get("/api/v1/auth/session")
    assert me.json()["user"]["name"] == "admin"
    assert me.json()["via"] == "session"


async def test_wrong_password_and_unknown_user_answer_alike(client):
    wrong = await client.post("/api/v1/auth/login", json={"username": "admin", "password": "nope"})
    nobody = await client.post("/api/v1/auth/login", json={"username": "ghost", "password": "nope"})
    assert wrong.status_code == nobody.status_code == 401
    assert wrong.json() == nobody.json()
    assert wrong.json()["error"] == "invalid_credentials"


async def test_cookie_state_change_needs_csrf_token(client, make_user):
    await make_user("carol")
    csrf = await login(client, "carol", PASSWORD)
    refused = await client.post("/api/v1/tokens", json={"note": "x"})
    assert refused.status_code == 403
    assert refused.json()["error"] == "csrf_failed"
    wrong = await client.post(
        "/api/v1/tokens", json={"note": "x"}, headers={"X-CSRF-Token": "0" * 64}
    )
    assert wrong.status_code == 403
    ok = await client.post("/api/v1/tokens", json={"note": "x"}, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 201


async def test_logout_revokes_the_session_even_with_a_copied_cookie(client, make_user):
    await make_user("dave")
    csrf = await login(client, "dave", PASSWORD)
    stolen = client.cookies.get(SESSION_COOKIE)
    out = await client.post("/api/v1/auth/logout", headers={"X-CSRF-Token": csrf})
    assert out.status_code == 204
    replay = await client.get("/api/v1/auth/session", headers=session_cookie(client, stolen))
    assert replay.status_code == 401


async def test_password_change_keeps_this_session_and_ends_the_others(app, client, make_user):
    from labgate.router.auth import Authenticator, credentials

    erin = await make_user("erin")  # an API token made before the change
    other_csrf = await login(client, "erin", PASSWORD)
    other_cookie = client.cookies.get(SESSION_COOKIE)
    client.cookies.clear()
    csrf = await login(client, "erin", PASSWORD)
    this_cookie = client.cookies.get(SESSION_COOKIE)
    changed = await client.put(
        "/api/v1/users/me/password",
        json={"password": "a-new-password", "current_password": PASSWORD},
        headers={"X-CSRF-Token": csrf},
    )
    assert changed.status_code == 204, changed.text
    renewed = client.cookies.get(SESSION_COOKIE)
    assert renewed and renewed != this_cookie
    # The session that made the change goes on, with the same CSRF token ...
    me = await client.get("/api/v1/auth/session")
    assert me.status_code == 200 and me.json()["csrf_token"] == csrf
    made = await client.post("/api/v1/tokens", json={"note": "x"}, headers={"X-CSRF-Token": csrf})
    assert made.status_code == 201
    # ... every other one ends (its old cookie value too), in the portal and the router.
    for cookie in (other_cookie, this_cookie):
        refused = await client.get("/api/v1/auth/session", headers=session_cookie(client, cookie))
        assert refused.status_code == 401
    assert other_csrf
    router_auth = Authenticator(app.state.portal.routes.table, app.state.portal.signer)
    seen = {
        name: router_auth.identify(credentials(f"{SESSION_COOKIE}={value}".encode(), None))
        for name, value in {"renewed": renewed, "other": other_cookie, "old": this_cookie}.items()
    }
    assert seen["renewed"] is not None and seen["other"] is None and seen["old"] is None
    # API tokens are kept (documented): they are revoked on their own.
    assert (await client.get("/api/v1/users/me", headers=erin)).status_code == 200
    await login(client, "erin", "a-new-password")


async def test_password_change_by_token_ends_every_session(client, make_user):
    fay = await make_user("fay")
    await login(client, "fay", PASSWORD)
    cookie = client.cookies.get(SESSION_COOKIE)
    client.cookies.clear()
    changed = await client.put(
        "/api/v1/users/me/password",
        json={"password": "a-new-password", "current_password": PASSWORD},
        headers=fay,
    )
    assert changed.status_code == 204 and "set-cookie" not in changed.headers
    refused = await client.get("/api/v1/auth/session", headers=session_cookie(client, cookie))
    assert refused.status_code == 401


async def test_own_password_change_needs_current_password(client, make_user):
    frank = await make_user("frank")
    missing = await client.put(
        "/api/v1/users/me/password", json={"password": "xxxxxxxxx1"}, headers=frank
    )
    assert missing.status_code == 403
    wrong = await client.put(
        "/api/v1/users/me/password",
        json={"password": "xxxxxxxxx1", "current_password": "bad"},
        headers=frank,
    )
    assert wrong.status_code == 401


async def test_disabled_user_loses_sessions_and_tokens(client, make_user, admin_headers):
    gina = await make_user("gina")
    await login(client, "gina", PASSWORD)
    cookie = client.cookies.get(SESSION_COOKIE)
    client.cookies.clear()
    r = await client.patch("/api/v1/users/gina", json={"disabled": True}, headers=admin_headers)
    assert r.status_code == 200 and r.json()["disabled"] is True
    assert (await client.get("/api/v1/auth/session", headers=gina)).status_code == 401
    assert (
        await client.get("/api/v1/auth/session", headers=session_cookie(client, cookie))
    ).status_code == 401
    again = await client.post("/api/v1/auth/login", json={"username": "gina", "password": PASSWORD})
    assert again.status_code == 401
    assert again.json()["error"] == "account_disabled"


async def test_token_is_shown_once_and_stored_hashed(app, client, make_user):
    from sqlalchemy import select

    from labgate.db.models import ApiToken

    headers = await make_user("hank")
    token = headers["Authorization"].split()[1]
    listed = (await client.get("/api/v1/tokens", headers=headers)).json()
    assert listed and all("token" not in item for item in listed)
    assert listed[0]["prefix"] == token[:8]
    portal = app.state.portal
    stored = await portal.run_db(lambda s: list(s.scalars(select(ApiToken.token_hash))))
    assert token not in stored


async def test_token_scopes_are_enforced(client, make_user):
    await make_user("ivy")
    read_only = await token_for(client, "ivy", PASSWORD, ["instances:read"])
    assert (await client.get("/api/v1/instances", headers=read_only)).status_code == 200
    launch = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=read_only)
    assert launch.status_code == 403
    assert launch.json()["error"] == "insufficient_scope"


async def test_user_cannot_grant_admin_scope(client, make_user):
    await make_user("jack")
    await login(client, "jack", PASSWORD)
    csrf = (await client.get("/api/v1/auth/session")).json()["csrf_token"]
    r = await client.post(
        "/api/v1/tokens", json={"scopes": ["admin"]}, headers={"X-CSRF-Token": csrf}
    )
    assert r.status_code == 403
    bad = await client.post(
        "/api/v1/tokens", json={"scopes": ["root"]}, headers={"X-CSRF-Token": csrf}
    )
    assert bad.status_code == 400 and bad.json()["error"] == "unknown_scope"


async def test_revoked_and_expired_tokens_stop_working(client, make_user):
    kim = await make_user("kim")
    tokens = (await client.get("/api/v1/tokens", headers=kim)).json()
    r = await client.delete(f"/api/v1/tokens/{tokens[0]['id']}", headers=kim)
    assert r.status_code == 204
    assert (await client.get("/api/v1/instances", headers=kim)).status_code == 401


async def test_expired_token_is_refused(app, client, make_user):
    from datetime import timedelta

    from sqlalchemy import update

    from labgate.db.models import ApiToken, utcnow

    headers = await make_user("lena")
    await app.state.portal.run_db(
        lambda s: s.execute(update(ApiToken).values(expires_at=utcnow() - timedelta(seconds=1)))
    )
    r = await client.get("/api/v1/instances", headers=headers)
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"


async def test_a_token_makes_no_token_outliving_it_or_beyond_its_scopes(client, make_user):
    """A short-lived token cannot mint a permanent one, nor one with more scopes."""
    from datetime import datetime

    forever = await make_user("tara")  # a session made it, without expiry
    login = await client.post("/api/v1/auth/login", json={"username": "tara", "password": PASSWORD})
    csrf = {"X-CSRF-Token": login.json()["csrf_token"]}
    parent = await client.post(
        "/api/v1/tokens",
        json={"scopes": ["account", "instances:read"], "expires_in": 3600},
        headers=csrf,
    )
    assert parent.status_code == 201, parent.text
    client.cookies.clear()
    short = {"Authorization": f"token {parent.json()['token']}"}
    until = datetime.fromisoformat(parent.json()["expires_at"])

    async def mint(headers: dict[str, str], body: dict[str, object]) -> httpx.Response:
        return await client.post("/api/v1/tokens", json=body, headers=headers)

    for body in ({}, {"expires_in": 10 * 365 * 24 * 3600}):
        child = await mint(short, body)
        assert child.status_code == 201, child.text
        assert child.json()["expires_at"] is not None, body
        assert datetime.fromisoformat(child.json()["expires_at"]) <= until, body
        assert child.json()["scopes"] == ["account", "instances:read"]
        # Nor through a grandchild.
        grandchild = await mint({"Authorization": f"token {child.json()['token']}"}, {})
        assert datetime.fromisoformat(grandchild.json()["expires_at"]) <= until
    sooner = await mint(short, {"expires_in": 60})
    assert datetime.fromisoformat(sooner.json()["expires_at"]) < until
    beyond = await mint(short, {"scopes": ["instances:write"]})
    assert beyond.status_code == 403
    # A token that never expires (or a session) may still make one that never expires.
    assert (await mint(forever, {})).json()["expires_at"] is None


async def test_users_cannot_see_each_others_tokens(client, make_user):
    mia = await make_user("mia")
    ned = await make_user("ned")
    mia_token = (await client.get("/api/v1/tokens", headers=mia)).json()[0]
    r = await client.delete(f"/api/v1/tokens/{mia_token['id']}", headers=ned)
    assert r.status_code == 404
    assert (await client.get("/api/v1/tokens?all=true", headers=ned)).status_code == 403


async def test_admin_cannot_remove_last_admin(client, admin_headers):
    r = await client.patch("/api/v1/users/admin", json={"disabled": True}, headers=admin_headers)
    assert r.status_code == 409 and r.json()["error"] == "last_admin"
    r = await client.delete("/api/v1/users/admin", headers=admin_headers)
    assert r.status_code == 409


async def test_a_new_account_never_gets_a_deleted_users_id(app, client, make_user, admin_headers):
    """Whatever still named a deleted user's id must not pass to the next account."""
    from sqlalchemy import select

    from labgate.db.models import User

    async def id_of(name: str) -> int | None:
        return await app.state.portal.run_db(
            lambda s: s.scalar(select(User.id).where(User.name == name))
        )

    await make_user("quinn")
    gone = await id_of("quinn")  # the newest account: SQLite reuses the highest rowid
    r = await client.delete("/api/v1/users/quinn", headers=admin_headers)
    assert r.status_code == 204
    await make_user("rosa")
    rosa = await id_of("rosa")
    assert gone is not None and rosa is not None and rosa > gone


async def test_non_admin_cannot_manage_users(client, make_user):
    olga = await make_user("olga")
    assert (await client.get("/api/v1/users", headers=olga)).status_code == 403
    r = await client.post("/api/v1/users", json={"name": "x1"}, headers=olga)
    assert r.status_code == 403
    assert (await client.get("/api/v1/users/admin", headers=olga)).status_code == 403
    assert (await client.get("/api/v1/users/me", headers=olga)).json()["name"] == "olga"


async def test_generated_password_is_returned_once_and_works(client, admin_headers):
    r = await client.post("/api/v1/users", json={"name": "pat"}, headers=admin_headers)
    assert r.status_code == 201
    password = r.json()["password"]
    assert password
    await login(client, "pat", password)
    shown = await client.get("/api/v1/users/pat", headers=admin_headers)
    assert "password" not in shown.json()
    listed = await client.get("/api/v1/users", headers=admin_headers)
    assert {"admin", "pat"} <= {u["name"] for u in listed.json()}


async def test_html_login_form_redirects_only_to_local_paths(client, make_user):
    await make_user("quinn")
    r = await post_login_form(
        client, {"username": "quinn", "password": PASSWORD, "next": "https://evil.example/"}
    )
    assert r.status_code == 303 and r.headers["location"] == "/"
    client.cookies.clear()
    r = await post_login_form(
        client, {"username": "quinn", "password": PASSWORD, "next": "/i/abc/lab?x=1"}
    )
    assert r.status_code == 303 and r.headers["location"] == "/i/abc/lab?x=1"
    client.cookies.clear()
    bad = await post_login_form(client, {"username": "quinn", "password": "wrong", "next": "/"})
    assert bad.status_code == 401 and "wrong user name or password" in bad.text.lower()


async def test_forty_wrong_passwords_meet_a_429_after_ten(client):
    answers = [
        await client.post("/api/v1/auth/login", json={"username": "admin", "password": "guess"})
        for _ in range(40)
    ]
    codes = [a.status_code for a in answers]
    assert codes[:10] == [401] * 10 and set(codes[10:]) == {429}
    assert int(answers[-1].headers["Retry-After"]) > 0
    assert answers[-1].json()["error"] == "too_many_requests"
