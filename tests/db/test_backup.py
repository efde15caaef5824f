"""``labgate backup`` and ``labgate restore``: the portal's database and key, kept and put back.

Run on SQLite and, in CI's database pass, on PostgreSQL (``pg_dump`` and
``pg_restore``): a backup taken while the portal serves, restored into a
fresh data dir and database, brings back accounts, passwords, API tokens and
sealed instance secrets; a restore refuses damaged, unfinished or newer
backups, a running portal and a key that does not match, and replaces what is
in place only with ``--force``, after saving it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import make_url, select
from typer.testing import CliRunner

from helpers import (
    ADMIN_PASSWORD,
    fresh_database_url,
    recorded_instance,
    serving,
    token_for,
    wait_for_state,
)
from labgate.backup import MANIFEST, ROTATED, SAVED_PREFIX, read_manifest
from labgate.cli import app as cli_app
from labgate.config import Settings
from labgate.db.models import Instance, User
from labgate.db.session import open_database
from labgate.security import SecretBox
from servers import free_port, processes_with_env

PASSWORD = "a-long-password-for-ada"


def key_file_settings(settings: Settings, data_dir: Path, database_url: str) -> Settings:
    """``settings`` with the key kept in the data dir's key file, on their own port."""
    return settings.model_copy(
        update={
            "data_dir": data_dir,
            "database_url": database_url,
            "secret_key": SecretStr(""),
            "port": free_port(),
        }
    )


def labgate(settings: Settings, *args: str) -> tuple[int, str]:
    """Run ``labgate ARGS`` with ``settings`` as its environment: exit code and output."""
    env = {name: "" for name in os.environ if name.startswith("LABGATE_")}
    env |= {
        "LABGATE_DATA_DIR": str(settings.data_dir),
        "LABGATE_DATABASE_URL": settings.database_url,
        "LABGATE_TOOLS_DIR": str(settings.tools_dir),
        "LABGATE_PORT": str(settings.port),
        "LABGATE_SECRET_KEY": settings.secret_key.get_secret_value(),
    }
    result = CliRunner().invoke(cli_app, list(args), env=env)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


@pytest.fixture
def other_database(tmp_path: Path) -> Iterator[str]:
    """A second, empty database (SQLite file or PostgreSQL database) to restore into."""
    with fresh_database_url(tmp_path / "other", empty=True) as url:
        yield url


def users(settings: Settings) -> set[str]:
    db = open_database(settings.database_url)
    try:
        with db.session() as session:
            return set(session.scalars(select(User.name)))
    finally:
        db.dispose()


def started(settings: Settings) -> Settings:
    """``settings`` after a portal start made its key and schema (and the admin)."""
    settings.signing_key()
    db = open_database(settings.database_url)
    db.dispose()
    return settings


def backed_up(settings: Settings, tmp_path: Path) -> tuple[Settings, Path]:
    """A started portal's settings (key file in ``tmp_path/var``) and a backup of it."""
    first = started(key_file_settings(settings, tmp_path / "var", settings.database_url))
    backup_dir = tmp_path / "backup"
    code, out = labgate(first, "backup", str(backup_dir))
    assert code == 0, out
    return first, backup_dir


