"""The run processor: turns run definitions into task attempts at sites, and reports into state.

Stages run in order; the tasks of a stage run in parallel. Each task copy is
placed on a live site its ``where`` allows (the least busy with tasks), sent
there as one attempt through the site link (``run_task``), and followed by
the site's task reports (``Report.kind == "task"``, keyed by attempt id).
A failed or lost attempt is tried again while the task has retries left; then
the task fails its stage and the run (unless the stage continues on failure),
and the stage's other tasks are cancelled. Every state is in the database
first: after a portal restart :meth:`RunProcessor.restore` asks each site to
watch its attempts again, and reports that were waiting at a network site's
agent arrive then. A report from a site on an attempt of another site is
refused: an agent speaks only for its own tasks. The executor of an attempt
on a network site also reports its state and result through the portal's
task gateway (:meth:`RunProcessor.executor_report`, its token checked
there), often before the agent does, and while the agent is away: the first
word on how an attempt ended counts, and a later one (the agent's) only
brings the files when they were not collected yet
(:mod:`labgate.scheduler.runresults`).

It is separate from the instance start queue on purpose: tasks are short and
many, and their admission is the stage. They share the owner's limits with
instances, though: an attempt holds its cpu, memory and one "instance" from
placement to end (an open usage record, :mod:`labgate.scheduler.runquota`),
charged to the first of the owner's groups whose limits admit it, and a task
that does not fit (the owner's or the groups' limits) stays ``pending`` with
the reason until it does. An advance that places tasks runs in the
instance manager's admission (``admission``: a thread lock and, on
PostgreSQL, an advisory transaction lock), as launches do: a launch and a
placement never both count the same room; advances with nothing to place
do not take it. A task asking no memory fails at placement while its
owner's (or all their groups') memory is limited
(:meth:`RunQuota.memoryless_refusal`). The active attempts of a site away
longer than the grace are ``lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from labgate.agent.link import SiteLink
from labgate.agent.taskenv import requirement_refusal
from labgate.aio import cancel_and_wait
from labgate.db.models import User, utcnow
from labgate.db.runs import (
    AttemptState,
    Run,
    RunEvent,
    RunStage,
    RunState,
    RunTask,
    TaskAttempt,
)
from labgate.db.session import Database
from labgate.errors import BadRequest, Conflict, LabgateError, NotFound
from labgate.scheduler import accounting, quotas, runquota, runrows
from labgate.scheduler.leader import Leadership, SoleLeader
from labgate.scheduler.runquota import WAITING_FOR_QUOTA, Charge, RunQuota
from labgate.scheduler.runresults import Pending, ResultCollector, kept_log
from labgate.scheduler.runrows import Viewer
from labgate.security import executor_token, task_token
from labgate.wire.launch import Resources
from labgate.wire.runs import TASK_REPORT_STATES, RunDef, TaskDef, TaskSpec, Where
from labgate.wire.site import Report

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between sweeps that re-adopt attempts (sites that came back) and find lost ones.
SWEEP_INTERVAL = 5.0
#: Reports on an attempt that say it goes on: no advance follows them.
_NOTES = frozenset({"preparing", "running"})
#: Pending task copies an advance reads at a time while sites have room for them.
PLACING_PAGE = 64
#: Most notes a task copy may add to its run's events (all its attempts together); also
#: the most ``preparing`` notes its sites may add.
MAX_NOTES = 1000
#: Largest JSON result kept of a task (bytes, as JSON): the task's own limit, and what a
#: site's report may bring (its connection takes 16 MiB a message).
MAX_RESULT = 1024 * 1024
#: Largest ``data`` of a task's note (bytes, as JSON).
MAX_NOTE_DATA = 16 * 1024
#: What is kept of a task report's words: its message, and the end of its output.
MAX_REPORT_MESSAGE = 2000
MAX_LOG_TAIL = 20_000
#: Files named by a report: how many, and how long a name.
MAX_FILES = 1000
MAX_FILE_NAME = 4096
#: Exit codes the database holds (a 32-bit integer).
EXIT_CODES = range(-(2**31), 2**31)
#: Task report states: those a site tells (and ``preparing``, a note on the way).
_REPORT_STATES = frozenset({*TASK_REPORT_STATES, "preparing"})


def json_size(value: Any) -> int:
    """The size of ``value`` as strict JSON (bytes); ValueError when it is none
    (``NaN``, ``Infinity``: JSON clients, the browser's among them, cannot parse them)."""
    try:
        return len(json.dumps(value, allow_nan=False, separators=(",", ":")).encode())
    except (TypeError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None


def _bounded(report: Report) -> Report | None:
    """A site's or an executor's task report, bounded before anything of it is kept.

    A site (a lying agent) may send anything its connection carries: an unknown
    state is dropped, text is cut, an exit code the database cannot hold is
    none, file names are strings, and a result that is not strict JSON or
    larger than :data:`MAX_RESULT` is not kept: a succeeded attempt with one
    fails, with the reason.
    """
    if report.state not in _REPORT_STATES:
        return None
    state, message = report.state, str(report.message)[:MAX_REPORT_MESSAGE]
    raw = report.data if isinstance(report.data, dict) else {}
    data: dict[str, Any] = {}
    if "exit_code" in raw:
        code = raw["exit_code"]
        ok = isinstance(code, int) and not isinstance(code, bool) and code in EXIT_CODES
        data["exit_code"] = code if ok else None
    if "result" in raw:
        data["result"] = None
        try:
            size = json_size(raw["result"])
        except ValueError:
            problem = "the task's result is not JSON"
        else:
            problem = f"the task's result is larger than {MAX_RESULT // 2**20} MiB"
            if size <= MAX_RESULT:
                problem, data["result"] = "", raw["result"]
        if problem and state == "succeeded":
            state, message = "failed", problem
    if "seconds" in raw:
        seconds = raw["seconds"]
        ok = isinstance(seconds, int | float) and not isinstance(seconds, bool)
        data["seconds"] = float(seconds) if ok and 0 <= seconds < 1e12 else 0.0
    if "files" in raw:
        files = raw["files"] if isinstance(raw["files"], list) else []
        data["files"] = [
            name
            for name in files[:MAX_FILES]
            if isinstance(name, str) and len(name) <= MAX_FILE_NAME
        ]
    tail = str(report.log_tail)[-MAX_LOG_TAIL:] if report.log_tail else ""
    return Report(report.instance_id, state, kind="task", message=message, log_tail=tail, data=data)


class Admission(Protocol):
    """Runs ``fn`` in a transaction holding the launches' admission lock until it commits
    (:meth:`labgate.scheduler.instances.InstanceManager.run_admission`)."""

    async def __call__(self, fn: Callable[[Session], T], /) -> T:
        """``fn``'s answer, committed."""
        ...


class _Admit(Exception):
    """An advance is about to place tasks: it runs again in the admission."""


class RunProcessor:
    """Submits, advances, cancels and re-runs batch runs across the portal's sites."""

    def __init__(
        self,
        db: Database,
        links: dict[str, SiteLink],
        results_dir: Callable[[str], Path],
        *,
        admission: Admission,
        tasks_per_site: int = 8,
        limits: Callable[[], quotas.Limits] = quotas.Limits,
        grace: float = 300.0,
        api_url: str = "",
        token_key: str = "",
    ) -> None:
        self.db = db
        #: The instance manager's admission: placements count and take the owner's (and
        #: groups') room in it, ordered with launches (in this process and across them).
        self.admission = admission
        #: What tasks get as ``$LABGATE_API_URL``, and the key their tokens derive from.
        self.api_url = api_url
        self.token_key = token_key
        #: Seconds a site may be away before its active attempts are lost (and retried).
        self.grace = grace
        #: When the sweep first saw an away site that the database has no time for.
        self._away_seen: dict[str, float] = {}
        #: Attempts lost while their site was away: stopped there once it is back.
        self._orphans: dict[str, str] = {}
        #: The limits of a user without limits of their own (the instance manager's).
        self.limits = limits
        #: At most this many active attempts per site; more tasks wait as ``pending``.
        self.tasks_per_site = tasks_per_site
        self.links = links
        #: Where a user's collected results go (``owner name -> directory``); runs below it.
        self.results_dir = results_dir
        self._locks: dict[str, asyncio.Lock] = {}
        #: Per run, the advance waiting for its turn that later calls join.
        self._next_advance: dict[str, asyncio.Future[None]] = {}
        self._placing = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Attempts recorded but not yet handed to their site: the sweep leaves them alone.
        self._dispatching: set[str] = set()
        self._sweeper: asyncio.Task[None] | None = None
        #: Brings succeeded attempts' files from their sites (and keeps the pending ones).
        self.results = ResultCollector(links, results_dir)
        #: Only the leader gives up on the attempts of sites that stay away.
        self.leader: Leadership = SoleLeader()
        #: Other portal processes share the sites' connections (``labgate portal``): a
        #: site away from this one may be connected to another, so only its row says away.
        self.shared = False

    async def run_db(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in a transaction in a worker thread (:meth:`Database.transact`)."""
        return await self.db.run(fn)

    def live(self) -> set[str]:
        """Sites that can take tasks now."""
        return {name for name, link in self.links.items() if link.live}

    def _lock(self, run_id: str) -> asyncio.Lock:
        return self._locks.setdefault(run_id, asyncio.Lock())

    # --- the user's commands ------------------------------------------------------
    async def submit(self, owner_id: int, definition: RunDef) -> str:
        """Record a run and start its first stage; returns the run's id.

        A task whose Python requirements carry a pip option or something pip would
        build from source is refused (400 ``invalid_run``): a site's agent installs
        them (:func:`labgate.agent.taskenv.requirement_refusal`).
        """
        for stage in definition.stages:
            for task in stage.tasks:
                refusal = requirement_refusal(task.environment.python)
                if refusal is not None:
                    raise BadRequest(
                        f"invalid run definition:\ntask {task.name}: environment.python: {refusal}",
                        code="invalid_run",
                    )
        live = self.live()
        defaults = self.limits()

        def create(session: Session) -> str:
            runquota.check_submission(session, defaults, owner_id, definition)
            return runrows.create_run(session, owner_id, definition, live).id

        run_id = await self.run_db(create)
        await self.advance(run_id)
        return run_id

    async def cancel(self, run_id: str, who: Viewer) -> None:
        """Cancel a pending or running run: running attempts are stopped at their sites."""
        async with self._lock(run_id):
            attempts = await self.run_db(lambda s: self._cancel(s, run_id, who))
        for attempt_id, site in attempts:
            await self._cancel_attempt(attempt_id, site)

    def _cancel(self, session: Session, run_id: str, who: Viewer) -> list[tuple[str, str]]:
        runrows.lock_run(session, run_id)
        run = runrows.visible_run(session, run_id, who)
        if run.state.terminal:
            raise Conflict(f"run {run_id} is already {run.state.value}")
        stopping = _cancel_open(run, f"cancelled by {who.name}")
        runrows.finish(run, RunState.cancelled, f"cancelled by {who.name}")
        runrows.add_event(session, run.id, "", "cancelled", f"cancelled by {who.name}")
        return stopping

    async def rerun(self, run_id: str, who: Viewer) -> None:
        """Run again the tasks of a finished run that did not succeed; the rest stay."""
        async with self._lock(run_id):
            leftovers = await self.run_db(lambda s: self._rerun(s, run_id, who))
        for attempt_id, site in leftovers:
            await self._cancel_attempt(attempt_id, site)
        await self.advance(run_id)

    def _rerun(self, session: Session, run_id: str, who: Viewer) -> list[tuple[str, str]]:
        """Reset what did not succeed; (attempt id, site) of earlier attempts still open.

        Those attempts (a task cancelled when its stage failed, whose site has not
        said so yet) end here, as replaced: their late reports are then ignored
        and cannot finish the task's new attempts.
        """
        runrows.lock_run(session, run_id)
        run = runrows.visible_run(session, run_id, who)
        if not run.state.terminal:
            raise Conflict(f"run {run_id} is still {run.state.value}: cancel it or let it end")
        if run.state == RunState.succeeded:
            raise Conflict(f"run {run_id} succeeded: it has no failed task to run again")
        again = 0
        leftovers: list[tuple[str, str]] = []
        now = utcnow()
        for stage in run.stages:
            for task in stage.tasks:
                if task.state != RunState.succeeded:
                    for attempt in task.attempt_rows:
                        if attempt.state.terminal:
                            continue
                        leftovers.append((attempt.id, attempt.site))
                        attempt.state, attempt.finished_at = AttemptState.cancelled, now
                        attempt.reason = "replaced by a re-run"
                        accounting.close_records(session, attempt.id, "cancelled", now)
                    task.state, task.reason, task.attempts = RunState.pending, "", 0
                    task.exit_code, task.result, task.finished_at = None, None, None
                    again += 1
            if stage.state != RunState.succeeded:
                stage.state, stage.finished_at = RunState.pending, None
        run.state, run.reason, run.finished_at = RunState.pending, "", None
        runrows.add_event(session, run.id, "", "pending", f"{again} task(s) run again")
        return leftovers

    # --- advancing ------------------------------------------------------------------
    async def advance(self, run_id: str) -> None:
        """Move a run forward: finish stages whose tasks ended, start what can start.

        Calls that come while an advance of the run waits for its turn join it: that
        one has not read the run yet, so it sees what they changed.
        """
        waiting = self._next_advance.get(run_id)
        if waiting is not None:
            await asyncio.shield(waiting)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._next_advance[run_id] = done
        try:
            # One advance at a time across runs. One that places tasks runs (again) in the
            # admission, as launches do: nothing else counts the owner's and groups' room
            # until its placements are committed, in this process or another.
            async with self._lock(run_id), self._placing:
                self._next_advance.pop(run_id, None)
                try:
                    starts, cancels = await self.run_db(lambda s: self._advance(s, run_id))
                except _Admit:
                    starts, cancels = await self.admission(
                        lambda s: self._advance(s, run_id, admitted=True)
                    )
            for attempt_id, site in cancels:
                await self._cancel_attempt(attempt_id, site)
            for attempt_id in starts:
                await self._start(attempt_id)
        finally:
            if self._next_advance.get(run_id) is done:
                del self._next_advance[run_id]
            done.set_result(None)

    def _advance(
        self, session: Session, run_id: str, *, admitted: bool = False
    ) -> tuple[list[str], list[tuple[str, str]]]:
        """One advance in one transaction: (attempts to start, (attempt, site) to cancel).

        It reads the run's stages, and of the stage under way only its counts by state
        and the pending copies it can place: a report on a wide stage costs the same
        whatever its width. Not ``admitted``, it raises :class:`_Admit` (all undone)
        before it would count the owner's limits to place tasks.
        """
        run = runrows.get_run(session, run_id)
        starts: list[str] = []
        cancels: list[tuple[str, str]] = []
        if run.state.terminal:
            return starts, cancels
        if run.state == RunState.pending:
            run.state, run.started_at = RunState.running, run.started_at or utcnow()
            runrows.add_event(session, run.id, "", "running", "started")
        failed_stage = False
        for stage in run.stages:
            if stage.state.terminal:
                if stage.state != RunState.succeeded and not stage.continue_on_failure:
                    failed_stage = True
                    break
                continue
            if stage.state == RunState.pending:
                stage.state, stage.started_at = RunState.running, utcnow()
                runrows.add_event(session, run.id, "", "running", f"stage {stage.name} started")
            counts = runrows.stage_counts(session, stage)
            if counts.get(RunState.pending) and (stage.continue_on_failure or not _broken(counts)):
                starts, failed = self._place(session, run, stage, admitted)
                if failed:
                    session.flush()
                    counts = runrows.stage_counts(session, stage)
            under_way = counts.get(RunState.pending, 0) + counts.get(RunState.running, 0)
            if _broken(counts) and not stage.continue_on_failure:
                # A task failed for good: the stage has failed; what still runs is stopped.
                first = next(
                    t for t in stage.tasks if t.state.terminal and t.state != RunState.succeeded
                )
                cancels = _cancel_tasks(stage.tasks, f"{first.label} failed")
            elif under_way:
                return starts, []
            bad = [t for t in stage.tasks if t.state != RunState.succeeded]
            state = RunState.failed if bad else RunState.succeeded
            reason = f"{len(bad)} task(s) did not succeed: " + ", ".join(t.label for t in bad)
            runrows.finish(stage, state)
            runrows.add_event(
                session,
                run.id,
                "",
                state.value,
                f"stage {stage.name} {state.value}" + (f" ({reason})" if bad else ""),
            )
            if bad and not stage.continue_on_failure:
                failed_stage = True
                run.reason = f"stage {stage.name}: {reason}"
                break
        if self.results.waits_for(run.id):
            return starts, cancels  # it ends once its tasks' files are in (or given up)
        state = RunState.failed if failed_stage else RunState.succeeded
        if not failed_stage and any(s.state != RunState.succeeded for s in run.stages):
            run.reason = "some tasks failed in stages that continue on failure"
        runrows.finish(run, state)
        runrows.add_event(session, run.id, "", state.value, f"run {state.value}")
        return starts, cancels

    def _place(
        self, session: Session, run: Run, stage: RunStage, admitted: bool
    ) -> tuple[list[str], int]:
        """Record attempts for the stage's pending copies while sites have room.

        Their ids, and how many copies failed instead (they ask no memory while it is
        limited: :meth:`_fail_memoryless`); then, unless the stage continues on
        failure, none is placed. The copies are read a page at a time, in order,
        until no live site has room. Not ``admitted``, it raises :class:`_Admit`
        before it counts anything.
        """
        places = _Places(
            runrows.site_labels(session),
            self.live(),
            _busy(session),
            runrows.site_backends(session),
        )
        if self._full(places):
            return [], 0  # waits: a finishing attempt advances the run again
        if not admitted:
            raise _Admit()
        # The owner's row, as a launch's admission does: their task placements and
        # launches, in any portal replica, take their limits one at a time.
        session.execute(select(User.id).where(User.id == run.owner_id).with_for_update())
        quota = RunQuota(run, self.limits())
        failed = self._fail_memoryless(session, run, stage, quota)
        if failed and not stage.continue_on_failure:
            return [], failed
        starts: list[str] = []
        after = 0
        while not self._full(places):
            page = runrows.pending_tasks(session, stage, after, PLACING_PAGE)
            for task in page:
                if self._full(places):
                    break
                attempt = self._new_attempt(session, run, task, places, quota)
                if attempt is not None:
                    self._dispatching.add(attempt)
                    starts.append(attempt)
            if len(page) < PLACING_PAGE:
                break
            after = page[-1].id
        return starts, failed

    def _fail_memoryless(self, session: Session, run: Run, stage: RunStage, quota: RunQuota) -> int:
        """Fail the stage's pending copies of tasks asking no memory while it is limited.

        Such a task runs with no memory limit: it could hold any amount of what its
        owner's or groups' limits allow. Only a stage with such tasks reads more.
        """
        names = _memoryless(run, stage)
        if not names:
            return 0
        reason = quota.memoryless_refusal(session)
        if reason is None:
            return 0
        failing = session.scalars(
            select(RunTask).where(
                RunTask.stage_id == stage.id,
                RunTask.state == RunState.pending,
                RunTask.name.in_(names),
            )
        ).all()
        for task in failing:
            runrows.finish(task, RunState.failed, reason)
            runrows.add_event(session, run.id, task.label, "failed", reason)
        return len(failing)

    def _full(self, places: _Places) -> bool:
        """Whether every live site has as many attempts as it takes (none live: not full)."""
        busy = places.busy
        return bool(places.live) and all(busy.get(n, 0) >= self.tasks_per_site for n in places.live)

    def _new_attempt(
        self, session: Session, run: Run, task: RunTask, places: _Places, quota: RunQuota
    ) -> str | None:
        """Place one task copy and record its next attempt; None: it waits (sites, quota)."""
        busy = places.busy
        where = places.where(run, task)
        candidates = [
            name
            for name in runrows.matching_sites(where, places.labels, places.live)
            if runrows.runs_on(places.definition(run, task), places.backends.get(name, ""))
        ]
        if task.pinned_site is not None:
            candidates = [c for c in candidates if c == task.pinned_site]
        site = ""  # none: the attempt is lost as soon as it is started
        charge = Charge()
        if candidates:
            room = [c for c in candidates if busy.get(c, 0) < self.tasks_per_site]
            if not room:
                return None  # waits: a finishing attempt advances the run again
            asked = _asked(places.definition(run, task))
            admitted = quota.admit(session, task, asked)
            if admitted is None:
                return None  # waits: an ending task or instance, or the sweep, tries again
            charge = admitted
            site = min(room, key=lambda n: (busy.get(n, 0), n))
            busy[site] = busy.get(site, 0) + 1
            if task.reason.startswith(WAITING_FOR_QUOTA):
                task.reason = ""
        task.attempts += 1
        task.state = RunState.running
        task.started_at = task.started_at or utcnow()
        # Numbers go on across re-runs (``attempts`` counts the tries since the last one).
        number = len(task.attempt_rows) + 1
        attempt = TaskAttempt(id=runrows.new_id(), task=task, number=number, site=site)
        session.add(attempt)
        if site:
            quota.record(session, attempt.id, site, _asked(places.definition(run, task)), charge)
        session.flush()
        return attempt.id

    async def _start(self, attempt_id: str) -> None:
        try:
            await self._dispatch(attempt_id)
        finally:
            self._dispatching.discard(attempt_id)

    async def _dispatch(self, attempt_id: str) -> None:
        spec, site = await self.run_db(lambda s: _spec_of(s, attempt_id))
        if not site:
            await self.apply(
                Report(attempt_id, "lost", kind="task", message="no live site matches")
            )
            return
        link = self.links.get(site)
        if self.token_key:
            spec.api_url = self.api_url
            spec.token = task_token(self.token_key, attempt_id)
            if link is not None and link.remote:
                # Only an agent apart from the portal can be away while its tasks run on; a
                # local site's reports are in this process already, and telling twice costs.
                spec.executor_token = executor_token(self.token_key, attempt_id)
        try:
            if link is None:
                raise Conflict(f"site {site} is gone")
            await link.run_task(spec)
        except LabgateError as exc:
            await self.apply(Report(attempt_id, "lost", kind="task", message=exc.detail))

    async def _cancel_attempt(self, attempt_id: str, site: str) -> None:
        link = self.links.get(site)
        if link is None or not link.live:
            return
        with contextlib.suppress(LabgateError):
            await link.cancel_task(attempt_id)

    # --- reports ---------------------------------------------------------------------
    async def apply(self, report: Report, *, site: str | None = None) -> None:
        """Record a task report; with ``site``, only on that site's own attempts.

        What is kept of it is bounded first (:func:`_bounded`).
        """
        bounded = _bounded(report)
        if bounded is None:
            log.warning(
                "task report on %s with unknown state %.40r ignored",
                report.instance_id,
                report.state,
            )
            return
        report = bounded
        found = await self.run_db(lambda s: _run_of(s, report.instance_id))
        if found is None:
            log.warning("task report for unknown attempt %s ignored", report.instance_id)
            return
        run_id, attempt_site = found
        if site is not None and site != attempt_site:
            log.warning(
                "site %s reported on task attempt %s of site %s; refused",
                site,
                report.instance_id,
                attempt_site,
            )
            return
        async with self._lock(run_id):
            collect = await self.run_db(lambda s: self._apply(s, report))
        if collect is None and report.state in _NOTES:
            return  # nothing ended: the run cannot move on
        # The rest talks to sites, maybe over the very connection this report came on,
        # whose reader waits for this call: it goes on in the background.
        self._spawn(self._follow_up(run_id, collect))

    async def _follow_up(self, run_id: str, collect: Pending | None) -> None:
        if collect is not None:
            await self.results.collect(collect)
        await self.advance(run_id)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a run's follow-up failed", exc_info=task.exception())

    def _apply(self, session: Session, report: Report) -> Pending | None:
        attempt = session.get(TaskAttempt, report.instance_id)
        if attempt is None:
            return None
        task = attempt.task
        runrows.lock_run(session, task.run_id)
        session.refresh(task)  # as another replica may have left it before the lock
        session.refresh(attempt)
        run = session.get(Run, task.run_id)
        if run is None:
            return None
        if attempt.state.terminal:
            # Sent again after a reconnect, about an attempt we gave up on, or the agent's
            # word after the executor's: that one brings the files if they are still there.
            return self.results.late(run, task, attempt) if report.state == "succeeded" else None
        if report.state == "running" and attempt.state == AttemptState.running:
            return None  # its executor and its agent both say so
        if report.state == "preparing" and _count_events(session, task, "preparing") >= MAX_NOTES:
            return None  # a site that says it prepares without end fills no database
        data = dict(report.data)
        if report.log_tail:
            data["log_tail"] = report.log_tail
        runrows.add_event(
            session,
            run.id,
            task.label,
            report.state,
            f"attempt {attempt.number} on {attempt.site}: {report.message}",
            data,
        )
        if report.state == "preparing":
            return None  # a note: its environment is being made
        if report.state == "running":
            attempt.state = AttemptState.running
            return None
        try:
            attempt.state = AttemptState(report.state)
        except ValueError:
            attempt.state = AttemptState.failed
        attempt.reason, attempt.finished_at = report.message, utcnow()
        attempt.exit_code = data.get("exit_code")
        accounting.close_records(session, attempt.id, attempt.state.value, attempt.finished_at)
        if task.state.terminal or attempt is not task.attempt_rows[-1]:
            return None  # cancelled meanwhile, or an attempt from before a re-run
        task.exit_code = attempt.exit_code
        if attempt.state == AttemptState.succeeded:
            task.result = data.get("result")
            task.files = list(data.get("files") or [])
            runrows.finish(task, RunState.succeeded)
            return Pending(run.id, attempt.id, attempt.site, self.results.target(run, task))
        if attempt.state == AttemptState.cancelled:
            runrows.finish(task, RunState.cancelled, report.message)
            return None
        retries = runrows.task_def(run, task).retries
        if task.attempts <= retries:
            task.state = RunState.pending  # the next advance places it again
            task.reason = f"attempt {attempt.number} {attempt.state.value}: {report.message}"
            return None
        final = RunState.lost if attempt.state == AttemptState.lost else RunState.failed
        runrows.finish(task, final, report.message)
        return None

    async def executor_report(self, report: Report) -> None:
        """A state or result from an attempt's executor through the gateway (its token checked).

        Conflict once the attempt ended: the token reports only while it is under way.
        """
        await self.run_db(lambda s: _open_attempt(s, report.instance_id))
        await self.apply(report)

    async def note(self, attempt_id: str, message: str, data: dict[str, Any]) -> None:
        """A note from a running attempt's executor (its token checked) into its run's events."""

        def record(session: Session) -> None:
            attempt = _open_attempt(session, attempt_id)
            task = attempt.task
            if _count_events(session, task, "note") >= MAX_NOTES:
                raise Conflict(f"task {task.label} has sent {MAX_NOTES} notes already")
            runrows.add_event(
                session,
                task.run_id,
                task.label,
                "note",
                f"attempt {attempt.number} on {attempt.site}: {message}",
                data,
            )

        await self.run_db(record)

    # --- logs ------------------------------------------------------------------------
    async def logs(self, run_id: str, who: Viewer, task: str, lines: int) -> str:
        """The output of a task copy's last attempt, read at its site."""

        def find(session: Session) -> tuple[str, str, Path]:
            run = runrows.visible_run(session, run_id, who)
            for stage in run.stages:
                for row in stage.tasks:
                    if row.label == task and row.attempt_rows:
                        last = row.attempt_rows[-1]
                        return last.id, last.site, self.results.target(run, row)
            raise NotFound(f"run {run_id} has no started task {task}")

        attempt_id, site, target = await self.run_db(find)
        # Collected with the results (the site no longer has it); never read through a link.
        text = await asyncio.to_thread(kept_log, target, lines)
        if text is not None:
            return text
        link = self.links.get(site)
        if link is None:
            raise Conflict(f"site {site} is gone")
        return await link.task_logs(attempt_id, lines)

    # --- restart -----------------------------------------------------------------------
    async def restore(self) -> None:
        """After a portal start: sites watch their attempts again; runs move on."""
        await self.run_db(self.results.find_pending)
        await self.sweep()
        for run_id in await self.run_db(runrows.unfinished_runs):
            await self.advance(run_id)

    async def sweep(self) -> None:
        """Re-adopt active attempts at live sites; retry tasks waiting for quota.

        Attempts of removed sites are lost.
        """
        for run_id in await self.run_db(lambda s: runrows.waiting_runs(s, WAITING_FOR_QUOTA)):
            await self.advance(run_id)
        away = await self.run_db(runrows.away_since)
        now = utcnow()
        for attempt_id, site, _run in await self.run_db(runrows.active_attempts):
            if attempt_id in self._dispatching:
                continue
            link = self.links.get(site)
            if link is None:
                await self.apply(
                    Report(attempt_id, "lost", kind="task", message=f"site {site} is gone")
                )
            elif link.live:
                with contextlib.suppress(LabgateError):
                    await link.adopt_task(attempt_id)
            elif self.leader.leading and self._away_for(site, away.get(site), now) > self.grace:
                self._orphans[attempt_id] = site
                message = f"site {site} did not come back within {self.grace:g} s"
                await self.apply(Report(attempt_id, "lost", kind="task", message=message))
        for site, link in self.links.items():
            if link.live:
                self._away_seen.pop(site, None)
        await self._stop_orphans()
        retry, given_up = await self.results.due(
            lambda site: self._away_for(site, away.get(site), now) > self.grace
        )
        for item in retry:
            self._spawn(self._follow_up(item.run_id, item))
        for item in given_up:
            await self.run_db(functools.partial(_files_given_up, item))
            self._spawn(self.advance(item.run_id))

    def _away_for(self, site: str, since: datetime | None, now: datetime) -> float:
        """Seconds ``site`` has been away (from its row, else since this process saw it)."""
        if since is not None:
            return (now - since).total_seconds()
        if self.shared:
            return 0.0
        first = self._away_seen.setdefault(site, time.monotonic())
        return time.monotonic() - first

    async def _stop_orphans(self) -> None:
        """Stop, at sites that are back, the attempts given up on while they were away."""
        for attempt_id, site in list(self._orphans.items()):
            link = self.links.get(site)
            if link is None:
                self._orphans.pop(attempt_id, None)
            elif link.live:
                self._orphans.pop(attempt_id, None)
                with contextlib.suppress(LabgateError):
                    await link.cancel_task(attempt_id)

    def start(self) -> None:
        """Start the periodic sweep."""
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="runs-sweep")

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.sweep()
            except Exception:
                log.exception("the runs sweep failed")

    async def close(self) -> None:
        """Stop the sweep; attempts keep running at their sites."""
        await cancel_and_wait(self._sweeper)
        self._sweeper = None
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        for task in list(self._tasks):
            task.cancel()


def _asked(definition: TaskDef) -> Resources:
    """What a task holds while it runs (memory 0: none asked, no limit either)."""
    return Resources(cpu=definition.cpu, memory=definition.memory_mib * 2**20)


def _broken(counts: dict[RunState, int]) -> int:
    """How many of a stage's copies (``counts`` by state) ended and did not succeed."""
    ended = (RunState.pending, RunState.running, RunState.succeeded)
    return sum(count for state, count in counts.items() if state not in ended)


def _memoryless(run: Run, stage: RunStage) -> list[str]:
    """The names of the stage's tasks asking no memory (from the run's definition)."""
    for raw in run.definition.get("stages", []):
        if raw.get("name") == stage.name:
            return [t["name"] for t in raw.get("tasks", []) if not t.get("memory_mib")]
    return []


class _Places:
    """What one advance knows of the sites: labels, which are live, how busy each is."""

    def __init__(
        self,
        labels: dict[str, dict[str, Any]],
        live: set[str],
        busy: dict[str, int],
        backends: dict[str, str],
    ):
        self.labels, self.live, self.busy, self.backends = labels, live, busy, backends
        self._defs: dict[str, TaskDef] = {}

    def definition(self, run: Run, task: RunTask) -> TaskDef:
        """A task's definition (read from the run's definition once per task name)."""
        if task.name not in self._defs:
            self._defs[task.name] = runrows.task_def(run, task)
        return self._defs[task.name]

    def where(self, run: Run, task: RunTask) -> Where:
        """A task's ``where``."""
        return self.definition(run, task).where


def _busy(session: Session) -> dict[str, int]:
    """Active attempts per site."""
    rows = session.execute(
        select(TaskAttempt.site, func.count())
        .where(TaskAttempt.state.in_([AttemptState.starting, AttemptState.running]))
        .group_by(TaskAttempt.site)
    ).all()
    return {site: int(count) for site, count in rows}


def _cancel_tasks(tasks: list[RunTask], reason: str) -> list[tuple[str, str]]:
    """Cancel the open ones of ``tasks``; (attempt id, site) of each attempt to stop."""
    stopping: list[tuple[str, str]] = []
    for task in tasks:
        if task.state.terminal:
            continue
        for attempt in task.attempt_rows:
            if not attempt.state.terminal:
                stopping.append((attempt.id, attempt.site))
        runrows.finish(task, RunState.cancelled, reason)
    return stopping


def _cancel_open(run: Run, reason: str) -> list[tuple[str, str]]:
    stopping: list[tuple[str, str]] = []
    for stage in run.stages:
        stopping += _cancel_tasks(stage.tasks, reason)
        if not stage.state.terminal:
            runrows.finish(stage, RunState.cancelled)
    return stopping


def _files_given_up(item: Pending, session: Session) -> None:
    message = f"its files stayed at site {item.site}, which did not come back"
    runrows.add_event(session, item.run_id, item.target.name, "note", message)


def _count_events(session: Session, task: RunTask, state: str) -> int:
    """How many events of ``state`` a task copy has in its run."""
    found = session.scalar(
        select(func.count()).where(
            RunEvent.run_id == task.run_id, RunEvent.task == task.label, RunEvent.state == state
        )
    )
    return int(found or 0)


def _open_attempt(session: Session, attempt_id: str) -> TaskAttempt:
    """An attempt under way; NotFound or Conflict (it ended) otherwise."""
    attempt = session.get(TaskAttempt, attempt_id)
    if attempt is None:
        raise NotFound(f"no task attempt {attempt_id}")
    if attempt.state.terminal:
        raise Conflict(f"task attempt {attempt_id} has ended ({attempt.state.value})")
    return attempt


def _run_of(session: Session, attempt_id: str) -> tuple[str, str] | None:
    attempt = session.get(TaskAttempt, attempt_id)
    if attempt is None:
        return None
    return attempt.task.run_id, attempt.site


def _spec_of(session: Session, attempt_id: str) -> tuple[TaskSpec, str]:
    attempt = session.get(TaskAttempt, attempt_id)
    if attempt is None:
        raise NotFound(f"no task attempt {attempt_id}")
    task = attempt.task
    run = session.get(Run, task.run_id)
    if run is None:
        raise NotFound(f"no run {task.run_id}")
    definition = runrows.task_def(run, task)
    env = dict(definition.environment.variables)
    env["LABGATE_TASK_COPY"] = str(task.copy)
    spec = TaskSpec(
        attempt_id=attempt.id,
        run_id=run.id,
        task=task.label,
        owner=run.owner.name,
        owner_id=run.owner_id,
        attempt=attempt.number,
        command=definition.command,
        callable=definition.callable,
        args=definition.args,
        env=env,
        timeout=definition.timeout,
        cpu=definition.cpu,
        memory_mib=definition.memory_mib,
        python=definition.environment.python,
        image=definition.environment.image,
    )
    return spec, attempt.site
