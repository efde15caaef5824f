"""Alembic environment: runs migrations on the engine labgate hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine, create_engine

from labgate.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    """Run migrations online, on labgate's engine (or a URL for `alembic` itself)."""
    engine: Engine | None = config.attributes.get("engine")
    if engine is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite://")
    with engine.begin() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()


run_migrations()
