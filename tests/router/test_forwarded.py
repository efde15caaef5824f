"""The client address the router passes on: its peer, or what a trusted proxy names."""

from __future__ import annotations

import httpx
import pytest

from helpers import PASSWORD
from labgate.config import Settings
from labgate.router.context import RouterOptions
from labgate.security import SESSION_COOKIE
from router.conftest import ALICE, GatewayFactory

TRUSTED = ("127.0.0.1/32", "10.0.0.0/8")


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (b"203.0.113.7", b"203.0.113.7"),
        (b"198.51.100.1, 203.0.113.7", b"203.0.113.7"),  # the left one is the client's to write
        (b"203.0.113.7, 10.1.2.3", b"203.0.113.7"),  # a second trusted proxy is skipped
        (b"10.1.2.3", b"10.1.2.3"),  # only proxies: the farthest one
        (b"203.0.113.7, garbage", b"127.0.0.1"),  # garbled: nothing left of it is believed
        (b"2001:db8::1", b"2001:db8::1"),
    ],
)
def test_the_client_is_the_first_untrusted_address_from_the_right(header, client):
    from labgate.router.forwarded import client_address

    assert client_address(b"127.0.0.1", header, TRUSTED) == client


def test_only_listed_peers_are_trusted():
    from labgate.router.forwarded import is_trusted_proxy

    assert is_trusted_proxy(b"10.9.8.7", TRUSTED)
    assert not is_trusted_proxy(b"192.0.2.1", TRUSTED)
    assert not is_trusted_proxy(b"127.0.0.1", ())
    assert is_trusted_proxy(b"::ffff:127.0.0.1", TRUSTED)


async def seen_forwarded_for(gw_url: str, cookie: str, header: str | None) -> str:
    headers = {"Cookie": f"{SESSION_COOKIE}={cookie}"}
    if header is not None:
        headers["X-Forwarded-For"] = header
    async with httpx.AsyncClient(base_url=gw_url) as client:
        response = await client.get("/api/v1/me", headers=headers)
    return str(response.json()["headers"]["x-forwarded-for"])


async def test_forwarded_for_is_believed_only_from_a_trusted_proxy(make_gateway: GatewayFactory):
    plain = await make_gateway(demo=False)
    behind = await make_gateway(RouterOptions(trusted_proxies=("127.0.0.1/32",)), demo=False)
    cookie = plain.cookie(ALICE)
    assert await seen_forwarded_for(plain.base, cookie, "203.0.113.7") == "127.0.0.1"
    assert await seen_forwarded_for(behind.base, cookie, "203.0.113.7") == "203.0.113.7"
    assert await seen_forwarded_for(behind.base, cookie, None) == "127.0.0.1"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"login_limit_account_address": "2/minute", "trusted_proxies": ["127.0.0.1/32"]}
    )


async def test_sign_in_limits_count_the_client_a_trusted_proxy_names(router_url, make_user):
    """Through the router, behind a trusted proxy: one client's failures are not another's."""
    await make_user("nell")

    async def attempt(client_ip: str, password: str) -> int:
        async with httpx.AsyncClient(base_url=router_url) as client:
            response = await client.post(
                "/api/v1/auth/login",
                json={"username": "nell", "password": password},
                headers={"X-Forwarded-For": client_ip},
            )
        return response.status_code

    assert [await attempt("203.0.113.7", "wrong-guess") for _ in range(3)] == [401, 401, 429]
    assert await attempt("203.0.113.8", PASSWORD) == 200
