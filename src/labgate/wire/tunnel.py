"""The instance tunnel's framing: byte streams to a site's instances over one connection.

For a site with ``reach = "tunnel"`` nothing can connect into the site, so
the router reaches its instances through a *data connection* the site's agent
dials out to the router's public port (``GET`` :data:`TUNNEL_PATH` with
``Upgrade:`` :data:`UPGRADE`, then these frames both ways, nothing else).
Each connection the router makes to a tunneled instance becomes one *stream*;
the agent opens a connection to the instance's endpoint, as its own records
say, and bytes flow both ways. HTTP keep-alive, WebSocket upgrades and long
downloads need nothing more than a byte stream.

A frame is ``>BII`` (type, stream id, payload length) and its payload. Stream
ids are chosen by the router.

======== ============ ==============================================
type     direction    payload
======== ============ ==============================================
OPEN     router→agent JSON ``{"instance_id": ...}``
OPENED   agent→router none
REFUSED  agent→router the reason, UTF-8
DATA     both         bytes (at most :data:`MAX_DATA`)
WINDOW   both         ``>I``: credit in bytes
EOF      both         none: the sender is done writing (half-close)
CLOSE    both         none: the stream is over, both ways (abort)
======== ============ ==============================================

Flow control is per stream, as in HTTP/2 or SSH: a side may have at most
one *window* of DATA sent and not yet granted back, the receiver's. The
agent's receive window is :data:`WINDOW`; the router's is
:data:`ROUTER_WINDOW` (what agents send it: downloads, the larger flow),
which its ``101`` answer says in :data:`WINDOW_HEADER` (an agent that reads
no such header keeps to :data:`WINDOW`). The receiver grants credit once it
has handed half of :data:`WINDOW` to its local side and that side is not
pushing back; a sender out of credit stops reading its local side. So one
slow reader stalls only its own stream, the shared connection never waits on
it, and each stream holds at most about one window in memory at each end. The
router sends DATA right after OPEN (no round trip per stream); the agent
holds it until the instance's connection is up.

A peer that breaks the protocol is not trusted to mend it. One that sends
beyond its credit, or grants more than was sent (credit above the window),
loses the stream. A frame of an unknown type, or of a type the peer may not
send (an agent's OPEN), or one longer than any allowed ends the connection,
logged once. Empty DATA is ignored (it costs no credit, so nothing else
bounds it), and the agent refuses an OPEN longer than :data:`MAX_OPEN`.

A tunneled byte costs each end a read and a write and little else: sockets
are read into reused buffers (:class:`ReadBuffers`; asyncio's buffered
protocols), not into a new bytes object per read. The agent reads an
instance's socket at most as much as the stream's credit allows and sends
each read at once as DATA frames, headers and the buffer in one
``writev``; the router reads a large DATA frame's rest and the next header
in one read, so each read hands a stream one piece.

This module is the part both ends share (the router imports only ``wire``):
:class:`TunnelEnd` (the streams of one data connection: frames in and out)
and :class:`TunnelStream` (one stream: the asyncio protocol of its local
side, holding the stream's credit both ways; :class:`PipeStream` at the
router, :class:`SocketStream` at the agent). The router's end is
:mod:`labgate.router.tunnel`, the agent's :mod:`labgate.agent.tunnel`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

OPEN, OPENED, REFUSED, DATA, WINDOW_UPDATE, EOF, CLOSE = range(1, 8)
#: Type, stream id and payload length in front of every frame.
HEADER = struct.Struct(">BII")
#: The payload of a WINDOW frame.
CREDIT = struct.Struct(">I")
#: Longest OPEN payload an agent takes (the router's is ``{"instance_id": ...}``).
MAX_OPEN = 1024
#: Largest DATA payload: one read of a socket (uvloop reads up to 256 KiB), one frame.
MAX_DATA = 256 * 1024
#: Where an agent dials its data connection (the router answers it, not the portal).
TUNNEL_PATH = "/api/v1/agent/tunnel"
#: The protocol name of the ``Upgrade`` header.
UPGRADE = "labgate-tunnel"
#: The router's answer names which of its worker processes took the connection: ``i/N``.
WORKER_HEADER = "Labgate-Tunnel-Worker"
#: Bytes a side may send on one stream before the receiver grants more, unless the
#: receiver said another figure (:data:`WINDOW_HEADER`): the agent's receive window.
WINDOW = 1024 * 1024
#: The router's receive window per stream: a download's reads at the agent are as large
#: as its credit, and one 1 MiB answer with its head fits in one window.
ROUTER_WINDOW = 2 * 1024 * 1024
#: The header of the router's ``101`` answer that says its receive window, in bytes.
WINDOW_HEADER = "Labgate-Tunnel-Window"
#: The receive windows a side takes from its peer's word (anything else: :data:`WINDOW`).
WINDOW_RANGE = (64 * 1024, 16 * 1024 * 1024)


#: A piece of DATA smaller than this is copied rather than handed on as a view of a
#: reused read buffer (a view queued by a slow reader keeps the whole buffer).
COPY_BELOW = 64 * 1024
#: An instance's socket is read up to this many DATA frames at a time (fewer reads and writes).
READ_FRAMES = 4
#: A read of the connection in a DATA frame with this much still to come ends at the next header.
ALIGN_AT = 16 * 1024

#: Socket buffers of a data connection: room for several streams' windows in flight.
SOCKET_BUFFER = 4 * 1024 * 1024


def roomy(transport: asyncio.BaseTransport) -> None:
    """Give a data connection large socket buffers and no Nagle delay (fewer, larger syscalls)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(transport, "set_write_buffer_limits"):
        transport.set_write_buffer_limits(high=SOCKET_BUFFER)


