"""Batch runs' tables: runs, their stages and tasks, task attempts, events.

A run's definition is kept whole (JSON) next to the rows made from it: one
stage row per stage, one task row per task copy, one attempt row each time a
copy is sent to a site. A task's result (exit status, JSON return value,
collected files) is on its task row, from its last attempt.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Enum, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from labgate.db.models import Base, User, utcnow


class RunState(enum.StrEnum):
    """Where a run, a stage or a task is; the same words for all three."""

    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    #: A task whose site lost it and that has no retry left.
    lost = "lost"

    @property
    def terminal(self) -> bool:
        """Whether nothing more happens in this state."""
        return self not in (RunState.pending, RunState.running)


class AttemptState(enum.StrEnum):
    """One try of one task copy at one site."""

    starting = "starting"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    lost = "lost"

    @property
    def terminal(self) -> bool:
        """Whether the attempt has ended."""
        return self not in (AttemptState.starting, AttemptState.running)


def _state(enum_type: type[enum.StrEnum]) -> Enum:
    return Enum(enum_type, native_enum=False, length=16)


class Run(Base):
    """A pipeline of stages submitted by one owner."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    state: Mapped[RunState] = mapped_column(_state(RunState), default=RunState.pending, index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    definition: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    owner: Mapped[User] = relationship()
    stages: Mapped[list[RunStage]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="RunStage.position"
    )


class RunStage(Base):
    """One stage of a run: its tasks run in parallel."""

    __tablename__ = "run_stages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    state: Mapped[RunState] = mapped_column(_state(RunState), default=RunState.pending)
    continue_on_failure: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    run: Mapped[Run] = relationship(back_populates="stages")
    tasks: Mapped[list[RunTask]] = relationship(
        back_populates="stage", cascade="all, delete-orphan", order_by="RunTask.id"
    )


class RunTask(Base):
    """One copy of one task of a stage, and its result."""

    __tablename__ = "run_tasks"
    #: An advance counts its stage's tasks by state and reads the pending ones.
    __table_args__ = (Index("ix_run_tasks_stage_state", "stage_id", "state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    stage_id: Mapped[int] = mapped_column(ForeignKey("run_stages.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    #: Which copy (0, 1, ...) of the task this is.
    copy: Mapped[int] = mapped_column(Integer, default=0)
    #: The site this copy must run on (``where.every``), or None: placement picks.
    pinned_site: Mapped[str | None] = mapped_column(String(64), default=None)
    state: Mapped[RunState] = mapped_column(_state(RunState), default=RunState.pending)
    reason: Mapped[str] = mapped_column(Text, default="")
    #: Attempts made so far (the first try included).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    exit_code: Mapped[int | None] = mapped_column(Integer, default=None)
    #: The task's JSON return value (a callable's, or what it wrote to $LABGATE_RESULT).
    result: Mapped[Any] = mapped_column(JSON, default=None, nullable=True)
    #: Files collected from its results directory (relative paths).
    files: Mapped[list[str]] = mapped_column(JSON, default=list)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    stage: Mapped[RunStage] = relationship(back_populates="tasks")
    attempt_rows: Mapped[list[TaskAttempt]] = relationship(
        back_populates="task", cascade="all, delete-orphan", order_by="TaskAttempt.number"
    )

    @property
    def label(self) -> str:
        """``name`` or ``name#copy`` for copies after the first."""
        return self.name if self.copy == 0 else f"{self.name}#{self.copy}"


class TaskAttempt(Base):
    """One try of a task copy at one site; its id is what the site reports on."""

    __tablename__ = "task_attempts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("run_tasks.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    site: Mapped[str] = mapped_column(String(64))
    state: Mapped[AttemptState] = mapped_column(
        _state(AttemptState), default=AttemptState.starting, index=True
    )
    reason: Mapped[str] = mapped_column(Text, default="")
    exit_code: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    task: Mapped[RunTask] = relationship(back_populates="attempt_rows")


class RunEvent(Base):
    """Something that happened in a run: a state change, a note, a task's report."""

    __tablename__ = "run_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The task copy's label, or "" for the run itself.
    task: Mapped[str] = mapped_column(String(80), default="")
    state: Mapped[str] = mapped_column(String(16), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
