"""The browser side of launching near the data: /launch, badges, and Dataverse's Explore button."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from datasets_fixtures import (
    data_root,
    multi_site_settings,
    put_files,
    read_in,
    require_bwrap,
    write_in,
)
from helpers import PASSWORD, post_login_form, wait_for_state
from labgate.config import Settings

PID = "doi:10.5072/FK2/ABCDEF"
NAME = "abcdef"


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return multi_site_settings(tmp_path, database_url)


@pytest.fixture
async def dataset(client: Any, admin_headers: dict[str, str], settings: Settings) -> str:
    """A Dataverse-style DOI with a replica on east."""
    put_files(data_root(settings, "east"), "dataverse/FK2/ABCDEF", {"survey.tab": "q1\tq2\n1\t2\n"})
    body = {
        "id": PID,
        "title": "Survey 2026",
        "license": "CC0-1.0",
        "replicas": [{"site": "east", "path": "dataverse/FK2/ABCDEF"}],
    }
    response = await client.post("/api/v1/datasets", json=body, headers=admin_headers)
    assert response.status_code == 201, response.text
    return PID


@pytest.fixture
async def browser(app: Any, make_user: Any) -> Any:
    """A browser for alice: its own cookie jar, redirects not followed automatically."""
    await make_user("alice")
    async with httpx.AsyncClient(base_url=app.state.test_url, timeout=30) as client:
        yield client


async def sign_in(browser: httpx.AsyncClient, next_url: str) -> httpx.Response:
    return await post_login_form(
        browser, {"username": "alice", "password": PASSWORD, "next": next_url}
    )


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, page
    return match.group(1)


async def confirm_and_launch(browser: httpx.AsyncClient, launch_path: str) -> str:
    """Open a /launch link signed in, press Launch; returns the new instance's id."""
    page = await browser.get(launch_path)
    assert page.status_code == 200, page.text
    assert page.headers["x-frame-options"] == "DENY"
    form = dict(parse_qs(urlsplit(launch_path).query))
    posted = await browser.post(
        "/launch",
        data={
            "csrf_token": csrf_of(page.text),
            "dataset": html.unescape(re.search(r'name="dataset" value="([^"]+)"', page.text)[1]),  # type: ignore[index]
            "tool": form["tool"][0],
        },
    )
    assert posted.status_code == 303, posted.text
    location = posted.headers["location"]
    assert location.startswith("/instances/")
    return location.rsplit("/", 1)[1]


async def test_a_launch_link_signs_in_confirms_launches_and_reuses(
    app: Any, client: Any, browser: httpx.AsyncClient, dataset: str, admin_headers: dict[str, str]
) -> None:
    link = "/launch?" + urlencode({"dataset": "https://doi.org/10.5072/fk2/abcdef", "tool": "demo"})

    # 1. Not signed in: off to sign in, and back to the same link afterwards.
    anonymous = await browser.get(link)
    assert anonymous.status_code == 303
    login = anonymous.headers["location"]
    assert login.startswith("/login?")
    assert parse_qs(urlsplit(login).query)["next"] == [link]
    signed = await sign_in(browser, link)
    assert signed.status_code == 303 and signed.headers["location"] == link

    # 2. A GET shows what will happen and launches nothing.
    page = await browser.get(link)
    assert page.status_code == 200
    assert "Survey 2026" in page.text and PID.lower() in page.text
    assert f"/data/{NAME}" in page.text and "on site east" in page.text
    listed = await client.get("/api/v1/instances", headers=admin_headers)
    assert listed.json() == []

    # 3. The form POST needs the session's CSRF token.
    forged = await browser.post("/launch", data={"dataset": PID, "tool": "demo"})
    assert forged.status_code == 403
    assert (await client.get("/api/v1/instances", headers=admin_headers)).json() == []

    # 4. Launch: on to the progress page, which follows the events into the tool.
    instance_id = await confirm_and_launch(browser, link)
    progress = await browser.get(f"/instances/{instance_id}")
    assert progress.status_code == 200 and "instance.js" in progress.text
    running = await wait_for_state(client, admin_headers, instance_id, {"running"})
    assert running["site"] == "east" and running["dataset"] == PID.lower()

    # 5. The same link again goes into the running instance rather than launching another.
    again = await browser.get(link)
    assert again.status_code == 303
    assert again.headers["location"].endswith(f"/i/{instance_id}/")
    assert len((await client.get("/api/v1/instances", headers=admin_headers)).json()) == 1


