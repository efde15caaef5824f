"""Shared fixtures: settings on a temporary data dir, the portal in process, users, tokens.

Tests run against SQLite; with LABGATE_TEST_DB_URL set (a PostgreSQL URL) the
database tests run against that server instead, each test in a fresh schema.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import settings as hypothesis_settings

from helpers import (
    ADMIN_PASSWORD,
    PASSWORD,
    STRAY_CLOSES,
    TEST_SECRET_KEY,
    database_template,
    fresh_database_url,
    guard_listeners,
    serving,
    socket_state,
    stop_everything,
    token_for,
)
from labgate.config import Settings
from slurm_cluster import ACCOUNTS, Cluster, owner_accounts, start_cluster

# Timing is for benchmarks, not tests: a loaded CI machine must not turn a slow
# example into a failure (hypothesis's default deadline is 200 ms).
hypothesis_settings.register_profile("labgate", deadline=None)
hypothesis_settings.load_profile("labgate")


def pytest_itemcollected(item: pytest.Item) -> None:
    """Under pytest-xdist (``make test``: two workers), keep what shares a fixture together.

    Every test file goes to one worker as a whole (its module fixtures, a live
    portal say, start once, and its tests may reuse names such as instance
    ids), and all that use the Slurm test cluster go to the same worker: the
    cluster is the machine's one ``munged`` and a node named after the
    machine, so a second worker must not start another. So do those that use
    the Podman service: two services on root's one container storage wait on
    each other's locks (an image build holds them for minutes). Marked as each test is
    collected: xdist reads the marks in its own ``pytest_collection_modifyitems``.
    """
    if item.get_closest_marker("xdist_group") is not None:
        return
    fixtures = set(getattr(item, "fixturenames", ()))
    if "slurm_cluster" in fixtures:
        group = "slurm"
    elif fixtures & {"engine", "registry"}:
        group = "podman"
    else:
        group = item.nodeid.split("::", 1)[0]
    item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session", autouse=True)
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The newest schema, migrated once; every test database is a copy of it."""
    with database_template(tmp_path_factory.mktemp("db-template")) as template:
        yield template


@pytest.fixture(scope="session", autouse=True)
def cheap_password_hashes() -> Iterator[None]:
    """argon2 at its cheapest in this process, but where a test asks for the real cost.

    Every test portal hashes the admin's password and checks it at sign-in, and
    many tests create users: at the default cost (64 MiB, three passes: about
    0.1 s of CPU each) that is minutes of a test run spent on purpose-made
    slowness. Hashes stay argon2id and verify as before; ``labgate serve`` in
    a subprocess and tests using ``real_password_hashes`` keep the real cost.
    """
    from argon2 import PasswordHasher
    from argon2.profiles import CHEAPEST

    from labgate import security

    real = security._hasher
    security._hasher = PasswordHasher.from_parameters(CHEAPEST)
    yield
    security._hasher = real


@pytest.fixture
def real_password_hashes() -> Iterator[None]:
    """The production argon2 cost, for tests of what that cost does (login floods)."""
    from argon2 import PasswordHasher

    from labgate import security

    cheap = security._hasher
    security._hasher = PasswordHasher()
    yield
    security._hasher = cheap


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """A fresh database with the newest schema: SQLite in tmp_path, or a new PostgreSQL one."""
    with fresh_database_url(tmp_path) as url:
        yield url


