"""Alembic environment: runs migrations on the engine labgate hands over.

On SQLite, foreign keys are off while migrating: batch mode rebuilds a table
by copying it, dropping the old one and renaming the copy, and dropping a
table with foreign keys on deletes every row that refers to it (``ON DELETE
CASCADE``) or fails. The rows are checked against their foreign keys before
the migration commits, and foreign keys are back on after.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, Engine, create_engine

from labgate.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    """Run migrations online, on labgate's engine (or a URL for `alembic` itself)."""
    engine: Engine | None = config.attributes.get("engine")
    if engine is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite://")
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:
            # Before the transaction: SQLite ignores this pragma inside one.
            _foreign_keys(connection, on=False)
        try:
            with connection.begin():
                context.configure(
                    connection=connection,
                    target_metadata=target_metadata,
                    render_as_batch=sqlite,
                )
                with context.begin_transaction():
                    context.run_migrations()
                if sqlite:
                    _check_foreign_keys(connection)
        finally:
            if sqlite:
                _foreign_keys(connection, on=True)


def _foreign_keys(connection: Connection, *, on: bool) -> None:
    connection.exec_driver_sql(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    connection.commit()


def _check_foreign_keys(connection: Connection) -> None:
    """Refuse (roll back) a migration that left a row referring to nothing."""
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        tables = sorted({str(row[0]) for row in broken})
        raise RuntimeError(
            f"migrating left {len(broken)} rows whose foreign keys point nowhere "
            f"(tables: {', '.join(tables)}); the migration is rolled back"
        )


run_migrations()
