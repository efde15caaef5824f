"""The router's settings: one frozen dataclass, sent pickled to worker processes.

Kept out of the compiled modules (``_native.MODULES``): a dataclass compiled
with mypyc does not pickle. :mod:`labgate.router.context` copies the options
read per request onto the (compiled) context.
"""

from __future__ import annotations

from dataclasses import dataclass

from labgate.security import INSTANCE_COOKIE, SESSION_COOKIE


@dataclass(frozen=True, slots=True)
class RouterOptions:
    """Knobs of the proxy; the defaults suit a gateway in front of interactive tools."""

    login_path: str = "/login"
    """Portal page a browser without a session is sent to (with ``?next=``)."""
    forwarded_proto: str = "http"
    """``X-Forwarded-Proto`` value: the scheme of the public URL."""
    trusted_proxies: tuple[str, ...] = ()
    """Networks of proxies in front whose ``X-Forwarded-For`` names the client."""
    connect_timeout: float = 10.0
    """Seconds to open a connection to an upstream before answering 504."""
    response_timeout: float = 300.0
    """Seconds an upstream may stay silent while a response is due or streaming."""
    header_timeout: float = 30.0
    """Seconds a client has to send a complete request head."""
    keepalive_timeout: float = 75.0
    """Seconds an idle client connection is kept between requests."""
    pool_idle_timeout: float = 3.0
    """Seconds an idle upstream connection is kept (below common tool keep-alives)."""
    pool_max_idle: int = 64
    """Idle connections kept per upstream."""
    pool_max_requests: int = 1000
    """Requests an upstream connection carries before it is closed rather than kept
    (nginx's upstream ``keepalive_requests``): new connections spread again over an
    upstream's processes."""
    buffer_limit: int = 256 * 1024
    """Bytes buffered per direction before reading from the other side pauses."""
    discard_limit: int = 1024 * 1024
    """Request body bytes read and dropped after an early answer before closing instead."""
    max_pipelined: int = 64
    """Pipelined requests queued on one connection before it is closed."""
    retry_after: int = 2
    """``Retry-After`` seconds (and page refresh) while an instance is starting."""
    sweep_interval: float = 1.0
    """Seconds between deadline checks."""
    worker_index: int = 0
    """Which of the router processes sharing the public port this is (0 first)."""
    worker_count: int = 1
    """How many router processes share the public port (agents' tunnels reach each)."""
    instance_host: str = ""
    """``instance_host`` template (``{id}.apps.example.org``); empty: instances under ``/i/``."""
    instance_base_url: str = ""
    """An instance's public URL with ``{id}`` in it (scheme, host, port) when on its own host."""
    portal_url: str = ""
    """The portal's public URL: where a browser on an instance host goes for the hand-off."""
    session_cookie: str = SESSION_COOKIE
    """The portal's session cookie's name (``security.session_cookie_name``: ``__Host-``
    when cookies are Secure)."""
    instance_cookie: str = INSTANCE_COOKIE
    """The router's instance cookie's name on instance hosts
    (``security.instance_cookie_name``: ``__Host-`` when cookies are Secure)."""
    share_on_portal_origin: bool = False
    """Let admins and ``use`` shares into ``/i/<id>/`` with a portal session (the opt-in
    setting); otherwise a session cookie there opens only its user's own instances."""
