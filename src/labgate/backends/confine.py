"""Open a replica's path inside its data root, never through a symbolic link.

A replica is a path relative to its site's data root. Checking that path as
text is not enough: anyone who can write in the data root can put a link
there (``escape -> /etc``), and a bind mount of ``root/escape`` would then
show the link's target. So the path is opened on the site, component by
component, refusing every symbolic link below the root, and what was opened
is what gets mounted (bubblewrap binds the file descriptor itself), so a link
swapped in after the check changes nothing.

- :func:`open_beneath` opens the path as an ``O_PATH`` descriptor with
  ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)``
  (Linux 5.6+): the kernel resolves it atomically, retrying on concurrent
  renames. Where ``openat2`` is missing it walks the components with
  ``openat(O_PATH | O_NOFOLLOW)``, refusing any link: the same rule.
- The data root itself is the operator's setting and may be, or sit under,
  a link (``/data -> /lustre/data``); only what is below it is checked.
- What is opened must be a directory or a regular file.

Errors are :class:`EscapesRoot` with a sentence for the user.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from labgate.backends.base import Mount
from labgate.errors import InstanceStartError

#: openat2(2): the same number on every Linux architecture (the unified syscall table).
SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_OPEN_FLAGS = os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW


class EscapesRoot(ValueError):
    """A replica path that cannot be used: it leaves the data root, or is missing."""


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
#: Cleared when the kernel turns openat2 down once; the component walk is used from then on.
_openat2_usable = [True]


def _openat2(dirfd: int, path: str) -> int:
    """``openat2`` beneath ``dirfd``; raises OSError, NotImplementedError when missing."""
    how = _OpenHow(_OPEN_FLAGS, 0, _RESOLVE)
    while True:
        fd = int(
            _libc.syscall(
                SYS_OPENAT2,
                ctypes.c_int(dirfd),
                ctypes.c_char_p(os.fsencode(path)),
                ctypes.byref(how),
                ctypes.c_size_t(ctypes.sizeof(how)),
            )
        )
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err == errno.EAGAIN:  # a rename raced the lookup: the kernel asks to retry
            continue
        if err in (errno.ENOSYS, errno.EPERM):
            # ENOSYS: kernel older than 5.6; EPERM: a seccomp filter that denies it.
            raise NotImplementedError
        raise OSError(err, os.strerror(err), path)


def _walk(dirfd: int, parts: tuple[str, ...]) -> int:
    """Open ``parts`` one by one below ``dirfd`` with ``O_NOFOLLOW``; no link is followed."""
    current = os.dup(dirfd)
    try:
        for part in parts:
            fd = os.open(part, _OPEN_FLAGS, dir_fd=current)
            os.close(current)
            current = fd
            if stat.S_ISLNK(os.fstat(current).st_mode):
                raise OSError(errno.ELOOP, "is a symbolic link", part)
        return current
    except BaseException:
        os.close(current)
        raise


def open_beneath(root: Path, path: str) -> int:
    """An ``O_PATH`` descriptor of ``root/path``, which must stay inside ``root``.

    ``path`` is relative; ``.``, ``..``, empty components and links are refused.
    The caller closes the descriptor.
    """
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or any(p in (".", "..") for p in parts):
        raise EscapesRoot(f"{path!r} must be a relative path inside the data root")
    try:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise EscapesRoot(f"the data root {root} cannot be opened: {exc.strerror}") from None
    try:
        fd = -1
        if _openat2_usable[0]:
            try:
                fd = _openat2(root_fd, "/".join(parts))
            except NotImplementedError:
                _openat2_usable[0] = False
        if fd < 0:
            fd = _walk(root_fd, parts)
    except OSError as exc:
        raise EscapesRoot(_explain(path, exc)) from None
    finally:
        os.close(root_fd)
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        os.close(fd)
        if stat.S_ISLNK(mode):  # O_NOFOLLOW opened the last component's link itself
            raise EscapesRoot(_explain(path, OSError(errno.ELOOP, "is a symbolic link")))
        raise EscapesRoot(f"{path!r} is neither a directory nor a regular file")
    return fd


def _explain(path: str, exc: OSError) -> str:
    if exc.errno in (errno.ELOOP, errno.EXDEV):
        return (
            f"{path!r} goes through a symbolic link; a replica path may not contain links "
            "(they could lead out of the data root): give the real path"
        )
    if exc.errno == errno.ENOENT:
        return f"{path!r} does not exist in the data root"
    if exc.errno == errno.ENOTDIR:
        return f"{path!r} does not exist in the data root (a part of it is not a directory)"
    return f"{path!r} cannot be opened in the data root: {exc.strerror}"


def check_beneath(root: Path, path: str) -> None:
    """Raise :class:`EscapesRoot` unless ``root/path`` can be opened inside ``root``."""
    os.close(open_beneath(root, path))


def open_mount(mount: Mount) -> int:
    """An ``O_PATH`` descriptor of what ``mount`` shows, opened below its root.

    A mount without a root is opened as named (still one open, so what is
    bound cannot change after it). Raises :class:`EscapesRoot`.
    """
    if mount.root is None:
        try:
            return os.open(mount.source, os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            raise EscapesRoot(f"mount source {mount.source}: {exc.strerror}") from None
    try:
        relative = mount.source.relative_to(mount.root)
    except ValueError:
        raise EscapesRoot(f"{mount.source} is not inside {mount.root}") from None
    return open_beneath(mount.root, str(relative))


def require_confined(mounts: Iterable[Mount]) -> None:
    """Fail the start unless every mount source opens below its root right now.

    For backends that bind by name (containers, an unsandboxed process): a
    check just before the engine mounts, not a guarantee against a swap in
    between (docs/datasets.md says how long that window is).
    """
    for mount in mounts:
        try:
            os.close(open_mount(mount))
        except EscapesRoot as exc:
            raise InstanceStartError(f"mount source refused: {exc}") from None
