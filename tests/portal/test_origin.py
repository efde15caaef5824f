"""Login CSRF: a sign-in that another site starts is refused, the form's and the API's."""

from __future__ import annotations

import httpx
import pytest

from helpers import PASSWORD, login_form_token
from labgate.security import SESSION_COOKIE

LOGIN = "/api/v1/auth/login"
EVIL = "https://evil.example"


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("HTTPS://Lab.Example.org:443/path?q", "https://lab.example.org"),
        ("http://lab.example.org:80", "http://lab.example.org"),
        ("http://[::1]:8000/", "http://[::1]:8000"),
        ("null", None),
        ("file:///etc/passwd", None),
        ("http://host:99999", None),
    ],
)
def test_origins_are_compared_in_one_form(url, origin):
    from labgate.portal.origin import normal_origin

    assert normal_origin(url) == origin


async def test_api_sign_in_from_another_site_is_refused(app, client, make_user):
    await make_user("gwen")
    body = {"username": "gwen", "password": PASSWORD}
    for headers in (
        {"Origin": EVIL},
        {"Origin": "null"},
        {"Referer": f"{EVIL}/trap.html"},
        {"Origin": "http://127.0.0.1:1"},  # same host, another port: another origin
    ):
        refused = await client.post(LOGIN, json=body, headers=headers)
        assert refused.status_code == 403, headers
        assert refused.json()["error"] == "csrf_failed"
        assert SESSION_COOKIE not in refused.headers.get("set-cookie", "")
    # labgate's own pages, and clients that are not browsers (no Origin, no Referer).
    own = app.state.test_url
    for headers in ({"Origin": own}, {"Referer": f"{own}/login"}, {}):
        client.cookies.clear()
        assert (await client.post(LOGIN, json=body, headers=headers)).status_code == 200


async def test_public_url_is_an_own_origin(app, client, make_user):
    await make_user("hal")
    app.state.portal.settings.public_url = "https://lab.example.org"
    ok = await client.post(
        LOGIN,
        json={"username": "hal", "password": PASSWORD},
        headers={"Origin": "https://lab.example.org"},
    )
    assert ok.status_code == 200


async def test_sign_in_form_from_another_site_is_refused(app, client, make_user):
    await make_user("iris")
    form = await client.get("/login", headers={"Accept": "text/html"})
    token = login_form_token(form.text)
    data = {"username": "iris", "password": PASSWORD, "login_token": token}

    async def post(fields: dict[str, str], **headers: str) -> httpx.Response:
        return await client.post("/login", data=fields, headers=headers)

    cases = [
        (data, {"Origin": EVIL}),
        (data, {"Referer": f"{EVIL}/trap.html"}),
        ({**data, "login_token": ""}, {}),  # no Origin, no Referer, no token
        ({**data, "login_token": "0" * 64}, {"Origin": app.state.test_url}),
    ]
    for fields, headers in cases:
        refused = await post(fields, **headers)
        assert refused.status_code == 403, headers
        assert "came from another site" in refused.text
        assert SESSION_COOKIE not in refused.headers.get("set-cookie", "")
    # Another browser's form token does not fit this browser's cookie.
    async with httpx.AsyncClient(base_url=app.state.test_url) as attacker:
        theirs = login_form_token((await attacker.get("/login")).text)
    assert theirs != token
    assert (await post({**data, "login_token": theirs})).status_code == 403
    # The form as labgate served it works, with or without an Origin header.
    signed = await post(data, Origin=app.state.test_url)
    assert signed.status_code == 303 and SESSION_COOKIE in signed.headers["set-cookie"]
