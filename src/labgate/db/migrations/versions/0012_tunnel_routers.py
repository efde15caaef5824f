"""tunnel_routers: the routers agents dial their data connections to; sites.tunnel_epoch

Revision ID: 0012_tunnel_routers
Revises: 0006_network_sites
Create Date: 2026-12-03

A tunneled site's agent keeps a data connection to every router
(docs/sites.md, "Several routers"): each ``labgate router`` registers the
address agents dial through the route stream it follows, and the portal that
holds the stream keeps its row fresh (``seen_at``); every portal tells the
agents connected to it which rows are fresh. ``sites.tunnel_epoch`` is the
epoch of the site's current agent connection, so that the routers of every
portal, not only those of the portal holding the agent, take its tickets.
A portal of the version before ignores both.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_tunnel_routers"
down_revision = "0006_network_sites"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tunnel_routers",
        sa.Column("url", sa.String(length=255), nullable=False),
        sa.Column("replica", sa.String(length=200), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("url", name=op.f("pk_tunnel_routers")),
    )
    op.add_column("sites", sa.Column("tunnel_epoch", sa.String(length=32), nullable=True))


def downgrade() -> None:
    op.drop_column("sites", "tunnel_epoch")
    op.drop_table("tunnel_routers")
