"""Credentials: password hashes, API tokens, signed session cookies, CSRF tokens.

Shared by the portal (which issues and checks them against the database) and
the router (which checks them in memory on every request). Nothing here
touches the database.

- Passwords: argon2id through argon2-cffi.
- API tokens: ``lg_<random>``; only their SHA-256 is stored. Tokens carry 256
  bits of randomness, so a fast hash is safe and lets a lookup be one index
  probe (argon2 is for low-entropy secrets such as passwords).
- Site tokens: ``lgs_<random>``, the enrolment token a network site's agent
  dials in with; stored the same way (SHA-256 only), shown once.
- Sessions: an itsdangerous-signed ``{"u": user_id, "s": session_id}`` in an
  HttpOnly, SameSite=Lax cookie. The signature carries the issue time; a
  session is revoked by its id (logout) or by the user's
  ``sessions_valid_after`` (password change, disable). The cookie is named
  by :func:`session_cookie_name`: ``__Host-labgate-session`` when cookies
  are Secure, which no other host (a sibling instance host) can plant, and
  a request that holds the name more than once has no session
  (:func:`cookie_count`).
- CSRF: an HMAC of the session id, sent back in ``X-CSRF-Token`` (or a form
  field) on cookie-authenticated state changes.
- Tunnel tickets: what a network site's agent shows the router to open its
  instance tunnel's data connection (:class:`TunnelTickets`): an HMAC under a
  key derived from the signing key, naming the site and the agent's control
  connection, valid for a minute. The portal issues them; the router checks
  them in memory.
- Instance secrets (what the router sends a tool in ``Authorization``): random,
  stored sealed (AES-256-GCM under a key derived from the signing key, bound to
  the instance id) by :class:`SecretBox`, so the database alone opens no tool.
- Per-instance origins (``instance_host``): the portal's signed one-time
  hand-off codes and the router's instance cookies (:class:`InstanceGrants`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from itsdangerous import BadSignature, URLSafeTimedSerializer

#: The session cookie's name over plain http (cookies not Secure).
SESSION_COOKIE = "labgate-session"
#: Its name when cookies are Secure: a browser takes a ``__Host-`` cookie only from the
#: host itself, Secure, with ``Path=/`` and no ``Domain``, so a sibling host cannot toss one.
SECURE_SESSION_COOKIE = "__Host-labgate-session"
#: Both names: neither may reach a tool, nor be set by one.
SESSION_COOKIES = (SESSION_COOKIE, SECURE_SESSION_COOKIE)
CSRF_HEADER = "X-CSRF-Token"
CSRF_FORM_FIELD = "csrf_token"
TOKEN_PREFIX = "lg_"  # noqa: S105 - a prefix, not a secret
ROUTER_TOKEN_PREFIX = "lgr_"  # noqa: S105 - a prefix, not a secret
SITE_TOKEN_PREFIX = "lgs_"  # noqa: S105 - a prefix, not a secret

SCOPES: dict[str, str] = {
    "instances:read": "list and show your instances, read their logs and events",
    "instances:write": "launch and stop your instances",
    "instances:access": "use your instances' tools through the router",
    "account": "read and change your own account and tokens",
    "datasets:write": (
        "register datasets (data providers and admins only), update and delete "
        "the ones you registered (admins: all)"
    ),
    "sites:report": "say what sites hold: inventory pushes and replicas (admins only)",
    "admin": "everything, for every user (only tokens of admins)",
}
#: What the router token carries: the route stream and activity reports. Not in
#: :data:`SCOPES`: no session or API token can hold it, an admin's included.
ROUTER_SCOPE = "router"

_hasher = PasswordHasher()


def host_only(name: str, secure: bool) -> str:
    """``name`` as labgate's cookies are called: ``__Host-<name>`` when cookies are Secure.

    Browsers take a ``__Host-`` cookie only from the host itself (Secure,
    ``Path=/``, no ``Domain``), so a page on a sibling host (an instance host)
    cannot plant one; over plain http such a name would be refused, so the
    plain one stays, and a copy sent twice counts for nothing
    (:func:`cookie_count`).
    """
    return f"__Host-{name}" if secure else name


def session_cookie_name(secure: bool) -> str:
    """The session cookie's name: ``__Host-labgate-session`` when cookies are Secure.

    ``secure`` is ``Settings.effective_cookie_secure``. Over plain http a
    ``__Host-`` cookie would be refused by the browser, so the plain name
    stays; there a page on a sibling host can plant a cookie of that name
    (``Domain=<parent>``), which :func:`cookie_count` makes worthless.
    """
    return host_only(SESSION_COOKIE, secure)


def instance_cookie_name(secure: bool) -> str:
    """The router's instance cookie's name: ``__Host-labgate-instance`` when cookies are Secure.

    ``secure`` is ``Settings.effective_cookie_secure``, as for
    :func:`session_cookie_name`: a page on a sibling instance host can plant
    ``labgate-instance`` for a parent domain and any path, but no
    ``__Host-`` cookie.
    """
    return host_only(INSTANCE_COOKIE, secure)


def cookie_count(headers: Iterable[str], name: str) -> int:
    """How many times the ``Cookie`` header values ``headers`` hold a cookie called ``name``.

    More than one is a cookie tossed in beside the real one (a sibling host's
    ``Domain=`` cookie of the same name): the browser sends both, and which
    one a parser keeps is up to it, so such a request counts as having none.
    Names are compared as cookie parsers read them (whitespace around them dropped).
    """
    found = 0
    for header in headers:
        if name not in header:
            continue
        for part in header.split(";"):
            if part.partition("=")[0].strip() == name:
                found += 1
    return found


def tossed_cookie_clearers(name: str, host: str, *, secure: bool, path: str = "/") -> list[str]:
    """``Set-Cookie`` values that expire cookies called ``name`` another host tossed at ``host``.

    A page on a sibling or child host can set ``name`` with ``Domain=`` the
    host itself or any of its parent domains, and with any ``Path``; a
    browser that holds such a cookie sends it beside the host's own on every
    request under that path, and labgate then counts neither
    (:func:`cookie_count`). These expire it for each of those domains and
    each path the browser could have sent it for with a request to ``path``
    (``/``, and every prefix of ``path`` that ends a segment, with and
    without its ``/``; at most :data:`_CLEARED_PATHS`), so the browser can
    sign in again (a browser that follows RFC 6265 rather than 6265bis may
    drop the host's own cookie of that name with the first: it counted for
    nothing anyway). Nothing for an IP address; single-label domains are left
    out (browsers refuse them). A ``__Host-`` name cannot have been tossed:
    only the host's own copy is expired (without ``Domain``, as the prefix
    requires).
    """
    attributes = "; Max-Age=0; HttpOnly; SameSite=Lax" + ("; Secure" if secure else "")
    if name.startswith("__Host-"):
        return [f"{name}=; Path=/{attributes}"]
    host = host.strip().lower().rstrip(".")
    if not host or host.replace(".", "").isdigit() or ":" in host:
        return []
    labels = host.split(".")
    domains = [".".join(labels[i:]) for i in range(len(labels) - 1)]
    return [
        f"{name}=; Domain={domain}; Path={cookie_path}{attributes}"
        for cookie_path in cookie_paths(path)
        for domain in domains
    ]


#: Paths :func:`tossed_cookie_clearers` expires a tossed cookie for, at most.
_CLEARED_PATHS = 16


def cookie_paths(path: str) -> list[str]:
    """The ``Path`` attributes of cookies a browser sends with a request to ``path``.

    RFC 6265 5.1.4: ``path`` itself, and each prefix of it that ends with a
    ``/`` or just before one: for ``/a/b``, ``/``, ``/a``, ``/a/`` and
    ``/a/b``. The query is not part of it; at most :data:`_CLEARED_PATHS`
    of them (the shortest).
    """
    path = path.partition("?")[0].partition("#")[0]
    paths = ["/"]
    if not path.startswith("/"):
        return paths
    for i, char in enumerate(path):
        if char == "/":
            for prefix in (path[:i], path[: i + 1]):
                if prefix and prefix not in paths:
                    paths.append(prefix)
    if path not in paths:
        paths.append(path)
    return paths[:_CLEARED_PATHS]


def hash_password(password: str) -> str:
    """An argon2id hash of ``password``."""
    return _hasher.hash(password)


def hash_is_current(password_hash: str) -> bool:
    """Whether ``password_hash`` was made with the hasher's present cost parameters."""
    try:
        return not _hasher.check_needs_rehash(password_hash)
    except InvalidHashError:
        return False


