"""Row changes announced to other portal processes: PostgreSQL NOTIFY in the writing transaction.

Several portal processes may share one PostgreSQL database. Each keeps
things in memory that follow the database (the route table routers follow,
the wake-ups of event stream readers), so each must hear of what the others
wrote. :func:`announce_changes` hooks a session factory: after every flush
it sends ``pg_notify`` on :data:`CHANNEL` naming the rows that changed, in
the same transaction. PostgreSQL delivers a notification only when its
transaction commits (and drops it on rollback), so a listener that reads the
named rows on receipt reads what was committed.

A payload is JSON: ``{"o": ORIGIN, "c": [[KIND, KEY], ...]}``. ``ORIGIN``
names the announcing :class:`~labgate.db.session.Database` (a process may
hold several: two test portals); the kinds are:

- ``instance``: an instance's row changed or one of its events was written (key: its id);
- ``user``: a user was created, changed or deleted (key: the user id);
- ``token``: an API token was created, changed or deleted (key: its hash);
- ``session``: a browser session was revoked (key: the session id);
- ``access``: an instance's shares changed (key: the instance id);
- ``member``: a user joined or left a group (key: the user id);
- ``site``: a network site's tunnel epoch changed (key: the site's name).

Only changes made through the ORM unit of work are seen (labgate writes
these rows no other way), and of a changed row only the columns in
:data:`WATCHED`. SQLite has no notifications: the hook is not
installed there.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, Literal, get_args

from sqlalchemy import event, func, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from labgate.db.models import (
    ApiToken,
    GroupMember,
    Instance,
    InstanceEvent,
    InstanceShare,
    RevokedSession,
    Site,
    User,
)

#: The notification channel of row changes.
CHANNEL = "labgate_changes"
#: PostgreSQL refuses payloads of 8000 bytes or more; changes are split below that.
MAX_PAYLOAD = 7000

ChangeKind = Literal["instance", "user", "token", "session", "access", "member", "site"]
#: One changed row: its kind and key (see the module docstring).
Change = tuple[ChangeKind, str]
KINDS: frozenset[str] = frozenset(get_args(ChangeKind))

_SENT = "labgate_changes_sent"


def _change_of(row: object) -> Change | None:
    """What other processes must hear about ``row``, or None."""
    if isinstance(row, Instance):
        return ("instance", row.id)
    if isinstance(row, InstanceEvent):
        return ("instance", row.instance_id)
    if isinstance(row, User):
        return ("user", str(row.id))
    if isinstance(row, ApiToken):
        return ("token", row.token_hash)
    if isinstance(row, RevokedSession):
        return ("session", row.session_id)
    if isinstance(row, InstanceShare):
        return ("access", row.instance_id)
    if isinstance(row, GroupMember):
        return ("member", str(row.user_id))
    if isinstance(row, Site):
        return ("site", row.name)
    return None


#: For rows that are changed (not added or deleted), the columns others must hear about;
#: a model not named here is announced on any change. Activity times, last use and
#: backend state change often and matter to no route or event stream.
WATCHED: dict[type, frozenset[str]] = {
    Instance: frozenset({"state", "endpoint", "secret", "owner_id", "tool", "site_id", "pool"}),
    User: frozenset({"name", "is_admin", "disabled", "sessions_valid_after"}),
    ApiToken: frozenset({"token_hash", "user_id", "scopes", "expires_at"}),
    # Heartbeats write sites rows all the time; only the tunnel's epoch matters to routers.
    Site: frozenset({"tunnel_epoch"}),
}


def _watched_change(row: object) -> bool:
    columns = WATCHED.get(type(row))
    state = inspect(row)
    if columns is None:
        return any(attr.history.has_changes() for attr in state.attrs)
    return any(state.attrs[name].history.has_changes() for name in columns)


def changes_in(session: Session) -> set[Change]:
    """The changes the session's current flush writes (called in ``after_flush``)."""
    found: set[Change] = set()
    for row in (*session.new, *session.deleted):
        change = _change_of(row)
        if change is not None and change[1] not in ("", "None"):
            found.add(change)
    for row in session.dirty:
        change = _change_of(row)
        if change is not None and _watched_change(row):
            found.add(change)
    return found


def encode(origin: str, changes: Iterable[Change]) -> Iterator[str]:
    """Payloads of at most :data:`MAX_PAYLOAD` bytes naming ``changes``."""
    batch: list[Change] = []
    size = 0
    for change in sorted(changes):
        item = len(json.dumps(change)) + 1
        if batch and size + item > MAX_PAYLOAD:
            yield json.dumps({"o": origin, "c": batch})
            batch, size = [], 0
        batch.append(change)
        size += item
    if batch:
        yield json.dumps({"o": origin, "c": batch})


def decode(payload: str) -> tuple[str, list[Change]]:
    """The origin and changes of a payload; ValueError when it is not one of ours."""
    data: Any = json.loads(payload)
    if not isinstance(data, dict) or not isinstance(data.get("o"), str):
        raise ValueError("not a change notification")
    changes: list[Change] = []
    for item in data.get("c") or ():
        if (
            not isinstance(item, list)
            or len(item) != 2
            or item[0] not in KINDS
            or not isinstance(item[1], str)
        ):
            raise ValueError(f"not a change: {item!r}")
        changes.append((item[0], item[1]))
    return data["o"], changes


def announce_changes(factory: sessionmaker[Session]) -> str:
    """Make sessions of ``factory`` NOTIFY their row changes on commit; returns their origin."""
    origin = uuid.uuid4().hex[:16]

    def after_flush(session: Session, _context: object) -> None:
        sent: set[Change] = session.info.setdefault(_SENT, set())
        new = changes_in(session) - sent
        if not new:
            return
        sent.update(new)
        for payload in encode(origin, new):
            session.connection().execute(select(func.pg_notify(CHANNEL, payload)))

    def transaction_over(session: Session, *_args: object) -> None:
        session.info.pop(_SENT, None)

    event.listen(factory, "after_flush", after_flush)
    event.listen(factory, "after_commit", transaction_over)
    event.listen(factory, "after_soft_rollback", transaction_over)
    return origin
