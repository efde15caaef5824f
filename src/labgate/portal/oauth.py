"""labgate as an OpenID Connect provider: services and tools ask it who their user is.

An admin registers a service in ``oauth_clients`` (client id, secret, exact
redirect URIs). Every running instance is a client too: its client id is the
instance id, its secret the ``LABGATE_INSTANCE_TOKEN`` its tool was started
with, and it may be sent back only under its own ``/i/<id>/`` prefix, for
people who may use it (owner, ``use`` shares, admins).

The client sends the browser to ``/oauth/authorize``; a person signed in
to labgate (or who signs in now) is sent back with a one-time code (by an
instance they do not own only once they allow it on labgate's consent page,
a form post checked against their session's CSRF token), which
the client exchanges at ``/oauth/token`` (client
secret, and the PKCE verifier when it sent a challenge) for an ID token:
``sub`` (the labgate user id), ``preferred_username``, ``name`` and
``groups``, signed ES256 with a key derived from ``secret_key`` (so every
portal replica signs alike and nothing more is stored), published at
``/oauth/jwks``. ``/oauth/userinfo`` answers the same claims for the
access token.

Codes live 60 seconds and are good once; access tokens live 10 minutes.
Both are random values kept in the database (``oauth_grants``, by their
SHA-256 only), so every portal replica answers for those of every other.
Each row holds the grant behind its code and token: the client, the user,
the portal session they were signed in with and when they said yes. A code
or token counts only while that grant stands (checked in the database at
every exchange and every ``/oauth/userinfo``): the session not signed out
nor ended (``sessions_valid_after``: password change, disabling), the
account there, and for an instance's client the instance still running and
the person still one who may use it. A code used twice takes back the
access token it was exchanged for the first time (RFC 6749 section 4.1.2):
one of the two holders is not the client. The exchange claims the code's
row with one conditional ``UPDATE``, so of two exchanges, on one replica or
two, exactly one wins and the other revokes the winner's token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import unquote, unquote_plus, urlencode

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from joserfc import jwt
from joserfc.jwk import ECKey
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from labgate.config import OAuthClientConfig
from labgate.db.models import (
    Group,
    GroupMember,
    Instance,
    OAuthGrant,
    RevokedSession,
    ShareAccess,
    User,
)
from labgate.portal.auth import Principal, optional_principal
from labgate.portal.sharing import shares_for
from labgate.portal.state import Portal, get_portal
from labgate.portal.ui.render import error_page, login_url, render
from labgate.portal.ui.views import page_context
from labgate.security import HANDOFF_PATH, hash_token, pkce_challenge, same

router = APIRouter(include_in_schema=False)

CODE_SECONDS = 60
TOKEN_SECONDS = 600
_P256_ORDER = int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)


@dataclass(frozen=True)
class _Grant:
    """What a person allowed a client at ``/oauth/authorize`` (a code, then a token)."""

    client_id: str
    user_id: int
    #: The portal session the person said yes in: signing it out ends the grant.
    session_id: str
    #: When they said yes: a grant older than the user's ``sessions_valid_after`` is over.
    issued: float
    redirect_uri: str
    nonce: str
    challenge: str
    expires: float


class OAuthState:
    """The ID token signing key (codes and access tokens are in the database)."""

    def __init__(self, secret_key: str) -> None:
        seed = hmac.new(secret_key.encode(), b"labgate.oidc-signing", hashlib.sha256).digest()
        private = ec.derive_private_key(
            int.from_bytes(seed) % (_P256_ORDER - 1) + 1, ec.SECP256R1()
        )
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.key = ECKey.import_key(pem, {"use": "sig", "alg": "ES256"})
        self.key.ensure_kid()

    def jwks(self) -> dict[str, Any]:
        """The public key set."""
        public = self.key.as_dict(private=False)
        return {"keys": [public]}


def _when(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _new_code(session: Session, grant: _Grant) -> str:
    """A one-time code for ``grant``, stored as its hash; rows past their expiry are swept."""
    session.execute(delete(OAuthGrant).where(OAuthGrant.expires_at <= _when(time.time())))
    code = secrets.token_urlsafe(32)
    session.add(
        OAuthGrant(
            code_hash=hash_token(code),
            client_id=grant.client_id,
            user_id=grant.user_id,
            session_id=grant.session_id,
            issued_at=_when(grant.issued),
            redirect_uri=grant.redirect_uri,
            nonce=grant.nonce,
            challenge=grant.challenge,
            expires_at=_when(grant.expires),
        )
    )
    return code


def _grant_of(row: OAuthGrant) -> _Grant:
    return _Grant(
        row.client_id,
        row.user_id,
        row.session_id,
        row.issued_at.timestamp(),
        row.redirect_uri,
        row.nonce,
        row.challenge,
        row.expires_at.timestamp(),
    )


def _claim_code(session: Session, code: str, token: str) -> _Grant | Literal[False] | None:
    """The grant behind ``code``, now exchanged for ``token``; or why not.

    None: no such code (never issued, or swept). False: exchanged before;
    the token it gave is revoked. The conditional ``UPDATE`` is the single
    use: of two exchanges at once, on any replicas, one sets ``token_hash``
    and the other finds it set.
    """
    code_hash = hash_token(code)
    row = session.get(OAuthGrant, code_hash)
    if row is None:
        return None
    grant = _grant_of(row)  # as issued: ``expires`` is the code's
    claimed = session.execute(
        update(OAuthGrant)
        .where(OAuthGrant.code_hash == code_hash, OAuthGrant.token_hash.is_(None))
        .values(token_hash=hash_token(token), expires_at=_when(time.time() + TOKEN_SECONDS))
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount == 1:  # type: ignore[attr-defined]
        return grant
    session.execute(
        update(OAuthGrant)
        .where(OAuthGrant.code_hash == code_hash)
        .values(revoked=True)
        .execution_options(synchronize_session=False)
    )
    return False


def oauth_state(request: Request) -> OAuthState:
    """The app's provider state (made by :func:`labgate.portal.app.create_app`)."""
    state: OAuthState = request.app.state.oauth
    return state


