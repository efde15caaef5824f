"""Control groups for process-backend instances: CPU, cpuset, memory and pids limits.

An instance's processes cannot lift a cgroup limit: the cgroup's files belong
to root and the instance runs as another uid with no capabilities. So when
labgate runs as root and the machine has cgroups, every instance gets one of
its own, created before the launch and joined by the launcher (before it
``exec``\\ s ``bwrap``, so every process of the instance is in it):

cgroup v2, when the unified hierarchy offers the controllers
    ``<own cgroup>/labgate/<instance id>`` with ``cpu.max`` (quota = cpu *
    period), ``cpuset.cpus``, ``memory.max`` and ``pids.max``. Needs the
    controllers enabled down to labgate's own cgroup, and that cgroup either the
    root or free of processes other than labgate's children cgroups (the v2
    "no internal processes" rule); otherwise there is no cgroup.
cgroup v1 (hybrid or legacy)
    ``/sys/fs/cgroup/<controller>/<own cgroup>/labgate/<instance id>`` for
    each of ``cpu`` (``cpu.cfs_quota_us`` = cpu * ``cpu.cfs_period_us``),
    ``cpuset``, ``memory`` (``memory.limit_in_bytes``) and ``pids``.

The cgroups sit under labgate's own (so whatever limits the machine puts on
labgate hold for its instances too). They are removed when the instance
stops, and :func:`sweep` removes empty ones left by instances that died
alone. Anything failing here only costs the cgroup: the launch goes on with
the rlimits and affinity of :mod:`labgate.backends.limits`, and the instance
state's ``limits.cgroup`` says what was enforced (``None``: no cgroup).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "cpuset", "memory", "pids")
#: CFS period: 100 ms, the kernel's default.
CPU_PERIOD_US = 100_000
#: Tasks (processes and threads) per instance when the backend options do not say.
DEFAULT_PIDS = 4096
#: Directory, under labgate's own cgroup, holding one cgroup per instance.
PARENT = "labgate"
_warned = False


@dataclass(frozen=True)
class Hierarchy:
    """Where instance cgroups go: version, and the parent directory per controller."""

    version: int
    #: controller -> parent directory (v2: the same directory for every controller).
    parents: dict[str, Path]


@dataclass(frozen=True)
class Cgroup:
    """One instance's cgroup(s) and the limits written into them."""

    version: int
    #: The cgroup directories the launcher joins (one for v2, one per controller for v1).
    paths: tuple[str, ...]
    cpu_quota_us: int | None
    cpu_period_us: int
    cpus: tuple[int, ...]
    memory: int | None
    pids: int

    def join_files(self) -> list[str]:
        """The files the launcher writes ``0`` into to join its cgroups.

        v1: each cgroup's ``tasks``, which moves only the writing thread and so
        skips the kernel's global lock (and its RCU wait, 10-20 ms here) that
        ``cgroup.procs`` takes; the launcher is single-threaded, so that is the
        whole process. v2 has no such file outside threaded cgroups.
        """
        name = "tasks" if self.version == 1 else "cgroup.procs"
        return [os.path.join(path, name) for path in self.paths]

    def oom_file(self) -> str | None:
        """The file counting the processes the kernel killed here for memory (``oom_kill N``).

        v2: ``memory.events``; v1: the memory cgroup's ``memory.oom_control``.
        """
        if self.version == 2:
            return os.path.join(self.paths[0], "memory.events") if self.paths else None
        memory_root = str(ROOT / "memory") + os.sep
        for path in self.paths:
            if path.startswith(memory_root):
                return os.path.join(path, "memory.oom_control")
        return None

    def as_json(self) -> dict[str, Any]:
        """Plain JSON form, stored as ``limits.cgroup`` in the instance state."""
        return {
            "version": self.version,
            "paths": list(self.paths),
            "cpu_quota_us": self.cpu_quota_us,
            "cpu_period_us": self.cpu_period_us,
            "cpus": list(self.cpus),
            "memory": self.memory,
            "pids": self.pids,
        }


