"""Results of batch runs: succeeded attempts' files brought from their sites.

When an attempt succeeded, the run processor asks its site for the attempt's
results archive and output (``task_results``, ``task_logs``), unpacks them
into the owner's results (``<workspaces>/<owner>/runs/<run>/<task>/``, the
output beside them in ``.logs/<task>.log``) and lets the site forget the
attempt.

The owner may make any folder of their workspace a link (to another user's
workspace, the data dir): ``runs``, ``runs/<run>``, ``.logs`` and the task's
folder are reached from the workspace one at a time through descriptors and
never through a link (:mod:`labgate.safefs`). A link on the way fails the
collection (logged) instead of deleting or writing where it points.

The attempt's executor may say it succeeded before its site can hand the
files over: through the task gateway while the site's agent is away, or
while the site still sees the attempt finishing. Such an attempt is
**pending**: it is tried again at every sweep of the processor (the site
asked to watch it again first: a restarted agent may not know it), and on
the site's own late report of it; its run does not end before its files are
in, or given up once its site has been away longer than the grace period
(the run's events say so). The pending set is memory only: after a portal
restart :meth:`ResultCollector.find_pending` rebuilds it from the database
(succeeded tasks of unfinished runs whose output was never kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from labgate.agent.link import SiteLink
from labgate.backends.archive import extract
from labgate.backends.procfs import tail_of
from labgate.db.runs import AttemptState, Run, RunState, RunTask, TaskAttempt
from labgate.errors import Conflict, LabgateError
from labgate.safefs import (
    READ_FLAGS,
    WRITE_FLAGS,
    open_below,
    open_subdir,
    refused,
    remove_entry,
)
from labgate.scheduler import runrows

log = logging.getLogger(__name__)

#: Lines of a task's output kept with its results.
MAX_KEPT_LOG_LINES = 100_000


@dataclass(frozen=True)
class Pending:
    """A succeeded attempt whose files are still at its site."""

    run_id: str
    attempt_id: str
    site: str
    target: Path


class ResultCollector:
    """Brings succeeded attempts' files into their owners' results; keeps the pending ones."""

    def __init__(self, links: dict[str, SiteLink], results_dir: Callable[[str], Path]) -> None:
        self.links = links
        self.results_dir = results_dir
        #: Attempts being collected now, with their runs (the executor's word and the
        #: site's may race).
        self._collecting: dict[str, str] = {}
        self.pending: dict[str, Pending] = {}

    def target(self, run: Run, task: RunTask) -> Path:
        """Where a task copy's results go in its owner's results."""
        return self.results_dir(run.owner.name) / "runs" / run.id / task.label

    def late(self, run: Run, task: RunTask, attempt: TaskAttempt) -> Pending | None:
        """On a site's ``succeeded`` report of an attempt that already ended: its files, when
        they never came (its executor told first); else None."""
        if attempt.state != AttemptState.succeeded or task.state != RunState.succeeded:
            return None
        if attempt is not task.attempt_rows[-1]:
            return None
        target = self.target(run, task)
        if kept_log(target) is not None:
            return None
        return Pending(run.id, attempt.id, attempt.site, target)

    def find_pending(self, session: Session) -> None:
        """After a restart: the unfinished runs' succeeded tasks whose files never came."""
        for run_id in runrows.unfinished_runs(session):
            run = runrows.load_run(session, run_id)
            for stage in run.stages:
                for task in stage.tasks:
                    if task.state == RunState.succeeded and task.attempt_rows:
                        found = self.late(run, task, task.attempt_rows[-1])
                        if found is not None:
                            self.pending[found.attempt_id] = found

    def waits_for(self, run_id: str) -> bool:
        """Whether files of a succeeded task of run ``run_id`` are still to come."""
        return run_id in self._collecting.values() or any(
            p.run_id == run_id for p in self.pending.values()
        )

    async def collect(self, item: Pending) -> None:
        """Bring one attempt's files; pending again while its site is away or it still ends."""
        link = self.links.get(item.site)
        if link is None or item.attempt_id in self._collecting:
            return
        if not link.live:
            self.pending[item.attempt_id] = item
            return
        self._collecting[item.attempt_id] = item.run_id
        try:
            archive = await link.task_results(item.attempt_id)
            output = await link.task_logs(item.attempt_id, MAX_KEPT_LOG_LINES)
            await asyncio.to_thread(unpack, archive, item.target)
            await asyncio.to_thread(_keep_log, item.target, output)
            await link.forget_task(item.attempt_id)
            self.pending.pop(item.attempt_id, None)
        except (LabgateError, OSError, ValueError, KeyError, tarfile.TarError) as exc:
            if not link.live or isinstance(exc, Conflict):  # away, or still ending there
                self.pending[item.attempt_id] = item
            else:
                self.pending.pop(item.attempt_id, None)
                log.warning("collecting the results of %s failed: %s", item.attempt_id, exc)
        finally:
            self._collecting.pop(item.attempt_id, None)

    async def due(self, gone: Callable[[str], bool]) -> tuple[list[Pending], list[Pending]]:
        """The pending attempts to try again now (their sites are live, and asked to watch
        them again), and those given up (``gone(site)``), taken out of the pending set."""
        retry: list[Pending] = []
        given_up: list[Pending] = []
        for item in list(self.pending.values()):
            link = self.links.get(item.site)
            if link is not None and link.live:
                # A restarted agent watches it again (a Slurm job's files are taken over).
                try:
                    await link.adopt_task(item.attempt_id)
                except LabgateError as exc:
                    log.info("site %s cannot watch %s again: %s", item.site, item.attempt_id, exc)
                retry.append(item)
            elif link is None or gone(item.site):
                self.pending.pop(item.attempt_id, None)
                given_up.append(item)
        return retry, given_up


