"""Batch tasks at a site: the pluggable executor and the runner that watches it.

The portal sends one :class:`~labgate.wire.runs.TaskSpec` per attempt
(``run_task``); the site's :class:`TaskRunner` hands it to its
:class:`TaskExecutor`, watches it, and reports ``running`` then how it ended
as :class:`~labgate.wire.site.Report` objects of ``kind="task"`` whose
``instance_id`` is the attempt id. They travel the link like instance
reports (acknowledged and sent again over a network link), so a portal that
restarts loses none. The attempt's executor may have told the portal first
(the task gateway): when the portal asks for the results of an attempt the
runner has not yet seen end, it looks at it at once (:meth:`TaskRunner.results`).

:class:`ProcessTaskExecutor` runs each attempt as a detached
``python -m labgate.agent.taskexec DIR`` (in a bubblewrap sandbox where it
exists, with its ``cpu`` and ``memory_mib`` as limits:
:mod:`labgate.agent.tasklimits`) under the site's task directory. Where
labgate runs as root, the task itself runs as its owner's instances do: as
the owner's own unprivileged uid (:mod:`labgate.backends.identity`), with no
capabilities and ``no_new_privs``, its results directory that uid's.
Everything about the attempt is in that directory, so a new runner (after a
restart) finds it again with :meth:`TaskRunner.adopt`. The other engines
implement :class:`TaskExecutor` the same way: containers
(:mod:`labgate.agent.taskcontainer`) and Slurm batch jobs
(:mod:`labgate.agent.taskslurm`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labgate.agent import tasklimits
from labgate.agent.taskenv import EnvironmentCache, Progress
from labgate.agent.taskexec import RESULTS_ARCHIVE
from labgate.backends.identity import Identity, hand_over, instance_identity
from labgate.backends.limits import dropping_argv
from labgate.backends.procfs import tail_of
from labgate.backends.sandbox import SandboxError, bwrap_argv, find_bwrap
from labgate.backends.wheels import NOBODY_READER, Reader
from labgate.errors import BadRequest, Conflict, NotFound
from labgate.wire.runs import TaskSpec
from labgate.wire.site import Report, Reporter

log = logging.getLogger(__name__)

#: Largest results archive a site hands over (bytes, compressed).
MAX_RESULTS_ARCHIVE = 64 * 1024 * 1024
#: The settings' ``instance_uid_base`` when the executor is not told (as instances').
DEFAULT_UID_BASE = 1_000_000_000
POLL_INTERVAL = 0.1
_ATTEMPT_ID = re.compile(r"^[a-f0-9]{8,32}$")


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, as its executor saw it."""

    state: str
    exit_code: int | None = None
    reason: str = ""
    result: Any = None
    seconds: float = 0.0


def read_outcome(exit_file: Path) -> Outcome:
    """The :class:`Outcome` an attempt's ``exit.json`` holds."""
    data = json.loads(exit_file.read_text())
    return Outcome(
        state=str(data.get("state", "failed")),
        exit_code=data.get("exit_code"),
        reason=str(data.get("reason", "")),
        result=data.get("result"),
        seconds=float(data.get("seconds", 0.0)),
    )