async def test_a_backup_taken_while_the_portal_serves_restores_accounts_tokens_and_secrets(
    settings: Settings, tmp_path: Path, other_database: str
) -> None:
    first = key_file_settings(settings, tmp_path / "var", settings.database_url)
    backup_dir = tmp_path / "backup"
    async with serving(first) as app, httpx.AsyncClient(base_url=app.state.test_url) as client:
        admin = await token_for(client, "admin", ADMIN_PASSWORD, ["admin", "account"])
        made = await client.post(
            "/api/v1/users", json={"name": "ada", "password": PASSWORD}, headers=admin
        )
        assert made.status_code == 201, made.text
        ada = await token_for(client, "ada", PASSWORD)
        instance_id = recorded_instance(app, "running")
        sealed = SecretBox(first.signing_key()).seal(instance_id, "the-instance-secret")

        def seal(session: Any) -> None:
            session.get(Instance, instance_id).secret = sealed

        app.state.portal.db.transact(seal)
        # The portal keeps writing while the backup runs: it is consistent all the same.
        writes = [
            client.post(
                "/api/v1/users", json={"name": f"u{i}", "password": PASSWORD}, headers=admin
            )
            for i in range(5)
        ]
        code, out = (
            await asyncio.gather(
                asyncio.to_thread(labgate, first, "backup", str(backup_dir)), *writes
            )
        )[0]
        assert code == 0, out
        assert f"saved in {backup_dir}" in out and "the secret key file" in out
        assert "users' workspaces of the local site" in out
        late = await client.post(
            "/api/v1/users", json={"name": "late", "password": PASSWORD}, headers=admin
        )
        assert late.status_code == 201

    # Private: the backup holds the key and every password hash.
    assert stat.S_IMODE(backup_dir.stat().st_mode) == 0o700
    for path in backup_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert read_manifest(backup_dir)["secret_key"] == "file"

    second = key_file_settings(settings, tmp_path / "elsewhere", other_database)
    code, out = labgate(second, "restore", str(backup_dir))
    assert code == 0, out
    assert "restored the" in out and "what it replaced" not in out
    assert (second.data_dir / "secret_key").read_text() == (
        first.data_dir / "secret_key"
    ).read_text()
    restored = users(second)
    assert {"admin", "ada"} <= restored and "late" not in restored

    async with serving(second) as app, httpx.AsyncClient(base_url=app.state.test_url) as client:
        me = await client.get("/api/v1/auth/session", headers=ada)
        assert me.status_code == 200 and me.json()["user"]["name"] == "ada"
        signed = await client.post(
            "/api/v1/auth/login", json={"username": "ada", "password": PASSWORD}
        )
        assert signed.status_code == 200
        row = await app.state.portal.run_db(lambda s: s.get(Instance, instance_id))
        assert SecretBox(second.signing_key()).open(instance_id, row.secret) == (
            "the-instance-secret"
        )


def test_restore_replaces_what_is_in_place_only_with_force_and_keeps_it(
    settings: Settings, tmp_path: Path, other_database: str
) -> None:
    _, backup_dir = backed_up(settings, tmp_path)

    target = started(key_file_settings(settings, tmp_path / "target", other_database))
    db = open_database(target.database_url)
    with db.session() as session:
        session.add(User(name="bee", password_hash="x"))
    db.dispose()
    old_key = (target.data_dir / "secret_key").read_text()

    code, out = labgate(target, "restore", str(backup_dir))
    assert code == 1
    assert "would be replaced" in out and "--force" in out
    assert "bee" in users(target)  # nothing changed
    assert (target.data_dir / "secret_key").read_text() == old_key
    assert not list(target.data_dir.glob(f"{SAVED_PREFIX}*"))

    code, out = labgate(target, "restore", str(backup_dir), "--force")
    assert code == 0, out
    assert "bee" not in users(target)
    saved = next(target.data_dir.glob(f"{SAVED_PREFIX}*"))
    assert f"what it replaced is saved in {saved}" in " ".join(out.split())
    assert (saved / "secret_key").read_text() == old_key
    if target.database_url.startswith("sqlite"):
        with sqlite3.connect(saved / "labgate.db") as kept:
            assert ("bee",) in kept.execute("SELECT name FROM users").fetchall()
    else:  # a backup of its own: restorable like any
        assert read_manifest(saved)["database"]["kind"] == "postgresql"


