"""The ``labgate`` command line: run the server, and use one from a terminal.

Every command that talks to a server goes through the REST API
(:mod:`labgate.client`), so anything the CLI does a script can do too. A
failure is one line on stderr (``error: <detail> (<code>)``) and exit code 1;
a usage mistake is exit code 2; an interrupted wait is 130.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import typer

from labgate import __version__, cli_instances, cli_ops
from labgate import cli_output as show
from labgate.cli_context import (
    JSON_OPTION,
    CliState,
    LabgateGroup,
    fail,
    parse_duration,
    read_secret,
    state_of,
)
from labgate.cli_datasets import dataset_app
from labgate.client import (
    ApiError,
    Client,
    ClientError,
    SavedLogin,
    check_url,
    load_saved_login,
    save_login,
)
from labgate.datadir import UnsafeSetup
from labgate.startup import load_settings

app = typer.Typer(
    name="labgate",
    cls=LabgateGroup,
    help="labgate: research tools next to the data, behind one authenticated front door.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals would include tokens and passwords
)
config_app = typer.Typer(help="Inspect labgate's settings.", no_args_is_help=True)
user_app = typer.Typer(help="Manage user accounts (admins).", no_args_is_help=True)
token_app = typer.Typer(help="Create, list and revoke API tokens.", no_args_is_help=True)
tool_app = typer.Typer(help="The tool catalog.", no_args_is_help=True)
site_app = typer.Typer(help="The sites instances run on.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(user_app, name="user")
app.add_typer(token_app, name="token")
app.add_typer(tool_app, name="tool")
app.add_typer(site_app, name="site")
app.add_typer(dataset_app, name="dataset")


@app.callback()
def root(
    ctx: typer.Context,
    url: str | None = typer.Option(
        None, "--url", metavar="URL", help="Server URL (default: setting `url`, saved login)."
    ),
    token: str | None = typer.Option(
        None, "--token", metavar="TOKEN", help="API token (default: setting `token`, saved login)."
    ),
) -> None:
    """labgate: research tools next to the data, behind one authenticated front door."""
    ctx.obj = CliState(url=url, token=token)


# --- server side -------------------------------------------------------------------


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Address to listen on (setting `host`)."),
    port: int | None = typer.Option(None, help="Port to listen on (setting `port`)."),
    data_dir: Path | None = typer.Option(
        None, help="Directory for the database, logs and workspaces (setting `data_dir`)."
    ),
) -> None:
    """Run labgate: router, portal and the sites in one process."""
    settings = load_settings(host=host, port=port, data_dir=data_dir)
    from labgate.serve import run

    try:
        run(settings)
    except UnsafeSetup as exc:
        fail(f"refusing to start: {exc}")


@app.command()
def router(
    portal: str = typer.Option(
        ...,
        help="Where the portal is: http://HOST:PORT or unix:/path (stream, activity, upstream).",
    ),
    host: str | None = typer.Option(None, help="Address to listen on (setting `host`)."),
    port: int | None = typer.Option(None, help="Port to listen on (setting `port`)."),
) -> None:
    """Run a router alone, following the portal's route stream (needs the same secret_key)."""
    settings = load_settings(host=host, port=port)
    if not settings.secret_key.get_secret_value():
        fail("`labgate router` needs the portal's secret_key (set LABGATE_SECRET_KEY)")
    from labgate.serve import run_router

    try:
        run_router(settings, portal)
    except UnsafeSetup as exc:
        fail(f"refusing to start: {exc}")


