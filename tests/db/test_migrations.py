"""Migrations build the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import json

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from labgate.db.models import Base
from labgate.db.session import Database


def test_migrations_match_models_and_rerun_cleanly(empty_database_url):
    db = Database(empty_database_url)
    try:
        db.migrate()
        db.migrate()  # applied on every start: a second run is a no-op
        with db.engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diffs == []
    finally:
        db.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        db.migrate()
        with db.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        db.dispose()


def test_timestamps_come_back_timezone_aware(database_url):
    from labgate.db.models import User

    db = Database(database_url)
    try:
        db.migrate()
        with db.session() as session:
            session.add(User(name="tz", password_hash="x"))
        with db.session() as session:
            user = session.query(User).filter_by(name="tz").one()
            assert user.created_at.tzinfo is not None
    finally:
        db.dispose()


def test_tokens_lose_the_router_scope_on_upgrade(empty_database_url):
    from alembic import command

    from labgate.db.session import alembic_config

    db = Database(empty_database_url)
    try:
        command.upgrade(alembic_config(db.engine), "0001")
        with db.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO users (id, name, password_hash, is_admin, disabled, created_at,"
                    " sessions_valid_after) VALUES (1, 'old', 'x', false, false,"
                    " CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO api_tokens (id, user_id, token_hash, prefix, note, scopes,"
                    " created_at) VALUES (1, 1, 'h', 'lg_x', '',"
                    ' \'["account", "router"]\', CURRENT_TIMESTAMP)'
                )
            )
        db.migrate()
        with db.engine.connect() as conn:
            scopes = conn.execute(text("SELECT scopes FROM api_tokens WHERE id = 1")).scalar()
        assert (json.loads(scopes) if isinstance(scopes, str) else scopes) == ["account"]
    finally:
        db.dispose()


def test_user_ids_are_never_reused_and_the_upgrade_keeps_what_refers_to_users(
    empty_database_url,
):
    """0013 rebuilds users on SQLite (AUTOINCREMENT): no row that refers to a user is lost."""
    from alembic import command

    from labgate.db.session import alembic_config

    db = Database(empty_database_url)
    try:
        command.upgrade(alembic_config(db.engine), "0005_data_provider")
        with db.engine.begin() as conn:
            for name in ("ada", "bo"):
                conn.execute(
                    text(
                        "INSERT INTO users (name, password_hash, is_admin, disabled, created_at,"
                        " sessions_valid_after) VALUES (:name, 'x', false, false,"
                        " CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                    ),
                    {"name": name},
                )
            ids = dict(conn.execute(text("SELECT name, id FROM users")).all())
            conn.execute(
                text(
                    "INSERT INTO api_tokens (user_id, token_hash, prefix, note, scopes,"
                    " created_at) VALUES (:bo, 'h', 'lg_x', '', '[]', CURRENT_TIMESTAMP)"
                ),
                {"bo": ids["bo"]},
            )
        db.migrate()
        with db.engine.begin() as conn:
            # The rebuild deleted nothing by cascade, and the foreign key still holds.
            assert conn.execute(text("SELECT user_id FROM api_tokens")).scalars().all() == [
                ids["bo"]
            ]
            conn.execute(text("DELETE FROM users WHERE name = 'bo'"))
            assert conn.execute(text("SELECT count(*) FROM api_tokens")).scalar() == 0
            conn.execute(
                text(
                    "INSERT INTO users (name, password_hash, is_admin, data_provider, disabled,"
                    " created_at, sessions_valid_after) VALUES ('cy', 'x', false, false, false,"
                    " CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
            cy = conn.execute(text("SELECT id FROM users WHERE name = 'cy'")).scalar()
        assert cy > ids["bo"]  # bo's id is not handed on
        if db.engine.dialect.name == "sqlite":
            with db.engine.connect() as conn:
                assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        db.dispose()


def test_an_older_labgate_runs_on_a_schema_a_newer_one_upgraded(database_url, caplog):
    """A rolling upgrade: an N-1 replica restarting after an N replica migrated still starts."""
    from labgate.db.session import open_database

    db = Database(database_url)
    try:
        db.migrate()
        with db.engine.begin() as conn:
            conn.execute(text("INSERT INTO alembic_version (version_num) VALUES ('9999_future')"))
    finally:
        db.dispose()
    with caplog.at_level("WARNING", logger="labgate.db.session"):
        reopened = open_database(database_url)
    try:
        with reopened.engine.connect() as conn:
            versions = set(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
        assert "9999_future" in versions
        assert "0010" in {v[:4] for v in versions}
    finally:
        reopened.dispose()
    assert "newer than this labgate (revisions 9999_future" in caplog.text


def test_every_migration_only_adds_so_the_previous_version_runs_on_its_schema():
    """N-1 runs on N's schema: no upgrade drops, renames or alters, new columns have defaults."""
    import ast
    from pathlib import Path

    from labgate.db.session import MIGRATIONS_DIR

    for path in sorted(Path(MIGRATIONS_DIR, "versions").glob("*.py")):
        tree = ast.parse(path.read_text())
        upgrade = next(
            node
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name == "upgrade"
        )
        for node in ast.walk(upgrade):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            name = node.func.attr
            assert not name.startswith(("drop_", "rename")), f"{path.name}: {name}"
            assert name != "alter_column", f"{path.name}: alter_column"
            if name == "add_column":
                column = node.args[1]
                assert isinstance(column, ast.Call)
                words = {k.arg: k.value for k in column.keywords}
                nullable = words.get("nullable")
                not_null = isinstance(nullable, ast.Constant) and nullable.value is False
                assert not not_null or "server_default" in words, (
                    f"{path.name}: a NOT NULL column without a server default"
                )


def test_the_revisions_checked_without_alembic_are_those_of_a_migrated_database(
    empty_database_url,
):
    from labgate.db.session import SCHEMA_HEADS, applied_revisions

    db = Database(empty_database_url)
    try:
        assert applied_revisions(db.engine) == set()
        db.migrate()
        assert applied_revisions(db.engine) == SCHEMA_HEADS, (
            "a migration was added: set SCHEMA_HEADS in src/labgate/db/session.py to what "
            "alembic_version holds after migrating"
        )
    finally:
        db.dispose()


def test_a_start_on_an_up_to_date_database_does_not_load_alembic(tmp_path):
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'x.db'}"
    code = f"""
import sys
from labgate.db.session import open_database
open_database({url!r}).dispose()  # made and migrated: Alembic loaded
print("alembic" in sys.modules)
"""
    again = f"""
import sys
from labgate.db.session import open_database
open_database({url!r}).dispose()  # at the heads already
print("alembic" in sys.modules)
"""
    run = [sys.executable, "-c"]
    first = subprocess.run([*run, code], capture_output=True, text=True, check=True)
    second = subprocess.run([*run, again], capture_output=True, text=True, check=True)
    assert (first.stdout.strip(), second.stdout.strip()) == ("True", "False")
