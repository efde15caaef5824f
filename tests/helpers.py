"""Helpers shared by tests: sign-in, tokens, waiting for instance states and warm pools."""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ADMIN_PASSWORD = "admin-password-for-tests"
PASSWORD = "user-password-123"
#: A key strong enough for labgate to accept (256 bits: 43 URL-safe base64 characters).
log = logging.getLogger(__name__)

TEST_SECRET_KEY = "test-key-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"

#: Warm pools of the process backend hand instances over inside the bubblewrap sandbox.
needs_pool_sandbox = pytest.mark.skipif(
    shutil.which("bwrap") is None or os.geteuid() != 0,
    reason="warm pools of the process backend need bubblewrap and root",
)


_LOGIN_TOKEN = re.compile(r'name="login_token" value="([^"]+)"')


def login_form_token(page: str) -> str:
    """The anti-CSRF token in a sign-in page (bound to the cookie the page set)."""
    match = _LOGIN_TOKEN.search(page)
    assert match is not None, page
    return match.group(1)


async def post_login_form(client: httpx.AsyncClient, data: dict[str, str]) -> httpx.Response:
    """Sign in through the HTML form as a browser does: load the form, then post it."""
    form = await client.get("/login", headers={"Accept": "text/html"})
    return await client.post("/login", data={**data, "login_token": login_form_token(form.text)})


def post_login_form_sync(client: httpx.Client, data: dict[str, str]) -> httpx.Response:
    """:func:`post_login_form` for a synchronous client."""
    form = client.get("/login", headers={"Accept": "text/html"})
    return client.post("/login", data={**data, "login_token": login_form_token(form.text)})


#: The schema every test database starts from (:func:`database_template`), once per session.
_TEMPLATE: dict[str, str] = {}


@contextlib.contextmanager
def database_template(tmp_path: Path) -> Iterator[str]:
    """A database migrated to the newest schema once, for :func:`fresh_database_url` to copy.

    Migrating a new database takes the test portal most of its start (Alembic
    runs every migration); a copy takes milliseconds and is the same schema.
    SQLite: a file; PostgreSQL: a database other databases are created from.
    """
    from labgate.db.session import Database

    server = os.environ.get("LABGATE_TEST_DB_URL")
    if not server:
        path = tmp_path / "template.db"
        db = Database(f"sqlite:///{path}")
        try:
            db.migrate()
            with db.engine.connect() as conn:
                conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        finally:
            db.dispose()
        _TEMPLATE["sqlite"] = str(path)
        try:
            yield str(path)
        finally:
            _TEMPLATE.pop("sqlite", None)
        return
    name = f"lgtest_template_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    db = Database(make_url(server).set(database=name).render_as_string(hide_password=False))
    try:
        db.migrate()
    finally:
        db.dispose()  # no connection may stay: CREATE DATABASE ... TEMPLATE needs none
    _TEMPLATE["postgresql"] = name
    try:
        yield name
    finally:
        _TEMPLATE.pop("postgresql", None)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def fresh_database_url(tmp_path: Path, *, empty: bool = False) -> Iterator[str]:
    """A fresh database: SQLite in tmp_path, or a new PostgreSQL database, dropped after.

    It has the newest schema already when the session has a template
    (:func:`database_template`), unless ``empty`` (tests of the migrations).
    """
    server = os.environ.get("LABGATE_TEST_DB_URL")
    if not server:
        path = tmp_path / "labgate.db"
        template = _TEMPLATE.get("sqlite")
        if template and not empty:
            shutil.copyfile(template, path)
            path.chmod(0o600)
        yield f"sqlite:///{path}"
        return
    name = f"lgtest_{uuid.uuid4().hex[:12]}"
    template = _TEMPLATE.get("postgresql")
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        from_template = f' TEMPLATE "{template}"' if template and not empty else ""
        conn.execute(text(f'CREATE DATABASE "{name}"{from_template}'))
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


async def token_for(
    client: httpx.AsyncClient, username: str, password: str, scopes: list[str] | None = None
) -> dict[str, str]:
    """Sign in and create an API token; returns the Authorization header."""
    login = await client.post(
        "/api/v1/auth/login", json={"username": username, "password": password}
    )
    assert login.status_code == 200, login.text
    csrf = login.json()["csrf_token"]
    body: dict[str, Any] = {"note": "tests"}
    if scopes is not None:
        body["scopes"] = scopes
    created = await client.post("/api/v1/tokens", json=body, headers={"X-CSRF-Token": csrf})
    assert created.status_code == 201, created.text
    client.cookies.clear()
    return {"Authorization": f"token {created.json()['token']}"}


