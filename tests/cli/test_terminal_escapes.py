"""Text another account wrote never reaches a user's terminal as escape sequences.

A data provider (a role below admin) registers datasets everyone lists; a
site, a tool's health check or a run writes event messages and reasons. The
server refuses control characters in a dataset's title, description and
license (as it does in snapshot names), and the CLI shows every string the
server sends through one function (``labgate.cli.output.visible``): control
characters and bidirectional overrides become visible escapes (``\\x1b``),
and Rich markup is escaped, in tables, notes, errors, progress and status
lines alike. Without that, ``labgate dataset list`` clears the screen, puts
``rm -rf ~`` on the clipboard (OSC 52) or rewrites earlier lines in the
terminal of every user who runs it (docs/security.md, "The command line").
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from labgate.cli import app, output
from live_server import LiveServer, live_server

ESC = "\x1b"
# Clear the screen, home the cursor, put "rm -rf ~" on the clipboard (OSC 52), ring.
EVIL = f"Iris{ESC}[2J{ESC}[H{ESC}]52;c;cm0gLXJmIH4K{ESC}\\fine\x07\x9b2J\u202etxt.exe"
# Rich markup that would become an OSC 8 hyperlink and a style, were it read as markup.
MARKUP = "[link=https://evil.example/]ready[/link] [reverse]x[/reverse]"
# What must never reach the terminal (Rich's own styles are ESC [ … m, so ESC alone is not).
RAW = (f"{ESC}[2J", f"{ESC}[H", f"{ESC}]52", f"{ESC}]8", "\x07", "\x9b", "\u202e")
PASSWORD = "a-long-enough-password-1"


# --- the one function ---------------------------------------------------------------


def test_visible_shows_control_characters_and_bidi_overrides_as_escapes() -> None:
    assert output.visible(EVIL) == (
        "Iris\\x1b[2J\\x1b[H\\x1b]52;c;cm0gLXJmIH4K\\x1b\\fine\\x07\\x9b2J\\u202etxt.exe"
    )
    assert output.visible("a\tb\nc\r\x00\x7f\u2028\u2066\u2069") == (
        "a\\tb\\nc\\r\\x00\\x7f\\u2028\\u2066\\u2069"
    )
    # Where the layout lets text run over lines, tabs and newlines stay (CRLF as LF).
    assert output.visible("one\r\ntwo\tthree\rx", lines=True) == "one\ntwo\tthree\\rx"
    # Ordinary text, wide and accented characters included, is left as it is.
    for text in ("Iris measurements", "数据集 données", "C:\\data", "50% [approx]"):
        assert output.visible(text) == text
    # As Rich markup: brackets are escaped, and Rich prints the text as it came.
    from rich.console import Console
    from rich.markup import render

    assert render(output.visible(MARKUP, markup=True)).plain == MARKUP
    console = Console(force_terminal=True, color_system="truecolor", width=200, highlight=False)
    with console.capture() as captured:
        console.print(output.visible(f"{MARKUP} {EVIL}", markup=True))
    drawn = captured.get()
    assert "ready[/link]" in drawn and "\\x1b]52" in drawn
    assert not [raw for raw in RAW if raw in drawn], repr(drawn)


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
def test_every_table_shows_escapes_not_control_characters(
    terminal: bool, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TTY_COMPATIBLE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "250")
    if terminal:
        monkeypatch.setenv("TTY_COMPATIBLE", "1")
        monkeypatch.setenv("FORCE_COLOR", "1")
    output._table(("NAME", "DESCRIPTION"), [(EVIL, f"{MARKUP}\nline two")], "none")
    output._table(("NAME", "STATE"), [("x", output.coloured(EVIL, "red"))], "none")
    output.plain_table(["NAME", "NOTE"], [[EVIL, MARKUP]], "none")
    output.note(EVIL)
    drawn = capsys.readouterr()
    text = drawn.out + drawn.err
    assert not [raw for raw in RAW if raw in text], repr(text)
    assert text.count("Iris\\x1b[2J\\x1b[H\\x1b]52") == 4, text
    assert text.count("[link=https://evil.example/]ready[/link]") == 2, text
    assert "line two" in text and "\\nline two" not in text  # a description keeps its lines


# --- the server refuses them ------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("escapes")) as running:
        yield running


def _user_token(server: LiveServer, admin: str, name: str, *, provider: bool) -> str:
    with httpx.Client(base_url=server.url) as http:
        auth = {"Authorization": f"token {admin}"}
        made = http.post("/api/v1/users", json={"name": name, "password": PASSWORD}, headers=auth)
        assert made.status_code == 201, made.text
        if provider:
            granted = http.patch(
                f"/api/v1/users/{name}", json={"data_provider": True}, headers=auth
            )
            assert granted.status_code == 200, granted.text
        login = http.post("/api/v1/auth/login", json={"username": name, "password": PASSWORD})
        assert login.status_code == 200, login.text
        created = http.post(
            "/api/v1/tokens",
            json={"note": "t"},
            headers={"X-CSRF-Token": login.json()["csrf_token"]},
        )
        assert created.status_code == 201, created.text
        return str(created.json()["token"])


def test_the_server_refuses_control_characters_in_a_datasets_title_description_and_license(
    server: LiveServer,
) -> None:
    admin = server.admin_token()
    mallory = _user_token(server, admin, "mallory", provider=True)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"token {mallory}"}) as http:
        for field, value in (
            ("title", EVIL),
            ("title", "two\nlines"),
            ("license", f"CC-BY{ESC}[8m"),
            ("description", f"fine{ESC}]52;c;cm0gLXJmIH4K\x07"),
            ("description", "nul\x00"),
            # Shown in another order than stored: "photos_\u202egpj.exe" reads as "...exe.jpg".
            ("title", "photos_\u202egpj.exe"),
            ("description", "a\u2066b\u2069"),
        ):
            body = {"id": "doi:10.5281/zenodo.999", field: value}
            refused = http.post("/api/v1/datasets", json=body)
            assert refused.status_code == 422, (field, refused.text)
            assert field in refused.text and "control characters" in refused.text
        # A description may hold lines and tabs.
        made = http.post(
            "/api/v1/datasets",
            json={
                "id": "doi:10.5281/zenodo.999",
                "title": "Iris",
                "license": "CC-BY-4.0",
                "description": "Measurements.\r\n\tSepal\tPetal\n",
            },
        )
        assert made.status_code == 201, made.text
        for field, value in (("title", EVIL), ("license", "\x9b2J"), ("description", EVIL)):
            patched = http.patch("/api/v1/datasets/doi:10.5281%2Fzenodo.999", json={field: value})
            assert patched.status_code == 422, (field, patched.text)
        assert http.get("/api/v1/datasets/doi:10.5281%2Fzenodo.999").json()["title"] == "Iris"
    # A site's inventory push names titles for the datasets it registers: the same rule.
    with httpx.Client(base_url=server.url, headers={"Authorization": f"token {admin}"}) as http:
        entry = {"id": "doi:10.5281/zenodo.1000", "path": "x", "title": EVIL}
        pushed = http.post("/api/v1/sites/local/inventory", json={"replicas": [entry]})
        assert pushed.status_code == 422, pushed.text
        assert http.get("/api/v1/datasets/doi:10.5281%2Fzenodo.1000").status_code == 404


# --- the CLI shows what a server sends, made visible ------------------------------------------


def _dataset(identifier: str, title: str) -> dict[str, Any]:
    return {
        "id": identifier,
        "scheme": "doi",
        "name": "zenodo.999",
        "title": title,
        "description": f"{EVIL}\nsecond line {MARKUP}",
        "size": 4096,
        "license": EVIL,
        "landing_page": "https://doi.org/10.5281/zenodo.999",
        "checksum": "",
        "resolver_url": None,
        "owner": "mallory",
        "created_at": "2026-12-01T10:00:00+00:00",
        "updated_at": "2026-12-01T10:00:00+00:00",
        "replicas": [
            {
                "site": "local",
                "path": EVIL,
                "size": 1,
                "checksum": "",
                "verified_at": None,
                "source": "api",
                "reported_at": "2026-12-01T10:00:00+00:00",
                "live": False,
                "reason": EVIL,
            }
        ],
    }


def _instance(state: str, reason: str) -> dict[str, Any]:
    return {
        "id": "i0000evil",
        "tool": "demo",
        "owner": "alice",
        "site": "local",
        "state": state,
        "created_at": "2026-12-01T10:00:00+00:00",
        "reason": reason,
        "url": "http://127.0.0.1:1/i/i0000evil/",
        "queue": None,
    }


def _events() -> bytes:
    events = [
        {"state": "pending", "message": EVIL},
        {"state": "starting", "message": MARKUP},
        {"state": "failed", "message": EVIL, "data": {"log_tail": f"Traceback\n{EVIL}\nend"}},
    ]
    return "".join(
        f"id: {n}\ndata: {json.dumps(event)}\n\n" for n, event in enumerate(events, 1)
    ).encode()


ROUTES: dict[tuple[str, str], tuple[int, str, Any]] = {
    ("GET", "/api/v1/datasets"): (200, "json", [_dataset("doi:10.5281/zenodo.999", EVIL)]),
    ("GET", "/api/v1/datasets/doi:10.5281%2Fzenodo.999"): (
        200,
        "json",
        _dataset("doi:10.5281/zenodo.999", MARKUP),
    ),
    ("POST", "/api/v1/datasets"): (201, "json", _dataset(f"doi:10.5281/{EVIL}", EVIL)),
    ("GET", "/api/v1/instances"): (200, "json", [_instance("failed", EVIL)]),
    ("POST", "/api/v1/instances"): (201, "json", _instance("pending", "")),
    ("GET", "/api/v1/instances/i0000evil"): (200, "json", _instance("failed", EVIL)),
    ("GET", "/api/v1/instances/i0000evil/events"): (200, "events", _events()),
    ("DELETE", "/api/v1/instances/i0000evil"): (
        409,
        "json",
        {"error": "invalid_state", "detail": f"cannot stop {EVIL} {MARKUP}"},
    ),
}


class _Evil(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        status, kind, body = ROUTES.get(
            (self.command, path), (404, "json", {"error": "not_found", "detail": path})
        )
        payload = body if kind == "events" else json.dumps(body).encode()
        self.send_response(status)
        self.send_header(
            "Content-Type", "text/event-stream" if kind == "events" else "application/json"
        )
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def evil_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Evil)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


COMMANDS = {
    "dataset list": (["dataset", "list"], 0),
    "dataset list --json": (["dataset", "list", "--json"], 0),
    "dataset show": (["dataset", "show", "doi:10.5281/zenodo.999"], 0),
    "dataset register": (["dataset", "register", "doi:10.5281/zenodo.999"], 0),
    "ls": (["ls", "--all"], 0),
    "launch (progress, status, failure, log tail)": (["launch", "demo"], 1),
    "stop (an error)": (["stop", "i0000evil"], 1),
}


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_cli_never_writes_a_servers_control_characters_to_the_terminal(
    command: str, terminal: bool, evil_server: str, tmp_path: Path
) -> None:
    args, code = COMMANDS[command]
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("LABGATE_")}
    env.update(
        {
            "LABGATE_URL": evil_server,
            "LABGATE_TOKEN": "lg_alices-token",
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "COLUMNS": "250",
            "TTY_COMPATIBLE": "1" if terminal else None,
            "FORCE_COLOR": "1" if terminal else None,
        }
    )
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    written = result.stdout + result.stderr
    assert "Traceback (most recent call last)" not in written
    leaked = [raw for raw in RAW if raw in written]
    assert not leaked, f"`labgate {' '.join(args)}` wrote {leaked} to the terminal: {written!r}"
    assert "\\x1b[2J" in written or "\\u001b[2J" in written, written  # shown, as an escape
    if command.endswith("--json"):
        assert json.loads(result.stdout)[0]["title"] == EVIL  # the same data
    if command.startswith(("launch", "stop")):
        assert "[link=https://evil.example/]ready[/link]" in written, written
    if command == "stop (an error)":
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "\\x1b[2J" in errors[0], result.stderr
