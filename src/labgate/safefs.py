"""Walking into a user's workspace without following the links they may plant there.

A user owns their workspace directory and has a shell in their instances: any
folder under it may be a symbolic link by the time the portal (often root)
looks. These helpers reach a path below a trusted directory one component at
a time through file descriptors (``O_NOFOLLOW`` relative to the parent's
descriptor), so a link anywhere on the way is refused with an :class:`OSError`
(``ELOOP`` or ``ENOTDIR``) instead of being followed. Every descriptor they
hand out is the caller's to close (``contextlib.closing`` or ``os.close``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Generator, Sequence
from pathlib import Path

#: Flags to open a directory below another without following a link.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Flags to read a file without following a link nor blocking on a FIFO.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Flags to write (create or truncate) a file without following a link.
WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
#: Deepest folder :func:`walk_files` descends into (each level holds a descriptor).
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
    for name in sorted(os.listdir(dir_fd)):
        path = f"{prefix}{name}"
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode):
            if depth + 1 >= MAX_DEPTH:
                continue
            try:
                child = open_subdir(dir_fd, name)
            except OSError:
                continue
            try:
                yield from walk_files(child, f"{path}/", depth + 1)
            finally:
                os.close(child)
        elif stat.S_ISREG(info.st_mode):
            try:
                fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    yield path, fd
            finally:
                os.close(fd)
