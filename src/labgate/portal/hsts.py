"""HSTS: browsers told to reach this labgate over HTTPS only.

When the public URL is ``https://`` (labgate's own TLS, or a TLS-terminating
proxy in front) every portal response carries ``Strict-Transport-Security``.
Every visit passes through the portal's pages (sign-in, the tools page, the
instance page), so the browser learns it before any tool is opened; the
router's own redirect listener is plain HTTP, where browsers ignore the
header anyway.
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
