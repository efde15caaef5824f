"""Which portal replica leads: a lease row in PostgreSQL, with a term that fences old leaders.

Several ``labgate portal`` processes share one PostgreSQL database; each serves
every request, but the loops that must run once (idle and lifetime culling,
warm-pool refills, reconciles with the sites, the batch runs' sweep) run only
in the one that holds the lease. ``labgate serve`` is one process: it always
leads (:class:`SoleLeader`), and writes no lease.

The lease (:class:`LeaseElection`) is one row of ``leader_leases``: holder,
term and expiry, read and written in one transaction that locks the row
(``SELECT ... FOR UPDATE``). Every ``leader_lease_seconds / 3`` seconds each
replica tries: the holder renews the expiry to the database's ``now()`` plus
the lease; another replica takes the row only once the expiry has passed,
adding one to the term. Times are the database's, so replicas' clocks need
not agree.

Why a lease and not a session advisory lock: an advisory lock lasts as long
as its connection, and the connection of a paused process (SIGSTOP, a VM
frozen for a snapshot) stays open, its kernel answering for it, so the lock
would never move. A lease moves when its time is up, whatever the holder does.

Fencing, so that a leader that was paused and lost the lease cannot act:

- A replica believes it leads only until its own monotonic clock passes the
  time it *began* its last successful renewal plus 80 % of the lease. The
  database's expiry is later than that (its ``now()`` is taken after the
  renewal began), so the old leader stops believing before anyone else may
  take over; a paused process's monotonic clock keeps running, so on waking
  it knows at once. Loops ask :attr:`Leadership.leading` before each round.
- An action that writes (a cull's stop, a pool's new instance) calls
  :meth:`Leadership.fence` in the same transaction: it reads the lease row
  ``FOR SHARE`` and fails with :class:`~labgate.errors.NotLeader` unless this
  replica holds it with the term it was elected with and it has not expired.
  The share lock holds a taker's ``FOR UPDATE`` until the action commits, so
  a new term begins strictly after the old leader's last action.

A replica that stops cleanly hands the lease over at once (its expiry is set
to now), so a rolling restart moves the loops without waiting for the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.orm import Session

from labgate.aio import cancel_and_wait
from labgate.db.session import Database
from labgate.errors import NotLeader

log = logging.getLogger(__name__)

#: The lease of the loops that run once.
SCHEDULER_LEASE = "scheduler"
#: A replica believes it leads for this share of the lease after a renewal began.
BELIEF = 0.8
#: Renewals per lease period.
RENEWALS = 3


def default_replica_id() -> str:
    """``hostname:pid``: unique among the replicas of one deployment."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class LeaderStatus:
    """What ``/readyz`` and ``/metrics`` say about leadership."""

    replica: str
    leading: bool
    term: int


