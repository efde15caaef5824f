"""Instance secrets at rest: plain ones, stored before secrets were sealed, are sealed on start.

Sealing needs the signing key, which migrations do not have, so this runs
when the portal starts (after the migrations): every row whose secret is
still plain gets the sealed form of the same secret. A tool started before
the upgrade keeps the secret it was given and stays reachable.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.db.models import Instance
from labgate.security import SEALED_PREFIX, SecretBox

log = logging.getLogger(__name__)


def seal_plain_secrets(session: Session, box: SecretBox) -> int:
    """Seal every instance secret still stored plain; returns how many were."""
    plain = session.scalars(
        select(Instance).where(Instance.secret != "", ~Instance.secret.startswith(SEALED_PREFIX))
    ).all()
    for instance in plain:
        instance.secret = box.seal(instance.id, instance.secret)
    if plain:
        session.flush()
        log.info("sealed the stored secrets of %d instances", len(plain))
    return len(plain)