class ReadBuffers:
    """Reusable buffers to read sockets into, so that a read allocates and copies nothing.

    A buffer handed out is reused for the next read only once nothing holds a
    view of it any more: a transport that could not send a view at once keeps
    it (uvloop queues views, it does not copy them), and a bytearray with
    views alive cannot be resized, which :meth:`take` tests. Such a buffer is
    set aside until it is free again; a few are kept, more are allocated.
    """

    #: Buffers kept set aside or free at most (more are left to the garbage collector).
    KEEP = 8

    def __init__(self, size: int) -> None:
        self.size = size
        self.current = bytearray()  # allocated on first use: not every end reads sockets
        self._lent: list[bytearray] = []
        self.allocated = 0  # buffers allocated so far (tests)

    def take(self) -> bytearray:
        """A buffer of :attr:`size` bytes that nothing else refers to."""
        current = self.current
        if _free(current):
            if len(current) != self.size:
                self.current = current = bytearray(self.size)
                self.allocated += 1
            return current
        lent = self._lent
        for i, buf in enumerate(lent):
            if _free(buf):
                lent[i] = current
                self.current = buf
                return buf
        if len(lent) < self.KEEP:
            lent.append(current)
        self.current = bytearray(self.size)
        self.allocated += 1
        return self.current


def _free(buf: bytearray) -> bool:
    """Whether no view of ``buf`` is alive (a bytearray with views cannot grow)."""
    try:
        buf.append(0)
    except BufferError:
        return False
    del buf[-1]
    return True