def _issuer(portal: Portal) -> str:
    return portal.settings.effective_public_url


@dataclass(frozen=True)
class Client:
    """Who may ask: a registered service, or a running instance (its tool)."""

    client_id: str
    secret: str
    #: Exact redirect URIs of a service; an instance takes any under its own prefix.
    redirect_uris: tuple[str, ...] = ()
    instance_prefix: str = ""

    def redirects_to(self, uri: str) -> bool:
        """Whether ``uri`` is one of this client's (never another site's or instance's)."""
        if self.instance_prefix:
            return uri.startswith(self.instance_prefix) and not _may_climb(uri)
        return uri in self.redirect_uris


def _may_climb(uri: str) -> bool:
    """Whether ``uri`` could leave its path prefix once a browser or a server reads it.

    A ``..`` segment however spelled (``%2e%2e``, ``..%2f``, ``..\\``, encoded
    twice, ``..;x``), or characters a browser drops from a URL (tabs, newlines)
    or that no well-formed URI has: refused rather than normalised.
    """
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in uri):
        return True
    path = uri.split("#", 1)[0].split("?", 1)[0]
    for _ in range(4):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    else:
        return True  # encoded over and over: nothing a real client sends
    for segment in path.replace("\\", "/").split("/"):
        bare = "".join(c for c in segment.split(";", 1)[0] if ord(c) > 0x20 and ord(c) != 0x7F)
        if bare == "..":
            return True
    return False


def _service(config: OAuthClientConfig) -> Client:
    return Client(
        config.client_id, config.client_secret.get_secret_value(), tuple(config.redirect_uris)
    )


def _instance_client(portal: Portal, session: Session, client_id: str) -> Client | None:
    instance = session.get(Instance, client_id)
    if instance is None or not instance.state.active:
        return None
    secret = portal.box.open(instance.id, instance.secret)
    if not secret:
        return None
    return Client(instance.id, secret, instance_prefix=portal.settings.instance_url(instance.id))


async def find_client(portal: Portal, client_id: str | None) -> Client | None:
    """A registered service by id, else a running instance (client id = instance id)."""
    if not client_id:
        return None
    for config in portal.settings.oauth_clients:
        if config.client_id == client_id:
            return _service(config)
    return await portal.run_db(lambda s: _instance_client(portal, s, client_id))


def _may_use(session: Session, instance_id: str, user_id: int, is_admin: bool) -> bool:
    instance = session.get(Instance, instance_id)
    if instance is None:
        return False
    if is_admin or instance.owner_id == user_id:
        return True
    return shares_for(session, user_id).get(instance_id) == ShareAccess.use.value


