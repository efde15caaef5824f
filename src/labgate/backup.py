"""Backups of the portal's state, and restoring one (``labgate backup``, ``labgate restore``).

The portal's state is its database and the secret key: the key signs every
session and seals each instance's secret in the database, so a database
without its key restores accounts but not running instances' secrets, and
ends every session. A backup is a directory (0700, its files 0600):

- ``labgate.db``: SQLite, copied with SQLite's online backup (consistent
  while the portal writes), made one self-contained file (no WAL) and
  checked (``PRAGMA quick_check``); or ``labgate.pgdump``: PostgreSQL, a
  ``pg_dump`` custom-format archive (consistent, taken in one snapshot);
- ``secret_key``: the key file of the data dir, unless the key is the
  ``secret_key`` setting (then the operator keeps it, and the manifest says so);
- ``manifest.json``, written last: format, labgate version, when, the
  database's kind and schema revisions, each file's size and SHA-256, and
  what the backup leaves out (users' workspaces, snapshot archives: the
  operator's file backups keep those).

A restore checks everything before it changes anything: the manifest and
every checksum, that the database kind is the configured one, that this
labgate knows every schema revision of the backup (an older backup is
migrated forward after the restore; a newer one is refused), that nothing
answers on labgate's port (a running portal would keep writing), and that a
key kept as a setting is the backup's. A database or a different key file
already in place is replaced only with ``force``, and is saved first, as a
backup of its own, in ``<data_dir>/before-restore-<time>``: a restore never
loses data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import inspect, text
from sqlalchemy.engine import URL, Connection, make_url

from labgate import __version__
from labgate.config import Settings
from labgate.datadir import KEY_FILE, check_key, prepare_data_dir
from labgate.db.session import (
    MIGRATIONS_DIR,
    applied_revisions,
    first_line,
    make_engine,
    open_database,
    shown_url,
)

#: Written last: a directory without it is not a (complete) backup.
MANIFEST = "manifest.json"
#: The manifest's format; a restore refuses others.
FORMAT = 1
SQLITE_FILE = "labgate.db"
POSTGRES_FILE = "labgate.pgdump"
#: Where a restore saves what it replaces: ``<data_dir>/before-restore-<time>``.
SAVED_PREFIX = "before-restore-"
#: The backups ``labgate backup --keep`` writes and prunes: ``labgate-<UTC time>[.n]``.
ROTATED = re.compile(r"labgate-\d{8}-\d{6}(\.\d+)?")
_CHUNK = 1024 * 1024
T = TypeVar("T")
#: Where a backup's secret key is: in it (the data dir's key file), a setting (not in
#: it: the operator keeps it), or nowhere yet (a portal that never started).
KEY_KEPT, KEY_SETTING, KEY_NONE = "file", "setting", "none"


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why and what to do."""


@dataclass
class BackupReport:
    """What :func:`backup` saved, and what it left to the operator."""

    path: Path
    database: str  # "sqlite" or "postgresql"
    size: int  # bytes of the database file or archive
    revisions: list[str]
    secret_key: str  # "file" (in the backup), "setting" (not in it) or "none"
    left_out: list[str] = field(default_factory=list)


@dataclass
class RestoreReport:
    """What :func:`restore` put in place."""

    source: Path
    database: str
    revisions: list[str]  # the schema now, after migrating the backup's forward
    users: int
    secret_key: str  # as in the manifest
    saved: Path | None  # where what was replaced went (None: nothing was)
    left_out: list[str] = field(default_factory=list)


# --------------------------------------------------------------------- backup
def backup(settings: Settings, dest: Path) -> BackupReport:
    """Save the portal's database and secret key in ``dest`` (new, or an empty directory).

    A backup that fails half-way leaves nothing behind: what it wrote is
    removed, and ``dest`` too when it made it.
    """
    url = make_url(settings.effective_database_url)
    kind = _kind(url)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} exists and is not an empty directory: name a new one")
    made = not dest.exists()
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        dest.chmod(0o700)
        return _write_backup(settings, url, kind, dest)
    except BaseException:
        for path in dest.iterdir():
            path.unlink()
        if made:
            dest.rmdir()
        raise


