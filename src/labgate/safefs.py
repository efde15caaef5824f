"""Walking into a user's workspace without following the links they may plant there.

A user owns their workspace directory and has a shell in their instances: any
folder under it may be a symbolic link by the time the portal (often root)
looks. These helpers reach a path below a trusted directory one component at
a time through file descriptors (``O_NOFOLLOW`` relative to the parent's
descriptor), so a link anywhere on the way is refused with an :class:`OSError`
(``ELOOP`` or ``ENOTDIR``) instead of being followed. Every descriptor they
hand out is the caller's to close (``contextlib.closing`` or ``os.close``).

An instance's uid owns its socket directory too: :func:`connectable` connects
to a socket file there without following a link put in its place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: Flags to open a directory below another without following a link.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Flags to read a file without following a link nor blocking on a FIFO.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Flags to write (create or truncate) a file without following a link.
WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
#: Deepest folder :func:`walk_tree` descends into (each level holds a descriptor).
MAX_DEPTH = 128

#: The errors that mean "a link or a non-directory is on the way".
REFUSED = (errno.ELOOP, errno.ENOTDIR)


def check_name(name: str) -> str:
    """``name`` when it is one plain path component; else :class:`ValueError`."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a plain file name: {name!r}")
    return name


def open_subdir(parent_fd: int, name: str, *, create: bool = False) -> int:
    """A descriptor of the directory ``name`` in ``parent_fd``, never through a link.

    With ``create``, a missing one is made (mode 0700) first. A link or a file
    there raises :class:`OSError` (``ELOOP`` or ``ENOTDIR``).
    """
    check_name(name)
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            raise
    with contextlib.suppress(FileExistsError):  # made meanwhile: opened as anything else
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    return os.open(name, DIR_FLAGS, dir_fd=parent_fd)


def open_below(base: Path, parts: Sequence[str], *, create: bool = False) -> int:
    """A descriptor of ``base/parts[0]/parts[1]/…``, each part reached without following links.

    ``base`` itself is trusted (it is opened as a path); with ``create`` it and
    every missing part are made (mode 0700).
    """
    if create:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_at(fd, parts, create=create)
    finally:
        os.close(fd)


def open_at(base_fd: int, parts: Sequence[str], *, create: bool = False) -> int:
    """A new descriptor of ``parts`` below the folder ``base_fd``, no link followed.

    ``base_fd`` stays open (the caller's); with ``create`` missing parts are
    made (mode 0700). No parts: a new descriptor of ``base_fd``'s folder.
    """
    fd = os.dup(base_fd)
    try:
        for part in parts:
            child = open_subdir(fd, part, create=create)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def refused(exc: OSError) -> bool:
    """Whether ``exc`` says a link (or a file) stood where a directory was expected."""
    return exc.errno in REFUSED


