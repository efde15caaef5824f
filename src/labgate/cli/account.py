"""Your account from a terminal: ``login``, ``logout``, ``whoami`` and ``token``.

``login`` trades a password for an API token and saves it (see
:func:`labgate.client.save_login`); ``logout`` revokes it on the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from labgate.cli import output as show
from labgate.cli.context import JSON_OPTION, parse_duration, read_secret, state_of

if TYPE_CHECKING:
    from labgate.client import SavedLogin

token_app = typer.Typer(no_args_is_help=True)  # help: labgate.cli.RootGroup


def login(
    ctx: typer.Context,
    url: str | None = typer.Option(None, "--url", metavar="URL", help="Server to sign in to."),
    username: str | None = typer.Option(None, "--username", "-u", help="Your user name."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from the first line of stdin."
    ),
) -> None:
    """Sign in with your password and save an API token for later commands."""
    import socket

    from labgate.client import Client, SavedLogin, check_url, load_saved_login, save_login

    state = state_of(ctx)
    # The password goes only to a server the user named (--url, LABGATE_URL, LABGATE_CONFIG)
    # or signed in to before: never to one a ./labgate.toml names (docs/cli.md).
    server = check_url(state.target(url, password=True)[0])
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
    from labgate.client import ApiError, Client, ClientError

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


def logout() -> None:
    """Revoke the token `labgate login` saved, and forget it."""
    from labgate.client import SavedLogin, load_saved_login, save_login

    saved = load_saved_login()
    if saved is None or not saved.token:
        show.note("not signed in")
        return
    revoked = _revoke_saved(saved, quiet=False)
    save_login(SavedLogin(url=saved.url, token=""))  # the URL stays the default server
    where = "revoked and removed" if revoked else "removed from this machine"
    show.note(f"signed out of {saved.url}: token {where}")


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
    expires = parse_duration(expires_in, "--expires-in")
    body = {"note": note, "scopes": scopes or None, "expires_in": expires}
    with state_of(ctx).client() as client:
        created = client.post("/tokens", body)
    if as_json:
        show.print_json(created)
        return
    show.note(
        f"token {created['id']} ({', '.join(created['scopes'])}) created; "
        "it is shown only this once:"
    )
    show.line(created["token"])


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