class Leadership(Protocol):
    """Whether this process runs the loops that run once, and the fence for their writes."""

    replica: str

    @property
    def leading(self) -> bool:
        """True while this process may run the loops that run once."""
        ...

    @property
    def term(self) -> int:
        """The term this process leads in (0 when it does not lead, or never elects)."""
        ...

    def fence(self, session: Session) -> None:
        """Raise :class:`NotLeader` unless this process leads, checked in ``session``."""

    def on_elected(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) each time this process becomes the leader."""

    def status(self) -> LeaderStatus:
        """Replica id, whether it leads, and its term."""
        ...

    def holder(self, session: Session) -> str:
        """The replica that holds the lease now, as the database says ("" if none)."""
        ...

    async def start(self) -> None:
        """Take part in the election (the first try is made before this returns)."""

    async def close(self) -> None:
        """Leave the election, handing the lease over at once when holding it."""


class SoleLeader:
    """``labgate serve``: the only process on its database, so always the leader."""

    def __init__(self, replica: str | None = None) -> None:
        self.replica = replica or default_replica_id()

    @property
    def leading(self) -> bool:
        """Always."""
        return True

    @property
    def term(self) -> int:
        """No election, no term."""
        return 0

    def fence(self, session: Session) -> None:
        """Nothing to check: no other process may lead."""

    def on_elected(self, callback: Callable[[], None]) -> None:
        """Never called again: this process leads from the start."""

    def status(self) -> LeaderStatus:
        """Leading, term 0."""
        return LeaderStatus(self.replica, True, 0)

    def holder(self, session: Session) -> str:
        """This process."""
        return self.replica

    async def start(self) -> None:
        """Nothing to start."""

    async def close(self) -> None:
        """Nothing to hand over."""


class LeaseElection:
    """One replica's part in the election through the ``leader_leases`` row (PostgreSQL)."""

    def __init__(
        self,
        db: Database,
        replica: str,
        lease_seconds: float,
        *,
        name: str = SCHEDULER_LEASE,
    ) -> None:
        if db.engine.dialect.name != "postgresql":
            raise ValueError("leader election needs PostgreSQL")
        self.db = db
        self.replica = replica
        self.lease_seconds = lease_seconds
        self.name = name
        self._term = 0
        self._believed_until = 0.0
        self._callbacks: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        #: Tests pause renewals to play a leader that froze (``kill -STOP``).
        self.renewing = True

    # --- what the loops ask --------------------------------------------------------
    @property
    def leading(self) -> bool:
        """True until 80 % of the lease after the last successful renewal began."""
        return self._term > 0 and time.monotonic() < self._believed_until

    @property
    def term(self) -> int:
        """The term of this replica's lease while it leads, else 0."""
        return self._term if self.leading else 0

    def fence(self, session: Session) -> None:
        """Raise :class:`NotLeader` unless the lease row is this replica's, same term, unexpired.

        Locks the row ``FOR SHARE`` until ``session`` commits: no other replica
        can take the lease before the action in this transaction is done.
        """
        term = self._term
        if not self.leading:
            raise NotLeader(f"portal replica {self.replica} does not lead")
        row = session.execute(
            text(
                "SELECT holder, term, expires_at > now() FROM leader_leases "
                "WHERE name = :name FOR SHARE"
            ),
            {"name": self.name},
        ).one_or_none()
        if row is None or row[0] != self.replica or row[1] != term or not row[2]:
            raise NotLeader(f"portal replica {self.replica} lost the lease of term {term}")

    def on_elected(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time this replica begins a term."""
        self._callbacks.append(callback)

    def status(self) -> LeaderStatus:
        """Replica id, whether it leads, and its term."""
        return LeaderStatus(self.replica, self.leading, self.term)

    def holder(self, session: Session) -> str:
        """The replica whose lease has not expired, or ""."""
        row = session.execute(
            text("SELECT holder FROM leader_leases WHERE name = :name AND expires_at > now()"),
            {"name": self.name},
        ).one_or_none()
        return str(row[0]) if row is not None else ""

    # --- the election ----------------------------------------------------------------
    async def start(self) -> None:
        """Try once now (a lone replica leads before it serves), then every lease / 3."""
        await self.attempt()
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="leader-lease")

    async def attempt(self) -> bool:
        """Take or renew the lease once; whether this replica leads now."""
        began = time.monotonic()
        was = self.leading
        try:
            term = await asyncio.to_thread(self.db.transact, self._claim)
        except Exception as exc:  # the database is away: lead no longer than believed
            log.warning("leader lease %s: could not renew or take it: %s", self.name, exc)
            return self.leading
        if term == 0:
            if was or self._term:
                log.info("portal replica %s no longer leads", self.replica)
            self._term, self._believed_until = 0, 0.0
            return False
        elected = term != self._term or not was
        self._term = term
        self._believed_until = began + BELIEF * self.lease_seconds
        if elected and self.leading:
            log.info("portal replica %s leads (term %d)", self.replica, term)
            for callback in self._callbacks:
                callback()
        return self.leading

    def _claim(self, session: Session) -> int:
        """Renew our lease, or take an expired one; the term we hold, or 0."""
        session.execute(
            text(
                "INSERT INTO leader_leases (name, holder, term, expires_at) "
                "VALUES (:name, '', 0, now()) ON CONFLICT (name) DO NOTHING"
            ),
            {"name": self.name},
        )
        holder, term, live = session.execute(
            text(
                "SELECT holder, term, expires_at > now() FROM leader_leases "
                "WHERE name = :name FOR UPDATE"
            ),
            {"name": self.name},
        ).one()
        ours = holder == self.replica and term == self._term and self._term > 0
        if not ours and live:
            return 0
        new_term = term if ours else term + 1
        session.execute(
            text(
                "UPDATE leader_leases SET holder = :me, term = :term, "
                "expires_at = now() + make_interval(secs => :lease) WHERE name = :name"
            ),
            {"me": self.replica, "term": new_term, "lease": self.lease_seconds, "name": self.name},
        )
        return int(new_term)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / RENEWALS)
            if self.renewing:
                await self.attempt()

    async def close(self) -> None:
        """Stop renewing; a held lease expires now, so another replica takes it at once."""
        await cancel_and_wait(self._task)
        self._task = None
        if self._term and self.leading:
            term, self._term, self._believed_until = self._term, 0, 0.0
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.db.transact, partial(self._release, term=term))

    def _release(self, session: Session, term: int) -> None:
        """End our lease of ``term`` now (nothing when it has moved on)."""
        session.execute(
            text(
                "UPDATE leader_leases SET expires_at = now() "
                "WHERE name = :name AND holder = :me AND term = :term"
            ),
            {"name": self.name, "me": self.replica, "term": term},
        )
