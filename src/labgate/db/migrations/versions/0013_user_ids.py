"""users: ids are never given out again (SQLite AUTOINCREMENT)

Revision ID: 0013_user_ids
Revises: 0005_data_provider
Create Date: 2026-12-04

SQLite gives a new row the highest rowid plus one, so deleting the newest
user handed their id to the next account, and with it whatever still named
that id (an access list a router had not yet dropped, an old token). With
AUTOINCREMENT it never reuses an id. SQLite cannot add that to a table, so
the table is rebuilt (copied with its ids, dropped, renamed): the migration
environment turns foreign keys off while migrating, or dropping the old
table would delete, by cascade, every row that refers to a user
(labgate.db.migrations.env). PostgreSQL's sequences never go back: nothing
to do there. A portal of the version before runs on the rebuilt table.
"""

from __future__ import annotations

from alembic import op

revision = "0013_user_ids"
down_revision = "0005_data_provider"  # the rebuilt table keeps its data_provider column
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "users", recreate="always", table_kwargs={"sqlite_autoincrement": True}
    ):
        pass


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("users", recreate="always"):
        pass
