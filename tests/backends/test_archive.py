"""Workspace archives: what a process snapshot saves and how it is restored."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import secrets
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from labgate.backends.archive import (
    archive_path,
    delete_archive,
    restore_workspace,
    save_workspace,
)
from labgate.backends.base import SnapshotRef
from labgate.errors import BackendError, InstanceStartError


def test_save_and_restore_keep_files_dirs_and_links(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    (workspace / "data" / "deep").mkdir(parents=True)
    (workspace / "data" / "deep" / "x.csv").write_text("1,2\n")
    (workspace / ".hidden").write_text("dot")
    os.symlink("data/deep/x.csv", workspace / "link")
    os.mkfifo(workspace / "pipe")  # special files are left out
    store = tmp_path / "store"

    result = save_workspace(workspace, store, "snap1")
    archive = store / "snap1.tar.gz"
    assert (result.kind, result.reference) == ("archive", "snap1.tar.gz")
    assert result.size == archive.stat().st_size
    assert result.digest == "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest()
    assert oct(archive.stat().st_mode & 0o777) == "0o600"
    assert not list(store.glob("*.part"))

    target = tmp_path / "restored"
    target.mkdir()
    ref = SnapshotRef("snap1", "archive", result.reference, result.digest)
    restore_workspace(store, ref, target)
    assert (target / "data" / "deep" / "x.csv").read_text() == "1,2\n"
    assert (target / ".hidden").read_text() == "dot"
    assert os.readlink(target / "link") == "data/deep/x.csv"
    assert not (target / "pipe").exists()

    # A retried launch finds the workspace restored already and leaves it alone.
    (target / ".hidden").write_text("changed")
    restore_workspace(store, ref, target)
    assert (target / ".hidden").read_text() == "changed"

    delete_archive(store, ref)
    assert not archive.exists()
    delete_archive(store, ref)  # idempotent


def test_restore_refuses_damaged_missing_and_hostile_archives(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    with tarfile.open(store / "evil.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(InstanceStartError, match="cannot restore"):
        restore_workspace(store, SnapshotRef("evil", "archive", "evil.tar.gz"), target)
    assert not (tmp_path / "outside.txt").exists()

    with pytest.raises(InstanceStartError, match="damaged"):
        restore_workspace(
            store, SnapshotRef("evil", "archive", "evil.tar.gz", "sha256:" + "0" * 64), target
        )
    with pytest.raises(InstanceStartError, match="missing"):
        restore_workspace(store, SnapshotRef("gone", "archive", "gone.tar.gz"), target)
    with pytest.raises(InstanceStartError, match="container image"):
        restore_workspace(store, SnapshotRef("img", "image", "reg/x:1"), target)
    with pytest.raises(BackendError):
        archive_path(store, "../etc/passwd.tar.gz")
    with pytest.raises(BackendError):
        save_workspace(tmp_path / "no-such-workspace", store, "x")


# --- a user changing the workspace while root saves or restores it ------------------

#: How long, at most, each race below keeps trying (the old by-path code lost in far less).
RACE_SECONDS = 10.0
RACE_SAVES = 2000
RACE_RESTORES = 500


def _secret_file(tmp_path: Path) -> tuple[Path, bytes]:
    """A folder outside the workspace holding a file the user must never get back."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = f"SECRET-{secrets.token_hex(16)}".encode()
    (outside / "shadow").write_bytes(secret)
    return outside, secret


#: The user's shell, another process: swaps two names over and over, atomically with
#: ``renameat2(RENAME_EXCHANGE)`` (as an attacker would), else with four renames.
_SWAPPER = """
import ctypes, os, sys, time
entry, link = sys.argv[1:3]
renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
deadline = time.monotonic() + 120  # never outlives a test killed before it could kill this
while time.monotonic() < deadline:
    if renameat2 is None or renameat2(
        AT_FDCWD, os.fsencode(entry), AT_FDCWD, os.fsencode(link), RENAME_EXCHANGE
    ):
        os.rename(entry, entry + ".real")
        os.rename(link, entry)
        os.rename(entry, link)
        os.rename(entry + ".real", entry)
"""