def verify_password(password_hash: str, password: str) -> bool:
    """Whether ``password`` matches ``password_hash``."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def new_api_token() -> str:
    """A fresh API token, shown to its owner once."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_site_token() -> str:
    """A fresh enrolment token of a network site's agent, shown to the admin once."""
    return SITE_TOKEN_PREFIX + secrets.token_urlsafe(32)


def utf8(text: str) -> bytes:
    """``text`` as UTF-8, whatever it holds: text from a request may hold lone surrogates."""
    return text.encode("utf-8", "surrogatepass")


def same(given: str | bytes, expected: str | bytes) -> bool:
    """Whether a secret a caller sent is the expected one, in constant time.

    Any text compares (``hmac.compare_digest`` refuses non-ASCII ``str``): a
    credential with odd characters is simply wrong, never an error.
    """
    a = utf8(given) if isinstance(given, str) else given
    b = utf8(expected) if isinstance(expected, str) else expected
    return hmac.compare_digest(a, b)


def hash_token(token: str) -> str:
    """The stored form of an API token or a site token."""
    return hashlib.sha256(utf8(token)).hexdigest()


def router_token(key: str) -> str:
    """The credential router processes use for the route stream, derived from the signing key.

    Every process that can check session cookies holds the key anyway, so a
    separate secret would add nothing; the token grants only the ``router``
    scope (the route stream and activity reports) and nothing else.
    """
    digest = hmac.new(key.encode(), b"labgate.router", hashlib.sha256).hexdigest()
    return ROUTER_TOKEN_PREFIX + digest


