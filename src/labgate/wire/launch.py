"""The plain data of a launch that every layer shares: resources, mounts, snapshots.

The tool catalog gives default :class:`Resources`, the portal fixes an
instance's :class:`Mount` list at admission and picks a :class:`SnapshotRef` to
launch from, and a backend reads them all in its
:class:`~labgate.backends.base.LaunchSpec`; a :class:`SnapshotResult` goes back
the other way. :mod:`labgate.backends.base` re-exports them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSON = dict[str, Any]


@dataclass(frozen=True)
class Resources:
    """CPU cores and memory bytes requested for an instance."""

    cpu: float = 1.0
    memory: int = 1024**3

    def as_json(self) -> JSON:
        """Plain JSON form, as stored on the instance."""
        return {"cpu": self.cpu, "memory": self.memory}


@dataclass(frozen=True)
class Mount:
    """A host path made visible inside the instance."""

    source: Path
    target: str
    read_only: bool = True
    #: The directory ``source`` must stay inside (a site's data root): backends open
    #: ``source`` below it with no symbolic link followed (labgate.backends.confine).
    root: Path | None = None

    @property
    def env_var(self) -> str:
        """``LABGATE_DATA_<NAME>``, telling the tool where the mount is (``/data/iris`` → IRIS).

        Two mounts can map to one name (``/data/ml-a`` and ``/data/ml_a``, a
        dataset and a group both called ``physics``): :func:`mount_variables`
        gives each mount of a launch its own.
        """
        last = self.target.rstrip("/").rsplit("/", 1)[-1]
        name = "".join(ch if ch.isascii() and ch.isalnum() else "_" for ch in last)
        return f"LABGATE_DATA_{name.upper()}"


def mount_variables(mounts: Sequence[Mount], where: Callable[[Mount], str]) -> dict[str, str]:
    """Each mount's variable (:attr:`Mount.env_var`) with ``where(mount)``, none lost.

    The first mount whose name maps to a variable gets it; a later one whose
    name maps to the same variable gets ``_2``, ``_3``... (in the order of
    ``mounts``, the launch's), so that no mount's variable overwrites
    another's.
    """
    found: dict[str, str] = {}
    for mount in mounts:
        name = mount.env_var
        if name in found:
            number = 2
            while f"{name}_{number}" in found:
                number += 1
            name = f"{name}_{number}"
        found[name] = where(mount)
    return found


@dataclass(frozen=True)
class SnapshotRef:
    """A stored snapshot, as a backend needs it to launch from it or delete it."""

    id: str
    #: ``image`` (a container image) or ``archive`` (a workspace archive).
    kind: str
    #: Image reference (``registry/repo:tag``) or archive file name in the snapshot store.
    reference: str
    digest: str = ""


@dataclass(frozen=True)
class SnapshotRequest:
    """What :meth:`labgate.backends.base.Backend.snapshot` is asked to save."""

    snapshot_id: str
    instance_id: str
    owner: str
    tool: str


@dataclass(frozen=True)
class SnapshotResult:
    """What :meth:`labgate.backends.base.Backend.snapshot` saved."""

    kind: str
    reference: str
    #: Manifest digest of a pushed image, image id of a local one, sha256 of an archive.
    digest: str
    size: int


@dataclass(frozen=True)
class FetchRequest:
    """A URL dataset a site fetches into its own cache before a launch mounts it."""

    #: The launch waiting for it (progress notes go to its event stream).
    instance_id: str
    url: str
    #: The cache entry's name (a directory under the site's cache).
    entry: str
    max_bytes: int
    expected_size: int | None = None
    #: ``<algorithm>:<hex>`` to check; empty: compute SHA-256 and report it.
    checksum: str = ""
    #: Whether loopback, private and link-local hosts may be fetched from.
    allow_private: bool = False
