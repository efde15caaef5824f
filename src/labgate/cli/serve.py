"""Server-side commands of the CLI: ``serve``, ``portal``, ``router`` and ``version``.

``serve``, ``portal`` and ``router`` run on the server's machine with its
settings; they are the only commands that do not talk to a server through the
REST API.
"""

from __future__ import annotations

from pathlib import Path

import typer

from labgate import __version__
from labgate.cli.context import fail
from labgate.gcpause import pause as pause_gc


def serve(
    host: str | None = typer.Option(None, help="Address to listen on (setting `host`)."),
    port: int | None = typer.Option(None, help="Port to listen on (setting `port`)."),
    data_dir: Path | None = typer.Option(
        None, help="Directory for the database, logs and workspaces (setting `data_dir`)."
    ),
) -> None:
    """Run labgate: router, portal and the sites in one process."""
    pause_gc()  # until it listens: labgate.gcpause
    from labgate.datadir import UnsafeSetup
    from labgate.startup import load_settings

    settings = load_settings(host=host, port=port, data_dir=data_dir)
    from labgate.serve import run

    try:
        run(settings)
    except UnsafeSetup as exc:
        fail(f"refusing to start: {exc}")


def portal(
    host: str | None = typer.Option(None, help="Address to listen on (setting `host`)."),
    port: int | None = typer.Option(None, help="Port to listen on (setting `port`)."),
    data_dir: Path | None = typer.Option(
        None, help="Directory for logs and the secret key (setting `data_dir`)."
    ),
) -> None:
    """Run one portal replica (API, UI, agents' hub) on PostgreSQL; routers and agents apart."""
    pause_gc()  # until it listens: labgate.gcpause
    from labgate.datadir import UnsafeSetup
    from labgate.errors import ConfigError
    from labgate.startup import load_settings

    settings = load_settings(host=host, port=port, data_dir=data_dir)
    from labgate.portal.app import refuse_unreplicable

    try:
        refuse_unreplicable(settings)
    except ConfigError as exc:
        fail(str(exc), code=2)
    from labgate.serve import run_portal

    try:
        run_portal(settings)
    except UnsafeSetup as exc:
        fail(f"refusing to start: {exc}")


def router(
    portal: list[str] = typer.Option(
        ...,
        envvar="LABGATE_ROUTER_PORTALS",
        help=(
            "Where the portal is: http://HOST:PORT or unix:/path (stream, activity, upstream). "
            "Repeat it for portal replicas: the router uses one and moves to the next when it "
            "fails. From the environment: LABGATE_ROUTER_PORTALS, separated by spaces."
        ),
    ),
    host: str | None = typer.Option(None, help="Address to listen on (setting `host`)."),
    port: int | None = typer.Option(None, help="Port to listen on (setting `port`)."),
) -> None:
    """Run a router alone, following the portal's route stream (needs the same secret_key)."""
    pause_gc()  # until it listens: labgate.gcpause
    from labgate.datadir import UnsafeSetup
    from labgate.startup import load_settings

    settings = load_settings(host=host, port=port)
    if not settings.secret_key.get_secret_value():
        fail("`labgate router` needs the portal's secret_key (set LABGATE_SECRET_KEY)")
    from labgate.serve import run_router
    from labgate.wire.routes import parse_upstream

    for url in portal:
        try:
            parse_upstream(url)
        except ValueError as exc:
            fail(f"invalid --portal: {exc}", code=2)
    try:
        run_router(settings, portal)
    except UnsafeSetup as exc:
        fail(f"refusing to start: {exc}")


def version() -> None:
    """Print labgate's version."""
    typer.echo(f"labgate {__version__}")
