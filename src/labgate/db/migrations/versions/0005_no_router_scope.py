"""no API token carries the router scope: drop it from tokens made before it was refused

Revision ID: 0005_no_router_scope
Revises: 0001
Create Date: 2026-12-02

A branch of its own off 0001, like 0002-0004; ``migrate()`` upgrades every
head. Data only: the ``router`` scope belongs to router processes (their
token is derived from the secret key), and tokens created while the API
still granted it lose it here. No downgrade puts it back.
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0005_no_router_scope"
down_revision = "0001"
branch_labels = None
depends_on = None

_tokens = sa.table("api_tokens", sa.column("id", sa.Integer), sa.column("scopes", sa.JSON))


def upgrade() -> None:
    bind = op.get_bind()
    for token_id, scopes in bind.execute(sa.select(_tokens.c.id, _tokens.c.scopes)).all():
        listed = json.loads(scopes) if isinstance(scopes, str) else list(scopes or [])
        if "router" in listed:
            kept = [scope for scope in listed if scope != "router"]
            bind.execute(_tokens.update().where(_tokens.c.id == token_id).values(scopes=kept))


def downgrade() -> None:
    pass
