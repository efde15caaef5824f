"""Container images for the containers backend: pull progress, snapshot registry, streams.

The Docker Engine API answers a pull or a push with a stream of JSON lines
(layer progress, then a digest, or an ``error``). The docker SDK reads that
stream with blocking calls; :func:`iterate_in_thread` moves the reading to a
worker thread and hands the lines to the event loop in order, so progress
reaches the instance's event stream while the pull runs and the loop never
blocks. :class:`PullProgress` turns the lines into a few readable notes;
:class:`Registry` is the ``snapshot_registry`` setting taken apart.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

#: Repository prefix of snapshot images kept on their engine (no ``snapshot_registry``).
LOCAL_SNAPSHOTS = "localhost/labgate-snapshots"
DIGEST_RE = re.compile(r"\bdigest: (sha256:[0-9a-f]{64})\b")
#: Seconds between two progress notes of one pull or push.
NOTE_INTERVAL = 1.0
_DONE_STATES = frozenset({"pull complete", "already exists", "download complete", "pushed"})
_EXISTS_STATES = frozenset({"layer already exists", "already exists"})


async def iterate_in_thread(make: Callable[[], Iterable[T]]) -> AsyncIterator[T]:
    """Items of the blocking iterable ``make()``, read in a worker thread, in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    item, error, done = 0, 1, 2

    def pump() -> None:
        try:
            for value in make():
                loop.call_soon_threadsafe(queue.put_nowait, (item, value))
        except BaseException as exc:  # handed to the loop and raised there
            loop.call_soon_threadsafe(queue.put_nowait, (error, exc))
        else:
            loop.call_soon_threadsafe(queue.put_nowait, (done, None))

    worker = asyncio.ensure_future(asyncio.to_thread(pump))
    try:
        while True:
            kind, value = await queue.get()
            if kind == item:
                yield value
            elif kind == error:
                raise value
            else:
                return
    finally:
        if worker.done():
            await worker
        else:
            # Cancelled or abandoned mid-stream: the thread ends with the engine's stream.
            worker.add_done_callback(lambda f: f.cancelled() or f.exception())


def stream_error(line: dict[str, Any]) -> str | None:
    """The error a pull or push stream line reports, if any."""
    if "error" in line or "errorDetail" in line:
        detail = line.get("errorDetail") or {}
        return str(line.get("error") or detail.get("message") or "unknown error")
    return None


def stream_digest(line: dict[str, Any]) -> str | None:
    """The manifest digest a push stream line announces, if any (Docker and Podman)."""
    aux = line.get("aux")
    if isinstance(aux, dict) and str(aux.get("Digest", "")).startswith("sha256:"):
        return str(aux["Digest"])
    match = DIGEST_RE.search(str(line.get("status", "")))
    return match.group(1) if match else None


