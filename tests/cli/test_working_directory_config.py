"""A ``./labgate.toml`` gets no credential of the user's from the CLI.

Every command reads ``labgate.toml`` from the current directory. In a shared
folder (``/tmp``, a group's project directory) it may be another account's,
and in a checkout of someone else's project it is the user's file but not
their choice: its ``url`` would get the password of ``labgate login`` and a
``LABGATE_TOKEN`` of the environment. So:

- ``./labgate.toml`` is read only when it (and the link, if it is one) belongs
  to the user (or root) and nobody else may change it; else every command
  stops with one line saying why and how to use it anyway (``LABGATE_CONFIG``);
- a URL read from it (unless it is the saved login's) gets no token given
  with ``--token`` or ``LABGATE_TOKEN`` and no password: those go only to a
  server named with ``--url``, ``LABGATE_URL`` or the file ``LABGATE_CONFIG``
  names, or to the saved login's.

docs/security.md, "The command line"; docs/cli.md, "Which server, which token".
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from labgate.cli import app
from labgate.client import ClientError, SavedLogin, resolve_target, save_login

NOBODY = 65534
SECRET_TOKEN = "lg_victims-token-0123456789abcdef"
PASSWORD = "victims-password-123"


class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        type(self).seen.append(
            {"path": self.path, "authorization": self.headers.get("Authorization"), "body": body}
        )
        payload = json.dumps({"error": "unauthorized", "detail": "no"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    _Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    finally:
        server.shutdown()
        server.server_close()


def _with_token(seen: list[dict[str, Any]], token: str = SECRET_TOKEN) -> list[dict[str, Any]]:
    return [r for r in seen if r["authorization"] and token in r["authorization"]]


def _with_password(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in seen if PASSWORD in r["body"]]


def _shared_folder(tmp_path: Path, url: str, *, owner: int = NOBODY) -> Path:
    """A world-writable sticky folder (like /tmp) where ``owner`` left a labgate.toml."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    planted = shared / "labgate.toml"
    planted.write_text(f'url = "{url}"\n')
    os.chown(planted, owner, owner)
    return shared


def _run(folder: Path, tmp_path: Path, args: list[str], env: dict[str, str] | None = None) -> Any:
    environ: dict[str, str | None] = {k: None for k in os.environ if k.startswith("LABGATE_")}
    environ.update({"XDG_CONFIG_HOME": str(tmp_path / "config"), **(env or {})})
    here = os.getcwd()
    os.chdir(folder)
    try:
        return CliRunner().invoke(app, args, env=environ, input=f"{PASSWORD}\n")
    finally:
        os.chdir(here)


def _one_error(result: Any) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return str(lines[0])


def _login(tmp_path: Path, url: str) -> None:
    save_login(SavedLogin(url, SECRET_TOKEN), tmp_path / "config" / "labgate" / "client.toml")


LOGIN = ["login", "--username", "alice", "--password-stdin"]


# --- whose file it is -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [{}, {"LABGATE_TOKEN": SECRET_TOKEN}, {"LABGATE_PORT": "8001"}],
    ids=["saved login", "token in the environment", "all settings loaded"],
)
@pytest.mark.parametrize("args", [LOGIN, ["ls"]], ids=["login", "ls"])
def test_another_accounts_labgate_toml_is_refused_and_gets_nothing(
    args: list[str],
    env: dict[str, str],
    tmp_path: Path,
    recorder: tuple[str, list[dict[str, Any]]],
) -> None:
    url, seen = recorder
    _login(tmp_path, "https://labgate.example.org")  # signed in to the real portal before
    shared = _shared_folder(tmp_path, url)
    error = _one_error(_run(shared, tmp_path, args, env))
    assert "./labgate.toml belongs to nobody (uid 65534), not to you" in error, error
    assert f"LABGATE_CONFIG={shared / 'labgate.toml'}" in error, error
    assert seen == [], f"`labgate {' '.join(args)}` in {shared} reached {url}: {seen}"


