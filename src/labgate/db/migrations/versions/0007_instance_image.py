"""instances: the image a launch chose from its tool's allowlist

Revision ID: 0007_instance_image
Revises: 0001
Create Date: 2026-12-02

A branch of its own off 0001, like 0002-0006; ``migrate()`` upgrades every
head. An empty image means the tool's own.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_instance_image"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "instances",
        sa.Column("image", sa.String(length=512), nullable=False, server_default=""),
    )


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("image")
