"""sites: network sites (kind, reach, enrolment token) and their agent's connection

Revision ID: 0006_network_sites
Revises: 0001
Create Date: 2026-12-09

A branch of its own off 0001, like 0002-0005; ``migrate()`` upgrades every
head. Plain columns with server defaults: SQLite adds them in place. Sites
already recorded came from the settings, so they are ``local`` and ``direct``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_network_sites"
down_revision = "0001"
branch_labels = None
depends_on = None

_COLUMNS = (
    "kind",
    "reach",
    "token_hash",
    "token_issued_at",
    "agent_version",
    "agent_info",
    "connected_at",
    "disconnected_at",
)


def upgrade() -> None:
    op.add_column(
        "sites", sa.Column("kind", sa.String(length=16), nullable=False, server_default="local")
    )
    op.add_column(
        "sites", sa.Column("reach", sa.String(length=16), nullable=False, server_default="direct")
    )
    op.add_column("sites", sa.Column("token_hash", sa.String(length=64), nullable=True))
    op.add_column("sites", sa.Column("token_issued_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "sites",
        sa.Column("agent_version", sa.String(length=64), nullable=False, server_default=""),
    )
    op.add_column(
        "sites", sa.Column("agent_info", sa.JSON(), nullable=False, server_default=sa.text("'{}'"))
    )
    op.add_column("sites", sa.Column("connected_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("sites", sa.Column("disconnected_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sites") as batch:
        for column in reversed(_COLUMNS):
            batch.drop_column(column)
