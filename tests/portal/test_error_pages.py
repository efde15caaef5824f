"""Errors: a page for browsers outside the API, the one JSON shape for everyone else."""

from __future__ import annotations

import pytest

from helpers import ADMIN_PASSWORD, post_login_form

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


async def test_unknown_page_is_a_404_page_for_browsers_and_json_otherwise(client):
    page = await client.get("/no/such/page", headers=HTML)
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert "<h1" in page.text and "Not found" in page.text
    assert "Nothing at /no/such/page." in page.text
    assert 'href="/login?next=%2Fno%2Fsuch%2Fpage"' in page.text  # where to go next
    assert "Traceback" not in page.text

    plain = await client.get("/no/such/page")
    assert plain.status_code == 404 and plain.json()["error"] == "not_found"


async def test_api_errors_stay_json_even_for_browsers(client):
    for path in ("/api/v1/nothing-here", "/api/v1/instances"):
        response = await client.get(path, headers=HTML)
        assert response.headers["content-type"] == "application/json", path
        assert set(response.json()) >= {"error", "detail"}


async def test_error_page_offers_the_way_back_when_signed_in(client):
    signed = await post_login_form(client, {"username": "admin", "password": ADMIN_PASSWORD})
    assert signed.status_code == 303
    page = await client.get("/instances/doesnotexist", headers=HTML)
    assert page.status_code == 404
    assert "No instance &#39;doesnotexist&#39;." in page.text
    assert "Go to your tools" in page.text and 'href="/instances"' in page.text


async def test_wrong_method_on_a_page_is_a_405_page(client):
    page = await client.put("/login", headers=HTML)
    assert page.status_code == 405
    assert page.headers["content-type"].startswith("text/html")


@pytest.fixture
async def broken_page(app):
    """A page that fails, added to the running app for this test."""

    async def boom() -> None:
        raise RuntimeError("secret detail that must not leak")

    app.add_api_route("/boom", boom, include_in_schema=False)
    yield "/boom"
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", "") != "/boom"]


async def test_server_errors_are_a_500_page_without_details(client, broken_page, caplog):
    import logging

    caplog.set_level(logging.CRITICAL, logger="labgate.portal.errors")
    page = await client.get(broken_page, headers=HTML)
    assert page.status_code == 500
    assert page.headers["content-type"].startswith("text/html")
    assert "Something went wrong on our side" in page.text
    assert "secret detail" not in page.text and "Traceback" not in page.text
    plain = await client.get(broken_page)
    assert plain.status_code == 500 and plain.json()["error"] == "internal_error"


async def test_unknown_page_shows_the_navigation_to_a_signed_in_user(client):
    signed = await post_login_form(client, {"username": "admin", "password": ADMIN_PASSWORD})
    assert signed.status_code == 303
    page = await client.get("/no/such/page", headers=HTML)
    assert page.status_code == 404
    assert 'aria-label="Main"' in page.text and 'href="/runs"' in page.text  # the navigation
    assert "Sign in" not in page.text and "Sign out" in page.text
    assert "Go to your tools" in page.text
    # The sign-out form on it works: it carries the session's CSRF token.
    assert 'name="csrf_token" value=""' not in page.text