def tool_headers(app: Any, instance: Any) -> dict[str, str]:
    """The header the router sends an instance's tool: its secret, opened from the database."""
    secret = app.state.portal.box.open(instance.id, instance.secret)
    assert secret, f"the stored secret of {instance.id} does not open"
    return {"Authorization": f"token {secret}"}


def tool_client(endpoint: str, **kwargs: Any) -> httpx.AsyncClient:
    """A client of the tool at ``endpoint`` itself, past the router; its base URL is the
    tool's. ``endpoint``: ``http://HOST:PORT``, or ``unix:PATH`` (a tool on its socket)."""
    if endpoint.startswith("unix:"):
        transport = httpx.AsyncHTTPTransport(uds=endpoint.removeprefix("unix:"))
        return httpx.AsyncClient(base_url="http://tool", transport=transport, **kwargs)
    return httpx.AsyncClient(base_url=endpoint, **kwargs)


async def wait_for_state(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    instance_id: str,
    states: set[str],
    timeout: float = 60,
) -> dict[str, Any]:
    """Poll an instance until it is in one of ``states``."""
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get(f"/api/v1/instances/{instance_id}", headers=headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["state"] in states:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"instance {instance_id} stuck in {body['state']}: {body}")
        await asyncio.sleep(0.1)


async def pool_instances(app: Any, tool: str) -> list[Any]:
    """The ready (running, unclaimed) instances of ``tool``'s pool on the local site."""
    from sqlalchemy import select

    from labgate.db.models import Instance

    key = f"{tool}@local"
    return await app.state.portal.run_db(
        lambda s: list(
            s.scalars(select(Instance).where(Instance.pool == key, Instance.state == "running"))
        )
    )


async def wait_for_pool(app: Any, tool: str, timeout: float = 60) -> Any:
    """The first ready instance of ``tool``'s pool, once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = await pool_instances(app, tool)
        if ready:
            return ready[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"the {tool} pool never filled")


@dataclass(frozen=True)
class Unstopped:
    """An instance :func:`stop_everything` could not stop in time, and why."""

    instance_id: str
    state: str
    why: str


#: Seconds :func:`stop_everything` tries before it gives up.
STOP_EVERYTHING_TIMEOUT = 30.0


async def stop_everything(application: Any, timeout: float | None = None) -> list[Unstopped]:
    """Stop every instance a test left behind, so no process outlives it.

    Gives up after about ``timeout`` seconds (default
    :data:`STOP_EVERYTHING_TIMEOUT`), never waiting longer: the
    instances still active or stopping then are logged (id, state, and why:
    the instance's reason, such as a stop its site could not do, or the error
    its last stop raised) and returned, so the caller can say so. ``[]``: all
    stopped.
    """
    from sqlalchemy import select

    from labgate.db.models import ACTIVE_STATES, Instance

    portal = application.state.portal
    pools = getattr(application.state, "pools", None)
    if pools is not None:
        # First stop refilling: a refill after the last round would leave a pool
        # instance running past the test (seen on PostgreSQL in CI).
        await pools.close()
    unfinished = [*ACTIVE_STATES, "stopping"]
    errors: dict[str, str] = {}
    timeout = STOP_EVERYTHING_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    # Each round stops what is active now: a stop frees start room, and a queued
    # launch the start queue moves on meanwhile is stopped in the next round.
    while True:
        ids = await portal.run_db(
            lambda s: list(s.scalars(select(Instance.id).where(Instance.state.in_(ACTIVE_STATES))))
        )
        for instance_id in ids:
            try:
                await portal.instances.stop(instance_id)
            except Exception as exc:  # kept: it says why the instance is left
                errors[instance_id] = f"its stop failed: {getattr(exc, 'detail', '') or exc!r}"
        left = await portal.run_db(
            lambda s: [
                (row.id, row.state.value, row.reason)
                for row in s.scalars(select(Instance).where(Instance.state.in_(unfinished)))
            ]
        )
        if not left:
            return []
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.1)
    unstopped = [
        Unstopped(iid, state, reason or errors.get(iid) or f"still {state}")
        for iid, state, reason in left
    ]
    for item in unstopped:
        log.error(
            "stop_everything: instance %s not stopped after %gs: %s (%s)",
            item.instance_id,
            timeout,
            item.state,
            item.why,
        )
    return unstopped


@contextlib.asynccontextmanager
async def serving(settings: Any, port: int = 0, portal: Any = None) -> AsyncIterator[Any]:
    """The portal app served by uvicorn on a loopback port (0: any) until the block ends.

    Its instances keep running afterwards (a portal restart), unless the caller
    stops them (:func:`stop_everything`). ``app.state.test_url`` is its address,
    ``app.state.test_server`` its uvicorn server. ``portal``: services built by the
    test (``build_portal``), e.g. with a leader election of its own.
    """
    import uvicorn

    from labgate.portal.app import create_app

    application = create_app(settings, portal)
    config = uvicorn.Config(
        application, host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    listener = server.servers[0].sockets[0]
    port = listener.getsockname()[1]
    application.state.test_url = f"http://127.0.0.1:{port}"
    application.state.test_server = server
    application.state.test_listener = (listener.fileno(), os.fstat(listener.fileno()).st_ino)
    LISTENER_FDS.add(listener.fileno())
    try:
        yield application
    finally:
        LISTENER_FDS.discard(listener.fileno())
        application.state.portal.begin_shutdown()  # as labgate serve does
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def replica(settings: Any, port: int = 0) -> AsyncIterator[Any]:
    """One of several portals on one database (:func:`serving`); its instances stopped after."""
    async with serving(settings, port) as app:
        try:
            yield app
        finally:
            await stop_everything(app)


#: Descriptors of the test portals' listening sockets, watched by :func:`guard_listeners`.
LISTENER_FDS: set[int] = set()
#: Where something closed one of them by number (a double close elsewhere): the stacks.
STRAY_CLOSES: list[str] = []


def guard_listeners() -> None:
    """Refuse and record any ``os.close`` of a test portal's listening socket.

    asyncio closes its listeners through their socket objects, never by number:
    an ``os.close`` of one is a descriptor closed twice somewhere (once by its
    owner, once more after the number was reused by the listener).
    """
    import traceback

    real_close = os.close

    def close(fd: int) -> None:
        if fd in LISTENER_FDS:
            stack = "".join(traceback.format_stack(limit=25))
            STRAY_CLOSES.append(stack)
            raise RuntimeError(f"os.close({fd}) of a test portal's listening socket:\n{stack}")
        real_close(fd)

    os.close = close


def socket_state(inode: int) -> str:
    """The TCP state and local address of the socket with ``inode`` (from /proc/net/tcp)."""
    states = {"0A": "LISTEN", "01": "ESTABLISHED", "06": "TIME_WAIT", "07": "CLOSE"}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[9] == str(inode):
                    local, state = fields[1], fields[3]
                    port = int(local.split(":")[1], 16)
                    return f"{states.get(state, state)} on port {port} ({table})"
    return "not in /proc/net/tcp"


def self_signed_certificate(cert: Path, key: Path, name: str = "127.0.0.1") -> int:
    """Write a self-signed certificate for 127.0.0.1 (its own CA) and its key; its serial."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o600)
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return int(certificate.serial_number)


