"""Workspace archives: the snapshots of backends whose workspace is a host directory.

A snapshot is ``<snapshot store>/<snapshot id>.tar.gz``, a gzipped tar of
the workspace (files, directories and symlinks as they are; sockets and
other special files are left out). Restoring extracts it into a new, empty
workspace with the ``data`` extraction filter: no absolute paths, no ``..``,
no links leaving the workspace, no device files, no set-uid bits.

The portal (often root) does both while the workspace's owner may be changing
it from a shell in an instance, so neither ever goes by path below the
workspace: saving walks it through directory descriptors
(:func:`labgate.safefs.walk_tree`), archiving each file from the descriptor
it opened and each link as a link; restoring reaches every member's folder
one component at a time with ``O_NOFOLLOW`` and refuses a link (or a file)
met on the way instead of writing through it.

The store is the ``snapshot_dir`` setting (``<data_dir>/snapshots`` by
default); the snapshot's ``reference`` is the archive's file name in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from labgate import safefs
from labgate.backends.base import SnapshotRef, SnapshotResult
from labgate.errors import BackendError, InstanceStartError

SUFFIX = ".tar.gz"
_CHUNK = 1024 * 1024
_TYPES = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "link": tarfile.SYMTYPE}


def archive_path(store: Path, reference: str) -> Path:
    """The archive a snapshot reference names; refuses anything but a plain file name."""
    if not reference.endswith(SUFFIX) or Path(reference).name != reference:
        raise BackendError(f"not a workspace archive reference: {reference!r}")
    return store / reference


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


# --- saving -------------------------------------------------------------------------


def _member(
    name: str, kind: safefs.EntryKind, info: os.stat_result, target: str = ""
) -> tarfile.TarInfo:
    """The tar header of an entry, from the ``fstat`` of what was opened; no owner names."""
    member = tarfile.TarInfo(name)
    member.type = _TYPES[kind]
    member.mode = stat.S_IMODE(info.st_mode)
    member.mtime = info.st_mtime
    member.uid, member.gid = info.st_uid, info.st_gid
    member.uname = member.gname = ""
    member.size = info.st_size if kind == "file" else 0
    member.linkname = target
    return member


#: Folders below a workspace that no snapshot holds: a running tool's secrets, not the
#: user's work. Jupyter's runtime folder holds its server's info files (with its token,
#: the instance's own) and its kernels' connection files (their keys and loopback ports):
#: whoever launched a shared snapshot could use them against the instance still running.
LEFT_OUT = (".local/share/jupyter/runtime",)


def _left_out(path: str) -> bool:
    return any(path == folder or path.startswith(folder + "/") for folder in LEFT_OUT)


def _add_workspace(tar: tarfile.TarFile, root_fd: int) -> None:
    """Add the tree below ``root_fd`` to ``tar``, entries relative to ``.`` (its root).

    Every file is stored whole (two names of one file make two files): a hard
    link entry would name a path the restore would have to go by. What
    :data:`LEFT_OUT` names is not archived.
    """
    tar.addfile(_member(".", "dir", os.fstat(root_fd)))
    for entry in safefs.walk_tree(root_fd):
        if _left_out(entry.path):
            continue
        member = _member(f"./{entry.path}", entry.kind, entry.info, entry.target)
        if entry.kind == "file":
            tar.addfile(member, safefs.ExactReader(entry.fd, member.size))
        else:
            tar.addfile(member)


def _private_file(path: Path) -> BinaryIO:
    """``path`` made anew, mode 0600 from its first byte (the store may be others' to list).

    A file left there (a save cut short) is removed first rather than
    truncated: whoever had it open would read the new archive through it.
    """
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.fdopen(os.open(path, flags, 0o600), "wb")


def save_workspace(workspace: Path, store: Path, snapshot_id: str) -> SnapshotResult:
    """Archive ``workspace`` into the store as ``<snapshot_id>.tar.gz`` (blocking).

    Nothing below the workspace is read by path: a link the user swaps in for
    a folder or a file while this runs is archived as a link, never followed
    (see :func:`labgate.safefs.walk_tree`).
    """
    if not workspace.is_dir():
        raise BackendError(f"the workspace {workspace} does not exist")
    store.mkdir(mode=0o700, parents=True, exist_ok=True)
    reference = f"{snapshot_id}{SUFFIX}"
    target = archive_path(store, reference)
    partial = target.with_name(target.name + ".part")
    try:
        root_fd = safefs.open_below(workspace, [])  # the workspace itself is trusted
        try:
            with _private_file(partial) as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
                _add_workspace(tar, root_fd)
        finally:
            os.close(root_fd)
        partial.replace(target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise BackendError(f"cannot archive the workspace: {exc}") from exc
    return SnapshotResult(
        kind="archive", reference=reference, digest=_sha256(target), size=target.stat().st_size
    )


def find_archive(store: Path, reference: str) -> SnapshotResult | None:
    """The archive ``reference`` names, if it is in the store (a save renames it there last)."""
    target = archive_path(store, reference)
    if not target.is_file():
        return None
    return SnapshotResult(
        kind="archive", reference=reference, digest=_sha256(target), size=target.stat().st_size
    )


# --- restoring ----------------------------------------------------------------------


class ExtractRefused(ValueError):
    """A member an extraction will not write; its message is the reason, for the user."""


@dataclass(frozen=True)
class _Folder:
    """A folder the restore made, whose mode and time are set once it is filled."""

    parts: tuple[str, ...]
    mode: int
    mtime: float


def _parts(name: str) -> tuple[str, ...]:
    """A member name's components; ``..`` is refused even when it would stay inside."""
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise ExtractRefused(f"{name!r} goes through '..'")
    return parts


def _open_folder(root_fd: int, parts: tuple[str, ...], *, create: bool = True) -> int:
    """A descriptor of ``parts`` below ``root_fd``, never through a link; ``create`` makes
    the missing."""
    try:
        return safefs.open_at(root_fd, parts, create=create)
    except OSError as exc:
        if safefs.refused(exc):
            raise ExtractRefused(
                f"a link or a file stands where {'/'.join(parts)!r} should be a folder"
            ) from exc
        raise


def _write_file(parent_fd: int, name: str, source: IO[bytes], member: tarfile.TarInfo) -> None:
    """Write ``name`` in ``parent_fd`` from ``source``, with the member's (filtered) mode and time.

    ``O_EXCL`` after removing what is there (a later member replaces an earlier
    one, as in tar): an existing entry, a link or another name of an outside
    file, is unlinked, never opened and written through.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=parent_fd)  # a folder raises: it is not replaced
    fd = os.open(name, safefs.WRITE_FLAGS | os.O_EXCL, 0o600, dir_fd=parent_fd)
    try:
        while chunk := source.read(_CHUNK):
            view = memoryview(chunk)
            while view:  # a short write (a full disk raises on the next one)
                view = view[os.write(fd, view) :]
        if member.mode is not None:
            os.fchmod(fd, member.mode)
        os.utime(fd, (member.mtime, member.mtime))
    finally:
        os.close(fd)


def _write_link(parent_fd: int, name: str, target: str) -> None:
    """Make the link ``name`` → ``target`` in ``parent_fd`` (it is created, not followed)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=parent_fd)
    os.symlink(target, name, dir_fd=parent_fd)


