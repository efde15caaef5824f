"""Activity per instance as routers report it to the portal (what idle culling reads).

A router process keeps mutable counters (:mod:`labgate.router.activity`) and
reports frozen :class:`Activity` copies; when several workers serve one port the
portal combines their reports with :func:`merge`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Activity:
    """What one route has seen: last request (Unix time), bytes each way, open WebSockets.

    ``bytes_in`` counts bytes from clients to the instance, ``bytes_out`` bytes
    from the instance to clients, both including HTTP framing. ``users`` maps
    each user the router let in to the time of their last request (the
    owner's access log).
    """

    last_request: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    open_websockets: int = 0
    users: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "last_request": self.last_request,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "open_websockets": self.open_websockets,
            "users": {str(user): at for user, at in self.users.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Activity:
        """From the JSON form."""
        return cls(
            last_request=float(data.get("last_request", 0.0)),
            bytes_in=int(data.get("bytes_in", 0)),
            bytes_out=int(data.get("bytes_out", 0)),
            open_websockets=int(data.get("open_websockets", 0)),
            users={int(user): float(at) for user, at in (data.get("users") or {}).items()},
        )


def merge(parts: Iterable[Activity]) -> Activity:
    """Combine the activity of one instance reported by several router workers."""
    last, bytes_in, bytes_out, sockets = 0.0, 0, 0, 0
    users: dict[int, float] = {}
    for part in parts:
        last = max(last, part.last_request)
        bytes_in += part.bytes_in
        bytes_out += part.bytes_out
        sockets += part.open_websockets
        for user, at in part.users.items():
            users[user] = max(at, users.get(user, 0.0))
    return Activity(last, bytes_in, bytes_out, sockets, users)
