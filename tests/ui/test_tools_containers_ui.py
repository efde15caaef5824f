"""The built-in tools' images on a containers site (real Podman), used through the router.

Each of ``vscode``, ``desktop``, ``streamlit`` and ``shiny`` runs from the
image its recipe builds (``<tool>.build/Containerfile``), launched through
the API on a site whose engine never pulls, and does in Chromium the same
real thing as on the process backend (``tests/ui/tool_steps.py``): the
launch form's parameters reach it, its workspace is the user's volume, it
runs as uid 1000, is served under ``/i/<instance>/``, and its published port
refuses requests without the instance token.

The images come from ``scripts/build-tool-images.sh`` (minutes the first
time, cached by a hash of each recipe after that). Outside CI a test whose
image is missing or older than its recipe is skipped with that command;
with ``CI=true`` it builds the image (``.ci/run`` has built them already).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import podman
from labgate.backends.containers import ContainerBackend
from labgate.config import Settings
from podman import Engine
from servers import LabgateServer
from ui.support import ADMIN_PASSWORD, Gateway, open_gateway, stop_all_instances, stop_instance
from ui.tool_steps import USES, use_tool

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
engine = podman.engine

BUILD = podman.ROOT / "scripts" / "build-tool-images.sh"
SITE = "pods"


def tool_image(tool: str) -> None:
    """Skip (build, in CI) unless ``tool``'s image is built from its current recipe."""
    env = {**os.environ, **podman.ENGINE_ENV}
    check = subprocess.run(
        [str(BUILD), "--check", tool], env=env, capture_output=True, text=True, check=False
    )
    if check.returncode == 0:
        return
    if not podman.IN_CI:
        pytest.skip(
            f"the {tool} image is missing or older than its recipe: run "
            f"scripts/build-tool-images.sh {tool} (minutes; needs Debian's mirror, PyPI, npm)"
        )
    built = subprocess.run(
        [str(BUILD), tool], env=env, capture_output=True, text=True, timeout=1800, check=False
    )
    if built.returncode != 0:
        pytest.fail(f"scripts/build-tool-images.sh {tool} failed:\n{built.stderr[-3000:]}")


@pytest.fixture(scope="module")
def containers_server(
    engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LabgateServer, str]]:
    """``labgate serve`` whose one site is a containers site on the run's engine."""
    deployment = f"{podman.RUN}-tools"
    site = engine.site(SITE, deployment=deployment, pull="never")
    base = tmp_path_factory.mktemp("tools-containers")
    server = LabgateServer(base / "var", ADMIN_PASSWORD, LABGATE_SITES=json.dumps([site]))
    server.start()
    try:
        yield server, deployment
    finally:
        with contextlib.suppress(Exception):
            stop_all_instances(server)
        server.stop()
        engine.clean(deployment)


@pytest.fixture
def gateway(
    playwright_browser: Any, containers_server: tuple[LabgateServer, str]
) -> Iterator[Gateway]:
    """The containers site's labgate and the module's browser."""
    with open_gateway(containers_server[0], playwright_browser) as gw:
        yield gw


def workspace_volume(engine: Engine, deployment: str, server: LabgateServer, user: str) -> Path:
    """The user's workspace volume, made as the site makes it (its id range); its directory.

    Made before the launch so the app file the launch form names is there.
    """
    backend = ContainerBackend(
        Settings(data_dir=server.data_dir), {"base_url": engine.base_url, "deployment": deployment}
    )
    try:
        volume, _ = backend.ensure_volume(user, "1000:1000")
    finally:
        backend.client.close()  # its async close() wants an event loop of its own
    return Path(engine.client.api.inspect_volume(volume)["Mountpoint"])


@pytest.mark.parametrize("tool", list(USES))
def test_each_tools_image_does_one_real_thing_through_the_router(
    gateway: Gateway,
    engine: Engine,
    containers_server: tuple[LabgateServer, str],
    tool: str,
) -> None:
    tool_image(tool)
    server, deployment = containers_server
    name = gateway.create_user(tool[:4])
    folder = workspace_volume(engine, deployment, server, name)
    instance_id = use_tool(gateway, name, USES[tool], lambda: folder, f"tool-{tool}-container")
    # It ran in a container of the site, as the image's uid 1000, not on the host.
    found = engine.client.api.containers(
        filters={"label": [f"labgate.deployment={deployment}", f"labgate.instance={instance_id}"]}
    )
    assert len(found) == 1, found
    inspected = engine.client.api.inspect_container(found[0]["Id"])
    assert inspected["Config"]["User"] == "1000:1000"
    # Its port, published on the host's loopback, answers only requests with the instance
    # token (the router's): Shiny and Streamlit too, behind the token gate.
    published = inspected["NetworkSettings"]["Ports"]["8888/tcp"][0]["HostPort"]
    assert httpx.get(f"http://127.0.0.1:{published}/", timeout=10).status_code == 403
    stop_instance(gateway, name, instance_id)