def recorded_instance(app: Any, state: str = "pending", **fields: Any) -> str:
    """Record a demo instance of admin on the local site in ``state``; no process behind it."""
    from sqlalchemy import select

    from labgate.db.models import Instance, InstanceState, Site, User
    from labgate.security import new_id

    instance_id = new_id()

    def add(session: Any) -> None:
        owner = session.scalar(select(User).where(User.name == "admin"))
        site = session.scalar(select(Site).where(Site.name == "local"))
        session.add(
            Instance(
                id=instance_id,
                owner_id=owner.id,
                tool="demo",
                site=site,
                state=InstanceState(state),
                resources={"cpu": 0.5, "memory": 512 * 1024**2},
                **fields,
            )
        )

    app.state.portal.db.transact(add)
    return instance_id


#: Tests that need PostgreSQL itself (row locks, NOTIFY): skipped, saying how, elsewhere.
needs_postgres = pytest.mark.skipif(
    not os.environ.get("LABGATE_TEST_DB_URL", "").startswith("postgresql"),
    reason="needs PostgreSQL: apt-get install postgresql, pg_ctlcluster 15 main start, "
    "and LABGATE_TEST_DB_URL=postgresql+psycopg://USER:PASS@127.0.0.1:5432/postgres "
    "(docs/development.md)",
)


def consent_form(page: httpx.Response) -> dict[str, str]:
    """The hidden fields of labgate's consent page, as a browser posts them back."""
    assert page.status_code == 200 and 'id="consent-heading"' in page.text, page.text
    fields = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page.text)
    return {name: html.unescape(value) for name, value in fields}


async def answer(browser: httpx.AsyncClient, page: httpx.Response, decision: str) -> httpx.Response:
    """Press Allow or Deny (``decision``) on the consent ``page``."""
    return await browser.post("/oauth/authorize", data={**consent_form(page), "decision": decision})
