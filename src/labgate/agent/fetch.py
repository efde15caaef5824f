"""Fetching a URL dataset into a site's cache, with progress and checksum verification.

Used when a launch asks for a URL dataset that no site holds: the bytes are
streamed into a partial directory next to the cache entry, hashed on the way,
checked against the registered size and checksum, and only then renamed into
place, so a cache entry is either complete and verified or absent.

The bytes are taken as the server sends them: the fetch asks for no content
coding and refuses a response that has one (``gzip, gzip`` of a few hundred
bytes would decode to gigabytes before any size check). A server that sends
less than :data:`MIN_RATE` bytes a second over a :data:`RATE_WINDOW` fails
the fetch, so a trickle cannot hold a launch (and the dataset's lock) forever.

The server fetches on behalf of whoever registered the URL, so it refuses
(unless ``dataset_fetch_private_networks`` is set) hosts that resolve to
loopback, private, link-local or otherwise non-public addresses, at every
redirect. A host whose DNS answer changes between that check and the
connection (DNS rebinding) is not caught; deployments that must rule it out
fetch through an egress proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from labgate import __version__
from labgate.errors import LabgateError
from labgate.wire.checksums import hasher, slugify

#: Bytes gathered before they are written to the cache file.
WRITE_AT = 1024 * 1024
MAX_REDIRECTS = 5
PROGRESS_INTERVAL = 1.0
#: Slowest download taken, in bytes a second, averaged over each RATE_WINDOW seconds.
MIN_RATE = 16 * 1024
RATE_WINDOW = 60.0
TIMEOUT = httpx.Timeout(30.0, read=60.0)

Progress = Callable[[int, int | None], Awaitable[None]]


class FetchError(LabgateError):
    """A dataset could not be fetched; the detail says why."""

    status = 502
    default_code = "fetch_failed"


@dataclass(frozen=True)
class FetchJob:
    """One download into a cache entry."""

    url: str
    #: The cache entry: a directory holding the one fetched file.
    directory: Path
    max_bytes: int
    expected_size: int | None = None
    #: ``<algorithm>:<hex>``; empty means compute SHA-256 and record it.
    checksum: str = ""
    allow_private: bool = False


@dataclass(frozen=True)
class Fetched:
    """A completed, verified cache entry."""

    directory: Path
    file: Path
    size: int
    checksum: str
    verified: bool
    #: Found complete in the cache (fetched by an earlier launch): not fetched again.
    cached: bool = False


def complete_entry(directory: Path) -> Fetched | None:
    """The cache entry at ``directory`` if a finished fetch left it there (one file), else None.

    Entries appear only complete (renamed into place after verification), so
    an entry with its one file is a finished one.
    """
    if not directory.is_dir():
        return None
    files = [path for path in directory.iterdir() if path.is_file()]
    if len(files) != 1:
        return None
    size = files[0].stat().st_size
    return Fetched(directory, files[0], size, checksum="", verified=False, cached=True)


def file_name(url: str) -> str:
    """The name the fetched file gets: the URL's last path segment, made safe."""
    last = unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    stem, dot, ext = last.rpartition(".")
    safe = f"{slugify(stem)}.{slugify(ext)}".strip(".") if dot and stem else slugify(last)
    return safe or "data"


