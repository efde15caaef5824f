"""``ldap``: a name and password checked by binding to an LDAP directory (ldap3).

Two ways to find the person's entry:

- bind as the user: ``user_dn_template = "uid={username},ou=people,dc=example,dc=org"``;
- search then bind: a service account (``bind_dn``, ``bind_password``) searches
  ``user_search_base`` with ``user_filter`` (``(uid={username})``), then the
  password is checked by binding as the entry found.

The connection is ``ldaps://`` or upgraded with StartTLS (``start_tls``), with
the certificate checked against ``ca_file`` (or the system's CAs). Groups come
from a search under ``group_search_base`` with ``group_filter``
(``(member={dn})`` or ``(memberUid={username})``). The subject is the entry's
``entryUUID`` (``subject_attribute``), which survives renames.

An empty password is refused before anything is sent: to LDAP an empty
password is an "unauthenticated bind", which many servers accept.
ldap3 is blocking; the portal calls :meth:`LDAP.check_password` on its bounded
password workers, so a slow directory cannot take every thread.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, ClassVar

from ldap3 import ALL_ATTRIBUTES, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from labgate.config import IdentityProviderConfig
from labgate.identity.base import (
    IdentityProvider,
    ProviderAccount,
    ProviderKind,
    ProviderUnavailable,
    clean_username,
)


class LDAPOptions(BaseModel):
    """Options of an LDAP provider."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^ldaps?://", description="ldap://host:389 or ldaps://host:636")
    start_tls: bool = False
    ca_file: str = ""
    user_dn_template: str = ""
    bind_dn: str = ""
    bind_password: SecretStr = SecretStr("")
    user_search_base: str = ""
    user_filter: str = "(uid={username})"
    username_attribute: str = "uid"
    email_attribute: str = "mail"
    subject_attribute: str = "entryUUID"
    group_search_base: str = ""
    group_filter: str = "(member={dn})"
    group_name_attribute: str = "cn"
    timeout: int = Field(10, gt=0, le=120)

    @model_validator(mode="after")
    def _one_way_to_find_users(self) -> LDAPOptions:
        if bool(self.user_dn_template) == bool(self.user_search_base):
            raise ValueError("set user_dn_template (bind as the user) or user_search_base")
        if self.user_dn_template and "{username}" not in self.user_dn_template:
            raise ValueError("user_dn_template needs {username}")
        return self


class LDAP(IdentityProvider):
    """Check a password by binding to an LDAP directory."""

    kind: ClassVar[ProviderKind] = "password"
    options_model: ClassVar[type[BaseModel]] = LDAPOptions

    def __init__(self, config: IdentityProviderConfig) -> None:
        super().__init__(config)
        self.options: LDAPOptions
        opts = self.options
        tls = Tls(
            validate=ssl.CERT_REQUIRED,
            ca_certs_file=opts.ca_file or None,
            version=ssl.PROTOCOL_TLS_CLIENT,
        )
        self.server = Server(
            opts.url, use_ssl=opts.url.startswith("ldaps://"), tls=tls, connect_timeout=opts.timeout
        )

    @property
    def label(self) -> str:
        """The heading of its form."""
        return self.config.label or f"{self.config.name} (LDAP)"

    async def check_password(self, username: str, password: str) -> ProviderAccount | None:
        """The account, or None for a wrong name or password (or an empty password)."""
        name = username.strip()
        if not name or not password:
            return None
        return await asyncio.to_thread(self._check, name, password)

    # --- blocking parts, on a worker thread ------------------------------------
    def _connection(self, user: str | None, password: str | None) -> Connection:
        conn = Connection(
            self.server,
            user=user,
            password=password,
            receive_timeout=self.options.timeout,
            raise_exceptions=False,
            read_only=True,
        )
        conn.open()
        if self.options.start_tls and not self.options.url.startswith("ldaps://"):
            conn.start_tls()
        return conn

    def _check(self, username: str, password: str) -> ProviderAccount | None:
        opts = self.options
        try:
            if opts.user_dn_template:
                dn = opts.user_dn_template.replace("{username}", escape_rdn(username))
            else:
                found = self._find_user(username)
                if found is None:
                    return None
                dn = found
            conn = self._connection(dn, password)
            try:
                if not conn.bind():
                    return None
                entry = self._read_entry(conn, dn)
                groups = self._groups(conn, dn, entry.get(opts.username_attribute) or username)
            finally:
                conn.unbind()
        except LDAPException as exc:
            raise ProviderUnavailable(f"LDAP server of {self.name!r}: {exc}") from None
        subject = entry.get(opts.subject_attribute) or dn.lower()
        # The directory's own name for the entry; else, bound as the user, the
        # name its DN was made of. Never what a search filter happened to match
        # (case-insensitively, maybe another attribute): that claims no account.
        own = entry.get(opts.username_attribute) or (username if opts.user_dn_template else "")
        return ProviderAccount(
            subject=subject,
            username=clean_username(entry.get(opts.username_attribute) or username),
            email=entry.get(opts.email_attribute, ""),
            groups=frozenset(groups),
            provider_name=own,
        )

    def _find_user(self, username: str) -> str | None:
        opts = self.options
        conn = self._connection(opts.bind_dn or None, opts.bind_password.get_secret_value() or None)
        try:
            if not conn.bind():
                raise ProviderUnavailable(
                    f"LDAP server of {self.name!r} refused the search account ({conn.result})"
                )
            query = opts.user_filter.replace("{username}", escape_filter_chars(username))
            conn.search(opts.user_search_base, query, SUBTREE, attributes=[], size_limit=2)
            entries = list(conn.entries)
        finally:
            conn.unbind()
        # Two entries for one name is a directory problem; guessing would be worse.
        return entries[0].entry_dn if len(entries) == 1 else None

    def _read_entry(self, conn: Connection, dn: str) -> dict[str, str]:
        opts = self.options
        wanted = [opts.username_attribute, opts.email_attribute, opts.subject_attribute]
        conn.search(dn, "(objectClass=*)", "BASE", attributes=[ALL_ATTRIBUTES, *wanted[2:]])
        values: dict[str, str] = {}
        if conn.entries:
            attributes: dict[str, Any] = conn.entries[0].entry_attributes_as_dict
            for name in wanted:
                found = attributes.get(name) or []
                if found:
                    values[name] = str(found[0])
        return values

    def _groups(self, conn: Connection, dn: str, username: str) -> list[str]:
        opts = self.options
        if not opts.group_search_base:
            return []
        query = opts.group_filter.replace("{dn}", escape_filter_chars(dn)).replace(
            "{username}", escape_filter_chars(username)
        )
        conn.search(opts.group_search_base, query, SUBTREE, attributes=[opts.group_name_attribute])
        names: list[str] = []
        for entry in conn.entries:
            found = entry.entry_attributes_as_dict.get(opts.group_name_attribute) or []
            names.extend(str(v) for v in found)
        return names
