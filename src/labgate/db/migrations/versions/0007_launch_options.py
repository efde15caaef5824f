"""instances.options: what a user chose among their site's allowed values at launch

Revision ID: 0007_launch_options
Revises: 0001
Create Date: 2026-12-02

A branch of its own off 0001, like 0004 and 0005; ``migrate()`` upgrades every
head. A Slurm site lets users choose a partition, wall time, GRES... among the
values it allows; the choice is kept so a launch sent again (after a restart)
asks for the same. Existing instances chose nothing.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_launch_options"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("options", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("options")