def test_a_link_of_another_accounts_is_refused_even_to_a_file_of_yours(
    tmp_path: Path, recorder: tuple[str, list[dict[str, Any]]]
) -> None:
    url, seen = recorder
    mine = tmp_path / "mine.toml"
    mine.write_text(f'url = "{url}"\n')
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    (shared / "labgate.toml").symlink_to(mine)
    os.lchown(shared / "labgate.toml", NOBODY, NOBODY)  # they may point it elsewhere any time
    error = _one_error(_run(shared, tmp_path, ["ls"], {"LABGATE_TOKEN": SECRET_TOKEN}))
    assert "belongs to nobody (uid 65534)" in error
    assert seen == []


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_labgate_toml_others_may_change_is_refused(
    mode: int, tmp_path: Path, recorder: tuple[str, list[dict[str, Any]]]
) -> None:
    url, seen = recorder
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "labgate.toml").write_text(f'url = "{url}"\n')
    (folder / "labgate.toml").chmod(mode)
    error = _one_error(_run(folder, tmp_path, ["ls"]))
    assert f"./labgate.toml may be changed by other accounts (mode 0{mode:o})" in error, error
    assert "chmod go-w labgate.toml" in error and "LABGATE_CONFIG=" in error
    assert seen == []
    (folder / "labgate.toml").chmod(0o644)  # fixed as the message says: read again
    assert "unauthorized" in _one_error(_run(folder, tmp_path, ["ls"]))
    assert len(seen) == 1


def test_labgate_config_names_such_a_file_anyway(
    tmp_path: Path, recorder: tuple[str, list[dict[str, Any]]]
) -> None:
    """The user's explicit choice: the file is read, and counts as a URL they named."""
    url, seen = recorder
    shared = _shared_folder(tmp_path, url)
    named = {"LABGATE_CONFIG": str(shared / "labgate.toml"), "LABGATE_TOKEN": SECRET_TOKEN}
    assert "unauthorized" in _one_error(_run(shared, tmp_path, ["ls"], named))
    assert len(_with_token(seen)) == 1
    _run(shared, tmp_path, LOGIN, {"LABGATE_CONFIG": str(shared / "labgate.toml")})
    assert len(_with_password(seen)) == 1


# --- whose URL it is ------------------------------------------------------------------------


@pytest.fixture
def own_checkout(
    tmp_path: Path, recorder: tuple[str, list[dict[str, Any]]]
) -> tuple[Path, str, list[dict[str, Any]]]:
    """A folder of the user's (a clone of someone's project) whose labgate.toml names a URL."""
    url, seen = recorder
    folder = tmp_path / "checkout"
    folder.mkdir()
    (folder / "labgate.toml").write_text(f'url = "{url}"\n')
    return folder, url, seen


def test_a_token_of_the_user_never_goes_to_the_url_of_a_labgate_toml(
    tmp_path: Path, own_checkout: tuple[Path, str, list[dict[str, Any]]]
) -> None:
    folder, url, seen = own_checkout
    for args, env, given in (
        (["ls"], {"LABGATE_TOKEN": SECRET_TOKEN}, "LABGATE_TOKEN"),
        (["--token", SECRET_TOKEN, "ls"], {}, "--token"),
        (["ls"], {"LABGATE_TOKEN": SECRET_TOKEN, "LABGATE_PORT": "8001"}, "LABGATE_TOKEN"),
    ):
        error = _one_error(_run(folder, tmp_path, args, env))
        assert error.startswith(f"error: not sending the token of {given}: {url} is the url of "), (
            error
        )
        assert "--url or LABGATE_URL" in error and "LABGATE_CONFIG" in error
    assert seen == []
    # Named by the user, the same server gets it.
    _run(folder, tmp_path, ["--url", url, "ls"], {"LABGATE_TOKEN": SECRET_TOKEN})
    _run(folder, tmp_path, ["ls"], {"LABGATE_URL": url, "LABGATE_TOKEN": SECRET_TOKEN})
    assert len(_with_token(seen)) == 2
    # So does the saved login's URL, with its saved token or one from the environment.
    _login(tmp_path, url)
    _run(folder, tmp_path, ["ls"])
    _run(folder, tmp_path, ["ls"], {"LABGATE_TOKEN": "lg_another-token-of-alices"})
    assert len(_with_token(seen)) == 3 and len(_with_token(seen, "lg_another")) == 1


