"""What a site tells the portal: :class:`Report` objects, one per state change or note.

Sites send them through their link (:mod:`labgate.agent.link`); the portal's
instance manager applies them. They are plain data so that a network link can
carry them as JSON.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Report:
    """What a site tells the portal about one instance.

    ``state`` is the instance state the site saw (``starting``, ``running``,
    ``failed``, ``lost``, ``stopped``); ``kind`` is ``state`` for a transition
    or ``progress`` for a note on the way (then ``state`` is the current one).
    """

    instance_id: str
    state: str
    kind: str = "state"
    message: str = ""
    backend_state: dict[str, Any] | None = None
    endpoint: str | None = None
    log_tail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


Reporter = Callable[[Report], Awaitable[None]]


#: How a start failed, in the words its ``failed`` report starts with (``data.failure``).
NEVER_STARTED = "never started"
CRASHED = "crashed"
NEVER_ANSWERED = "never answered"


def start_failed(instance_id: str, kind: str, detail: str, *, log_tail: str = "") -> Report:
    """A ``failed`` report that says which failure it was: never started, crashed or
    never answered."""
    return Report(
        instance_id,
        "failed",
        message=f"{kind}: {detail}",
        data={"failure": kind.replace(" ", "_")},
        log_tail=log_tail,
    )
