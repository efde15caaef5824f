"""The router's side of the hand-off that gives a browser an instance cookie.

With ``instance_host`` set, the portal's session cookie never reaches an
instance's host (it is host-only on the portal's host), so a browser there
has no labgate credentials at first. The hand-off, an OAuth2 authorization
code flow with PKCE in which labgate's portal is the provider:

1. A browser without a valid instance cookie asks for a page: the router
   answers 302 to the portal's ``/oauth/authorize`` (client id = the
   instance id, ``redirect_uri`` = ``<instance URL>/_labgate/callback``,
   ``state``, an S256 ``code_challenge``) and sets a short-lived hand-off
   cookie on the instance host holding ``state``, the PKCE verifier and the
   page asked for (signed; path ``/_labgate/``).
2. The portal signs the person in if needed, checks they may use the
   instance (owner, ``use`` share, admin), and sends them back with a
   signed one-time code naming the instance, its host, the user, their
   portal session and the challenge.
3. :func:`finish` checks the code (signature, 60 s, this instance and host,
   the challenge against the verifier, never used before here), the
   ``state``, and the access list, then sets the instance cookie (host-only,
   HttpOnly, SameSite=Lax, Secure on https; named ``__Host-labgate-instance``
   when cookies are Secure) and sends the browser to the page it first asked
   for.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import parse_qs, urlencode

from labgate.router import pages
from labgate.router.auth import Authenticator
from labgate.router.hosts import InstanceHosts
from labgate.security import (
    HANDOFF_COOKIE,
    HANDOFF_STATE_SECONDS,
    pkce_challenge,
)
from labgate.wire.routes import Route

_HANDOFF = HANDOFF_COOKIE.encode()
_COOKIE_PATH = "/_labgate/"
_LONGEST_TARGET = 1024
FAILED = (
    "This sign-in hand-off is not valid: it expired, was already used, or was made for "
    "another instance or browser. Open the instance again from labgate."
)


class Redirect(NamedTuple):
    """Where the callback sends the browser, and the cookies it sets."""

    location: bytes
    cookies: tuple[bytes, ...]


def _attributes(secure: bool) -> str:
    return "; HttpOnly; SameSite=Lax" + ("; Secure" if secure else "")


def start(
    auth: Authenticator,
    hosts: InstanceHosts,
    portal_url: str,
    instance_id: str,
    target: bytes,
    *,
    secure: bool,
    close: bool,
) -> bytes:
    """The 302 to the portal's authorize endpoint, with the hand-off cookie."""
    # The page to come back to travels in the cookie: a long one would not fit in it.
    back = target.decode("latin-1") if len(target) <= _LONGEST_TARGET else "/"
    value, state = auth.grants.issue_state(instance_id, back)
    query = urlencode(
        {
            "response_type": "code",
            "client_id": instance_id,
            "redirect_uri": hosts.callback(instance_id),
            "scope": "openid",
            "state": state.state,
            "code_challenge": pkce_challenge(state.verifier),
            "code_challenge_method": "S256",
        }
    )
    location = f"{portal_url}/oauth/authorize?{query}".encode("latin-1")
    cookie = (
        f"{HANDOFF_COOKIE}={value}; Path={_COOKIE_PATH}; Max-Age={HANDOFF_STATE_SECONDS}"
        + _attributes(secure)
    )
    return pages.redirect(location, 302, close=close, cookies=(cookie.encode("latin-1"),))


def _handoff_values(cookie: bytes | None) -> list[str]:
    if not cookie or _HANDOFF not in cookie:
        return []
    values = []
    for part in cookie.split(b";"):
        name, sep, value = part.strip().partition(b"=")
        if sep and name == _HANDOFF:
            values.append(value.strip(b'"').decode("latin-1"))
    return values


def finish(
    auth: Authenticator,
    hosts: InstanceHosts,
    route: Route,
    target: bytes,
    cookie: bytes | None,
    now: float,
    *,
    secure: bool,
) -> Redirect | tuple[int, str]:
    """The callback: a redirect that sets the instance cookie, or ``(status, detail)``."""
    instance_id = route.instance_id
    query = target.partition(b"?")[2].decode("latin-1")
    params = {name: values[0] for name, values in parse_qs(query).items() if values}
    if "error" in params:
        return 403, "labgate did not let this browser in to the instance; sign in and try again"
    code, state_param = params.get("code", ""), params.get("state", "")
    if not code or not state_param:
        return 400, FAILED
    state = None
    for value in _handoff_values(cookie):
        found = auth.grants.check_state(value)
        if found is not None and found.instance_id == instance_id and found.state == state_param:
            state = found
            break
    if state is None:
        return 400, FAILED
    netloc = hosts.netloc(instance_id)
    grant = auth.redeem(code, instance_id, netloc, state.verifier, now)
    if grant is None:
        return 400, FAILED
    user = auth.table.users.get(grant.user_id)
    if user is None or not (user.is_admin or route.allows(user.id)):
        return 404, f"there is no instance {instance_id!r} of yours here"
    value = auth.grants.issue_cookie(instance_id, netloc, grant.user_id, grant.session_id)
    name = auth.instance_cookie
    # A __Host- cookie is taken only with Secure (and Path=/, no Domain).
    own = _attributes(secure or name.startswith("__Host-"))
    cookies = (
        f"{name}={value}; Path=/{own}".encode("latin-1"),
        f"{HANDOFF_COOKIE}=; Path={_COOKIE_PATH}; Max-Age=0{_attributes(secure)}".encode("latin-1"),
    )
    # The page first asked for: a local path the router already checked as a target.
    location = state.target if state.target.startswith("/") else "/"
    if location[1:2] in ("/", "\\"):
        location = "/"  # "//host" and "/\\host": another site, to a browser
    return Redirect(location.encode("latin-1"), cookies)