class LinkRefused(ValueError):
    """A link (or a file) stands where the owner's results folder is to be: not followed."""


def _split(target: Path) -> tuple[Path, tuple[str, ...], str]:
    """A task's results folder as a trusted folder, the folders below it to the run's
    folder (reached without following links) and the task's name.

    For ``<workspace>/runs/<run>/<task>`` (every :meth:`ResultCollector.target`)
    the workspace is trusted and ``runs``, ``<run>`` are not; for any other
    folder (a direct call) its parent is trusted.
    """
    run_dir = target.parent
    if run_dir.parent.name == "runs":
        return run_dir.parent.parent, ("runs", run_dir.name), target.name
    return run_dir, (), target.name


def _open_run_dir(target: Path, *parts: str, create: bool) -> int:
    """A descriptor of ``<workspace>/runs/<run>[/parts]`` for ``target``, no link followed."""
    workspace, below, _ = _split(target)
    try:
        return open_below(workspace, (*below, *parts), create=create)
    except OSError as exc:
        if refused(exc):
            where = "/".join((*below, *parts)) or "."
            raise LinkRefused(
                f"{where} in {workspace} is a link or not a folder: not followed"
            ) from None
        raise


def kept_log(target: Path, lines: int = 1) -> str | None:
    """The last ``lines`` lines of a task's kept output (``.logs/<task>.log`` beside
    ``target``), or None when there is none; read without following a link anywhere on
    the way, and from its end (the owner may have grown it without bound)."""
    try:
        logs = _open_run_dir(target, ".logs", create=False)
    except (FileNotFoundError, LinkRefused):
        return None
    try:
        fd = os.open(f"{target.name}.log", READ_FLAGS, dir_fd=logs)
    except OSError:  # none, or a link (ELOOP)
        return None
    finally:
        os.close(logs)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            return None
        return tail_of(file, lines)


def _keep_log(target: Path, text: str) -> None:
    """Write a task's output to ``.logs/<task>.log`` beside its results folder ``target``."""
    with contextlib.ExitStack() as stack:
        logs = _open_run_dir(target, ".logs", create=True)
        stack.callback(os.close, logs)
        fd = os.open(f"{target.name}.log", WRITE_FLAGS, 0o600, dir_fd=logs)
        with os.fdopen(fd, "w") as file:
            file.write(text)


#: What one attempt's results may hold unpacked: a site caps the archive at 64 MiB
#: compressed, but a lying one could send a few MiB that unpack to fill the disk.
MAX_UNPACKED = 1024**3
MAX_MEMBERS = 100_000


def check_unpacked(archive: bytes) -> None:
    """Refuse (ValueError) an archive past :data:`MAX_UNPACKED` bytes or :data:`MAX_MEMBERS`
    entries unpacked; read through once, before anything is written."""
    size = count = 0
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar:
            count += 1
            size += member.size
            if count > MAX_MEMBERS or size > MAX_UNPACKED:
                raise ValueError(
                    f"the results are larger than {MAX_UNPACKED // 2**20} MiB or "
                    f"{MAX_MEMBERS:,} files unpacked: not collected"
                )


def unpack(archive: bytes, target: Path) -> None:
    """Extract a results archive into ``target`` (replacing what an earlier attempt left).

    The task's folder is removed and made again inside its run's folder's
    descriptor and extracted into through its own descriptor, member by
    member (:func:`labgate.backends.archive.extract`): a link planted on the
    way, before or during the extraction, is refused, never followed. An archive
    that would unpack past :data:`MAX_UNPACKED` is refused before anything is
    removed or written.
    """
    check_unpacked(archive)
    name = target.name
    with contextlib.ExitStack() as stack:
        run_fd = _open_run_dir(target, create=True)
        stack.callback(os.close, run_fd)
        remove_entry(run_fd, name)
        try:
            os.mkdir(name, 0o700, dir_fd=run_fd)
        except FileExistsError:
            raise LinkRefused(f"{target} was made again meanwhile: not replaced") from None
        try:
            task_fd = open_subdir(run_fd, name)
        except OSError as exc:
            if refused(exc):
                raise LinkRefused(f"{target} was replaced by a link: not followed") from None
            raise
        stack.callback(os.close, task_fd)
        if os.listdir(task_fd):
            raise LinkRefused(f"{target} was replaced meanwhile: not written")
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            # The archive comes from a site, which the portal does not trust with its
            # disk, into a folder the owner may change meanwhile: member by member,
            # every folder reached through descriptors (labgate.backends.archive.extract).
            extract(tar, task_fd)