@pytest.fixture
def empty_database_url(tmp_path: Path) -> Iterator[str]:
    """A fresh database with no schema at all (tests of the migrations)."""
    with fresh_database_url(tmp_path, empty=True) as url:
        yield url


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Settings for one test: its own data dir and database, quick polling."""
    from tools_fixtures import write_test_tools

    return Settings(
        data_dir=tmp_path / "var",
        tools_dir=write_test_tools(tmp_path / "tools"),
        database_url=database_url,
        admin_password=ADMIN_PASSWORD,
        secret_key=TEST_SECRET_KEY,
        poll_interval=0.2,
        stop_grace_seconds=3,
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Any]:
    """The portal app served by uvicorn on a random loopback port, in the test's loop.

    After the test, every instance it left is stopped (:func:`stop_everything`).
    One that cannot be stopped fails the test, named with its state and why: left
    unnoticed it costs every run :data:`helpers.STOP_EVERYTHING_TIMEOUT` seconds.
    """
    async with serving(settings) as application:
        try:
            yield application
        finally:
            left = await stop_everything(application)
    if left:
        named = "\n".join(f"  {item.instance_id}: {item.state} ({item.why})" for item in left)
        pytest.fail(
            f"the test left {len(left)} instance(s) that stop_everything could not stop:\n"
            f"{named}\nstop them in the test (or end its fake ones)",
            pytrace=False,
        )


def port_rules(port: int | None) -> list[str]:
    """The nftables rules that name ``port`` (Podman's published ports are DNAT rules on
    local traffic: one left over for a port the kernel gave a test portal since would
    send its connections to a container)."""
    import shutil
    import subprocess

    if port is None or shutil.which("nft") is None:
        return []
    listed = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True)
    return [line.strip() for line in listed.stdout.splitlines() if f"dport {port} " in line]


async def require_listening(application: Any) -> None:
    """Fail with what the server knows of itself if its port does not take connections.

    Seen in CI: the first request of a test was refused although uvicorn had
    started. This says whether uvicorn stopped by itself, its listening
    descriptor was closed under it, or a firewall rule names its port (the
    cause found: a Podman DNAT rule left over from a container of an earlier
    test, for a port the kernel then gave this portal).
    """
    import asyncio
    import os

    server = application.state.test_server
    url = httpx.URL(application.state.test_url)
    try:
        _, writer = await asyncio.open_connection(url.host, url.port)
    except OSError as exc:
        listener = server.servers[0].sockets[0]
        fd = listener.fileno()
        first_fd, first_inode = application.state.test_listener
        try:
            target = os.readlink(f"/proc/self/fd/{fd}") if fd >= 0 else "closed"
        except OSError as err:
            target = f"unreadable ({err.strerror})"
        pytest.fail(
            f"the test portal at {url} refuses connections ({exc}): should_exit="
            f"{server.should_exit}, serving={server.servers[0].is_serving()}, "
            f"listener fd {fd} -> {target}; at start fd {first_fd} was inode {first_inode}, "
            f"which is {socket_state(first_inode)}; stray closes: {STRAY_CLOSES or 'none'}; "
            f"firewall rules naming the port: {port_rules(url.port) or 'none'}"
        )
    writer.close()
    await writer.wait_closed()


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the test's portal server."""
    await require_listening(app)
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=30) as c:
        yield c


@pytest.fixture
async def admin_headers(client: httpx.AsyncClient) -> dict[str, str]:
    """An admin API token."""
    return await token_for(client, "admin", ADMIN_PASSWORD, ["admin", "account"])


@pytest.fixture
async def make_user(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> Any:
    """Create users on demand; returns their token headers."""

    async def make(
        name: str, *, is_admin: bool = False, data_provider: bool = False
    ) -> dict[str, str]:
        created = await client.post(
            "/api/v1/users",
            json={"name": name, "password": PASSWORD, "is_admin": is_admin},
            headers=admin_headers,
        )
        assert created.status_code == 201, created.text
        if data_provider:
            granted = await client.patch(
                f"/api/v1/users/{name}", json={"data_provider": True}, headers=admin_headers
            )
            assert granted.status_code == 200, granted.text
        return await token_for(client, name, PASSWORD)

    return make


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    """munged, slurmctld and slurmd on this machine (one node); skips outside CI without them.

    With the test users' Unix accounts (``lgslurm-alice``...), a shared directory they
    pass through (``area()``) and a Python they run: see ``owner_accounts``.
    Here, not in tests/backends: the browser tests of a Slurm site's launch form share it.
    """
    with start_cluster() as cluster, owner_accounts(cluster):
        yield cluster


@pytest.fixture(scope="session")
def slurm_accounts(slurm_cluster: Cluster) -> dict[str, str]:
    """The test users' Unix accounts on the cluster (labgate name -> account), made for the session.

    ``slurm_cluster.options()`` maps the users to them; a job runs as its owner's.
    """
    return dict(ACCOUNTS)


@pytest.fixture(scope="session", autouse=True)
def no_stray_closes() -> Iterator[None]:
    """No code may close a test portal's listening socket by its number (a double close)."""
    guard_listeners()
    yield
    assert STRAY_CLOSES == [], "descriptors closed twice:\n" + "\n".join(STRAY_CLOSES)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_tools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the session, no tool started by a test may still run (and none is left behind)."""
    import signal

    base = str(tmp_path_factory.getbasetemp())
    yield
    leftovers: list[int] = []
    described: list[str] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if b"LABGATE_INSTANCE_ID=" in environ and cwd.startswith(base):
            leftovers.append(int(entry.name))
            marker = next(v for v in environ.split(b"\0") if v.startswith(b"LABGATE_INSTANCE_ID="))
            described.append(f"{entry.name} ({marker.decode(errors='replace')}, cwd {cwd})")
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert leftovers == [], f"tests left tool processes running: {described}"


@pytest.fixture
async def router_url(app: Any, settings: Settings) -> AsyncIterator[str]:
    """A router in front of the test portal, wired into its activity board as `serve` does."""
    from labgate.router import start_router

    portal = app.state.portal
    router = await start_router(portal.routes.table, "127.0.0.1", 0, app.state.test_url, settings)
    portal.activity.local = router.activities
    portal.activity.local_stats = lambda: router.ctx.stats
    port = router.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        portal.activity.local = None
        portal.activity.local_stats = None
        await router.close()
