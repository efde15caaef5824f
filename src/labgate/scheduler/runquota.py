"""A run's task attempts against its owner's limits and their groups', as instances are.

Each attempt placed holds one of ``instances``, its ``cpu`` and its memory
from placement to end (an open usage record whose ``tool`` is ``run:<run
name>``), against the owner's limits (:func:`labgate.scheduler.quotas.user_limits`)
and, like a launch, against one group's: the first of the owner's groups
(by name) whose limits admit it, which the record is then charged to. A
user in groups none of which admits it waits, with the first group's
refusal as the reason. One advance of a run reads the limits and what is
held once, and counts what it places itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from labgate.db.models import Group, UsageRecord, utcnow
from labgate.db.runs import Run, RunTask
from labgate.errors import QuotaExceeded
from labgate.scheduler import quotas, runrows
from labgate.wire.launch import Resources

#: The reason of a task that waits because its owner's (or their groups') limits are reached.
WAITING_FOR_QUOTA = "waiting for quota"


@dataclass(frozen=True)
class Charge:
    """Whom a placed attempt is charged to besides its owner: a group's name, or ""."""

    group: str = ""


@dataclass
class _Held:
    limits: quotas.Limits
    use: quotas.Use

    def add(self, asked: Resources) -> None:
        use = self.use
        self.use = quotas.Use(
            use.instances + 1, use.cpu + asked.cpu, use.memory + asked.memory, use.core_hours
        )


class RunQuota:
    """A run owner's limits and their groups', kept up to date as one advance places tasks.

    Read from the database at the first placement of the advance only.
    """

    def __init__(self, run: Run, defaults: quotas.Limits) -> None:
        self.run = run
        self.defaults = defaults
        self._own: _Held | None = None
        self._groups: list[tuple[Group, _Held]] | None = None

    def _user(self, session: Session) -> _Held:
        if self._own is None:
            limits = quotas.user_limits(session, self.defaults, self.run.owner_id)
            # The month's core-hours read every record of it: only when they are limited.
            use = quotas.user_use(
                session, self.run.owner_id, core_hours_too=limits.core_hours is not None
            )
            self._own = _Held(limits, use)
        return self._own

    def _of_groups(self, session: Session) -> list[tuple[Group, _Held]]:
        if self._groups is None:
            self._groups = []
            for group in quotas.groups_of(session, self.run.owner_id):
                limits = quotas.stored_limits(group)
                use = quotas.group_use(
                    session, group.name, core_hours_too=limits.core_hours is not None
                )
                self._groups.append((group, _Held(limits, use)))
        return self._groups

    def admit(self, session: Session, task: RunTask, asked: Resources) -> Charge | None:
        """Whom one more attempt is charged to; None when it does not fit (the task says why)."""
        own = self._user(session)
        try:
            quotas.check(self.run.owner.name, own.limits, own.use, asked, "user")
        except QuotaExceeded as exc:
            self._wait(session, task, exc)
            return None
        groups = self._of_groups(session)
        first: QuotaExceeded | None = None
        for group, held in groups:
            try:
                quotas.check(f"group {group.name}", held.limits, held.use, asked, "group")
            except QuotaExceeded as exc:
                first = first or exc
                continue
            return Charge(group.name)
        if first is not None:
            self._wait(session, task, first)
            return None
        return Charge()

    def _wait(self, session: Session, task: RunTask, refusal: QuotaExceeded) -> None:
        reason = f"{WAITING_FOR_QUOTA}: {refusal.detail}"
        if task.reason != reason:
            task.reason = reason
            runrows.add_event(session, self.run.id, task.label, "waiting", reason)

    def record(
        self, session: Session, attempt_id: str, site: str, asked: Resources, charge: Charge
    ) -> None:
        """Open the attempt's usage record; it holds ``asked`` until the attempt ends."""
        owner = self.run.owner
        session.add(
            UsageRecord(
                instance_id=attempt_id,
                user_id=owner.id,
                user_name=owner.name,
                group_name=charge.group,
                tool=f"{quotas.TASK_TOOL_PREFIX}{self.run.name}"[:64],
                site=site,
                cpu=asked.cpu,
                memory=asked.memory,
                started_at=utcnow(),
            )
        )
        self._user(session).add(asked)
        for group, held in self._of_groups(session):
            if group.name == charge.group:
                held.add(asked)
