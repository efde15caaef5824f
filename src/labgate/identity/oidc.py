"""``oidc``: OpenID Connect, authorization code flow with PKCE.

The provider's endpoints come from its discovery document
(``<issuer>/.well-known/openid-configuration``), fetched once and kept. The
browser is sent to the authorization endpoint with a fresh ``state``,
``nonce`` and PKCE ``code_challenge`` (S256); the three secrets travel back to
the portal in a signed cookie, never in the URL. On the way back the code is
exchanged (with the verifier) at the token endpoint, and the ID token's
signature (the provider's JWKS), issuer, audience, expiry and nonce are
checked before any claim is believed. Claims from the userinfo endpoint are
added when it has one (groups often come from there), for the same ``sub``.

Options (``[identity_providers.options]``): ``issuer``, ``client_id``,
``client_secret``, ``scopes``, ``username_claim``, ``groups_claim``,
``email_claim``, ``require_verified_email``, ``timeout``.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, cast
from urllib.parse import urlencode

import httpx
from authlib.common.security import generate_token
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, KeySetSerialization
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from labgate.config import IdentityProviderConfig
from labgate.errors import Forbidden
from labgate.identity.base import (
    IdentityProvider,
    ProviderAccount,
    ProviderError,
    ProviderKind,
    ProviderUnavailable,
    Redirect,
    clean_username,
)

#: Signature algorithms accepted for ID tokens; never ``none``, never HMAC with a public key.
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384"]
#: How long the discovery document and keys are kept before they are fetched again.
METADATA_TTL = 3600.0
#: How much of a provider's error description the sign-in page shows.
MAX_ERROR_TEXT = 200


def _verified(flag: Any) -> bool:
    """Whether an ``email_verified`` claim says yes (``true``, or ``"true"`` as a string)."""
    if isinstance(flag, str):
        return flag.strip().lower() == "true"
    return flag is True


class OIDCOptions(BaseModel):
    """Options of an OpenID Connect provider."""

    model_config = ConfigDict(extra="forbid")

    issuer: str = Field(min_length=1, description="The issuer URL (discovery is under it).")
    client_id: str = Field(min_length=1)
    client_secret: SecretStr = SecretStr("")
    scopes: str = "openid profile email"
    username_claim: str = "preferred_username"
    email_claim: str = "email"
    #: An address proves its domain only when the provider says it verified it; off, an
    #: address without ``email_verified`` counts too (some providers never send it).
    require_verified_email: bool = False
    groups_claim: str = "groups"
    timeout: float = Field(10.0, gt=0, le=120)


class OpenIDConnect(IdentityProvider):
    """Sign in at an OpenID Connect provider (authorization code + PKCE)."""

    kind: ClassVar[ProviderKind] = "redirect"
    options_model: ClassVar[type[BaseModel]] = OIDCOptions

    def __init__(self, config: IdentityProviderConfig) -> None:
        super().__init__(config)
        self.options: OIDCOptions
        self.issuer = self.options.issuer.rstrip("/")
        self._http: httpx.AsyncClient | None = None
        self._metadata: dict[str, Any] | None = None
        self._keys: KeySet | None = None
        self._fetched_at = 0.0

    @property
    def label(self) -> str:
        """The text of its button."""
        return self.config.label or f"Sign in with {self.config.name}"

    # --- talking to the provider --------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.options.timeout, follow_redirects=False)
        return self._http

    async def _get_json(self, url: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._client().get(url, **kwargs)
            response.raise_for_status()
            data = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ProviderUnavailable(
                f"identity provider {self.name!r} did not answer properly: {exc}"
            ) from None
        if not isinstance(data, dict):
            raise ProviderUnavailable(f"identity provider {self.name!r} sent no JSON object")
        return data

    async def metadata(self) -> dict[str, Any]:
        """The provider's discovery document (cached), its issuer checked."""
        if self._metadata is None or time.monotonic() - self._fetched_at > METADATA_TTL:
            data = await self._get_json(f"{self.issuer}/.well-known/openid-configuration")
            if str(data.get("issuer", "")).rstrip("/") != self.issuer:
                raise ProviderUnavailable(
                    f"identity provider {self.name!r}: discovery names issuer "
                    f"{data.get('issuer')!r}, not {self.issuer!r}"
                )
            for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(data.get(key), str):
                    raise ProviderUnavailable(f"identity provider {self.name!r}: no {key}")
            self._metadata, self._keys, self._fetched_at = data, None, time.monotonic()
        return self._metadata

    async def _keyset(self, refresh: bool = False) -> KeySet:
        if self._keys is None or refresh:
            meta = await self.metadata()
            try:
                keys = cast(KeySetSerialization, await self._get_json(meta["jwks_uri"]))
                self._keys = KeySet.import_key_set(keys)
            except (JoseError, ValueError, TypeError) as exc:
                raise ProviderUnavailable(
                    f"identity provider {self.name!r}: bad keys: {exc}"
                ) from None
        return self._keys

    # --- the flow ------------------------------------------------------------
    async def start(self, redirect_uri: str) -> Redirect:
        """The authorization URL with state, nonce and an S256 code challenge."""
        meta = await self.metadata()
        state, nonce, verifier = generate_token(32), generate_token(32), generate_token(64)
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.options.client_id,
                "redirect_uri": redirect_uri,
                "scope": self.options.scopes,
                "state": state,
                "nonce": nonce,
                "code_challenge": create_s256_code_challenge(verifier),
                "code_challenge_method": "S256",
            }
        )
        endpoint = meta["authorization_endpoint"]
        joiner = "&" if "?" in endpoint else "?"
        return Redirect(
            f"{endpoint}{joiner}{query}", {"state": state, "nonce": nonce, "verifier": verifier}
        )

    async def finish(
        self, redirect_uri: str, params: dict[str, str], kept: dict[str, str]
    ) -> ProviderAccount:
        """Check the state, exchange the code, check the ID token; the account."""
        state = kept.get("state", "")
        # The state first, an error too: without this browser's state the callback
        # is another site's link, and its error_description is its own text.
        if not state or params.get("state") != state:
            raise Forbidden(
                "the sign-in did not come back as it was sent (state); please try again",
                code="csrf_failed",
            )
        if "error" in params:
            reason = params.get("error_description") or params["error"]
            raise ProviderError(
                f"{self.name}: {reason[:MAX_ERROR_TEXT]}", code="identity_provider_refused"
            )
        if not params.get("code"):
            raise Forbidden(
                "the sign-in did not come back as it was sent (no code); please try again",
                code="csrf_failed",
            )
        if params.get("iss") and params["iss"].rstrip("/") != self.issuer:
            raise Forbidden("the sign-in came back from another issuer", code="csrf_failed")
        tokens = await self._exchange(redirect_uri, params["code"], kept.get("verifier", ""))
        claims = await self._check_id_token(str(tokens.get("id_token", "")), kept.get("nonce", ""))
        access = tokens.get("access_token")
        meta = await self.metadata()
        if isinstance(access, str) and isinstance(meta.get("userinfo_endpoint"), str):
            extra = await self._get_json(
                meta["userinfo_endpoint"], headers={"Authorization": f"Bearer {access}"}
            )
            if extra.get("sub") == claims["sub"]:
                claims = {**extra, **claims}
        return self.account_from(claims)

    async def _exchange(self, redirect_uri: str, code: str, verifier: str) -> dict[str, Any]:
        meta = await self.metadata()
        secret = self.options.client_secret.get_secret_value()
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
            "client_id": self.options.client_id,
        }
        try:
            if secret:
                response = await self._client().post(
                    meta["token_endpoint"], data=data, auth=(self.options.client_id, secret)
                )
            else:
                response = await self._client().post(meta["token_endpoint"], data=data)
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ProviderUnavailable(f"identity provider {self.name!r}: {exc}") from None
        if response.status_code != 200 or not isinstance(body, dict):
            reason = body.get("error_description") if isinstance(body, dict) else None
            raise ProviderError(
                f"{self.name} refused the sign-in code: {reason or response.status_code}",
                code="identity_provider_refused",
            )
        return body

    async def _check_id_token(self, id_token: str, nonce: str) -> dict[str, Any]:
        if not id_token or not nonce:
            raise ProviderError(f"{self.name} sent no ID token", code="identity_provider_refused")
        try:
            try:
                token = jwt.decode(id_token, await self._keyset(), algorithms=ID_TOKEN_ALGORITHMS)
            except (ValueError, JoseError):
                # The provider may have rotated its keys since they were fetched.
                keys = await self._keyset(refresh=True)
                token = jwt.decode(id_token, keys, algorithms=ID_TOKEN_ALGORITHMS)
            jwt.JWTClaimsRegistry(
                leeway=60,
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.options.client_id},
                sub={"essential": True},
                exp={"essential": True},
                nonce={"essential": True, "value": nonce},
            ).validate(token.claims)
        except (ValueError, JoseError) as exc:
            raise ProviderError(
                f"{self.name} sent an ID token that does not check out: {exc}",
                code="identity_provider_refused",
            ) from None
        return dict(token.claims)

    def account_from(self, claims: dict[str, Any]) -> ProviderAccount:
        """The account named by a set of checked claims."""
        options = self.options
        subject = str(claims["sub"])
        email = claims.get(options.email_claim)
        # An address the provider says it has not verified proves no domain, however
        # it spells that ("false" as a string, null): only true, or no claim (unless
        # require_verified_email), vouches.
        said = claims.get("email_verified", not options.require_verified_email)
        if not isinstance(email, str) or not _verified(said):
            email = ""
        own = claims.get(options.username_claim)
        # A new account may be named after the address or subject; an existing
        # one is claimed only by the provider's own user name (provider_name).
        name = own or email or subject
        groups = claims.get(options.groups_claim)
        if isinstance(groups, str):
            groups = [groups]
        elif not isinstance(groups, list):
            groups = []  # a number, or an object whose keys are no group: none
        return ProviderAccount(
            subject=subject,
            username=clean_username(str(name)),
            email=email,
            groups=frozenset(str(g) for g in groups if isinstance(g, str | int)),
            provider_name=own if isinstance(own, str) else "",
        )

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None
