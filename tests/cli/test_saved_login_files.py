"""``labgate login`` keeps its token where no other account can take or plant it.

``save_login`` writes ``client.toml`` only in a folder of the user's that no
other account may change (else it refuses, naming the ``chmod``); the new
file is created under a fresh name with ``O_EXCL|O_NOFOLLOW`` (never through a
link or into a file someone planted), made 0600 on its descriptor before the
first byte, and renamed into place. ``load_saved_login`` trusts the file only
under the same conditions, and only a regular file of the user's that nobody
else may change. docs/security.md, "The command line".
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from labgate import client as client_module
from labgate.cli import app
from labgate.client import ClientConfigError, SavedLogin, load_saved_login, save_login

NOBODY = 65534
SECRET_TOKEN = "lg_victims-token-0123456789abcdef"
LOGIN = SavedLogin("https://labgate.example.org", SECRET_TOKEN)


def _loot(tmp_path: Path) -> Path:
    """A file of the attacker's, readable by them (and anyone)."""
    loot = tmp_path / "attacker" / "loot"
    loot.parent.mkdir()
    loot.write_text("")
    loot.chmod(0o666)
    os.chown(loot, NOBODY, NOBODY)
    os.chown(loot.parent, NOBODY, NOBODY)
    return loot


def test_saving_a_login_never_writes_the_token_through_a_planted_link(tmp_path: Path) -> None:
    # The victim's config folder, writable by another local account (a shared
    # XDG_CONFIG_HOME, or a folder that account made first: mkdir(exist_ok=True) keeps it).
    config = tmp_path / "config" / "labgate"
    config.mkdir(parents=True)
    config.chmod(0o777)
    loot = _loot(tmp_path)
    # The old temporary name was predictable; a link for each likely pid would do.
    for pid in {os.getpid(), os.getpid() + 1}:
        (config / f".client.toml.{pid}").symlink_to(loot)
    with pytest.raises(ClientConfigError) as refused:
        save_login(LOGIN, config / "client.toml")
    assert f"{config} may be changed by other accounts (mode 0777)" in str(refused.value)
    assert f"run `chmod 700 {config}`" in str(refused.value)
    assert SECRET_TOKEN not in loot.read_text()
    assert not (config / "client.toml").exists()
    # As the message says: then it works, and the planted links are left alone.
    config.chmod(0o700)
    save_login(LOGIN, config / "client.toml")
    assert SECRET_TOKEN not in loot.read_text()
    assert load_saved_login(config / "client.toml") == LOGIN


def test_a_config_folder_of_another_account_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "config" / "labgate"
    config.mkdir(parents=True, mode=0o755)
    os.chown(config, NOBODY, NOBODY)
    with pytest.raises(ClientConfigError, match=r"belongs to nobody \(uid 65534\), not to you"):
        save_login(LOGIN, config / "client.toml")
    assert not (config / "client.toml").exists()


def test_the_file_is_created_exclusively_without_following_links_and_private_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config" / "labgate"
    config.mkdir(parents=True, mode=0o700)
    opened: list[tuple[str, int, int | None]] = []
    chmodded: list[tuple[str, int]] = []
    real_open, real_fchmod = os.open, os.fchmod

    def spy_open(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        fd = real_open(path, flags, mode, **kwargs)
        if str(path).startswith(".client.toml") or ".client.toml." in str(path):
            opened.append((str(path), flags, fd))
        return fd

    def spy_fchmod(fd: int, mode: int) -> None:
        written = os.fstat(fd).st_size
        chmodded.append((f"fd {fd} at {written} bytes", mode))
        real_fchmod(fd, mode)

    monkeypatch.setattr(client_module.os, "open", spy_open)
    monkeypatch.setattr(client_module.os, "fchmod", spy_fchmod)
    old_umask = os.umask(0o277)  # would make the file 0400: the descriptor is set to 0600
    try:
        save_login(LOGIN, config / "client.toml")
    finally:
        os.umask(old_umask)
    assert len(opened) == 1, opened
    name, flags, fd = opened[0]
    assert flags & os.O_EXCL and flags & os.O_NOFOLLOW and flags & os.O_CREAT, name
    assert chmodded == [(f"fd {fd} at 0 bytes", 0o600)]
    info = (config / "client.toml").stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    assert [p.name for p in config.iterdir()] == ["client.toml"]  # no temporary file left


def test_a_link_planted_as_client_toml_is_replaced_not_written_through(tmp_path: Path) -> None:
    config = tmp_path / "config" / "labgate"
    config.mkdir(parents=True, mode=0o700)
    loot = _loot(tmp_path)
    (config / "client.toml").symlink_to(loot)
    with pytest.raises(ClientConfigError, match="it is a symbolic link"):
        load_saved_login(config / "client.toml")
    save_login(LOGIN, config / "client.toml")
    assert SECRET_TOKEN not in loot.read_text()
    assert not (config / "client.toml").is_symlink()
    assert load_saved_login(config / "client.toml") == LOGIN


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda c: c.chmod(0o777), "may be changed by other accounts (mode 0777)"),
        (lambda c: c.chmod(0o770), "may be changed by other accounts (mode 0770)"),
        (lambda c: os.chown(c, NOBODY, NOBODY), "belongs to nobody (uid 65534), not to you"),
        (
            lambda c: os.chown(c / "client.toml", NOBODY, NOBODY),
            "client.toml belongs to nobody (uid 65534), not to you",
        ),
        (lambda c: (c / "client.toml").chmod(0o622), "run `chmod 600"),
    ],
    ids=["folder 0777", "folder 0770", "folder of another", "file of another", "file 0622"],
)
def test_a_saved_login_is_trusted_only_as_the_users_own(
    spoil: Any, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config" / "labgate"
    save_login(LOGIN, config / "client.toml")
    spoil(config)
    with pytest.raises(ClientConfigError) as refused:
        load_saved_login(config / "client.toml")
    assert message in str(refused.value)
    # Every command says so in one line, and sends nothing.
    for name in [k for k in os.environ if k.startswith("LABGATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["ls"], env={"XDG_CONFIG_HOME": str(tmp_path / "config")})
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_a_missing_folder_or_file_is_no_saved_login(tmp_path: Path) -> None:
    new = tmp_path / "none" / "labgate"
    assert load_saved_login(new / "client.toml") is None
    save_login(LOGIN, new / "client.toml")
    assert stat.S_IMODE(new.stat().st_mode) == 0o700  # a new folder is private
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    # Nothing to trust in it: commands with --url still work.
    assert load_saved_login(shared / "client.toml") is None
    with contextlib.suppress(ClientConfigError):
        save_login(LOGIN, shared / "client.toml")
    assert not (shared / "client.toml").exists()
