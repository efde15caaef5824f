"""Batch tasks as Slurm jobs: the task executor of a site whose backend is ``slurm``.

Each attempt is one batch job, submitted as its owner's Unix account as
instances are (:mod:`labgate.backends.slurm.accounts`: the site's
``accounts`` table, root and uids under ``min_uid`` refused, ``sbatch`` run
with the account's uid, gid and groups). The job's body is labgate's task
executor (:mod:`labgate.agent.taskexec`, standard library only, run by the
site's ``python`` on the node), so a task sees on a Slurm site what it sees
on a process site, minus the sandbox: it runs as its owner's account.

Two directories per attempt:

- the **job directory** ``<jobs_dir>/tasks/<attempt>/`` on the filesystem
  the nodes share: the account's, mode 0700, inside ``tasks/`` (the agent's,
  0711: each account reaches its own job directory and lists none). It
  holds ``task.json`` (mode 0600: the attempt's token), ``job.py``,
  ``taskcall.py``, and what the job writes: ``output.log``, ``results/``,
  ``results.tar.gz`` and, last, ``exit.json``;
- the runner's own ``<data dir>/tasks/<site>/<attempt>/`` (private to the
  agent): ``task.json``, ``slurm.json`` (job id, job directory, account),
  and once the attempt ended ``exit.json``, ``output.log`` and
  ``results.tar.gz`` taken from the job directory.

The account owns the job directory, so the agent takes only regular files
there that the account owns, with one link, opened without following a
link, and of bounded size; it never walks the job's results (the job packed
them) and removes the job directory once it took them. While the job runs,
its output is read from the job's ``output.log`` the same way.

A poll looks for the job's ``exit.json`` at every round and asks the
controller (``scontrol``, then ``sacct`` for a job it forgot) at most every
``poll_interval`` seconds. A job that ended without its executor's word
(``scancel`` by someone else, node failure, Slurm's time limit), or whose
executor was stopped by a ``scancel`` labgate did not send, ends the
attempt ``lost`` (``failed`` for Slurm's time limit or memory) with
Slurm's reason. Slurm's own time limit is the task's timeout plus
:data:`WALL_GRACE`, in whole minutes: the executor stops the task at its
timeout first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Any

from labgate.agent import taskexec
from labgate.agent.taskenv import EnvironmentCache, Progress
from labgate.agent.tasks import MAX_RESULTS_ARCHIVE, Outcome, TaskExecutor, read_outcome
from labgate.backends.procfs import tail
from labgate.backends.slurm.accounts import (
    Account,
    make_dirs,
    planted,
    unreachable,
)
from labgate.backends.slurm.backend import SlurmBackend, describe_end
from labgate.backends.slurm.jobdir import open_jobs_dir, write_job_dir
from labgate.backends.slurm.jobs import Job, JobRequest, SlurmError
from labgate.backends.wheels import Reader
from labgate.errors import BadRequest, LabgateError
from labgate.wire.runs import TaskSpec

log = logging.getLogger(__name__)

#: The file that marks an attempt as a Slurm job, in the runner's directory.
MARKER = "slurm.json"
#: Seconds Slurm's time limit adds to the task's timeout (the executor stops it first).
WALL_GRACE = 60
#: The most of the job's ``exit.json`` taken (its result is in it).
MAX_EXIT = 1024 * 1024
#: Lines of the job's output taken when it ended.
MAX_OUTPUT_LINES = 10000
#: Slurm job states in which the task's own code is to blame: the attempt ``failed``.
_TASK_FAULTS = frozenset({"TIMEOUT", "OUT_OF_MEMORY", "DEADLINE"})
TASKCALL = Path(__file__).with_name("taskcall.py")


@functools.cache
def executor_source() -> str:
    """The task executor's code without its ``__main__`` block: the body of every task job."""
    source = Path(taskexec.__file__).read_text()
    return source.split('\nif __name__ == "__main__":', 1)[0]


def wall_time(timeout: float) -> int:
    """Slurm's time limit of a task job: its timeout plus the grace, in whole minutes."""
    return max(60, math.ceil((timeout + WALL_GRACE) / 60) * 60)


