"""counters, instances.pool_uid: every warm-pool instance gets a number of its own

Revision ID: 0014_pool_uids
Revises: 0001
Create Date: 2026-12-05

A branch of its own off 0001; ``migrate()`` upgrades every head. The process
backend runs a warm-pool instance as a uid of its own, ``instance_uid_base +
100000000 + pool_uid`` (labgate.backends.identity), which it keeps when a user
claims it. ``counters`` holds the last number given (row ``pool_uid``,
starting at 0), so no two pool instances ever get the same one, across
restarts and portal replicas; the unique index holds it too. A portal of the
version before ignores both (its pool instances have no number and share the
``_pool`` account's uid: this version hands none of them to a user and stops
them when it tidies the pools).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014_pool_uids"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    counters = op.create_table(
        "counters",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_counters")),
    )
    op.bulk_insert(counters, [{"name": "pool_uid", "value": 0}])
    op.add_column("instances", sa.Column("pool_uid", sa.BigInteger(), nullable=True))
    op.create_index(op.f("ix_instances_pool_uid"), "instances", ["pool_uid"], unique=True)


def downgrade() -> None:
    op.drop_index(op.f("ix_instances_pool_uid"), table_name="instances")
    op.drop_column("instances", "pool_uid")
    op.drop_table("counters")
