"""Operations commands of the CLI: ``doctor``, ``config``, ``tool`` and ``pool``.

Everything but ``doctor`` and ``config`` goes through the REST API (``/tools``,
``/pools``). ``doctor`` and ``config show`` run on the server's machine with its
settings. ``site`` is in :mod:`labgate.cli.sites`.
"""

from __future__ import annotations

import typer

from labgate.cli import output as show
from labgate.cli.context import JSON_OPTION, state_of
from labgate.cli.output import plain_table as _table
from labgate.errors import ConfigError

# Their help: labgate.cli.RootGroup.
config_app = typer.Typer(no_args_is_help=True)
tool_app = typer.Typer(no_args_is_help=True)
pool_app = typer.Typer(no_args_is_help=True)


@config_app.command("show")
def config_show(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Print the effective settings, secrets masked."""
    view = state_of(ctx).settings().public_view()
    if as_json:
        show.print_json(view)
    else:
        show.mapping(view)


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
    from labgate.startup import load_settings

    try:
        findings = run_checks(load_settings())
    except ConfigError as exc:
        findings = [
            Finding("fail", "settings", problem, "fix the settings") for problem in exc.problems
        ]
    if as_json:
        show.print_json([f.as_json() for f in findings])
    else:
        marks = {"ok": "ok  ", "info": "info", "warn": "WARN", "fail": "FAIL"}
        for finding in findings:
            typer.echo(f"{marks[finding.level]}  {finding.subject}: {finding.detail}")
            if finding.fix:
                typer.echo(f"      fix: {finding.fix}")
    failed = sum(f.level == "fail" for f in findings)
    if failed:
        show.note(f"{failed} problem(s) to fix")
        raise typer.Exit(1)
