"""``local``: labgate's own accounts and passwords (the default provider).

The portal checks these passwords itself (argon2 hashes in the database, on
the bounded password workers, behind the sign-in rate limits), so this class
only says so; it exists so that local passwords are configured, listed and
switched off like any other provider.
"""

from __future__ import annotations

from typing import ClassVar

from labgate.identity.base import IdentityProvider, ProviderKind


class LocalPasswords(IdentityProvider):
    """labgate's own accounts: the user names and passwords in its database."""

    kind: ClassVar[ProviderKind] = "password"
    checks_local_passwords: ClassVar[bool] = True

    @property
    def label(self) -> str:
        """The heading of the password form."""
        return self.config.label or "labgate account"
