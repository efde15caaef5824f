"""Workspace archives: what a process snapshot saves and how it is restored."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
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
