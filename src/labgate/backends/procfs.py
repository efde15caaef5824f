"""What /proc tells about processes: identity, families, and safe signalling.

Used by the process backend to find every process of an instance (its tree,
its session, and anything carrying its marker variable) and to signal a pid
only while it is still the process that was started, never a newcomer that
reused the pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

#: Every process of an instance carries ``LABGATE_INSTANCE_ID=<id>`` in its
#: environment; stop() finds the ones that left the process tree by it.
MARKER_VAR = "LABGATE_INSTANCE_ID"
_MARKER_PREFIX = f"{MARKER_VAR}=".encode()
#: The process backend marks every instance process with its deployment and site too
#: (see :func:`marked_instances`): its orphans are told from another labgate's on the
#: host, and from another site's of the same labgate.
DEPLOYMENT_VAR = "LABGATE_DEPLOYMENT"
SITE_VAR = "LABGATE_INSTANCE_SITE"
_PF_KTHREAD = 0x00200000


@dataclass(frozen=True)
class ProcInfo:
    """The fields of ``/proc/<pid>/stat`` the backend uses."""

    pid: int
    ppid: int
    pgrp: int
    session: int
    state: str
    #: Clock ticks after boot (field 22): with the pid, identifies a process.
    start_time: int
    #: Raw wait status, meaningful for zombies only (field 52).
    exit_status: int
    #: The command name (field 2): it changes when the process execs another program.
    name: bytes = b""
    #: A kernel thread (``PF_KTHREAD`` in field 9): it has no environment.
    kernel_thread: bool = False
    #: Threads of the process (field 20).
    threads: int = 1

    @property
    def zombie(self) -> bool:
        """Dead but not yet reaped by its parent.

        A process whose main thread exited while others run on shows ``Z`` too,
        but it is alive: it counts as a zombie only once no other thread is left.
        """
        return self.state in ("Z", "X") and self.threads <= 1


def read_proc(pid: int) -> ProcInfo | None:
    """``/proc/<pid>/stat`` parsed, or None when there is no such process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: cut at the last ")".
    end = data.rindex(b")")
    rest = data[end + 2 :].split()
    exit_status = int(rest[49]) if len(rest) > 49 else 0
    return ProcInfo(
        pid=pid,
        ppid=int(rest[1]),
        pgrp=int(rest[2]),
        session=int(rest[3]),
        state=rest[0].decode(),
        start_time=int(rest[19]),
        exit_status=exit_status,
        name=data[data.index(b"(") + 1 : end],
        kernel_thread=bool(int(rest[6]) & _PF_KTHREAD),
        threads=int(rest[17]),
    )


