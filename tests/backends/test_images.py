"""Pull and push streams, progress notes and the snapshot registry setting."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from labgate.backends import images
from labgate.backends.images import (
    PullProgress,
    Registry,
    human_bytes,
    iterate_in_thread,
    stream_digest,
    stream_error,
)


def test_registry_setting_is_taken_apart() -> None:
    assert Registry.parse("") is None
    plain = Registry.parse("http://127.0.0.1:5000/labgate/", "u", "p")
    assert plain is not None
    assert (plain.scheme, plain.host, plain.namespace) == ("http", "127.0.0.1:5000", "labgate")
    assert plain.repository("alice", "demo") == "127.0.0.1:5000/labgate/alice/demo"
    assert plain.holds("127.0.0.1:5000/labgate/alice/demo:x")
    assert not plain.holds("docker.io/library/python:3")
    assert plain.auth_config() == {"username": "u", "password": "p"}
    bare = Registry.parse("registry.example.org")
    assert bare is not None and bare.scheme == "https" and bare.namespace == ""
    assert bare.repository("a", "b") == "registry.example.org/a/b"
    assert bare.auth_config() is None
    with pytest.raises(ValueError, match="scheme"):
        Registry.parse("ftp://x")


def test_stream_lines_of_docker_and_podman() -> None:
    digest = "sha256:" + "ab" * 32
    assert stream_digest({"aux": {"Tag": "t", "Digest": digest, "Size": 5}}) == digest  # Docker
    assert stream_digest({"status": f"t: digest: {digest} size: 579"}) == digest  # Podman
    assert stream_digest({"status": "Pushing"}) is None
    assert stream_error({"error": "denied"}) == "denied"
    assert stream_error({"errorDetail": {"message": "manifest unknown"}}) == "manifest unknown"
    assert stream_error({"status": "ok"}) is None


def test_progress_notes_are_summaries_at_most_once_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(images.time, "monotonic", lambda: now[0])
    progress = PullProgress("pulling", "img:1")
    first = progress.update({"id": "a", "status": "Pulling fs layer"})
    assert first == "pulling img:1: 0 of 1 layers"
    line = {"id": "a", "status": "Downloading", "progressDetail": {"current": 5e6, "total": 2e7}}
    assert progress.update(line) is None  # too soon
    now[0] += 1.5
    assert progress.update({"id": "b", "status": "Already exists"}) == (
        "pulling img:1: 1 of 2 layers, 5.0 MB of 20.0 MB"
    )
    assert progress.summary() == {
        "layers_done": 1,
        "layers": 2,
        "bytes": 5_000_000,
        "bytes_total": 20_000_000,
    }
    assert human_bytes(999) == "999 B" and human_bytes(1_500_000_000) == "1.5 GB"


async def test_blocking_iterables_are_read_in_a_thread_in_order() -> None:
    seen_threads = set()

    def numbers() -> Iterator[int]:
        for n in range(50):
            seen_threads.add(threading.get_ident())
            yield n

    got = [n async for n in iterate_in_thread(numbers)]
    assert got == list(range(50))
    assert threading.get_ident() not in seen_threads

    def failing() -> Iterator[int]:
        yield 1
        raise OSError("engine went away")

    with pytest.raises(OSError, match="went away"):
        async for _ in iterate_in_thread(failing):
            pass
    await asyncio.sleep(0)
