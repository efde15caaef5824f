"""Sign in and sign out: the HTML forms in front of the auth API.

The sign-in form is refused when another site posted it (its ``Origin`` or
``Referer``, and a token bound to a cookie the form page set: see
:mod:`labgate.portal.origin`), and after too many failed sign-ins (429).

These two are plain forms rather than ``fetch`` calls: they set and clear
the HttpOnly session cookie, must work before any script has loaded, and
are where the router sends browsers without a session
(``/login?next=<path>``). They call the same functions as
``POST /api/v1/auth/login`` and ``POST /api/v1/auth/logout``.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

from labgate.errors import LabgateError, TooManyRequests
from labgate.portal.api.auth import (
    check_password,
    clear_session_cookie,
    logout,
    set_session_cookie,
)
from labgate.portal.auth import optional_principal, session_cookie_count, session_cookie_of
from labgate.portal.origin import (
    LOGIN_FORM_FIELD,
    check_login_form_token,
    check_same_origin,
    login_form_token,
    set_login_cookie,
)
from labgate.portal.state import Portal, get_portal
from labgate.portal.ui.render import render
from labgate.security import tossed_cookie_clearers

router = APIRouter(include_in_schema=False)

# Messages the sign-in page shows on request; a fixed set, so a link cannot
# put arbitrary text on labgate's own page.
NOTICES = {
    "signed_out": "You are signed out.",
    "session_ended": "Your session has ended. Please sign in again.",
}


def safe_next(target: str | None) -> str:
    """A local path to return to after sign-in; anything else becomes ``/``."""
    if not target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    if "\\" in target:
        return "/"
    return target


def login_page(
    request: Request,
    portal: Portal,
    *,
    next_url: str,
    error: str | None = None,
    code: str | None = None,
    notice: str | None = None,
    username: str = "",
    provider: str = "",
    status: int = 200,
) -> Response:
    secure = portal.settings.effective_cookie_secure
    nonce, token = login_form_token(request, portal.signer, secure=secure)
    providers = list(portal.providers.values())
    context = {
        "password_providers": [p for p in providers if p.kind == "password"],
        "redirect_providers": [p for p in providers if p.kind == "redirect"],
        "chosen_provider": provider,
        "user": None,
        "next": next_url,
        "error": error,
        "error_code": code,
        "notice": notice,
        "username": username,
        "login_token": token,
        "login_token_field": LOGIN_FORM_FIELD,
    }
    response = render(request, "login.html", context, status=status)
    set_login_cookie(response, nonce, secure=secure)
    return response


@router.get("/login")
async def login_form(
    request: Request,
    next: str | None = None,
    notice: str | None = None,
    portal: Portal = Depends(get_portal),
) -> Response:
    """The sign-in form; a browser that is already signed in goes straight on."""
    target = safe_next(next)
    caller = await optional_principal(request)
    # The router sends a browser here when it does not accept its cookie for
    # /i/...; going straight back could loop, so such a visit gets the form.
    if caller is not None and caller.via == "session" and not target.startswith("/i/"):
        return RedirectResponse(target, status_code=303)
    message = NOTICES.get(notice or "")
    sent = session_cookie_count(portal, request)
    if caller is None and sent and message is None:
        message = NOTICES["session_ended"]
    response = login_page(request, portal, next_url=target, notice=message)
    if caller is None and sent:
        clear_session_cookie(portal, response)
    if sent > 1:
        # One was planted by a page on another host (Domain=<a parent domain>): both
        # count for nothing, and the browser could never sign in while it stays.
        host = urlsplit(portal.settings.effective_public_url).hostname or ""
        secure = portal.settings.effective_cookie_secure
        name = session_cookie_of(portal)
        for line in tossed_cookie_clearers(name, host, secure=secure, path=request.url.path):
            response.headers.append("set-cookie", line)
    return response


@router.post("/login")
async def login_submit(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    next: Annotated[str, Form(max_length=4096)] = "/",
    login_token: Annotated[str | None, Form(max_length=256)] = None,
    provider: Annotated[str | None, Form(max_length=64)] = None,
    portal: Portal = Depends(get_portal),
) -> Response:
    """Check the form and start a session, then go back where the user was headed."""
    target = safe_next(next)
    try:
        check_same_origin(request, portal.settings.effective_public_url)
        secure = portal.settings.effective_cookie_secure
        check_login_form_token(request, portal.signer, login_token, secure=secure)
        user = await check_password(portal, request, username, password, provider)
    except LabgateError as exc:
        response = login_page(
            request,
            portal,
            next_url=target,
            error=exc.detail,
            code=exc.code,
            username=username,
            provider=provider or "",
            status=exc.status,
        )
        if isinstance(exc, TooManyRequests):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    response = RedirectResponse(target, status_code=303)
    set_session_cookie(portal, response, user.id)
    return response


@router.post("/logout")
async def logout_submit(request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """End the session (CSRF-checked, like the API) and show the sign-in form."""
    caller = await optional_principal(request)
    response = RedirectResponse("/login?notice=signed_out", status_code=303)
    if caller is not None:
        await logout(caller, request, portal)
    clear_session_cookie(portal, response)
    return response