def _own_paths() -> dict[str, str]:
    """This process's cgroup per controller (``""`` for v2), from /proc/self/cgroup."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    return own


def _v2_mount() -> Path | None:
    for candidate in (ROOT, ROOT / "unified"):
        if (candidate / "cgroup.controllers").is_file():
            return candidate
    return None


def _v2(own: dict[str, str]) -> Hierarchy | None:
    mount = _v2_mount()
    if mount is None or "" not in own:
        return None
    base = mount / own[""].lstrip("/")
    offered = set((base / "cgroup.controllers").read_text().split())
    wanted = [c for c in CONTROLLERS if c in offered]
    if "cpu" not in wanted or "memory" not in wanted:
        return None
    enable = " ".join(f"+{c}" for c in wanted)
    # Fails (EBUSY) when labgate's own cgroup holds processes and is not the root.
    (base / "cgroup.subtree_control").write_text(enable)
    parent = base / PARENT
    parent.mkdir(exist_ok=True)
    (parent / "cgroup.subtree_control").write_text(enable)
    return Hierarchy(version=2, parents=dict.fromkeys(wanted, parent))


def _v1(own: dict[str, str]) -> Hierarchy | None:
    parents = {
        c: ROOT / c / own[c].lstrip("/") / PARENT
        for c in CONTROLLERS
        if c in own and (ROOT / c / "cgroup.procs").is_file()
    }
    if "cpu" not in parents or "memory" not in parents:
        return None
    return Hierarchy(version=1, parents=parents)


@cache
def hierarchy() -> Hierarchy | None:
    """The cgroup hierarchy instances go in, or None (not root, no cgroups, no controllers)."""
    if os.geteuid() != 0:
        return None
    try:
        own = _own_paths()
        return _v2(own) or _v1(own)
    except (OSError, ValueError) as exc:
        _warn(f"cannot use cgroups ({exc})")
        return None


def _warn(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "%s: process instances get rlimits and CPU affinity only, which they can lift "
            "partly (see docs/backends/process.md)",
            reason,
        )


def _write(directory: Path, name: str, value: str) -> None:
    (directory / name).write_text(value)


def _prepare_v1_cpuset(parent: Path) -> str:
    """Give the v1 cpuset parent its cpus and mems (new v1 cpusets start empty); its mems.

    Each is checked on its own: another process (a parallel agent) making the
    same parent may have written its cpus and not yet its mems, and a child
    given empty mems takes no process (ENOSPC when its task joins).
    """
    for name in ("cpuset.cpus", "cpuset.mems"):
        if not (parent / name).read_text().strip():
            _write(parent, name, (parent.parent / name).read_text().strip())
    return (parent / "cpuset.mems").read_text().strip()


def _ensure_parent(found: Hierarchy, controller: str, parent: Path) -> str:
    """Create ``parent`` if needed (another stop may have removed it); v1 cpuset: its mems."""
    parent.mkdir(exist_ok=True)
    if found.version == 2:
        enable = " ".join(f"+{c}" for c in found.parents)
        _write(parent, "cgroup.subtree_control", enable)
    elif controller == "cpuset":
        return _prepare_v1_cpuset(parent)
    return ""


def create(
    instance_id: str, cpu: float, cpus: tuple[int, ...], memory: int | None, pids: int
) -> Cgroup | None:
    """Make the instance's cgroup(s) and write its limits; None when that is not possible."""
    found = hierarchy()
    if found is None:
        return None
    quota = max(1000, math.ceil(cpu * CPU_PERIOD_US)) if cpu > 0 else None
    limits = (quota, cpus, memory, pids)
    made: list[Path] = []
    for attempt in range(3):
        try:
            for controller, parent in found.parents.items():
                path, mems = parent / instance_id, ""
                if path not in made:
                    mems = _ensure_parent(found, controller, parent)
                    path.mkdir()
                    made.append(path)
                _configure(found.version, controller, path, *limits, mems)
            break
        except OSError as exc:
            remove(tuple(str(p) for p in made))
            made = []
            # A parent removed by a stop between its mkdir and ours: try again.
            if not isinstance(exc, FileNotFoundError) or attempt == 2:
                _warn(f"cannot set up the cgroup of instance {instance_id} ({exc})")
                return None
    return Cgroup(
        version=found.version,
        paths=tuple(str(p) for p in made),
        cpu_quota_us=quota,
        cpu_period_us=CPU_PERIOD_US,
        cpus=cpus,
        memory=memory,
        pids=pids,
    )


def _configure(
    version: int,
    controller: str,
    path: Path,
    quota: int | None,
    cpus: tuple[int, ...],
    memory: int | None,
    pids: int,
    mems: str,
) -> None:
    """Write one controller's limits into ``path``."""
    cpu_list = ",".join(str(c) for c in cpus)
    if controller == "cpu" and quota is not None:
        if version == 2:
            _write(path, "cpu.max", f"{quota} {CPU_PERIOD_US}")
        else:
            _write(path, "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(path, "cpu.cfs_quota_us", str(quota))
    elif controller == "cpuset":
        if version == 1:
            _write(path, "cpuset.cpus", cpu_list or (path.parent / "cpuset.cpus").read_text())
            _write(path, "cpuset.mems", mems)
        elif cpu_list:
            _write(path, "cpuset.cpus", cpu_list)
    elif controller == "memory" and memory is not None:
        _write(path, "memory.max" if version == 2 else "memory.limit_in_bytes", str(memory))
    elif controller == "pids":
        _write(path, "pids.max", str(pids))


def remove(paths: tuple[str, ...] | list[str], wait: float = 0.0) -> bool:
    """Remove an instance's cgroups (retrying up to ``wait`` seconds while busy); all gone?"""
    deadline = time.monotonic() + wait
    left = [Path(p) for p in paths]
    while True:
        for path in list(left):
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                continue  # still has tasks (exiting), or children
            left.remove(path)
            # The per-controller "labgate" parent goes too once it is empty, so labgate
            # never leaves a directory behind in a cgroup that is not its own.
            with contextlib.suppress(OSError):
                path.parent.rmdir()
        if not left or time.monotonic() >= deadline:
            return not left
        time.sleep(0.02)


def paths_of(instance_id: str) -> list[str]:
    """The cgroup directories of ``instance_id`` that exist (a start recorded nowhere made them)."""
    found = hierarchy()
    if found is None:
        return []
    paths = {parent / instance_id for parent in found.parents.values()}
    return sorted(str(path) for path in paths if path.is_dir())


def sweep(keep: set[str], min_age: float = 60.0) -> list[str]:
    """Remove empty instance cgroups older than ``min_age`` seconds whose ids are not in ``keep``.

    The age spares a cgroup made for a launch that has not joined it yet
    (another site's, or this one's); a cgroup with processes cannot be removed.
    """
    found = hierarchy()
    if found is None:
        return []
    removed: list[str] = []
    now = time.time()
    for parent in set(found.parents.values()):
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False) or entry.name in keep:
                continue
            with contextlib.suppress(OSError):
                if now - entry.stat(follow_symlinks=False).st_mtime >= min_age:
                    os.rmdir(entry.path)
                    removed.append(entry.path)
    return removed
