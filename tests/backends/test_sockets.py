"""Instances' Unix sockets: their directories, and connecting without following a link."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from labgate.backends import sockets
from labgate.backends.sockets import SOCKET_NAME, connectable


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a path short enough for socket addresses (pytest's may not be)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lg-", dir="/tmp") as path:
        yield Path(path)


def listen(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    server.setblocking(False)
    return server


def test_connectable_reaches_the_socket_itself(short_dir: Path) -> None:
    with listen(short_dir / "tool.sock") as server, socket.socket(socket.AF_UNIX) as client:
        with connectable(str(short_dir / "tool.sock")) as where:
            assert len(where) < 30  # /proc/self/fd/N: short whatever the directory's path
            client.connect(where)
        accepted, _ = server.accept()
        accepted.close()


def test_connectable_follows_no_link_and_takes_only_sockets(short_dir: Path) -> None:
    """What a user with a shell in the instance could put in their socket directory."""
    with listen(short_dir / "engine.sock") as engine:
        (short_dir / "tool.sock").symlink_to(short_dir / "engine.sock")
        with pytest.raises(OSError) as linked, connectable(str(short_dir / "tool.sock")):
            pass
        assert linked.value.errno == errno.ELOOP
        (short_dir / "file").write_text("x")
        with pytest.raises(OSError) as plain, connectable(str(short_dir / "file")):
            pass
        assert plain.value.errno == errno.ENOTSOCK
        with pytest.raises(FileNotFoundError), connectable(str(short_dir / "absent")):
            pass
        with pytest.raises(BlockingIOError):
            engine.accept()  # nobody connected to it


@pytest.mark.parametrize("bad", ["", ".", "..", "../etc", "a/b"])
def test_only_a_plain_name_is_an_instances_directory(short_dir: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="not an instance id"):
        sockets.socket_dir(short_dir, bad)


def test_a_socket_path_too_long_for_an_address_is_not_bound_by_it(short_dir: Path) -> None:
    assert sockets.socket_dir(short_dir, "abc") == short_dir / "abc"
    assert sockets.fits(short_dir / "abc")
    deep = short_dir / ("d" * (sockets.MAX_PATH - len(str(short_dir)) - len(SOCKET_NAME)))
    assert not sockets.fits(deep / "abc")
    # ... yet connected to, through a descriptor, when a sandboxed tool bound it as its own.
    os.makedirs(deep / "abc")
    directory = os.open(deep / "abc", os.O_PATH)
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        server.bind(f"/proc/self/fd/{directory}/{SOCKET_NAME}")
        os.close(directory)
        server.listen()
        with connectable(str(deep / "abc" / SOCKET_NAME)) as where:
            client.connect(where)


def test_prepare_makes_a_fresh_private_directory(short_dir: Path) -> None:
    path = short_dir / "sockets" / "i1"
    sockets.prepare(path, None, None)
    assert path.stat().st_mode & 0o777 == 0o700
    assert path.parent.stat().st_mode & 0o777 == 0o700
    (path / "stale").write_text("from an earlier run of the same instance")
    sockets.prepare(path, None, None)
    assert list(path.iterdir()) == []


def test_sweep_removes_only_unused_directories_of_unknown_instances(short_dir: Path) -> None:
    root = short_dir / "sockets"
    for name in ("kept", "ended", "still-listening"):
        sockets.prepare(root / name, None, None)
    (root / "kept" / SOCKET_NAME).touch()
    outside = short_dir / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with listen(root / "still-listening" / SOCKET_NAME):
        removed = sockets.sweep(root, {"kept"})
    assert removed == ["ended"]
    assert sorted(p.name for p in root.iterdir()) == ["kept", "link", "still-listening"]
    assert outside.is_dir()
    assert sockets.sweep(short_dir / "none", set()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a directory's owner needs root")
def test_prepare_gives_the_directory_to_the_instances_uid(short_dir: Path) -> None:
    path = short_dir / "sockets" / "i2"
    sockets.prepare(path, 1_000_011, 1_000_011)
    info = path.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (1_000_011, 1_000_011, 0o700)
    sockets.remove(path)
    assert not path.exists()
