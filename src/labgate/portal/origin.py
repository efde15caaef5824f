"""Refusing sign-ins that another site started (login CSRF).

A page on another site can post a sign-in form to labgate with the
attacker's own name and password; without a check, the visitor's browser
would then be signed in as the attacker, and what they do next (upload
data, type into a notebook) lands in the attacker's account.

Two checks, for the two ways in:

- The origin: browsers say where a request comes from in ``Origin`` (every
  cross-origin ``POST``), or at least ``Referer``. One that names another
  origin than labgate's own (the public URL, or the scheme and ``Host`` the
  request came in on) is refused. A request with neither header is not from
  a page in a modern browser: the CLI and scripts send none, so the API
  sign-in accepts them.
- The sign-in form also carries a token bound to a cookie that the form page
  set (a signed double-submit token): a browser that sends no ``Origin`` and
  no ``Referer`` still cannot post the form from elsewhere, since another
  site can neither read the cookie nor compute its token.
"""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import Response

from labgate.errors import Forbidden
from labgate.security import SessionSigner, host_only

#: The pre-session cookie of the sign-in form; the form carries its token (plain http).
LOGIN_COOKIE = "labgate-login"
#: Its name when cookies are Secure: no other host (an instance host) can plant it.
SECURE_LOGIN_COOKIE = "__Host-labgate-login"
LOGIN_FORM_FIELD = "login_token"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normal_origin(url: str) -> str | None:
    """``scheme://host[:port]`` in lower case without a default port, or None."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[parts.scheme]:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}"


def own_origins(request: Request, public_url: str) -> set[str]:
    """Origins labgate answers at: the public URL's, and the one this request came in on."""
    origins = {normal_origin(public_url)}
    host = request.headers.get("host")
    if host:
        origins.add(normal_origin(f"{request.url.scheme}://{host}"))
    return {origin for origin in origins if origin is not None}


def claimed_origin(request: Request) -> str | None:
    """Where the browser says the request comes from: ``Origin``, else ``Referer``.

    ``""`` when a header is present but names no usable origin (``Origin: null``
    from a sandboxed frame, a garbled ``Referer``): such a request is refused.
    """
    origin = request.headers.get("origin")
    if origin is not None:
        return normal_origin(origin) or ""
    referer = request.headers.get("referer")
    if referer is not None:
        return normal_origin(referer) or ""
    return None


def check_same_origin(request: Request, public_url: str) -> None:
    """Refuse (403 ``csrf_failed``) a request a page of another origin sent."""
    origin = claimed_origin(request)
    if origin is not None and origin not in own_origins(request, public_url):
        raise Forbidden(
            "sign-in refused: the request came from another site (Origin or Referer)",
            code="csrf_failed",
        )


def login_cookie(secure: bool) -> tuple[str, str]:
    """The form cookie's name and path: ``__Host-labgate-login`` on ``/`` when Secure.

    A page on a sibling host could otherwise plant ``labgate-login`` for a
    parent domain with a nonce whose token the attacker fetched for
    themselves, which leaves only the origin check between a browser that
    sends neither ``Origin`` nor ``Referer`` and a login CSRF.
    """
    return host_only(LOGIN_COOKIE, secure), "/" if secure else "/login"


def login_form_token(request: Request, signer: SessionSigner, *, secure: bool) -> tuple[str, str]:
    """The sign-in form's cookie value (reused when the browser has one) and its token."""
    nonce = request.cookies.get(login_cookie(secure)[0]) or secrets.token_urlsafe(16)
    return nonce, signer.csrf_token("login:" + nonce)


def set_login_cookie(response: Response, nonce: str, *, secure: bool) -> None:
    """Give the browser the form's cookie (for this browser session only)."""
    name, path = login_cookie(secure)
    response.set_cookie(name, nonce, httponly=True, samesite="lax", secure=secure, path=path)


def check_login_form_token(
    request: Request, signer: SessionSigner, token: str | None, *, secure: bool
) -> None:
    """Refuse (403 ``csrf_failed``) a form whose token does not match the browser's cookie."""
    nonce = request.cookies.get(login_cookie(secure)[0])
    if not nonce or not token or not signer.check_csrf("login:" + nonce, token):
        raise Forbidden(
            "the sign-in form has expired or came from another site; please try again",
            code="csrf_failed",
        )
