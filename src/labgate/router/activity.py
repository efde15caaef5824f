"""Activity per route: what idle culling reads.

The proxy bumps a mutable :class:`Counter` per instance on every request and
every chunk it forwards (attribute arithmetic, nothing more); readers get
frozen :class:`Activity` copies. Counters live per router process; when
several workers serve one port, the portal sums bytes and WebSockets and takes
the latest ``last_request`` (see :func:`labgate.wire.activity.merge`).
"""

from __future__ import annotations

from labgate.wire.activity import Activity, merge

__all__ = ["Activity", "ActivityLog", "Counter", "merge"]


class Counter:
    """The mutable counters behind one route's :class:`Activity`."""

    __slots__ = ("bytes_in", "bytes_out", "last_request", "open_websockets", "users")

    def __init__(self) -> None:
        self.last_request = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.open_websockets = 0
        #: Who passed the access check, and when last (the owner's access log).
        self.users: dict[int, float] = {}

    def freeze(self) -> Activity:
        """A frozen copy."""
        return Activity(
            self.last_request,
            self.bytes_in,
            self.bytes_out,
            self.open_websockets,
            dict(self.users),
        )


class ActivityLog:
    """Counters by instance id."""

    def __init__(self) -> None:
        self._counters: dict[str, Counter] = {}

    def counter(self, instance_id: str) -> Counter:
        """The counter of an instance, created on first use."""
        counter = self._counters.get(instance_id)
        if counter is None:
            counter = self._counters[instance_id] = Counter()
        return counter

    def get(self, instance_id: str) -> Activity | None:
        """The activity of one instance, or None when it has seen no traffic here."""
        counter = self._counters.get(instance_id)
        return None if counter is None else counter.freeze()

    def all(self) -> dict[str, Activity]:
        """The activity of every instance that has seen traffic."""
        return {instance_id: c.freeze() for instance_id, c in self._counters.items()}

    def forget(self, instance_id: str) -> None:
        """Drop an instance's counters once nothing of it is open any more."""
        counter = self._counters.get(instance_id)
        if counter is not None and counter.open_websockets <= 0:
            del self._counters[instance_id]
