"""The database: models, engine and session handling, Alembic migrations."""

# Batch runs' tables are in a module of their own; importing it here puts them
# on the models' metadata wherever the database is used (migrations included).
from labgate.db import runs as runs
