"""Operations commands of the CLI: doctor, backup, restore, config, tool and pool.

Everything but ``doctor``, ``backup``, ``restore`` and ``config`` goes through
the REST API (``/tools``, ``/pools``). Those four run on the server's machine
with its settings. ``site`` is in :mod:`labgate.cli.sites`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import typer

from labgate.cli import output as show
from labgate.cli.context import JSON_OPTION, fail, fail_config, state_of
from labgate.cli.output import plain_table as _table
from labgate.cli.output import visible
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


# --- backup and restore --------------------------------------------------------------


def backup(
    directory: Path = typer.Argument(
        ...,
        metavar="DIR",
        help="Where to write the backup: a new or empty directory (with --keep: their parent).",
    ),
    keep: int | None = typer.Option(
        None,
        "--keep",
        metavar="N",
        min=1,
        help="Write into DIR/labgate-<UTC time> and delete all but the newest N such backups.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print what was saved as JSON."),
) -> None:
    """Save the portal's database and secret key in DIR, while labgate runs."""
    from labgate.backup import KEY_KEPT, KEY_NONE, KEY_SETTING, backup_rotating
    from labgate.backup import backup as save
    from labgate.startup import load_settings

    pruned: list[Path] = []
    with _one_line_errors("back up"):
        if keep is None:
            report = save(load_settings(), directory)
        else:
            report, pruned = backup_rotating(load_settings(), directory, keep)
    if as_json:
        show.print_json(
            {
                "path": str(report.path),
                "database": report.database,
                "size": report.size,
                "revisions": report.revisions,
                "secret_key": report.secret_key,
                "left_out": report.left_out,
                "deleted": [str(path) for path in pruned],
            }
        )
        return
    key = {
        KEY_KEPT: "the secret key file",
        KEY_SETTING: "not the secret key (a setting)",
        KEY_NONE: "no secret key (none yet)",
    }[report.secret_key]
    typer.echo(
        f"saved in {report.path}: the {report.database} database "
        f"({report.size / 2**20:.1f} MiB, schema {_schema(report.revisions)}) "
        f"and {key}"
    )
    for path in pruned:
        typer.echo(f"deleted the older backup {path}")
    typer.echo("not in this backup (keep them with your own backups):")
    for item in report.left_out:
        typer.echo(f"  - {item}")


def restore(
    directory: Path = typer.Argument(
        ..., metavar="DIR", help="A backup written by `labgate backup`."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace a database or key already in place (saved first in the data dir).",
    ),
    check: bool = typer.Option(
        False, "--check", help="Only check the backup is complete and readable; change nothing."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print what was restored as JSON."),
) -> None:
    """Put a backup's database and secret key in place; labgate must be stopped."""
    from labgate.backup import KEY_SETTING, check_backup
    from labgate.backup import restore as put_back
    from labgate.startup import load_settings

    if check:
        with _one_line_errors("check the backup"):
            manifest = check_backup(directory)
        if as_json:
            show.print_json(manifest)
            return
        database = manifest["database"]
        typer.echo(
            f"the backup in {directory} is complete and readable: a {database['kind']} "
            f"database (schema {_schema(database['revisions'])}), secret key: "
            f"{manifest['secret_key']}; made by labgate {visible(str(manifest.get('labgate')))} "
            f"at {visible(str(manifest.get('created')))}"
        )
        return
    with _one_line_errors("restore"):
        report = put_back(load_settings(), directory, force=force)
    if as_json:
        show.print_json(
            {
                "source": str(report.source),
                "database": report.database,
                "revisions": report.revisions,
                "users": report.users,
                "secret_key": report.secret_key,
                "saved": str(report.saved) if report.saved else None,
                "left_out": report.left_out,
            }
        )
        return
    typer.echo(
        f"restored the {report.database} database of {report.source}: {report.users} "
        f"user(s), schema {_schema(report.revisions)}"
    )
    if report.saved is not None:
        typer.echo(f"what it replaced is saved in {report.saved}")
    if report.secret_key == KEY_SETTING:
        typer.echo("the backup's secret key was a setting: set secret_key to that key")
    if report.left_out:
        typer.echo("the backup left out (restore them from your own backups):")
        for item in report.left_out:  # from the backup's manifest: shown, not sent
            typer.echo(f"  - {visible(item)}")


@contextlib.contextmanager
def _one_line_errors(doing: str) -> Iterator[None]:
    """A backup's or restore's failure as one ``error:`` line (exit 1), never a traceback."""
    from labgate.backup import BackupError

    try:
        yield
    except ConfigError as exc:
        fail_config(exc)
    except BackupError as exc:
        fail(str(exc))
    except OSError as exc:  # a file labgate may not read or write here
        fail(f"cannot {doing}: {exc}")


def _schema(revisions: list[str]) -> str:
    """The newest of a database's schema revisions, as the backup commands show it."""
    return f"up to {max(revisions)}" if revisions else "none"
