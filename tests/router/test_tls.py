"""HTTPS at the front door: a real ``labgate serve`` with a certificate, renewed while it runs.

One server for the module (it takes a few seconds to start): TLS on the
public port, plain HTTP redirected, HSTS and ``Secure`` cookies, and a new
certificate picked up without a restart (a broken one is not).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from helpers import self_signed_certificate
from servers import LabgateServer, free_port

ADMIN = "admin-password-for-tls"


def write_certificate(cert: Path, key: Path, name: str) -> int:
    """A self-signed certificate for 127.0.0.1 named ``name``; its serial number."""
    return self_signed_certificate(cert, key, name)


def served_serial(port: int) -> int:
    """The serial number of the certificate the router presents now."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabgateServer]:
    base = tmp_path_factory.mktemp("tls")
    cert, key = base / "cert.pem", base / "key.pem"
    write_certificate(cert, key, "first")
    server = LabgateServer(
        base / "var",
        ADMIN,
        LABGATE_TLS_CERT_FILE=str(cert),
        LABGATE_TLS_KEY_FILE=str(key),
        LABGATE_TLS_RELOAD_INTERVAL="0.2",
        LABGATE_HTTP_REDIRECT_PORT=str(free_port()),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_https_with_hsts_and_secure_cookies(tls_server: LabgateServer) -> None:
    assert tls_server.url.startswith("https://")
    with httpx.Client(base_url=tls_server.url, verify=tls_server.verify, timeout=10) as client:
        page = client.get("/login")
        assert page.status_code == 200
        assert page.headers["strict-transport-security"] == "max-age=31536000"
        login = client.post("/api/v1/auth/login", json={"username": "admin", "password": ADMIN})
        assert login.status_code == 200, login.text
        cookie = login.headers["set-cookie"]
        assert "secure" in cookie.lower(), cookie
    # Plain HTTP on the TLS port gets nowhere.
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_server.url.replace("https://", "http://") + "/login", timeout=5)


def test_plain_http_is_redirected_to_https(tls_server: LabgateServer) -> None:
    port = int(tls_server.env["LABGATE_HTTP_REDIRECT_PORT"])
    answer = httpx.get(f"http://127.0.0.1:{port}/i/abc/lab?x=1", timeout=5)
    assert answer.status_code == 308
    assert answer.headers["location"] == f"{tls_server.url}/i/abc/lab?x=1"
    assert "set-cookie" not in answer.headers
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"garbage\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 400 ")


def test_a_renewed_certificate_is_served_without_a_restart(
    tls_server: LabgateServer, tmp_path: Path
) -> None:
    cert = Path(tls_server.env["LABGATE_TLS_CERT_FILE"])
    key = Path(tls_server.env["LABGATE_TLS_KEY_FILE"])
    before = served_serial(tls_server.port)
    # A half-written renewal (a key that does not match) is refused; the old one stays.
    write_certificate(tmp_path / "other.pem", tmp_path / "other-key.pem", "other")
    key.write_bytes((tmp_path / "other-key.pem").read_bytes())
    time.sleep(1)
    assert served_serial(tls_server.port) == before
    renewed = write_certificate(cert, key, "renewed")
    deadline = time.monotonic() + 10
    while served_serial(tls_server.port) != renewed:
        assert time.monotonic() < deadline, "the renewed certificate was not picked up"
        time.sleep(0.1)
    trusted = ssl.create_default_context(cafile=str(cert))
    with httpx.Client(base_url=tls_server.url, verify=trusted, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
