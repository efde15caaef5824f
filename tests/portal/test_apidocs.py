"""The API docs page works offline: every file it loads is served by labgate."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import httpx


class References(HTMLParser):
    """Every src and href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {name: value for name, value in attrs if name in ("src", "href") and value}
        self.urls.extend(found.values())
        if tag == "script":
            self._in_script = True
            if "src" not in found:
                self.inline_scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False


async def test_docs_page_references_no_external_host(client: httpx.AsyncClient) -> None:
    page = await client.get("/api/v1/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    refs = References()
    refs.feed(page.text)
    assert refs.urls, page.text
    # Every URL is a path on this server: no scheme, no //host.
    assert [url for url in refs.urls if not url.startswith("/") or url.startswith("//")] == []
    assert not re.search(r"https?://", page.text), page.text
    assert refs.inline_scripts == 0
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    # ...and each of them is there, as what it claims to be.
    for url in refs.urls:
        served = await client.get(url)
        assert served.status_code == (303 if url == "/" else 200), url
        if url.endswith("swagger-ui-bundle.js") or ".js?" in url:
            assert "javascript" in served.headers["content-type"], url
    bundle = next(url for url in refs.urls if "swagger-ui-bundle.js" in url)
    assert "SwaggerUIBundle" in (await client.get(bundle)).text
    cached = (await client.get(bundle)).headers["cache-control"]
    assert "immutable" in cached


async def test_docs_assets_unknown_name_is_a_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/docs/assets/swagger-ui-bundle.js.map")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    unversioned = await client.get("/api/v1/docs/assets/swagger-ui.css")
    assert unversioned.status_code == 200
    assert unversioned.headers["cache-control"] == "no-cache"
    assert unversioned.headers["content-type"].startswith("text/css")
