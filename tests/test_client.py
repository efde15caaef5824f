"""The REST client: saved login, target resolution, errors, and the event stream."""

from __future__ import annotations

import json
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from labgate.client import (
    DEFAULT_URL,
    ApiError,
    Client,
    ClientConfigError,
    ClientError,
    ConnectionFailed,
    EventParser,
    SavedLogin,
    WaitTimeout,
    client_config_path,
    load_saved_login,
    resolve_target,
    save_login,
)
from live_server import LiveServer, live_server

# --- the saved login --------------------------------------------------------------------


def test_config_path_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert client_config_path() == tmp_path / "xdg" / "labgate" / "client.toml"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert client_config_path() == tmp_path / "home" / ".config" / "labgate" / "client.toml"


def test_saved_login_is_private_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "labgate" / "client.toml"
    path.parent.mkdir(parents=True)
    path.write_text('url = "http://old"\n')
    path.chmod(0o644)
    login = SavedLogin(url='http://héllo "quoted"\\:1', token="lg_abc\tdef")
    save_login(login, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_saved_login(path) == login
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    save_login(SavedLogin(url="http://x", token=""), path)
    assert load_saved_login(path) == SavedLogin(url="http://x", token="")


def test_new_config_dir_is_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "labgate" / "client.toml"
    save_login(SavedLogin(url="http://x", token="t"), path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_missing_and_broken_config(tmp_path: Path) -> None:
    assert load_saved_login(tmp_path / "none.toml") is None
    broken = tmp_path / "broken.toml"
    broken.write_text("url = [unclosed\n")
    with pytest.raises(ClientConfigError, match="cannot read"):
        load_saved_login(broken)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("url = 3\n")
    with pytest.raises(ClientConfigError, match="must be strings"):
        load_saved_login(wrong)


def test_unwritable_config_is_a_client_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ClientConfigError, match="cannot write"):
        save_login(SavedLogin(url="http://x", token="t"), blocker / "labgate" / "client.toml")


# --- which server, which token -----------------------------------------------------------


def test_target_priorities() -> None:
    saved = SavedLogin(url="http://saved:1", token="saved-token")
    assert resolve_target(None, None) == (DEFAULT_URL, None)
    assert resolve_target(None, None, saved=saved) == ("http://saved:1", "saved-token")
    assert resolve_target(None, None, settings_url="http://set:2/", settings_token="st") == (
        "http://set:2",
        "st",
    )
    assert resolve_target("http://opt:3", "ot", settings_url="http://set:2", saved=saved) == (
        "http://opt:3",
        "ot",
    )
    # The saved token belongs to the saved server and is never sent elsewhere.
    assert resolve_target("http://other:4", None, saved=saved) == ("http://other:4", None)
    assert resolve_target(None, None, settings_url="http://saved:1/", saved=saved) == (
        "http://saved:1",
        "saved-token",
    )


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://x", "http://", ""])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ClientError, match="must look like"):
        Client(url)


# --- the event stream parser -----------------------------------------------------------


def test_event_parser() -> None:
    parser = EventParser()
    lines = [
        "retry: 250",
        ": a comment",
        "",
        "id: 7",
        "event: state",
        'data: {"a":',
        "data:  1}",
        "",
        "event: ignored-without-data",
        "",
        "data:plain",
        "",
    ]
    events = [event for line in lines if (event := parser.feed(line)) is not None]
    assert [(e.id, e.event, e.data) for e in events] == [
        ("7", "state", '{"a":\n 1}'),
        ("7", "message", "plain"),
    ]
    assert events[0].json() == {"a": 1}
    assert events[1].json() == {}
    assert parser.retry == 0.25
    assert parser.last_id == "7"


# --- against a real portal ------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("client-server")) as running:
        yield running


def test_api_errors_carry_code_and_detail(server: LiveServer) -> None:
    with Client(server.url, server.admin_token()) as client:
        with pytest.raises(ApiError) as caught:
            client.get("/users/nobody")
        assert (caught.value.status, caught.value.code) == (404, "unknown_user")
        assert str(caught.value) == "no user called 'nobody' (unknown_user)"
        with pytest.raises(ApiError) as caught:
            client.post("/instances", {"tool": "demo", "bogus": 1})
        assert caught.value.code == "validation_error"
        assert "\n" not in str(caught.value)


def test_login_token_gets_every_scope_of_an_admin(server: LiveServer) -> None:
    from live_server import ADMIN_PASSWORD

    with Client(server.url) as client:
        created = client.login_token("admin", ADMIN_PASSWORD, "note")
        assert "admin" in created["scopes"]
        assert not client._http.cookies  # the browser session is not kept
    with Client(server.url, created["token"]) as client:
        row = client.find_own_token(created["token"])
        assert row is not None and row["note"] == "note"
        client.delete(f"/tokens/{row['id']}")


def test_events_follow_a_launch_to_running(server: LiveServer) -> None:
    with Client(server.url, server.admin_token()) as client:
        instance = client.post("/instances", {"tool": "demo"})
        states = []
        for event in client.events(instance["id"], deadline=time.monotonic() + 60):
            states.append(event["state"])
            if event["state"] == "running":
                break
        assert states[0] == "pending" and states[-1] == "running"
        client.delete(f"/instances/{instance['id']}")
        # Once stopped, the stream replays every event and ends by itself.
        after = [e["state"] for e in client.events(instance["id"])]
        assert after[-1] == "stopped"
        assert "running" in after


def test_unreachable_server(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with Client(url) as client, pytest.raises(ConnectionFailed) as caught:
            client.get("/tools")
    assert str(caught.value).startswith(f"cannot reach labgate at {url}: ")


# --- reconnecting: a tiny real SSE server that misbehaves on purpose ---------------------


def _event(event_id: int, state: str) -> bytes:
    body = {
        "id": event_id,
        "instance": "i1",
        "kind": "state",
        "state": state,
        "message": state,
        "data": {},
        "created_at": "2024-01-01T00:00:00Z",
    }
    return f"id: {event_id}\nevent: state\ndata: {json.dumps(body)}\n\n".encode()


class FlakyHandler(BaseHTTPRequestHandler):
    """Sends one event per connection, then breaks the connection (or hangs)."""

    protocol_version = "HTTP/1.1"
    script: ClassVar[list[tuple[str, int, str]]] = []  # (how to end, event id, state)
    seen_last_ids: ClassVar[list[str | None]] = []
    instance_state: ClassVar[str] = "starting"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.endswith("/events"):
            self._events()
            return
        body = json.dumps({"id": "i1", "state": self.instance_state}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _events(self) -> None:
        self.seen_last_ids.append(self.headers.get("Last-Event-ID"))
        ending, event_id, state = self.script.pop(0)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if ending == "truncate":
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        payload = b"retry: 10\n\n" + _event(event_id, state)
        if ending == "truncate":
            # A chunk, then the connection dies without the final empty chunk.
            self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        else:
            self.wfile.write(payload)
        self.wfile.flush()
        if ending == "hang":
            time.sleep(2)
        self.close_connection = True


@pytest.fixture
def flaky() -> Iterator[str]:
    FlakyHandler.script = []
    FlakyHandler.seen_last_ids = []
    FlakyHandler.instance_state = "starting"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_events_resume_after_a_broken_connection(flaky: str) -> None:
    FlakyHandler.script = [
        ("truncate", 1, "pending"),
        ("close", 2, "starting"),
        ("close", 3, "running"),
    ]
    with Client(flaky) as client:
        states = []
        for event in client.events("i1", deadline=time.monotonic() + 20):
            states.append(event["state"])
            if event["state"] == "running":
                break
    assert states == ["pending", "starting", "running"]
    # Each reconnect asked only for what came after the last event it had.
    assert FlakyHandler.seen_last_ids == [None, "1", "2"]


def test_events_end_when_the_stream_ends_on_a_finished_instance(flaky: str) -> None:
    FlakyHandler.script = [("close", 4, "running")]
    FlakyHandler.instance_state = "stopped"
    with Client(flaky) as client:
        assert [e["state"] for e in client.events("i1")] == ["running"]


def test_events_time_out(flaky: str) -> None:
    FlakyHandler.script = [("hang", 1, "pending")]
    started = time.monotonic()
    with Client(flaky) as client, pytest.raises(WaitTimeout):
        for _event in client.events("i1", deadline=time.monotonic() + 0.5):
            pass
    assert time.monotonic() - started < 2
