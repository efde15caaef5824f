"""One Slurm job's directory on the filesystem the nodes share: made anew, private, the account's.

An instance's job (``launch.json``) and a batch task's job (``task.json``,
``taskcall.py``) keep their files the same way: ``<jobs_dir>`` is the
agent's, mode 0711 (each account reaches its own job directory and lists
none); the job's directory is made anew, mode 0700, with its files written
exclusively, mode 0600 (they hold the job's secrets: a token, a task's
definition), and its ``job.py`` (0700); then everything is handed to the
job's account. What a previous job of the account left under that name (a
link where a file goes) is removed, never written through.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from labgate.backends.slurm.accounts import TRAVERSE_ONLY, Account, make_dirs
from labgate.backends.slurm.jobs import write_script

#: The batch script every job directory holds.
SCRIPT = "job.py"


def open_jobs_dir(jobs_dir: Path) -> None:
    """Create ``jobs_dir`` and keep it mode 0711 (the agent's: accounts pass, list nothing)."""
    make_dirs(jobs_dir)
    info = jobs_dir.stat()
    if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != TRAVERSE_ONLY:
        os.chmod(jobs_dir, TRAVERSE_ONLY)


def write_job_dir(
    job_dir: Path, files: dict[str, str], script: str, account: Account | None
) -> None:
    """Make ``job_dir`` anew with ``files`` (name -> text, mode 0600) and ``job.py``.

    With ``account`` the directory and its files become the account's; without,
    they stay the agent's.
    """
    if job_dir.is_symlink():
        job_dir.unlink()
    elif job_dir.exists():
        shutil.rmtree(job_dir)
    job_dir.mkdir(mode=0o700)
    for name, text in files.items():
        fd = os.open(job_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
    write_script(job_dir / SCRIPT, script)
    if account is None:
        return
    for name in [*files, SCRIPT]:
        os.chown(job_dir / name, account.uid, account.gid, follow_symlinks=False)
    os.chown(job_dir, account.uid, account.gid, follow_symlinks=False)
