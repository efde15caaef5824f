"""Results of batch runs: succeeded attempts' files brought from their sites.

When an attempt succeeded, the run processor asks its site for the attempt's
results archive and output (``task_results``, ``task_logs``), unpacks them
into the owner's results (``<workspaces>/<owner>/runs/<run>/<task>/``, the
output beside them in ``.logs/<task>.log``) and lets the site forget the
attempt.

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
import io
import logging
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from labgate.agent.link import SiteLink
from labgate.db.runs import AttemptState, Run, RunState, RunTask, TaskAttempt
from labgate.errors import Conflict, LabgateError
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
        if log_path(target).exists():
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
            await asyncio.to_thread(_keep_log, log_path(item.target), output)
            await link.forget_task(item.attempt_id)
            self.pending.pop(item.attempt_id, None)
        except (LabgateError, OSError, ValueError, tarfile.TarError) as exc:
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


def log_path(target: Path) -> Path:
    """Where a collected task's output is kept: beside its results, not among them."""
    return target.parent / ".logs" / f"{target.name}.log"


def _keep_log(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(text)


def unpack(archive: bytes, target: Path) -> None:
    """Extract a results archive into ``target`` (replacing what an earlier attempt left)."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True, mode=0o700)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        # The "data" filter refuses absolute paths, "..", links out and device files:
        # the archive comes from a site, which the portal does not trust with its disk.
        tar.extractall(target, filter="data")
