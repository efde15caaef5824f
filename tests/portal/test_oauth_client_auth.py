"""How a client proves itself at labgate's token endpoint (RFC 6749 2.3.1 and 5.2)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote_plus

import httpx
import pytest
from oauth_service import CALLBACK, SERVICE, code_for, signed_in

from labgate.config import OAuthClientConfig, Settings

#: A secret an operator may well choose: characters that form-urlencoding changes.
SECRET = "p+ss w%rd:42/é"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The test portal with a service whose secret needs encoding in HTTP Basic."""
    service = OAuthClientConfig(client_id=SERVICE, client_secret=SECRET, redirect_uris=[CALLBACK])
    return settings.model_copy(update={"oauth_clients": [service]})


@pytest.fixture
async def browser(app: Any, make_user: Any) -> AsyncIterator[httpx.AsyncClient]:
    """alice, signed in to the portal."""
    await make_user("alice")
    alice, _ = await signed_in(app, "alice")
    yield alice
    await alice.aclose()


def basic(user: str, password: str) -> dict[str, str]:
    """An ``Authorization: Basic`` header of exactly these two strings."""
    joined = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {joined}"}


async def exchange(
    client: httpx.AsyncClient, code: str, headers: dict[str, str], **form: str
) -> httpx.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK, **form}
    return await client.post("/oauth/token", data=data, headers=headers)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(basic(quote_plus(SERVICE), quote_plus(SECRET)), id="form-urlencoded"),
        pytest.param(basic(SERVICE, SECRET), id="as-is"),
    ],
)
async def test_basic_credentials_are_taken_encoded_as_the_spec_says_and_as_sent(
    client: httpx.AsyncClient, browser: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    got = await exchange(client, await code_for(browser), headers)
    assert got.status_code == 200, got.text
    assert got.json()["token_type"] == "Bearer"


async def test_credentials_in_the_form_are_taken(
    client: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    got = await exchange(
        client, await code_for(browser), {}, client_id=SERVICE, client_secret=SECRET
    )
    assert got.status_code == 200, got.text


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(basic(SERVICE, "p+ss w%rd:41/é"), id="wrong-secret"),
        pytest.param(basic("nobody", SECRET), id="unknown-client"),
        pytest.param({"Authorization": "Basic !!!not-base64"}, id="not-base64"),
        pytest.param(
            {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}, id="no-colon"
        ),
        pytest.param(
            {"Authorization": "Basic " + base64.b64encode(b"svc:\xff\xfe").decode()},
            id="not-utf8",
        ),
        pytest.param({}, id="none"),
    ],
)
async def test_a_client_that_does_not_prove_itself_is_challenged(
    client: httpx.AsyncClient, browser: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    code = await code_for(browser)
    refused = await exchange(client, code, headers)
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"] == "invalid_client"
    assert refused.headers["www-authenticate"].startswith("Basic realm=")
    # The code was not spent by the failed attempt: the real client still gets its token.
    assert (await exchange(client, code, basic(SERVICE, SECRET))).status_code == 200
