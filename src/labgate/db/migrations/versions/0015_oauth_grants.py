"""oauth_grants: the provider's codes and access tokens, shared by every portal replica

Revision ID: 0015_oauth_grants
Revises: 0001
Create Date: 2026-12-05

A branch of its own off 0001; ``migrate()`` upgrades every head. labgate's
OpenID Connect provider kept its codes and access tokens in the portal
process's memory, so a code from one replica failed at another's
``/oauth/token`` and a token from one at another's ``/oauth/userinfo``. A
row per code (its SHA-256, never the code) holds the grant; the exchange
that claims it sets the access token's SHA-256; ``revoked`` ends that token.
A portal of the version before ignores the table (and keeps its codes in
memory: a mixed fleet during a rolling upgrade fails as before, no worse).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015_oauth_grants"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "oauth_grants",
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=True),
        sa.Column("client_id", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("redirect_uri", sa.Text(), nullable=False),
        sa.Column("nonce", sa.Text(), nullable=False),
        sa.Column("challenge", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("code_hash", name=op.f("pk_oauth_grants")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_oauth_grants_token_hash")),
    )
    op.create_index(op.f("ix_oauth_grants_expires_at"), "oauth_grants", ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_oauth_grants_expires_at"), table_name="oauth_grants")
    op.drop_table("oauth_grants")