def test_damaged_unfinished_and_newer_backups_are_refused_and_nothing_changes(
    settings: Settings, tmp_path: Path, other_database: str
) -> None:
    _, backup_dir = backed_up(settings, tmp_path)
    target = started(key_file_settings(settings, tmp_path / "target", other_database))
    before = users(target)
    manifest = json.loads((backup_dir / MANIFEST).read_text())
    archive = backup_dir / manifest["database"]["file"]
    good = archive.read_bytes()

    code, out = labgate(target, "restore", str(backup_dir), "--check")
    assert code == 0 and "is complete and readable" in out, out
    archive.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    for check in ([], ["--check"]):
        code, out = labgate(target, "restore", str(backup_dir), "--force", *check)
        assert code == 1 and "is damaged" in out and "does not match its checksum" in out
    # A file damaged with its checksum made to match: the database itself is checked.
    broken = good[: len(good) // 2] + bytes(len(good) - len(good) // 2)
    archive.write_bytes(broken)
    files = manifest["files"] | {
        archive.name: {"size": len(broken), "sha256": hashlib.sha256(broken).hexdigest()}
    }
    (backup_dir / MANIFEST).write_text(json.dumps(manifest | {"files": files}))
    for check in ([], ["--check"]):
        code, out = labgate(target, "restore", str(backup_dir), "--force", *check)
        assert code == 1 and ("is damaged" in out or "pg_restore failed" in out), out
    archive.write_bytes(good)
    (backup_dir / MANIFEST).write_text(json.dumps(manifest))

    newer = manifest | {
        "database": manifest["database"]
        | {"revisions": [*manifest["database"]["revisions"], "0099_future"]}
    }
    (backup_dir / MANIFEST).write_text(json.dumps(newer))
    code, out = labgate(target, "restore", str(backup_dir), "--force")
    assert code == 1 and "made by a newer labgate" in out and "0099_future" in out

    for garbled in ([1, 2], manifest | {"database": manifest["database"] | {"revisions": [{}]}}):
        (backup_dir / MANIFEST).write_text(json.dumps(garbled))
        code, out = labgate(target, "restore", str(backup_dir), "--force")
        assert code == 1 and "is not a labgate backup manifest" in out

    (backup_dir / MANIFEST).unlink()
    code, out = labgate(target, "restore", str(backup_dir), "--force")
    assert code == 1 and "holds no manifest.json" in out

    assert users(target) == before
    assert not list(target.data_dir.glob(f"{SAVED_PREFIX}*"))


def test_backup_wants_a_new_directory(settings: Settings, tmp_path: Path) -> None:
    first = started(key_file_settings(settings, tmp_path / "var", settings.database_url))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    code, out = labgate(first, "backup", str(taken))
    assert code == 1 and "is not an empty directory" in out
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]


def test_a_backup_that_fails_leaves_nothing_behind(settings: Settings, tmp_path: Path) -> None:
    if settings.database_url.startswith("sqlite"):
        missing, why = f"sqlite:///{tmp_path}/none.db", "there is no database at"
    else:
        url = make_url(settings.database_url).set(database="lgtest_no_such_database")
        missing, why = url.render_as_string(hide_password=False), "cannot read the database"
    nowhere = key_file_settings(settings, tmp_path / "var", missing)
    code, out = labgate(nowhere, "backup", str(tmp_path / "backup"))
    assert code == 1 and why in out, out
    assert not (tmp_path / "backup").exists()


async def test_restore_refuses_while_labgate_answers_on_its_port(
    settings: Settings, tmp_path: Path
) -> None:
    first, backup_dir = backed_up(settings, tmp_path)
    async with serving(first, port=first.port):
        code, out = await asyncio.to_thread(labgate, first, "restore", str(backup_dir), "--force")
    assert code == 1 and "stop labgate" in out
    assert not list(first.data_dir.glob(f"{SAVED_PREFIX}*"))


def test_a_key_setting_other_than_the_backups_key_is_refused(
    settings: Settings, tmp_path: Path, other_database: str
) -> None:
    _, backup_dir = backed_up(settings, tmp_path)
    # The target keeps its key as a setting (settings' TEST_SECRET_KEY), not the backup's.
    target = settings.model_copy(
        update={
            "data_dir": tmp_path / "target",
            "database_url": other_database,
            "port": free_port(),
        }
    )
    code, out = labgate(target, "restore", str(backup_dir))
    assert code == 1 and "differs from the secret_key setting" in out
    assert not (target.data_dir / "secret_key").exists()


