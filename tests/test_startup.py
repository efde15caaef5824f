"""Bad configuration: `labgate serve` (and the other commands) say what is wrong in one line.

Each case runs the real command in a subprocess, as an operator would, and
checks the exit code, that no traceback is printed, and that the message
names the setting and the problem.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TEST_SECRET_KEY
from labgate.db.session import open_database
from servers import free_port

TIMEOUT = 60


def labgate(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m labgate ARGS`` with a clean labgate environment plus ``env``."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("LABGATE_")}
    clean.update(
        {
            "LABGATE_DATA_DIR": str(tmp_path / "var"),
            "LABGATE_PORT": str(free_port()),
            "LABGATE_SECRET_KEY": TEST_SECRET_KEY,
            "LABGATE_ADMIN_PASSWORD": "admin-password-for-startup",
            "HOME": str(tmp_path),  # no saved login of the machine's user
        }
    )
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-m", "labgate", *args],
        env=clean,
        cwd=tmp_path,  # no ./labgate.toml of the checkout
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def refused(result: subprocess.CompletedProcess[str], *words: str) -> list[str]:
    """The ``error:`` lines of a refused start; each of ``words`` is in them."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors, result.stderr
    text = "\n".join(errors)
    for word in words:
        assert word in text, text
    return errors


def serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return labgate(tmp_path, "serve", **env)


# --- settings ---------------------------------------------------------------------------


def test_sites_not_json(tmp_path: Path) -> None:
    errors = refused(serve(tmp_path, LABGATE_SITES='[{"name": '), "LABGATE_SITES", "not valid JSON")
    assert len(errors) == 1


def test_sites_of_the_wrong_shape(tmp_path: Path) -> None:
    refused(serve(tmp_path, LABGATE_SITES='{"name": "a"}'), "LABGATE_SITES", "valid list")
    errors = refused(
        serve(tmp_path, LABGATE_SITES='[{"name": "Bad Name", "colour": 1}]'),
        "sites[0].name",
        "sites[0].colour",
        "Extra inputs are not permitted",
    )
    assert len(errors) == 2  # one line per bad setting


def test_unknown_backend(tmp_path: Path) -> None:
    refused(
        serve(tmp_path, LABGATE_SITES='[{"name": "hpc", "backend": "nosuch"}]'),
        "LABGATE_SITES",
        "'hpc'",
        "unknown backend 'nosuch'",
        "installed: ",
    )


def test_backend_refusing_its_options(tmp_path: Path) -> None:
    sites = '[{"name": "box", "backend": "containers", "options": {"nosuch": 1}}]'
    refused(serve(tmp_path, LABGATE_SITES=sites), "'box'", "options.nosuch")


def test_each_bad_setting_is_its_own_line(tmp_path: Path) -> None:
    errors = refused(
        serve(tmp_path, LABGATE_PORT="eighty", LABGATE_ROUTER_WORKERS="0"),
        "LABGATE_PORT",
        "'eighty'",
        "LABGATE_ROUTER_WORKERS",
        "greater than or equal to 1",
    )
    assert len(errors) == 2


def test_secrets_are_not_repeated_in_errors(tmp_path: Path) -> None:
    result = serve(tmp_path, LABGATE_SESSION_MAX_AGE="5", LABGATE_SECRET_KEY="hunter2-secret")
    refused(result, "LABGATE_SESSION_MAX_AGE")
    assert "hunter2" not in result.stderr


def test_config_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    refused(serve(tmp_path, LABGATE_CONFIG=str(missing)), "LABGATE_CONFIG", str(missing))
    # Every command that reads settings refuses it, not only serve.
    refused(labgate(tmp_path, "config", "show", LABGATE_CONFIG=str(missing)), "LABGATE_CONFIG")
    refused(labgate(tmp_path, "ls", LABGATE_CONFIG=str(missing)), "does not exist")


def test_config_file_that_is_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "labgate.toml"
    path.write_text('port = "8000\n')
    refused(serve(tmp_path, LABGATE_CONFIG=str(path)), str(path))
    path.write_text("prot = 8000\n")
    refused(serve(tmp_path, LABGATE_CONFIG=str(path)), "unknown setting 'prot'")


# --- the database -------------------------------------------------------------------------


def test_database_url_that_does_not_parse(tmp_path: Path) -> None:
    refused(
        serve(tmp_path, LABGATE_DATABASE_URL="not a url"),
        "LABGATE_DATABASE_URL",
        "cannot parse",
    )


def test_database_of_an_unknown_kind(tmp_path: Path) -> None:
    refused(
        serve(tmp_path, LABGATE_DATABASE_URL="oracle9://scott:tiger@127.0.0.1/x"),
        "LABGATE_DATABASE_URL",
        "unknown database kind 'oracle9'",
    )


def test_database_driver_not_installed(tmp_path: Path) -> None:
    result = serve(tmp_path, LABGATE_DATABASE_URL="postgresql+pg8000://u:pw-secret@127.0.0.1/x")
    refused(result, "LABGATE_DATABASE_URL", "not installed", "pg8000")
    assert "pw-secret" not in result.stderr


def test_postgresql_that_does_not_answer(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://labgate:pw-secret@127.0.0.1:{port}/labgate"
    result = serve(tmp_path, LABGATE_DATABASE_URL=url)
    errors = refused(result, "cannot connect to the database", str(port), "Connection refused")
    assert len(errors) == 1
    assert "pw-secret" not in result.stderr


@pytest.mark.parametrize("damage", ["garbage", "torn"])
def test_sqlite_file_that_is_damaged(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "var" / "labgate.db"
    db.parent.mkdir(mode=0o700)
    if damage == "garbage":
        db.write_bytes(b"this is not a database\n" * 1000)
    else:
        # A real labgate database whose pages after the header were overwritten.
        open_database(f"sqlite:///{db}").dispose()
        assert db.stat().st_size > 16384
        with db.open("r+b") as handle:
            handle.seek(100)
            handle.write(os.urandom(16384))
    refused(serve(tmp_path), str(db), "damaged or not a SQLite database")


# --- the data directory ----------------------------------------------------------------


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "var").write_text("not a directory\n")
    refused(serve(tmp_path), "data_dir", "LABGATE_DATA_DIR", "is not a directory")


def test_data_dir_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    where = tmp_path / "file" / "var"
    refused(serve(tmp_path, LABGATE_DATA_DIR=str(where)), "data_dir", "cannot create", str(where))


def test_tools_dir_that_does_not_exist(tmp_path: Path) -> None:
    where = tmp_path / "tools"
    refused(serve(tmp_path, LABGATE_TOOLS_DIR=str(where)), "LABGATE_TOOLS_DIR", "does not exist")


# --- the port and other commands ---------------------------------------------------------


def test_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused(serve(tmp_path, LABGATE_PORT=str(port)), "cannot listen", str(port))


def test_doctor_and_router_report_bad_settings_without_traceback(tmp_path: Path) -> None:
    doctor = labgate(tmp_path, "doctor", LABGATE_SITES="[{")
    assert doctor.returncode == 1
    assert "Traceback" not in doctor.stdout + doctor.stderr
    assert "LABGATE_SITES" in doctor.stdout and "not valid JSON" in doctor.stdout
    router = labgate(tmp_path, "router", "--portal", "http://127.0.0.1:9", LABGATE_SITES="[{")
    refused(router, "LABGATE_SITES", "not valid JSON")
    user = labgate(tmp_path, "user", "list", LABGATE_DATABASE_URL="x", LABGATE_PORT="0x")
    refused(user, "LABGATE_PORT")
