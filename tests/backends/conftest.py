"""Fixtures for backend tests: settings per sandbox mode, launches that clean up after themselves.

Instances are real processes. Every test that starts one does it through the
``launch`` fixture, which stops whatever is left when the test ends (pass or
fail), so no process outlives its test. Sandbox tests skip when bubblewrap is
missing, except in CI (``CI=true``) where they fail.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from labgate.backends.base import JSON, LaunchSpec, Mount, Resources, Started
from labgate.backends.process import ProcessBackend
from labgate.config import Settings
from labgate.tools.catalog import Catalog, Tool

Launch = Callable[..., Awaitable[tuple[Started, LaunchSpec]]]


def require_bwrap() -> None:
    """Skip when bubblewrap is missing; in CI (CI=true) that is a failure instead."""
    if shutil.which("bwrap") is not None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("bubblewrap is required in CI: apt-get install bubblewrap")
    pytest.skip("bubblewrap not installed: apt-get install bubblewrap")


@pytest.fixture(params=["none", "bwrap"])
def sandbox(request: pytest.FixtureRequest) -> str:
    """Run the test unsandboxed and under bubblewrap (override with indirect parametrize)."""
    mode: str = request.param
    if mode == "bwrap":
        require_bwrap()
    return mode


@pytest.fixture
def settings(tmp_path: Path, sandbox: str) -> Settings:
    """Settings with a private data dir, in the sandbox mode of the test."""
    return Settings(data_dir=tmp_path / "data", sandbox=sandbox)


@pytest.fixture
def backend(settings: Settings) -> ProcessBackend:
    """A process backend on the test's settings."""
    return ProcessBackend(settings)


@pytest.fixture
def demo() -> Tool:
    """The real demo tool from the built-in catalog."""
    tool = Catalog.load().get("demo")
    assert tool is not None
    return tool


@pytest.fixture
async def launch(settings: Settings, backend: ProcessBackend) -> AsyncIterator[Launch]:
    """Start instances; every one of them is stopped when the test ends."""
    started: list[JSON] = []

    async def start(
        tool: Tool,
        *,
        owner: str = "alice",
        env: dict[str, str] | None = None,
        resources: Resources | None = None,
        mounts: tuple[Mount, ...] = (),
        using: ProcessBackend | None = None,
    ) -> tuple[Started, LaunchSpec]:
        instance_id = f"t{uuid.uuid4().hex[:12]}"
        spec = LaunchSpec(
            instance_id=instance_id,
            owner=owner,
            tool=tool,
            base_url=f"/i/{instance_id}/",
            workspace=settings.workspaces_dir / owner,
            resources=resources or tool.resources.default(),
            secret=uuid.uuid4().hex,
            env=env or {},
            mounts=mounts,
        )
        result = await (using or backend).start(spec)
        started.append(result.state)
        return result, spec

    yield start
    cleaner = ProcessBackend(settings)
    for state in started:
        await cleaner.stop(state, 0)
        await backend.poll(state)  # reap our children
