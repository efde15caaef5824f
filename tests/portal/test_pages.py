"""The web pages in process: who sees what, forms, CSRF, static files, accessibility basics.

What the pages *do* (launch, stop, live updates) is tested in a real browser
in ``tests/ui/``; here each page is fetched over HTTP and its HTML checked.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from helpers import ADMIN_PASSWORD, PASSWORD, post_login_form, wait_for_state
from labgate.portal.ui.render import ASSET_VERSION
from labgate.portal.ui.signin import safe_next
from labgate.security import SESSION_COOKIE

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
USER_PAGES = ["/", "/instances", "/tokens", "/account"]
ADMIN_PAGES = ["/admin", "/admin/users", "/admin/instances", "/admin/sites"]


class PageParser(HTMLParser):
    """Collects what the checks below need from a page."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: list[dict[str, str | None]] = []
        self.label_for: set[str] = set()
        self.label_depth = 0
        self.inline_scripts = 0
        self.inline_styles = 0
        self.landmarks: set[str] = set()
        self.meta: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "label":
            self.label_depth += 1
            if a.get("for"):
                self.label_for.add(a["for"] or "")
        elif tag in ("input", "select", "textarea"):
            kind = a.get("type") or "text"
            if kind not in ("hidden", "submit") and "hidden" not in a:
                self.fields.append({**a, "_wrapped": "yes" if self.label_depth else None})
        elif tag == "script" and not a.get("src") and a.get("type") != "application/json":
            self.inline_scripts += 1
        elif tag == "style":
            self.inline_styles += 1
        elif tag in ("main", "header", "nav", "footer"):
            self.landmarks.add(tag)
        elif tag == "meta" and a.get("name"):
            self.meta[a["name"] or ""] = a.get("content") or ""
        if "style" in a:
            self.inline_styles += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self.label_depth -= 1


def check_page(response: httpx.Response) -> PageParser:
    """A page: HTML with the UI's headers, labelled fields, no inline code, landmarks."""
    assert response.headers["content-type"].startswith("text/html"), response.headers
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "Traceback" not in response.text
    assert '<html lang="en">' in response.text
    parser = PageParser()
    parser.feed(response.text)
    for field in parser.fields:
        named = field["_wrapped"] or field.get("aria-label")
        labelled = named or field.get("id") in parser.label_for
        assert labelled, f"field without a label: {field}"
    assert parser.inline_scripts == 0, "inline scripts break the Content-Security-Policy"
    assert parser.inline_styles == 0, "inline styles break the Content-Security-Policy"
    assert {"main", "header", "footer"} <= parser.landmarks
    return parser


async def sign_in(client: httpx.AsyncClient, name: str, password: str = PASSWORD) -> str:
    """Sign in through the form; returns the session's CSRF token (from the page)."""
    response = await post_login_form(client, {"username": name, "password": password})
    assert response.status_code == 303, response.text
    page = await client.get("/", headers=HTML)
    token = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', page.text)
    assert token is not None
    return token.group(1)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (None, "/"),
        ("", "/"),
        ("/instances", "/instances"),
        ("/i/abc/lab?x=1", "/i/abc/lab?x=1"),
        ("https://evil.example/", "/"),
        ("//evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("instances", "/"),
    ],
)
def test_safe_next_keeps_only_local_paths(target, expected):
    assert safe_next(target) == expected


async def test_pages_send_browsers_without_a_session_to_sign_in(client):
    home = await client.get("/", headers=HTML)
    assert home.status_code == 303 and home.headers["location"] == "/login"
    for path in [*USER_PAGES[1:], *ADMIN_PAGES, "/instances/abc", "/instances/abc/logs"]:
        response = await client.get(path, headers=HTML)
        assert response.status_code == 303, path
        assert response.headers["location"] == "/login?next=" + path.replace("/", "%2F")


async def test_sign_in_page_is_accessible_and_remembers_where_to_go(client):
    page = await client.get("/login?next=/instances/abc", headers=HTML)
    assert page.status_code == 200
    parsed = check_page(page)
    assert {field.get("name") for field in parsed.fields} == {"username", "password"}
    assert 'name="next" value="/instances/abc"' in page.text
    foreign = await client.get("/login?next=https://evil.example/", headers=HTML)
    assert 'name="next" value="/"' in foreign.text


async def test_sign_in_errors_are_clear(client, make_user, admin_headers):
    await make_user("gus")
    wrong = await post_login_form(client, {"username": "gus", "password": "nope"})
    assert wrong.status_code == 401
    assert "Wrong user name or password." in wrong.text
    assert 'value="gus"' in wrong.text  # the name stays filled in
    await client.patch("/api/v1/users/gus", json={"disabled": True}, headers=admin_headers)
    disabled = await post_login_form(client, {"username": "gus", "password": PASSWORD})
    assert disabled.status_code == 401
    assert "This account is disabled; ask an administrator." in disabled.text
    assert SESSION_COOKIE not in disabled.headers.get("set-cookie", "")


async def test_signed_in_browser_skips_the_form_but_never_loops(client, make_user):
    await make_user("hal")
    await sign_in(client, "hal")
    again = await client.get("/login?next=/instances", headers=HTML)
    assert again.status_code == 303 and again.headers["location"] == "/instances"
    # The router sent it here because it refused the cookie: show the form.
    routed = await client.get("/login?next=/i/abc/", headers=HTML)
    assert routed.status_code == 200 and 'name="next" value="/i/abc/"' in routed.text


