"""Per-instance origins end to end: ``labgate serve`` with ``instance_host = "{id}.localhost"``.

Each instance is served on ``<id>.localhost:<port>``; these tests connect to
the loopback address and send that name in ``Host`` (as a browser does;
``tests/ui/test_instance_hosts_ui.py`` has Chromium resolve the names
itself). Redirects are followed by hand, one hop at a time, keeping each
host's cookies apart the way a browser does.
"""

from __future__ import annotations

from collections.abc import Iterator
from http.cookies import SimpleCookie

import httpx
import pytest

from labgate.security import HANDOFF_COOKIE, INSTANCE_COOKIE, SESSION_COOKIE
from servers import LabgateServer, wait_state

PASSWORD = "admin-password-for-hosts"
USER_PASSWORD = "user-password-123"
HTML = {"Accept": "text/html"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabgateServer]:
    base = tmp_path_factory.mktemp("hosts")
    srv = LabgateServer(base / "var", PASSWORD, LABGATE_INSTANCE_HOST="{id}.localhost")
    srv.start()
    admin = srv.token("admin", PASSWORD, ["admin", "account"])
    with httpx.Client(base_url=srv.url, headers=admin, timeout=10) as client:
        for name in ("alice", "bob"):
            made = client.post("/api/v1/users", json={"name": name, "password": USER_PASSWORD})
            assert made.status_code == 201, made.text
    yield srv
    srv.stop_instances("admin", PASSWORD)
    srv.stop()


class Browser:
    """Cookies per host, redirects followed by hand: what a browser does, step by step."""

    def __init__(self, server: LabgateServer) -> None:
        self.server = server
        self.jars: dict[str, dict[str, str]] = {}
        self.http = httpx.Client(timeout=10)

    def close(self) -> None:
        self.http.close()

    def sign_in(self, name: str) -> None:
        with httpx.Client(base_url=self.server.url, timeout=10) as portal:
            signed = portal.post(
                "/api/v1/auth/login", json={"username": name, "password": USER_PASSWORD}
            )
            assert signed.status_code == 200, signed.text
            self.jars[httpx.URL(self.server.url).netloc.decode()] = {
                SESSION_COOKIE: signed.cookies[SESSION_COOKIE]
            }

    def get(self, url: str) -> httpx.Response:
        """One request to ``url`` (any host on the server's port), with that host's cookies."""
        target = httpx.URL(url)
        netloc = target.netloc.decode()
        jar = self.jars.setdefault(netloc, {})
        headers = dict(HTML, Host=netloc)
        if jar:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in jar.items())
        loopback = target.copy_with(host="127.0.0.1")
        self.http.cookies.clear()  # httpx's own jar knows only the loopback address
        answer = self.http.get(loopback, headers=headers)
        for line in answer.headers.get_list("set-cookie"):
            assert "domain=" not in line.lower(), line  # host-only, always
            for name, morsel in SimpleCookie(line).items():
                if morsel["max-age"] == "0":
                    jar.pop(name, None)
                else:
                    jar[name] = morsel.value
        return answer

    def follow(self, url: str, hops: int = 6) -> tuple[httpx.Response, list[str]]:
        """Follow redirects from ``url``; the final answer and every URL visited."""
        seen = [url]
        answer = self.get(url)
        while answer.status_code in (302, 303) and hops:
            url = str(httpx.URL(url).join(answer.headers["location"]))
            seen.append(url)
            answer = self.get(url)
            hops -= 1
        return answer, seen


@pytest.fixture
def browser(server: LabgateServer) -> Iterator[Browser]:
    b = Browser(server)
    yield b
    b.close()


def launch(server: LabgateServer, name: str) -> dict:
    headers = server.token(name, USER_PASSWORD)
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        created = client.post("/api/v1/instances", json={"tool": "demo"})
        assert created.status_code == 202, created.text
        instance = wait_state(client, created.json()["id"], {"running", "failed"})
    assert instance["state"] == "running", instance
    return instance


def test_handoff_end_to_end(server: LabgateServer, browser: Browser) -> None:
    instance = launch(server, "alice")
    url = instance["url"]
    assert url == f"http://{instance['id']}.localhost:{server.port}/"
    browser.sign_in("alice")
    answer, seen = browser.follow(url + "api/info")
    assert answer.status_code == 200, (answer.text, seen)
    # Instance host -> portal authorize -> instance host callback -> the page asked for.
    assert seen[1].startswith(f"{server.url}/oauth/authorize?")
    assert seen[2].startswith(f"{url}_labgate/callback?")
    assert "code" in httpx.URL(seen[2]).params
    assert seen[-1] == url + "api/info"
    info = answer.json()
    assert info["base_url"] == "/" and info["headers"]["x-labgate-user"] == "alice"
    assert "x-forwarded-prefix" not in info["headers"]
    netloc = httpx.URL(url).netloc.decode()
    assert set(browser.jars[netloc]) == {INSTANCE_COOKIE}
    # The old /i/ address goes to the instance's own host.
    moved = browser.get(f"{server.url}/i/{instance['id']}/api/info")
    assert moved.status_code == 302 and moved.headers["location"] == url + "api/info"

    # The code in the callback URL is good once: replayed, even by the same browser, refused.
    callback = seen[2]
    started = browser.get(url)  # a new hand-off: a new state cookie, same old code
    assert started.status_code == 200  # the cookie is still good: no hand-off needed
    browser.jars[netloc].pop(INSTANCE_COOKIE)
    started = browser.get(url)
    assert started.status_code == 302 and HANDOFF_COOKIE in browser.jars[netloc]
    replayed = browser.get(callback)
    assert replayed.status_code == 400 and INSTANCE_COOKIE not in browser.jars[netloc]

    # The portal signs a hand-off code only with a PKCE challenge; without one the
    # browser comes back with an error, and the router lets nobody in on it.
    authorize = httpx.URL(seen[1])
    bare = authorize.copy_remove_param("code_challenge").copy_remove_param("code_challenge_method")
    answer = browser.get(str(bare))
    assert answer.status_code == 303
    back = httpx.URL(answer.headers["location"])
    assert back.params["error"] == "invalid_request" and "code" not in back.params
    refused = browser.get(str(back))
    assert refused.status_code == 403 and INSTANCE_COOKIE not in browser.jars[netloc]
    # Another address on the instance's host is the tool's own (a tool is an OpenID
    # Connect client too): it gets an ordinary code, which the router's callback refuses.
    elsewhere = authorize.copy_set_param("redirect_uri", f"{url}elsewhere")
    ordinary = httpx.URL(browser.get(str(elsewhere)).headers["location"]).params["code"]
    state = httpx.URL(started.headers["location"]).params["state"]  # this browser's hand-off
    taken = browser.get(f"{url}_labgate/callback?code={ordinary}&state={state}")
    assert taken.status_code == 400 and INSTANCE_COOKIE not in browser.jars[netloc]