#: Prefix of a task attempt's token (what its executor reports with).
TASK_TOKEN_PREFIX = "lgk_"  # noqa: S105 - a prefix, not a secret


def task_token(key: str, attempt_id: str) -> str:
    """The token of one batch task attempt, derived from the signing key and its id.

    It lets whoever holds it add notes to that attempt's run while the attempt
    is under way (``POST /api/v1/tasks/<attempt id>/events``), and nothing else:
    it is no API token, and another attempt's id does not match it.
    """
    derived = hmac.new(key.encode(), b"labgate.task-tokens", hashlib.sha256).digest()
    digest = hmac.new(derived, attempt_id.encode(), hashlib.sha256).hexdigest()
    return TASK_TOKEN_PREFIX + digest


def executor_token(key: str, attempt_id: str) -> str:
    """The token of one attempt's executor: what it reports the attempt's state and result with.

    Derived like :func:`task_token` but apart from it: the task itself holds
    its notes token (``$LABGATE_TASK_TOKEN``), never this one (its executor
    keeps it in the attempt's ``task.json``), so a task cannot end its own
    attempt early. It is good for ``POST /api/v1/tasks/<attempt id>/state`` and
    ``/events`` of that attempt while it is under way, and nothing else.
    """
    derived = hmac.new(key.encode(), b"labgate.task-executor-tokens", hashlib.sha256).digest()
    digest = hmac.new(derived, attempt_id.encode(), hashlib.sha256).hexdigest()
    return TASK_TOKEN_PREFIX + digest


TICKET_PREFIX = "lgt_"


class TunnelTickets:
    """Issues and checks tunnel tickets: ``lgt_<site>.<epoch>.<expires>.<mac>``.

    ``epoch`` names one control connection of the site's agent; the router
    also requires it to be the site's current one (the route feed says), so
    a ticket dies with the connection it was issued on, at once, whatever its
    expiry. Site names and epochs hold no dots (site names are slugs).
    """

    def __init__(self, key: str) -> None:
        self._key = hmac.new(key.encode(), b"labgate.tunnel-tickets", hashlib.sha256).digest()

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()

    def issue(self, site: str, epoch: str, ttl: float, now: float | None = None) -> str:
        """A ticket for ``site``'s control connection ``epoch``, valid for ``ttl`` seconds."""
        if "." in site or "." in epoch:
            raise ValueError("site names and epochs hold no dots")
        expires = int((time.time() if now is None else now) + ttl)
        body = f"{site}.{epoch}.{expires}"
        return f"{TICKET_PREFIX}{body}.{self._mac(body)}"

    def check(self, ticket: str, now: float | None = None) -> tuple[str, str] | None:
        """``(site, epoch)`` of a genuine, unexpired ticket, else None."""
        if not ticket.startswith(TICKET_PREFIX):
            return None
        body, _, mac = ticket[len(TICKET_PREFIX) :].rpartition(".")
        parts = body.split(".")
        if len(parts) != 3 or not (parts[2].isascii() and parts[2].isdigit()):
            return None
        if not same(mac, self._mac(body)):
            return None
        if int(parts[2]) < (time.time() if now is None else now):
            return None
        return parts[0], parts[1]


#: How a sealed instance secret starts; a plain one (``token_urlsafe``) never holds a dot.
SEALED_PREFIX = "s1."
_NONCE_BYTES = 12