def _restore_member(
    tar: tarfile.TarFile, original: tarfile.TarInfo, root_fd: int, dest: str
) -> _Folder | None:
    """Write one member below ``root_fd`` (the folder ``dest``); a folder is returned to be
    finished later."""
    # Absolute paths, links leaving the folder, devices; modes sanitised.
    member = tarfile.data_filter(original, dest)
    parts = _parts(member.name)
    if member.isdir():
        os.close(_open_folder(root_fd, parts))
        # The filter drops folders' modes (a 0500 folder could not be filled);
        # they are set once filled, without group or other write, owner rwx.
        return _Folder(parts, (original.mode & 0o755) | 0o700, member.mtime)
    if not parts:
        raise ExtractRefused(f"{member.name!r} is not a folder")
    parent_fd = _open_folder(root_fd, parts[:-1])
    try:
        if member.issym():
            _write_link(parent_fd, parts[-1], member.linkname)
            return None
        # A regular file, or a hard link: written as a copy (the data of its target).
        source = tar.extractfile(member)
        if source is not None:
            with source:
                _write_file(parent_fd, parts[-1], source, member)
    finally:
        os.close(parent_fd)
    return None


def _finish_folders(root_fd: int, folders: list[_Folder]) -> None:
    """Set the restored folders' modes and times, deepest first (filling them changed the times)."""
    for folder in reversed(folders):
        try:
            fd = _open_folder(root_fd, folder.parts, create=False)
        except FileNotFoundError:
            continue  # removed by the user meanwhile: theirs to remove
        try:
            if folder.parts:  # the root's own mode stays
                os.fchmod(fd, folder.mode)
            os.utime(fd, (folder.mtime, folder.mtime))
        finally:
            os.close(fd)


