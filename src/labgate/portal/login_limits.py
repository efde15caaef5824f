"""How many failed sign-ins an account and a client address may have.

Three moving windows (the ``limits`` library, in this process's memory):

- per (account, address): the tight one, ``login_limit_account_address``.
  A guesser at one address stops here; a success clears it, so a user who
  mistypes and then gets it right starts again from zero.
- per account, from every address: ``login_limit_account``, looser. It stops
  guessing spread over many addresses. It is also the one way others can
  keep a user out (by failing on purpose from many addresses), which is why
  it is looser and why only *failures* count.
- per address, whatever the account: ``login_limit_address``. It stops one
  address trying one password on many accounts.

Only failures are counted, so a lab behind one NAT address, or a script that
signs in many users, is never limited for signing in correctly. The cost of
correct sign-ins is bounded by the password workers instead.

The counts live in the memory of one portal process: with several portal
replicas each keeps its own, so a guesser spread over N replicas gets N times
the budget (the limits' storage can be moved to Redis or memcached then).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from labgate.config import Settings
from labgate.errors import TooManyRequests


def _duration(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


@dataclass(frozen=True)
class _Limit:
    item: RateLimitItem
    scope: str


class LoginLimiter:
    """Checks and records failed sign-ins per account, per address, and per both."""

    def __init__(self, settings: Settings) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        rates = {
            "pair": settings.login_limit_account_address,
            "account": settings.login_limit_account,
            "address": settings.login_limit_address,
        }
        self._limits = {scope: _Limit(parse(rate), scope) for scope, rate in rates.items() if rate}

    def _keys(self, account: str, address: str) -> list[tuple[_Limit, tuple[str, ...]]]:
        ids = {"pair": (account, address), "account": (account,), "address": (address,)}
        return [(limit, (limit.scope, *ids[limit.scope])) for limit in self._limits.values()]

    async def check(self, account: str, address: str) -> None:
        """Refuse (429, with the seconds to wait) when any limit is used up."""
        waits = []
        for limit, ids in self._keys(account, address):
            if not await self._limiter.test(limit.item, *ids):
                stats = await self._limiter.get_window_stats(limit.item, *ids)
                waits.append(math.ceil(stats.reset_time - time.time()))
        if waits:
            wait = max(1, max(waits))
            raise TooManyRequests(
                f"too many failed sign-ins; try again in {_duration(wait)}", retry_after=wait
            )

    async def failed(self, account: str, address: str) -> None:
        """Count one failed sign-in against every limit."""
        for limit, ids in self._keys(account, address):
            await self._limiter.hit(limit.item, *ids)

    async def succeeded(self, account: str, address: str) -> None:
        """A correct password: this address starts again for this account."""
        pair = self._limits.get("pair")
        if pair is not None:
            await self._limiter.clear(pair.item, "pair", account, address)
