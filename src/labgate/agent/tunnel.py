"""The instance tunnel: byte streams to a site's instances over the agent's one connection.

For a site with ``reach = "tunnel"`` nothing can connect into the site, so the
router reaches its instances through the connection the agent dialled out.
The router itself does not know: the portal listens on one unix socket per
instance (:class:`PortalTunnel`) and the route's upstream is ``unix:<path>``.
Every connection accepted there becomes one *stream*; the agent
(:class:`AgentTunnel`) opens a connection to the instance's endpoint, as its
own records say, and bytes flow both ways. HTTP keep-alive, WebSocket upgrades
and long downloads need nothing more than a byte stream.

Frames ride in binary WebSocket messages beside the text messages of the
control protocol. A frame is ``>BII`` (type, stream id, payload length) and
its payload; frames queued together go out in one message (up to
:data:`MAX_MESSAGE` bytes, plus one frame), which spares the connection a
message per frame when many streams are busy. Stream ids are chosen by the
portal.

======== ============ ==============================================
type     direction    payload
======== ============ ==============================================
OPEN     portal→agent JSON ``{"instance_id": ...}``
OPENED   agent→portal none
REFUSED  agent→portal the reason, UTF-8
DATA     both         bytes (at most :data:`MAX_DATA`)
WINDOW   both         ``>I``: credit in bytes
EOF      both         none: the sender is done writing (half-close)
CLOSE    both         none: the stream is over, both ways (abort)
======== ============ ==============================================

Flow control is per stream, as in HTTP/2 or SSH: a side may have at most
:data:`WINDOW` bytes of DATA sent and not yet granted back. The receiver
grants credit once it has handed data to its local socket and that socket's
write buffer is below its high-water mark; a sender out of credit stops
reading its local socket. So one slow reader stalls only its own stream, the
shared connection never waits on it, and each stream holds at most about one
window in memory at each end. A peer that sends beyond its credit loses the
stream. The portal sends DATA right after OPEN (no round trip per stream);
the agent holds it until the instance's connection is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
from collections import deque
from collections.abc import Awaitable, Callable

from labgate.agent.tunnel_stream import (
    CLOSE,
    CREDIT,
    DATA,
    EOF,
    HEADER,
    MAX_MESSAGE,
    OPEN,
    OPENED,
    REFUSED,
    WINDOW_UPDATE,
    TunnelStream,
)
from labgate.wire.routes import parse_upstream

__all__ = ["AgentTunnel", "PortalTunnel", "TunnelEnd", "TunnelStream"]

log = logging.getLogger(__name__)

#: Seconds the agent waits for an instance to accept a connection.
CONNECT_TIMEOUT = 10.0

Send = Callable[[bytes], Awaitable[None]]


class TunnelEnd:
    """One end of the tunnel: the streams carried by one agent connection.

    ``send`` puts one frame on the connection (in order); give it here or with
    :meth:`attach`. Hand every binary message received to :meth:`feed`; call
    :meth:`detach` (or :meth:`close`) when the connection is gone.
    """

    def __init__(self, send: Send | None = None) -> None:
        self.streams: dict[int, TunnelStream] = {}
        self._send: Send | None = None
        self._outgoing: deque[tuple[bytes, bytes | memoryview]] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        # Counters, for metrics and tests.
        self.streams_opened = 0
        self.streams_refused = 0
        self.bytes_sent = 0  # DATA payload bytes put on the connection
        self.bytes_received = 0  # DATA payload bytes taken off it
        self.messages_sent = 0
        self.messages_received = 0
        self.protocol_errors = 0
        self.queued_bytes = 0  # frames waiting for the connection
        self.peak_queued = 0
        self.peak_buffered = 0  # largest write buffer of a local socket seen
        self.peak_backlog = 0  # largest local read held back for want of credit
        if send is not None:
            self.attach(send)

    @property
    def connected(self) -> bool:
        """Whether a connection carries the streams now."""
        return self._send is not None

    def attach(self, send: Send) -> None:
        """Carry streams on a (new) connection from now on."""
        self._send = send

    def detach(self, reason: str) -> None:
        """The connection is gone: close every stream and its local socket at once."""
        self._send = None
        self._outgoing.clear()
        self.queued_bytes = 0
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        for stream in list(self.streams.values()):
            stream.abort()
        self.streams.clear()
        if reason:
            log.debug("tunnel: connection gone (%s)", reason)

    def close(self, reason: str = "closed") -> None:
        """Close the tunnel end (the connection is gone)."""
        self.detach(reason)

    # ----------------------------------------------------------------- sending
    def put(self, kind: int, stream_id: int, payload: bytes | memoryview = b"") -> None:
        """Queue one frame for the connection (dropped when there is none)."""
        if self._send is None:
            return
        self._outgoing.append((HEADER.pack(kind, stream_id, len(payload)), payload))
        self.queued_bytes += HEADER.size + len(payload)
        if self.queued_bytes > self.peak_queued:
            self.peak_queued = self.queued_bytes
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())
        elif self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _write(self) -> None:
        """Put queued frames on the connection in order, those queued together in one message."""
        loop = asyncio.get_running_loop()
        outgoing = self._outgoing
        while True:
            while outgoing:
                send = self._send
                if send is None:
                    return
                parts: list[bytes | memoryview] = []
                size = 0
                while outgoing and size < MAX_MESSAGE:
                    header, payload = outgoing.popleft()
                    parts.append(header)
                    if payload:
                        parts.append(payload)
                    size += HEADER.size + len(payload)
                self.queued_bytes -= size
                self.messages_sent += 1
                try:
                    await send(b"".join(parts) if len(parts) > 1 else bytes(parts[0]))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._writer = None  # detach must not cancel this task
                    self.detach(f"send failed: {exc!r}")
                    return
            self._wakeup = loop.create_future()
            await self._wakeup
            self._wakeup = None

    # ----------------------------------------------------------------- receiving
    async def feed(self, message: bytes) -> None:
        """Handle one binary message received on the connection (one or more frames)."""
        self.receive(message)

    def receive(self, message: bytes) -> None:
        """:meth:`feed` without the coroutine (nothing here waits)."""
        self.messages_received += 1
        view = memoryview(message)
        offset, size = 0, len(message)
        while offset < size:
            if size - offset < HEADER.size:
                self._violation("a frame shorter than its header")
                return
            kind, stream_id, length = HEADER.unpack_from(message, offset)
            offset += HEADER.size
            if offset + length > size:
                self._violation("a frame longer than its message")
                return
            payload = view[offset : offset + length]
            offset += length
            stream = self.streams.get(stream_id)
            if kind == DATA:
                if stream is not None:
                    self.bytes_received += length
                    stream.on_data(payload)
            elif kind == WINDOW_UPDATE:
                if stream is not None and length == CREDIT.size:
                    stream.on_credit(CREDIT.unpack_from(payload)[0])
            elif kind == EOF:
                if stream is not None:
                    stream.on_eof()
            elif kind == CLOSE:
                if stream is not None:
                    stream.on_close()
            else:
                self.control(kind, stream_id, stream, bytes(payload))

    def control(self, kind: int, stream_id: int, stream: TunnelStream | None, body: bytes) -> None:
        """Handle a frame type only one side takes (OPEN, OPENED, REFUSED)."""
        self._violation(f"unexpected frame type {kind} for stream {stream_id}")

    def _violation(self, what: str) -> None:
        self.protocol_errors += 1
        log.warning("tunnel: protocol error from the peer: %s", what)

    def opening(self, stream: TunnelStream) -> bool:
        """A local connection came in for ``stream``; False: refuse it (only the portal opens)."""
        return False

    def forget(self, stream: TunnelStream) -> None:
        """Drop a finished stream."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]


