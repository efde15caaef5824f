"""``labgate user``: accounts, passwords and roles (admins; ``passwd`` for anyone)."""

from __future__ import annotations

from typing import Any

import typer

from labgate.cli import output as show
from labgate.cli.context import JSON_OPTION, read_secret, state_of

user_app = typer.Typer(no_args_is_help=True)  # help: labgate.cli.RootGroup


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
        show.line(f"created user {name!r} with password: {created['password']} (shown once)")
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
    show.line(f"password of {me['user']['name'] if own else name!r} changed")


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
