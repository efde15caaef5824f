"""datasets, replicas and site inventory reports; the dataset of an instance

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("identifier", sa.String(length=2048), nullable=False),
        sa.Column("scheme", sa.String(length=8), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("title", sa.String(length=500), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("license", sa.String(length=200), nullable=False),
        sa.Column("landing_page", sa.String(length=2048), nullable=False),
        sa.Column("checksum", sa.String(length=200), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["users.id"], name=op.f("fk_datasets_owner_id_users"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.UniqueConstraint("identifier", name=op.f("uq_datasets_identifier")),
    )
    op.create_index(op.f("ix_datasets_owner_id"), "datasets", ["owner_id"], unique=False)

    op.create_table(
        "replicas",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("checksum", sa.String(length=200), nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name=op.f("fk_replicas_dataset_id_datasets"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["site_id"], ["sites.id"], name=op.f("fk_replicas_site_id_sites"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replicas")),
        # (dataset_id, site_id) also serves "the replicas of a dataset" (resolve).
        sa.UniqueConstraint("dataset_id", "site_id", name="uq_replicas_dataset_site"),
    )
    # "The replicas of a site", and the prune at the end of an inventory push.
    op.create_index(
        "ix_replicas_site_reported", "replicas", ["site_id", "reported_at"], unique=False
    )

    op.create_table(
        "site_reports",
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ttl", sa.Integer(), nullable=False),
        sa.Column("replicas", sa.Integer(), nullable=False),
        sa.Column("reporter", sa.String(length=64), nullable=False),
        sa.Column("push_id", sa.String(length=64), nullable=False),
        sa.Column("push_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["site_id"],
            ["sites.id"],
            name=op.f("fk_site_reports_site_id_sites"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("site_id", name=op.f("pk_site_reports")),
    )

    # A plain column, not a foreign key: adding one to `instances` on SQLite rebuilds the
    # table, and with foreign keys on, dropping the old one cascades into instance_events.
    op.add_column("instances", sa.Column("dataset_id", sa.Integer(), nullable=True))
    op.add_column("instances", sa.Column("mounts", sa.JSON(), nullable=False, server_default="[]"))
    op.create_index(op.f("ix_instances_dataset_id"), "instances", ["dataset_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_instances_dataset_id"), table_name="instances")
    # SQLite (3.35+) drops plain columns in place: no table rebuild, no cascade.
    op.drop_column("instances", "mounts")
    op.drop_column("instances", "dataset_id")
    op.drop_table("site_reports")
    op.drop_index("ix_replicas_site_reported", table_name="replicas")
    op.drop_table("replicas")
    op.drop_index(op.f("ix_datasets_owner_id"), table_name="datasets")
    op.drop_table("datasets")
