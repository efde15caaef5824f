"""lifecycle: groups and their members, user limits, usage records, pool and keep-alive marks

Revision ID: 0004
Revises: 0001
Create Date: 2026-11-22

A branch of its own off 0001 (datasets are 0002, snapshots 0003); ``migrate()``
upgrades every head. The instance columns are plain nullable columns: SQLite
adds them in place, without rebuilding ``instances``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0001"
branch_labels = None
depends_on = None


def _limit_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("max_instances", sa.Integer(), nullable=True),
        sa.Column("max_cpu", sa.Float(), nullable=True),
        sa.Column("max_memory", sa.BigInteger(), nullable=True),
        sa.Column("max_core_hours", sa.Float(), nullable=True),
    ]


def upgrade() -> None:
    op.create_table(
        "groups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("max_lifetime", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        *_limit_columns(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_groups")),
        sa.UniqueConstraint("name", name=op.f("uq_groups_name")),
    )
    op.create_table(
        "group_members",
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
            name=op.f("fk_group_members_group_id_groups"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_group_members_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("group_id", "user_id", name=op.f("pk_group_members")),
    )
    op.create_index(op.f("ix_group_members_user_id"), "group_members", ["user_id"], unique=False)
    op.create_table(
        "user_limits",
        sa.Column("user_id", sa.Integer(), nullable=False),
        *_limit_columns(),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_user_limits_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_user_limits")),
    )
    op.create_table(
        "usage_records",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("user_name", sa.String(length=64), nullable=False),
        sa.Column("group_name", sa.String(length=64), nullable=False),
        sa.Column("tool", sa.String(length=64), nullable=False),
        sa.Column("site", sa.String(length=64), nullable=False),
        sa.Column("cpu", sa.Float(), nullable=False),
        sa.Column("memory", sa.BigInteger(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_usage_records_user_id_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_records")),
    )
    op.create_index(
        op.f("ix_usage_records_group_name"), "usage_records", ["group_name"], unique=False
    )
    op.create_index(
        op.f("ix_usage_records_instance_id"), "usage_records", ["instance_id"], unique=False
    )
    op.create_index(
        "ix_usage_records_started_stopped",
        "usage_records",
        ["started_at", "stopped_at"],
        unique=False,
    )
    op.create_index(op.f("ix_usage_records_user_id"), "usage_records", ["user_id"], unique=False)

    op.add_column("instances", sa.Column("pool", sa.String(length=130), nullable=True))
    op.add_column(
        "instances", sa.Column("keep_alive_until", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "instances", sa.Column("last_activity_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(op.f("ix_instances_pool"), "instances", ["pool"], unique=False)


def downgrade() -> None:
    # SQLite (3.35+) drops plain columns in place: no table rebuild, no cascade.
    op.drop_index(op.f("ix_instances_pool"), table_name="instances")
    op.drop_column("instances", "last_activity_at")
    op.drop_column("instances", "keep_alive_until")
    op.drop_column("instances", "pool")
    op.drop_index(op.f("ix_usage_records_user_id"), table_name="usage_records")
    op.drop_index("ix_usage_records_started_stopped", table_name="usage_records")
    op.drop_index(op.f("ix_usage_records_instance_id"), table_name="usage_records")
    op.drop_index(op.f("ix_usage_records_group_name"), table_name="usage_records")
    op.drop_table("usage_records")
    op.drop_table("user_limits")
    op.drop_index(op.f("ix_group_members_user_id"), table_name="group_members")
    op.drop_table("group_members")
    op.drop_table("groups")
