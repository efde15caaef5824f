"""Numbers that are never given out twice, kept in the database (table ``counters``).

:func:`take` adds one to a named counter and returns the new value in the
caller's transaction. The ``UPDATE`` comes first: it locks the row (PostgreSQL)
or takes SQLite's write lock, so two transactions, of one portal or of several
replicas, never read the same value; the one that waited reads the other's.
A rolled-back transaction gives its number back, which nothing used.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from labgate.db.models import Counter

#: The warm-pool instances' numbers (their own uids on the process backend).
POOL_UID = "pool_uid"


def take(session: Session, name: str) -> int:
    """The counter ``name`` plus one, now its value (the first is 1)."""
    bumped = session.execute(
        update(Counter)
        .where(Counter.name == name)
        .values(value=Counter.value + 1)
        .execution_options(synchronize_session=False)
    )
    if bumped.rowcount == 0:  # type: ignore[attr-defined]
        # Made by its migration; created here only if someone deleted it. Two doing that at
        # once: one insert fails and its transaction runs again, finding the row.
        session.add(Counter(name=name, value=1))
        session.flush()
        return 1
    value = session.scalar(select(Counter.value).where(Counter.name == name))
    if value is None:
        raise RuntimeError(f"counter {name} vanished")
    return int(value)