def _standing(portal: Portal, session: Session, grant: _Grant) -> dict[str, Any] | None:
    """The user's claims while ``grant`` still stands, else None.

    A code or token is worth what the person's sign-in and access are worth
    now, not when it was issued: signed out, sessions ended, the account
    disabled or gone, and, for an instance's client, the instance stopped
    or no longer shared with them, each ends it.
    """
    user = session.get(User, grant.user_id)
    if user is None or user.disabled:
        return None
    if grant.issued < user.sessions_valid_after.timestamp():
        return None
    if not grant.session_id or session.get(RevokedSession, grant.session_id) is not None:
        return None
    if not any(c.client_id == grant.client_id for c in portal.settings.oauth_clients):
        instance = session.get(Instance, grant.client_id)
        if instance is None or not instance.state.active:
            return None
        if not _may_use(session, instance.id, user.id, user.is_admin):
            return None
    return _claims(session, user.id)


def _claims(session: Session, user_id: int) -> dict[str, Any] | None:
    user = session.get(User, user_id)
    if user is None or user.disabled:
        return None
    groups = session.scalars(
        select(Group.name)
        .join(GroupMember, GroupMember.group_id == Group.id)
        .where(GroupMember.user_id == user_id)
        .order_by(Group.name)
    )
    return {
        "sub": str(user.id),
        "preferred_username": user.name,
        "name": user.name,
        "groups": list(groups),
    }


def _error(status: int, error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


@router.get("/.well-known/openid-configuration")
async def discovery(portal: Portal = Depends(get_portal)) -> dict[str, Any]:
    """Where the endpoints are, and what they support."""
    issuer = _issuer(portal)
    return {
        "issuer": issuer,
        "authorization_endpoint": f"{issuer}/oauth/authorize",
        "token_endpoint": f"{issuer}/oauth/token",
        "userinfo_endpoint": f"{issuer}/oauth/userinfo",
        "jwks_uri": f"{issuer}/oauth/jwks",
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "scopes_supported": ["openid", "profile", "groups"],
        "claims_supported": ["sub", "preferred_username", "name", "groups"],
    }


@router.get("/oauth/jwks")
async def jwks(request: Request) -> dict[str, Any]:
    """The public key ID tokens are signed with."""
    return oauth_state(request).jwks()


#: The parameters of an authorization request the consent page carries through its form.
AUTHORIZE_PARAMS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
)


@dataclass(frozen=True)
class _Visit:
    """A person at an instance's client: whose instance it is and what the tool would learn."""

    owner_id: int
    owner: str
    tool: str
    claims: dict[str, Any]


def _visit(session: Session, instance_id: str, user_id: int, is_admin: bool) -> _Visit | None:
    """The visit, or None when the person may not use the instance."""
    instance = session.get(Instance, instance_id)
    claims = _claims(session, user_id)
    if instance is None or claims is None or not _may_use(session, instance_id, user_id, is_admin):
        return None
    return _Visit(instance.owner_id, instance.owner.name, instance.tool, claims)


