"""The ``demo`` tool: a small web app that proves an instance works end to end.

It serves, under its base URL, a page (``/``), a JSON endpoint (``/api/info``),
a health endpoint (``/api/health``) and a WebSocket echo (``/ws``). ``POST
/api/claim`` is its warm-pool hook: the agent says which user it now serves
and where their workspace is (labgate.backends.claim). When
``LABGATE_INSTANCE_TOKEN`` is set it answers only requests that carry
``Authorization: token <it>`` (the router adds it), like a real tool should.

Environment knobs make the test doubles of the style guide out of the same
app: ``DEMO_START_DELAY`` (seconds before listening: a slow tool),
``DEMO_NEVER_READY`` (health always 503), ``DEMO_CRASH`` (exit 3 at start,
after printing a reason).
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import os
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from labgate.tools.demo.page import PAGE
from labgate.tools.demo.server import main

__all__ = ["create_app", "main"]


class TokenGate:
    """ASGI middleware: refuse requests without the instance token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"token {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope.get("headers", []))
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 4403})
                    return
                response = JSONResponse({"error": "forbidden"}, status_code=403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _read(path: str) -> str:
    return Path(path).read_text(errors="replace")[:65536]


def create_app(base_url: str = "/") -> ASGIApp:
    """The demo app mounted under ``base_url``."""
    base = "/" + base_url.strip("/") + "/" if base_url.strip("/") else "/"
    started = time.time()
    never_ready = bool(os.environ.get("DEMO_NEVER_READY"))

    async def claim(request: Request) -> Response:
        """A warm-pool claim: serve ``user`` from now on, in ``workspace``."""
        body = await request.json()
        user, workspace = str(body.get("user", "")), str(body.get("workspace", ""))
        if not user or not workspace:
            return JSONResponse({"error": "user and workspace are required"}, status_code=400)
        # Re-resolve the workspace path: the one we started in is now mounted over.
        os.chdir(workspace)
        os.environ.update({"LABGATE_USER": user, "HOME": workspace})
        return JSONResponse({"user": user, "workspace": workspace})

    async def page(request: Request) -> Response:
        body = PAGE.format(
            instance=html.escape(os.environ.get("LABGATE_INSTANCE_ID", "")),
            user=html.escape(os.environ.get("LABGATE_USER", "")),
            base_json=json.dumps(base),
        )
        return HTMLResponse(body)

    async def health(request: Request) -> Response:
        if never_ready:
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse({"ready": True})

    async def info(request: Request) -> Response:
        home = Path(os.environ.get("HOME", "."))
        data: dict[str, Any] = {
            "tool": "demo",
            "instance": os.environ.get("LABGATE_INSTANCE_ID", ""),
            "user": os.environ.get("LABGATE_USER", ""),
            "base_url": base,
            "path": request.url.path,
            "home": str(home),
            "cwd_files": sorted(os.listdir("."))[:100],
            "uptime": round(time.time() - started, 3),
            "headers": {k: v for k, v in request.headers.items() if k.startswith("x-")},
        }
        return JSONResponse(data)

    async def read_file(request: Request) -> Response:
        """Read a file by absolute path: lets tests probe what the sandbox exposes."""
        path = request.query_params.get("path", "")
        try:
            content = await asyncio.to_thread(_read, path)
        except OSError as exc:
            return JSONResponse({"ok": False, "error": exc.__class__.__name__}, status_code=404)
        return JSONResponse({"ok": True, "content": content})

    async def write_file(request: Request) -> Response:
        """Write a file by absolute path: lets tests probe what the sandbox allows."""
        path = request.query_params.get("path", "")
        body = await request.body()
        try:
            await asyncio.to_thread(Path(path).write_bytes, body)
        except OSError as exc:
            return JSONResponse({"ok": False, "error": exc.__class__.__name__}, status_code=403)
        return JSONResponse({"ok": True})

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") is not None:
                    await websocket.send_text(message["text"])
                elif message.get("bytes") is not None:
                    await websocket.send_bytes(message["bytes"])
        except WebSocketDisconnect:
            return

    routes = [
        Route("/", page),
        Route("/api/health", health),
        Route("/api/info", info),
        Route("/api/claim", claim, methods=["POST"]),
        Route("/api/file", read_file, methods=["GET"]),
        Route("/api/file", write_file, methods=["PUT"]),
        WebSocketRoute("/ws", echo),
    ]
    app: ASGIApp = Starlette(
        routes=[Mount(base.rstrip("/"), routes=routes)] if base != "/" else routes
    )
    token = os.environ.get("LABGATE_INSTANCE_TOKEN")
    if token:
        app = TokenGate(app, token)
    return app