def backup_rotating(settings: Settings, parent: Path, keep: int) -> tuple[BackupReport, list[Path]]:
    """A backup in ``parent/labgate-<UTC time>``, then all but the newest ``keep`` deleted.

    Only complete backups of that name are counted and deleted (those with a
    manifest); anything else in ``parent`` is left alone. Returns the new
    backup's report and the backups deleted.
    """
    if keep < 1:
        raise BackupError("--keep must be at least 1")
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = time.strftime("labgate-%Y%m%d-%H%M%S", time.gmtime())
    dest, n = parent / stamp, 0
    while dest.exists():
        n += 1
        dest = parent / f"{stamp}.{n}"
    report = backup(settings, dest)
    complete = sorted(
        (path for path in parent.iterdir() if ROTATED.fullmatch(path.name)),
        key=lambda path: (path.name.partition(".")[0], int(path.name.partition(".")[2] or 0)),
    )
    complete = [path for path in complete if (path / MANIFEST).is_file()]
    pruned = complete[:-keep]
    for path in pruned:
        shutil.rmtree(path)
    return report, pruned


def _write_backup(settings: Settings, url: URL, kind: str, dest: Path) -> BackupReport:
    if kind == "sqlite":
        name = SQLITE_FILE
        _backup_sqlite(_sqlite_path(url), dest / name)
        revisions = _sqlite_revisions(dest / name)
    else:
        name = POSTGRES_FILE
        revisions = _postgres_revisions(url)
        _run_client(
            "pg_dump",
            ["--format=custom", "--no-owner", "--no-privileges", "--file", str(dest / name)],
            url,
            new_file=dest / name,
        )
    files = [name]
    key = _key_source(settings)
    if key == KEY_KEPT:
        _write_private(dest / KEY_FILE, (settings.data_dir / KEY_FILE).read_bytes())
        files.append(KEY_FILE)
    left_out = _left_out(settings, key)
    manifest = {
        "format": FORMAT,
        "labgate": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "database": {"kind": kind, "file": name, "revisions": revisions},
        "secret_key": key,
        "files": {
            f: {"size": (dest / f).stat().st_size, "sha256": _sha256(dest / f)} for f in files
        },
        "left_out": left_out,
    }
    _write_private(dest / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return BackupReport(dest, kind, (dest / name).stat().st_size, revisions, key, left_out)


def _backup_sqlite(source: Path, target: Path) -> None:
    """SQLite's online backup of ``source`` into ``target``, one file, checked."""
    if not source.is_file():
        raise BackupError(f"there is no database at {source}: nothing to back up")
    _write_private(target, b"")
    try:
        with (
            contextlib.closing(sqlite3.connect(source, timeout=30)) as live,
            contextlib.closing(sqlite3.connect(target)) as copy,
        ):
            live.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")  # the copy needs no -wal beside it
            checked = copy.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"cannot back up the database {source}: {exc}") from None
    if checked != "ok":
        raise BackupError(f"the database {source} is damaged ({checked}): nothing was backed up")