def extract(tar: tarfile.TarFile, root_fd: int) -> None:
    """Extract ``tar`` member by member below the folder ``root_fd``, never through a link.

    Each member passes tarfile's ``data`` filter (no absolute path, ``..``,
    link out of the folder or device; modes sanitised); every folder is
    reached from ``root_fd`` one component at a time with ``O_NOFOLLOW``, so a
    link (or a file) that its owner plants on the way meanwhile raises
    :class:`ExtractRefused` rather than being written through. Hard links are
    written as copies. Raises :class:`ExtractRefused`, :class:`OSError`,
    :class:`tarfile.TarError` or :class:`KeyError` (a hard link to nothing).
    """
    dest = os.readlink(f"/proc/self/fd/{root_fd}")  # what the filter checks links against
    folders: list[_Folder] = []
    for original in tar:
        folder = _restore_member(tar, original, root_fd, dest)
        if folder is not None:
            folders.append(folder)
    _finish_folders(root_fd, folders)


def restore_workspace(store: Path, snapshot: SnapshotRef, workspace: Path) -> None:
    """Extract a snapshot's archive into ``workspace``, which must be empty (blocking).

    The user may change the workspace while this runs: a link (or a file) put
    where a folder of the archive goes stops the restore, and nothing is ever
    written through a link.
    """
    if snapshot.kind != "archive":
        raise InstanceStartError(
            f"snapshot {snapshot.id} is a container image; launch it on a containers site"
        )
    try:
        source = archive_path(store, snapshot.reference)
    except BackendError as exc:
        raise InstanceStartError(exc.detail) from exc
    if not source.is_file():
        raise InstanceStartError(f"the archive of snapshot {snapshot.id} is missing ({source})")
    if snapshot.digest and _sha256(source) != snapshot.digest:
        raise InstanceStartError(f"the archive of snapshot {snapshot.id} is damaged")
    if any(workspace.iterdir()):
        # A retried launch after a restart: the restore already happened.
        return
    try:
        root_fd = safefs.open_below(workspace, [])  # the workspace itself is trusted
        try:
            with tarfile.open(source, "r:gz") as tar:
                extract(tar, root_fd)
        finally:
            os.close(root_fd)
    except (OSError, tarfile.TarError, KeyError, ExtractRefused) as exc:
        # KeyError: a hard link to a member the archive does not hold.
        raise InstanceStartError(f"cannot restore snapshot {snapshot.id}: {exc}") from exc


def delete_archive(store: Path, snapshot: SnapshotRef) -> None:
    """Remove a snapshot's archive; nothing happens when it is already gone."""
    if snapshot.kind != "archive":
        return
    with contextlib.suppress(FileNotFoundError):
        archive_path(store, snapshot.reference).unlink()
