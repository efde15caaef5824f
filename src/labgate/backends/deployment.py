"""This labgate's deployment id: what tells its instances from another labgate's on one host.

Several labgates may share a machine (a test run's portals, a staging and a
production site on one node). Each marks what it starts with the random id
kept in its data dir, so that tidying up its orphans never touches another's:
the containers backend as the ``labgate.deployment`` label, the process
backend in the environment of every instance process.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

__all__ = ["DEPLOYMENT_RE", "deployment_id"]

#: What a deployment id looks like (a container label value, a volume name's part).
DEPLOYMENT_RE = r"^[a-z0-9][a-z0-9_.-]{0,31}$"


def deployment_id(data_dir: Path) -> str:
    """This labgate's random deployment id, kept in ``<data_dir>/deployment_id``."""
    path = data_dir / "deployment_id"
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if re.match(DEPLOYMENT_RE, existing):
        return existing
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(4)
    path.write_text(value + "\n")
    return value