class TunnelStream:
    """A local connection's side of one stream; created by the tunnel ends, not by callers.

    The asyncio protocol of the local side, holding the stream's credit both
    ways; how it reads is its subclass's: :class:`PipeStream` (the router's
    in-process :class:`~labgate.router.tunnel.Pipe`, ``data_received``) or
    :class:`SocketStream` (the agent's socket to the instance, read into a
    reused buffer).
    """

    def __init__(self, end: TunnelEnd, stream_id: int, instance_id: str, *, opening: bool) -> None:
        self.end = end
        self.id = stream_id
        self.instance_id = instance_id
        #: Portal side: announce the stream when the local connection comes in.
        self.opening = opening
        self.transport: asyncio.Transport | None = None
        self.credit = end.send_window  # DATA bytes this side may still send
        self.allowance = end.receive_window  # DATA bytes the peer may still send
        #: Credit is granted back once this many bytes are delivered: half a window, of the
        #: smaller (a sender that assumes 1 MiB never waits for a grant that comes at 1 MiB).
        self.grant_at = min(end.receive_window, WINDOW) // 2
        self.ungranted = 0  # delivered locally, not yet granted back
        self.backlog: deque[bytes | memoryview] = deque()  # read locally, waiting for credit
        self.backlog_bytes = 0
        #: From the peer before the local socket is up (agent); the allowance bounds it.
        self.inbox = bytearray()
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
        if self.inbox:
            inbox, self.inbox = self.inbox, bytearray()
            self._deliver(inbox)
        if self.peer_eof:
            self._write_eof()

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
        """DATA from the peer: hand it to the local socket (empty DATA: ignored)."""
        size = len(payload)
        if not size:  # costs no credit: a flood of them, kept, would grow without bound
            return
        self.allowance -= size
        if self.allowance < 0 or size > MAX_DATA:
            self._broken("sent beyond its window")
            return
        if self.transport is None:
            self.inbox += payload
            return
        # A view the local side keeps (queued for a slow reader) keeps its whole read
        # buffer: only a large piece may, so what is kept is at most a few times what
        # the stream's credit lets be queued.
        self._deliver(payload if size >= COPY_BELOW else bytes(payload))

    def _deliver(self, data: bytes | bytearray | memoryview) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        self.ungranted += len(data)
        buffered = transport.get_write_buffer_size()
        if buffered > self.end.peak_buffered:
            self.end.peak_buffered = buffered
        if not self.write_paused and self.ungranted >= self.grant_at:
            self._grant()

    def _grant(self) -> None:
        self.end.put(WINDOW_UPDATE, self.id, CREDIT.pack(self.ungranted))
        self.allowance += self.ungranted
        self.ungranted = 0

    def on_credit(self, credit: int) -> None:
        """WINDOW from the peer: send what was held back, read again.

        An honest peer grants back only what it was sent: credit above the
        peer's window (:attr:`TunnelEnd.send_window`) loses the stream.
        """
        self.credit += credit
        if self.credit > self.end.send_window:
            self._broken("granted more credit than it was sent")
            return
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
    def _broken(self, what: str) -> None:
        """The peer broke the stream's flow control: count it, say so once, reset the stream."""
        self.end.protocol_errors += 1
        log.warning("tunnel: stream %d: the peer %s", self.id, what)
        self.reset()

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


class PipeStream(TunnelStream, asyncio.Protocol):
    """A stream whose local side hands it bytes (router's :class:`~labgate.router.tunnel.Pipe`)."""

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        if self.backlog_bytes or self.credit <= 0:
            self._hold(data)
        else:
            rest = self._send(data)
            if rest is not None:
                self._hold(rest)


class SocketStream(TunnelStream, asyncio.BufferedProtocol):
    """A stream whose local side is a socket (the agent's, to the instance).

    Each read goes straight into the end's reused buffer
    (:attr:`TunnelEnd.buffers`), at most what the stream's credit allows (and
    :data:`READ_FRAMES` frames), and leaves at once as DATA frames in one
    write: no bytes object per read and no copy of it in Python. Reading
    pauses when the credit is spent, so nothing read waits for credit.
    """

    def get_buffer(self, sizehint: int) -> memoryview:
        buf = self.end.buffers.take()
        size = min(self.credit, len(buf))
        # Never an empty buffer (the loop would fail the transport): a read without credit
        # (reading was paused just too late) is held back, as a copy.
        return memoryview(buf)[: size if size > 0 else MAX_DATA]

    def buffer_updated(self, nbytes: int) -> None:
        if self.done:
            return
        end = self.end
        view = memoryview(end.buffers.current)[:nbytes]
        if self.backlog_bytes or self.credit < nbytes:
            self._hold(bytes(view))
            return
        self.credit -= nbytes
        end.bytes_sent += nbytes
        if nbytes < COPY_BELOW:
            # A small read goes as a copy, with the other frames of this pass of the loop
            # (small answers on many streams leave in one write).
            end.put(DATA, self.id, bytes(view))
        elif nbytes < MAX_DATA and end.queued():
            # The connection is backed up and will queue it: a view of a read this small
            # would keep a whole buffer, more than four times its size.
            end.put_now(DATA, self.id, bytes(view))
        else:
            # A view even when the connection queues it: the buffer is set aside until
            # written (ReadBuffers), rather than copied into fresh memory on every read.
            end.put_now(DATA, self.id, view)
        if self.credit <= 0 and not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()


