"""The few browser pages the foundation needs: sign in, sign out, home, health.

The full web UI builds on these; the router sends browsers without a
session to ``/login?next=...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from labgate import __version__
from labgate.errors import Unauthorized
from labgate.portal.api.auth import check_password, set_session_cookie
from labgate.portal.auth import Principal, optional_principal
from labgate.portal.state import Portal, get_portal
from labgate.security import CSRF_FORM_FIELD, SESSION_COOKIE

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "ui" / "templates")


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


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the portal answers."""
    return {"status": "ok", "version": __version__}


@router.get("/", response_class=HTMLResponse)
async def home(
    request: Request,
    caller: Annotated[Principal | None, Depends(optional_principal)],
    portal: Portal = Depends(get_portal),
) -> Response:
    """The start page: who you are and where to go."""
    if caller is None:
        return RedirectResponse("/login", status_code=303)
    csrf = portal.signer.csrf_token(caller.session_id) if caller.session_id else ""
    return templates.TemplateResponse(
        request,
        "home.html",
        {
            "user": caller,
            "csrf": csrf,
            "csrf_field": CSRF_FORM_FIELD,
            "tools": list(portal.catalog),
        },
    )


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str | None = None) -> Response:
    """The sign-in form."""
    return templates.TemplateResponse(
        request, "login.html", {"next": safe_next(next), "error": None}
    )


@router.post("/login", response_class=HTMLResponse)
async def login_submit(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    next: Annotated[str, Form(max_length=4096)] = "/",
    portal: Portal = Depends(get_portal),
) -> Response:
    """Check the form and start a session, then go back where the user was headed."""
    target = safe_next(next)
    try:
        user = await portal.run_db(lambda s: check_password(s, username, password))
    except Unauthorized as exc:
        return templates.TemplateResponse(
            request, "login.html", {"next": target, "error": exc.detail}, status_code=401
        )
    response = RedirectResponse(target, status_code=303)
    set_session_cookie(portal, response, user.id)
    return response


@router.post("/logout")
async def logout_submit(request: Request) -> Response:
    """Sign out through the API (which revokes the session) and show the sign-in form."""
    from labgate.portal.api.auth import logout

    portal = get_portal(request)
    caller = await optional_principal(request)
    response = RedirectResponse("/login", status_code=303)
    if caller is not None:
        await logout(caller, request, portal)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