class SlurmTaskExecutor(TaskExecutor):
    """Each attempt one batch job as its owner's account; see the module docstring."""

    name = "slurm"

    def __init__(self, backend: SlurmBackend) -> None:
        self.backend = backend
        self.config = backend.config
        self.slurm = backend.slurm
        #: When the controller was last asked about each attempt (monotonic seconds).
        self._asked: dict[str, float] = {}

    def environment_cache(self, default_root: Path) -> EnvironmentCache:
        """Venvs on the filesystem the nodes share, made with the nodes' Python.

        The agent makes them (its own files, readable by all, writable by none
        of the accounts); a job of any account with the same list uses it.
        """
        root = self.backend.jobs_dir.resolve() / "envs"
        return EnvironmentCache(root, python=self.config.python or sys.executable)

    async def reader(self, spec: TaskSpec) -> Reader | None:
        """The owner's account reads their wheel files (as root; None with ``run_as =
        "agent"``, or when the agent is not root and cannot switch)."""
        account = await asyncio.to_thread(self._account, spec.owner)
        if account is None or os.geteuid() != 0:
            return None
        return Reader(account.uid, account.gid, account.groups)

    @property
    def site(self) -> str:
        """The site's name."""
        return self.backend.site or "site"

    def job_name(self, attempt_id: str) -> str:
        """A task job's name: never one of the site's instance jobs (reconcile cancels those)."""
        return f"{self.config.job_prefix}.task.{self.site}.{attempt_id}"

    def job_dir(self, attempt_id: str) -> Path:
        """Where an attempt's job keeps its files, on the filesystem the nodes share."""
        return self.backend.jobs_dir.resolve() / "tasks" / attempt_id

    # --- start --------------------------------------------------------------------

    async def start(
        self,
        spec: TaskSpec,
        directory: Path,
        env_dir: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Write the job's files as its account's and submit it with ``sbatch`` as that account."""
        self._refuse(spec)
        account = await asyncio.to_thread(self._account, spec.owner)
        job_dir = self.job_dir(spec.attempt_id)
        python = self.config.python or sys.executable
        body = spec.model_dump(mode="json")
        venv = str(env_dir) if env_dir is not None else ""
        body.update(sandbox=[], venv=venv, taskcall=str(job_dir / "taskcall.py"))
        request = JobRequest(
            name=self.job_name(spec.attempt_id),
            comment=f"labgate-task:{self.site}:{spec.attempt_id}",
            body=executor_source() + f"\n\nsys.exit(run_job({str(job_dir)!r}))\n",
            shebang=f"#!{python}",
            partition=self.config.partition,
            account=self.config.account,
            qos=self.config.qos,
            reservation=self.config.reservation,
            constraint=self.config.constraint,
            gres=self.config.gres,
            time_limit=wall_time(spec.timeout),
            cpus=max(1, math.ceil(spec.cpu)),
            memory=spec.memory_mib * 2**20 if self.config.request_memory else 0,
            output=str(job_dir / "job.log"),
            workdir=str(job_dir),
            extra=tuple(self.config.extra_directives),
        )
        try:
            script = request.script()
            await asyncio.to_thread(self._write_job, job_dir, body, script, account, spec.owner)
            job_id = await self.slurm.submit_file(
                job_dir / "job.py", account.submitter if account is not None else None
            )
        except (OSError, ValueError, SlurmError) as exc:
            raise BadRequest(f"cannot submit the task's Slurm job: {exc}") from None
        runner: dict[str, Any] = {"account": "", "uid": os.geteuid(), "gid": os.getegid()}
        if account is not None:
            runner = {"account": account.name, "uid": account.uid, "gid": account.gid}
        marker = {"job_id": job_id, "dir": str(job_dir), **runner, "submitted_at": time.time()}
        await asyncio.to_thread(_write_private, directory, body, marker)
        if (directory / "cancel").exists():  # cancelled while it was being submitted
            await self.cancel(directory)

    def _refuse(self, spec: TaskSpec) -> None:
        """Tasks a Slurm site cannot run, with the reason."""
        if spec.image:
            raise BadRequest(
                f"site {self.site} runs tasks as Slurm jobs, not containers: a task with "
                "environment.image needs a site whose backend is containers"
            )
        limit = wall_time(spec.timeout)
        if limit > self.config.max_seconds:
            raise BadRequest(
                f"the task's timeout ({spec.timeout:g}s, {limit}s as a Slurm time limit) is "
                f"longer than site {self.site}'s max_time {self.config.max_time}"
            )

    def _account(self, owner: str) -> Account | None:
        """The owner's account; None (the agent's own) with ``run_as = "agent"``, never root."""
        try:
            account = self.backend.account_of(owner)
        except LabgateError as exc:
            raise BadRequest(exc.detail) from None
        if account is None and os.geteuid() == 0:
            raise BadRequest(
                f'site {self.site} has run_as = "agent" and its agent runs as root: '
                'a task would run as root; set run_as = "owner"'
            )
        return account

    def _write_job(
        self, job_dir: Path, body: dict[str, Any], script: str, account: Account | None, owner: str
    ) -> None:
        """The job's directory and files, made anew; the account's when it has one."""
        if account is None:
            job_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        else:
            open_jobs_dir(self.backend.jobs_dir)
            make_dirs(job_dir.parent)
            problem = unreachable(job_dir, account) or planted(job_dir)
            if problem is not None:
                raise BadRequest(
                    f"the Slurm job of labgate user {owner!r} (Unix account {account.name!r}) "
                    f"cannot use its job directory {job_dir}: {problem}; set the site option "
                    "jobs_dir to a directory of the agent's on the shared filesystem that "
                    "every user may pass through to (chmod o+x on the directories above it)"
                )
        files = {"task.json": json.dumps(body), "taskcall.py": TASKCALL.read_text()}
        write_job_dir(job_dir, files, script, account)

    # --- poll, cancel -----------------------------------------------------------

    async def poll(self, directory: Path) -> Outcome | None:
        """None while the job runs; its outcome (taken once from the job, then kept)."""
        exit_file = directory / "exit.json"
        if not exit_file.exists():
            marker = _marker(directory)
            if marker is None:
                return Outcome(state="lost", reason=f"site {self.site} has no job for this task")
            if not await self._ended(directory, marker):
                return None
        return read_outcome(exit_file)

    async def _ended(self, directory: Path, marker: dict[str, Any]) -> bool:
        """Whether the attempt ended; when it did, its outcome is in the runner's directory."""
        job_id, uid = str(marker["job_id"]), int(marker["uid"])
        job_dir = Path(marker["dir"])
        told = await asyncio.to_thread(_own_json, job_dir / "exit.json", uid)
        cancelled = (directory / "cancel").exists()
        job: Job | None = None
        if told is None or (told.get("state") == "cancelled" and not cancelled):
            # No word from the executor, or it was stopped by a scancel labgate did not send:
            # the controller says why, once the job has ended.
            now = time.monotonic()
            if now - self._asked.get(directory.name, 0.0) < self.config.poll_interval:
                return False
            self._asked[directory.name] = now
            try:
                job = await self.slurm.job(job_id)
            except SlurmError as exc:
                log.warning("Slurm job %s of task %s: %s", job_id, directory.name, exc)
                return False  # the controller is away: the job is not lost for that
            if job is not None and job.active:
                return False
            if told is None:  # it may have written its word just before it ended
                told = await asyncio.to_thread(_own_json, job_dir / "exit.json", uid)
        self._asked.pop(directory.name, None)
        outcome = await self._outcome(job_id, job, told, cancelled)
        await asyncio.to_thread(_take_over, directory, job_dir, uid, outcome)
        return True

    async def _outcome(
        self, job_id: str, job: Job | None, told: dict[str, Any] | None, cancelled: bool
    ) -> dict[str, Any]:
        """How the attempt ended: the executor's word, unless Slurm ended it."""
        if cancelled:
            return {**_clean(told or {}), "state": "cancelled", "reason": "cancelled"}
        if told is not None and told.get("state") != "cancelled":
            return _clean(told)
        if job is None:  # the controller forgot it: accounting may remember how it ended
            with contextlib.suppress(SlurmError):
                usage = await self.slurm.usage(job_id)
                if usage is not None:
                    job = Job(id=job_id, state=usage.state)
        state = "failed" if job is not None and job.state in _TASK_FAULTS else "lost"
        return {
            **_clean(told or {}),
            "state": state,
            "reason": describe_end(job, job_id),
        }

    async def discard(self, attempt_id: str) -> None:
        """Cancel the attempt's job found by its name (submitted, its id never written down)."""
        name = self.job_name(attempt_id)
        jobs = await self.slurm.jobs_named(name, everyone=self.backend.owners)
        for job_id, found in jobs.items():
            if found == name:
                log.info("cancelling Slurm job %s of attempt %s (unrecorded)", job_id, attempt_id)
                await self.slurm.cancel(job_id)

    async def output(self, directory: Path, lines: int) -> str:
        """The running job's output so far (only its account's own file, never through a link)."""
        return await asyncio.to_thread(_live_output, directory, lines)

    async def cancel(self, directory: Path) -> None:
        """``scancel`` the job; the next poll reports ``cancelled``."""
        (directory / "cancel").touch()
        marker = _marker(directory)
        if marker is None:
            return
        try:
            await self.slurm.cancel(str(marker["job_id"]))
        except SlurmError as exc:
            log.warning("cannot cancel Slurm job %s: %s", marker["job_id"], exc)