class TunnelEnd:
    """One end of a data connection: the streams it carries, frames in and out.

    ``writelines`` puts pieces of bytes on the connection (a transport's
    ``writelines``: uvloop writes them with one ``writev``, no copy); give it
    with :meth:`attach`. Hand every chunk read from the connection to
    :meth:`feed` (frames may straddle chunks); call :meth:`detach` when the
    connection is gone. Frames queued in one pass of the event loop leave in
    one write. ``receive_window`` is this end's per-stream window; the peer's
    is :attr:`send_window` (:data:`WINDOW` until the peer says another).
    """

    def __init__(self, receive_window: int = WINDOW) -> None:
        self.streams: dict[int, TunnelStream] = {}
        self.receive_window = receive_window
        self.send_window = WINDOW
        self._write: Callable[[list[bytes | memoryview]], None] | None = None
        self._buffered: Callable[[], int] | None = None
        self._out: list[bytes | memoryview] = []
        #: What local sockets (:class:`SocketStream`) are read into.
        self.buffers = ReadBuffers(READ_FRAMES * MAX_DATA)
        #: What the connection is read into (:meth:`get_buffer`).
        self.in_buffers = ReadBuffers(MAX_DATA + HEADER.size)
        self._flushing = False
        self._partial = b""  # a header or control frame cut across reads
        self._data_left = 0  # payload bytes of a DATA frame still to come
        self._data_stream = 0
        # Counters, for metrics and tests.
        self.streams_opened = 0
        self.streams_refused = 0
        self.bytes_sent = 0  # DATA payload bytes put on the connection
        self.bytes_received = 0  # DATA payload bytes taken off it
        self.protocol_errors = 0
        self.peak_queued = 0  # largest write buffer of the connection seen
        self.peak_buffered = 0  # largest write buffer of a local side seen
        self.peak_backlog = 0  # largest local read held back for want of credit

    @property
    def connected(self) -> bool:
        """Whether a connection carries the streams now."""
        return self._write is not None

    def attach(
        self,
        writelines: Callable[[list[bytes | memoryview]], None],
        buffered: Callable[[], int] | None = None,
    ) -> None:
        """Carry streams on a connection from now on (``buffered``: its write buffer size)."""
        self._write = writelines
        self._buffered = buffered
        self._partial = b""
        self._data_left = 0

    def detach(self, reason: str) -> None:
        """The connection is gone: abort every stream's local side at once."""
        self._write = None
        self._out.clear()
        self._partial = b""
        self._data_left = 0
        for stream in list(self.streams.values()):
            stream.abort()
        self.streams.clear()
        if reason:
            log.debug("tunnel: connection gone (%s)", reason)

    # ----------------------------------------------------------------- sending
    def put(self, kind: int, stream_id: int, payload: bytes | memoryview = b"") -> None:
        """Queue one frame for the connection (dropped when there is none)."""
        if self._write is None:
            return
        self._out.append(HEADER.pack(kind, stream_id, len(payload)))
        if payload:
            self._out.append(payload)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self.flush)

    def queued(self) -> int:
        """Bytes waiting in the connection's write buffer."""
        return self._buffered() if self._buffered is not None else 0

    def put_now(self, kind: int, stream_id: int, payload: bytes | memoryview) -> None:
        """Write a frame now, after whatever was queued, in one write.

        A payload longer than :data:`MAX_DATA` goes as several frames.
        """
        if self._write is None:
            return
        out, self._out = self._out, []
        size = len(payload)
        if size <= MAX_DATA:
            out.append(HEADER.pack(kind, stream_id, size))
            out.append(payload)
        else:
            view = memoryview(payload)
            for start in range(0, size, MAX_DATA):
                piece = view[start : start + MAX_DATA]
                out.append(HEADER.pack(kind, stream_id, len(piece)))
                out.append(piece)
        self._write(out)
        if self._buffered is not None:
            queued = self._buffered()
            if queued > self.peak_queued:
                self.peak_queued = queued

    def flush(self) -> None:
        """Write what was queued, in one write."""
        self._flushing = False
        out, write = self._out, self._write
        if not out or write is None:
            out.clear()
            return
        self._out = []
        write(out)
        if self._buffered is not None:
            queued = self._buffered()
            if queued > self.peak_queued:
                self.peak_queued = queued

    # ----------------------------------------------------------------- receiving
    def get_buffer(self, sizehint: int) -> memoryview:
        """Where to read the connection into (an end that is an asyncio BufferedProtocol).

        In a large DATA frame, the read is sized to end with the next frame's
        header: each read then hands a stream one piece, and the next read
        begins at a payload. Otherwise it takes what is there, up to a frame.
        """
        buf = self.in_buffers.take()
        left = self._data_left
        if left >= ALIGN_AT:
            return memoryview(buf)[: left + HEADER.size]
        return memoryview(buf)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were read into the buffer of :meth:`get_buffer`."""
        self.feed(memoryview(self.in_buffers.current)[:nbytes])

    def feed(self, data: bytes | memoryview) -> None:
        """Handle bytes read from the connection: frames may straddle reads.

        DATA goes to its stream as it arrives, a frame cut across reads in
        pieces, so no payload is copied here; only a cut header or a cut
        control frame (a few bytes) is kept for the next read.
        """
        offset, size = 0, len(data)
        while offset < size:
            if self._data_left:
                offset = self._data_rest(data, offset)
            elif self._partial:
                offset = self._complete(data, offset)
            else:
                offset = self._frames(data, offset)
            if offset < 0 or self._write is None:
                return

    def _data_rest(self, data: bytes | memoryview, offset: int) -> int:
        """The next piece of a DATA frame begun in an earlier read."""
        take = min(self._data_left, len(data) - offset)
        self._data_left -= take
        stream = self.streams.get(self._data_stream)
        if stream is not None:
            self.bytes_received += take
            stream.on_data(memoryview(data)[offset : offset + take])
        return offset + take

    def _complete(self, data: bytes | memoryview, offset: int) -> int:
        """Complete a header (or a small control frame) begun in an earlier read."""
        header = HEADER.size
        partial, self._partial = self._partial, b""
        if len(partial) < header:
            take = min(header - len(partial), len(data) - offset)
            partial += data[offset : offset + take]
            offset += take
            if len(partial) < header:
                self._partial = partial
                return offset
        kind, stream_id, length = HEADER.unpack_from(partial)
        if length > MAX_DATA + header:
            self._too_long(length)
            return -1
        if kind == DATA:
            self._data_stream, self._data_left = stream_id, length
            return offset
        need: int = header + length - len(partial)
        if offset + need > len(data):
            self._partial = partial + data[offset:]
            return len(data)
        self._frames(partial + data[offset : offset + need], 0)
        return offset + need

    def _frames(self, data: bytes | memoryview, offset: int) -> int:
        """Handle the frames of ``data`` from ``offset``; where it stopped (-1: stop reading)."""
        view = memoryview(data)
        size = len(data)
        header = HEADER.size
        streams = self.streams
        while offset < size:
            if size - offset < header:
                self._partial = bytes(data[offset:])
                return size
            kind, stream_id, length = HEADER.unpack_from(data, offset)
            if length > MAX_DATA + header:
                self._too_long(length)
                return -1
            end = offset + header + length
            if end > size:
                if kind == DATA:  # the rest comes in later reads
                    self._data_stream, self._data_left = stream_id, length
                    return offset + header
                self._partial = bytes(data[offset:])
                return size
            payload = view[offset + header : end]
            offset = end
            stream = streams.get(stream_id)
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
            if self._write is None:  # the connection went while handling a frame
                return -1
        return offset

    def _too_long(self, length: int) -> None:
        self._violation(f"a frame of {length} bytes")
        self.lost("protocol error")

    def control(self, kind: int, stream_id: int, stream: TunnelStream | None, body: bytes) -> None:
        """Handle a frame type only one side takes (OPEN, OPENED, REFUSED).

        The subclass takes its own; any other type (unknown, or one only this
        side sends) is beyond repair: the connection ends.
        """
        self._violation(f"unexpected frame type {kind} for stream {stream_id}")
        self.lost("protocol error")

    def lost(self, reason: str) -> None:
        """The peer broke the protocol beyond repair: end the connection (the subclass does)."""
        self.detach(reason)

    def _violation(self, what: str) -> None:
        self.protocol_errors += 1
        log.warning("tunnel: protocol error from the peer: %s", what)

    def opening(self, stream: TunnelStream) -> bool:
        """A local connection came in for ``stream``; False: refuse it (only the router opens)."""
        return False

    def forget(self, stream: TunnelStream) -> None:
        """Drop a finished stream."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