def test_the_file_may_still_give_its_own_url_and_token(
    tmp_path: Path, own_checkout: tuple[Path, str, list[dict[str, Any]]]
) -> None:
    folder, url, seen = own_checkout
    (folder / "labgate.toml").write_text(f'url = "{url}"\ntoken = "lg_the-files-own-token"\n')
    assert "unauthorized" in _one_error(_run(folder, tmp_path, ["ls"]))
    assert len(_with_token(seen, "lg_the-files-own-token")) == 1
    # ...and its own token to a server the user names (no secret of the user's in that).
    _run(folder, tmp_path, ["ls"], {"LABGATE_URL": url})
    assert len(_with_token(seen, "lg_the-files-own-token")) == 2


def test_login_sends_the_password_only_to_a_server_the_user_named(
    tmp_path: Path, own_checkout: tuple[Path, str, list[dict[str, Any]]]
) -> None:
    folder, url, seen = own_checkout
    error = _one_error(_run(folder, tmp_path, LOGIN))
    assert error.startswith(f"error: not sending your password: {url} is the url of "), error
    assert f"`labgate login --url {url}`" in error
    assert seen == []
    _login(tmp_path, "https://labgate.example.org")
    assert "not sending your password" in _one_error(_run(folder, tmp_path, LOGIN))
    assert seen == []
    # --url (the command's or the global option), LABGATE_URL, the saved login's URL.
    for args, env in (
        ([*LOGIN, "--url", url], {}),
        (["--url", url, *LOGIN], {}),
        (LOGIN, {"LABGATE_URL": url}),
    ):
        assert "unauthorized" in _one_error(_run(folder, tmp_path, args, env))
    _login(tmp_path, url)
    assert "unauthorized" in _one_error(_run(folder, tmp_path, LOGIN))
    assert len(_with_password(seen)) == 4


def test_which_url_gets_which_credential() -> None:
    saved = SavedLogin("http://saved:1", "saved-token")
    folder = {"url_from_folder": True, "token_from_folder": True}
    # Unchanged where nothing comes from ./labgate.toml.
    assert resolve_target(None, None, settings_url="http://env:2", settings_token="t") == (
        "http://env:2",
        "t",
    )
    # The file's own token, to the file's URL.
    assert resolve_target(None, None, settings_url="http://f:3", settings_token="ft", **folder) == (
        "http://f:3",
        "ft",
    )
    # The saved login's URL, named by the file: the saved token, or the user's.
    assert resolve_target(None, None, settings_url="http://saved:1", saved=saved, **folder) == (
        "http://saved:1",
        "saved-token",
    )
    assert resolve_target(
        None, "opt", settings_url="http://saved:1", saved=saved, url_from_folder=True
    ) == ("http://saved:1", "opt")
    # Another URL from the file: no token of the user's, and no password.
    with pytest.raises(ClientError, match="not sending the token of --token"):
        resolve_target(None, "opt", settings_url="http://f:3", saved=saved, **folder)
    with pytest.raises(ClientError, match="not sending the token of LABGATE_TOKEN"):
        resolve_target(
            None, None, settings_url="http://f:3", settings_token="env", url_from_folder=True
        )
    with pytest.raises(ClientError, match="not sending your password"):
        resolve_target(None, None, settings_url="http://f:3", saved=saved, password=True, **folder)
    assert resolve_target(None, None, settings_url="http://f:3", saved=saved, **folder) == (
        "http://f:3",
        None,
    )
    # A URL the user gives outranks the file's, and gets what they give.
    assert resolve_target("http://opt:4", "opt", settings_url="http://f:3", **folder) == (
        "http://opt:4",
        "opt",
    )
