"""A URL dataset's server cannot bomb or stall the site agent that fetches it."""

from __future__ import annotations

import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from labgate.agent import fetch as fetching

LIMIT = 1024**2  # the site's fetch limit in these tests


def _gzip(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    return packer.compress(data) + packer.flush()


def _gzip_zeros(size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1024**2)
    return b"".join(packer.compress(block) for _ in range(size // len(block))) + packer.flush()


def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/data.bin"
    finally:
        server.shutdown()
        server.server_close()


class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def bomb_url() -> Iterator[str]:
    """Two layers of gzip: 200 MiB of zeros in a few hundred bytes."""
    body = _gzip(_gzip_zeros(200 * 1024**2))

    class Bomb(_Quiet):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip, gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    yield from _serve(Bomb)


@pytest.fixture
def trickle_url() -> Iterator[str]:
    """A server that sends a few bytes now and then, never enough to finish."""

    class Trickle(_Quiet):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(LIMIT))
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x" * 10)
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

    yield from _serve(Trickle)


async def _nothing(done: int, total: int | None) -> None:
    pass


async def test_a_content_encoded_answer_is_refused_not_decoded(bomb_url, tmp_path) -> None:
    job = fetching.FetchJob(bomb_url, tmp_path / "entry", max_bytes=LIMIT, allow_private=True)
    tracemalloc.start()
    try:
        with pytest.raises(fetching.FetchError, match="encoded"):
            await fetching.fetch(job, _nothing)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * LIMIT, f"the agent held {peak / 2**20:.0f} MiB for a tiny answer"
    assert not (tmp_path / "entry").exists()


async def test_a_trickling_server_fails_the_fetch(trickle_url, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(fetching, "RATE_WINDOW", 1.0)  # 60 s in use: a test waits less
    job = fetching.FetchJob(trickle_url, tmp_path / "entry", max_bytes=LIMIT, allow_private=True)
    started = time.monotonic()
    with pytest.raises(fetching.FetchError, match="slower than"):
        await fetching.fetch(job, _nothing)
    assert time.monotonic() - started < 10
    assert not (tmp_path / "entry").exists()
