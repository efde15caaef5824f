"""Who a process-backend instance runs as, and who owns its workspace.

When labgate runs as root, every instance runs as an unprivileged uid of its
owner's own: ``uid = gid = settings.instance_uid_base + user id``, with no
supplementary groups and no capabilities. Two users' instances then differ by
uid, so the kernel's permission checks keep them apart too (not only the
sandbox's mounts), and nothing an instance runs is root. These uids have no
``/etc/passwd`` entry; that is deliberate (no login, no home, no groups).

A warm-pool instance is started before anyone owns it and is later handed to
one user: it runs as a uid of **its own**, ``instance_uid_base +
POOL_UID_OFFSET + n``, where ``n`` is a number the portal takes from a counter
in its database for each pool instance (``labgate.db.counters``): never given
to anything else, never given again, not after a stop, a restart or on another
portal replica. What the kernel keys by uid (keyrings, the right to ptrace or
``pidfd_getfd``, per-uid limits) is then never shared between two claimers,
nor between one claimer and the next. The portal sends that uid's offset as
the launch spec's ``owner_id`` (:func:`pool_identity_number`), so the backend
derives it as it derives a user's, and an agent of the version before computes
the same uid. User ids stay below :data:`POOL_UID_OFFSET` (refused above), so
the two ranges never meet.

A workspace belongs to its user's uid, mode 0700. Workspaces created by an
older labgate (owned by root) are handed over once, at the next launch that
finds their top directory owned by someone else; a restored snapshot is
handed over right after it is extracted.

When labgate does not run as root it cannot switch uid: instances run as the
server's own account, as before (see ``docs/backends/process.md``).
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

#: The id files whose ranges the instance uids must stay out of.
SUBID_FILES = ("/etc/subuid", "/etc/subgid")
#: Ids a base is checked against: user ids this far above the base.
CHECKED_SPAN = 1_000_000
#: Where warm-pool instances' own uids begin, above ``instance_uid_base``. User ids
#: (AUTOINCREMENT, never reused) stay below it: 100 million accounts.
POOL_UID_OFFSET = 100_000_000
#: How many pool uids there are: one per pool instance ever started (a pool instance
#: every second for three years). With the largest ``instance_uid_base`` (4e9) the last
#: is 4_199_999_999, below 2**32 - 2 (``(uid_t) -1`` and the overflow ids stay clear).
POOL_UIDS = 100_000_000
#: keyctl(2)'s system call number by machine (glibc has no wrapper: libkeyutils does).
KEYCTL_SYSCALL = {"x86_64": 250, "aarch64": 219, "riscv64": 219}
#: Runs as ``python -I -S -c CLEAR_KEYRINGS <uid> <keyctl number>``, as root: becomes
#: ``uid`` (single-threaded, so for good) and empties its user and user-session keyrings.
CLEAR_KEYRINGS = r"""
import ctypes, os, sys
uid, keyctl = int(sys.argv[1]), ctypes.c_long(int(sys.argv[2]))
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
failed = []
for name, ring in (("user", -4), ("user session", -5)):
    if libc.syscall(keyctl, ctypes.c_long(7), ctypes.c_long(ring)) != 0:  # KEYCTL_CLEAR
        failed.append(f"{name} keyring: {os.strerror(ctypes.get_errno())}")
if failed:
    sys.stderr.write("; ".join(failed)); sys.exit(1)
