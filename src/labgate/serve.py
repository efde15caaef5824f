"""``labgate serve``: everything in one process.

The portal (FastAPI under uvicorn) and the local site run on one event loop
(uvloop when installed). Stopping serve leaves instances running; the next
start re-attaches to them.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from labgate.config import Settings
from labgate.portal.app import create_app

log = logging.getLogger(__name__)


def configure_logging(level: int = logging.INFO) -> None:
    """Plain, timestamped log lines on stderr."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


async def serve(settings: Settings) -> None:
    """Run the portal on the public address until SIGINT or SIGTERM."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        lifespan="on",
        ws="websockets-sansio",
    )
    server = uvicorn.Server(config)
    log.info("labgate serving on %s", settings.effective_public_url)
    await server.serve()


def run(settings: Settings) -> None:
    """Entry point of ``labgate serve``."""
    configure_logging()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