async def check_host(url: str, allow_private: bool) -> None:
    """Refuse URLs that are not http(s), or whose host is not public (unless allowed)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"cannot fetch {url!r}: only http and https URLs are fetched")
    if allow_private:
        return
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(parts.hostname, parts.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise FetchError(f"cannot resolve {parts.hostname}: {exc}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise FetchError(
                f"refusing to fetch from {parts.hostname} ({address}): not a public address "
                "(setting dataset_fetch_private_networks allows it)"
            )


async def fetch(job: FetchJob, progress: Progress) -> Fetched:
    """Download ``job.url`` into ``job.directory``; see the module docstring."""
    if job.expected_size is not None and job.expected_size > job.max_bytes:
        raise FetchError(f"the dataset is {job.expected_size} bytes, over the fetch limit")
    partial = await asyncio.to_thread(_partial_dir, job.directory)
    try:
        target = partial / file_name(job.url)
        try:
            size, digest = await _download(job, target, progress)
        except httpx.HTTPError as exc:  # cut off, timed out, refused, not HTTP...
            raise FetchError(f"fetching {job.url} failed: {exc or type(exc).__name__}") from None
        computed = f"{job.checksum.partition(':')[0] or 'sha256'}:{digest}"
        if job.checksum and computed != job.checksum:
            raise FetchError(
                f"checksum mismatch for {job.url}: expected {job.checksum}, got {computed}; "
                "the download was discarded"
            )
        if job.expected_size is not None and size != job.expected_size:
            raise FetchError(
                f"size mismatch for {job.url}: expected {job.expected_size} bytes, got {size}"
            )
        await asyncio.to_thread(_replace_dir, partial, job.directory)
        return Fetched(
            directory=job.directory,
            file=job.directory / target.name,
            size=size,
            checksum=computed,
            verified=bool(job.checksum),
        )
    finally:
        await asyncio.to_thread(shutil.rmtree, partial, True)


async def _download(job: FetchJob, target: Path, progress: Progress) -> tuple[int, str]:
    url = job.url
    # The file as it is: no content coding to undo (and so none to bomb the agent with).
    headers = {
        "User-Agent": f"labgate/{__version__} (dataset fetch)",
        "Accept-Encoding": "identity",
    }
    async with httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            await check_host(url, job.allow_private)
            async with client.stream("GET", url, headers=headers) as response:
                if response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise FetchError(f"{url} answered {response.status_code}, not the data")
                coding = response.headers.get("content-encoding", "identity").strip().lower()
                if coding not in ("", "identity"):
                    raise FetchError(
                        f"{url} sent the data encoded ({coding[:64]}) although asked not to; "
                        "it is not fetched"
                    )
                total = _content_length(response)
                if total is not None and total > job.max_bytes:
                    raise FetchError(
                        f"{url} is {total} bytes, over the fetch limit of {job.max_bytes}"
                    )
                return await _save(response, target, job, total or job.expected_size, progress)
    raise FetchError(f"{job.url} redirected more than {MAX_REDIRECTS} times")


async def _save(
    response: httpx.Response, target: Path, job: FetchJob, total: int | None, progress: Progress
) -> tuple[int, str]:
    digest = hasher(job.checksum)
    size = 0
    last = window_start = time.monotonic()
    window_size = 0
    pending = bytearray()
    await progress(0, total)
    handle = await asyncio.to_thread(target.open, "wb")
    with handle:
        async for chunk in response.aiter_raw():  # as it comes: the rate is checked on the way
            size += len(chunk)
            if size > job.max_bytes:
                raise FetchError(f"{job.url} is larger than the fetch limit of {job.max_bytes}")
            now = time.monotonic()
            if now - window_start >= RATE_WINDOW:
                if size - window_size < MIN_RATE * (now - window_start):
                    raise FetchError(
                        f"{job.url} sent {size - window_size} bytes in {now - window_start:.0f} s, "
                        f"slower than {MIN_RATE // 1024} KiB/s: the download was given up"
                    )
                window_start, window_size = now, size
            digest.update(chunk)
            pending += chunk
            if len(pending) >= WRITE_AT:  # one write (one thread hop) per MiB, not per read
                await asyncio.to_thread(handle.write, pending)
                pending = bytearray()
            if now - last >= PROGRESS_INTERVAL:
                last = now
                await progress(size, total)
        await asyncio.to_thread(handle.write, pending)
    await progress(size, total)
    return size, digest.hexdigest()


def _content_length(response: httpx.Response) -> int | None:
    with contextlib.suppress(KeyError, ValueError):
        return int(response.headers["content-length"])
    return None


def _partial_dir(directory: Path) -> Path:
    """A fresh, private directory next to the cache entry, for the download under way."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".partial-", dir=directory.parent))


def _replace_dir(partial: Path, directory: Path) -> None:
    """Make the finished download read-only and move it into place, replacing an older one."""
    for path in partial.iterdir():
        path.chmod(0o444)
    if directory.exists():
        old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
        directory.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    partial.rename(directory)
    # Readable by the tools of every user (they see it read-only at /data/<name>).
    directory.chmod(0o755)