async def test_an_ended_session_is_told_so_and_its_cookie_dropped(client, make_user, admin_headers):
    await make_user("ida")
    await sign_in(client, "ida")
    await client.patch("/api/v1/users/ida", json={"disabled": True}, headers=admin_headers)
    home = await client.get("/instances", headers=HTML)
    assert home.status_code == 303 and home.headers["location"] == "/login?next=%2Finstances"
    login = await client.get(home.headers["location"], headers=HTML)
    assert "Your session has ended" in login.text
    assert f'{SESSION_COOKIE}=""' in login.headers["set-cookie"]


async def test_every_page_renders_for_a_user_with_the_csrf_token(client, make_user):
    await make_user("jo")
    csrf = await sign_in(client, "jo")
    for path in USER_PAGES:
        response = await client.get(path, headers=HTML)
        assert response.status_code == 200, (path, response.text)
        parsed = check_page(response)
        assert parsed.meta["csrf-token"] == csrf
        assert "nav" in parsed.landmarks
        assert ">Admin<" not in response.text
        assert 'aria-current="page"' in response.text, path


async def test_admin_pages_are_for_admins_only(client, make_user):
    await make_user("kim")
    await sign_in(client, "kim")
    for path in ADMIN_PAGES:
        refused = await client.get(path, headers=HTML)
        assert refused.status_code == 403, path
        check_page(refused)
        assert "This page is for administrators." in refused.text
    client.cookies.clear()
    await sign_in(client, "admin", ADMIN_PASSWORD)
    for path in ADMIN_PAGES:
        response = await client.get(path, headers=HTML)
        assert response.status_code == 200, path
        check_page(response)
        assert ">Admin<" in response.text


async def test_home_shows_every_tool_as_a_card_with_its_resources(client, make_user):
    await make_user("lou")
    await sign_in(client, "lou")
    page = await client.get("/", headers=HTML)
    assert 'data-tool="demo"' in page.text
    assert "0.5 CPU · 512 MiB memory" in page.text
    assert 'max="2"' in page.text and "up to 2 GiB" in page.text
    assert 'Launch<span class="visually-hidden"> Demo</span>' in page.text
    assert "You may run up to 5 instances at once." in page.text


async def test_instance_pages_show_only_your_own(client, make_user):
    mo = await make_user("mo")
    await make_user("ned")
    launched = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=mo)
    instance_id = launched.json()["id"]
    await sign_in(client, "mo")
    own = await client.get(f"/instances/{instance_id}", headers=HTML)
    assert own.status_code == 200
    check_page(own)
    assert f'data-id="{instance_id}"' in own.text and 'data-url="http' in own.text
    logs = await client.get(f"/instances/{instance_id}/logs", headers=HTML)
    assert logs.status_code == 200
    check_page(logs)

    client.cookies.clear()
    await sign_in(client, "ned")
    for path in (f"/instances/{instance_id}", f"/instances/{instance_id}/logs"):
        other = await client.get(path, headers=HTML)
        assert other.status_code == 404
        check_page(other)
        assert "Not found" in other.text and instance_id in other.text
    await wait_for_state(client, mo, instance_id, {"running"})
    await client.delete(f"/api/v1/instances/{instance_id}", headers=mo)


async def test_sign_out_form_needs_the_csrf_token(client, make_user):
    await make_user("ola")
    csrf = await sign_in(client, "ola")
    refused = await client.post("/logout", data={}, headers=HTML)
    assert refused.status_code == 403
    assert refused.headers["content-type"].startswith("text/html")
    assert "csrf" in refused.text.lower()
    assert (await client.get("/api/v1/auth/session")).status_code == 200
    wrong = await client.post("/logout", data={"csrf_token": "0" * 64})
    assert wrong.status_code == 403 and wrong.json()["error"] == "csrf_failed"
    out = await client.post("/logout", data={"csrf_token": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/login?notice=signed_out"
    assert (await client.get("/api/v1/auth/session")).status_code == 401
    notice = await client.get(out.headers["location"], headers=HTML)
    assert "You are signed out." in notice.text


async def test_api_changes_from_pages_need_the_csrf_header(client, make_user):
    await make_user("pia")
    csrf = await sign_in(client, "pia")
    refused = await client.post("/api/v1/tokens", json={"note": "x"})
    assert refused.status_code == 403 and refused.json()["error"] == "csrf_failed"
    made = await client.post("/api/v1/tokens", json={"note": "x"}, headers={"X-CSRF-Token": csrf})
    assert made.status_code == 201


async def test_static_files_are_versioned_and_cached(client):
    css = await client.get(f"/static/labgate.css?v={ASSET_VERSION}")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "immutable" in css.headers["cache-control"]
    assert "prefers-color-scheme: dark" in css.text and ":focus-visible" in css.text
    again = await client.get("/static/labgate.css", headers={"If-None-Match": css.headers["etag"]})
    assert again.status_code == 304 and again.headers["cache-control"] == "no-cache"
    script = await client.get("/static/labgate.js")
    assert "javascript" in script.headers["content-type"]
    for bad in ("/static/nope.js", "/static/..%2Fpages.py", "/static/%2e%2e/render.py"):
        assert (await client.get(bad)).status_code == 404, bad


def test_every_template_script_and_style_exists():
    ui = Path(__file__).resolve().parents[2] / "src" / "labgate" / "portal" / "ui"
    names = {p.name for p in (ui / "static").iterdir()}
    for template in (ui / "templates").glob("*.html"):
        for name in re.findall(r"/static/([a-z0-9_.-]+)\?", template.read_text()):
            assert name in names, f"{template.name} refers to a missing {name}"


def test_user_guide_images_exist():
    docs = Path(__file__).resolve().parents[2] / "docs"
    guide = (docs / "user-guide.md").read_text()
    images = re.findall(r"(images/[a-z0-9-]+\.png)", guide)
    assert images, "the user guide shows the pages"
    assert [image for image in images if not (docs / image).is_file()] == []
