"""Operations commands of the CLI: groups, quotas, usage, keep-alive, warm pools, doctor.

Everything but ``doctor`` goes through the REST API (``/api/v1/groups``,
``/users/<name>/limits``, ``/usage``, ``/instances/<id>/keep-alive``,
``/pools``). ``doctor`` runs on the server's machine with its settings.
:func:`register` adds them all to the root app.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from labgate import cli_output as show
from labgate.cli_context import JSON_OPTION, fail, parse_duration, state_of
from labgate.errors import ConfigError
from labgate.startup import load_settings

group_app = typer.Typer(help="Groups of users and their limits (admins).", no_args_is_help=True)
quota_app = typer.Typer(help="Users' limits and what they use.", no_args_is_help=True)
pool_app = typer.Typer(help="Warm pools of pre-started instances.", no_args_is_help=True)

LIMIT_HELP = "A number, or 'none' to remove the limit."


def _table(columns: list[str], rows: list[list[str]], empty: str) -> None:
    if not rows:
        show.note(empty)
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    console = show.stdout()
    with console.capture() as captured:
        console.print(table)
    typer.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


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
        "max_lifetime": parse_duration(max_lifetime),
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
        body["max_lifetime"] = None if max_lifetime == "none" else parse_duration(max_lifetime)
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


# --- keep-alive ----------------------------------------------------------------------


def _until(value: str) -> str:
    """An ISO 8601 time; without a zone it is local time."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"expected a time such as 2026-11-22T18:00, not {value!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.astimezone(UTC).isoformat()


def _countdown(view: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    lines = {"instance": view["instance"], "state": view["state"]}
    until = view.get("keep_alive_until")
    lines["kept alive until"] = (
        f"{show.when(until)} ({_left(datetime.fromisoformat(until) - now)})" if until else "-"
    )
    if view.get("cull_at"):
        reason = {"idle": "if unused", "lifetime": "maximum lifetime"}.get(view["cull_reason"], "")
        lines["stops"] = (
            f"{show.when(view['cull_at'])} (in {_left_seconds(view['cull_in'])}, {reason})"
        )
    else:
        lines["stops"] = "not by itself"
    if view.get("capped"):
        lines["note"] = (
            f"cut to the longest keep-alive allowed ({_left_seconds(view['keep_alive_max'])})"
        )
    show.mapping(lines, key="KEEP-ALIVE")


def _left(delta: Any) -> str:
    return _left_seconds(delta.total_seconds())


def _left_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def keep_alive(
    ctx: typer.Context,
    instance_id: str = typer.Argument(..., metavar="ID", help="The instance."),
    until: str | None = typer.Option(None, "--until", help="Keep it until then (ISO 8601 time)."),
    for_: str | None = typer.Option(None, "--for", help="Keep it this long, e.g. 4h."),
    off: bool = typer.Option(False, "--off", help="End the keep-alive."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Spare an idle instance until a time; without options, show when it stops."""
    if sum((until is not None, for_ is not None, off)) > 1:
        fail("give one of --until, --for, --off")
    path = f"/instances/{instance_id}/keep-alive"
    with state_of(ctx).client() as client:
        if off:
            view = client.delete(path)
        elif until is not None:
            view = client.put(path, {"until": _until(until)})
        elif for_ is not None:
            view = client.put(path, {"for": parse_duration(for_)})
        else:
            view = client.get(path)
    show.print_json(view) if as_json else _countdown(view)


# --- pools ---------------------------------------------------------------------------


@pool_app.command("list")
def pool_list(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Warm pools: size, ready and starting instances, and why a pool is off (admins)."""
    with state_of(ctx).client() as client:
        rows = client.get("/pools")
    if as_json:
        show.print_json(rows)
        return
    _table(
        ["TOOL", "SITE", "SIZE", "READY", "STARTING", "NOTE"],
        [
            [
                p["tool"],
                p["site"],
                str(p["size"]),
                str(p["ready"]),
                str(p["starting"]),
                p["disabled"] or "",
            ]
            for p in rows
        ],
        "no warm pools (setting `pools`)",
    )


# --- doctor --------------------------------------------------------------------------


def doctor(as_json: bool = JSON_OPTION) -> None:
    """Check settings, database, sites, backends and their engines, and say what to fix."""
    from labgate.doctor import Finding, run_checks

    try:
        findings = run_checks(load_settings())
    except ConfigError as exc:
        findings = [
            Finding("fail", "settings", problem, "fix the settings") for problem in exc.problems
        ]
    if as_json:
        show.print_json([f.as_json() for f in findings])
    else:
        marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
        for finding in findings:
            typer.echo(f"{marks[finding.level]}  {finding.subject}: {finding.detail}")
            if finding.fix:
                typer.echo(f"      fix: {finding.fix}")
    failed = sum(f.level == "fail" for f in findings)
    if failed:
        show.note(f"{failed} problem(s) to fix")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the operations commands to the root app."""
    app.add_typer(group_app, name="group")
    app.add_typer(quota_app, name="quota")
    app.add_typer(pool_app, name="pool")
    app.command()(usage)
    app.command("keep-alive")(keep_alive)
    app.command()(doctor)
