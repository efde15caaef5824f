"""A FUSE file system that never answers: what reads it sleeps uninterruptibly.

``python fuse_stall.py MOUNTPOINT`` (as root) mounts it, answers the kernel's
``INIT``, prints ``ready`` and then reads every request and answers none
(printing ``held <opcode>`` for each). A process that opens a file there
waits in state ``D`` once the request is read, and SIGKILL cannot end it (the
kernel waits for the answer), as with a hung NFS server. On SIGTERM it
unmounts (lazily) and exits: its ``/dev/fuse`` closes, every request fails,
and the sleepers wake and die of the SIGKILL they hold. Tests of stops that
cannot end every process run it through :class:`Stall`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2
MS_REC, MS_PRIVATE, CLONE_NEWNS = 0x4000, 0x40000, 0x20000
FUSE_INIT = 26
#: fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding.
IN_HEADER = struct.Struct("<IIQQIIIHH")
#: fuse_out_header: len, error, unique.
OUT_HEADER = struct.Struct("<IiQ")
#: fuse_init_out up to max_write (the kernel takes a short one): major, minor,
#: max_readahead, flags, max_background, congestion_threshold, max_write.
INIT_OUT = struct.Struct("<IIIIHHI")


class Stall:
    """This file system mounted at ``mountpoint`` (``ready``: it is) until released.

    Mounted in a mount namespace of the daemon's own: anything on the machine
    that walks the mount table and looks up each mount (bubblewrap remounting
    what it binds, of every other test's sandbox) would hang on it too. A
    process reaches it by :attr:`path` (through ``/proc/<daemon>/root``).
    """

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.daemon = subprocess.Popen(
            [sys.executable, __file__, str(mountpoint)], stdout=subprocess.PIPE, text=True
        )
        assert self.daemon.stdout is not None
        self.ready = self.daemon.stdout.readline().strip() == "ready"
        #: The mount point as other processes reach it: in the daemon's mount namespace.
        self.path = Path(f"/proc/{self.daemon.pid}/root{mountpoint.absolute()}")

    def wait_held(self) -> None:
        """Wait until a request is held: its sender sleeps uninterruptibly once killed."""
        assert self.daemon.stdout is not None
        assert self.daemon.stdout.readline().startswith("held")

    def release(self) -> None:
        """Unmount it: what sleeps on it wakes (and dies of a SIGKILL it holds)."""
        if self.daemon.poll() is None:
            self.daemon.terminate()
        self.daemon.wait()


@pytest.fixture
def stalled(tmp_path: Path) -> Iterator[Stall]:
    """A file system that never answers, root only; released when the test ends."""
    if os.geteuid() != 0 or not Path("/dev/fuse").exists():
        pytest.skip("mounting a FUSE file system needs root and /dev/fuse")
    (tmp_path / "stalled").mkdir()
    stall = Stall(tmp_path / "stalled")
    try:
        if not stall.ready:
            pytest.skip("cannot mount a FUSE file system here")
        yield stall
    finally:
        stall.release()


def main(mountpoint: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    # A mount namespace of its own, nothing propagated out: the stall is seen by nobody
    # who does not look for it.
    if libc.unshare(CLONE_NEWNS) != 0 or libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None):
        sys.exit(f"unshare: {os.strerror(ctypes.get_errno())}")
    fd = os.open("/dev/fuse", os.O_RDWR)
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
    flags = MS_NOSUID | MS_NODEV
    if libc.mount(b"labgate-stall", mountpoint.encode(), b"fuse", flags, options) != 0:
        sys.exit(f"mount: {os.strerror(ctypes.get_errno())}")

    def leave(_signum: int, _frame: object) -> None:
        libc.umount2(mountpoint.encode(), MNT_DETACH)
        os._exit(0)

    signal.signal(signal.SIGTERM, leave)
    held = []
    while True:
        request = os.read(fd, 1 << 20)
        _, opcode, unique, *_ = IN_HEADER.unpack_from(request)
        if opcode == FUSE_INIT:
            _major, minor = struct.unpack_from("<II", request, IN_HEADER.size)
            body = INIT_OUT.pack(7, min(minor, 31), 0, 0, 0, 0, 4096)
            os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body)
            print("ready", flush=True)
        else:
            held.append(unique)  # never answered
            print(f"held {opcode}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
