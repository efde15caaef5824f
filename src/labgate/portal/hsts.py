"""HSTS: browsers told to reach this labgate over HTTPS only.

When the public URL is ``https://`` (labgate's own TLS, or a TLS-terminating
proxy in front) every portal response carries ``Strict-Transport-Security``.
Every visit passes through the portal's pages (sign-in, the tools page, the
instance page), so the browser learns it before any tool is opened; the
router's own redirect listener is plain HTTP, where browsers ignore the
header anyway.

:class:`NoStoreMiddleware`, a plain ASGI middleware like HSTS's, marks every
``/api/`` and ``/oauth/`` answer ``Cache-Control: no-store`` unless the
endpoint set a ``Cache-Control`` of its own: those answers carry secrets (a
new API token, a session's CSRF token, an OAuth token) or someone's own data,
which no shared proxy nor browser disk cache may keep. It only adds a header
to the answer's start, so streamed answers (events, route stream, downloads)
pass through unbuffered.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HstsMiddleware:
    """Add ``Strict-Transport-Security: max-age=N`` to every HTTP response."""

    def __init__(self, app: ASGIApp, max_age: int) -> None:
        self.app = app
        self.header = (b"strict-transport-security", f"max-age={max_age}".encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_hsts(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], self.header]
            await send(message)

        await self.app(scope, receive, with_hsts)


#: Path prefixes whose answers are ``no-store`` unless they say otherwise.
NO_STORE_PREFIXES = ("/api/", "/oauth/")


class NoStoreMiddleware:
    """Add ``Cache-Control: no-store`` to API and OAuth answers that set no Cache-Control."""

    def __init__(self, app: ASGIApp, prefixes: tuple[str, ...] = NO_STORE_PREFIXES) -> None:
        self.app = app
        self.prefixes = prefixes
        self.header = (b"cache-control", b"no-store")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(self.prefixes):
            await self.app(scope, receive, send)
            return

        async def with_no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"cache-control" for name, _ in headers):
                    message["headers"] = [*headers, self.header]
            await send(message)

        await self.app(scope, receive, with_no_store)