class TaskExecutor(abc.ABC):
    """Runs task attempts on one engine; override every method.

    ``start`` returns once the attempt is under way; ``poll`` answers None
    while it runs and its :class:`Outcome` once it ended (also for an attempt
    started by an earlier process: everything needed is in ``directory``);
    ``cancel`` ends it; ``results`` are the files it left.
    """

    name = "abstract"

    def prepares(self, spec: TaskSpec) -> bool:
        """Whether :meth:`start` makes the task's environment itself (else: a venv first)."""
        return False

    def environment_cache(self, default_root: Path) -> EnvironmentCache:
        """Where this executor's tasks' venvs are made (``default_root``: the site's data dir)."""
        return EnvironmentCache(default_root)

    async def reader(self, spec: TaskSpec) -> Reader | None:
        """Whose rights the task's wheel files on the site are read with (None: the
        agent's own, when it is not root). By default, as root, ``nobody``'s."""
        return NOBODY_READER if os.geteuid() == 0 else None

    @abc.abstractmethod
    async def start(
        self,
        spec: TaskSpec,
        directory: Path,
        env_dir: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Start the attempt whose files live in ``directory`` (with the venv ``env_dir``).

        ``progress`` takes notes on a long preparation (they become run events).
        """

    @abc.abstractmethod
    async def poll(self, directory: Path) -> Outcome | None:
        """None while running; how it ended otherwise."""

    @abc.abstractmethod
    async def cancel(self, directory: Path) -> None:
        """Stop the attempt; the next poll reports it ``cancelled``."""

    async def output(self, directory: Path, lines: int) -> str:
        """The last ``lines`` lines of a running attempt's output kept elsewhere than
        ``directory/output.log`` (a batch job's on the nodes' filesystem); "" by default."""
        return ""

    async def discard(self, attempt_id: str) -> None:  # noqa: B027 - optional hook
        """Remove what a start of ``attempt_id`` cut short left, knowing only its id.

        For an executor whose start makes something before it records it (a
        batch job submitted before its id was written down, when the agent
        died in between). By default a start records first: nothing to do.
        """


class ProcessTaskExecutor(TaskExecutor):
    """Each attempt a detached local process, sandboxed with bubblewrap when present."""

    name = "process"

    def __init__(
        self, sandbox: str = "auto", site_name: str = "", uid_base: int = DEFAULT_UID_BASE
    ) -> None:
        #: ``auto`` (bwrap when installed; refused as root without it), ``bwrap``, ``none``.
        self.sandbox = sandbox
        self.site_name = site_name
        #: The site's ``instance_uid_base``: as root, a task runs as ``uid_base + owner id``.
        self.uid_base = uid_base
        self._children: dict[Path, subprocess.Popen[bytes]] = {}

    def _bwrap(self) -> str | None:
        """The ``bwrap`` to use, or None to run unsandboxed (as the process backend decides)."""
        if self.sandbox in ("off", "none"):
            return None
        bwrap = find_bwrap()
        if bwrap is None and (self.sandbox == "bwrap" or os.geteuid() == 0):
            # As root, a task without the sandbox could do anything on the machine.
            raise BadRequest(
                f"site {self.site_name or 'here'} runs tasks only in the bubblewrap sandbox, "
                "which is not installed (apt-get install bubblewrap)"
            )
        return bwrap

    async def reader(self, spec: TaskSpec) -> Reader | None:
        """The uid the task runs as (as root): its owner's wheel files are theirs to read."""
        identity = self.identity(spec.owner_id)
        return None if identity is None else Reader(identity.uid, identity.gid)

    def identity(self, owner_id: int | None) -> Identity | None:
        """Who a task of user ``owner_id`` runs as; None: the site's own account.

        The uid the owner's instances on a process site run as (same base, same
        rule); sandboxed only: unsandboxed, the task needs the server's own paths.
        """
        return instance_identity(self.uid_base, owner_id)

    def _sandbox_argv(
        self, directory: Path, env_dir: Path | None, identity: Identity | None, bwrap: str
    ) -> list[str]:
        results = directory / "results"
        try:
            plan = bwrap_argv(
                bwrap,
                workspace=results,
                extra_ro=[str(env_dir)] if env_dir is not None else [],
                hostname="labgate-task",
                switch_uid=identity is not None,
            )
        except SandboxError as exc:
            raise BadRequest(str(exc)) from None
        if identity is None:
            return plan.argv
        # In front of the task, inside the sandbox: the owner's uid, no capability (the
        # bounding set emptied), no_new_privs, then into the results directory.
        return plan.argv + dropping_argv(identity.uid, identity.gid, str(results), [])

    async def start(
        self,
        spec: TaskSpec,
        directory: Path,
        env_dir: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Write ``task.json`` and start the executor process."""
        if spec.image:
            raise BadRequest(
                f"site {self.site_name or 'here'} runs no containers: a task with "
                "environment.image needs a site whose backend is containers"
            )
        body = spec.model_dump(mode="json")
        results = directory / "results"
        results.mkdir(parents=True, exist_ok=True)
        bwrap = self._bwrap()
        sandbox: list[str] = []
        if bwrap is not None:
            identity = self.identity(spec.owner_id)
            if identity is not None:
                # The task writes its results as the owner's uid; the agent (root) reads
                # them, and the rest of the attempt's directory stays root's.
                await asyncio.to_thread(hand_over, results, identity)
            sandbox = self._sandbox_argv(directory, env_dir, identity, bwrap)
        body["sandbox"] = sandbox
        body["venv"] = str(env_dir) if env_dir is not None else ""
        limits = await asyncio.to_thread(tasklimits.plan, spec)
        body["limits"] = limits.as_json()
        try:
            self._children[directory] = await asyncio.to_thread(_spawn, directory, body)
        except BaseException:
            await asyncio.to_thread(tasklimits.release, limits.cgroup)
            raise

    async def poll(self, directory: Path) -> Outcome | None:
        """Read ``exit.json``; no file and no process: the attempt is lost."""
        exit_file = directory / "exit.json"
        child = self._children.get(directory)
        if child is not None and child.poll() is not None:
            self._children.pop(directory, None)
        if exit_file.exists():
            self._children.pop(directory, None)
            await asyncio.to_thread(tasklimits.release, tasklimits.recorded(directory))
            return read_outcome(exit_file)
        if child is not None and child.returncode is None:
            return None
        if _alive(directory):
            return None
        await asyncio.to_thread(tasklimits.release, tasklimits.recorded(directory))
        if (directory / "cancel").exists():  # stopped before it could write its status
            return Outcome(state="cancelled", reason="cancelled")
        return Outcome(state="lost", reason="the task's executor ended without an exit status")

    async def cancel(self, directory: Path) -> None:
        """SIGTERM the executor: it stops the task and writes ``cancelled``."""
        (directory / "cancel").touch()
        pid = _pid(directory)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)


def _spawn(directory: Path, body: dict[str, Any]) -> subprocess.Popen[bytes]:
    (directory / "task.json").write_text(json.dumps(body))
    with open(directory / "executor.log", "ab") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "labgate.agent.taskexec", str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,
            close_fds=True,
        )
    (directory / "pid").write_text(str(proc.pid))
    return proc


def _pid(directory: Path) -> int | None:
    try:
        return int((directory / "pid").read_text())
    except (OSError, ValueError):
        return None


def _alive(directory: Path) -> bool:
    pid = _pid(directory)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie of ours is gone too (reaped by nobody after a restart of this process).
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
    return True


class TaskRunner:
    """A site's task attempts: started, watched, reported, cancelled, collected."""

    def __init__(
        self,
        site: str,
        reporter: Reporter,
        tasks_dir: Path,
        executor: TaskExecutor | None = None,
        *,
        log_tail_lines: int = 40,
    ) -> None:
        self.site = site
        self.reporter = reporter
        self.tasks_dir = tasks_dir
        self.executor = executor or ProcessTaskExecutor(site_name=site)
        self.log_tail_lines = log_tail_lines
        self.watched: set[str] = set()
        #: Python venvs of this site's tasks, made once per requirements list.
        self.environments = self.executor.environment_cache(tasks_dir.parent.parent / "envs" / site)
        self._starting: dict[str, asyncio.Task[None]] = {}
        self._watch_task: asyncio.Task[None] | None = None
        #: One poll at a time: a Slurm attempt's outcome is taken from its job only once.
        self._polling = asyncio.Lock()

    def directory(self, attempt_id: str) -> Path:
        """Where one attempt's files are (its id checked: it becomes a path)."""
        if not _ATTEMPT_ID.match(attempt_id):
            raise BadRequest(f"not a task attempt id: {attempt_id!r}")
        return self.tasks_dir / attempt_id

    async def run(self, spec: TaskSpec) -> None:
        """Start an attempt in the background; one already known (sent twice) changes nothing.

        It returns at once: preparing the task's environment may take minutes,
        longer than a command may.
        """
        directory = self.directory(spec.attempt_id)
        if spec.attempt_id in self._starting:
            return
        if spec.attempt_id in self.watched or (directory / "task.json").exists():
            await self.adopt(spec.attempt_id)
            return
        # A directory without task.json: a start of this attempt was cut short (the agent
        # died in it); what it may have made is removed before the attempt starts again.
        cut_short = directory.exists()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        task = asyncio.create_task(
            self._start(spec, directory, cut_short), name=f"task-{spec.attempt_id}"
        )
        self._starting[spec.attempt_id] = task
        task.add_done_callback(lambda _t: self._starting.pop(spec.attempt_id, None))

    async def _start(self, spec: TaskSpec, directory: Path, cut_short: bool = False) -> None:
        attempt_id = spec.attempt_id
        env_dir: Path | None = None
        if cut_short:
            await self._discard(attempt_id)

        async def progress(message: str) -> None:
            await self._report(Report(attempt_id, "preparing", kind="task", message=message))

        try:
            if spec.python and not self.executor.prepares(spec):
                reader = await self.executor.reader(spec)
                env_dir = await self.environments.prepare(spec.python, progress, reader)
            await self.executor.start(spec, directory, env_dir, progress)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = getattr(exc, "detail", None) or f"could not start: {exc}"
            await self._report(Report(attempt_id, "failed", kind="task", message=reason))
            return
        self.watched.add(attempt_id)
        await self._report(
            Report(attempt_id, "running", kind="task", message=f"running on site {self.site}")
        )
        self._ensure_watch()

    async def adopt(self, attempt_id: str) -> None:
        """Watch an attempt again (after a restart); one ended meanwhile is reported now."""
        directory = self.directory(attempt_id)
        if attempt_id in self._starting:
            return  # its environment is being prepared
        if not (directory / "task.json").exists():
            await self._discard(attempt_id)
            await self._report(
                Report(
                    attempt_id, "lost", kind="task", message=f"site {self.site} has no such task"
                )
            )
            return
        self.watched.add(attempt_id)
        self._ensure_watch()

    async def _discard(self, attempt_id: str) -> None:
        try:
            await self.executor.discard(attempt_id)
        except Exception as exc:  # the engine does not answer: said, and the attempt goes on
            log.warning("site %s: discarding attempt %s failed: %s", self.site, attempt_id, exc)

    async def cancel(self, attempt_id: str) -> None:
        """Stop an attempt; its ``cancelled`` report follows."""
        directory = self.directory(attempt_id)
        if directory.exists():
            await self.executor.cancel(directory)

    async def logs(self, attempt_id: str, lines: int) -> str:
        """The last ``lines`` lines of the attempt's output, read from its end (at most
        :data:`~labgate.backends.procfs.MAX_TAIL_BYTES`: a task may write without end)."""
        path = self.directory(attempt_id) / "output.log"
        if not path.exists():
            return await self.executor.output(path.parent, lines)
        text = await asyncio.to_thread(output_tail, path, lines)
        return text if not text or text.endswith("\n") else text + "\n"

    async def results(self, attempt_id: str) -> bytes:
        """The attempt's results directory as a gzipped tar archive.

        An executor whose attempts leave their results packed already (a Slurm
        job's ``results.tar.gz``, taken over by the agent) has that file sent as it is.
        The portal may ask before this runner saw the attempt end (its executor told
        the portal first): it is looked at now, and Conflict while it still runs.
        """
        await self._settle(attempt_id)
        archive = self.directory(attempt_id) / RESULTS_ARCHIVE
        if archive.is_file():
            return await asyncio.to_thread(archive.read_bytes)
        directory = self.directory(attempt_id) / "results"
        if not directory.is_dir():
            raise NotFound(f"task attempt {attempt_id} has no results at site {self.site}")
        return await asyncio.to_thread(pack, directory)

    async def forget(self, attempt_id: str) -> None:
        """Remove an attempt's files at the site (its results were collected)."""
        directory = self.directory(attempt_id)
        self.watched.discard(attempt_id)
        await asyncio.to_thread(shutil.rmtree, directory, True)

    async def close(self) -> None:
        """Stop watching; attempts keep running (one still preparing is started again later)."""
        for starting in list(self._starting.values()):
            starting.cancel()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
            self._watch_task = None

    async def _settle(self, attempt_id: str) -> None:
        """Poll a watched attempt now; report it when it ended, Conflict while it runs.

        One still starting is not watched yet, but may have made its results
        directory already: Conflict too (its files are not all there).
        """
        if attempt_id in self._starting:
            raise Conflict(f"task attempt {attempt_id} is still starting at site {self.site}")
        if attempt_id not in self.watched:
            return
        directory = self.directory(attempt_id)
        outcome = await self._poll(attempt_id, directory)
        if outcome is None and attempt_id in self.watched:  # (not watched: it ended meanwhile)
            raise Conflict(f"task attempt {attempt_id} is still running at site {self.site}")

    async def _poll(self, attempt_id: str, directory: Path) -> Outcome | None:
        """Ask the executor about one attempt; when it ended, report it (once) and stop watching."""
        async with self._polling:
            if attempt_id not in self.watched:
                return None
            outcome = await self.executor.poll(directory)
            if outcome is not None:
                self.watched.discard(attempt_id)
        if outcome is not None:
            await self._report(self._final(attempt_id, directory, outcome))
        return outcome

    # --- watching -------------------------------------------------------------
    def _ensure_watch(self) -> None:
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.create_task(self._watch(), name=f"tasks-{self.site}")

    async def _watch(self) -> None:
        while self.watched:
            for attempt_id in list(self.watched):
                try:
                    await self._poll(attempt_id, self.tasks_dir / attempt_id)
                except Exception:
                    log.exception("polling task attempt %s failed", attempt_id)
            await asyncio.sleep(POLL_INTERVAL)

    def _final(self, attempt_id: str, directory: Path, outcome: Outcome) -> Report:
        results = directory / "results"
        archive = directory / RESULTS_ARCHIVE
        if archive.is_file():
            files = archived_files(archive)
        elif results.is_dir():
            files = sorted(str(p.relative_to(results)) for p in results.rglob("*") if p.is_file())
        else:
            files = []
        tail = ""
        if outcome.state != "succeeded":
            with contextlib.suppress(OSError):
                tail = output_tail(directory / "output.log", self.log_tail_lines).rstrip("\n")
        return Report(
            attempt_id,
            outcome.state,
            kind="task",
            message=outcome.reason or outcome.state,
            log_tail=tail,
            data={
                "exit_code": outcome.exit_code,
                "result": outcome.result,
                "seconds": outcome.seconds,
                "files": files[:1000],
            },
        )

    async def _report(self, report: Report) -> None:
        try:
            await self.reporter(report)
        except Exception:
            log.exception("reporting task attempt %s failed", report.instance_id)


def archived_files(archive: Path) -> list[str]:
    """The regular files in a results archive, by name ([] when it cannot be read)."""
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            return sorted(member.name for member in tar.getmembers() if member.isfile())
    except (OSError, tarfile.TarError):
        return []


def output_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a task's output file, read backwards from its end."""
    with open(path, "rb") as handle:
        return tail_of(handle, lines)


class _CappedBuffer(io.BytesIO):
    """A buffer that refuses to grow past ``limit``: the archive stops there, not after a
    whole file of any size was compressed into memory (a local site's agent is the portal)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data: Any) -> int:
        if self.tell() + len(data) > self.limit:
            raise BadRequest(f"the results are larger than {self.limit // 2**20} MiB compressed")
        return super().write(data)


def pack(directory: Path) -> bytes:
    """``directory`` as a gzipped tar (refused past :data:`MAX_RESULTS_ARCHIVE`, as soon as
    the archive would pass it)."""
    buffer = _CappedBuffer(MAX_RESULTS_ARCHIVE)
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(directory.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                continue  # a link could point anywhere on the site's machine
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
    return buffer.getvalue()
