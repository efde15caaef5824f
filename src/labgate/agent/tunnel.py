"""Placeholder until the tunnel lands (replaced by the tunnel branch)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path


class PortalTunnel:
    """Placeholder."""

    def attach(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        """Placeholder."""

    def detach(self, reason: str) -> None:
        """Placeholder."""

    async def feed(self, frame: bytes) -> None:
        """Placeholder."""

    async def serve(self, instance_id: str, path: Path) -> None:
        """Placeholder."""

    async def unserve(self, instance_id: str) -> None:
        """Placeholder."""

    async def close(self, reason: str) -> None:
        """Placeholder."""


class AgentTunnel:
    """Placeholder."""

    def __init__(self, resolve: Callable[[str], str | None]) -> None:
        self.resolve = resolve

    def attach(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        """Placeholder."""

    def detach(self, reason: str) -> None:
        """Placeholder."""

    async def feed(self, frame: bytes) -> None:
        """Placeholder."""