@contextlib.contextmanager
def _swapping(entry: Path, link_target: Path) -> Iterator[None]:
    """While inside, ``entry`` keeps turning into a link to ``link_target`` and back."""
    link = entry.with_name("evil")
    os.symlink(link_target, link)
    swapper = subprocess.Popen([sys.executable, "-c", _SWAPPER, str(entry), str(link)])
    try:
        yield
    finally:
        swapper.kill()
        swapper.wait()


def _saves_leaking(workspace: Path, store: Path, secret: bytes) -> tuple[int, list[str]]:
    """Save ``workspace`` over and over; how many saves succeeded and which ones held ``secret``."""
    saved, leaked = 0, []
    deadline = time.monotonic() + RACE_SECONDS
    for i in range(RACE_SAVES):
        if time.monotonic() > deadline:
            break
        try:
            result = save_workspace(workspace, store, f"race{i}")
        except BackendError:
            continue  # the by-path code fails when an entry vanishes mid-walk; it must not leak
        saved += 1
        archive = store / result.reference
        if secret in gzip.decompress(archive.read_bytes()):
            leaked.append(result.reference)
            break
        archive.unlink()
    return saved, leaked


def test_save_never_follows_a_folder_swapped_for_a_link(tmp_path: Path) -> None:
    outside, secret = _secret_file(tmp_path)
    workspace = tmp_path / "ws"
    (workspace / "d").mkdir(parents=True)
    (workspace / "d" / "mine").write_text("mine")

    with _swapping(workspace / "d", outside):
        saved, leaked = _saves_leaking(workspace, tmp_path / "store", secret)
    assert leaked == []
    assert saved > 0


def test_save_never_follows_a_file_swapped_for_a_link(tmp_path: Path) -> None:
    outside, secret = _secret_file(tmp_path)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    # As long as the secret: the by-path code reads the size the lstat gave.
    (workspace / "f").write_bytes(b"x" * len(secret))

    with _swapping(workspace / "f", outside / "shadow"):
        saved, leaked = _saves_leaking(workspace, tmp_path / "store", secret)
    assert leaked == []
    assert saved > 0


def test_a_file_changing_size_while_saved_keeps_the_archive_whole(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "a-growing").write_bytes(b"g" * 100_000)
    (workspace / "z-after").write_text("still here")
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            with (workspace / "a-growing").open("r+b") as handle:
                handle.truncate(10)
                handle.seek(0, os.SEEK_END)
                handle.write(b"g" * 200_000)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        results = [save_workspace(workspace, tmp_path / "store", f"s{i}") for i in range(20)]
    finally:
        stop.set()
        thread.join()
    for result in results:
        with tarfile.open(tmp_path / "store" / result.reference, "r:gz") as tar:
            after = tar.extractfile("./z-after")
            assert after is not None and after.read() == b"still here"


def _archive(store: Path, name: str, members: list[tuple[tarfile.TarInfo, bytes]]) -> SnapshotRef:
    """A hand-made snapshot archive in ``store``."""
    store.mkdir(exist_ok=True)
    with tarfile.open(store / f"{name}.tar.gz", "w:gz") as tar:
        for member, data in members:
            member.size = len(data) if member.isreg() else 0
            tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return SnapshotRef(name, "archive", f"{name}.tar.gz")


def _refusal(store: Path, ref: SnapshotRef, workspace: Path) -> str:
    """Restore ``ref``; the reason it was refused, or ``""`` (asserted after what was written)."""
    try:
        restore_workspace(store, ref, workspace)
    except InstanceStartError as exc:
        return str(exc)
    return ""


def _entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    """A member for :func:`_archive`: a file unless ``kind`` says otherwise."""
    member = tarfile.TarInfo(name)
    member.type, member.linkname, member.mode = kind, linkname, 0o644
    return member