def _live_output(directory: Path, lines: int) -> str:
    marker = _marker(directory)
    if marker is None:
        return ""
    return tail(Path(marker["dir"]) / "output.log", lines, owners=(int(marker["uid"]),))


def _marker(directory: Path) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return found


def _write_private(directory: Path, body: dict[str, Any], marker: dict[str, Any]) -> None:
    """The runner's record: the job first, then ``task.json`` (adopt looks for it)."""
    (directory / MARKER).write_text(json.dumps(marker))
    fd = os.open(directory / "task.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(body, handle)


def own_file(path: Path, uid: int, limit: int) -> bytes | None:
    """A file the job's account ``uid`` wrote, at most ``limit`` bytes; else None.

    Only a regular file with one link, opened without following a link: the
    account owns the directory and could put a link to anything there.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_uid != uid
            or info.st_nlink != 1
            or info.st_size > limit
        ):
            log.warning("%s is not the job's own file (or too large): ignored", path)
            return None
        return handle.read(limit + 1)[:limit]


def _own_json(path: Path, uid: int) -> dict[str, Any] | None:
    raw = own_file(path, uid, MAX_EXIT)
    if raw is None:
        return None
    try:
        found = json.loads(raw)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _clean(told: dict[str, Any]) -> dict[str, Any]:
    """The job's ``exit.json`` (the account wrote it) reduced to what an outcome has."""
    state = told.get("state")
    code = told.get("exit_code")
    seconds = told.get("seconds")
    return {
        "state": state if state in ("succeeded", "failed", "cancelled") else "failed",
        "exit_code": code if isinstance(code, int) and not isinstance(code, bool) else None,
        "reason": str(told.get("reason") or "")[:2000],
        "result": told.get("result"),
        "seconds": float(seconds) if isinstance(seconds, int | float) else 0.0,
    }


def _take_over(directory: Path, job_dir: Path, uid: int, outcome: dict[str, Any]) -> None:
    """Take the job's output and results into the runner's directory, then remove the job's."""
    output = tail(job_dir / "output.log", MAX_OUTPUT_LINES, owners=(uid,))
    if outcome["state"] != "succeeded":
        job_log = tail(job_dir / "job.log", 40, owners=(uid,))
        if job_log.strip():
            output += f"--- labgate: the Slurm job's own output\n{job_log}"
    (directory / "output.log").write_text(output)
    archive = own_file(job_dir / taskexec.RESULTS_ARCHIVE, uid, MAX_RESULTS_ARCHIVE)
    if archive is not None:
        (directory / taskexec.RESULTS_ARCHIVE).write_bytes(archive)
    taskexec.write_exit(directory, outcome)
    # The account cannot rename it (tasks/ is the agent's); rmtree follows no link in it.
    shutil.rmtree(job_dir, ignore_errors=True)