class SecretBox:
    """Seals instance secrets for the database and opens them again.

    AES-256-GCM under a key derived from the signing key; the instance id is
    the associated data, so a sealed secret copied onto another row does not
    open. A secret sealed under another signing key does not open either
    (:meth:`open` answers None): changing ``secret_key`` cuts running
    instances off from the router, as it signs everyone out.
    """

    def __init__(self, key: str) -> None:
        # Imported here: router processes import this module too, and cryptography's
        # bindings add about 7 MiB to each of them (measured) for nothing they use.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        derived = hmac.new(key.encode(), b"labgate.instance-secrets", hashlib.sha256).digest()
        self._aead = AESGCM(derived)

    @staticmethod
    def is_sealed(value: str) -> bool:
        """Whether ``value`` is a sealed secret (else a plain one from before sealing)."""
        return value.startswith(SEALED_PREFIX)

    def seal(self, instance_id: str, secret: str) -> str:
        """The stored form of an instance's secret."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, secret.encode(), instance_id.encode())
        return SEALED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def open(self, instance_id: str, stored: str) -> str | None:
        """The secret behind a stored value, or None when it does not open with this key."""
        from cryptography.exceptions import InvalidTag

        if not self.is_sealed(stored):
            return None
        data = stored[len(SEALED_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
            opened = self._aead.decrypt(
                raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], instance_id.encode()
            )
        except (InvalidTag, ValueError, binascii.Error):
            return None
        return opened.decode()

    def new_secret(self, instance_id: str) -> str:
        """A fresh random secret for an instance, sealed."""
        return self.seal(instance_id, secrets.token_urlsafe(32))


def new_id(nbytes: int = 8) -> str:
    """A random lowercase id safe in URLs and host names (e.g. instance ids)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(nbytes * 3 // 2))


@dataclass(frozen=True)
class SessionClaim:
    """What a valid session cookie says."""

    user_id: int
    session_id: str
    issued_at: float


class SessionSigner:
    """Signs and checks session cookies and derives CSRF tokens."""

    def __init__(self, key: str, max_age: int) -> None:
        self.key = key
        self._serializer = URLSafeTimedSerializer(key, salt="labgate.session")
        self._csrf_key = hashlib.sha256(b"labgate.csrf:" + key.encode()).digest()
        self.max_age = max_age

    def issue(self, user_id: int, session_id: str | None = None) -> tuple[str, str]:
        """A new cookie value and its session id (``session_id`` renewed, else a new one)."""
        session_id = session_id or secrets.token_urlsafe(16)
        # The precise issue time travels inside the payload: the signature's own
        # timestamp has whole seconds, too coarse to compare with a revocation.
        value = self._serializer.dumps({"u": user_id, "s": session_id, "t": time.time()})
        return value, session_id

    def check(self, value: str) -> SessionClaim | None:
        """The claim in a cookie value, or None when forged, garbled or expired."""
        try:
            data, issued = self._serializer.loads(
                value, max_age=self.max_age, return_timestamp=True
            )
        except (BadSignature, ValueError, TypeError):
            return None
        if not isinstance(data, dict):
            return None
        user_id, session_id, issued_at = data.get("u"), data.get("s"), data.get("t")
        if not isinstance(user_id, int) or not isinstance(session_id, str):
            return None
        if not isinstance(issued_at, int | float):
            issued_at = issued.timestamp()
        return SessionClaim(user_id=user_id, session_id=session_id, issued_at=float(issued_at))

    def csrf_token(self, session_id: str) -> str:
        """The CSRF token bound to a session."""
        return hmac.new(self._csrf_key, session_id.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, session_id: str, token: str | None) -> bool:
        """Whether ``token`` is the CSRF token of the session."""
        return token is not None and same(token, self.csrf_token(session_id))


# --- per-instance origins (``instance_host``) ---------------------------------

#: The router's cookie on an instance's own host name (host-only, HttpOnly), over plain http.
INSTANCE_COOKIE = "labgate-instance"
#: Its name when cookies are Secure: no sibling host can plant a ``__Host-`` cookie.
SECURE_INSTANCE_COOKIE = "__Host-labgate-instance"
#: Both names: neither may reach a tool, nor be set by one.
INSTANCE_COOKIES = (INSTANCE_COOKIE, SECURE_INSTANCE_COOKIE)
#: The hand-off's state cookie on an instance host, while the browser visits the portal.
HANDOFF_COOKIE = "labgate-handoff"
#: Where the portal sends the browser back to on an instance host; the router's own path.
HANDOFF_PATH = "/_labgate/callback"
#: Seconds a hand-off code is good for.
HANDOFF_CODE_SECONDS = 60
#: Seconds a browser has to come back from the portal with a code.
HANDOFF_STATE_SECONDS = 600


def pkce_challenge(verifier: str) -> str:
    """The S256 code challenge of a PKCE verifier (RFC 7636)."""
    digest = hashlib.sha256(utf8(verifier)).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class HandoffCode:
    """What a genuine hand-off code says: who may have which instance, on which host."""

    instance_id: str
    host: str
    user_id: int
    session_id: str
    challenge: str
    nonce: str
    expires_at: float


@dataclass(frozen=True)
class HandoffState:
    """What the router keeps in the browser while it visits the portal."""

    instance_id: str
    state: str
    verifier: str
    target: str


@dataclass(frozen=True)
class InstanceClaim:
    """What a genuine instance cookie says."""

    instance_id: str
    host: str
    user_id: int
    session_id: str
    issued_at: float


class InstanceGrants:
    """Hand-off codes (portal to router) and instance cookies (router to browser).

    With ``instance_host`` set, an instance is served on its own host name
    and the portal's session cookie never goes there. The portal, having
    checked that the signed-in person may use the instance, signs a one-time
    code naming the instance, its host, the user, their portal session and
    the router's PKCE challenge; the router checks it in memory (signature,
    60 s expiry, instance, host, challenge, nonce not used before) and sets
    an instance cookie that names the same instance, host, user and session.
    Each kind is signed under its own salt, so one is never taken for another
    or for a session cookie.
    """

    def __init__(self, key: str, max_age: int) -> None:
        self.max_age = max_age
        self._codes = URLSafeTimedSerializer(key, salt="labgate.instance-code")
        self._cookies = URLSafeTimedSerializer(key, salt="labgate.instance-cookie")
        self._states = URLSafeTimedSerializer(key, salt="labgate.instance-handoff")

    def issue_code(
        self, instance_id: str, host: str, user_id: int, session_id: str, challenge: str
    ) -> str:
        """A one-time code for ``user_id`` to get ``instance_id``'s cookie on ``host``."""
        expires = time.time() + HANDOFF_CODE_SECONDS
        payload = {
            "i": instance_id,
            "h": host,
            "u": user_id,
            "s": session_id,
            "c": challenge,
            "n": secrets.token_urlsafe(12),
            "e": expires,
        }
        return self._codes.dumps(payload)

    def check_code(self, value: str, now: float | None = None) -> HandoffCode | None:
        """The claim of a genuine, unexpired code (its single use is the caller's to enforce)."""
        data = _loads(self._codes, value, HANDOFF_CODE_SECONDS + 1)
        if data is None:
            return None
        try:
            code = HandoffCode(
                str(data["i"]),
                str(data["h"]),
                int(data["u"]),
                str(data["s"]),
                str(data["c"]),
                str(data["n"]),
                float(data["e"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        if code.expires_at <= (time.time() if now is None else now):
            return None
        return code

    def issue_state(self, instance_id: str, target: str) -> tuple[str, HandoffState]:
        """A hand-off state cookie value for a browser sent to the portal from ``target``."""
        state = HandoffState(
            instance_id, secrets.token_urlsafe(16), secrets.token_urlsafe(32), target
        )
        value = self._states.dumps(
            {"i": instance_id, "t": state.state, "v": state.verifier, "p": target}
        )
        return value, state

    def check_state(self, value: str) -> HandoffState | None:
        """The hand-off state in a genuine cookie value not older than ten minutes."""
        data = _loads(self._states, value, HANDOFF_STATE_SECONDS)
        if data is None:
            return None
        try:
            return HandoffState(str(data["i"]), str(data["t"]), str(data["v"]), str(data["p"]))
        except KeyError:
            return None

    def issue_cookie(self, instance_id: str, host: str, user_id: int, session_id: str) -> str:
        """The value of an instance cookie."""
        payload = {"i": instance_id, "h": host, "u": user_id, "s": session_id, "t": time.time()}
        return self._cookies.dumps(payload)

    def check_cookie(self, value: str) -> InstanceClaim | None:
        """The claim of a genuine instance cookie within ``max_age`` (the session lifetime)."""
        data = _loads(self._cookies, value, self.max_age)
        if data is None:
            return None
        try:
            return InstanceClaim(
                str(data["i"]), str(data["h"]), int(data["u"]), str(data["s"]), float(data["t"])
            )
        except (KeyError, TypeError, ValueError):
            return None


def _loads(serializer: URLSafeTimedSerializer, value: str, max_age: int) -> dict[str, Any] | None:
    try:
        data = serializer.loads(value, max_age=max_age)
    except (BadSignature, ValueError, TypeError):
        return None
    return data if isinstance(data, dict) else None
