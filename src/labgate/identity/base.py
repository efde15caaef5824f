"""What an identity provider is, and how providers are found.

Two kinds of provider exist:

- *password* providers (``local``, ``ldap``) check a name and password typed
  into labgate's own sign-in form: override :meth:`IdentityProvider.check_password`.
- *redirect* providers (``oidc``) send the browser to the provider's own page
  and get it back with a code: override :meth:`IdentityProvider.start` and
  :meth:`IdentityProvider.finish`.

Either way the provider answers with a :class:`ProviderAccount`: a stable
subject (never a display name), a suggested user name, an e-mail address if
known, and the provider's groups. :mod:`labgate.identity.linking` does the rest.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from labgate.config import IdentityProviderConfig
from labgate.errors import ConfigError, LabgateError

log = logging.getLogger(__name__)

IDENTITY_GROUP = "labgate.identity"
ProviderKind = Literal["password", "redirect"]


class ProviderError(LabgateError):
    """The provider refused, or could not be reached (a 401 or 502 to the user)."""

    status = 401
    default_code = "identity_provider_error"


class ProviderUnavailable(ProviderError):
    """The provider could not be asked (down, misconfigured, bad answer)."""

    status = 502
    default_code = "identity_provider_unavailable"


@dataclass(frozen=True)
class ProviderAccount:
    """What a provider vouches for after a successful sign-in."""

    #: Stable and unique at this provider (OIDC ``sub``, an LDAP entry's DN or uid).
    subject: str
    #: The name the person would like in labgate (a suggestion; it may be taken).
    username: str
    email: str = ""
    groups: frozenset[str] = field(default_factory=frozenset)
    #: The provider's own user name for the person, exactly as it sent it (never
    #: one derived from an e-mail address or the subject; '' without one).
    #: ``first_login = "existing"`` links only by this name: see
    #: :func:`existing_name`.
    provider_name: str = ""

    @property
    def domain(self) -> str:
        """The domain of the e-mail address, lower case ('' without one)."""
        return self.email.rpartition("@")[2].lower() if "@" in self.email else ""


@dataclass(frozen=True)
class Redirect:
    """Where to send the browser, and what to keep (signed, in a cookie) for the way back."""

    url: str
    keep: dict[str, str]


class NoOptions(BaseModel):
    """A provider without options."""

    model_config = ConfigDict(extra="forbid")


class IdentityProvider:
    """Base class of identity providers.

    Subclasses set ``kind`` and ``options_model`` (a pydantic model of their
    ``options`` table) and override the methods of their kind. One instance
    lives per configured provider, for the life of the portal.
    """

    kind: ClassVar[ProviderKind] = "password"
    options_model: ClassVar[type[BaseModel]] = NoOptions
    #: The password is checked by labgate itself (its own accounts): only ``local``.
    checks_local_passwords: ClassVar[bool] = False

    def __init__(self, config: IdentityProviderConfig) -> None:
        self.config = config
        self.name = config.name
        try:
            self.options: Any = self.options_model.model_validate(config.options)
        except ValueError as exc:
            raise ConfigError(f"identity provider {config.name!r}: {exc}") from None

    @property
    def label(self) -> str:
        """The text of its button or form on the sign-in page."""
        return self.config.label or self.config.name

    async def check_password(self, username: str, password: str) -> ProviderAccount | None:
        """Password providers: the account behind a name and password, or None if wrong."""
        raise NotImplementedError(f"{type(self).__name__} does not check passwords")

    async def start(self, redirect_uri: str) -> Redirect:
        """Redirect providers: the provider's authorization URL, and what to keep."""
        raise NotImplementedError(f"{type(self).__name__} does not redirect")

    async def finish(
        self, redirect_uri: str, params: dict[str, str], kept: dict[str, str]
    ) -> ProviderAccount:
        """Redirect providers: the account, from the callback's query and what was kept."""
        raise NotImplementedError(f"{type(self).__name__} does not redirect")

    async def close(self) -> None:
        """Release connections (the portal is stopping)."""


def available_providers() -> dict[str, str]:
    """Short names of installed provider kinds mapped to their import paths."""
    return {ep.name: ep.value for ep in entry_points(group=IDENTITY_GROUP)}


def provider_class(kind: str) -> type[IdentityProvider]:
    """The provider class registered under ``kind``; ConfigError otherwise."""
    for ep in entry_points(group=IDENTITY_GROUP):
        if ep.name == kind:
            cls = ep.load()
            if isinstance(cls, type) and issubclass(cls, IdentityProvider):
                return cls
            raise ConfigError(f"entry point {kind!r} is not a labgate identity provider")
    known = ", ".join(sorted(available_providers())) or "none"
    raise ConfigError(f"unknown identity provider kind {kind!r} (installed: {known})")


def load_providers(configs: list[IdentityProviderConfig]) -> dict[str, IdentityProvider]:
    """One provider per configuration, by name, in order; ``local`` alone when none is set."""
    if not configs:
        configs = [IdentityProviderConfig(name="local", kind="local")]
    providers: dict[str, IdentityProvider] = {}
    for config in configs:
        providers[config.name] = provider_class(config.kind)(config)
    return providers


_NAME_CHARS = re.compile(r"[^a-z0-9_.-]+")
#: A labgate user name (as ``labgate.portal.schemas.USER_NAME``).
_USER_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def clean_username(value: str) -> str:
    """A provider's suggested name made fit for labgate (lower case, safe characters).

    Only for naming a *new* account: the result can equal an existing name that
    the provider's name was not (``ADMIN!``, ``admin@elsewhere``), so it never
    picks an existing account (:func:`existing_name` does).
    """
    # Only A-Z are lowered: str.lower() turns some other letters into ASCII
    # (the Kelvin sign into "k"), which would make look-alikes of other names.
    name = value.strip().partition("@")[0].translate(_ASCII_LOWER)
    name = _NAME_CHARS.sub("-", name).strip("-._")
    if not name:
        name = "user"
    elif not name[0].isalpha():
        name = "u" + name
    # Room for a "-N" suffix when the name is taken, within labgate's 32 characters.
    return name[:28].rstrip("-._")


def existing_name(account: ProviderAccount) -> str | None:
    """The labgate user name ``account`` may claim as an existing account's, or None.

    Only the provider's own user name (``provider_name``) counts, and only when,
    after NFKC normalisation, it is unchanged and already a valid labgate user
    name: lower-case ASCII, no folding, cutting or cleaning. ``ADMIN``,
    ``admin!``, ``admin@elsewhere``, an e-mail address or a look-alike (``kate``
    spelt with the Kelvin sign, U+212A) claim nothing.
    """
    name = account.provider_name
    if not name or unicodedata.normalize("NFKC", name) != name:
        return None
    return name if _USER_NAME.fullmatch(name) else None