class PortalTunnel(TunnelEnd):
    """The portal's end: one unix socket per tunneled instance, one stream per connection."""

    def __init__(self, send: Send | None = None) -> None:
        super().__init__(send)
        self.servers: dict[str, tuple[str, asyncio.AbstractServer]] = {}
        self._next_id = 0

    async def serve(self, instance_id: str, path: str) -> None:
        """Listen on ``path`` for ``instance_id`` (its directory is made 0700); idempotent."""
        if instance_id in self.servers:
            return
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # left by an earlier run
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: self._accept(instance_id), path)
        os.chmod(path, 0o600)
        self.servers[instance_id] = (path, server)

    async def unserve(self, instance_id: str) -> None:
        """Stop listening for ``instance_id``: remove its socket file, abort its streams."""
        entry = self.servers.pop(instance_id, None)
        if entry is None:
            return
        path, server = entry
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        for stream in [s for s in self.streams.values() if s.instance_id == instance_id]:
            stream.reset()

    def close(self, reason: str = "closed") -> None:
        """Close every stream and every listener (their socket files are removed)."""
        super().close(reason)
        for path, server in self.servers.values():
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.servers.clear()

    def _accept(self, instance_id: str) -> TunnelStream:
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        while self._next_id in self.streams:  # after 2**32 streams
            self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        return TunnelStream(self, self._next_id, instance_id, opening=True)

    def opening(self, stream: TunnelStream) -> bool:
        """A local connection came in: announce its stream (False: no connection, refuse)."""
        if self._send is None:
            return False
        self.streams[stream.id] = stream
        self.streams_opened += 1
        self.put(OPEN, stream.id, json.dumps({"instance_id": stream.instance_id}).encode())
        return True

    def control(self, kind: int, stream_id: int, stream: TunnelStream | None, body: bytes) -> None:
        if kind == OPENED:
            return
        if kind == REFUSED:
            if stream is not None:
                self.streams_refused += 1
                log.info(
                    "tunnel: agent refused a stream to %s: %s",
                    stream.instance_id,
                    body.decode("utf-8", "replace"),
                )
                stream.refused()
            return
        super().control(kind, stream_id, stream, body)