def test_restore_never_writes_through_a_folder_swapped_for_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    members = [(_entry("./d", tarfile.DIRTYPE), b"")]
    members += [(_entry(f"./d/f{i:04}"), b"data") for i in range(1000)]
    ref = _archive(tmp_path / "store", "many", members)
    deadline = time.monotonic() + RACE_SECONDS
    restores = planted = 0
    while time.monotonic() < deadline and restores < RACE_RESTORES:
        workspace = tmp_path / f"ws{restores}"
        workspace.mkdir()
        stop = threading.Event()

        def plant(workspace: Path = workspace, stop: threading.Event = stop) -> None:
            """The user: as soon as ``d`` appears, put a link to ``outside`` in its place."""
            moved = 0
            while not stop.is_set():
                try:
                    os.rename(workspace / "d", workspace / f"d.{moved}")
                    moved += 1
                    os.symlink(outside, workspace / "d")
                    return
                except (FileNotFoundError, FileExistsError):
                    continue  # not made yet, or made again before the link

        thread = threading.Thread(target=plant, daemon=True)
        thread.start()
        try:
            restore_workspace(tmp_path / "store", ref, workspace)
        except InstanceStartError as exc:
            assert "cannot restore snapshot many" in str(exc)
        finally:
            stop.set()
            thread.join()
        restores += 1
        planted += (workspace / "d").is_symlink()
        assert list(outside.iterdir()) == [], f"written outside in restore {restores}"
    assert planted > 0  # the user did get a link in (else the race proved nothing)


def test_restore_never_writes_through_a_link_the_archive_made(tmp_path: Path) -> None:
    store = tmp_path / "store"
    # A file member under a link member's name: written through the link by path.
    ref = _archive(
        store,
        "under",
        [
            (_entry("./inside", tarfile.DIRTYPE), b""),
            (_entry("./l", tarfile.SYMTYPE, "inside"), b""),
            (_entry("./l/x"), b"through"),
        ],
    )
    workspace = tmp_path / "ws"
    workspace.mkdir()
    refusal = _refusal(store, ref, workspace)
    assert not (workspace / "inside" / "x").exists()
    assert (
        refusal
        == "cannot restore snapshot under: a link or a file stands where 'l' should be a folder"
    )

    # A file member of a link member's name replaces the link; its target is untouched.
    ref = _archive(
        store,
        "over",
        [
            (_entry("./target"), b"kept"),
            (_entry("./l", tarfile.SYMTYPE, "target"), b""),
            (_entry("./l"), b"new"),
        ],
    )
    workspace = tmp_path / "ws2"
    workspace.mkdir()
    restore_workspace(store, ref, workspace)
    assert (workspace / "target").read_bytes() == b"kept"
    assert not (workspace / "l").is_symlink()
    assert (workspace / "l").read_bytes() == b"new"

    # A link already in the workspace is never reached: a workspace that is not
    # empty is taken as restored already (a retried launch) and left alone.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ref = _archive(store, "plain", [(_entry("./l", tarfile.DIRTYPE), b""), (_entry("./l/x"), b"")])
    workspace = tmp_path / "ws3"
    workspace.mkdir()
    os.symlink(elsewhere, workspace / "l")
    restore_workspace(store, ref, workspace)
    assert list(elsewhere.iterdir()) == []


def test_restore_refuses_links_that_only_the_filter_thinks_stay_inside(tmp_path: Path) -> None:
    """Links whose resolved path outgrows PATH_MAX fool ``realpath`` (CVE-2025-4517).

    The ``data`` filter of Python < 3.11.13 then lets a link out of the workspace
    through, and a file member under it lands outside; going by descriptors, the
    first member under a link is refused.
    """
    workspace = tmp_path / "ws"
    workspace.mkdir()
    long = "d" * 247
    depth = (4094 - len(str(workspace.resolve()))) // (len(long) + 1)
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    path = ""
    letters = "abcdefghijklmnopqrstuvwxyz"[:depth]
    for letter in letters:  # a/b/c... short links to ever deeper long-named folders
        members.append((_entry(f"{path}{long}", tarfile.DIRTYPE), b""))
        members.append((_entry(f"{path}{letter}", tarfile.SYMTYPE, long), b""))
        path = f"{path}{long}/"
    short = "/".join(letters)
    up = "l" * 254  # resolved, it is too long for realpath, which then stops following
    members.append((_entry(f"{short}/{up}", tarfile.SYMTYPE, "/".join([".."] * depth)), b""))
    members.append((_entry("escape", tarfile.SYMTYPE, f"{short}/{up}/.."), b""))
    members.append((_entry("escape/planted"), b"outside"))
    ref = _archive(tmp_path / "store", "deep", members)

    refusal = _refusal(tmp_path / "store", ref, workspace)
    assert not (tmp_path / "planted").exists()
    assert refusal.startswith("cannot restore snapshot deep: a link or a file stands where 'a/")


