"""The router's own answers: small HTML pages for browsers, JSON for API clients.

Every answer is a complete HTTP/1.1 response built in one ``bytes``; none
carries a traceback. JSON bodies take labgate's one error shape
(:func:`labgate.errors.error_body`).
"""

from __future__ import annotations

import html
import json
from urllib.parse import quote

from labgate.errors import error_body
from labgate.router.http import status_line

# The portal's look: its stylesheet (same origin, reached through this router) and
# the markup of its error page (portal/ui/templates/error.html), without scripts.
# On an instance's own host, {base} is the portal's URL: "/" there is the tool's.
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} · labgate</title>{refresh}
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<link rel="stylesheet" href="{base}/static/labgate.css">
<link rel="icon" href="{base}/static/favicon.svg" type="image/svg+xml"></head>
<body>
<header class="site-header">
  <a class="brand" href="{base}/"><span class="brand-mark" aria-hidden="true">◆</span> labgate</a>
</header>
<main id="main">
<section class="narrow panel error-page" aria-labelledby="error-heading">
  <p class="status-code">Error {status}</p>
  <h1 id="error-heading">{title}</h1>
  <p class="detail">{detail}</p>
  <ul class="actions">
    <li><a class="button primary" href="{base}/">Go to your tools</a></li>
    <li><a class="button" href="{base}/instances">My instances</a></li>
  </ul>
</section>
</main>
</body></html>
"""

_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    414: "uri_too_long",
    431: "request_header_fields_too_large",
    500: "internal_error",
    502: "bad_gateway",
    503: "instance_starting",
    504: "gateway_timeout",
}

_TITLES: dict[int, str] = {
    400: "Bad request",
    401: "Please log in",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    413: "Request too large",
    414: "Address too long",
    431: "Request headers too large",
    500: "Router error",
    502: "The instance is not answering",
    503: "The instance is starting",
    504: "The instance took too long to answer",
}


def response(
    status: int,
    body: bytes,
    content_type: bytes,
    *,
    close: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """A complete response with ``Content-Length`` and no caching.

    (The proxy cuts the body off its answers to ``HEAD``: ``ClientConnection._answer``.)
    """
    lines = [
        status_line(status),
        b"Content-Type: %s\r\n" % content_type,
        b"Content-Length: %d\r\n" % len(body),
        b"Cache-Control: no-store\r\n",
        b"X-Content-Type-Options: nosniff\r\n",
    ]
    for name, value in extra or ():
        lines.append(b"%s: %s\r\n" % (name, value))
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)


def error(
    status: int,
    detail: str,
    *,
    browser: bool,
    close: bool = False,
    retry_after: int | None = None,
    code: str | None = None,
    base: str = "",
    title: str | None = None,
    cookies: tuple[bytes, ...] = (),
) -> bytes:
    """An error answer: a page for browsers, ``{"error", "detail"}`` for others.

    ``code`` is the error code when the status alone does not say it (the
    portal's, e.g. ``insufficient_scope``). ``base`` is the portal's URL for
    the page's links and stylesheet, on an instance's own host. ``retry_after`` adds the header
    and, for browsers, a page that refreshes itself after that many seconds.
    ``title`` is the page's heading instead of the status's; ``cookies`` are
    ``Set-Cookie`` values to send with it.
    """
    extra: list[tuple[bytes, bytes]] = [(b"Set-Cookie", cookie) for cookie in cookies]
    if retry_after is not None:
        extra.append((b"Retry-After", b"%d" % retry_after))
    if browser:
        refresh = (
            f'\n<meta http-equiv="refresh" content="{retry_after}">'
            if retry_after is not None
            else ""
        )
        body = _PAGE.format(
            status=status,
            title=html.escape(title or _TITLES.get(status, "Error")),
            detail=html.escape(detail),
            refresh=refresh,
            base=html.escape(base),
        ).encode()
        return response(
            status,
            body,
            b"text/html; charset=utf-8",
            close=close,
            extra=extra,
        )
    code = code or _CODES.get(status, "error")
    body = json.dumps(error_body(code, detail)).encode()
    return response(status, body, b"application/json", close=close, extra=extra)


def login_redirect(login_path: str, target: bytes, *, close: bool = False) -> bytes:
    """A 302 to the portal's login page that comes back to ``target`` afterwards."""
    # ``safe`` keeps the next URL readable while making it one query value.
    next_url = quote(target.decode("latin-1"), safe="/")
    location = f"{login_path}?next={next_url}".encode("latin-1")
    return redirect(location, 302, close=close)


def redirect(
    location: bytes,
    status: int = 302,
    *,
    close: bool = False,
    cookies: tuple[bytes, ...] = (),
) -> bytes:
    """A redirect with a tiny body; ``cookies`` are ``Set-Cookie`` values to send with it."""
    body = b"Redirecting to " + html.escape(location.decode("latin-1")).encode("latin-1")
    extra = [(b"Location", location)] + [(b"Set-Cookie", cookie) for cookie in cookies]
    return response(status, body, b"text/plain; charset=utf-8", close=close, extra=extra)


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
