"""``labgate site``: the sites instances run on; admins add and remove network sites.

Everything goes through the REST API (``/sites``). A network site's agent
dials out to the portal with the enrolment token ``site add`` (or ``site
token``) prints once; the line to run on the site's machine is printed with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import typer

from labgate.cli import output as show
from labgate.cli.context import JSON_OPTION, state_of

site_app = typer.Typer(no_args_is_help=True)  # help: labgate.cli.RootGroup


def pairs(values: list[str], what: str, *, typed: bool = False) -> dict[str, Any]:
    """``KEY=VALUE`` options as a mapping; with ``typed``, a value that is JSON is read as JSON."""
    found: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, not {item!r}", param_hint=what)
        parsed: Any = value
        if typed:
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = value  # plain text: a path, a name, a URL
        found[key.strip()] = parsed
    return found


def _path(name: str, *rest: str) -> str:
    return "/".join(["/sites", quote(name, safe=""), *rest])


def capacity_text(capacity: dict[str, Any]) -> str:
    """``cpu=8 memory=64G instances=4``, or ``unlimited``."""
    shown: dict[str, Callable[[Any], str]] = {
        "cpu": lambda v: f"{float(v):g}",
        "memory": show.size,
        "max_instances": str,
    }
    labels = {"cpu": "cpu", "memory": "memory", "max_instances": "instances"}
    parts = [f"{labels[key]}={shown[key](capacity[key])}" for key in shown if capacity.get(key)]
    return " ".join(parts) or "unlimited"


def start_queue_text(starts: Any) -> str:
    """What a site gives to starts at once (its start queue), as ``site show`` says it."""
    if not starts:
        return "none (starts everything at once)"
    return f"{float(starts):g} cores of starts at once; the rest wait queued"


def since(site: dict[str, Any]) -> str:
    """Since when a network site's agent is connected, or has been gone."""
    if site.get("status") == "connected":
        return show.when(site.get("connected_since"))
    if site.get("status") == "disconnected":
        return show.when(site.get("disconnected_since"))
    return ""


def print_token(site: dict[str, Any], portal_url: str, verb: str) -> None:
    """The token, once, and the exact command that starts the site's agent with it."""
    show.line(f"{verb} network site {site['name']!r} ({site['backend']} backend, {site['reach']})")
    show.line(f"enrolment token (shown only this once): {site['token']}")
    typer.echo("on the site's machine, run:")
    show.line(f"  labgate agent --portal {portal_url} --token {site['token']}")


