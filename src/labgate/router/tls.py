"""HTTPS at the front door: the router's TLS context, its reloading, and the HTTP redirect.

With ``tls_cert_file`` and ``tls_key_file`` set, the router terminates TLS
itself (asyncio's TLS transport under the same proxy protocol).
:class:`CertificateWatcher` holds the one :class:`ssl.SSLContext` every
listening socket uses and loads the files again when they change (checked
every ``tls_reload_interval`` seconds: a renewed certificate, certbot-style,
is served to new connections without a restart; connections already open
keep theirs). A pair that does not load (a key that does not match, a file
half written) is logged and the previous certificate stays in use.

With ``http_redirect_port`` set, a second, plain-HTTP listener answers every
request with ``308 Permanent Redirect`` to the same path on the public
(``https://``) URL, and nothing else: no cookie or credential is read
there. The HSTS header and ``Secure`` cookies are the portal's
(:mod:`labgate.portal.app`), since every visit passes through its pages.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from labgate.aio import cancel_and_wait

log = logging.getLogger(__name__)

#: The longest request head the redirect listener reads before answering 400.
MAX_REDIRECT_HEAD = 8192
REDIRECT_TIMEOUT = 10.0


def _stamp(path: Path) -> tuple[int, int, int]:
    """What changes when a file is replaced or rewritten: inode, size, mtime."""
    info = os.stat(path)
    return (info.st_ino, info.st_size, info.st_mtime_ns)


class CertificateWatcher:
    """A server TLS context loaded from two files, and loaded again when they change."""

    def __init__(self, cert_file: Path, key_file: Path, interval: float = 10.0) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.interval = interval
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["http/1.1"])
        self._stamps = self._load()
        self.reloads = 0
        self._task: asyncio.Task[None] | None = None

    def _load(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Load the pair into the context (raises ssl.SSLError or OSError when it cannot)."""
        stamps = (_stamp(self.cert_file), _stamp(self.key_file))
        self.context.load_cert_chain(self.cert_file, self.key_file)
        return stamps

    def check(self) -> bool:
        """Load the files again when they changed; whether a new certificate is in use."""
        try:
            stamps = (_stamp(self.cert_file), _stamp(self.key_file))
        except OSError as exc:
            log.warning(
                "TLS: cannot read %s: %s; keeping the loaded certificate", exc.filename, exc
            )
            return False
        if stamps == self._stamps:
            return False
        try:
            self._stamps = self._load()
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS: cannot load the new certificate: %s; keeping the previous one", exc)
            return False
        self.reloads += 1
        log.info("TLS: loaded the new certificate from %s", self.cert_file)
        return True

    def start(self) -> None:
        """Watch the files in the running loop until :meth:`stop`."""
        if self._task is None and self.interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="tls-watch")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()

    async def stop(self) -> None:
        """Stop watching."""
        await cancel_and_wait(self._task)
        self._task = None


def redirect_location(public_url: str, target: bytes) -> bytes:
    """Where a plain-HTTP request for ``target`` goes: the same path on the public URL."""
    path = target if target.startswith(b"/") else b"/"
    base = urlsplit(public_url)
    return f"https://{base.netloc}".encode() + path


class RedirectProtocol(asyncio.Protocol):
    """One plain-HTTP connection: read the request line, answer 308 to HTTPS, close."""

    def __init__(self, public_url: str) -> None:
        self.public_url = public_url
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the clock: a client that sends nothing is closed."""
        self.transport = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(REDIRECT_TIMEOUT, transport.close)

    def data_received(self, data: bytes) -> None:
        """Answer once the request line is in."""
        if self.transport is None or self.transport.is_closing():
            return
        self.buffer += data
        line, found, _ = self.buffer.partition(b"\r\n")
        if not found:
            if len(self.buffer) > MAX_REDIRECT_HEAD:
                self._answer(b"400 Bad Request", None)
            return
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._answer(b"400 Bad Request", None)
            return
        self._answer(b"308 Permanent Redirect", redirect_location(self.public_url, parts[1]))

    def _answer(self, status: bytes, location: bytes | None) -> None:
        if self.transport is None:
            return
        head = [b"HTTP/1.1 ", status, b"\r\nContent-Length: 0\r\nConnection: close\r\n"]
        if location is not None:
            head += [b"Location: ", location, b"\r\n"]
        self.transport.write(b"".join(head) + b"\r\n")
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the timer."""
        if self.timer is not None:
            self.timer.cancel()


async def start_redirect(host: str, port: int, public_url: str) -> asyncio.Server:
    """Listen on ``host:port`` (plain HTTP) and send every request to ``public_url``."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: RedirectProtocol(public_url), host, port)


__all__ = ["CertificateWatcher", "RedirectProtocol", "redirect_location", "start_redirect"]
