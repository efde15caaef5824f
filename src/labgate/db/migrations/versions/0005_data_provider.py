"""users.data_provider: the admin-granted role that may register datasets

Revision ID: 0005_data_provider
Revises: 0001
Create Date: 2026-12-02

A branch of its own off 0001, like 0004; ``migrate()`` upgrades every head.
Existing users get ``false``: datasets already registered keep their owners,
who may still change and delete them, but registering a new one needs the role.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_data_provider"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "users",
        sa.Column("data_provider", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("data_provider")
