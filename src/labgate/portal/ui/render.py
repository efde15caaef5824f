"""Rendering for the web UI: templates, static files, security headers, error pages.

Pages are Jinja2 templates under ``templates/`` extending ``base.html``
(blocks ``title``, ``body`` and ``scripts``). Their CSS and JavaScript are
plain files under ``static/``, served by :data:`static_router` with a
version derived from their content, so no build step exists anywhere.

Every page carries a strict Content-Security-Policy: scripts and styles
come only from ``/static``, never inline, so a value that slips into a
page cannot run as code.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from labgate import __version__

UI_DIR = Path(__file__).parent
TEMPLATES_DIR = UI_DIR / "templates"
STATIC_DIR = UI_DIR / "static"
STATIC_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(css|js|svg|png|ico)$")

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: https:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "object-src 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

ERROR_TITLES = {
    400: "That request did not make sense",
    401: "Please sign in",
    403: "Not allowed",
    404: "Not found",
    405: "Not possible here",
    409: "That clashes with the current state",
    413: "Too large",
    422: "Some fields are not right",
    429: "Limit reached",
    500: "Something went wrong on our side",
    502: "A site did not answer properly",
    503: "Not available right now",
}
ERROR_ADVICE = {
    401: "Sign in, then try again.",
    403: "Your account cannot open this. If you think it should, ask an administrator.",
    404: "The address may be mistyped, or the thing it named is gone or belongs to someone else.",
    429: "Stop an instance you no longer need, then try again.",
    500: "The problem was logged. Try again in a moment; if it keeps happening, tell an "
    "administrator what you were doing.",
}


def _load_static() -> dict[str, tuple[bytes, str]]:
    """Every static file, read once: name → (content, ETag)."""
    files = {}
    for path in sorted(STATIC_DIR.iterdir()):
        if STATIC_NAME.match(path.name) and path.is_file():
            body = path.read_bytes()
            files[path.name] = (body, '"' + hashlib.sha256(body).hexdigest()[:16] + '"')
    return files


STATIC_FILES = _load_static()
ASSET_VERSION = hashlib.sha256(
    (__version__ + "".join(etag for _, etag in STATIC_FILES.values())).encode()
).hexdigest()[:12]


def size(value: Any) -> str:
    """Bytes for people: ``536870912`` → ``512 MiB``."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return str(value)
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024:
            return f"{amount:g} {unit}"
        amount /= 1024
    return f"{amount:g} TiB"


def short_size(value: Any) -> str:
    """Bytes in the grammar a size field accepts: ``536870912`` → ``512M``."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return ""
    for suffix, factor in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if value % factor == 0 or value >= 10 * factor:
            return f"{value / factor:g}{suffix}"
    return str(value)


def number(value: Any) -> str:
    """A number without a pointless ``.0``: ``1.0`` → ``1``, ``0.5`` → ``0.5``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:g}"
    return str(value)


def sentence(text: Any) -> str:
    """An API detail (a lower-case phrase) as a sentence on a page."""
    value = str(text or "").strip()
    if not value:
        return value
    value = value[0].upper() + value[1:]
    return value if value.endswith((".", "!", "?", "…")) else value + "."


def iso(value: datetime | None) -> str:
    """A datetime as ISO 8601 for ``<time datetime>`` (empty for None)."""
    return value.isoformat() if value is not None else ""


templates = Jinja2Templates(directory=TEMPLATES_DIR)
templates.env.globals["asset_version"] = ASSET_VERSION
templates.env.globals["version"] = __version__
templates.env.filters["size"] = size
templates.env.filters["short_size"] = short_size
templates.env.filters["iso"] = iso
templates.env.filters["number"] = number
templates.env.filters["sentence"] = sentence


def render(
    request: Request, template: str, context: dict[str, Any], *, status: int = 200
) -> HTMLResponse:
    """A page with the UI's security headers."""
    response = templates.TemplateResponse(request, template, context, status_code=status)
    response.headers.update(PAGE_HEADERS)
    instance_hosts = getattr(request.app.state, "instance_hosts_source", "")
    if instance_hosts:
        # A sign-in form that ends, through the redirects of the hand-off, on an
        # instance's own host: form-action covers every redirect of a submission.
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY.replace(
            "form-action 'self'", f"form-action 'self' {instance_hosts}"
        )
    return response


def wants_html(request: Request) -> bool:
    """Whether an error for this request should be a page rather than JSON.

    Only browsers asking for a page outside the API get pages: API clients
    and ``fetch`` calls always get the one JSON error shape.
    """
    path = request.url.path
    if path == "/api" or path.startswith(("/api/", "/static/")):
        return False
    return "text/html" in request.headers.get("accept", "")


def error_page(request: Request, status: int, code: str, detail: str) -> HTMLResponse:
    """The page a browser sees for an error: what happened and where to go next."""
    principal = getattr(request.state, "principal", None)
    session_id = getattr(principal, "session_id", None)
    context = {
        "user": principal,
        # The header's sign-out form needs the session's CSRF token.
        "csrf": request.app.state.portal.signer.csrf_token(session_id) if session_id else "",
        "status": status,
        "code": code,
        "heading": ERROR_TITLES.get(status, "Something went wrong"),
        "detail": detail,
        "advice": ERROR_ADVICE.get(status, ""),
        # Coming back to a form post after signing in would be a GET of it: go home.
        "login_url": login_url(request) if request.method == "GET" else "/login",
    }
    return render(request, "error.html", context, status=status)


def login_url(request: Request, notice: str | None = None) -> str:
    """The sign-in page, coming back to this page afterwards."""
    from urllib.parse import urlencode

    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    params = {"next": target} if target != "/" else {}
    if notice:
        params["notice"] = notice
    return "/login" + (f"?{urlencode(params)}" if params else "")


def to_login(request: Request) -> RedirectResponse:
    """Send a browser without a (valid) session to sign in."""
    return RedirectResponse(login_url(request), status_code=303)


static_router = APIRouter(include_in_schema=False)


@static_router.get("/static/{name}")
async def static_file(name: str, request: Request) -> Response:
    """A CSS, JavaScript or image file of the UI; cached for good when versioned."""
    found = STATIC_FILES.get(name)
    if found is None:
        return Response("not found\n", status_code=404, media_type="text/plain")
    body, etag = found
    versioned = request.query_params.get("v") == ASSET_VERSION
    headers = {
        "ETag": etag,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "public, max-age=31536000, immutable" if versioned else "no-cache",
    }
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if media_type.startswith("text/") or media_type.endswith("javascript"):
        media_type += "; charset=utf-8"
    return Response(body, media_type=media_type, headers=headers)
