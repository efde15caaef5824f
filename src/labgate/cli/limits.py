"""Limits and use in the CLI: ``group``, ``quota`` and ``usage``.

Everything goes through the REST API (``/api/v1/groups``,
``/users/<name>/limits``, ``/usage``).
"""

from __future__ import annotations

from typing import Any

import typer

from labgate.cli import output as show
from labgate.cli.context import JSON_OPTION, fail, parse_duration, state_of
from labgate.cli.output import plain_table as _table

# Their help: labgate.cli.RootGroup.
group_app = typer.Typer(no_args_is_help=True)
quota_app = typer.Typer(no_args_is_help=True)

LIMIT_HELP = "A number, or 'none' to remove the limit."


def _number(value: str | None, name: str, *, size: bool = False) -> Any:
    """A limit option: None (not given), the string 'none' (remove it), or a number."""
    if value is None:
        return ...
    if value.lower() == "none":
        return None
    if size:
        return value  # "16G" or "1073741824": the server parses sizes (bodies take no 1e9 float)
    try:
        number = float(value)
    except ValueError:
        raise typer.BadParameter(f"{name}: expected a number or 'none', not {value!r}") from None
    return int(number) if name == "instances" else number


def _limits(
    instances: str | None, cpu: str | None, memory: str | None, core_hours: str | None
) -> dict[str, Any]:
    values = {
        "instances": _number(instances, "instances"),
        "cpu": _number(cpu, "cpu"),
        "memory": _number(memory, "memory", size=True),
        "core_hours": _number(core_hours, "core_hours"),
    }
    return {key: value for key, value in values.items() if value is not ...}


def _limit_text(limits: dict[str, Any]) -> str:
    parts = []
    for key in ("instances", "cpu", "memory", "core_hours"):
        value = limits.get(key)
        if value is not None:
            shown = show.size(value) if key == "memory" else f"{value:g}"
            parts.append(f"{key}={shown}")
    return " ".join(parts) or "none"


def _use_text(use: dict[str, Any]) -> str:
    return (
        f"{use['instances']} instances, {use['cpu']:g} CPU, {show.size(use['memory'])}, "
        f"{use['core_hours']:g} core-h this month"
    )


def _groups(rows: list[dict[str, Any]]) -> None:
    _table(
        ["GROUP", "MEMBERS", "LIMITS", "USE", "MAX LIFETIME"],
        [
            [
                g["name"],
                ", ".join(g["members"]),
                _limit_text(g["limits"]),
                _use_text(g["use"]),
                f"{g['max_lifetime']:g}s" if g.get("max_lifetime") else "",
            ]
            for g in rows
        ],
        "no groups",
    )


INSTANCES_OPT = typer.Option(None, "--instances", help=f"Instances at once. {LIMIT_HELP}")
CPU_OPT = typer.Option(None, "--cpu", help=f"CPU cores held at once. {LIMIT_HELP}")
MEMORY_OPT = typer.Option(None, "--memory", help=f"Memory held at once, e.g. 16G. {LIMIT_HELP}")
CORE_HOURS_OPT = typer.Option(None, "--core-hours", help=f"Core-hours per month. {LIMIT_HELP}")


# --- groups --------------------------------------------------------------------------


@group_app.command("list")
def group_list(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """List groups (admins: all; others: yours) with members, limits and use."""
    with state_of(ctx).client() as client:
        rows = client.get("/groups")
    show.print_json(rows) if as_json else _groups(rows)


@group_app.command("show")
def group_show(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The group."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show one group."""
    with state_of(ctx).client() as client:
        group = client.get(f"/groups/{name}")
    show.print_json(group) if as_json else _groups([group])


@group_app.command("create")
def group_create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Lower-case group name."),
    description: str = typer.Option("", "--description", help="What the group is."),
    instances: str | None = INSTANCES_OPT,
    cpu: str | None = CPU_OPT,
    memory: str | None = MEMORY_OPT,
    core_hours: str | None = CORE_HOURS_OPT,
    max_lifetime: str | None = typer.Option(
        None, "--max-lifetime", help="Longest an instance charged to it may run, e.g. 8h."
    ),
) -> None:
    """Create a group, optionally with limits."""
    body: dict[str, Any] = {
        "name": name,
        "description": description,
        "limits": _limits(instances, cpu, memory, core_hours),
        "max_lifetime": parse_duration(max_lifetime, "--max-lifetime"),
    }
    with state_of(ctx).client() as client:
        _groups([client.post("/groups", body)])


@group_app.command("set")
def group_set(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The group."),
    description: str | None = typer.Option(None, "--description", help="What the group is."),
    instances: str | None = INSTANCES_OPT,
    cpu: str | None = CPU_OPT,
    memory: str | None = MEMORY_OPT,
    core_hours: str | None = CORE_HOURS_OPT,
    max_lifetime: str | None = typer.Option(
        None, "--max-lifetime", help="e.g. 8h, or 'none' to remove the limit."
    ),
) -> None:
    """Change a group's limits, description or maximum lifetime."""
    body: dict[str, Any] = {"limits": _limits(instances, cpu, memory, core_hours)}
    if description is not None:
        body["description"] = description
    if max_lifetime is not None:
        lifetime = (
            None if max_lifetime == "none" else parse_duration(max_lifetime, "--max-lifetime")
        )
        body["max_lifetime"] = lifetime
    with state_of(ctx).client() as client:
        _groups([client.patch(f"/groups/{name}", body)])


@group_app.command("delete")
def group_delete(ctx: typer.Context, name: str = typer.Argument(..., help="The group.")) -> None:
    """Delete a group (its usage records keep its name)."""
    with state_of(ctx).client() as client:
        client.delete(f"/groups/{name}")
    show.note(f"deleted group {name}")


@group_app.command("add")
def group_add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The group."),
    users: list[str] = typer.Argument(..., help="Users to add."),
) -> None:
    """Add users to a group."""
    with state_of(ctx).client() as client:
        for user in users:
            client.put(f"/groups/{name}/members/{user}")
    show.note(f"added to {name}: {', '.join(users)}")


