"""Workspace archives: the snapshots of backends whose workspace is a host directory.

A snapshot is ``<snapshot store>/<snapshot id>.tar.gz``, a gzipped tar of
the workspace (files, directories and symlinks as they are; sockets and
other special files are left out). Restoring extracts it into a new, empty
workspace with the ``data`` extraction filter: no absolute paths, no ``..``,
no links leaving the workspace, no device files, no set-uid bits.

The store is the ``snapshot_dir`` setting (``<data_dir>/snapshots`` by
default); the snapshot's ``reference`` is the archive's file name in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
from pathlib import Path

from labgate.backends.base import SnapshotRef, SnapshotResult
from labgate.errors import BackendError, InstanceStartError

SUFFIX = ".tar.gz"
_CHUNK = 1024 * 1024


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


def _keep(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Regular files, directories and symlinks only; no owner names."""
    if not (member.isfile() or member.isdir() or member.issym()):
        return None
    member.uname = member.gname = ""
    return member


def save_workspace(workspace: Path, store: Path, snapshot_id: str) -> SnapshotResult:
    """Archive ``workspace`` into the store as ``<snapshot_id>.tar.gz`` (blocking)."""
    if not workspace.is_dir():
        raise BackendError(f"the workspace {workspace} does not exist")
    store.mkdir(mode=0o700, parents=True, exist_ok=True)
    reference = f"{snapshot_id}{SUFFIX}"
    target = archive_path(store, reference)
    partial = target.with_name(target.name + ".part")
    try:
        with tarfile.open(partial, "w:gz") as tar:
            # Entries relative to the workspace: "." is its root.
            tar.add(workspace, arcname=".", filter=_keep)
        os.chmod(partial, 0o600)
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


def restore_workspace(store: Path, snapshot: SnapshotRef, workspace: Path) -> None:
    """Extract a snapshot's archive into ``workspace``, which must be empty (blocking)."""
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
        with tarfile.open(source, "r:gz") as tar:
            tar.extractall(workspace, filter="data")
    except (OSError, tarfile.TarError) as exc:
        raise InstanceStartError(f"cannot restore snapshot {snapshot.id}: {exc}") from exc


def delete_archive(store: Path, snapshot: SnapshotRef) -> None:
    """Remove a snapshot's archive; nothing happens when it is already gone."""
    if snapshot.kind != "archive":
        return
    with contextlib.suppress(FileNotFoundError):
        archive_path(store, snapshot.reference).unlink()
