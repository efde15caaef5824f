"""``labgate image build``: build a tool's image on a site's engine (see docs/cli.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from labgate.cli.context import fail, fail_config
from labgate.errors import ConfigError

image_app = typer.Typer()  # help: labgate.cli.RootGroup


@image_app.command("build")
def build(
    tool: str = typer.Argument(..., help="The tool whose image to build."),
    site: str = typer.Option(
        "", "--site", help="The containers site whose engine builds it; default: the first."
    ),
    build_arg: list[str] = typer.Option(
        [], "--build-arg", help="KEY=VALUE for the Containerfile's ARG (repeatable)."
    ),
    tag: str = typer.Option("", "--tag", help="Tag the image so instead of the tool's image."),
    ca_file: Path | None = typer.Option(
        None,
        "--ca-file",
        exists=True,
        dir_okay=False,
        help="CA certificates the build trusts too (a TLS-intercepting proxy).",
    ),
) -> None:
    """Build TOOL's image from the Containerfile it ships, on a site's engine, with progress."""
    from labgate.backends.container_build import build_image
    from labgate.backends.containers import ContainerBackend
    from labgate.backends.registry import load_catalog
    from labgate.errors import LabgateError
    from labgate.startup import load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:
        fail_config(exc)
    found = load_catalog(settings.tools_dir).get(tool)
    if found is None:
        fail(f"no tool called {tool!r}")
    sites = [s for s in settings.effective_sites if s.backend == "containers"]
    chosen = next((s for s in sites if s.name == site), None) if site else next(iter(sites), None)
    if chosen is None:
        known = ", ".join(s.name for s in sites) or "none"
        fail(f"no containers site {site!r} in these settings (containers sites: {known})")
    args: dict[str, str] = {}
    for item in build_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--build-arg takes KEY=VALUE, not {item!r}")
        args[key] = value
    backend = ContainerBackend(settings, chosen.options)
    backend.attach(chosen.name)
    try:
        image = build_image(backend, found, args, typer.echo, tag=tag, ca_file=ca_file)
    except LabgateError as exc:
        fail(exc.detail)
    except Exception as exc:  # the engine cannot be reached
        fail(f"site {chosen.name}: the engine at {backend.engine_address}: {exc}")
    finally:
        import asyncio

        asyncio.run(backend.close())
    typer.echo(f"built {image} on site {chosen.name}")
