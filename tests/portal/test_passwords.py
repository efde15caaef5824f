"""The password policy: length, common passwords, the user's own name; wherever one is set."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher
from pydantic import ValidationError

from helpers import ADMIN_PASSWORD, PASSWORD
from labgate.config import Settings
from labgate.portal.accounts import generate_password

WEAK = {
    "password": "list of common passwords",
    "12345678": "list of common passwords",
    "Password1": "list of common passwords",
    "qwertyuiop": "list of common passwords",
    "jo-the-user": "cannot be the user name",
}


def test_the_shipped_list_has_thousands_of_common_passwords():
    from labgate.passwords import common_passwords

    listed = common_passwords()
    assert len(listed) > 8000
    assert {"password", "12345678", "iloveyou", "qwertyuiop"} <= listed
    assert PASSWORD not in listed and ADMIN_PASSWORD not in listed


def test_generated_passwords_always_pass():
    from labgate.passwords import check_new_password

    for _ in range(200):
        check_new_password(generate_password(), "admin", 16)


@pytest.mark.parametrize("password", sorted(WEAK))
async def test_admins_cannot_create_users_with_weak_passwords(client, admin_headers, password):
    created = await client.post(
        "/api/v1/users",
        json={"name": "jo-the-user", "password": password},
        headers=admin_headers,
    )
    assert created.status_code == 422, created.text
    assert created.json()["error"] == "weak_password"
    assert WEAK[password] in created.json()["detail"]
    missing = await client.get("/api/v1/users/jo-the-user", headers=admin_headers)
    assert missing.status_code == 404


async def test_too_short_is_a_clear_422(client, admin_headers):
    short = await client.post(
        "/api/v1/users", json={"name": "kim", "password": "k1m"}, headers=admin_headers
    )
    assert short.status_code == 422
    assert short.json()["error"] == "validation_error"
    assert "password" in short.json()["detail"]


async def test_weak_new_password_is_refused_and_the_old_one_stays(client, make_user, admin_headers):
    lucinda = await make_user("lucinda8")
    for weak in ("password", "12345678", "Lucinda8"):
        changed = await client.put(
            "/api/v1/users/me/password",
            json={"password": weak, "current_password": PASSWORD},
            headers=lucinda,
        )
        assert changed.status_code == 422 and changed.json()["error"] == "weak_password", weak
        reset = await client.put(
            "/api/v1/users/lucinda8/password", json={"password": weak}, headers=admin_headers
        )
        assert reset.status_code == 422 and reset.json()["error"] == "weak_password", weak
    login = await client.post(
        "/api/v1/auth/login", json={"username": "lucinda8", "password": PASSWORD}
    )
    assert login.status_code == 200


class TestMinimumLength:
    @pytest.fixture
    def settings(self, settings: Settings) -> Settings:
        return settings.model_copy(update={"password_min_length": 20})

    async def test_the_minimum_length_is_a_setting(self, client, admin_headers):
        nineteen = "correct-horse-batte"
        short = await client.post(
            "/api/v1/users", json={"name": "max", "password": nineteen}, headers=admin_headers
        )
        assert short.status_code == 422 and "at least 20 characters" in short.json()["detail"]
        ok = await client.post(
            "/api/v1/users",
            json={"name": "max", "password": nineteen + "y"},
            headers=admin_headers,
        )
        assert ok.status_code == 201


def test_a_weak_configured_admin_password_is_refused_at_start(tmp_path):
    for weak, reason in (
        ("password", "common"),
        ("Labadmin1", "user name"),
        ("short", "too short"),
    ):
        with pytest.raises(ValidationError, match=f"admin_password: .*{reason}"):
            Settings(data_dir=tmp_path, admin_username="labadmin1", admin_password=weak)


def test_starting_the_portal_hashes_no_password_until_a_sign_in_needs_one():
    """The dummy hash of unknown-name sign-ins is made on a worker, not at import (start-up)."""
    import subprocess
    import sys

    code = """
import asyncio
from labgate import security
from labgate.passwords import PasswordWorkers

class Counting(type(security._hasher)):
    calls = 0
    def hash(self, *args, **kwargs):
        Counting.calls += 1
        return super().hash(*args, **kwargs)

security._hasher = Counting()
import labgate.serve  # every module of the portal
print(Counting.calls)

async def sign_in_of_no_account():
    workers = PasswordWorkers(1)
    async with workers.slot():
        return await workers.verify(None, "anything at all")

print(asyncio.run(sign_in_of_no_account()), Counting.calls)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split("\n")
    assert out[0] == "0"  # importing the portal hashed nothing
    assert out[1] == "False 1"  # the first sign-in naming no account made the dummy hash


def test_the_dummy_hash_costs_what_a_users_hash_costs_now(real_password_hashes):
    """A sign-in naming no account checks a hash made at the hasher's present cost."""
    from labgate import passwords, security

    passwords._DUMMY[:] = [PasswordHasher(time_cost=1, memory_cost=64, parallelism=1).hash("cheap")]
    assert security.hash_is_current(passwords.dummy_hash())
    assert security.hash_is_current(security.hash_password("a user's"))
