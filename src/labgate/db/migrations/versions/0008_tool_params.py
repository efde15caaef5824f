"""instances.params: the launch parameters a user gave (a tool's launch form)

Revision ID: 0008_tool_params
Revises: 0001
Create Date: 2026-12-02

A branch of its own off 0001, like 0002-0007; ``migrate()`` upgrades every
head. A tool may declare launch parameters (labgate.tools.params); the
checked values are kept so a launch sent again (after a restart) gets the
same, and the launch form offers a user's last values again. Existing
instances gave none.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_tool_params"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("params", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("params")
