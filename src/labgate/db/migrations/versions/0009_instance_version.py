"""instances.version: a row version, so that a state change made from a stale read fails

Revision ID: 0009_instance_version
Revises: 0001
Create Date: 2026-12-03

A branch of its own off 0001, like 0002-0008; ``migrate()`` upgrades every
head. SQLAlchemy adds ``WHERE version = <read>`` to every update of an
instance and bumps it; an update from an older read matches no row and its
transaction runs again (``Database.transact``). Without it a site's late
"starting" report could overwrite a user's stop made in between.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_instance_version"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "instances", sa.Column("version", sa.Integer(), nullable=False, server_default="1")
    )


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("version")