@config_app.command("show")
def config_show(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Print the effective settings, secrets masked."""
    view = state_of(ctx).settings().public_view()
    if as_json:
        show.print_json(view)
    else:
        show.mapping(view)


@app.command()
def version() -> None:
    """Print labgate's version."""
    typer.echo(f"labgate {__version__}")


# --- signing in --------------------------------------------------------------------


@app.command()
def login(
    ctx: typer.Context,
    url: str | None = typer.Option(None, "--url", metavar="URL", help="Server to sign in to."),
    username: str | None = typer.Option(None, "--username", "-u", help="Your user name."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from the first line of stdin."
    ),
) -> None:
    """Sign in with your password and save an API token for later commands."""
    state = state_of(ctx)
    server = check_url(state.target(url)[0])
    if username is None:
        username = str(typer.prompt("Username", err=True))
    password = read_secret("Password", from_stdin=password_stdin)
    previous = load_saved_login()
    with Client(server) as client:
        created = client.login_token(username, password, f"labgate CLI on {socket.gethostname()}")
    path = save_login(SavedLogin(url=server, token=created["token"]))
    if previous is not None and previous.token != created["token"]:
        _revoke_saved(previous, quiet=True)
    show.note(f"signed in to {server} as {username}; token {created['prefix']}… saved in {path}")


def _revoke_saved(saved: SavedLogin, *, quiet: bool) -> bool:
    """Revoke a saved token on its server; whether it is gone there."""
    try:
        with Client(saved.url, saved.token) as client:
            row = client.find_own_token(saved.token)
            if row is not None:
                client.delete(f"/tokens/{row['id']}")
                return True
    except ApiError as exc:
        if exc.code == "invalid_token":
            return True  # already revoked or expired
        if not quiet:
            show.note(f"warning: could not revoke the token on {saved.url}: {exc}")
        return False
    except ClientError as exc:
        if not quiet:
            show.note(f"warning: could not revoke the token: {exc}")
        return False
    if not quiet:
        show.note(f"warning: the saved token is not listed on {saved.url}")
    return False


@app.command()
def logout() -> None:
    """Revoke the token `labgate login` saved, and forget it."""
    saved = load_saved_login()
    if saved is None or not saved.token:
        show.note("not signed in")
        return
    revoked = _revoke_saved(saved, quiet=False)
    save_login(SavedLogin(url=saved.url, token=""))  # the URL stays the default server
    where = "revoked and removed" if revoked else "removed from this machine"
    show.note(f"signed out of {saved.url}: token {where}")


@app.command()
def whoami(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Show who the server thinks you are, and your scopes."""
    state = state_of(ctx)
    with state.client() as client:
        session = client.get("/auth/session")
    if as_json:
        show.print_json(session)
        return
    user = session["user"]
    show.mapping(
        {
            "server": client.url,
            "user": user["name"],
            "admin": "yes" if user["is_admin"] else "no",
            "via": session["via"],
            "scopes": " ".join(session["scopes"]),
        },
        key="FIELD",
    )


# --- users ---------------------------------------------------------------------------


@user_app.command("add")
def user_add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Login name: lower case, starts with a letter."),
    admin: bool = typer.Option(False, "--admin", help="Make the user an administrator."),
    ask_password: bool = typer.Option(
        False, "--ask-password", help="Type the password instead of having one generated."
    ),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from the first line of stdin."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a user; without a password option one is generated and shown once."""
    body: dict[str, Any] = {"name": name, "is_admin": admin}
    if ask_password or password_stdin:
        body["password"] = read_secret("Password", from_stdin=password_stdin, confirm=True)
    with state_of(ctx).client() as client:
        created = client.post("/users", body)
    if as_json:
        show.print_json(created)
    elif created.get("password"):
        typer.echo(f"created user {name!r} with password: {created['password']} (shown once)")
    else:
        typer.echo(f"created user {name!r}")


@user_app.command("list")
def user_list(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """List every user."""
    with state_of(ctx).client() as client:
        rows = client.get("/users")
    if as_json:
        show.print_json(rows)
    else:
        show.users(rows)


@user_app.command("passwd")
def user_passwd(
    ctx: typer.Context,
    name: str = typer.Argument("me", help="Whose password (default: yours)."),
    password_stdin: bool = typer.Option(
        False,
        "--password-stdin",
        help="Read the new password from stdin (then the current one, when it is needed).",
    ),
) -> None:
    """Change a password: your own (asks for the current one) or, as an admin, anyone's."""
    with state_of(ctx).client() as client:
        me = client.get("/auth/session")
        own = name in ("me", me["user"]["name"])
        body = {"password": read_secret("New password", from_stdin=password_stdin, confirm=True)}
        if own and not (me["user"]["is_admin"] and "admin" in me["scopes"]):
            body["current_password"] = read_secret("Current password", from_stdin=password_stdin)
        client.put(f"/users/{name}/password", body)
    typer.echo(f"password of {me['user']['name'] if own else name!r} changed")


def _set_disabled(ctx: typer.Context, name: str, disabled: bool) -> None:
    with state_of(ctx).client() as client:
        client.patch(f"/users/{name}", {"disabled": disabled})
    typer.echo(f"user {name!r} {'disabled' if disabled else 'enabled'}")


@user_app.command("disable")
def user_disable(ctx: typer.Context, name: str = typer.Argument(..., help="The user.")) -> None:
    """Disable an account: its sessions and tokens stop working until it is enabled."""
    _set_disabled(ctx, name, True)


@user_app.command("enable")
def user_enable(ctx: typer.Context, name: str = typer.Argument(..., help="The user.")) -> None:
    """Enable a disabled account."""
    _set_disabled(ctx, name, False)


@user_app.command("data-provider")
def user_data_provider(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The user."),
    revoke: bool = typer.Option(False, "--revoke", help="Take the role away instead."),
) -> None:
    """Grant (or with --revoke take away) the role that may register datasets."""
    with state_of(ctx).client() as client:
        client.patch(f"/users/{name}", {"data_provider": not revoke})
    verb = "may no longer" if revoke else "may now"
    typer.echo(f"user {name!r} {verb} register datasets")


@user_app.command("remove")
def user_remove(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The user."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a user and their tokens; their running instances are stopped first."""
    if not yes:
        typer.confirm(f"Delete user {name!r}, their tokens, and stop their instances?", abort=True)
    with state_of(ctx).client() as client:
        client.delete(f"/users/{name}")
    typer.echo(f"user {name!r} removed")


# --- tokens ----------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    note: str = typer.Option("", "--note", help="What the token is for."),
    scopes: list[str] | None = typer.Option(
        None, "--scope", "-s", help="A scope to grant (repeat it); default: all yours but admin."
    ),
    expires_in: str | None = typer.Option(
        None, "--expires-in", metavar="DURATION", help="Lifetime, e.g. 3600, 90m, 12h, 30d."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create an API token; it is printed once, alone on stdout."""
    body = {"note": note, "scopes": scopes or None, "expires_in": parse_duration(expires_in)}
    with state_of(ctx).client() as client:
        created = client.post("/tokens", body)
    if as_json:
        show.print_json(created)
        return
    show.note(
        f"token {created['id']} ({', '.join(created['scopes'])}) created; "
        "it is shown only this once:"
    )
    typer.echo(created["token"])


@token_app.command("list")
def token_list(
    ctx: typer.Context,
    all_users: bool = typer.Option(False, "--all", help="Every user's tokens (admins)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """List your tokens (never the tokens themselves)."""
    with state_of(ctx).client() as client:
        rows = client.get("/tokens", all="true" if all_users else None)
    if as_json:
        show.print_json(rows)
    else:
        show.tokens(rows, show_user=all_users)


@token_app.command("revoke")
def token_revoke(
    ctx: typer.Context, ids: list[int] = typer.Argument(..., help="Token ids (see token list).")
) -> None:
    """Revoke tokens by id."""
    with state_of(ctx).client() as client:
        for token_id in ids:
            client.delete(f"/tokens/{token_id}")
            typer.echo(f"token {token_id} revoked")


# --- catalog -------------------------------------------------------------------------


@tool_app.command("list")
def tool_list(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """List the tools you can launch."""
    with state_of(ctx).client() as client:
        rows = client.get("/tools")
    if as_json:
        show.print_json(rows)
    else:
        show.tools(rows)


@site_app.command("list")
def site_list(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """List the sites and how many instances each runs."""
    with state_of(ctx).client() as client:
        rows = client.get("/sites")
    if as_json:
        show.print_json(rows)
    else:
        show.sites(rows)


cli_ops.register(app)  # groups, quotas, usage, keep-alive, pools, doctor

# --- instances: in their own module, registered last so `--help` lists them last ----
for command in (cli_instances.launch, cli_instances.ls, cli_instances.stop, cli_instances.logs):
    app.command()(command)


def main() -> None:
    """Entry point of the ``labgate`` script."""
    app()


if __name__ == "__main__":
    main()
