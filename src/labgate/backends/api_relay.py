"""A relay that lets tools in containers reach labgate's API for their busy reports.

A tool reports that it is busy (a kernel computes with the browser closed)
with ``POST $LABGATE_API_URL/instances/$LABGATE_INSTANCE_ID/activity`` and
its instance token. The portal's API URL is usually on loopback
(``http://127.0.0.1:8000/api/v1``), which inside a container is the container
itself: the reports never arrive and a long computation is culled as idle.

When the site sets no ``api_url`` and the portal's URL is on loopback, the
containers backend starts this relay on the engine's network gateway (the
host's address on the containers' bridge, e.g. 10.88.0.1 for Podman's
``podman`` network): containers reach it, the rest of the network does not
(the bridge is local to the host). It forwards exactly one kind of request,
``POST /api/v1/instances/<id>/activity`` with its ``Authorization`` header,
to the portal's API, which checks the instance token as always; anything
else is answered 404 without reaching labgate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from urllib.parse import urlsplit

import httpx

from labgate.aio import wait_for

log = logging.getLogger(__name__)

#: The paths the relay forwards: busy reports, and notes of batch task attempts.
ACTIVITY_RE = re.compile(r"^/api/v1/instances/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/activity$")
TASK_NOTE_RE = re.compile(r"^/api/v1/tasks/([a-f0-9]{8,32})/events$")
MAX_HEADER_BYTES = 8192
MAX_BODY_BYTES = 65536
READ_TIMEOUT = 10.0
REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    409: "Conflict",
    422: "Unprocessable Entity",
}


def is_loopback_url(url: str) -> bool:
    """Whether ``url``'s host is a loopback name or address (unreachable from a container)."""
    host = (urlsplit(url).hostname or "").lower()
    return host == "localhost" or host.startswith("127.") or host == "::1"


class ApiRelay:
    """Forwards busy reports from ``host:<port>`` to ``upstream`` (the portal's API URL)."""

    def __init__(self, host: str, upstream: str) -> None:
        self.host = host
        self.upstream = upstream.rstrip("/")
        self.port = 0
        self._server: asyncio.Server | None = None
        self._http = httpx.AsyncClient(timeout=READ_TIMEOUT, follow_redirects=False)

    @property
    def url(self) -> str:
        """What containers get as ``LABGATE_API_URL``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/api/v1"

    async def start(self) -> None:
        """Listen on a free port of ``host``; raises OSError when the address is not here."""
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("busy-report relay for containers on %s -> %s", self.url, self.upstream)

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        await self._http.aclose()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body = await wait_for(self._answer(reader), READ_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            status, body = 400, b'{"error": "bad_request"}'
        except httpx.HTTPError as exc:
            log.warning("busy-report relay: labgate's API at %s: %s", self.upstream, exc)
            status, body = 502, b'{"error": "relay_failed"}'
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            writer.write(head.encode() + body)
            await writer.drain()
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEADER_BYTES:
            raise ValueError("headers too long")
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        target = rest.rpartition(" ")[0]
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length") or 0)
        if not 0 <= length <= MAX_BODY_BYTES:
            raise ValueError("body too long")
        body = await reader.readexactly(length) if length else b""
        path = target.split("?", 1)[0]
        note = TASK_NOTE_RE.match(path)
        if method == "POST" and note is not None:
            response = await self._http.post(
                f"{self.upstream}/tasks/{note.group(1)}/events",
                headers={
                    "Authorization": headers.get("authorization", ""),
                    "Content-Type": "application/json",
                },
                content=body,
            )
            return response.status_code, response.content
        found = ACTIVITY_RE.match(path)
        if method != "POST" or found is None:
            return 404, b'{"error": "not_found", "detail": "this relay takes busy reports only"}'
        forwarded = {"Authorization": headers.get("authorization", "")}
        response = await self._http.post(
            f"{self.upstream}/instances/{found.group(1)}/activity", headers=forwarded
        )
        return response.status_code, response.content