def test_a_backup_whose_key_was_a_setting_needs_that_setting(
    settings: Settings, tmp_path: Path, other_database: str
) -> None:
    first = settings.model_copy(update={"data_dir": tmp_path / "var", "port": free_port()})
    started(first)
    backup_dir = tmp_path / "backup"
    code, out = labgate(first, "backup", str(backup_dir))
    assert code == 0 and "not the secret key (a setting)" in out
    assert "keep it with this backup" in out
    assert not (backup_dir / "secret_key").exists()
    target = key_file_settings(settings, tmp_path / "target", other_database)
    code, out = labgate(target, "restore", str(backup_dir))
    assert code == 1 and "set secret_key to that key" in out
    code, out = labgate(
        target.model_copy(update={"secret_key": settings.secret_key}), "restore", str(backup_dir)
    )
    assert code == 0, out
    assert "set secret_key to that key" in out


def test_keep_writes_dated_backups_and_deletes_only_the_oldest_complete_ones(
    settings: Settings, tmp_path: Path
) -> None:
    first = started(key_file_settings(settings, tmp_path / "var", settings.database_url))
    parent = tmp_path / "backups"
    unfinished = parent / "labgate-20000101-000000"  # no manifest: never counted or deleted
    unfinished.mkdir(parents=True)
    (parent / "notes").mkdir()
    made = []
    for _ in range(3):
        code, out = labgate(first, "backup", str(parent), "--keep", "2", "--json")
        assert code == 0, out
        made.append(Path(json.loads(out)["path"]))
    assert all(p.parent == parent and ROTATED.fullmatch(p.name) for p in made)
    assert sorted(p.name for p in parent.iterdir()) == sorted(
        ["notes", unfinished.name, made[1].name, made[2].name]
    )
    read_manifest(made[2])  # complete and checked
    code, out = labgate(first, "backup", str(parent), "--keep", "0")
    assert code == 2  # a usage error


async def test_after_a_restore_the_local_site_stops_what_was_launched_after_the_backup(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """operations.md, restoring: the backup's instance runs on; one launched after the
    backup is in no record any more, and the site stops it at the first start."""
    from labgate.backends import process as process_module

    monkeypatch.setattr(process_module, "ORPHAN_MIN_AGE", 0.0)
    monkeypatch.setattr(process_module, "ORPHAN_GRACE", 2.0)
    first = key_file_settings(settings, tmp_path / "var", settings.database_url)
    backup_dir = tmp_path / "backup"
    async with serving(first) as app, httpx.AsyncClient(base_url=app.state.test_url) as client:
        admin = await token_for(client, "admin", ADMIN_PASSWORD, ["admin", "account"])

        async def launched() -> str:
            made = await client.post("/api/v1/instances", json={"tool": "demo"}, headers=admin)
            assert made.status_code == 202, made.text
            instance_id = str(made.json()["id"])
            await wait_for_state(client, admin, instance_id, {"running"})
            return instance_id

        before = await launched()
        code, out = await asyncio.to_thread(labgate, first, "backup", str(backup_dir))
        assert code == 0, out
        after = await launched()
    # The portal is down, its instances are not.
    assert processes_with_env("LABGATE_INSTANCE_ID", before)
    assert processes_with_env("LABGATE_INSTANCE_ID", after)
    code, out = labgate(first, "restore", "--force", str(backup_dir))
    assert code == 0, out

    async with serving(first) as app, httpx.AsyncClient(base_url=app.state.test_url) as client:
        deadline = asyncio.get_running_loop().time() + 30
        while processes_with_env("LABGATE_INSTANCE_ID", after):
            assert asyncio.get_running_loop().time() < deadline, "the orphan runs on"
            await asyncio.sleep(0.1)
        assert await app.state.portal.run_db(lambda s: s.get(Instance, after)) is None
        body = await wait_for_state(client, admin, before, {"running"})
        assert processes_with_env("LABGATE_INSTANCE_ID", before)
        assert (
            await client.delete(f"/api/v1/instances/{before}", headers=admin)
        ).status_code == 202
        assert body["id"] == before
        await wait_for_state(client, admin, before, {"stopped"})
    assert processes_with_env("LABGATE_INSTANCE_ID", before) == []