@group_app.command("remove")
def group_remove(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The group."),
    users: list[str] = typer.Argument(..., help="Users to take out."),
) -> None:
    """Take users out of a group."""
    with state_of(ctx).client() as client:
        for user in users:
            client.delete(f"/groups/{name}/members/{user}")
    show.note(f"removed from {name}: {', '.join(users)}")


# --- quotas --------------------------------------------------------------------------


def _quota(view: dict[str, Any]) -> None:
    show.mapping(
        {
            "user": view["user"],
            "limits": _limit_text(view["effective"]),
            "own limits": _limit_text(view["limits"]),
            "use": _use_text(view["use"]),
            "groups": ", ".join(g["name"] for g in view["groups"]) or "none",
        },
        key="QUOTA",
    )
    if view["groups"]:
        _groups(view["groups"])


@quota_app.command("show")
def quota_show(
    ctx: typer.Context,
    user: str = typer.Argument("me", help="The user (admins); default: you."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show a user's limits, what they use, and their groups'."""
    with state_of(ctx).client() as client:
        view = client.get(f"/users/{user}/limits")
    show.print_json(view) if as_json else _quota(view)


@quota_app.command("set")
def quota_set(
    ctx: typer.Context,
    user: str = typer.Argument(..., help="The user."),
    instances: str | None = INSTANCES_OPT,
    cpu: str | None = CPU_OPT,
    memory: str | None = MEMORY_OPT,
    core_hours: str | None = CORE_HOURS_OPT,
) -> None:
    """Set a user's own limits (admins); 'none' puts the default back."""
    body = _limits(instances, cpu, memory, core_hours)
    if not body:
        fail("give at least one of --instances, --cpu, --memory, --core-hours")
    with state_of(ctx).client() as client:
        _quota(client.put(f"/users/{user}/limits", body))


# --- usage ---------------------------------------------------------------------------


def usage(
    ctx: typer.Context,
    by: list[str] = typer.Option(
        [], "--by", help="Group by user, group, tool or site (repeat for several)."
    ),
    period: str = typer.Option("month", "--period", help="day, week, month, year or all."),
    since: str | None = typer.Option(None, "--since", help="Start, e.g. 2026-11-01."),
    until: str | None = typer.Option(None, "--until", help="End (default: now)."),
    user: str | None = typer.Option(None, "--user", help="Only this user's (admins)."),
    group: str | None = typer.Option(None, "--group", help="Only launches charged to this group."),
    tool: str | None = typer.Option(None, "--tool", help="Only this tool."),
    site: str | None = typer.Option(None, "--site", help="Only this site."),
    records: bool = typer.Option(False, "--records", help="Each usage record, not sums."),
    csv: bool = typer.Option(False, "--csv", help="Print CSV (for spreadsheets)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show usage: instances, hours, core-hours and GiB-hours, summed or record by record."""
    params: dict[str, Any] = {
        "since": since,
        "until": until,
        "user": user,
        "group": group,
        "tool": tool,
        "site": site,
    }
    path = "/usage/records" if records else "/usage"
    if not records:
        params.update(by=by or None, period=period)
    with state_of(ctx).client() as client:
        if csv:
            typer.echo(client.get_text(path, **params, format="csv"), nl=False)
            return
        data = client.get(path, **params)
    if as_json:
        show.print_json(data)
    elif records:
        _table(
            ["INSTANCE", "USER", "GROUP", "TOOL", "SITE", "STARTED", "STOPPED", "REASON", "CORE-H"],
            [
                [
                    r["instance"],
                    r["user"],
                    r["group"],
                    r["tool"],
                    r["site"],
                    show.when(r["started_at"]),
                    show.when(r["stopped_at"]),
                    r["reason"],
                    f"{r['core_hours']:.2f}",
                ]
                for r in data
            ],
            "no usage records in this time range",
        )
    else:
        keys = data["by"]
        _table(
            ["PERIOD", *(k.upper() for k in keys), "INSTANCES", "HOURS", "CORE-H", "GIB-H"],
            [
                [
                    row["period"],
                    *(row[k] or "-" for k in keys),
                    str(row["instances"]),
                    f"{row['hours']:.2f}",
                    f"{row['core_hours']:.2f}",
                    f"{row['memory_gib_hours']:.2f}",
                ]
                for row in data["rows"]
            ],
            "no usage in this time range",
        )
