"""Engine and session creation, and migrations applied on start.

SQLite runs in WAL mode with a busy timeout so the portal's threads and the
CLI can share one file; PostgreSQL is used as is through a URL setting.
:func:`open_database` is how a server opens it: a URL that does not parse,
an unknown dialect, a missing driver, a server that does not answer or a
file that is not a database become one :class:`~labgate.errors.ConfigError`.
The SQLite file is created 0600 (in a directory created 0700) before SQLite
opens it: SQLite gives its ``-wal`` and ``-shm`` files the database file's
mode, so all three stay the server user's alone.

:meth:`Database.transact` runs a function in a transaction and runs it again
when a versioned row it changed (an instance: its ``version`` column) was
changed by another transaction after it read it: no state change is lost to
a concurrent one (a stop racing a site's report, say).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from labgate.errors import ConfigError

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How many times :meth:`Database.transact` runs a function whose writes met a newer row.
TRANSACT_ATTEMPTS = 8

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
#: What a database migrated to every head records in ``alembic_version`` (the heads,
#: but for ``0004``: ``0007_identity_sharing`` depends on it). A database at exactly
#: these needs no migrating, and is found so without loading Alembic (a quarter of a
#: second of every start); ``tests/db/test_migrations.py`` holds this to the scripts.
SCHEMA_HEADS = frozenset(
    {
        "0002",
        "0003",
        "0005_no_router_scope",
        "0007_identity_sharing",
        "0007_instance_image",
        "0007_launch_options",
        "0008_tool_params",
        "0009_instance_version",
        "0010_leader_lease",
        "0011_run_indexes",
        "0012_tunnel_routers",
        "0013_user_ids",
        "0014_pool_uids",
        "0015_oauth_grants",
    }
)
_SETTING = "database_url (LABGATE_DATABASE_URL)"
_PASSWORD_IN_URL = re.compile(r"(://[^:/@]*):[^@/]*@")


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            private_sqlite_file(Path(parsed.database))
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def private_sqlite_file(path: Path) -> None:
    """Create the SQLite file 0600 if missing; take group and other access off an old one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(part.stat().st_mode)
            if mode & 0o077:
                part.chmod(mode & 0o700)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def alembic_config(engine: Engine) -> AlembicConfig:
    """An Alembic configuration bound to ``engine``."""
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema up to the newest migrations (every branch head).

    A database that a newer labgate has already upgraded (it names revisions
    this one does not know: an older portal replica restarting in the middle
    of a rolling upgrade) is left as it is, with a warning: migrations only
    add (tables, indexes, columns with defaults), so the older code runs on
    the newer schema. Migrating it would fail on the unknown revisions.
    A database already at :data:`SCHEMA_HEADS` is left without loading Alembic.
    """
    applied = applied_revisions(engine)
    if applied == SCHEMA_HEADS:
        return
    from alembic import command
    from alembic.script import ScriptDirectory

    config = alembic_config(engine)
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    newer = sorted(applied - known)
    if newer:
        log.warning(
            "the database schema is newer than this labgate (revisions %s of a newer "
            "version): running on it without migrating; upgrade labgate here",
            ", ".join(newer),
        )
        return
    command.upgrade(config, "heads")


def applied_revisions(engine: Engine) -> set[str]:
    """The revisions the database is at (none when it has no schema yet), read without Alembic."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return set()
        return set(conn.scalars(text("SELECT version_num FROM alembic_version")))


class Database:
    """The engine and a session factory for one database URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Apply pending migrations."""
        migrate(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed on success and rolled back on error."""
        with self.sessionmaker() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def transact(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in a committed session; from the start again if it lost a race.

        A versioned row that another transaction changed between ``fn``'s read
        and its write makes the write fail (:class:`StaleDataError`) and roll
        back; ``fn`` then runs again on what is there now. ``fn`` must change
        nothing but the database.
        """
        attempt = 1
        while True:
            try:
                with self.session() as session:
                    return fn(session)
            except StaleDataError:
                if attempt >= TRANSACT_ATTEMPTS:
                    raise
                log.debug("a concurrent change came first; transaction run again (%d)", attempt)
                attempt += 1

    async def run(self, fn: Callable[[Session], T]) -> T:
        """:meth:`transact` on a worker thread."""
        return await asyncio.to_thread(self.transact, fn)

    def dispose(self) -> None:
        """Close all pooled connections."""
        self.engine.dispose()


def shown_url(url: str) -> str:
    """``url`` fit for a log or an error line: the password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return _PASSWORD_IN_URL.sub(r"\1:***@", url)


def first_line(exc: BaseException) -> str:
    """A driver's message, first line, without SQLAlchemy's background link."""
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return lines[0] if lines else exc.__class__.__name__


def open_database(url: str) -> Database:
    """Connect to ``url`` and migrate it, or raise a :class:`ConfigError` saying why not."""
    shown = shown_url(url)
    try:
        db = Database(url)
    except NoSuchModuleError:  # before ArgumentError, its base class
        dialect = make_url(url).drivername
        raise ConfigError(
            f"{_SETTING}: unknown database kind {dialect!r} in {shown!r} "
            "(labgate runs on sqlite and postgresql+psycopg)"
        ) from None
    except ArgumentError:
        raise ConfigError(
            f"{_SETTING}: cannot parse {shown!r} as a database URL "
            "(expected e.g. postgresql+psycopg://user:pass@host/db, or empty for SQLite)"
        ) from None
    except ImportError as exc:
        dialect = make_url(url).drivername
        raise ConfigError(
            f"{_SETTING}: the driver of {dialect!r} is not installed ({exc}); for "
            "PostgreSQL install labgate's postgres extra: pip install 'labgate[postgres]'"
        ) from None
    except OSError as exc:  # SQLite: the file's directory cannot be made
        raise ConfigError(f"{_SETTING}: cannot create the database in {shown}: {exc}") from None
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        db.dispose()
        raise ConfigError(_unusable(db, shown, exc)) from None
    try:
        db.migrate()
    except DBAPIError as exc:
        db.dispose()
        raise ConfigError(_unusable(db, shown, exc, migrating=True)) from None
    return db


def _unusable(db: Database, shown: str, exc: DBAPIError, *, migrating: bool = False) -> str:
    """Why a database that was found cannot be used, in one sentence."""
    reason = first_line(exc)
    if db.engine.dialect.name == "sqlite":
        path = db.engine.url.database
        if "not a database" in reason or "malformed" in reason:
            return (
                f"the database file {path} is damaged or not a SQLite database ({reason}); "
                "restore it from a backup, or move it away to start afresh"
            )
        return f"cannot use the database file {path}: {reason}"
    if migrating:
        return f"cannot update the database schema at {shown}: {reason}"
    return (
        f"cannot connect to the database at {shown}: {reason} "
        f"(is the server running? check {_SETTING})"
    )