def remove_entry(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` whatever it is, never following a link; gone is fine.

    A directory is removed with its content (``shutil.rmtree`` with ``dir_fd``,
    which does not follow links); a link or a file is unlinked itself.
    """
    check_name(name)
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)


def walk_files(
    dir_fd: int, prefix: str = "", depth: int = 0
) -> Generator[tuple[str, int], None, None]:
    """Every regular file below ``dir_fd``: its relative path and an open read descriptor.

    In path order (a folder's files before the names sorting after it), as
    ``sorted(Path.rglob("*"))`` lists them. Links, devices, FIFOs and sockets
    are left out and links to folders are not entered; what vanishes or
    cannot be opened meanwhile is skipped. The descriptor is valid until the
    next item is asked for (it is closed then).
    """
    for entry in walk_tree(dir_fd, prefix, depth):
        if entry.kind == "file":
            yield entry.path, entry.fd


#: What :func:`walk_tree` reports: a folder, a regular file or a symbolic link.
EntryKind = Literal["dir", "file", "link"]


@dataclass(frozen=True)
class TreeEntry:
    """One entry :func:`walk_tree` met, described by what was actually opened."""

    #: Its path below the walked folder, ``/``-separated (``"a/b.txt"``).
    path: str
    kind: EntryKind
    #: ``os.fstat`` of the opened descriptor; for a link, its own ``lstat``.
    info: os.stat_result
    #: A folder's or file's open descriptor (``-1`` for a link): the walk closes it.
    fd: int = -1
    #: A link's target, as read with ``readlink`` (never followed).
    target: str = ""


def _open_entry(dir_fd: int, name: str, path: str) -> TreeEntry | None:
    """``name`` in ``dir_fd`` as a :class:`TreeEntry`, or ``None`` when it is none of them.

    The ``lstat`` only picks how to open the entry; the verdict is ``fstat`` of
    the descriptor opened with ``O_NOFOLLOW``, so an entry swapped for a link
    (or anything else) in between is skipped rather than followed.
    """
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            return TreeEntry(path, "link", info, target=os.readlink(name, dir_fd=dir_fd))
        if stat.S_ISDIR(info.st_mode):
            kind: EntryKind = "dir"
            fd = open_subdir(dir_fd, name)
        elif stat.S_ISREG(info.st_mode):
            kind = "file"
            fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
        else:
            return None  # devices, FIFOs and sockets are never opened
    except OSError:
        return None  # gone, or swapped for a link or a non-link meanwhile
    try:
        info = os.fstat(fd)
        is_kind = stat.S_ISDIR if kind == "dir" else stat.S_ISREG
        if is_kind(info.st_mode):
            return TreeEntry(path, kind, info, fd)
    except OSError:
        pass
    os.close(fd)
    return None


def walk_tree(dir_fd: int, prefix: str = "", depth: int = 0) -> Generator[TreeEntry, None, None]:
    """Every folder, regular file and link below ``dir_fd``, never following a link.

    Depth first in name order, each folder before what it holds (the order of
    ``tarfile.add``). Folders and files are opened relative to their parent's
    descriptor with ``O_NOFOLLOW`` and described by ``fstat`` of that
    descriptor, so what is reported is what was opened; a link is reported
    with its target, never entered. Devices, FIFOs and sockets are left out,
    and so is what vanishes, is swapped or cannot be opened meanwhile, and any
    folder :data:`MAX_DEPTH` deep. An entry's descriptor is valid until the
    next entry is asked for (the walk closes it).
    """
    try:
        names = sorted(os.listdir(dir_fd))
    except OSError:
        return
    for name in names:
        entry = _open_entry(dir_fd, name, f"{prefix}{name}")
        if entry is None:
            continue
        if entry.kind == "link":
            yield entry
            continue
        try:
            if entry.kind == "file":
                yield entry
            elif depth + 1 < MAX_DEPTH:
                yield entry
                yield from walk_tree(entry.fd, f"{entry.path}/", depth + 1)
        finally:
            os.close(entry.fd)


#: How much :class:`ExactReader` reads at a time.
READ_CHUNK = 1024 * 1024


class ExactReader:
    """Exactly ``size`` bytes of the open file ``fd``, for ``tarfile.addfile``.

    A tar header, written first, already holds the size ``fstat`` gave, and
    tar has no way to change it afterwards. A file the user shrinks meanwhile
    is padded with zeros and one that grows is cut at that size, so the
    archive stays well-formed (the file is as consistent as any file copied
    while being written) and its writer never fails on it.
    """

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._left = size

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes (all that is left when negative), never more than are due."""
        wanted = self._left if size < 0 else min(size, self._left)
        chunks: list[bytes] = []
        got = 0
        while got < wanted:
            chunk = os.read(self._fd, min(wanted - got, READ_CHUNK))
            if not chunk:  # shrunk: pad, the header promised ``wanted`` bytes
                chunks.append(bytes(wanted - got))
                break
            chunks.append(chunk)
            got += len(chunk)
        self._left -= wanted
        return b"".join(chunks)


@contextlib.contextmanager
def connectable(path: str) -> Iterator[str]:
    """A path to connect to the socket file ``path`` by, that follows no link.

    ``/proc/self/fd/N`` of a descriptor of the file itself, valid inside the
    ``with``; raises :class:`OSError` when ``path`` is a link (``ELOOP``), is
    not a socket (``ENOTSOCK``), or is not there.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISLNK(mode):
            raise OSError(errno.ELOOP, "a symbolic link, not the tool's socket", path)
        if not stat.S_ISSOCK(mode):
            raise OSError(errno.ENOTSOCK, "not a socket", path)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