"""


@dataclass(frozen=True)
class Identity:
    """The uid and gid an instance runs as."""

    uid: int
    gid: int


class IdentityError(ValueError):
    """No uid may be derived from this id (out of its range); the message says why."""


def pool_identity_number(serial: int) -> int:
    """What the launch spec of the ``serial``-th warm-pool instance carries as ``owner_id``.

    ``serial`` counts from 1 (``labgate.db.counters``); the instance runs as
    ``instance_uid_base`` plus this number, a uid of the pool range. Past the
    range's end (:data:`POOL_UIDS`) the backend refuses to start it.
    """
    return POOL_UID_OFFSET + serial


def is_pool_number(number: int | None) -> bool:
    """Whether ``number`` (a launch spec's ``owner_id``) names a warm-pool instance's own uid."""
    return number is not None and POOL_UID_OFFSET < number < POOL_UID_OFFSET + POOL_UIDS


def instance_identity(base: int, owner_id: int | None, *, pool: bool = False) -> Identity | None:
    """The identity for an instance of user ``owner_id``; None when labgate is not root.

    A launch that names no user id (a test, a direct backend call) runs as
    ``base`` itself, which no user gets: user ids start at 1. With ``pool``,
    ``owner_id`` is a warm-pool instance's number (:func:`pool_identity_number`)
    and must be one; without, it must be a user id, below :data:`POOL_UID_OFFSET`.
    Either way out of range: :class:`IdentityError`.
    """
    if os.geteuid() != 0:
        return None
    number = owner_id or 0
    if pool and not is_pool_number(number):
        raise IdentityError(
            f"a warm-pool instance must run as a uid of its own, and {number} names none "
            "(a portal older than this site's labgate?)"
        )
    if not pool and not 0 <= number < POOL_UID_OFFSET:
        raise IdentityError(
            f"user id {number} is out of the range of instance uids (0 to "
            f"{POOL_UID_OFFSET - 1}; warm-pool instances' uids begin above it)"
        )
    warn_on_subid_overlap(base)
    uid = base + number
    return Identity(uid=uid, gid=uid)


@cache
def warn_on_subid_overlap(base: int) -> None:
    """Warn once when the instance uids may collide with a subordinate id range.

    Checked: the first million user uids and the whole warm-pool range.
    """
    spans = ((base, CHECKED_SPAN), (base + POOL_UID_OFFSET, POOL_UIDS))
    for name in SUBID_FILES:
        try:
            lines = Path(name).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(":")
            if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
                continue
            start, count = int(parts[1]), int(parts[2])
            if any(start < low + span and low < start + count for low, span in spans):
                log.warning(
                    "instance_uid_base %d overlaps the range %s in %s: a user's instance could "
                    "share a uid with %s's user namespaces; choose another instance_uid_base",
                    base,
                    f"{start}-{start + count - 1}",
                    name,
                    parts[0],
                )


def hand_over(path: Path, identity: Identity, *, everything: bool = False) -> None:
    """Make ``path`` (a workspace) and what it holds belong to ``identity``, mode 0700 on top.

    Walks the tree only when the top directory is not already the identity's
    (or when ``everything`` says so, after a restore): a workspace is handed
    over once, and a launch stays fast. Symlinks are changed, never followed, even
    one swapped in during the walk.
    """
    top = path.lstat()
    if not everything and (top.st_uid, top.st_gid) == (identity.uid, identity.gid):
        if top.st_mode & 0o777 != 0o700:
            os.chmod(path, 0o700)
        return
    # fwalk and dir_fd: a link swapped in for a directory meanwhile is never followed.
    for _, dirs, files, dir_fd in os.fwalk(path, follow_symlinks=False):
        for name in (*dirs, *files):
            os.chown(name, identity.uid, identity.gid, dir_fd=dir_fd, follow_symlinks=False)
    os.lchown(path, identity.uid, identity.gid)
    os.chmod(path, 0o700)


def keyring_users() -> set[int]:
    """The uids the kernel keeps keys or keyrings for (``/proc/key-users``)."""
    try:
        lines = Path("/proc/key-users").read_text().splitlines()
    except OSError:  # a kernel without keys
        return set()
    return {
        int(uid) for uid, _, _ in (line.partition(":") for line in lines) if uid.strip().isdigit()
    }


def clear_keyrings(uid: int) -> str | None:
    """Empty the user and user-session keyrings of ``uid`` (as root); what failed, or None.

    For a uid nobody runs as again (a stopped warm-pool instance's): the kernel
    keeps a uid's user keyrings, and what is linked there, after its last process
    exits. Only a uid the kernel lists in ``/proc/key-users`` is visited (looking
    would make its keyrings). Keys stay when the tool took away its own right to
    change the keyring (``KEYCTL_SETPERM``); nobody can read them, and they count
    against that uid's quota (``kernel.keys.maxbytes``) only.
    """
    if uid not in keyring_users():
        return None
    keyctl = KEYCTL_SYSCALL.get(platform.machine())
    if keyctl is None:
        return f"keyrings cannot be emptied on {platform.machine()}"
    argv = [sys.executable, "-I", "-S", "-c", CLEAR_KEYRINGS, str(uid), str(keyctl)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot empty them: {exc!r}"
    if done.returncode != 0:
        return f"cannot empty them: {done.stderr.strip() or f'exit code {done.returncode}'}"
    return None
