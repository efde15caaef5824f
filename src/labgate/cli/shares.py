"""Sharing instances from the CLI: ``labgate share``.

Everything goes through the REST API (``/api/v1/instances/<id>/shares``,
``/links``, ``/shares/redeem``).
"""

from __future__ import annotations

import typer

from labgate.cli import output as show
from labgate.cli.context import JSON_OPTION, fail, parse_duration, state_of
from labgate.cli.output import plain_table

share_app = typer.Typer(no_args_is_help=True)  # help: labgate.cli.RootGroup

ACCESS_HELP = "use: open the tool through labgate; view: see it, its state and logs."


@share_app.command("add")
def add(
    ctx: typer.Context,
    instance: str = typer.Argument(..., help="The instance id."),
    user: str | None = typer.Option(None, "--user", help="Share with this user."),
    group: str | None = typer.Option(None, "--group", help="Share with this group."),
    access: str = typer.Option("use", "--access", help=ACCESS_HELP),
    as_json: bool = JSON_OPTION,
) -> None:
    """Share an instance with a user or a group (again: change the access)."""
    if (user is None) == (group is None):
        fail("name --user or --group (one of them)")
    if access not in ("use", "view"):
        fail("--access is use or view")
    with state_of(ctx).client() as client:
        share = client.post(
            f"/instances/{instance}/shares", {"user": user, "group": group, "access": access}
        )
    if as_json:
        show.print_json(share)
    else:
        who = share["user"] or f"group {share['group']}"
        show.note(f"{instance} is shared with {who} ({share['access']}); share id {share['id']}")


@share_app.command("ls")
def ls(
    ctx: typer.Context,
    instance: str = typer.Argument(..., help="The instance id."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Who an instance is shared with, its share links, and who used it."""
    with state_of(ctx).client() as client:
        sharing = client.get(f"/instances/{instance}/shares")
    if as_json:
        show.print_json(sharing)
        return
    plain_table(
        ["ID", "WITH", "ACCESS", "SINCE"],
        [
            [
                str(s["id"]),
                s["user"] or f"group:{s['group']}",
                s["access"] + (f" (link {s['via_link']})" if s["via_link"] else ""),
                show.when(s["created_at"]),
            ]
            for s in sharing["shares"]
        ],
        "not shared with anyone",
    )
    if sharing["links"]:
        typer.echo("")
        plain_table(
            ["LINK", "PREFIX", "EXPIRES", "USED BY"],
            [
                [
                    str(link["id"]),
                    link["prefix"],
                    "expired" if link["expired"] else show.when(link["expires_at"]),
                    ", ".join(link["used_by"]),
                ]
                for link in sharing["links"]
            ],
            "",
        )
    if sharing["visits"]:
        typer.echo("")
        plain_table(
            ["USED BY", "FIRST", "LAST"],
            [
                [v["user"], show.when(v["first_at"]), show.when(v["last_at"])]
                for v in sharing["visits"]
            ],
            "",
        )


@share_app.command("rm")
def rm(
    ctx: typer.Context,
    instance: str = typer.Argument(..., help="The instance id."),
    share_id: int = typer.Argument(..., help="The share's id (see `labgate share ls`)."),
) -> None:
    """Stop sharing: the person is cut off at their next request."""
    with state_of(ctx).client() as client:
        client.delete(f"/instances/{instance}/shares/{share_id}")
    show.note(f"share {share_id} of {instance} removed")


@share_app.command("link")
def link(
    ctx: typer.Context,
    instance: str = typer.Argument(..., help="The instance id."),
    expires: str = typer.Option("1d", "--expires", help="Valid for, e.g. 1h, 1d, 7d (at most)."),
    note: str = typer.Option("", "--note", help="What it is for (shown in `share ls`)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a share link giving `use` to whoever signs in with it; prints the link once."""
    seconds = parse_duration(expires, "--expires") or 0
    with state_of(ctx).client() as client:
        created = client.post(f"/instances/{instance}/links", {"expires_in": seconds, "note": note})
    if as_json:
        show.print_json(created)
    else:
        show.note(f"link {created['id']}, valid until {show.when(created['expires_at'])}")
        show.line(created["url"])


@share_app.command("unlink")
def unlink(
    ctx: typer.Context,
    instance: str = typer.Argument(..., help="The instance id."),
    link_id: int = typer.Argument(..., help="The link's id (see `labgate share ls`)."),
) -> None:
    """Revoke a share link and the access it gave."""
    with state_of(ctx).client() as client:
        client.delete(f"/instances/{instance}/links/{link_id}")
    show.note(f"share link {link_id} of {instance} revoked")


@share_app.command("accept")
def accept(
    ctx: typer.Context,
    link: str = typer.Argument(..., help="A share link (or just its lgl_... token)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Take up a share link someone sent you; prints the instance's URL."""
    token = link.rstrip("/").rsplit("/", 1)[-1]
    with state_of(ctx).client() as client:
        taken = client.post("/shares/redeem", {"token": token})
    if as_json:
        show.print_json(taken)
    else:
        show.line(taken["url"])
