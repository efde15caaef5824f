"""The ``labgate`` command line against a real portal on a random port."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from helpers import TEST_SECRET_KEY
from labgate import __version__
from labgate.cli import app
from labgate.cli.instances import new_lines
from live_server import ADMIN_PASSWORD, LiveServer, live_server

LABGATE = Path(sys.executable).with_name("labgate")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("cli-server")) as running:
        yield running


@pytest.fixture(scope="module")
def admin_token(server: LiveServer) -> str:
    return server.admin_token()


class Cli:
    """Runs commands in process with a clean, private environment."""

    def __init__(self, server: LiveServer, home: Path) -> None:
        self.server = server
        self.home = home
        self.runner = CliRunner()

    def env(self, token: str | None, extra: dict[str, str | None]) -> dict[str, str | None]:
        env: dict[str, str | None] = {
            name: None for name in os.environ if name.startswith("LABGATE_")
        }
        env.update(
            {
                "LABGATE_URL": self.server.url,
                "LABGATE_TOKEN": token,
                "XDG_CONFIG_HOME": str(self.home / "config"),
                "HOME": str(self.home),
                "COLUMNS": "250",
            }
        )
        env.update(extra)
        return env

    def __call__(
        self,
        *args: str,
        token: str | None = None,
        input: str | None = None,
        ok: bool = True,
        **extra: str | None,
    ) -> Any:
        result = self.runner.invoke(app, list(args), env=self.env(token, extra), input=input)
        assert "Traceback" not in result.output, result.output
        if result.exception is not None:
            assert isinstance(result.exception, SystemExit), repr(result.exception)
        if ok:
            assert result.exit_code == 0, (result.stdout, result.stderr)
        else:
            assert result.exit_code != 0, (result.stdout, result.stderr)
        return result


@pytest.fixture
def cli(server: LiveServer, tmp_path: Path) -> Cli:
    return Cli(server, tmp_path)


def one_error_line(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return str(lines[0])


def make_user(cli: Cli, admin_token: str, name: str, password: str) -> str:
    """Create a user and return an API token of theirs."""
    cli("user", "add", name, "--password-stdin", token=admin_token, input=f"{password}\n")
    with httpx.Client(base_url=cli.server.url) as http:
        login = http.post("/api/v1/auth/login", json={"username": name, "password": password})
        token = http.post(
            "/api/v1/tokens",
            json={"note": "tests"},
            headers={"X-CSRF-Token": login.json()["csrf_token"]},
        )
        return str(token.json()["token"])


# --- local commands --------------------------------------------------------------------


def test_version(cli: Cli) -> None:
    assert cli("version").stdout.strip() == f"labgate {__version__}"


def test_config_show_masks_secrets(cli: Cli) -> None:
    secrets = {"LABGATE_SECRET_KEY": "very-secret-key", "LABGATE_TOKEN": "lg_secret_token"}
    table = cli("config", "show", **secrets)
    assert "very-secret-key" not in table.output
    assert "lg_secret_token" not in table.output
    assert re.search(r"secret_key\s+\*{8}", table.stdout)
    assert re.search(r"admin_password\s*\n", table.stdout)  # unset: shown empty
    shown = json.loads(cli("config", "show", "--json", **secrets).stdout)
    assert shown["secret_key"] == "********"
    assert shown["token"] == "********"
    assert shown["url"] == cli.server.url


def test_bad_setting_is_one_line(cli: Cli) -> None:
    result = cli("config", "show", LABGATE_PORT="99999", ok=False)
    line = one_error_line(result)
    assert "LABGATE_PORT" in line and "65535" in line


def test_help_lists_every_command(cli: Cli) -> None:
    text = cli("--help").stdout
    for name in ("serve", "login", "logout", "launch", "ls", "stop", "logs", "version", "user"):
        assert name in text


# --- errors ------------------------------------------------------------------------------


def test_unreachable_server_is_one_line(cli: Cli) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening
        result = cli("--url", url, "tool", "list", ok=False)
    assert one_error_line(result).startswith(f"error: cannot reach labgate at {url}: ")


def test_unknown_tool_is_one_line(cli: Cli, admin_token: str) -> None:
    result = cli("launch", "nope", token=admin_token, ok=False)
    assert one_error_line(result) == "error: no tool called 'nope' (unknown_tool)"
    assert result.exit_code == 1


def test_bad_token_suggests_login(cli: Cli) -> None:
    result = cli("ls", token="lg_not-a-real-token", ok=False)
    line = one_error_line(result)
    assert "(invalid_token)" in line and "labgate login" in line


def test_entry_point_errors_without_traceback(server: LiveServer, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABGATE_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path), LABGATE_URL=server.url)
    done = subprocess.run(
        [str(LABGATE), "launch", "demo"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: sign in or send an API token (Authorization: token ...) (unauthorized); "
        "run `labgate login` or set LABGATE_TOKEN"
    ]
    assert done.stdout == ""


# --- signing in ------------------------------------------------------------------------


def test_login_saves_a_private_config_that_later_commands_use(cli: Cli) -> None:
    result = cli("login", "--username", "admin", "--password-stdin", input=ADMIN_PASSWORD + "\n")
    assert "signed in" in result.stderr
    path = cli.home / "config" / "labgate" / "client.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    saved = path.read_text()
    assert f'url = "{cli.server.url}"' in saved
    token = re.search(r'token = "([^"]+)"', saved)
    assert token is not None

    me = json.loads(cli("whoami", "--json").stdout)
    assert me["user"]["name"] == "admin"
    assert me["via"] == "token"
    assert "admin" in me["scopes"]  # an admin's CLI token can do admin work
    listed = json.loads(cli("token", "list", "--json").stdout)
    ours = [t for t in listed if t["prefix"] == token.group(1)[:8]]
    assert len(ours) == 1 and ours[0]["note"].startswith("labgate CLI on ")

    out = cli("logout")
    assert "revoked" in out.stderr
    assert tomllib.loads(path.read_text()) == {"url": cli.server.url}  # the token is gone
    with httpx.Client(base_url=cli.server.url) as http:
        r = http.get("/api/v1/auth/session", headers={"Authorization": f"token {token.group(1)}"})
        assert r.status_code == 401
    assert "not signed in" in cli("logout").stderr
    assert "labgate login" in one_error_line(cli("whoami", ok=False))


def test_login_with_a_wrong_password(cli: Cli) -> None:
    result = cli("login", "-u", "admin", "--password-stdin", input="wrong\n", ok=False)
    assert one_error_line(result) == "error: wrong user name or password (invalid_credentials)"
    assert not (cli.home / "config" / "labgate" / "client.toml").exists()


def test_login_prompts_for_the_password(cli: Cli) -> None:
    result = cli("login", input=f"admin\n{ADMIN_PASSWORD}\n")
    assert ADMIN_PASSWORD not in result.output
    assert (cli.home / "config" / "labgate" / "client.toml").exists()
    cli("logout")


# --- users -------------------------------------------------------------------------------


def test_weak_passwords_are_refused_in_one_line(cli: Cli, admin_token: str) -> None:
    def add_or_reset(*args: str, password: str) -> Any:
        return cli(*args, "--password-stdin", token=admin_token, input=f"{password}\n", ok=False)

    weak = add_or_reset("user", "add", "gilberto", password="12345678")
    assert one_error_line(weak) == (
        "error: this password is on a list of common passwords; choose another (weak_password)"
    )
    cli("user", "add", "gilberto", "--password-stdin", token=admin_token, input="gil-pass-123\n")
    own_name = add_or_reset("user", "passwd", "gilberto", password="Gilberto")
    assert one_error_line(own_name) == (
        "error: the password cannot be the user name (weak_password)"
    )


def test_user_lifecycle(cli: Cli, admin_token: str) -> None:
    added = cli("user", "add", "bob", token=admin_token)
    match = re.search(r"created user 'bob' with password: (\S+) \(shown once\)", added.stdout)
    assert match, added.stdout
    cli("user", "add", "carol", "--password-stdin", token=admin_token, input="carol-pass-123\n")
    exists = cli(
        "user",
        "add",
        "carol",
        "--password-stdin",
        token=admin_token,
        input="carol-pass-123\n",
        ok=False,
    )
    assert one_error_line(exists) == "error: a user called 'carol' already exists (user_exists)"

    table = cli("user", "list", token=admin_token).stdout
    assert re.search(r"^bob\s", table, re.M) and re.search(r"^carol\s", table, re.M)
    rows = {
        u["name"]: u for u in json.loads(cli("user", "list", "--json", token=admin_token).stdout)
    }
    assert rows["bob"]["disabled"] is False

    cli("user", "disable", "bob", token=admin_token)
    rows = {
        u["name"]: u for u in json.loads(cli("user", "list", "--json", token=admin_token).stdout)
    }
    assert rows["bob"]["disabled"] is True
    denied = cli("login", "-u", "bob", "--password-stdin", input=match.group(1) + "\n", ok=False)
    assert "(account_disabled)" in one_error_line(denied)
    cli("user", "enable", "bob", token=admin_token)

    # An admin resets bob's password; bob then changes it himself (with the current one).
    cli("user", "passwd", "bob", "--password-stdin", token=admin_token, input="new-bob-pass\n")
    cli("login", "-u", "bob", "--password-stdin", input="new-bob-pass\n")
    cli("user", "passwd", "--password-stdin", input="bob-pass-again\nnew-bob-pass\n")
    wrong = cli(
        "user", "passwd", "--password-stdin", input="x-pass-again\nnot-it-at-all\n", ok=False
    )
    assert "(invalid_credentials)" in one_error_line(wrong)
    cli("logout")
    cli("login", "-u", "bob", "--password-stdin", input="bob-pass-again\n")
    cli("logout")

    refused = cli("user", "remove", "bob", token=admin_token, input="n\n", ok=False)
    assert "Aborted" in refused.output
    cli("user", "remove", "bob", "--yes", token=admin_token)
    cli("user", "remove", "carol", "-y", token=admin_token)
    names = [u["name"] for u in json.loads(cli("user", "list", "--json", token=admin_token).stdout)]
    assert "bob" not in names and "carol" not in names
    gone = cli("user", "disable", "bob", token=admin_token, ok=False)
    assert one_error_line(gone) == "error: no user called 'bob' (unknown_user)"


# --- tokens -------------------------------------------------------------------------------


def test_tokens_create_list_revoke(cli: Cli, admin_token: str) -> None:
    created = cli(
        "token",
        "create",
        "--note",
        "ci job",
        "--scope",
        "instances:read",
        "--expires-in",
        "2h",
        token=admin_token,
    )
    secret = created.stdout.strip()
    assert re.fullmatch(r"\S{20,}", secret)
    assert "shown only this once" in created.stderr

    table = cli("token", "list", token=admin_token).stdout
    assert "ci job" in table and secret[:8] in table
    assert secret not in table
    rows = json.loads(cli("token", "list", "--json", token=admin_token).stdout)
    row = next(r for r in rows if r["note"] == "ci job")
    assert row["scopes"] == ["instances:read"] and row["expires_at"]
    assert all("token" not in r for r in rows)
    everyone = cli("token", "list", "--all", token=admin_token).stdout
    assert "USER" in everyone

    assert cli("ls", token=secret).exit_code == 0  # the scope it has
    refused = cli("launch", "demo", token=secret, ok=False)
    assert "(insufficient_scope)" in one_error_line(refused)

    cli("token", "revoke", str(row["id"]), token=admin_token)
    rows = json.loads(cli("token", "list", "--json", token=admin_token).stdout)
    assert row["id"] not in [r["id"] for r in rows]
    assert "(invalid_token)" in one_error_line(cli("ls", token=secret, ok=False))
    again = cli("token", "revoke", str(row["id"]), token=admin_token, ok=False)
    assert "(unknown_token)" in one_error_line(again)


def test_bad_duration_is_a_usage_error(cli: Cli, admin_token: str) -> None:
    result = cli("token", "create", "--expires-in", "soon", token=admin_token, ok=False)
    assert result.exit_code == 2
    assert "90m" in result.output


# --- catalog --------------------------------------------------------------------------------


def test_tool_and_site_list(cli: Cli, admin_token: str) -> None:
    table = cli("tool", "list", token=admin_token).stdout
    assert re.search(r"^demo\s+Demo\s+0\.5\s+512M\s+yes", table, re.M), table
    tools = {
        t["name"]: t for t in json.loads(cli("tool", "list", "--json", token=admin_token).stdout)
    }
    assert tools["demo"]["available"] is True
    sites = json.loads(cli("site", "list", "--json", token=admin_token).stdout)
    assert [s["name"] for s in sites] == ["local"]
    listed = cli("site", "list", token=admin_token).stdout
    assert re.search(r"^local\s+local\s+process\s+direct\s+local\s", listed, re.M), listed


# --- instances ------------------------------------------------------------------------------


def test_launch_ls_logs_stop(cli: Cli, admin_token: str) -> None:
    token = make_user(cli, admin_token, "dana", "dana-password-1")
    launched = cli("launch", "demo", "--cpu", "1", "--memory", "256M", token=token)
    url = launched.stdout.strip()
    match = re.fullmatch(re.escape(cli.server.url) + r"/i/([a-z0-9]+)/", url)
    assert match, launched.stdout
    instance_id = match.group(1)
    assert "running" in launched.stderr  # the progress it followed

    table = cli("ls", token=token).stdout
    assert re.search(rf"^{instance_id}\s+demo\s+dana\s+local\s+running", table, re.M), table
    rows = json.loads(cli("ls", "--json", token=token).stdout)
    assert [r["id"] for r in rows] == [instance_id]
    assert rows[0]["resources"]["cpu"] == 1

    logs = cli("logs", instance_id, "--lines", "50", token=token).stdout
    assert logs.strip()

    stopped = cli("stop", instance_id, "--wait", token=token)
    assert stopped.stdout.strip() == f"{instance_id} stopped"
    assert "no active instances" in cli("ls", token=token).stderr
    everything = cli("ls", "--all", token=token).stdout
    assert re.search(rf"^{instance_id}\s+demo\s+dana\s+local\s+stopped", everything, re.M)
    # The logs of a stopped instance still read; following one that ended returns.
    cli("logs", instance_id, "--follow", token=token)
    gone = cli("logs", "nosuchinstance", token=token, ok=False)
    assert one_error_line(gone) == "error: no instance 'nosuchinstance' (unknown_instance)"


def test_launch_with_params(cli: Cli, admin_token: str) -> None:
    listed = cli("tool", "list", token=admin_token).stdout
    assert "size=1280x800|1920x1080" in listed and "gpus=0" in listed, listed
    refused = cli("launch", "form", "-p", "gpus=9", token=admin_token, ok=False)
    assert one_error_line(refused) == "error: params.gpus: must be at most 4 (invalid_param)"
    assert refused.exit_code == 1
    malformed = cli("launch", "form", "--param", "gpus", token=admin_token, ok=False)
    assert one_error_line(malformed) == "error: --param wants NAME=VALUE, not 'gpus'"
    assert malformed.exit_code == 2
    launched = cli(
        "launch",
        "form",
        "--no-wait",
        "-p",
        "size=1920x1080",
        "--param",
        "app=a b.py",
        token=admin_token,
    )
    instance_id = launched.stdout.strip()
    shown = json.loads(cli("ls", "--json", "--all", "--tool", "form", token=admin_token).stdout)
    params = next(r["params"] for r in shown if r["id"] == instance_id)
    assert params["size"] == "1920x1080" and params["app"] == "a b.py"
    cli("stop", instance_id, token=admin_token)


def test_launch_no_wait_prints_the_id(cli: Cli, admin_token: str) -> None:
    launched = cli("launch", "demo", "--no-wait", "-o", "time=1:00:00", token=admin_token)
    instance_id = launched.stdout.strip()
    assert re.fullmatch(r"[a-z0-9]+", instance_id)
    assert "labgate ls" in launched.stderr
    shown = json.loads(cli("ls", "--json", "--all", "--tool", "demo", token=admin_token).stdout)
    assert instance_id in [r["id"] for r in shown]
    # The choice is kept with the instance (a Slurm site reads it; this one offers none).
    assert next(r for r in shown if r["id"] == instance_id)["options"] == {"time": "1:00:00"}
    bad = cli("launch", "demo", "--option", "partition", token=admin_token, ok=False)
    assert one_error_line(bad) == "error: --option wants NAME=VALUE, not 'partition'"
    assert cli("stop", instance_id, token=admin_token).stdout.startswith(instance_id)


def test_launch_json(cli: Cli, admin_token: str) -> None:
    body = json.loads(cli("launch", "demo", "--json", token=admin_token).stdout)
    assert body["state"] == "running" and body["url"].endswith(f"/i/{body['id']}/")
    cli("stop", body["id"], "--wait", token=admin_token)


def test_failed_launch_shows_the_reason_and_log_tail(cli: Cli, admin_token: str) -> None:
    result = cli("launch", "crashy", token=admin_token, ok=False)
    assert result.exit_code == 1
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "crashy" in errors[0] and "failed" in errors[0], result.stderr
    assert "crashy: no config found" in result.stderr


def test_launch_over_resource_limit(cli: Cli, admin_token: str) -> None:
    result = cli("launch", "demo", "--cpu", "64", token=admin_token, ok=False)
    line = one_error_line(result)
    assert "cpu" in line.lower()


# --- helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seen", "window", "fresh"),
    [
        ([], ["a", "b"], ["a", "b"]),
        (["a", "b"], ["a", "b"], []),
        (["a", "b"], ["a", "b", "c"], ["c"]),
        (["a", "b", "c"], ["b", "c", "d", "e"], ["d", "e"]),
        (["x", "y"], ["p", "q"], ["p", "q"]),
    ],
)
def test_new_lines(seen: list[str], window: list[str], fresh: list[str]) -> None:
    assert new_lines(seen, window) == fresh


# --- the real entry point ----------------------------------------------------------------


@pytest.mark.slow
def test_serve_then_use_it_from_another_process(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABGATE_")}
    env.update(
        LABGATE_ADMIN_PASSWORD=ADMIN_PASSWORD,
        LABGATE_SECRET_KEY=TEST_SECRET_KEY,
        XDG_CONFIG_HOME=str(tmp_path / "config"),
    )
    serving = subprocess.Popen(
        [str(LABGATE), "serve", "--port", str(port), "--data-dir", str(tmp_path / "var")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/api/v1", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert serving.poll() is None, serving.communicate()[1]
            assert time.monotonic() < deadline, "labgate serve did not come up"
            time.sleep(0.1)

        def labgate(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(LABGATE), *args],
                env=env,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=60,
            )

        signed_in = labgate(
            "login", "--url", url, "-u", "admin", "--password-stdin", stdin=ADMIN_PASSWORD + "\n"
        )
        assert signed_in.returncode == 0, signed_in.stderr
        # No --url any more: the saved login names the server.
        listed = labgate("tool", "list")
        assert listed.returncode == 0, listed.stderr
        assert re.search(r"^demo\s", listed.stdout, re.M)
        assert labgate("logout").returncode == 0
    finally:
        serving.terminate()
        serving.communicate(timeout=30)
    assert serving.returncode is not None


def test_serve_with_a_bad_port_is_one_line(cli: Cli) -> None:
    result = cli("serve", "--port", "70000", ok=False)
    line = one_error_line(result)
    assert "port" in line and "65535" in line


def test_every_command_is_documented() -> None:
    import typer.main

    text = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()

    def walk(command: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        if not hasattr(command, "list_commands"):
            yield prefix, command
            return
        ctx = typer.Context(command)  # the root loads its groups on demand
        for name in command.list_commands(ctx):
            yield from walk(command.get_command(ctx, name), f"{prefix} {name}")

    root = typer.main.get_command(app)
    commands = dict(walk(root, "labgate"))
    assert len(commands) > 15
    missing = [name for name in commands if f"`{name}`" not in text]
    assert not missing, f"commands not in docs/cli.md: {missing}"
    options = {
        opt
        for command in [root, *commands.values()]
        for param in command.params
        for opt in param.opts
        if opt.startswith("-")
    }
    undocumented = sorted(opt for opt in options if f"`{opt}" not in text)
    assert not undocumented, f"options not in docs/cli.md: {undocumented}"


def test_logs_follow_ends_with_the_instance(cli: Cli, admin_token: str) -> None:
    body = json.loads(cli("launch", "demo", "--json", token=admin_token).stdout)
    env = {k: v for k, v in cli.env(admin_token, {}).items() if v is not None}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LABGATE_")}, **env}
    following = subprocess.Popen(
        [str(LABGATE), "logs", body["id"], "--follow", "--interval", "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1)
        assert following.poll() is None  # still following a running instance
        cli("stop", body["id"], token=admin_token)
        out, err = following.communicate(timeout=30)
    finally:
        if following.poll() is None:
            following.kill()
            following.communicate()
    assert following.returncode == 0, err
    assert "starting" in out  # the header the backend writes before the tool's own output
    assert out.count("starting") == 1, out  # nothing printed twice


def test_share_add_ls_link_accept_rm(cli: Cli, admin_token: str) -> None:
    owner = make_user(cli, admin_token, "olga", "olga-password-1")
    friend = make_user(cli, admin_token, "fred", "fred-password-1")
    instance_id = cli("launch", "demo", "--no-wait", token=owner).stdout.strip()
    added = cli("share", "add", instance_id, "--user", "fred", "--access", "view", token=owner)
    assert f"{instance_id} is shared with fred (view)" in added.stderr
    table = cli("share", "ls", instance_id, token=owner).stdout
    assert re.search(r"^\d+\s+fred\s+view\s", table, re.M), table
    # fred sees it in his list, with its owner; he cannot share it on.
    assert re.search(rf"^{instance_id}\s+demo\s+olga\s", cli("ls", token=friend).stdout, re.M)
    refused = cli("share", "add", instance_id, "--user", "admin", token=friend, ok=False)
    assert "(not_owner)" in one_error_line(refused)
    both = cli("share", "add", instance_id, token=owner, ok=False)
    assert one_error_line(both) == "error: name --user or --group (one of them)"

    url = cli("share", "link", instance_id, "--expires", "1h", token=owner).stdout.strip()
    assert "/share/lgl_" in url
    taken = cli("share", "accept", url, token=friend).stdout.strip()
    assert taken.endswith(f"/i/{instance_id}/")
    sharing = json.loads(cli("share", "ls", instance_id, "--json", token=owner).stdout)
    assert sharing["links"][0]["used_by"] == ["fred"]
    cli("share", "unlink", instance_id, str(sharing["links"][0]["id"]), token=owner)
    cli("share", "rm", instance_id, str(sharing["shares"][0]["id"]), token=owner)
    assert "not shared with anyone" in cli("share", "ls", instance_id, token=owner).stderr
    cli("stop", instance_id, token=owner)