def _sqlite_revisions(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        try:
            return sorted(row[0] for row in db.execute("SELECT version_num FROM alembic_version"))
        except sqlite3.OperationalError:  # no schema yet
            return []


def _postgres_revisions(url: URL) -> list[str]:
    """The schema revisions the database is at (none: no schema yet)."""

    def read(conn: Connection) -> list[str]:
        if not inspect(conn).has_table("alembic_version"):
            return []
        return sorted(conn.scalars(text("SELECT version_num FROM alembic_version")))

    return _on_postgres(url, read)


def _postgres_tables(url: URL) -> list[str]:
    """The tables of the database's ``public`` schema (a restore empties it)."""
    return _on_postgres(url, lambda conn: list(inspect(conn).get_table_names("public")))


def _on_postgres(url: URL, read: Callable[[Connection], T], doing: str = "read") -> T:
    """``read`` in a transaction on the database, committed; a failure is one line."""
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        with engine.begin() as conn:
            return read(conn)
    except Exception as exc:  # any driver error: one line for the operator
        raise BackupError(
            f"cannot {doing} the database at {_shown(url)}: {first_line(exc)}"
        ) from None
    finally:
        engine.dispose()


def _shown(url: URL) -> str:
    return shown_url(url.render_as_string(hide_password=False))


def _key_source(settings: Settings) -> str:
    if settings.secret_key.get_secret_value():
        return KEY_SETTING
    return KEY_KEPT if (settings.data_dir / KEY_FILE).is_file() else KEY_NONE


def _left_out(settings: Settings, key: str) -> list[str]:
    """What a backup does not hold and the operator's own backups must."""
    out = []
    if key == KEY_SETTING:
        out.append("the secret key: it is the secret_key setting; keep it with this backup")
    if settings.workspaces_dir.is_dir():
        out.append(f"users' workspaces of the local site: {settings.workspaces_dir}")
    if settings.snapshots_dir.is_dir():
        out.append(f"snapshot archives: {settings.snapshots_dir}")
    if settings.snapshot_registry:
        out.append(f"container snapshots: in the registry {settings.snapshot_registry}")
    out.append("network sites' workspaces and group volumes: on the sites' machines")
    out.append("the settings (labgate.toml, LABGATE_* environment)")
    return out


# -------------------------------------------------------------------- restore
def read_manifest(source: Path) -> dict[str, Any]:
    """The manifest of the backup in ``source``, once every file matches its checksum."""
    try:
        manifest = json.loads((source / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(
            f"{source} holds no {MANIFEST}: not a labgate backup, or one that did not finish"
        ) from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"cannot read {source / MANIFEST}: {exc}") from None
    try:
        if manifest["format"] != FORMAT:
            raise BackupError(
                f"the backup in {source} has format {manifest['format']!r}; this labgate "
                f"reads format {FORMAT}"
            )
        database, files = manifest["database"], manifest["files"]
        kind, name, revisions = database["kind"], database["file"], database["revisions"]
        checks = {f: (int(v["size"]), str(v["sha256"])) for f, v in files.items()}
        if kind not in ("sqlite", "postgresql") or name not in checks:
            raise ValueError(kind)
        lists = (revisions, manifest.get("left_out", []))
        if not all(isinstance(x, list) and all(isinstance(i, str) for i in x) for x in lists):
            raise ValueError(revisions)
        if manifest["secret_key"] not in (KEY_KEPT, KEY_SETTING, KEY_NONE):
            raise ValueError(manifest["secret_key"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise BackupError(f"{source / MANIFEST} is not a labgate backup manifest") from None
    for name, (size, digest) in checks.items():
        path = source / name
        if "/" in name or not path.is_file():
            raise BackupError(f"the backup in {source} is missing {name}")
        if path.stat().st_size != size or _sha256(path) != digest:
            raise BackupError(
                f"the backup in {source} is damaged: {name} does not match its checksum"
            )
    if manifest["secret_key"] == KEY_KEPT and KEY_FILE not in checks:
        raise BackupError(f"the backup in {source} is missing {KEY_FILE}")
    return dict(manifest)


def check_backup(source: Path) -> dict[str, Any]:
    """Check the backup in ``source`` without changing anything; its manifest.

    Every file against its checksum, the schema revisions against this
    labgate's (a newer backup cannot be restored here), the key's strength,
    and the database itself: SQLite's ``PRAGMA integrity_check`` on the
    file (opened read-only), or ``pg_restore --list`` reading the archive's
    table of contents.
    """
    manifest = read_manifest(source)
    database = manifest["database"]
    unknown = sorted(set(database["revisions"]) - _known_revisions())
    if unknown:
        raise BackupError(
            f"the backup was made by a newer labgate (schema revisions {', '.join(unknown)}): "
            f"restore it with labgate {manifest.get('labgate', '?')} or newer"
        )
    if manifest["secret_key"] == KEY_KEPT:
        check_key((source / KEY_FILE).read_text().strip(), f"the backup's {KEY_FILE}")
    path = source / database["file"]
    if database["kind"] == "sqlite":
        try:
            with contextlib.closing(sqlite3.connect(_read_only(path), uri=True)) as db:
                checked = db.execute("PRAGMA integrity_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            checked = str(exc)
        if checked != "ok":
            raise BackupError(f"the backup's database {path} is damaged ({checked})")
    else:
        _run_tool("pg_restore", ["--list", str(path)])
    return manifest


def restore(settings: Settings, source: Path, *, force: bool = False) -> RestoreReport:
    """Put the backup in ``source`` in place of the configured database and key file."""
    manifest = check_backup(source)
    url = make_url(settings.effective_database_url)
    kind = _kind(url)
    database = manifest["database"]
    if database["kind"] != kind:
        raise BackupError(
            f"the backup holds a {database['kind']} database and labgate is set up for "
            f"{kind} (database_url): restore it into a {database['kind']} database"
        )
    kept = manifest["secret_key"] == KEY_KEPT
    backup_key = (source / KEY_FILE).read_text().strip() if kept else ""
    configured = settings.secret_key.get_secret_value()
    if manifest["secret_key"] == KEY_SETTING and not configured:
        raise BackupError(
            "the backup's secret key was the secret_key setting, and none is set here: set "
            "secret_key to that key first (instance secrets are sealed with it)"
        )
    if backup_key and configured and configured != backup_key:
        raise BackupError(
            "the backup's secret key differs from the secret_key setting: set secret_key to "
            f"the key in {source / KEY_FILE} first (instance secrets are sealed with it)"
        )
    if kind == "postgresql":
        for tool in ("pg_restore", "pg_dump"):
            if shutil.which(tool) is None:
                raise BackupError(_missing_client(tool))
    _refuse_while_running(settings)
    replaced = _in_place(settings, url, backup_key)
    if replaced and not force:
        raise BackupError(
            f"{' and '.join(replaced)} would be replaced: run again with --force to replace "
            f"them (they are saved first in {settings.data_dir}/{SAVED_PREFIX}<time>)"
        )
    saved = _save_aside(settings, url, replaced) if replaced else None
    prepare_data_dir(settings.data_dir)
    if kind == "sqlite":
        _restore_sqlite(source / database["file"], _sqlite_path(url))
    else:
        _restore_postgres(source / database["file"], url, saved)
    if backup_key:
        _write_key(settings.data_dir / KEY_FILE, backup_key)
    db = open_database(url.render_as_string(hide_password=False))  # migrates an older schema
    try:
        revisions = sorted(applied_revisions(db.engine))
        with db.engine.connect() as conn:
            users = int(conn.scalar(text("SELECT count(*) FROM users")) or 0)
    finally:
        db.dispose()
    return RestoreReport(
        source,
        kind,
        revisions,
        users,
        manifest["secret_key"],
        saved,
        list(manifest.get("left_out", [])),
    )


def _known_revisions() -> set[str]:
    """Every schema revision this labgate's migrations name."""
    from alembic.script import ScriptDirectory

    return {script.revision for script in ScriptDirectory(str(MIGRATIONS_DIR)).walk_revisions()}


def _refuse_while_running(settings: Settings) -> None:
    """Refuse when something answers on labgate's port: a running portal keeps writing."""
    host = "127.0.0.1" if settings.host in ("", "0.0.0.0") else settings.host
    host = "::1" if host == "::" else host
    with contextlib.suppress(OSError), socket.create_connection((host, settings.port), timeout=1):
        raise BackupError(
            f"something answers on {host}:{settings.port}, labgate's port: stop labgate "
            "(every portal on this database) before a restore"
        )


def _in_place(settings: Settings, url: URL, backup_key: str) -> list[str]:
    """What a restore would replace: a database with a schema, a different key file."""
    replaced = []
    if _kind(url) == "sqlite":
        path = _sqlite_path(url)
        if path.is_file() and path.stat().st_size and _sqlite_revisions_or_damaged(path):
            replaced.append(f"the database {path}")
    elif _postgres_tables(url):
        replaced.append(f"the database at {_shown(url)}")
    key = settings.data_dir / KEY_FILE
    if backup_key and key.is_file() and key.read_text().strip() != backup_key:
        replaced.append(f"the secret key {key}")
    return replaced


def _sqlite_revisions_or_damaged(path: Path) -> bool:
    """Whether the file holds a schema, or is something a restore must not silently drop."""
    try:
        return bool(_sqlite_revisions(path)) or _has_tables(path)
    except sqlite3.DatabaseError:
        return True  # not a database: replaced only with --force, and kept


def _has_tables(path: Path) -> bool:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return bool(db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0)


def _save_aside(settings: Settings, url: URL, replaced: list[str]) -> Path:
    """Save what a restore replaces in ``<data_dir>/before-restore-<time>``; its path."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = settings.data_dir / f"{SAVED_PREFIX}{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = settings.data_dir / f"{SAVED_PREFIX}{stamp}-{n}"
    key = settings.data_dir / KEY_FILE
    if any(item.startswith("the database") for item in replaced):
        if _kind(url) == "sqlite":
            # Moved, not copied: a damaged file cannot be copied by SQLite's backup, and
            # the -wal beside it belongs to it.
            dest.mkdir(mode=0o700, parents=True)
            path = _sqlite_path(url)
            for part in _sqlite_parts(path):
                if part.exists():  # the database may be on another file system
                    shutil.move(part, dest / part.name)
            if key.is_file():
                _write_private(dest / KEY_FILE, key.read_bytes())
        else:
            backup(settings, dest)
    else:
        dest.mkdir(mode=0o700, parents=True)
        _write_private(dest / KEY_FILE, key.read_bytes())
    return dest


def _restore_sqlite(source: Path, target: Path) -> None:
    """Copy the backup's database into place: a new file renamed over the old one."""
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.restoring-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    _write_private(temporary, b"")
    try:
        with (
            contextlib.closing(sqlite3.connect(_read_only(source), uri=True)) as backed,
            contextlib.closing(sqlite3.connect(temporary)) as copy,
        ):
            backed.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")
        # A -wal left beside the target belongs to the old file: SQLite would apply it to
        # the new one.
        for part in _sqlite_parts(target)[1:]:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        os.replace(temporary, target)
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"cannot restore {source}: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _restore_postgres(archive: Path, url: URL, saved: Path | None) -> None:
    """Empty the database's ``public`` schema, then ``pg_restore`` the archive into it."""

    def empty(conn: Connection) -> None:
        conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))

    _on_postgres(url, empty, "empty")
    try:
        _run_client(
            "pg_restore",
            [
                "--no-owner",
                "--no-privileges",
                "--single-transaction",
                "--exit-on-error",
                str(archive),
            ],
            url,
        )
    except BackupError as exc:
        where = f"; what was there is saved in {saved}" if saved else ""
        raise BackupError(f"{exc}{where}") from None


# -------------------------------------------------------------------- helpers
def _kind(url: URL) -> str:
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise BackupError(f"labgate backs up sqlite and postgresql databases, not {backend}")
    if backend == "sqlite" and (not url.database or url.database == ":memory:"):
        raise BackupError("the database is in memory: there is nothing on disk to back up")
    return backend


def _sqlite_path(url: URL) -> Path:
    return Path(str(url.database)).resolve()


def _read_only(path: Path) -> str:
    """The URI that opens the SQLite file ``path`` read-only (any character in its name)."""
    return path.resolve().as_uri() + "?mode=ro"


def _sqlite_parts(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def _missing_client(tool: str) -> str:
    return (
        f"{tool} is not installed: install PostgreSQL's client programs "
        "(apt-get install postgresql-client), of the server's major version or newer"
    )


def _run_client(tool: str, args: list[str], url: URL, new_file: Path | None = None) -> None:
    """Run a PostgreSQL client program on ``url``; its password goes in the environment."""
    if new_file is not None:
        _write_private(new_file, b"")  # the tool truncates it and keeps the mode
    dsn = url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    env = {"PGPASSWORD": str(url.password)} if url.password is not None else {}
    _run_tool(tool, [*args, "--dbname", dsn], env)


def _run_tool(tool: str, args: list[str], env: dict[str, str] | None = None) -> None:
    """Run one of PostgreSQL's client programs; its failure is one line."""
    if shutil.which(tool) is None:
        raise BackupError(_missing_client(tool))
    done = subprocess.run(  # a fixed program, no shell
        [tool, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise BackupError(f"{tool} failed: {lines[0] if lines else f'exit {done.returncode}'}")


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (0600), through a temporary file renamed into place."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _write_key(path: Path, key: str) -> None:
    _write_private(path, (key + "\n").encode())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