async def test_dataverse_explore_ends_in_a_running_instance_with_the_data(
    app: Any, client: Any, browser: httpx.AsyncClient, dataset: str, admin_headers: dict[str, str]
) -> None:
    require_bwrap()
    # The manifest a Dataverse admin registers.
    manifest = (await client.get("/dataverse/manifest.json", params={"tool": "demo"})).json()
    assert manifest["scope"] == "dataset" and manifest["types"] == ["explore"]
    assert {"datasetPid": "{datasetPid}"} in manifest["toolParameters"]["queryParameters"]
    assert {"siteUrl": "{siteUrl}"} in manifest["toolParameters"]["queryParameters"]

    # The URL Dataverse builds from it for a dataset page's Explore button.
    reserved = {"{datasetPid}": PID, "{siteUrl}": "https://dataverse.example.edu"}
    query = "&".join(
        f"{name}={reserved[placeholder]}"
        for param in manifest["toolParameters"]["queryParameters"]
        for name, placeholder in param.items()
    )
    explore = f"{manifest['toolUrl']}?{query}"
    assert explore.startswith(app.state.portal.settings.effective_public_url)
    local = urlsplit(explore)._replace(scheme="", netloc="").geturl()

    await sign_in(browser, "/")
    hop = await browser.get(local)
    assert hop.status_code == 303
    link = hop.headers["location"]
    assert parse_qs(urlsplit(link).query) == {"dataset": [PID], "tool": ["demo"]}
    instance_id = await confirm_and_launch(browser, link)
    await wait_for_state(client, admin_headers, instance_id, {"running"})
    assert await read_in(app, instance_id, f"/data/{NAME}/survey.tab") == "q1\tq2\n1\t2\n"
    assert not await write_in(app, instance_id, f"/data/{NAME}/survey.tab")