def test_portal_session_is_not_accepted_on_an_instance_host(
    server: LabgateServer, browser: Browser
) -> None:
    instance = launch(server, "alice")
    browser.sign_in("alice")
    session = browser.jars[httpx.URL(server.url).netloc.decode()][SESSION_COOKIE]
    netloc = httpx.URL(instance["url"]).netloc.decode()
    # Even a browser that sends the portal's cookie to the instance host is not let in by it.
    browser.jars[netloc] = {SESSION_COOKIE: session}
    answer = browser.get(instance["url"] + "api/info")
    assert answer.status_code == 302
    assert answer.headers["location"].startswith(f"{server.url}/oauth/authorize?")
    api = httpx.get(
        f"{server.url}/api/info",
        headers={"Host": netloc, "Cookie": f"{SESSION_COOKIE}={session}"},
    )
    assert api.status_code == 401


def test_sharing_on_instance_hosts(server: LabgateServer, browser: Browser) -> None:
    """No access: refused at the portal. Shared: let in. Revoked: cut. Cookies stay per host."""
    instance = launch(server, "alice")
    bobs = launch(server, "bob")
    url = instance["url"]
    browser.sign_in("bob")
    refused, seen = browser.follow(url + "api/info")
    assert refused.status_code == 404 and seen[-1].startswith(f"{server.url}/oauth/authorize")
    assert INSTANCE_COOKIE not in browser.jars.get(httpx.URL(url).netloc.decode(), {})

    alice = server.token("alice", USER_PASSWORD)
    with httpx.Client(base_url=server.url, headers=alice, timeout=10) as client:
        shared = client.post(
            f"/api/v1/instances/{instance['id']}/shares", json={"user": "bob", "access": "use"}
        )
        assert shared.status_code == 201, shared.text
        answer, _ = browser.follow(url + "api/info")
        assert answer.status_code == 200 and answer.json()["headers"]["x-labgate-user"] == "bob"
        # bob's cookie for alice's instance opens nothing on his own instance's host.
        cookie = browser.jars[httpx.URL(url).netloc.decode()][INSTANCE_COOKIE]
        own = httpx.URL(bobs["url"]).netloc.decode()
        other = httpx.get(
            f"{server.url}/api/info", headers={"Host": own, "Cookie": f"{INSTANCE_COOKIE}={cookie}"}
        )
        assert other.status_code == 401
        revoked = client.delete(f"/api/v1/instances/{instance['id']}/shares/{shared.json()['id']}")
        assert revoked.status_code == 204, revoked.text
    cut = browser.get(url + "api/info")
    assert cut.status_code == 404


def test_instance_hosts_with_router_worker_processes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Router processes get the template from the settings and take each other's cookies."""
    srv = LabgateServer(
        tmp_path / "var",
        PASSWORD,
        LABGATE_INSTANCE_HOST="{id}.localhost",
        LABGATE_ROUTER_WORKERS="2",
    )
    srv.start()
    try:
        admin = srv.token("admin", PASSWORD, ["admin", "account"])
        with httpx.Client(base_url=srv.url, headers=admin, timeout=10) as client:
            made = client.post("/api/v1/users", json={"name": "alice", "password": USER_PASSWORD})
            assert made.status_code == 201, made.text
        instance = launch(srv, "alice")
        browser = Browser(srv)
        try:
            browser.sign_in("alice")
            answer, seen = browser.follow(instance["url"] + "api/info")
            assert answer.status_code == 200, (answer.text, seen)
            # New connections are spread over both workers: every one takes the cookie.
            netloc = httpx.URL(instance["url"]).netloc.decode()
            cookie = browser.jars[netloc][INSTANCE_COOKIE]
            headers = {"Host": netloc, "Cookie": f"{INSTANCE_COOKIE}={cookie}"}
            statuses = {
                httpx.get(f"{srv.url}/api/info", headers=headers).status_code for _ in range(30)
            }
            assert statuses == {200}
        finally:
            browser.close()
    finally:
        srv.stop_instances("admin", PASSWORD)
        srv.stop()