@site_app.command("list")
def site_list(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """List the sites: kind, backend, reach, status, heartbeat, agent, instances, capacity."""
    with state_of(ctx).client() as client:
        rows = client.get("/sites")
    if as_json:
        show.print_json(rows)
        return
    show.plain_table(
        [
            "NAME",
            "KIND",
            "BACKEND",
            "REACH",
            "STATUS",
            "SINCE",
            "LAST HEARTBEAT",
            "AGENT",
            "INSTANCES",
            "CAPACITY",
        ],
        [
            [
                s["name"],
                s.get("kind", "local"),
                s["backend"],
                s.get("reach", "direct"),
                s.get("status", "local"),
                since(s),
                show.when(s.get("last_heartbeat")),
                s.get("agent_version") or "",
                str(s["instances"]),
                capacity_text(s.get("capacity") or {}),
            ]
            for s in rows
        ],
        "no sites",
    )


site_app.command("ls", help="The same as `labgate site list`.")(site_list)


@site_app.command("show")
def site_show(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The site."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show one site: status, agent, capacity and use, labels, options."""
    with state_of(ctx).client() as client:
        site = client.get(_path(name))
    if as_json:
        show.print_json(site)
        return
    use = site.get("use") or {}
    view: dict[str, Any] = {
        "name": site["name"],
        "kind": site["kind"],
        "backend": site["backend"],
        "reach": site["reach"],
        "status": site["status"],
        "live": "yes" if site["live"] else "no",
        "connected since": show.when(site.get("connected_since")),
        "disconnected since": show.when(site.get("disconnected_since")),
        "last heartbeat": show.when(site.get("last_heartbeat")),
        "agent version": site.get("agent_version") or "",
        "token issued": show.when(site.get("token_issued_at")),
        "instances": str(site["instances"]),
        "capacity": capacity_text(site.get("capacity") or {}),
        "in use": capacity_text({**use, "max_instances": use.get("instances")}),
        "start queue": start_queue_text(site.get("start_capacity")),
        "labels": " ".join(f"{k}={v}" for k, v in (site.get("labels") or {}).items()),
        "data root": site.get("data_root") or "",
        "group root": site.get("group_root") or "",
    }
    for key, value in sorted((site.get("options") or {}).items()):
        view[f"option {key}"] = json.dumps(value) if not isinstance(value, str) else value
    for key, value in sorted((site.get("agent") or {}).items()):
        view[f"agent {key}"] = value if isinstance(value, str) else json.dumps(value)
    show.mapping(view, key="FIELD")


@site_app.command("add")
def site_add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Site name: lower case, starts with a letter."),
    backend: str = typer.Option(
        ..., "--backend", help="Its backend: process, containers or another installed one."
    ),
    reach: str = typer.Option(
        "tunnel",
        "--reach",
        help="tunnel: the router reaches instances through the agent; direct: at their address.",
    ),
    option: list[str] = typer.Option(
        [], "--option", metavar="KEY=VALUE", help="A backend option (repeatable); JSON values."
    ),
    cpu: float = typer.Option(0, "--cpu", min=0, help="CPU cores in all (0: no limit)."),
    memory: str | None = typer.Option(
        None, "--memory", help="Memory in all, e.g. 64G (default: no limit)."
    ),
    max_instances: int = typer.Option(
        0, "--max-instances", min=0, help="Instances at once (0: no limit)."
    ),
    label: list[str] = typer.Option(
        [], "--label", metavar="KEY=VALUE", help="A label placement can ask for (repeatable)."
    ),
    data_root: str | None = typer.Option(
        None, "--data-root", metavar="PATH", help="Where its datasets live, on the site's machine."
    ),
    group_root: str | None = typer.Option(
        None,
        "--group-root",
        metavar="PATH",
        help="Where its shared group volumes live, on the site's machine (<PATH>/<group>).",
    ),
    start_cores: float | None = typer.Option(
        None,
        "--start-cores",
        min=0,
        help="Cores for starting tools at once (default: the site's cores; 0: no start queue).",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Add a network site (admins); prints its agent's token once, and how to start the agent."""
    if reach not in ("tunnel", "direct"):
        raise typer.BadParameter("expected tunnel or direct", param_hint="--reach")
    body: dict[str, Any] = {
        "name": name,
        "backend": backend,
        "reach": reach,
        "options": pairs(option, "--option", typed=True),
        "capacity": {
            "cpu": cpu,
            "memory": memory or 0,
            "max_instances": max_instances,
            "starts": start_cores,
        },
        "labels": pairs(label, "--label"),
    }
    if data_root is not None:
        body["data_root"] = data_root
    if group_root is not None:
        body["group_root"] = group_root
    with state_of(ctx).client() as client:
        created = client.post("/sites", body)
        portal_url = client.url
    if as_json:
        show.print_json(created)
    else:
        print_token(created, portal_url, "added")


def start_figure(text: str) -> float | None:
    """``--start-cores``: a number of cores (0 or more), or None for ``default``."""
    if text.strip().lower() == "default":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise typer.BadParameter(
            "expected a number of cores or 'default'", param_hint="--start-cores"
        )
    return value


@site_app.command("set")
def site_set(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The network site."),
    reach: str | None = typer.Option(
        None,
        "--reach",
        help="tunnel or direct: takes effect at once (its agent reconnects, its tools run on).",
    ),
    option: list[str] = typer.Option(
        [],
        "--option",
        metavar="KEY=VALUE",
        help="A backend option (repeatable; JSON values): they replace all its options.",
    ),
    cpu: float | None = typer.Option(None, "--cpu", min=0, help="CPU cores in all (0: no limit)."),
    memory: str | None = typer.Option(
        None, "--memory", help="Memory in all, e.g. 64G (0: no limit)."
    ),
    max_instances: int | None = typer.Option(
        None, "--max-instances", min=0, help="Instances at once (0: no limit)."
    ),
    start_cores: str | None = typer.Option(
        None,
        "--start-cores",
        metavar="N|default",
        help="Cores for starting tools at once (0: no start queue; default: the site's cores).",
    ),
    label: list[str] = typer.Option(
        [],
        "--label",
        metavar="KEY=VALUE",
        help="A label (repeatable): they replace all its labels.",
    ),
    group_root: str | None = typer.Option(
        None,
        "--group-root",
        metavar="PATH",
        help='Where its shared group volumes live, on the site\'s machine ("": none).',
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Change a network site (admins): only what is given changes."""
    if reach is not None and reach not in ("tunnel", "direct"):
        raise typer.BadParameter("expected tunnel or direct", param_hint="--reach")
    body: dict[str, Any] = {}
    if reach is not None:
        body["reach"] = reach
    if option:
        body["options"] = pairs(option, "--option", typed=True)
    capacity: dict[str, Any] = {
        key: value
        for key, value in (("cpu", cpu), ("memory", memory), ("max_instances", max_instances))
        if value is not None
    }
    if start_cores is not None:
        capacity["starts"] = start_figure(start_cores)
    if capacity:
        body["capacity"] = capacity
    if label:
        body["labels"] = pairs(label, "--label")
    if group_root is not None:
        body["group_root"] = group_root
    if not body:
        raise typer.BadParameter("give at least one thing to change (see --help)")
    with state_of(ctx).client() as client:
        changed = client.patch(_path(name), body)
    if as_json:
        show.print_json(changed)
        return
    show.line(
        f"site {changed['name']!r}: {changed['reach']}, "
        f"capacity {capacity_text(changed.get('capacity') or {})}, "
        f"start queue {start_queue_text(changed.get('start_capacity'))}"
    )


@site_app.command("token")
def site_token(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The network site."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Give a network site a new token (admins); the old one stops working at once."""
    with state_of(ctx).client() as client:
        rotated = client.post(_path(name, "token"))
        portal_url = client.url
    if as_json:
        show.print_json(rotated)
    else:
        print_token(rotated, portal_url, "new token for")


@site_app.command("revoke")
def site_revoke(
    ctx: typer.Context, name: str = typer.Argument(..., help="The network site.")
) -> None:
    """Revoke a network site's token (admins): its agent is cut off until `site token`."""
    with state_of(ctx).client() as client:
        client.delete(_path(name, "token"))
    typer.echo(f"token of site {name!r} revoked; its agent is cut off")


@site_app.command("rm")
def site_rm(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The network site."),
    force: bool = typer.Option(
        False, "--force", help="Also give up snapshots stored there (they are marked failed)."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Remove a network site (admins); refused while instances are active on it."""
    if not yes:
        typer.confirm(f"Remove site {name!r} and cut off its agent?", abort=True)
    with state_of(ctx).client() as client:
        client.request("DELETE", _path(name), params={"force": "true"} if force else None)
    typer.echo(f"site {name!r} removed")
