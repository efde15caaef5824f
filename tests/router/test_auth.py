"""Credentials and access, decided in memory."""

from __future__ import annotations

import time

from labgate.router.auth import (
    Authenticator,
    Identity,
    credentials,
    labgate_token,
    split_cookies,
)
from labgate.security import SESSION_COOKIE, SessionSigner, hash_token
from labgate.wire.routes import Route, RouteTable, TokenInfo, UserInfo

TOKEN = "lg_" + "t" * 43


def make() -> tuple[RouteTable, SessionSigner, Authenticator]:
    table = RouteTable()
    table.set_user(UserInfo(1, "ada"))
    table.set_user(UserInfo(2, "root", is_admin=True))
    table.set_token(hash_token(TOKEN), TokenInfo(1, frozenset({"instances:access"})))
    signer = SessionSigner("key", 60)
    return table, signer, Authenticator(table, signer)


def test_split_cookies() -> None:
    name = SESSION_COOKIE.encode()
    assert split_cookies(None) == ((), None)
    assert split_cookies(b"a=1; b=2") == ((), b"a=1; b=2")
    assert split_cookies(b"a=1; " + name + b"=v1; b=2; " + name + b'="v2"') == (
        ("v1", "v2"),
        b"a=1; b=2",
    )
    assert split_cookies(name + b"=only") == (("only",), None)


def test_labgate_token() -> None:
    assert labgate_token(b"token " + TOKEN.encode()) == TOKEN
    assert labgate_token(b"Bearer  " + TOKEN.encode()) == TOKEN
    assert labgate_token(b"Basic dXNlcjpwYXNz") is None
    assert labgate_token(b"token not-labgate") is None
    assert labgate_token(None) is None


def test_session_and_token_identities() -> None:
    _table, signer, auth = make()
    cookie, session_id = signer.issue(1)
    now = time.time()
    identity = auth.identify(credentials(f"{SESSION_COOKIE}={cookie}".encode(), None), now)
    assert identity is not None and identity.user.name == "ada" and identity.via == "session"
    assert identity.head_line == b"X-Labgate-User: ada\r\n"
    identity = auth.identify(credentials(None, f"token {TOKEN}".encode()), now)
    assert identity is not None and identity.via == "token"
    # Expired by age.
    assert (
        auth.identify(credentials(f"{SESSION_COOKIE}={cookie}".encode(), None), now + 120) is None
    )
    # The cookie twice (another host may have tossed one in): no session, whichever is good.
    twice = f"{SESSION_COOKIE}=junk; {SESSION_COOKIE}={cookie}".encode()
    assert auth.identify(credentials(twice, None), now) is None
    # A wrong labgate token is final even with a good cookie.
    both = credentials(f"{SESSION_COOKIE}={cookie}".encode(), b"token lg_wrong")
    assert auth.identify(both, now) is None
    assert session_id


def test_decision_cache_follows_the_table() -> None:
    table, signer, auth = make()
    cookie, session_id = signer.issue(1)
    header = f"{SESSION_COOKIE}={cookie}".encode()
    now = time.time()
    assert auth.check(header, None, now)[0] is not None
    assert auth.check(header, None, now)[0] is not None  # cached
    table.revoke_session(session_id, now + 60)
    assert auth.check(header, None, now)[0] is None
    assert auth.check(header, None, now + 3600)[0] is None


def test_access() -> None:
    _table, signer, auth = make()
    route = Route("r", "unix:/r", owner_id=1, access=frozenset({3}))
    ada = auth.identify(credentials(None, f"token {TOKEN}".encode()))
    root_cookie, _ = signer.issue(2)
    root = auth.identify(credentials(f"{SESSION_COOKIE}={root_cookie}".encode(), None))
    assert ada is not None and root is not None
    assert auth.may_access(ada, route)
    # An admin's portal session is for their own instances only (/i/ is the portal's origin).
    assert not auth.may_access(root, route)
    root_token = Identity(root.user, "token")
    assert auth.may_access(root_token, route)
    other = Route("s", "unix:/s", owner_id=2)
    assert not auth.may_access(ada, other)


def test_unicode_user_names_are_header_safe() -> None:
    table, _signer, auth = make()
    table.set_user(UserInfo(1, "Zoë\r\nX-Evil: 1"))
    identity = auth.identify(credentials(None, f"token {TOKEN}".encode()))
    assert identity is not None
    assert b"\r" not in identity.head_line[:-2] and b"\n" not in identity.head_line[:-2]
