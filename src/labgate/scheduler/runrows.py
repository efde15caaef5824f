"""Batch runs in the database: the rows a definition makes, and reading them back.

Pure functions on a session, used by the run processor
(:mod:`labgate.scheduler.runs`) and the API. Nothing here talks to a site.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from labgate.db.models import Site, utcnow
from labgate.db.runs import AttemptState, Run, RunEvent, RunStage, RunState, RunTask, TaskAttempt
from labgate.errors import BadRequest, NotFound
from labgate.wire.runs import RunDef, TaskDef, Where


def new_id() -> str:
    """A fresh run or attempt id (32 hex digits)."""
    return uuid.uuid4().hex


def matching_sites(
    where: Where, labels: Mapping[str, Mapping[str, Any]], live: set[str]
) -> list[str]:
    """The live sites (by name) that ``where`` allows, sorted."""
    names = sorted(live)
    if where.site is not None:
        names = [n for n in names if n == where.site]
    return [
        n
        for n in names
        if all(str(labels.get(n, {}).get(k)) == str(v) for k, v in where.labels.items())
    ]


def site_labels(session: Session) -> dict[str, dict[str, Any]]:
    """Every recorded site's labels, by name."""
    return {s.name: dict(s.labels or {}) for s in session.scalars(select(Site))}


def site_backends(session: Session) -> dict[str, str]:
    """Every recorded site's backend, by name."""
    return {s.name: s.backend for s in session.scalars(select(Site))}


def runs_on(task: TaskDef, backend: str) -> bool:
    """Whether a site with ``backend`` can run ``task``: an image needs containers."""
    return not task.environment.image or backend == "containers"


def create_run(session: Session, owner_id: int, definition: RunDef, live: set[str]) -> Run:
    """Record a run and a task row per copy (one per site for ``where.every``)."""
    labels = site_labels(session)
    backends = site_backends(session)
    known = set(labels)
    run = Run(
        id=new_id(),
        owner_id=owner_id,
        name=definition.name,
        definition=definition.model_dump(mode="json"),
    )
    session.add(run)
    for position, stage_def in enumerate(definition.stages):
        stage = RunStage(
            run=run,
            position=position,
            name=stage_def.name,
            continue_on_failure=stage_def.continue_on_failure,
        )
        session.add(stage)
        for task_def in stage_def.tasks:
            where = task_def.where
            if where.site is not None and where.site not in known:
                raise BadRequest(f"task {task_def.name}: there is no site {where.site!r}")
            pins: list[str | None] = [None]
            if where.every:
                pins = [
                    name
                    for name in matching_sites(where, labels, live)
                    if runs_on(task_def, backends.get(name, ""))
                ]
                if not pins:
                    raise BadRequest(
                        f"task {task_def.name}: no live site matches its `where` "
                        f"(site={where.site}, labels={where.labels})"
                    )
            copy = 0
            for pin in pins:
                for _ in range(where.copies):
                    session.add(
                        RunTask(
                            run_id=run.id,
                            stage=stage,
                            name=task_def.name,
                            copy=copy,
                            pinned_site=pin,
                            result=None,
                            files=[],
                        )
                    )
                    copy += 1
    add_event(session, run.id, "", "pending", f"run {run.name} submitted")
    return run


def add_event(
    session: Session,
    run_id: str,
    task: str,
    state: str,
    message: str,
    data: dict[str, Any] | None = None,
) -> None:
    """Record one event of a run."""
    session.add(
        RunEvent(run_id=run_id, task=task, state=state, message=message[:4000], data=data or {})
    )


def task_def(run: Run, task: RunTask) -> TaskDef:
    """The definition of a task row, from its run's stored definition."""
    for stage in run.definition.get("stages", []):
        for raw in stage.get("tasks", []):
            if raw.get("name") == task.name:
                return TaskDef.model_validate(raw)
    raise NotFound(f"run {run.id} has no task {task.name}")


def get_run(session: Session, run_id: str) -> Run:
    """A run's row alone, locked (its stages, tasks and attempts are read when used)."""
    lock_run(session, run_id)
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"no run {run_id}")
    return run


def lock_run(session: Session, run_id: str) -> None:
    """Lock a run's row until the transaction ends (PostgreSQL; SQLite has one writer).

    Every change to a run's stages, tasks and attempts takes it first, so two
    portal replicas never place the same task copy, nor one while the other
    cancels the run.
    """
    session.execute(select(Run.id).where(Run.id == run_id).with_for_update())


def stage_counts(session: Session, stage: RunStage) -> dict[RunState, int]:
    """How many of a stage's task copies are in each state (absent states: none)."""
    rows = session.execute(
        select(RunTask.state, func.count())
        .where(RunTask.stage_id == stage.id)
        .group_by(RunTask.state)
    )
    return {state: int(count) for state, count in rows}


def pending_tasks(session: Session, stage: RunStage, after: int, limit: int) -> list[RunTask]:
    """Up to ``limit`` pending task copies of a stage with ids above ``after``, by id."""
    return list(
        session.scalars(
            select(RunTask)
            .where(
                RunTask.stage_id == stage.id,
                RunTask.state == RunState.pending,
                RunTask.id > after,
            )
            .order_by(RunTask.id)
            .limit(limit)
        )
    )


def load_run(session: Session, run_id: str, *, attempts: bool = True) -> Run:
    """A run with its stages and tasks loaded, and their attempts unless ``attempts`` is
    False (:class:`NotFound` if none)."""
    tasks = selectinload(Run.stages).selectinload(RunStage.tasks)
    run = session.scalar(
        select(Run)
        .where(Run.id == run_id)
        .options(
            tasks.selectinload(RunTask.attempt_rows) if attempts else tasks,
            selectinload(Run.owner),
        )
    )
    if run is None:
        raise NotFound(f"no run {run_id}")
    return run


