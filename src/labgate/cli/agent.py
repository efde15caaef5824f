"""``labgate agent``: run a network site's agent on the site's machine."""

from __future__ import annotations

from pathlib import Path

import typer

from labgate.cli.context import fail


def agent(
    portal: str | None = typer.Option(
        None,
        help="The portal's public address, e.g. https://gateway.example (setting `agent_portal`).",
    ),
    token: str | None = typer.Option(
        None,
        help="The site's token from `labgate site add` (setting `agent_token`; prefer the "
        "environment: LABGATE_AGENT_TOKEN, so it is not in the process list).",
    ),
    data_dir: Path | None = typer.Option(
        None, help="This site's workspaces, logs and snapshots (setting `data_dir`)."
    ),
) -> None:
    """Run a network site's agent: dial out to the portal and run its instances here."""
    import logging

    from labgate.datadir import UnsafeSetup
    from labgate.startup import load_settings

    settings = load_settings(agent_portal=portal, agent_token=token, data_dir=data_dir)
    from labgate.agent.daemon import TokenRefused, run_agent

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        run_agent(settings)
    except UnsafeSetup as exc:
        fail(f"refusing to start: {exc}")
    except TokenRefused as exc:
        fail(str(exc), code=2)
