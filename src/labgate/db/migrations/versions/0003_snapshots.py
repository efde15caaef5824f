"""snapshots, their shares, and the snapshot an instance was launched from

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-22

A branch of its own off 0001 (datasets are 0002); ``migrate()`` upgrades
every head.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "snapshots",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("tool", sa.String(length=64), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=True),
        sa.Column("backend", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "saving", "ready", "failed", name="snapshotstate", native_enum=False, length=16
            ),
            nullable=False,
        ),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("reference", sa.String(length=512), nullable=False),
        sa.Column("digest", sa.String(length=128), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("source_instance_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["owner_id"],
            ["users.id"],
            name=op.f("fk_snapshots_owner_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name=op.f("fk_snapshots_site_id_sites")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_snapshots")),
    )
    op.create_index(op.f("ix_snapshots_owner_id"), "snapshots", ["owner_id"], unique=False)

    op.create_table(
        "snapshot_shares",
        sa.Column("snapshot_id", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["snapshot_id"],
            ["snapshots.id"],
            name=op.f("fk_snapshot_shares_snapshot_id_snapshots"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_snapshot_shares_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("snapshot_id", "user_id", name=op.f("pk_snapshot_shares")),
    )
    op.create_index(
        op.f("ix_snapshot_shares_user_id"), "snapshot_shares", ["user_id"], unique=False
    )

    # A plain column, not a foreign key: adding one to `instances` on SQLite rebuilds the
    # table, and with foreign keys on, dropping the old one cascades into instance_events.
    op.add_column("instances", sa.Column("snapshot_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    # SQLite (3.35+) drops plain columns in place: no table rebuild, no cascade.
    op.drop_column("instances", "snapshot_id")
    op.drop_index(op.f("ix_snapshot_shares_user_id"), table_name="snapshot_shares")
    op.drop_table("snapshot_shares")
    op.drop_index(op.f("ix_snapshots_owner_id"), table_name="snapshots")
    op.drop_table("snapshots")