@router.get("/oauth/authorize")
async def authorize(request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """Send the signed-in person back to the client with a code (sign in first).

    Someone else's instance asks first: its owner would learn who they are.
    """
    params = {name: request.query_params.get(name, "") for name in AUTHORIZE_PARAMS}
    return await _authorize(request, portal, params, answer=None)


@router.post("/oauth/authorize")
async def authorize_answer(request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """The person's answer on the consent page (CSRF-checked): a code, or ``access_denied``."""
    form = await request.form()
    params = {name: str(form.get(name) or "") for name in AUTHORIZE_PARAMS}
    answer = form.get("decision")
    if answer not in ("allow", "deny"):
        return error_page(request, 400, "bad_answer", "Answer with Allow or Deny.")
    return await _authorize(request, portal, params, answer=str(answer))


async def _authorize(
    request: Request, portal: Portal, params: dict[str, str], answer: str | None
) -> Response:
    """Check the request, ask when it is another's instance, then redirect back with a code."""
    client = await find_client(portal, params["client_id"])
    redirect_uri = params["redirect_uri"]
    # Never redirect to an address the client did not register: say so on labgate's page.
    if client is None or not client.redirects_to(redirect_uri):
        return error_page(request, 400, "bad_client", "Unknown client or redirect URI.")
    caller = await optional_principal(request)
    if caller is None or caller.via != "session":
        if answer is not None:  # the session ended while the page was open: start again
            return RedirectResponse("/login", status_code=303)
        return RedirectResponse(login_url(request), status_code=303)
    back: dict[str, str] = {"iss": _issuer(portal)}
    if params["state"]:
        back["state"] = params["state"]
    handoff = bool(client.instance_prefix) and redirect_uri == _handoff_uri(portal, client)
    if client.instance_prefix:
        # A tool learns only about people who may use it: not its existence otherwise.
        visit = await portal.run_db(
            lambda s: _visit(s, client.client_id, caller.user_id, caller.has("admin"))
        )
        if visit is None:
            return error_page(
                request, 404, "unknown_instance", "There is no such instance of yours."
            )
        # The router's hand-off is the visit itself; a tool of someone else's asks first.
        if not handoff and visit.owner_id != caller.user_id:
            if answer is None:
                return _consent_page(request, portal, caller, client, visit, params)
            if answer == "deny":
                back["error"] = "access_denied"
                return _back(redirect_uri, back)
    challenge = params["code_challenge"]
    method = params["code_challenge_method"] or ("S256" if challenge else "")
    if (
        params["response_type"] != "code"
        or "openid" not in params["scope"].split()
        or (challenge and method != "S256")
        or (handoff and not challenge)
        or not _storable(challenge, 128)
        or not _storable(params["nonce"], 1000)
    ):
        back["error"] = "invalid_request"
    elif handoff:
        # The router's own hand-off on the instance's host: a signed code it checks in
        # memory (it never reaches this process's memory), bound to the PKCE challenge.
        back["code"] = portal.instance_grants.issue_code(
            client.client_id,
            portal.settings.instance_netloc(client.client_id),
            caller.user_id,
            caller.session_id or "",
            challenge,
        )
    else:
        now = time.time()
        grant = _Grant(
            client.client_id,
            caller.user_id,
            caller.session_id or "",
            now,
            redirect_uri,
            params["nonce"],
            challenge,
            now + CODE_SECONDS,
        )
        back["code"] = await portal.run_db(lambda s: _new_code(s, grant))
    return _back(redirect_uri, back)


def _back(redirect_uri: str, back: dict[str, str]) -> RedirectResponse:
    """The redirect to the client's ``redirect_uri`` with ``back`` in its query."""
    joiner = "&" if "?" in redirect_uri else "?"
    return RedirectResponse(f"{redirect_uri}{joiner}{urlencode(back)}", status_code=303)


def _consent_page(
    request: Request,
    portal: Portal,
    caller: Principal,
    client: Client,
    visit: _Visit,
    params: dict[str, str],
) -> Response:
    """Whose tool asks, what it would learn, and Allow / Deny (never framed: X-Frame-Options)."""
    context = page_context(
        portal,
        caller,
        "instances",
        instance_id=client.client_id,
        owner=visit.owner,
        tool=visit.tool,
        claims=visit.claims,
        params={name: value for name, value in params.items() if value},
    )
    return render(request, "oauth_consent.html", context)


def _storable(value: str, longest: int) -> bool:
    """Whether the database keeps ``value`` as sent (no NUL in PostgreSQL), not too long."""
    return len(value) <= longest and "\x00" not in value


def _handoff_uri(portal: Portal, client: Client) -> str:
    """The router's hand-off callback on an instance's own host, when instances have one."""
    if not portal.settings.instance_host:
        return ""
    return portal.settings.instance_url(client.client_id).rstrip("/") + HANDOFF_PATH


async def _client_auth(
    portal: Portal, request: Request, form_id: str | None, form_secret: str | None
) -> Client | None:
    """The client the request authenticates as: HTTP Basic or the form's fields.

    Basic credentials are each form-urlencoded before they are joined and
    encoded (RFC 6749 2.3.1), so they are decoded the same way; as some
    clients send them unencoded, the secret as sent is taken too.
    """
    client_id, secrets_sent = form_id, [form_secret] if form_secret is not None else []
    header = request.headers.get("authorization", "")
    if header.lower().startswith("basic "):
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
        except ValueError:
            return None
        raw_id, colon, raw_secret = decoded.partition(":")
        if not colon:
            return None
        client_id, secrets_sent = unquote_plus(raw_id), [unquote_plus(raw_secret), raw_secret]
    client = await find_client(portal, client_id)
    if client is None or not secrets_sent:
        return None
    # Every candidate is compared (in constant time), so timing tells nothing of which.
    matches = [same(secret, client.secret) for secret in secrets_sent]
    return client if any(matches) else None


@router.post("/oauth/token")
async def token(
    request: Request,
    grant_type: Annotated[str, Form()],
    code: Annotated[str, Form(max_length=200)],
    redirect_uri: Annotated[str, Form(max_length=2000)],
    code_verifier: Annotated[str | None, Form(max_length=200)] = None,
    client_id: Annotated[str | None, Form(max_length=64)] = None,
    client_secret: Annotated[str | None, Form(max_length=500)] = None,
    portal: Portal = Depends(get_portal),
) -> Response:
    """Exchange a code for an ID token and an access token."""
    client = await _client_auth(portal, request, client_id, client_secret)
    if client is None:
        # RFC 6749 5.2: a 401 answers with the scheme to authenticate by.
        failed = _error(401, "invalid_client", "unknown client or wrong secret")
        failed.headers["WWW-Authenticate"] = 'Basic realm="labgate", charset="UTF-8"'
        return failed
    if grant_type != "authorization_code":
        return _error(400, "unsupported_grant_type", "only authorization_code")
    access_token = secrets.token_urlsafe(32)
    exchanged = await portal.run_db(
        lambda s: _exchange(
            portal, s, code, access_token, client.client_id, redirect_uri, code_verifier or ""
        )
    )
    if isinstance(exchanged, str):
        return _error(400, "invalid_grant", exchanged)
    grant, claims = exchanged
    now = int(time.time())
    body = {
        **claims,
        "iss": _issuer(portal),
        "aud": client.client_id,
        "iat": now,
        "exp": now + TOKEN_SECONDS,
    }
    if grant.nonce:
        body["nonce"] = grant.nonce
    key = oauth_state(request).key
    header = {"alg": "ES256", "kid": key.kid, "typ": "JWT"}
    id_token = jwt.encode(header, body, key, algorithms=["ES256"])
    return JSONResponse(
        {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": TOKEN_SECONDS,
            "id_token": id_token,
        },
        headers={"Cache-Control": "no-store"},
    )


@router.get("/oauth/userinfo")
async def userinfo(request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """The claims of the access token's user."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    token = value.strip() if scheme.lower() == "bearer" else ""
    if not token:
        return _bearer_error("unknown or expired access token")
    answer = await portal.run_db(lambda s: _token_claims(portal, s, token))
    if answer is None:
        return _bearer_error("unknown or expired access token")
    if answer is False:
        return _bearer_error(
            "the sign-in behind the access token has ended (signed out, account disabled, "
            "access withdrawn or instance stopped)"
        )
    return JSONResponse(answer)


def _exchange(
    portal: Portal,
    session: Session,
    code: str,
    token: str,
    client_id: str,
    redirect_uri: str,
    verifier: str,
) -> tuple[_Grant, dict[str, Any]] | str:
    """The grant and claims ``code`` gives ``client_id`` as ``token``, or why not.

    The code is claimed first, good once whatever happens next (a wrong
    verifier or redirect URI spends it too).
    """
    grant = _claim_code(session, code, token)
    if grant is False:
        return "the code was used before; its token is revoked"
    if (
        grant is None
        or grant.expires <= time.time()
        or grant.client_id != client_id
        or grant.redirect_uri != redirect_uri
    ):
        return "the code is unknown, used, expired or not yours"
    if grant.challenge and not same(pkce_challenge(verifier), grant.challenge):
        return "the code verifier does not match"
    claims = _standing(portal, session, grant)
    if claims is None:
        return (
            "the sign-in behind the code has ended (signed out, account disabled, "
            "access withdrawn or instance stopped)"
        )
    return grant, claims


def _token_claims(
    portal: Portal, session: Session, token: str
) -> dict[str, Any] | Literal[False] | None:
    """The claims for an access token: None when unknown or expired, False when ended."""
    row = session.scalars(
        select(OAuthGrant).where(OAuthGrant.token_hash == hash_token(token))
    ).one_or_none()
    if row is None or row.revoked or row.expires_at.timestamp() <= time.time():
        return None
    claims = _standing(portal, session, _grant_of(row))
    if claims is None:
        row.revoked = True  # over for good, even if the share or session came back
        return False
    return claims


def _bearer_error(description: str) -> JSONResponse:
    """401 ``invalid_token``, with the ``WWW-Authenticate`` challenge of RFC 6750."""
    response = _error(401, "invalid_token", description)
    response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return response