def test_round_trip_keeps_modes_empty_folders_links_and_copies_hard_links(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    (workspace / "empty").mkdir(parents=True)
    (workspace / "bin").mkdir(mode=0o750)
    (workspace / "bin").chmod(0o750)
    (workspace / "bin" / "run").write_text("#!/bin/sh\n")
    (workspace / "bin" / "run").chmod(0o750)
    (workspace / "private").write_text("p")
    (workspace / "private").chmod(0o600)
    (workspace / "one").write_text("same")
    os.link(workspace / "one", workspace / "two")
    os.symlink("bin/run", workspace / "run-link")
    os.symlink("nowhere/at/all", workspace / "dangling")
    old = 1_500_000_000
    os.utime(workspace / "private", (old, old))
    result = save_workspace(workspace, tmp_path / "store", "rt")
    with tarfile.open(tmp_path / "store" / result.reference, "r:gz") as tar:
        assert not [m.name for m in tar if m.islnk()]  # every file stored whole

    target = tmp_path / "restored"
    target.mkdir()
    restore_workspace(tmp_path / "store", SnapshotRef("rt", "archive", result.reference), target)
    assert (target / "empty").is_dir() and list((target / "empty").iterdir()) == []
    assert stat.S_IMODE((target / "bin").stat().st_mode) == 0o750
    assert stat.S_IMODE((target / "bin" / "run").stat().st_mode) == 0o750
    assert stat.S_IMODE((target / "private").stat().st_mode) == 0o600
    assert (target / "private").stat().st_mtime == old
    assert (target / "one").read_text() == (target / "two").read_text() == "same"
    assert (target / "one").stat().st_ino != (target / "two").stat().st_ino
    assert os.readlink(target / "run-link") == "bin/run"
    assert os.readlink(target / "dangling") == "nowhere/at/all"


def test_an_old_archive_with_hard_links_still_restores(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    (workspace / "sub").mkdir(parents=True)
    (workspace / "sub" / "one").write_text("shared")
    os.link(workspace / "sub" / "one", workspace / "two")
    store = tmp_path / "store"
    store.mkdir()
    with tarfile.open(store / "old.tar.gz", "w:gz") as tar:  # as labgate once saved them
        tar.add(workspace, arcname=".")
        assert [m.name for m in tar.getmembers() if m.islnk()] == ["./two"]

    target = tmp_path / "restored"
    target.mkdir()
    restore_workspace(store, SnapshotRef("old", "archive", "old.tar.gz"), target)
    assert (target / "sub" / "one").read_text() == (target / "two").read_text() == "shared"


def test_an_archive_is_private_from_its_first_byte(tmp_path: Path) -> None:
    """Mode 0600 while it is written, too: a store others may list (0755) leaks nothing.

    A local account that opens the archive while it is still being written keeps
    reading it after any later chmod, so a late 0600 would come too late.
    """
    store = tmp_path / "store"
    store.mkdir(mode=0o755)
    (store / "s1.tar.gz.part").write_bytes(b"left by a save cut short")
    (store / "s1.tar.gz.part").chmod(0o644)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    for i in range(8):
        (workspace / f"f{i}").write_bytes(os.urandom(2 << 20))  # gzip takes a while on these
    partial = store / "s1.tar.gz.part"
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError):
                if partial.stat().st_size > 100:  # the new archive, not the one left there
                    seen.add(stat.S_IMODE(partial.stat().st_mode))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    old = os.umask(0o022)
    try:
        save_workspace(workspace, store, "s1")
    finally:
        os.umask(old)
        done.set()
        watcher.join()
    assert seen == {0o600}
    assert stat.S_IMODE((store / "s1.tar.gz").stat().st_mode) == 0o600
