"""One stream of the instance tunnel: a local socket spliced to its peer over frames.

The frame format and flow control are described in :mod:`labgate.agent.tunnel`.
A :class:`TunnelStream` is the asyncio protocol of its local socket (the
router's connection to the portal's unix socket, or the agent's connection to
the instance) and holds the stream's credit both ways.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from labgate.agent.tunnel import TunnelEnd

log = logging.getLogger(__name__)

OPEN, OPENED, REFUSED, DATA, WINDOW_UPDATE, EOF, CLOSE = range(1, 8)
#: Type, stream id and payload length in front of every frame.
HEADER = struct.Struct(">BII")
#: The payload of a WINDOW frame.
CREDIT = struct.Struct(">I")
#: Largest DATA payload.
MAX_DATA = 64 * 1024
#: Frames queued together go out as one message of at most about this size.
MAX_MESSAGE = 256 * 1024
#: Bytes a side may send on one stream before the receiver grants more.
WINDOW = 256 * 1024
#: The receiver grants credit once this many bytes are delivered (fewer WINDOW frames).
GRANT_AT = WINDOW // 4


class TunnelStream(asyncio.Protocol):
    """A local socket's side of one stream; created by the tunnel ends, not by callers."""

    def __init__(self, end: TunnelEnd, stream_id: int, instance_id: str, *, opening: bool) -> None:
        self.end = end
        self.id = stream_id
        self.instance_id = instance_id
        #: Portal side: announce the stream when the local connection comes in.
        self.opening = opening
        self.transport: asyncio.Transport | None = None
        self.credit = WINDOW  # DATA bytes this side may still send
        self.allowance = WINDOW  # DATA bytes the peer may still send
        self.ungranted = 0  # delivered locally, not yet granted back
        self.backlog: deque[bytes | memoryview] = deque()  # read locally, waiting for credit
        self.backlog_bytes = 0
        self.inbox: list[bytes] = []  # from the peer before the local socket is up (agent)
        self.write_paused = False
        self.read_paused = False
        self.local_eof = False  # the local socket is done writing to us
        self.eof_sent = False
        self.peer_eof = False
        self.done = False

    # ------------------------------------------------------------ local socket
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.done:  # closed while connecting
            transport.abort()  # type: ignore[attr-defined]
            return
        if self.opening:
            if not self.end.opening(self):
                self.done = True
                transport.close()
            return
        inbox, self.inbox = self.inbox, []
        for chunk in inbox:
            self._deliver(chunk)
        if self.peer_eof:
            self._write_eof()

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        if self.backlog_bytes or self.credit <= 0:
            self._hold(data)
        else:
            rest = self._send(data)
            if rest is not None:
                self._hold(rest)

    def eof_received(self) -> bool:
        if not self.local_eof and not self.done:
            self.local_eof = True
            if not self.backlog_bytes:
                self._send_eof()
        return True  # keep writing the other way (half-close)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.ungranted and not self.done:
            self._grant()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self.done = True
            self.end.forget(self)
            self.end.put(CLOSE, self.id)

    # ------------------------------------------------------------ to the peer
    def _send(self, data: bytes | memoryview) -> memoryview | None:
        """Send what credit allows as DATA frames; return the rest (None: all sent)."""
        size = len(data)
        allowed = min(size, self.credit)
        end = self.end
        self.credit -= allowed
        end.bytes_sent += allowed
        if allowed == size and size <= MAX_DATA:
            end.put(DATA, self.id, data)
            return None
        view = memoryview(data)
        for start in range(0, allowed, MAX_DATA):
            end.put(DATA, self.id, view[start : min(start + MAX_DATA, allowed)])
        return view[allowed:] if allowed < size else None

    def _hold(self, data: bytes | memoryview) -> None:
        """Keep local data until the peer grants credit, and stop reading meanwhile."""
        self.backlog.append(data)
        self.backlog_bytes += len(data)
        if self.backlog_bytes > self.end.peak_backlog:
            self.end.peak_backlog = self.backlog_bytes
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def _send_eof(self) -> None:
        self.eof_sent = True
        self.end.put(EOF, self.id)
        self._finish_if_done()

    # ------------------------------------------------------------ from the peer
    def on_data(self, payload: memoryview) -> None:
        """DATA from the peer: hand it to the local socket."""
        size = len(payload)
        self.allowance -= size
        if self.allowance < 0 or size > MAX_DATA:
            self.end.protocol_errors += 1
            log.warning("tunnel: stream %d: the peer sent beyond its window", self.id)
            self.reset()
            return
        if self.transport is None:
            self.inbox.append(bytes(payload))
            return
        self._deliver(payload)

    def _deliver(self, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        self.ungranted += len(data)
        buffered = transport.get_write_buffer_size()
        if buffered > self.end.peak_buffered:
            self.end.peak_buffered = buffered
        if not self.write_paused and self.ungranted >= GRANT_AT:
            self._grant()

    def _grant(self) -> None:
        self.end.put(WINDOW_UPDATE, self.id, CREDIT.pack(self.ungranted))
        self.allowance += self.ungranted
        self.ungranted = 0

    def on_credit(self, credit: int) -> None:
        """WINDOW from the peer: send what was held back, read again."""
        self.credit += credit
        while self.backlog and self.credit > 0:
            chunk = self.backlog.popleft()
            self.backlog_bytes -= len(chunk)
            rest = self._send(chunk)
            if rest is not None:
                self.backlog.appendleft(rest)
                self.backlog_bytes += len(rest)
                break
        if self.backlog_bytes or self.done:
            return
        if self.local_eof:
            if not self.eof_sent:
                self._send_eof()
        elif self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    def on_eof(self) -> None:
        """EOF from the peer: half-close the local socket once its data is written."""
        if self.peer_eof:
            return
        self.peer_eof = True
        if self.transport is not None:
            self._write_eof()

    def _write_eof(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if transport.can_write_eof():
                transport.write_eof()
            else:  # pragma: no cover - TCP and unix sockets can
                transport.close()
        self._finish_if_done()

    def on_close(self) -> None:
        """CLOSE from the peer: the stream is over; abort the local socket."""
        self.done = True
        self.end.forget(self)
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------ endings
    def _finish_if_done(self) -> None:
        if self.eof_sent and self.peer_eof and not self.done:
            self.done = True
            self.end.forget(self)
            if self.transport is not None:
                self.transport.close()  # after what it still holds is written

    def refused(self) -> None:
        """The agent would not open the stream: close the local socket."""
        self.done = True
        self.end.forget(self)
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        """End the stream from this side: tell the peer, abort the local socket."""
        if not self.done:
            self.done = True
            self.end.forget(self)
            self.end.put(CLOSE, self.id)
        if self.transport is not None:
            self.transport.abort()

    def abort(self) -> None:
        """The connection is gone: abort the local socket, tell nobody."""
        self.done = True
        if self.transport is not None:
            self.transport.abort()