def human_bytes(size: float) -> str:
    """``123.4 MB`` style sizes (powers of 1000, like the engines print)."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"  # pragma: no cover - the loop always returns


@dataclass
class PullProgress:
    """Layer progress of a pull or push, summarised into an occasional note."""

    verb: str
    image: str
    layers: dict[str, str] = field(default_factory=dict)
    current: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    last_note: float = 0.0

    def update(self, line: dict[str, Any]) -> str | None:
        """Record one stream line; a note when one is due (at most one per second)."""
        layer = line.get("id")
        status = str(line.get("status", ""))
        if not layer or not status or "digest:" in status:
            return None
        self.layers[layer] = status.lower()
        detail = line.get("progressDetail") or {}
        if detail.get("total"):
            self.total[layer] = int(detail["total"])
            self.current[layer] = int(detail.get("current", 0))
        now = time.monotonic()
        if now - self.last_note < NOTE_INTERVAL:
            return None
        self.last_note = now
        return self.note()

    def summary(self) -> dict[str, int]:
        """Layers done and known, bytes moved and expected."""
        done = sum(1 for state in self.layers.values() if state in _DONE_STATES | _EXISTS_STATES)
        return {
            "layers_done": done,
            "layers": len(self.layers),
            "bytes": sum(self.current.values()),
            "bytes_total": sum(self.total.values()),
        }

    def note(self) -> str:
        """``pulling image X: 2 of 5 layers, 12.0 MB of 80.0 MB``."""
        s = self.summary()
        text = f"{self.verb} {self.image}: {s['layers_done']} of {s['layers']} layers"
        if s["bytes_total"]:
            text += f", {human_bytes(s['bytes'])} of {human_bytes(s['bytes_total'])}"
        return text


def _next_page(scheme: str, host: str, link: str) -> str | None:
    """The next page of a paginated registry answer (its ``Link`` header), if any."""
    if 'rel="next"' not in link:
        return None
    target = link.split(";", 1)[0].strip().strip("<>")
    return target if "://" in target else f"{scheme}://{host}{target}"


#: A repository name in the registry API: path components of the OCI grammar (lower case).
_NAME_RE = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)
#: A manifest reference in the registry API: a tag, or a sha256 digest.
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_MANIFEST_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


#: The manifest types asked for when checking that an image is in a registry.
MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


@dataclass(frozen=True)
class Registry:
    """Where image snapshots are pushed: the ``snapshot_registry`` setting taken apart."""

    #: ``host[:port]`` as it appears in image references.
    host: str
    #: Path under the host that every snapshot repository starts with (may be empty).
    namespace: str
    #: ``https`` unless the setting says ``http://`` (a plain-HTTP registry).
    scheme: str = "https"
    username: str = ""
    password: str = ""

    @classmethod
    def parse(cls, value: str, username: str = "", password: str = "") -> Registry | None:
        """``[http[s]://]host[:port][/namespace]``; None when ``value`` is empty."""
        value = value.strip().rstrip("/")
        if not value:
            return None
        scheme = "https"
        if "://" in value:
            scheme, value = value.split("://", 1)
            if scheme not in ("http", "https"):
                raise ValueError(f"snapshot_registry: unknown scheme {scheme!r}")
        host, _, namespace = value.partition("/")
        if not host:
            raise ValueError("snapshot_registry: no registry host")
        if "@" in host:
            # The host is in every snapshot's image reference, which users see: the value
            # is not repeated here either (errors never repeat a secret).
            raise ValueError(
                "snapshot_registry: credentials do not go in its URL (every user would see "
                "them in image references); set snapshot_registry_username and "
                "snapshot_registry_password"
            )
        return cls(host, namespace.strip("/"), scheme, username, password)

    def repository(self, *parts: str) -> str:
        """``host/namespace/part/part``."""
        return "/".join(p for p in (self.host, self.namespace, *parts) if p)

    def holds(self, reference: str) -> bool:
        """Whether an image reference lives in this registry."""
        return reference.startswith(self.host + "/")

    def manifest_url(self, repository: str, reference: str, *, digest_only: bool = False) -> str:
        """``/v2/<name>/manifests/<reference>`` of ``repository`` in this registry.

        Refuses (ValueError) a repository outside this registry, a name or a
        reference that is not one (``..``, ``/``, capitals, a digest that is not
        ``sha256:`` and 64 hex digits): the URL is normalised before it is sent,
        so ``sha256:x/../../../<another repository>/manifests/<digest>`` would
        reach another user's image with labgate's credentials.
        """
        if not repository.startswith(self.host + "/"):
            raise ValueError(f"{repository!r} is not in the registry {self.host}")
        name = repository.removeprefix(self.host + "/")
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"not a repository name: {name!r}")
        if not _MANIFEST_DIGEST_RE.fullmatch(reference) and (
            digest_only or not _TAG_RE.fullmatch(reference)
        ):
            raise ValueError(f"not a manifest {'digest' if digest_only else 'tag'}: {reference!r}")
        return f"{self.scheme}://{self.host}/v2/{name}/manifests/{reference}"

    def auth_config(self) -> dict[str, str] | None:
        """Credentials for the engine's pull and push, if any."""
        if not self.username:
            return None
        return {"username": self.username, "password": self.password}

    async def delete_manifest(self, repository: str, digest: str) -> bool:
        """Delete ``repository@digest`` through the registry API; False when not there.

        The registry must allow deletes (``storage.delete.enabled``); disk space
        comes back with its garbage collection.
        """
        url = self.manifest_url(repository, digest, digest_only=True)
        auth = (self.username, self.password) if self.username else None
        async with httpx.AsyncClient(timeout=30, auth=auth) as client:
            response = await client.delete(url)
        if response.status_code == 404:
            return False
        response.raise_for_status()
        return True

    async def find_manifest(self, repository: str, reference: str) -> str | None:
        """The digest of ``repository:reference`` (a tag or digest); None when it is absent.

        Raises :class:`httpx.HTTPError` when the registry cannot be asked or
        answers anything but found (200) or not found (404).
        """
        url = self.manifest_url(repository, reference)
        auth = (self.username, self.password) if self.username else None
        async with httpx.AsyncClient(timeout=30, auth=auth) as client:
            response = await client.head(url, headers={"Accept": MANIFEST_TYPES})
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.headers.get("Docker-Content-Digest") or reference

    async def snapshot_tags(self) -> dict[str, list[str]]:
        """Every repository under this registry's namespace, with its tags (catalog API)."""
        auth = (self.username, self.password) if self.username else None
        prefix = f"{self.namespace}/" if self.namespace else ""
        found: dict[str, list[str]] = {}
        async with httpx.AsyncClient(timeout=30, auth=auth) as client:
            url: str | None = f"{self.scheme}://{self.host}/v2/_catalog?n=1000"
            names: list[str] = []
            while url is not None:
                response = await client.get(url)
                response.raise_for_status()
                names += response.json().get("repositories") or []
                url = _next_page(self.scheme, self.host, response.headers.get("link", ""))
            for name in names:
                if not name.startswith(prefix) or not _NAME_RE.fullmatch(str(name)):
                    continue
                response = await client.get(f"{self.scheme}://{self.host}/v2/{name}/tags/list")
                if response.status_code == 404:
                    continue
                response.raise_for_status()
                found[f"{self.host}/{name}"] = list(response.json().get("tags") or [])
        return found

    async def manifest_digest(self, repository: str, tag: str) -> str | None:
        """The digest the registry serves for ``repository:tag`` (a push that did not say)."""
        url = self.manifest_url(repository, tag)
        auth = (self.username, self.password) if self.username else None
        async with httpx.AsyncClient(timeout=30, auth=auth) as client:
            response = await client.head(url, headers={"Accept": MANIFEST_TYPES})
        digest = response.headers.get("Docker-Content-Digest")
        return digest if response.status_code == 200 and digest else None