class AgentTunnel(TunnelEnd):
    """The agent's end: opens a connection to the instance for every OPEN.

    ``resolve(instance_id)`` is the agent's own record of the instance's
    endpoint (``http://HOST:PORT`` or ``unix:/path``), None when it has none;
    the portal never names an address.
    """

    def __init__(self, resolve: Callable[[str], str | None], send: Send | None = None) -> None:
        super().__init__(send)
        self.resolve = resolve
        self._connecting: dict[int, asyncio.Task[None]] = {}

    def control(self, kind: int, stream_id: int, stream: TunnelStream | None, body: bytes) -> None:
        if kind != OPEN:
            super().control(kind, stream_id, stream, body)
            return
        try:
            instance_id = json.loads(body)["instance_id"]
            if not isinstance(instance_id, str):
                raise TypeError("instance_id is not a string")
        except (ValueError, KeyError, TypeError) as exc:
            self._refuse(stream_id, "?", f"bad OPEN: {exc}")
            return
        if stream is not None:
            self._refuse(stream_id, instance_id, "stream id in use")
            return
        endpoint = self.resolve(instance_id)
        if endpoint is None:
            self._refuse(stream_id, instance_id, f"no instance {instance_id} on this site")
            return
        try:
            address = parse_upstream(endpoint)
        except ValueError as exc:
            self._refuse(stream_id, instance_id, f"bad endpoint: {exc}")
            return
        stream = TunnelStream(self, stream_id, instance_id, opening=False)
        self.streams[stream_id] = stream
        self.streams_opened += 1
        task = asyncio.get_running_loop().create_task(
            self._connect(stream, address.host, address.port, address.path)
        )
        self._connecting[stream_id] = task
        task.add_done_callback(lambda _: self._connecting.pop(stream_id, None))

    def _refuse(self, stream_id: int, instance_id: str, reason: str) -> None:
        self.streams_refused += 1
        log.warning("tunnel: refused a stream to instance %s: %s", instance_id, reason)
        self.put(REFUSED, stream_id, reason.encode())

    async def _connect(self, stream: TunnelStream, host: str, port: int, path: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            if path:
                connecting = loop.create_unix_connection(lambda: stream, path)
            else:
                connecting = loop.create_connection(lambda: stream, host, port)
            await asyncio.wait_for(connecting, CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            if self.streams.get(stream.id) is stream:
                self.forget(stream)
                self._refuse(stream.id, stream.instance_id, f"cannot connect: {exc}")
            return
        if self.streams.get(stream.id) is stream:
            self.put(OPENED, stream.id)

    def forget(self, stream: TunnelStream) -> None:
        super().forget(stream)
        task = self._connecting.get(stream.id)
        if task is not None and stream.transport is None:
            task.cancel()

    def detach(self, reason: str) -> None:
        for task in list(self._connecting.values()):
            task.cancel()
        super().detach(reason)