def boot_id() -> str:
    """This boot's id: pids and start times mean nothing across reboots."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _environ_of(pid: int) -> bytes | None:
    """``pid``'s environment as it was started or last exec'd, or None (gone, not ours).

    A process whose main thread exited while others run on has none under its
    own pid (``ESRCH``): it is read through one of its live threads.
    """
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except ProcessLookupError:  # gone, or its main thread is
        pass
    except OSError:  # another user's process
        return None
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in threads:
        with contextlib.suppress(OSError):
            return Path(f"/proc/{pid}/task/{tid}/environ").read_bytes()
    return None


def _marker_in(environ: bytes) -> bytes | None:
    """The instance id of the marker in a raw environment, or None."""
    for variable in environ.split(b"\0"):
        if variable.startswith(_MARKER_PREFIX):
            return variable[len(_MARKER_PREFIX) :]
    return None


@dataclass(frozen=True)
class ProcTable:
    """Every process on the machine at one moment, and the instance markers they carry."""

    taken: float
    procs: dict[int, ProcInfo]
    #: pid -> the instance id in its environment marker, for marked processes only.
    markers: dict[int, bytes]


#: Scans younger than this are shared: a stop polls /proc every 50 ms, and fifty
#: instances stopping at once must not scan it a thousand times a second.
SHARED_SCAN_AGE = 0.025
_scan_lock = threading.Lock()
_last_scan: ProcTable | None = None
#: (pid, start time) -> (command name, marker or None) when last read. A process's
#: environment is the one it was started or last exec'd with, so an unmarked process is
#: read again when it execs (its name changes: a process labgate forks carries
#: labgate's environment until it execs the tool's), and at every scan while it is a
#: child of this process: the launcher labgate forks keeps the server's name
#: ("python") when it execs with the marker. Once marked, a process stays the
#: instance's even if it execs without the marker. An empty environment is never kept
#: (a process in the middle of an exec shows none).
_markers: dict[tuple[int, int], tuple[bytes, bytes | None]] = {}


def scan(max_age: float = SHARED_SCAN_AGE, since: float | None = None) -> ProcTable:
    """The processes of the machine, from a scan at most ``max_age`` seconds old.

    With ``since`` (a :func:`time.monotonic` reading), from a scan begun at or
    after it: one that cannot predate a process started before that moment.
    Concurrent callers (worker threads of several stops) share one scan; each
    process's environment is read only when needed (see :data:`_markers`).
    """
    global _last_scan
    with _scan_lock:
        now = time.monotonic()
        last = _last_scan
        fresh_enough = since is None or (last is not None and last.taken >= since)
        if last is not None and now - last.taken <= max_age and fresh_enough:
            return last
        procs = {info.pid: info for entry in os.scandir("/proc") if entry.name.isdigit()
                 if (info := read_proc(int(entry.name))) is not None}  # fmt: skip
        markers: dict[int, bytes] = {}
        seen: dict[tuple[int, int], tuple[bytes, bytes | None]] = {}
        own = os.getpid()
        for pid, info in procs.items():
            if info.kernel_thread:
                continue
            key = (pid, info.start_time)
            known = _markers.get(key)
            if known is not None and (
                known[1] is not None or (known[0] == info.name and info.ppid != own)
            ):
                marker = known[1]
            else:
                environ = _environ_of(pid)
                if environ == b"":
                    continue  # in the middle of an exec, or exiting: read again next time
                marker = _marker_in(environ) if environ is not None else None
            seen[key] = (info.name, marker)
            if marker is not None:
                markers[pid] = marker
        _markers.clear()
        _markers.update(seen)  # forgets the processes that are gone
        _last_scan = ProcTable(now, procs, markers)
        return _last_scan


def instance_processes(
    instance_id: str, root: int, known: dict[int, int], since: float | None = None
) -> dict[int, int]:
    """Live processes of an instance, as pid -> start time.

    They are the ``known`` processes that still exist, the processes carrying
    the instance's environment marker, every process in the session of the
    tracked process ``root`` while it lives, and all their descendants (found
    through parent links, which catches children that started a new session).
    ``since`` asks for a scan begun at or after that moment (see :func:`scan`):
    a stop's first look must not use one that predates a process it must stop.
    """
    table = scan(since=since)
    procs = table.procs
    marker = instance_id.encode()
    seeds = {pid for pid, start in known.items() if pid in procs and procs[pid].start_time == start}
    seeds |= {pid for pid, value in table.markers.items() if value == marker}
    if root in seeds:
        seeds |= {p.pid for p in procs.values() if root in (p.session, p.pgrp)}
    children: dict[int, list[int]] = {}
    for info in procs.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: set[int] = set()
    todo = list(seeds)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return {pid: procs[pid].start_time for pid in found if not procs[pid].zombie}


def marked_instances(deployment: str, site: str, min_age: float) -> set[str]:
    """Ids of the instances with a live process marked with ``deployment`` and ``site``.

    Only processes started at least ``min_age`` seconds ago count: a younger
    one may belong to a launch whose record the caller has not read yet. An
    id that a live process carries with other marks, or none, is left out
    whatever else carries it: that instance may be another site's or another
    labgate's, and someone dressed a process up as this site's. (A process
    that exec'd without any ``LABGATE_`` variable carries no id at all; stopping
    its instance finds it through its parents.)
    """
    table = scan()
    wanted = {f"{DEPLOYMENT_VAR}={deployment}".encode(), f"{SITE_VAR}={site}".encode()}
    newest = (_uptime() - min_age) * os.sysconf("SC_CLK_TCK")
    ours: set[bytes] = set()
    foreign: set[bytes] = set()
    for pid, marker in table.markers.items():
        info = table.procs.get(pid)
        if info is None or info.zombie:
            continue
        environ = _environ_of(pid)
        if not environ or _marker_in(environ) != marker:
            continue  # exiting, or exec'd since with another id or none
        if not wanted <= set(environ.split(b"\0")):
            foreign.add(marker)
        elif info.start_time <= newest:
            ours.add(marker)
    return {marker.decode("utf-8", "replace") for marker in ours - foreign}


def _uptime() -> float:
    """Seconds since boot (the clock of a process's start time)."""
    return float(Path("/proc/uptime").read_text().split()[0])


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time (user and system, with reaped children's) of the processes ``pids``."""
    ticks = 0
    for pid in pids:
        try:
            data = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        rest = data[data.rindex(b")") + 2 :].split()
        # Fields 14-17 (utime, stime, cutime, cstime), counted from field 3 in ``rest``.
        ticks += sum(int(value) for value in rest[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def signal_if_same(pid: int, start_time: int, sig: signal.Signals) -> None:
    """Send ``sig`` to ``pid`` if it is still the process that started at ``start_time``."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        # The pidfd pins the process: once its start time checks out the signal
        # cannot reach a newcomer that reused the pid.
        info = read_proc(pid)
        if info is not None and info.start_time == start_time:
            signal.pidfd_send_signal(fd, sig)
    except OSError:
        pass
    finally:
        os.close(fd)


#: Most bytes a tail reads back from a file's end: a log the user's code writes with no
#: line end (or lines of gigabytes) is cut there rather than read whole into memory.
MAX_TAIL_BYTES = 4 * 1024 * 1024


def tail(path: Path, lines: int, block: int = 65536, owners: Collection[int] = ()) -> str:
    """The last ``lines`` lines of ``path``, reading backwards from its end.

    With ``owners`` (a file in a directory its user controls), only a regular
    file of one of those uids with no other link is read, and never through a
    symbolic link: "" otherwise. At most :data:`MAX_TAIL_BYTES` are read.
    """
    if lines <= 0:
        return ""
    try:
        if owners:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid not in owners or info.st_nlink != 1:
                os.close(fd)
                return ""
            opened = os.fdopen(fd, "rb")
        else:
            opened = path.open("rb")
        with opened as handle:
            return tail_of(handle, lines, block)
    except OSError:
        return ""


def tail_of(handle: BinaryIO, lines: int, block: int = 65536) -> str:
    """The last ``lines`` lines of the open file ``handle``, reading backwards from its end.

    At most :data:`MAX_TAIL_BYTES` are read: past that, the first line is cut.
    """
    if lines <= 0:
        return ""
    pos = handle.seek(0, os.SEEK_END)
    chunks: list[bytes] = []
    newlines = taken = 0
    while pos > 0 and newlines <= lines and taken < MAX_TAIL_BYTES:
        size = min(block, pos, MAX_TAIL_BYTES - taken)
        pos -= size
        handle.seek(pos)
        chunk = handle.read(size)
        chunks.append(chunk)
        taken += len(chunk)
        newlines += chunk.count(b"\n")
    data = b"".join(reversed(chunks))
    ends_with_newline = data.endswith(b"\n")
    parts = data.split(b"\n")
    if ends_with_newline:
        parts.pop()
    text = b"\n".join(parts[-lines:]).decode("utf-8", errors="replace")
    return text + "\n" if ends_with_newline else text
