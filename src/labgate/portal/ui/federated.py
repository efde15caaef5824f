"""Signing in at another site's page: the redirect providers (OpenID Connect).

``GET /login/<provider>/start?next=...`` sends the browser to the provider
with a fresh state, nonce and PKCE challenge; those travel back in a signed,
HttpOnly cookie that expires in ten minutes (``labgate-signin-flow``, path
``/login``; ``__Host-labgate-signin-flow``, path ``/``, when cookies are
Secure). ``GET /login/<provider>/callback`` then needs that cookie, sent
once, and a ``state`` equal to the one in it: a callback that another site
started (login CSRF, an attacker's own code pushed into the victim's
browser) carries the attacker's state, which matches no cookie of the
victim's, and is refused. A page on a sibling host (an instance host) can
plant a cookie of the plain name for a parent domain, with the attacker's
own flow in it, but no ``__Host-`` cookie; and a flow cookie sent twice (the
victim's and a planted one) counts for nothing.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from labgate.errors import Forbidden, LabgateError, NotFound
from labgate.identity.base import IdentityProvider
from labgate.portal.api.auth import complete_sign_in, set_session_cookie
from labgate.portal.state import Portal, get_portal
from labgate.portal.ui.signin import login_page, safe_next
from labgate.security import cookie_count, host_only, tossed_cookie_clearers

router = APIRouter(include_in_schema=False)

#: The cookie that carries a sign-in under way across the provider's pages (plain http).
FLOW_COOKIE = "labgate-signin-flow"
#: Its name when cookies are Secure: no other host can plant it.
SECURE_FLOW_COOKIE = "__Host-labgate-signin-flow"
FLOW_MAX_AGE = 600


def flow_cookie(portal: Portal) -> tuple[str, str]:
    """The flow cookie's name and path on this portal (``__Host-``, ``/``, when Secure)."""
    secure = portal.settings.effective_cookie_secure
    return host_only(FLOW_COOKIE, secure), "/" if secure else "/login"


def _drop_flow_cookie(portal: Portal, response: Response) -> None:
    name, path = flow_cookie(portal)
    secure = portal.settings.effective_cookie_secure
    response.delete_cookie(name, path=path, secure=secure, httponly=True, samesite="lax")


def _serializer(portal: Portal) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(portal.signer.key, salt="labgate.signin-flow")


def _provider(portal: Portal, name: str) -> IdentityProvider:
    provider = portal.providers.get(name)
    if provider is None or provider.kind != "redirect":
        raise NotFound(f"no sign-in provider called {name!r}", code="unknown_provider")
    return provider


def callback_url(portal: Portal, name: str) -> str:
    """Where the provider sends the browser back (register this at the provider)."""
    return f"{portal.settings.effective_public_url}/login/{name}/callback"


@router.get("/login/{name}/start")
async def start(
    name: str, request: Request, next: str | None = None, portal: Portal = Depends(get_portal)
) -> Response:
    """Send the browser to the provider's sign-in page."""
    provider = _provider(portal, name)
    target = safe_next(next)
    try:
        redirect = await provider.start(callback_url(portal, name))
    except LabgateError as exc:
        return login_page(
            request, portal, next_url=target, error=exc.detail, code=exc.code, status=exc.status
        )
    flow = _serializer(portal).dumps({"provider": name, "next": target, **redirect.keep})
    response = RedirectResponse(redirect.url, status_code=303)
    cookie_name, cookie_path = flow_cookie(portal)
    response.set_cookie(
        cookie_name,
        flow,
        max_age=FLOW_MAX_AGE,
        httponly=True,
        samesite="lax",
        # Like every labgate cookie: Secure with cookie_secure or an https:// public URL.
        secure=portal.settings.effective_cookie_secure,
        path=cookie_path,
    )
    return response


@router.get("/login/{name}/callback")
async def callback(name: str, request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """Finish the sign-in the provider sent back, then go where the user was headed."""
    provider = _provider(portal, name)
    kept: dict[str, Any] = {}
    cookie_name, _ = flow_cookie(portal)
    sent_twice = cookie_count(request.headers.getlist("cookie"), cookie_name) > 1
    try:
        if sent_twice:
            # One of them was planted by a page on another host (Domain=<a parent domain>),
            # perhaps holding the attacker's own sign-in: neither counts.
            raise Forbidden(
                "this browser sent two sign-in cookies, one set by another site; "
                "please start the sign-in again",
                code="csrf_failed",
            )
        try:
            kept = _serializer(portal).loads(
                request.cookies.get(cookie_name, ""), max_age=FLOW_MAX_AGE
            )
        except BadSignature:
            raise Forbidden(
                "this sign-in was not started here, or took too long; please try again",
                code="csrf_failed",
            ) from None
        if kept.get("provider") != name:
            raise Forbidden("this sign-in was started for another provider", code="csrf_failed")
        params = {key: value for key, value in request.query_params.items()}
        strings = {key: str(value) for key, value in kept.items()}
        account = await provider.finish(callback_url(portal, name), params, strings)
        user = await complete_sign_in(portal, provider, account)
    except LabgateError as exc:
        response = login_page(
            request,
            portal,
            next_url=safe_next(kept.get("next")),
            error=exc.detail,
            code=exc.code,
            status=exc.status,
        )
        _drop_flow_cookie(portal, response)
        if sent_twice:
            # Cleared for the parent domains too, so the next sign-in can work.
            host = urlsplit(portal.settings.effective_public_url).hostname or ""
            secure = portal.settings.effective_cookie_secure
            path = request.url.path
            for line in tossed_cookie_clearers(cookie_name, host, secure=secure, path=path):
                response.headers.append("set-cookie", line)
        return response
    response = RedirectResponse(safe_next(kept.get("next")), status_code=303)
    _drop_flow_cookie(portal, response)
    set_session_cookie(portal, response, user.id)
    return response
