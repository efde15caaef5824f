"""JupyterLab shows the labgate user's name, not "Anonymous <moon>".

The router authenticates to JupyterLab with the instance token, which names
nobody, so jupyter_server makes up an anonymous user for each browser. The
built-in ``jupyterlab`` tool sets
``--ServerApp.identity_provider_class=labgate.tools.jupyter_identity.LabgateIdentityProvider``:
the user is then the one in the router's ``X-Labgate-User`` header (the
instance's owner, also after a warm-pool claim), else ``$LABGATE_USER``.
"""

from __future__ import annotations

import os
from typing import Any

from jupyter_server.auth.identity import IdentityProvider, User


class LabgateIdentityProvider(IdentityProvider):
    """Token-authenticated requests are the instance owner's."""

    def generate_anonymous_user(self, handler: Any) -> User:
        """The labgate user, named as labgate names them."""
        name = handler.request.headers.get("X-Labgate-User") or os.environ.get("LABGATE_USER")
        if not name:
            return super().generate_anonymous_user(handler)
        return User(username=name, name=name, display_name=name, initials=name[:2].upper())