async def test_launch_pages_explain_problems(
    app: Any, client: Any, browser: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await sign_in(browser, "/")
    html_headers = {"Accept": "text/html"}
    missing = await browser.get("/launch?tool=demo", headers=html_headers)
    assert missing.status_code == 400
    invalid = await browser.get("/launch?dataset=doi:10.1/x&tool=demo", headers=html_headers)
    assert invalid.status_code == 400 and "not a DOI prefix" in invalid.text
    unknown = await browser.get("/launch?dataset=doi:10.1234/nope&tool=demo", headers=html_headers)
    assert unknown.status_code == 404 and "no dataset" in unknown.text.lower()
    await client.post("/api/v1/datasets", json={"id": "doi:10.1234/nowhere"}, headers=admin_headers)
    nowhere = await browser.get("/launch?dataset=doi:10.1234/nowhere&tool=demo")
    assert nowhere.status_code == 409
    assert "has no replica on any site" in html.unescape(nowhere.text)
    assert 'action="/launch"' not in nowhere.text
    no_tool = await browser.get("/launch?dataset=doi:10.1234/nowhere&tool=nope")
    assert no_tool.status_code == 404
    no_pid = await browser.get("/launch/dataverse/demo")
    assert no_pid.status_code == 400


async def test_the_badge_builder(client: Any, browser: httpx.AsyncClient, dataset: str) -> None:
    anonymous = await browser.get("/badge")
    assert anonymous.status_code == 303
    await sign_in(browser, "/badge")
    empty = await browser.get("/badge")
    assert empty.status_code == 200 and 'name="dataset"' in empty.text

    page = await browser.get(
        "/badge", params={"dataset": "https://doi.org/10.5072/FK2/ABCDEF", "tool": "demo"}
    )
    assert page.status_code == 200
    text = html.unescape(page.text)
    public = "http://127.0.0.1:8000"
    link = f"{public}/launch?dataset=doi:10.5072/fk2/abcdef&tool=demo"
    assert link in text
    assert f"[![Launch in labgate]({public}/badge.svg)]({link})" in text
    assert f'<a href="{link.replace("&", "&amp;")}"><img src="{public}/badge.svg"' in text
    assert "not registered here yet" not in text

    unregistered = await browser.get("/badge", params={"dataset": "ark:/12345/x", "tool": "demo"})
    assert "not registered here yet" in unregistered.text
    invalid = await browser.get("/badge", params={"dataset": "ftp://x.org/a", "tool": "demo"})
    assert invalid.status_code == 400 and "not supported" in html.unescape(invalid.text)

    svg = await client.get("/badge.svg")
    assert svg.status_code == 200 and svg.headers["content-type"] == "image/svg+xml"
    assert svg.content.startswith(b"<svg") and b"labgate" in svg.content


async def test_dataverse_manifest_only_for_tools_some_site_runs(
    app: Any, client: Any, settings: Settings
) -> None:
    # A tool only a containers site could run, in a deployment of process sites.
    from labgate.tools.catalog import Catalog, load_tool_file

    assert settings.tools_dir is not None
    path = settings.tools_dir.parent / "boxed.toml"
    path.write_text(
        'name = "boxed"\ntitle = "Boxed"\n\n[container]\nimage = "localhost/x:1"\nport = 8080\n'
    )
    portal = app.state.portal
    portal.catalog = Catalog([*portal.catalog, load_tool_file(path)])
    assert app.state.portal.catalog.get("boxed") is not None
    refused = await client.get("/dataverse/manifest.json", params={"tool": "boxed"})
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "tool_unavailable"
    assert "demo" in refused.json()["detail"]
    # Without a tool: jupyterlab when a site runs it, else the first tool a site runs.
    default = (await client.get("/dataverse/manifest.json")).json()
    runnable = [
        tool.name
        for tool in portal.catalog
        if any(link.unavailable_reason(tool) is None for link in portal.links.values())
    ]
    assert "boxed" not in runnable
    expected = "jupyterlab" if "jupyterlab" in runnable else runnable[0]
    assert default["toolName"] == f"labgate-{expected}"
    unknown = await client.get("/dataverse/manifest.json", params={"tool": "nope"})
    assert unknown.status_code == 404


async def test_launch_links_open_a_path_inside_the_tool(
    app: Any, client: Any, browser: httpx.AsyncClient, dataset: str, admin_headers: dict[str, str]
) -> None:
    await sign_in(browser, "/")
    query = {"dataset": PID, "tool": "demo", "urlpath": "/files/{dataset}/survey.tab"}
    link = "/launch?" + urlencode(query)
    page = await browser.get(link)
    assert page.status_code == 200, page.text
    assert f"files/{NAME}/survey.tab" in page.text  # what it will open, said before launching
    posted = await browser.post(
        "/launch",
        data={
            "csrf_token": csrf_of(page.text),
            "dataset": PID,
            "tool": "demo",
            "urlpath": html.unescape(re.search(r'name="urlpath" value="([^"]+)"', page.text)[1]),  # type: ignore[index]
        },
    )
    assert posted.status_code == 303, posted.text
    location = posted.headers["location"]
    instance_id = urlsplit(location).path.rsplit("/", 1)[1]
    assert parse_qs(urlsplit(location).query) == {"urlpath": [f"files/{NAME}/survey.tab"]}
    progress = await browser.get(location)
    opens = f"/i/{instance_id}/files/{NAME}/survey.tab"
    assert f'data-url="{app.state.portal.settings.effective_public_url}{opens}"' in progress.text
    await wait_for_state(client, admin_headers, instance_id, {"running"})
    # Running already: the link goes straight to that path in it.
    again = await browser.get(link)
    assert again.status_code == 303 and again.headers["location"].endswith(opens)

    # Paths that could leave the instance's own URL are refused.
    for bad in ("../../admin", "a/%2e%2e/%2e%2e/x", "x\\..\\y", "a\x00b", "./x"):
        refused = await browser.get("/launch?" + urlencode({**query, "urlpath": bad}))
        assert refused.status_code == 400, bad
    assert (await client.get("/api/v1/instances", headers=admin_headers)).json()[0]["id"] == (
        instance_id
    )

    # Badges and the Dataverse button carry it too.
    badge = await browser.get("/badge", params=query)
    assert "&amp;urlpath=files/{dataset}/survey.tab" in badge.text, badge.text
    manifest = (await client.get("/dataverse/manifest.json", params=query)).json()
    assert manifest["toolUrl"].endswith("/launch/dataverse/demo/open/files/{dataset}/survey.tab")
    path = urlsplit(manifest["toolUrl"]).path
    hop = await browser.get(path, params={"datasetPid": PID})
    assert hop.status_code == 303
    assert parse_qs(urlsplit(hop.headers["location"]).query)["urlpath"] == [
        "files/{dataset}/survey.tab"
    ]
    bad_manifest = await client.get(
        "/dataverse/manifest.json", params={"tool": "demo", "urlpath": "../x"}
    )
    assert bad_manifest.status_code == 400
