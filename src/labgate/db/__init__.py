"""The database: models, engine and session handling, Alembic migrations."""
