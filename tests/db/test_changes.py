"""Row changes announced with NOTIFY (labgate.db.changes) and heard (labgate.db.listen)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from helpers import needs_postgres
from labgate.db.changes import CHANNEL, MAX_PAYLOAD, Change, announce_changes, decode, encode
from labgate.db.listen import ChangeListener, libpq_url
from labgate.db.models import ApiToken, RevokedSession, User, utcnow
from labgate.db.session import Database


def test_many_changes_split_into_payloads_postgres_takes() -> None:
    changes: set[Change] = {("token", f"{n:064x}") for n in range(500)}
    payloads = list(encode("origin", changes))
    assert len(payloads) > 1
    assert all(len(p.encode()) <= MAX_PAYLOAD + 100 for p in payloads)
    heard: set[Change] = set()
    for payload in payloads:
        origin, part = decode(payload)
        assert origin == "origin"
        heard.update(part)
    assert heard == changes


@pytest.mark.parametrize(
    "payload",
    ["", "[]", '{"c": []}', '{"o": "x", "c": [["nonsense", "1"]]}', '{"o": "x", "c": [[1]]}'],
)
def test_foreign_payloads_are_refused(payload: str) -> None:
    with pytest.raises(ValueError):
        decode(payload)


def test_only_postgresql_urls_are_listened_to() -> None:
    url = libpq_url("postgresql+psycopg://u:p%40ss@db:5433/labgate")
    assert url == "postgresql://u:p%40ss@db:5433/labgate"
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        libpq_url("sqlite:///x.db")


@needs_postgres
async def test_committed_changes_are_heard_once_rolled_back_and_unwatched_ones_never(
    database_url: str,
) -> None:
    db = Database(database_url)
    origin = announce_changes(db.sessionmaker)
    heard: list[tuple[str, list[Change]]] = []
    listener = ChangeListener(database_url, lambda o, c: _append(heard, o, c), _nothing)
    await listener.start()
    try:
        assert listener.listening.is_set()

        def work(session: object) -> None:
            from sqlalchemy.orm import Session

            assert isinstance(session, Session)
            user = User(name="carol")
            session.add(user)
            session.flush()
            user.disabled = True  # a second flush of the same row: still one change
            session.flush()
            session.add(
                ApiToken(user_id=user.id, token_hash="ab" * 32, prefix="lg_x", scopes=["account"])
            )

        await asyncio.to_thread(db.transact, work)

        def doomed(session: object) -> None:
            from sqlalchemy.orm import Session

            assert isinstance(session, Session)
            session.add(
                RevokedSession(session_id="gone", user_id=1, expires_at=utcnow() + timedelta(1))
            )
            session.flush()
            raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError):
            await asyncio.to_thread(db.transact, doomed)

        def unwatched(session: object) -> None:
            from sqlalchemy.orm import Session

            assert isinstance(session, Session)
            token = session.scalar(select(ApiToken))
            assert token is not None
            token.last_used_at = utcnow()  # use, and sign-in, change nothing others keep
            token.user.last_login_at = utcnow()

        await asyncio.to_thread(db.transact, unwatched)
        user_id = await asyncio.to_thread(
            db.transact, lambda s: s.scalar(select(User.id).where(User.name == "carol"))
        )
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # nothing more comes
        changes = [change for who, batch in heard for change in batch]
        assert {who for who, _ in heard} == {origin}
        assert sorted(changes) == [("token", "ab" * 32), ("user", str(user_id))]
    finally:
        await listener.close()
        db.dispose()


@needs_postgres
async def test_a_foreign_notification_is_ignored_and_listening_goes_on(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(database_url)
    heard: list[tuple[str, list[Change]]] = []
    listener = ChangeListener(database_url, lambda o, c: _append(heard, o, c), _nothing)
    await listener.start()
    try:
        for payload in ("not json", '{"o": "x", "c": [["instance", "abc"]]}'):
            await asyncio.to_thread(
                db.transact,
                lambda s, p=payload: s.execute(select(func.pg_notify(CHANNEL, p))),
            )
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.02)
        assert heard == [("x", [("instance", "abc")])]
        assert "ignored a notification" in caplog.text
        assert listener.connects == 1
    finally:
        await listener.close()
        db.dispose()


async def _append(
    heard: list[tuple[str, list[Change]]], origin: str, changes: list[Change]
) -> None:
    heard.append((origin, changes))


async def _nothing() -> None:
    pass


def test_payload_is_json_naming_its_origin() -> None:
    (payload,) = encode("me", [("instance", "abc")])
    assert json.loads(payload) == {"o": "me", "c": [["instance", "abc"]]}
