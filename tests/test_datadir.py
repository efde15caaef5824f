"""The data dir and the secret key: private, strong, or labgate refuses to start."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import TEST_SECRET_KEY
from labgate.config import Settings
from labgate.datadir import UnsafeSetup, check_key, create_key_file
from labgate.portal.app import create_app


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def serve(data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``labgate serve`` on a random port, expected to refuse before it listens."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("LABGATE_")}
    full |= {"LABGATE_DATA_DIR": str(data_dir), "LABGATE_PORT": "0", **env}
    return subprocess.run(
        [sys.executable, "-m", "labgate", "serve"],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_line_refusal(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: refusing to start:"), lines
    for word in words:
        assert word in lines[0], lines


# --- the key -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "",
        "short",
        "test-secret-key",
        "a" * 200,  # long but one character
        "ab" * 60,  # long but two
        secrets.token_hex(31),  # 248 bits of hex
        secrets.token_urlsafe(32)[:42],  # 252 bits of base64
    ],
    # Fixed ids: random ones would differ between pytest-xdist's workers.
    ids=["empty", "short", "known", "one-character", "two-characters", "hex-248", "base64-252"],
)
def test_weak_keys_are_refused(key: str) -> None:
    with pytest.raises(UnsafeSetup, match="secret_key"):
        check_key(key, "the secret_key setting")


@pytest.mark.parametrize(
    "key",
    [secrets.token_urlsafe(32), secrets.token_hex(32), secrets.token_urlsafe(48)],
    ids=["base64-256", "hex-256", "base64-384"],
)
def test_random_keys_of_256_bits_are_accepted(key: str) -> None:
    assert check_key(key, "the secret_key setting") == key


def test_an_empty_key_file_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir(mode=0o700)
    (data / "secret_key").write_text("")
    (data / "secret_key").chmod(0o600)
    with pytest.raises(UnsafeSetup, match="is empty"):
        create_app(Settings(data_dir=data))
    assert_one_line_refusal(serve(data), "secret_key", "is empty")


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_others_may_read_is_refused(tmp_path: Path, loose: int) -> None:
    data = tmp_path / "var"
    data.mkdir(mode=0o700)
    key_file = data / "secret_key"
    key_file.write_text(secrets.token_urlsafe(32))
    key_file.chmod(loose)
    with pytest.raises(UnsafeSetup, match=f"chmod 600 {key_file}"):
        Settings(data_dir=data).signing_key()
    key_file.chmod(0o400)  # read-only for its owner is fine
    assert Settings(data_dir=data).signing_key() == key_file.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_key_file_of_another_user_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir(mode=0o700)
    key_file = data / "secret_key"
    key_file.write_text(secrets.token_urlsafe(32))
    key_file.chmod(0o600)
    os.chown(key_file, 65534, 65534)
    with pytest.raises(UnsafeSetup, match="owned by uid 65534"):
        Settings(data_dir=data).signing_key()


def test_a_weak_key_setting_is_refused_by_serve_in_one_line(tmp_path: Path) -> None:
    assert_one_line_refusal(
        serve(tmp_path / "var", LABGATE_SECRET_KEY="hunter2"), "secret_key setting", "weak"
    )


def test_a_generated_key_is_strong_private_and_written_once(tmp_path: Path) -> None:
    data = tmp_path / "var"
    key = Settings(data_dir=data).signing_key()
    key_file = data / "secret_key"
    assert mode(key_file) == 0o600 and key_file.stat().st_uid == os.geteuid()
    assert check_key(key, "generated") == key == key_file.read_text().strip()
    assert Settings(data_dir=data).signing_key() == key  # kept, not regenerated
    assert [p.name for p in data.iterdir() if p.name.startswith(".secret_key")] == []


def test_racing_starts_agree_on_one_key(tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir(mode=0o700)
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: create_key_file(data / "secret_key"), range(16)))
    assert keys == {(data / "secret_key").read_text().strip()}


# --- the data dir and what is in it ------------------------------------------------


def test_a_new_data_dir_and_its_files_are_private(tmp_path: Path) -> None:
    data = tmp_path / "new" / "var"
    create_app(Settings(data_dir=data, secret_key=TEST_SECRET_KEY))
    assert mode(data) == 0o700
    assert mode(data / "logs") == 0o700 and mode(data / "workspaces") == 0o700
    # The database, and the WAL files SQLite made next to it (with the file's mode).
    made = [p for p in data.iterdir() if p.name.startswith("labgate.db")]
    assert {p.name for p in made} >= {"labgate.db", "labgate.db-wal", "labgate.db-shm"}
    assert {p.name: mode(p) for p in made} == {p.name: 0o600 for p in made}


def test_an_old_world_readable_database_is_made_private(tmp_path: Path) -> None:
    data = tmp_path / "var"
    create_app(Settings(data_dir=data, secret_key=TEST_SECRET_KEY))
    (data / "labgate.db").chmod(0o644)
    create_app(Settings(data_dir=data, secret_key=TEST_SECRET_KEY))
    assert mode(data / "labgate.db") == 0o600


@pytest.mark.parametrize("loose", [0o755, 0o750, 0o711, 0o701])
def test_a_data_dir_others_may_enter_is_refused(tmp_path: Path, loose: int) -> None:
    data = tmp_path / "var"
    data.mkdir()
    data.chmod(loose)
    with pytest.raises(UnsafeSetup, match=f"chmod 700 {data}"):
        create_app(Settings(data_dir=data, secret_key=TEST_SECRET_KEY))
    assert not (data / "labgate.db").exists()  # refused before the database was made
    assert_one_line_refusal(serve(data, LABGATE_SECRET_KEY=TEST_SECRET_KEY), "chmod 700")