@dataclass(frozen=True)
class Viewer:
    """Who asks about a run: its owner, or an admin acting as one, may see and change it."""

    user_id: int
    name: str
    admin: bool = False


def visible_run(session: Session, run_id: str, who: Viewer, *, attempts: bool = True) -> Run:
    """A run its owner or an admin may see; anyone else gets :class:`NotFound` (no hint).

    Without ``attempts`` its tasks' attempts are not loaded: enough for :func:`run_json`.
    """
    try:
        run = load_run(session, run_id, attempts=attempts)
    except NotFound:
        run = None
    return _seen_by(run, run_id, who)


def visible_row(session: Session, run_id: str, who: Viewer) -> Run:
    """A run's row alone, as :func:`visible_run` allows it."""
    return _seen_by(session.get(Run, run_id), run_id, who)


def _seen_by(run: Run | None, run_id: str, who: Viewer) -> Run:
    if run is None or (run.owner_id != who.user_id and not who.admin):
        raise NotFound(f"no run {run_id!r}", code="unknown_run")
    return run


def finish(obj: Run | RunStage | RunTask, state: RunState, reason: str = "") -> None:
    """Put a run, stage or task in a terminal state."""
    obj.state = state
    obj.finished_at = utcnow()
    if reason and hasattr(obj, "reason"):
        obj.reason = reason


def active_attempts(session: Session) -> list[tuple[str, str, str]]:
    """(attempt id, site, run id) of every attempt still starting or running."""
    rows = session.execute(
        select(TaskAttempt.id, TaskAttempt.site, RunTask.run_id)
        .join(RunTask, RunTask.id == TaskAttempt.task_id)
        .where(TaskAttempt.state.in_([AttemptState.starting, AttemptState.running]))
    )
    return [(a, s, r) for a, s, r in rows]


def away_since(session: Session) -> dict[str, datetime]:
    """Since when each disconnected network site has been away, by name."""
    rows = session.execute(
        select(Site.name, Site.disconnected_at).where(
            Site.connected_at.is_(None), Site.disconnected_at.is_not(None)
        )
    )
    return {name: since for name, since in rows if since is not None}


def unfinished_runs(session: Session) -> list[str]:
    """Ids of runs pending or running."""
    return list(
        session.scalars(select(Run.id).where(Run.state.in_([RunState.pending, RunState.running])))
    )


def waiting_runs(session: Session, reason: str) -> list[str]:
    """Ids of unfinished runs with a pending task whose reason starts with ``reason``."""
    return list(
        session.scalars(
            select(RunTask.run_id)
            .join(Run, Run.id == RunTask.run_id)
            .where(
                Run.state.in_([RunState.pending, RunState.running]),
                RunTask.state == RunState.pending,
                RunTask.reason.startswith(reason),
            )
            .distinct()
        )
    )


def run_json(session: Session, run: Run, *, events: list[RunEvent] | None = None) -> dict[str, Any]:
    """A run as the API shows it: its graph of stages and tasks, with state."""
    sites = last_sites(session, run.id)
    body: dict[str, Any] = {
        "id": run.id,
        "name": run.name,
        "owner": run.owner.name,
        "state": run.state.value,
        "reason": run.reason,
        "created_at": run.created_at.isoformat(),
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "stages": [
            {
                "name": stage.name,
                "state": stage.state.value,
                "continue_on_failure": stage.continue_on_failure,
                "tasks": [
                    task_json(task, sites.get(task.id, task.pinned_site)) for task in stage.tasks
                ],
            }
            for stage in run.stages
        ],
    }
    if events is not None:
        body["events"] = [event_json(e) for e in events]
    return body


def event_json(event: RunEvent) -> dict[str, Any]:
    """One event of a run as the API shows it; ``id`` orders them (``?after=``)."""
    return {
        "id": event.id,
        "at": event.created_at.isoformat(),
        "task": event.task,
        "state": event.state,
        "message": event.message,
        "data": event.data,
    }


def last_sites(session: Session, run_id: str) -> dict[int, str]:
    """Where each task copy of a run was last sent: task id -> site (tried ones only)."""
    rows = session.execute(
        select(TaskAttempt.task_id, TaskAttempt.site)
        .join(RunTask, RunTask.id == TaskAttempt.task_id)
        .where(RunTask.run_id == run_id)
        .order_by(TaskAttempt.task_id, TaskAttempt.number)
    )
    return {task_id: site for task_id, site in rows}  # the last attempt's site wins


def task_json(task: RunTask, site: str | None) -> dict[str, Any]:
    """One task copy as the API shows it, with the site of its last attempt (``site``)."""
    seconds = None
    if task.started_at and task.finished_at:
        seconds = round((task.finished_at - task.started_at).total_seconds(), 3)
    return {
        "name": task.label,
        "task": task.name,
        "copy": task.copy,
        "state": task.state.value,
        "reason": task.reason,
        "attempts": task.attempts,
        "site": site,
        "exit_code": task.exit_code,
        "result": task.result,
        "files": task.files,
        "seconds": seconds,
    }


def run_events(
    session: Session, run_id: str, after: int = 0, limit: int | None = None
) -> list[RunEvent]:
    """A run's events after event id ``after``, oldest first (at most ``limit``)."""
    return list(
        session.scalars(
            select(RunEvent)
            .where(RunEvent.run_id == run_id, RunEvent.id > after)
            .order_by(RunEvent.id)
            .limit(limit)
        )
    )
