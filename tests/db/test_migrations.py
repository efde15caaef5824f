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
