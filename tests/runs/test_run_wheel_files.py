"""A task's wheel files on its site are read with its owner's rights, into a venv of theirs.

The site's pip runs as the agent (root here): a wheel file it read itself
could be any ``.whl`` on the machine, another user's private package, and a
venv keyed by the list alone would hand what one owner could read to the
next owner who named the same path.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
from runs_helpers import make_wheel, submit, tasks_of, wait_run
from sqlalchemy import select

from labgate.agent.taskenv import EnvironmentCache, env_key
from labgate.backends.container_tasks import env_tag
from labgate.backends.wheels import NOBODY_READER, Reader, read_wheels, wheel_file
from labgate.db.models import User
from labgate.errors import BadRequest

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root reads as another uid")
needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="needs bubblewrap (apt-get install bubblewrap)"
)


async def _user_id(app: Any, name: str) -> int:
    def find(session: Any) -> int:
        return int(session.scalar(select(User.id).where(User.name == name)))

    return int(await app.state.portal.run_db(find))


def _definition(wheel: Path, name: str) -> str:
    return f"""
name = "{name}"
[[stages]]
name = "one"
[[stages.tasks]]
name = "use"
command = ["python", "-c", "import labgate_private_pkg as p, sys; print(p.SECRET, sys.prefix)"]
environment = {{python = ["{wheel}"]}}
where = {{site = "alpha"}}
"""


def test_what_names_a_wheel_file_on_the_site():
    assert wheel_file("/opt/w/x-1.0-py3-none-any.whl") == "/opt/w/x-1.0-py3-none-any.whl"
    assert wheel_file("x @ file:///opt/my%20w/x-1.0-py3-none-any.whl") == (
        "/opt/my w/x-1.0-py3-none-any.whl"
    )
    assert wheel_file("file:///opt/w/x-1.0-py3-none-any.whl") == "/opt/w/x-1.0-py3-none-any.whl"
    assert wheel_file("x @ https://example.org/x-1.0-py3-none-any.whl") is None
    assert wheel_file("numpy>=1.26") is None
    assert wheel_file("  ") is None


@as_root
def test_a_wheel_file_is_read_as_its_reader_and_bounded_in_time(tmp_path, shelf, monkeypatch):
    secret = tmp_path / "private-1.0-py3-none-any.whl"
    secret.write_bytes(b"PK-root-only")
    secret.chmod(0o600)
    into = tmp_path / "into"
    into.mkdir()
    with pytest.raises(BadRequest) as refused:
        read_wheels([str(secret)], NOBODY_READER, into)
    assert "Permission denied" in refused.value.detail
    assert not any(p.is_file() and p.read_bytes() for p in into.rglob("*"))
    # Relative names name nothing on the site.
    with pytest.raises(BadRequest, match="not an absolute path"):
        read_wheels(["x-1.0-py3-none-any.whl"], None, into)
    # One it may read is copied under its own name.
    public = shelf / "public-1.0-py3-none-any.whl"
    public.write_bytes(b"PK-public")
    public.chmod(0o644)
    (tmp_path / "again").mkdir()
    copied = read_wheels(["numpy", f"file://{public}"], NOBODY_READER, tmp_path / "again")
    assert copied[0] == "numpy"
    assert Path(copied[1]).name == public.name and Path(copied[1]).read_bytes() == b"PK-public"
    # A FIFO named like a wheel never ends: reading it is given up.
    fifo = shelf / "fifo-1.0-py3-none-any.whl"
    os.mkfifo(fifo, 0o666)
    monkeypatch.setattr("labgate.backends.wheels.WHEEL_READ_TIMEOUT", 1.0)
    (tmp_path / "third").mkdir()
    with pytest.raises(BadRequest, match="not read within"):
        read_wheels([str(fifo)], NOBODY_READER, tmp_path / "third")


def test_a_list_with_a_wheel_file_is_prepared_per_reader():
    alice, bob = Reader(2001, 2001), Reader(2002, 2002)
    files = ["/opt/w/x-1.0-py3-none-any.whl", "numpy"]
    assert env_key(files, alice) != env_key(files, bob)
    assert env_tag("python:3.11", files, alice) != env_tag("python:3.11", files, bob)
    # Without one, every owner shares the list's venv and image.
    names = ["numpy>=1.26", "x @ https://example.org/x-1.0-py3-none-any.whl"]
    assert env_key(names, alice) == env_key(names, bob) == env_key(names)
    assert env_tag("python:3.11", names, alice) == env_tag("python:3.11", names)


@as_root
async def test_the_venv_of_a_wheel_file_is_its_readers_alone(tmp_path, shelf):
    wheel = make_wheel(shelf, "labgate_private_pkg", "SECRET = 'private'\n")
    cache = EnvironmentCache(tmp_path / "envs")
    reader = Reader(2_000_101, 2_000_101)
    target = await cache.prepare([str(wheel)], lambda _m: asyncio.sleep(0), reader)
    info = target.stat()
    assert (info.st_uid, info.st_gid) == (reader.uid, reader.gid)
    assert stat.S_IMODE(info.st_mode) == 0o700
    assert (target / ".ready").exists()
    # No wheel file: the venv stays the agent's, readable by all, shared.
    plain = await cache.prepare([], lambda _m: asyncio.sleep(0), reader)
    assert plain.stat().st_uid == 0 and stat.S_IMODE(plain.stat().st_mode) == 0o755


@as_root
@needs_bwrap
async def test_another_users_wheel_file_never_reaches_a_run(app, client, make_user, settings):
    bob_home = Path(tempfile.mkdtemp(prefix="labgate-bob-"))  # 0700, root's: bob's stand-in
    try:
        wheel = make_wheel(bob_home, "labgate_private_pkg", "SECRET = 'bobs-private'\n")
        alice = await make_user("alice")
        run_id = await submit(client, alice, _definition(wheel, "steal"))
        run = await wait_run(client, alice, run_id, timeout=120)
        assert run["state"] == "failed", run
        reason = tasks_of(run)["use"]["reason"]
        assert "cannot be read as the run's owner" in reason and "Permission denied" in reason
        logs = await client.get(
            f"/api/v1/runs/{run_id}/logs", params={"task": "use"}, headers=alice
        )
        assert "bobs-private" not in logs.text
        envs = settings.data_dir / "envs" / "alpha"
        assert not envs.exists() or not [p for p in envs.iterdir() if not p.name.startswith(".")]
    finally:
        shutil.rmtree(bob_home, ignore_errors=True)


@as_root
@needs_bwrap
async def test_a_readable_wheel_file_runs_in_a_venv_of_its_owners(
    app, client, make_user, settings, shelf
):
    wheel = make_wheel(shelf, "labgate_private_pkg", "SECRET = 'shared'\n")
    alice = await make_user("alice")
    bob = await make_user("bob")
    prefixes = {}
    for name, headers in (("alice", alice), ("bob", bob)):
        run_id = await submit(client, headers, _definition(wheel, f"use-{name}"))
        run = await wait_run(client, headers, run_id, timeout=180)
        assert run["state"] == "succeeded", run
        logs = await client.get(
            f"/api/v1/runs/{run_id}/logs", params={"task": "use"}, headers=headers
        )
        secret, prefix = logs.json()["text"].split()
        assert secret == "shared"
        uid = settings.instance_uid_base + await _user_id(app, name)
        info = Path(prefix).stat()
        assert info.st_uid == uid and stat.S_IMODE(info.st_mode) == 0o700
        prefixes[name] = prefix
    assert prefixes["alice"] != prefixes["bob"]  # the same list, one venv each
