"""A run's task attempts against its owner's limits and their groups', as instances are.

Each attempt placed holds one of ``instances``, its ``cpu`` and its memory
from placement to end (an open usage record whose ``tool`` is ``run:<run
name>``), against the owner's limits (:func:`labgate.scheduler.quotas.user_limits`)
and, like a launch, against one group's: the first of the owner's groups
(by name) whose limits admit it, which the record is then charged to. A
user in groups none of which admits it waits, with the first group's
refusal as the reason. One advance of a run reads the limits and what is
held once, and counts what it places itself; it runs in the instance
manager's admission (as launches do), holding the owner's row and the rows
of the groups it counts against until it commits.

A task that asks no memory (``memory_mib = 0``) runs with no memory limit,
so it cannot be counted against one: while its owner's memory is limited,
or every one of their groups limits memory, it is not placed but fails
(:meth:`RunQuota.memoryless_refusal`), and such a run is refused at
submission (422, :func:`check_submission`). A group that limits memory
never admits it (one of their groups that does not is charged instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.db.models import Group, UsageRecord, User, utcnow
from labgate.db.runs import Run, RunTask
from labgate.errors import QuotaExceeded, Unprocessable
from labgate.scheduler import quotas, runrows
from labgate.wire.launch import Resources
from labgate.wire.runs import RunDef

#: The reason of a task that waits because its owner's (or their groups') limits are reached.
WAITING_FOR_QUOTA = "waiting for quota"


def _mib(value: int) -> str:
    return f"{value / 2**20:g} MiB"


def memory_limiter(
    owner: str, own: quotas.Limits, groups: Sequence[tuple[str, quotas.Limits]]
) -> str | None:
    """Who limits the memory a task of ``owner`` asking none would escape; None: nobody.

    The owner's limits (``own``), else their groups' when every one of them limits
    memory (a group that does not is charged instead).
    """
    if own.memory is not None:
        return f"{owner}'s memory is limited ({_mib(own.memory)})"
    if groups and all(limits.memory is not None for _, limits in groups):
        name, limits = groups[0]
        every = " (as all of their groups do)" if len(groups) > 1 else ""
        return f"group {name} limits memory ({_mib(limits.memory or 0)}){every}"
    return None


def check_submission(session: Session, defaults: quotas.Limits, owner_id: int, run: RunDef) -> None:
    """Refuse (422) a run with tasks asking no memory that could not be placed now."""
    memoryless = [t.name for s in run.stages for t in s.tasks if t.memory_mib == 0]
    if not memoryless:
        return
    owner = session.get(User, owner_id)
    groups = [(g.name, quotas.stored_limits(g)) for g in quotas.groups_of(session, owner_id)]
    limiter = memory_limiter(
        owner.name if owner is not None else str(owner_id),
        quotas.user_limits(session, defaults, owner_id),
        groups,
    )
    if limiter is not None:
        several = len(memoryless) > 1
        raise Unprocessable(
            f"task{'s' if several else ''} {', '.join(memoryless)} ask{'' if several else 's'} "
            f"no memory (memory_mib = 0: no memory limit) while {limiter}: give "
            f"{'each' if several else 'it'} memory_mib, the MiB it needs",
            code="memory_required",
        )


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
                # Row-locked until the placement commits, as quotas.admit does for a launch:
                # another portal process charging this group counts after it.
                session.execute(select(Group.id).where(Group.id == group.id).with_for_update())
                limits = quotas.stored_limits(group)
                use = quotas.group_use(
                    session, group.name, core_hours_too=limits.core_hours is not None
                )
                self._groups.append((group, _Held(limits, use)))
        return self._groups

    def memoryless_refusal(self, session: Session) -> str | None:
        """Why a task asking no memory is not placed now (:func:`memory_limiter`); None: it is."""
        own = self._user(session)
        groups = [(group.name, held.limits) for group, held in self._of_groups(session)]
        limiter = memory_limiter(self.run.owner.name, own.limits, groups)
        if limiter is None:
            return None
        return (
            f"not placed: it asks no memory (memory_mib = 0: no memory limit) while {limiter}; "
            "give the task memory_mib, the MiB it needs"
        )

    def admit(self, session: Session, task: RunTask, asked: Resources) -> Charge | None:
        """Whom one more attempt is charged to; None when it does not fit (the task says why).

        A task asking no memory is never charged to a group that limits memory (nor
        placed while its owner's memory is limited: :meth:`memoryless_refusal` first).
        """
        if not asked.memory and self.memoryless_refusal(session) is not None:
            return None  # never placed: the placement fails it first
        own = self._user(session)
        try:
            quotas.check(self.run.owner.name, own.limits, own.use, asked, "user")
        except QuotaExceeded as exc:
            self._wait(session, task, exc)
            return None
        groups = self._of_groups(session)
        first: QuotaExceeded | None = None
        for group, held in groups:
            if not asked.memory and held.limits.memory is not None:
                continue  # it could hold any amount of the group's memory
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
