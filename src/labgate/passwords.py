"""Passwords: the rules a new password must meet, and the threads that hash them.

argon2 is slow on purpose (tens of milliseconds of CPU and 64 MiB per hash).
Run on asyncio's default thread pool, a burst of sign-ins would take every
thread that the portal's database work also runs on. :class:`PasswordWorkers`
gives hashing its own small pool, and a semaphore of the same size: a sign-in
waits for a free hasher *before* its rate limits are checked, so at most that
many guesses are ever in flight, whatever the number of requests.

The policy (:func:`check_new_password`) applies wherever a password is set:
user creation, password changes and resets, the first admin. The list of
common passwords ships with labgate (no network at run time): the 8,359 entries
of 8 or more characters in Django's list of 20,000 common passwords.
"""

from __future__ import annotations

import asyncio
import gzip
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import cache
from importlib import resources
from typing import TypeVar

from labgate.errors import Unprocessable
from labgate.security import hash_is_current, hash_password, verify_password

T = TypeVar("T")

COMMON_PASSWORDS_FILE = "common-passwords.txt.gz"


@cache
def common_passwords() -> frozenset[str]:
    """The shipped list of common passwords, lower-case."""
    data = resources.files("labgate").joinpath(COMMON_PASSWORDS_FILE).read_bytes()
    lines = gzip.decompress(data).decode().splitlines()
    return frozenset(line.strip().lower() for line in lines if line and not line.startswith("#"))


_DUMMY: list[str] = []


def dummy_hash() -> str:
    """A hash of no one's password (see :meth:`PasswordWorkers.verify`).

    Made on first use, on a password worker: an argon2 hash at import would
    add its cost to every start of every labgate process. It is made again if
    the hasher's cost changed since, so checking it always costs what checking
    a user's hash costs.
    """
    if not _DUMMY or not hash_is_current(_DUMMY[0]):
        _DUMMY[:] = [hash_password("labgate-timing-equaliser")]
    return _DUMMY[0]


def _verify_no_account(password: str) -> bool:
    """Check ``password`` against :func:`dummy_hash`, for the time it takes; never a match."""
    verify_password(dummy_hash(), password)
    return False


def check_new_password(password: str, username: str, min_length: int) -> None:
    """Refuse a password that is too short, common, or the user's own name (422)."""
    if len(password) < min_length:
        raise Unprocessable(
            f"the password is too short: at least {min_length} characters",
            code="weak_password",
        )
    if password.strip().lower() == username.strip().lower():
        raise Unprocessable("the password cannot be the user name", code="weak_password")
    if password.lower() in common_passwords():
        raise Unprocessable(
            "this password is on a list of common passwords; choose another",
            code="weak_password",
        )


class PasswordWorkers:
    """A bounded pool for argon2: hashing never takes the portal's other threads."""

    def __init__(self, size: int = 0, min_length: int = 8) -> None:
        self.size = size or os.cpu_count() or 1
        self.min_length = min_length
        self._pool = ThreadPoolExecutor(self.size, thread_name_prefix="labgate-password")
        self._slots: asyncio.Semaphore | None = None

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the ``size`` hashing slots (waiting for one to be free)."""
        if self._slots is None:
            # Made on first use, inside the loop that serves requests.
            self._slots = asyncio.Semaphore(self.size)
        async with self._slots:
            yield

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def hash(self, password: str) -> str:
        """An argon2id hash of ``password``, computed on the pool."""
        async with self.slot():
            return await self._run(lambda: hash_password(password))

    async def hash_new(self, password: str, username: str) -> str:
        """The hash of a new password for ``username``, once it meets the policy (else 422)."""
        check_new_password(password, username, self.min_length)
        return await self.hash(password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """Whether ``password`` matches; the caller already holds a :meth:`slot`.

        With no hash (no such account, or none with a password) the check is
        made against :func:`dummy_hash` all the same and fails: a sign-in
        naming no account takes as long as one with a wrong password.
        """
        if password_hash is None:
            return await self._run(lambda: _verify_no_account(password))
        return await self._run(lambda: verify_password(password_hash, password))

    def prepare(self) -> None:
        """Make :func:`dummy_hash` now, on a worker, so no sign-in waits for it."""
        self._pool.submit(dummy_hash)

    def close(self) -> None:
        """Stop the threads (after the ones running finish)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
