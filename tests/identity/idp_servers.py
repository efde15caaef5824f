"""Real identity providers for the tests: npm's oidc-provider and Debian's slapd (fixtures).

Both are started once per session. Outside CI a missing one skips its tests
with the command that installs it; with CI=true nothing skips.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import ADMIN_PASSWORD, TEST_SECRET_KEY, self_signed_certificate
from labgate.config import IdentityProviderConfig, Settings
from servers import OIDCProvider, free_port

IN_CI = os.environ.get("CI") == "true"
#: The provider names the tests configure; each has a callback URL registered at the provider.
OIDC_NAMES = ("uni", "campus")


def need(ok: bool, reason: str) -> None:
    if not ok:
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def portal_port() -> int:
    """One port for every identity test's portal: the provider knows its callback URLs."""
    return free_port()


@pytest.fixture(scope="session")
def oidc_issuer(portal_port: int) -> Iterator[str]:
    """npm's oidc-provider on a free loopback port, with a client for labgate."""
    need(shutil.which("node") is not None, "needs node: apt-get install nodejs")
    missing = OIDCProvider.missing()
    need(missing is None, missing or "")
    provider = OIDCProvider(
        [f"http://127.0.0.1:{portal_port}/login/{n}/callback" for n in OIDC_NAMES]
    )
    provider.start()
    try:
        yield provider.issuer
    finally:
        provider.stop()


def oidc_config(name: str, issuer: str, **policy: Any) -> IdentityProviderConfig:
    options = {
        "issuer": issuer,
        "client_id": OIDCProvider.CLIENT_ID,
        "client_secret": OIDCProvider.CLIENT_SECRET,
        "scopes": "openid profile email groups",
    }
    return IdentityProviderConfig(
        name=name, kind="oidc", label=f"Sign in with {name}", options=options, **policy
    )


@pytest.fixture
async def portal_with(tmp_path: Path, database_url: str, portal_port: int) -> AsyncIterator[Any]:
    """Start a portal on ``portal_port`` with the given identity providers; returns its URL."""
    import uvicorn

    from labgate.portal.app import create_app

    running: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(providers: list[IdentityProviderConfig], **extra: Any) -> Any:
        settings = Settings(
            data_dir=tmp_path / "var",
            database_url=database_url,
            admin_password=ADMIN_PASSWORD,
            secret_key=TEST_SECRET_KEY,
            public_url=f"http://127.0.0.1:{portal_port}",
            identity_providers=providers,
            **extra,
        )
        app = create_app(settings)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=portal_port, log_level="warning", lifespan="on"
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        deadline = time.monotonic() + 20
        while not server.started:
            if task.done():
                task.result()
            assert time.monotonic() < deadline, "the portal did not start"
            await asyncio.sleep(0.01)
        running.append((server, task))
        app.state.test_url = f"http://127.0.0.1:{portal_port}"
        return app

    try:
        yield start
    finally:
        for server, task in running:
            server.should_exit = True
            await task


# --- slapd -------------------------------------------------------------------------------

BASE = "dc=lab,dc=example"
LDIF = f"""dn: {BASE}
objectClass: dcObject
objectClass: organization
o: lab
dc: lab

dn: ou=people,{BASE}
objectClass: organizationalUnit
ou: people

dn: ou=groups,{BASE}
objectClass: organizationalUnit
ou: groups

dn: uid=alice,ou=people,{BASE}
objectClass: inetOrgPerson
uid: alice
cn: Alice
sn: A
mail: alice@lab.example
userPassword: alice-ldap-pw

dn: uid=bob,ou=people,{BASE}
objectClass: inetOrgPerson
uid: bob
cn: Bob
sn: B
mail: bob@lab.example
userPassword: bob-ldap-pw

dn: cn=reader,{BASE}
objectClass: inetOrgPerson
cn: reader
sn: R
userPassword: reader-pw

dn: cn=physics,ou=groups,{BASE}
objectClass: groupOfNames
cn: physics
member: uid=alice,ou=people,{BASE}
"""


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the CA the tests trust)."""
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    self_signed_certificate(cert_path, key_path)
    return cert_path, key_path


class Directory:
    """A running slapd: its ldap:// and ldaps:// URLs and the CA file to trust."""

    def __init__(self, ldap_url: str, ldaps_url: str, ca_file: str) -> None:
        self.ldap_url, self.ldaps_url, self.ca_file = ldap_url, ldaps_url, ca_file


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Directory]:
    """Debian's slapd with a small directory (two people, a group), plain, StartTLS and LDAPS."""
    binary = "/usr/sbin/slapd"
    need(
        Path(binary).exists() and shutil.which("slapadd") is not None,
        "needs slapd: apt-get install slapd ldap-utils",
    )
    root = tmp_path_factory.mktemp("slapd")
    (root / "db").mkdir()
    cert, key = _certificate(root)
    conf = root / "slapd.conf"
    conf.write_text(
        f"""include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {root}/slapd.pid
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
database mdb
suffix "{BASE}"
rootdn "cn=admin,{BASE}"
directory {root}/db
access to attrs=userPassword by anonymous auth by self read by * none
access to * by * read
"""
    )
    (root / "data.ldif").write_text(LDIF)
    subprocess.run(
        ["slapadd", "-f", str(conf), "-l", str(root / "data.ldif")],
        check=True,
        capture_output=True,
    )
    port, tls_port = free_port(), free_port()
    urls = f"ldap://127.0.0.1:{port}/ ldaps://127.0.0.1:{tls_port}/"
    proc = subprocess.Popen(
        [binary, "-f", str(conf), "-h", urls, "-d", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "slapd exited"
                assert time.monotonic() < deadline, "slapd did not start"
                time.sleep(0.05)
        yield Directory(f"ldap://127.0.0.1:{port}", f"ldaps://127.0.0.1:{tls_port}", str(cert))
    finally:
        proc.terminate()
        proc.wait(10)
