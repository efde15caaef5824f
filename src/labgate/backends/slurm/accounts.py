"""Whose Unix account a Slurm job runs as, and the directories that account must reach.

With ``run_as = "owner"`` (the default) each job runs as its owner's account
on the cluster, as Open OnDemand runs a portal user's jobs: the labgate user
maps to a system account (the site's ``accounts`` table, else the same name),
looked up with ``pwd``/``grp`` on the agent's machine (the nodes share the
directory service). Root and any account under ``min_uid`` (``slurm``,
``munge`` and other daemons) are refused, and so is a name with no account.

The agent submits as that account by running ``sbatch`` with the account's
uid, gid and supplementary groups (``subprocess``'s ``user``, ``group`` and
``extra_groups``; only root may do that). munge then vouches for the
account, so the controller applies that account's own limits and
associations, on every Slurm version. ``sbatch --uid/--gid`` is not used: by its
manual (Slurm 22.05 here) it checks partition access with the caller's
(root's) credentials, not the owner's, and drops to the uid only after the
allocation.
``scancel``, ``squeue``, ``scontrol`` and ``sacct`` stay the agent's (root
sees and cancels every job).

Every directory above a job directory or a workspace must let the account
through (search, not read): :func:`unreachable` says which one does not,
and :func:`make_dirs` creates missing ones mode 0711.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from labgate.backends.identity import Identity
from labgate.backends.slurm.jobs import Submitter
from labgate.errors import InstanceStartError

#: Mode of the directories labgate creates above job directories and workspaces.
TRAVERSE_ONLY = 0o711


@dataclass(frozen=True)
class Account:
    """The Unix account a job runs as."""

    name: str
    uid: int
    gid: int
    #: Every group of the account, its primary one included.
    groups: tuple[int, ...]

    @property
    def identity(self) -> Identity:
        """The uid and gid that own the account's job directory and workspace."""
        return Identity(uid=self.uid, gid=self.gid)

    @property
    def submitter(self) -> Submitter:
        """How ``sbatch`` runs to submit as the account."""
        return Submitter(uid=self.uid, gid=self.gid, groups=self.groups)

    def as_json(self) -> dict[str, object]:
        """What the instance's saved state keeps of the account."""
        return {"account": self.name, "uid": self.uid, "gid": self.gid}


def account_name(user: str, accounts: dict[str, str]) -> str:
    """The cluster account of labgate user ``user``: the site's table, else the same name."""
    return accounts.get(user, user)


def lookup_account(user: str, accounts: dict[str, str], min_uid: int) -> Account:
    """The account ``user``'s jobs run as; InstanceStartError saying why there is none."""
    name = account_name(user, accounts)
    mapped = " (mapped by the site's accounts table)" if user in accounts else ""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise InstanceStartError(
            f"labgate user {user!r} has no Unix account {name!r} on the cluster{mapped}; "
            f"create the account, or map the user to theirs in the site option accounts"
        ) from None
    if entry.pw_uid == 0 or entry.pw_uid < min_uid:
        raise InstanceStartError(
            f"labgate user {user!r} maps to the Unix account {name!r} "
            f"(uid {entry.pw_uid}){mapped}, which may not run jobs: uid 0 and uids "
            f"under min_uid {min_uid} are refused; "
            f"map the user to their own account in the site option accounts"
        )
    groups = tuple(sorted(set(os.getgrouplist(name, entry.pw_gid))))
    return Account(name=name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups)


def root_problem() -> str | None:
    """Why this agent cannot run jobs as their owners (it is not root), or None."""
    if os.geteuid() == 0:
        return None
    return (
        f'the Slurm site runs each job as its owner\'s account (run_as = "owner"), which '
        f"needs the agent to run as root; it runs as uid {os.geteuid()}"
    )


ROOT_FIX = (
    'run the site\'s agent as root, or set run_as = "agent" in the site options '
    "(then users of the site may see each other's work)"
)


def can_search(info: os.stat_result, account: Account) -> bool:
    """Whether ``account`` may pass through a directory with this ``stat`` (mode bits)."""
    mode = info.st_mode
    if info.st_uid == account.uid:
        return bool(mode & stat.S_IXUSR)
    if info.st_gid in account.groups:
        return bool(mode & stat.S_IXGRP)
    return bool(mode & stat.S_IXOTH)


def unreachable(path: Path, account: Account) -> str | None:
    """The first directory above ``path`` that ``account`` cannot pass through, in words."""
    for parent in reversed(path.parents):
        try:
            info = parent.stat()
        except OSError as exc:
            return f"{parent}: {exc.strerror}"
        if not can_search(info, account):
            return (
                f"{parent} (mode {stat.S_IMODE(info.st_mode):04o}, owner uid {info.st_uid}) "
                f"does not let the account {account.name!r} through"
            )
    return None


def planted(path: Path) -> str | None:
    """Why root must not make or hand over ``path``: others may put a link there, or it is one.

    Its directory must be writable by its owner alone (an account that may
    create entries there could name its link after another user's workspace).
    """
    info = path.parent.stat()
    if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"{path.parent} (mode {stat.S_IMODE(info.st_mode):04o}, owner uid {info.st_uid}) "
            f"must be the agent's and writable by it alone"
        )
    if path.is_symlink():
        return f"{path} is a symbolic link"
    return None


def make_dirs(path: Path, mode: int = TRAVERSE_ONLY) -> None:
    """Create ``path`` and its missing parents with ``mode`` (not masked by the umask)."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=mode)
        except FileExistsError:
            continue
        os.chmod(directory, mode)
