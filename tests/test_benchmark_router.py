"""``benchmarks/router.py``'s HTTPS fronts: nginx and labgate's router, one certificate.

The benchmark compares small-response req/s over HTTPS; that comparison means
something only if both fronts terminate TLS themselves, with the same
certificate, and answer through the same upstream. This starts the
benchmark's own nginx configurations and its TLS router (real processes) and
checks exactly that, without timing anything.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import ssl
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "router.py"


def load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("router_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def https_get(port: int, path: str, headers: list[str]) -> tuple[bytes, bytes]:
    """The response to one GET over TLS, and the DER certificate the server presented."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    head = "".join(f"{line}\r\n" for line in ["Host: 127.0.0.1", *headers])
    writer.write(f"GET {path} HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    return response, der


async def test_nginx_and_the_router_serve_https_with_one_certificate(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if not nginx:
        if os.environ.get("CI") == "true":
            pytest.fail("nginx is missing (apt-get install nginx)")
        pytest.skip("needs nginx (apt-get install nginx)")
    bench = load_benchmark()
    (tmp_path / "tmp").mkdir()
    (tmp_path / "www").mkdir()
    names = ("static", "ws", "nginx", "nginx_tls", "labgate_tls", "portal_tls")
    ports = {name: bench.free_port() for name in names}
    cert_file, key_file = bench.self_signed(tmp_path)
    assert key_file.stat().st_mode & 0o777 == 0o600

    peers = bench.Peers({"nginx": nginx}, tmp_path)
    static_url = f"http://127.0.0.1:{ports['static']}"
    secure = bench.Labgate(ports["labgate_tls"], ports["portal_tls"], 1, tls=(cert_file, key_file))
    try:
        for conf, port in (
            (bench.static_conf(tmp_path, ports), ports["static"]),
            (bench.proxy_conf(tmp_path, ports, cert_file, key_file), ports["nginx_tls"]),
        ):
            peers.start([nginx, "-c", str(conf), "-p", str(tmp_path)], port)
        await secure.start(static_url, f"http://127.0.0.1:{ports['ws']}")

        from_nginx, nginx_der = await https_get(ports["nginx_tls"], "/i/bench/small", [])
        from_labgate, labgate_der = await https_get(
            ports["labgate_tls"],
            "/i/bench/small",
            [f"Cookie: labgate-session={secure.cookie}"],
        )
    finally:
        await secure.stop()
        peers.stop()

    served = ssl.PEM_cert_to_DER_cert(cert_file.read_text())
    assert nginx_der == labgate_der == served
    for response in (from_nginx, from_labgate):
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        assert response.endswith(b"hello world\n")


def test_the_report_gives_the_https_ratio() -> None:
    bench = load_benchmark()
    small = {
        "nginx": {"rps": 40_000.0},
        "labgate": {"rps": 20_000.0},
        "nginx, HTTPS": {"rps": 30_000.0},
        "labgate, HTTPS": {"rps": 12_000.0},
    }
    assert bench.https_ratio({"small": small}) == pytest.approx(0.4)
    assert bench.plain_ratio({"small": small}) == pytest.approx(0.5)
