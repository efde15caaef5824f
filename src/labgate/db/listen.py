"""Hearing other portal processes' row changes: a dedicated PostgreSQL LISTEN connection.

:class:`ChangeListener` keeps one autocommit psycopg connection of its own
(not from the pool: a pooled connection is handed to others between uses)
that LISTENs on :data:`~labgate.db.changes.CHANNEL`, and hands each
notification's changes to a callback (and the payloads of any other channels
it is given to theirs). The server is asked ``SELECT 1`` after
every ``keepalive`` seconds of silence, so a dead connection is noticed.
When the connection is lost it reconnects with capped exponential backoff;
notifications sent meanwhile are lost, so after every connect (the first
included: changes made before it were never heard) ``on_connect`` runs, and
the caller reloads what it keeps from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

from sqlalchemy.engine import make_url

from labgate.aio import cancel_and_wait
from labgate.db.changes import CHANNEL, Change, decode

log = logging.getLogger(__name__)

#: How the listening connection shows in ``pg_stat_activity``.
APPLICATION_NAME = "labgate-listen"

#: What a listener does with the changes of one notification: (origin, changes).
ChangeHandler = Callable[[str, list[Change]], Awaitable[None]]
#: What a listener does with a notification on another channel: its payload.
PayloadHandler = Callable[[str], Awaitable[None]]


def libpq_url(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL (``postgresql+psycopg://…``) as libpq takes it."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"not a PostgreSQL URL: {parsed.render_as_string(hide_password=True)}")
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeListener:
    """Follows the change channel of one PostgreSQL database until closed."""

    def __init__(
        self,
        url: str,
        on_changes: ChangeHandler,
        on_connect: Callable[[], Awaitable[None]],
        *,
        channels: dict[str, PayloadHandler] | None = None,
        keepalive: float = 10.0,
        min_backoff: float = 0.2,
        max_backoff: float = 5.0,
    ) -> None:
        self.conninfo = libpq_url(url)
        self.on_changes = on_changes
        self.on_connect = on_connect
        #: More channels listened to on the same connection, each with its handler.
        self.channels = dict(channels or {})
        self.keepalive = keepalive
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        #: Set while LISTEN is in place (and ``on_connect`` has run).
        self.listening = asyncio.Event()
        #: How many times LISTEN was put in place (1 + reconnects).
        self.connects = 0
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None

    async def start(self, wait: float = 5.0) -> None:
        """Start listening; wait up to ``wait`` seconds for the first LISTEN."""
        self._task = asyncio.create_task(self._run(), name="labgate-change-listener")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self.listening.wait()
        if not self.listening.is_set():
            log.warning("not yet listening for other portals' changes: %s", self.last_error)

    async def close(self) -> None:
        """Stop listening and close the connection."""
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        import psycopg

        backoff = self.min_backoff
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as problem:
                self.last_error = f"{type(problem).__name__}: {problem}".strip()
            except Exception as problem:  # a callback's failure must not end the listening
                log.exception("change channel: a handler failed")
                self.last_error = f"{type(problem).__name__}: {problem}".strip()
            if self.listening.is_set():
                backoff = self.min_backoff
                log.warning("change channel lost (%s); listening again", self.last_error)
            self.listening.clear()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(self.max_backoff, backoff * 2)

    async def _follow(self) -> None:
        from psycopg import AsyncConnection

        async with await AsyncConnection.connect(
            self.conninfo, autocommit=True, application_name=APPLICATION_NAME
        ) as conn:
            for channel in (CHANNEL, *self.channels):
                await conn.execute(f"LISTEN {channel}")
            self.connects += 1
            await self.on_connect()
            self.listening.set()
            while True:
                async for note in conn.notifies(timeout=self.keepalive):
                    handler = self.channels.get(note.channel)
                    if handler is not None:
                        await handler(note.payload)
                        continue
                    try:
                        origin, changes = decode(note.payload)
                    except ValueError as problem:
                        log.warning("ignored a notification on %s: %s", CHANNEL, problem)
                        continue
                    await self.on_changes(origin, changes)
                await conn.execute("SELECT 1")
