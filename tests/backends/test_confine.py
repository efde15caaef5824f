"""Replica paths on the site: opened below the data root, links refused, what was opened bound.

Real symbolic links in a temporary data root; the sandbox tests run the real
``bwrap`` (skipped without it, failing in CI), the containers test real Podman
(tests/podman.py).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

import podman
from datasets_fixtures import require_bwrap
from labgate.backends import confine
from labgate.backends.base import Mount
from labgate.backends.containers import ContainerBackend
from labgate.backends.sandbox import SandboxError, bwrap_argv, close_fds, find_bwrap
from labgate.config import Settings
from labgate.errors import InstanceStartError
from podman import Engine

engine = podman.engine
deployment = podman.deployment


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A data root with one real replica, ``real``, and a secret outside it."""
    data = tmp_path / "data"
    (data / "real").mkdir(parents=True)
    (data / "real" / "file.txt").write_text("the replica\n")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "file.txt").write_text("SECRET\n")
    (data / "escape").symlink_to(secret)
    (data / "etc").symlink_to("../../../../../../../../../etc")
    (data / "loop").symlink_to("real")
    return data


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest) -> str:
    """Both ways of opening: openat2 and the component walk of older kernels."""
    saved = confine._openat2_usable[0]
    confine._openat2_usable[0] = request.param == "openat2"
    yield request.param
    confine._openat2_usable[0] = saved


@pytest.mark.parametrize("path", ["escape", "escape/file.txt", "etc/passwd", "loop", "loop/."])
def test_links_are_refused_even_inside_the_root(root: Path, resolver: str, path: str) -> None:
    with pytest.raises(confine.EscapesRoot) as refused:
        confine.check_beneath(root, path)
    reason = str(refused.value)
    assert "symbolic link" in reason or "relative path inside" in reason


def test_missing_paths_are_refused_and_real_ones_open(root: Path, resolver: str) -> None:
    with pytest.raises(confine.EscapesRoot, match="does not exist"):
        confine.check_beneath(root, "nowhere")
    with pytest.raises(confine.EscapesRoot, match="does not exist"):
        confine.check_beneath(root, "real/file.txt/below")
    confine.check_beneath(root, "real")
    confine.check_beneath(root, "real/file.txt")
    # The root itself may be reached through a link (the operator's setting).
    (root.parent / "root-link").symlink_to(root)
    confine.check_beneath(root.parent / "root-link", "real")


def test_a_mount_whose_source_became_a_link_is_refused_by_the_sandbox(root: Path) -> None:
    require_bwrap()
    bwrap = find_bwrap()
    assert bwrap is not None
    for source in ("escape", "etc"):
        mount = Mount(root / source, "/data/x", root=root)
        with pytest.raises(SandboxError, match="symbolic link"):
            bwrap_argv(bwrap, workspace=root / "real", mounts=[mount])


def test_the_sandbox_binds_what_was_checked_not_a_link_swapped_in_later(
    root: Path, tmp_path: Path
) -> None:
    require_bwrap()
    bwrap = find_bwrap()
    assert bwrap is not None
    workspace = tmp_path / "ws"
    workspace.mkdir()
    mount = Mount(root / "real", "/data/x", root=root)
    plan = bwrap_argv(bwrap, workspace=workspace, mounts=[mount])
    try:
        assert len(plan.fds) == 1
        # The race: after the check, the replica becomes a link to the secret.
        (root / "real").rename(root / "real.old")
        (root / "real").symlink_to(root.parent / "secret")
        script = "cat /data/x/file.txt; ls /proc/self/fd | wc -l"
        ran = subprocess.run(
            [*plan.argv, "/bin/sh", "-c", script],
            pass_fds=plan.fds,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        close_fds(plan.fds)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0] == "the replica" and "SECRET" not in ran.stdout
    # Only stdin, stdout, stderr and ls's own: the descriptor of the host directory is gone.
    assert int(lines[1]) <= 4, ran.stdout


async def test_the_containers_backend_refuses_a_link_before_creating_anything(
    root: Path, tmp_path: Path, engine: Engine, deployment: str
) -> None:
    from test_containers import demo_spec

    settings = Settings(data_dir=tmp_path / "var")
    backend = ContainerBackend(settings, {"base_url": engine.base_url, "deployment": deployment})
    try:
        for source in ("escape", "etc"):
            mount = Mount(root / source, "/data/x", root=root)
            spec = dataclasses.replace(demo_spec(tmp_path), mounts=(mount,))
            with pytest.raises(InstanceStartError, match="symbolic link"):
                await backend.start(spec)
        assert engine.containers_of(deployment) == []
    finally:
        await backend.close()
    assert not os.path.islink(root / "real")
