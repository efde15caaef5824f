"""leader_leases: which portal replica runs the loops that run once, and its term

Revision ID: 0010_leader_lease
Revises: 0001
Create Date: 2026-12-03

A branch of its own off 0001, like 0002-0009; ``migrate()`` upgrades every
head. Portal replicas (``labgate portal``) on one PostgreSQL database elect a
leader through this table (:mod:`labgate.scheduler.leader`); ``labgate serve``
never writes it. A portal of the version before ignores the table.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_leader_lease"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leader_leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=False),
        sa.Column("term", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leader_leases")),
    )


def downgrade() -> None:
    op.drop_table("leader_leases")
